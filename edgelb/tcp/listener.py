"""TCP mode: a static port whose connections are forwarded whole to a picked backend.

Both sockets of a connection are raw non-blocking sockets driven by `loop.add_reader` and
`loop.add_writer`; no asyncio Transport owns them. That lets the Linux path move bytes with
splice(2), socket -> pipe -> socket, without copying them through Python; elsewhere a shared
scratch buffer with recv_into/send does the same job.

Flow control is built into the relay: a direction reads from its source only when everything it
read before has reached its destination. Bytes the destination would not take (left in the pipe,
or a copied tail) switch the direction to "wait until the destination is writable", with the
source's reader removed, so a slow side holds at most one chunk in the proxy and the kernel's
socket buffers push back on the fast side.

Pipes are only held by a direction while it has bytes stuck in one; otherwise they go back to a
small per-process pool. An idle connection therefore costs its two sockets and a few objects.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import logging
import os
import socket
import struct
import sys
from typing import Any

from edgelb.control.tasks import log_failure
from edgelb.net import proxy_protocol
from edgelb.net.accept import ACCEPT_PAUSE, accept_batch, bind, nonblocking, refuse
from edgelb.pool import BackendState, ServiceState
from edgelb.tcp.relay import Relay
from watchers.model import Address, LimitsConfig

log = logging.getLogger(__name__)

SPLICE_AVAILABLE = hasattr(os, "splice") and sys.platform.startswith("linux")
# A pipe is only held by a direction whose destination is full, and then holds at most one chunk.
# Big chunks (1 MiB, /proc/sys/fs/pipe-max-size by default) measured ~25% faster than 64 KiB on
# loopback; once many directions are stuck, new reads shrink so the bytes parked in pipes stay
# bounded (about BIG_CHUNKS_HELD MiB plus SMALL_CHUNK per further stuck direction).
PIPE_SIZE = 1 << 20  # asked for with F_SETPIPE_SZ; the kernel may give less
SMALL_CHUNK = 64 * 1024
BIG_CHUNKS_HELD = 64  # held pipes beyond which reads use SMALL_CHUNK
PIPE_POOL_KEEP = 16  # empty pipes kept for reuse
COPY_CHUNK = 256 * 1024  # scratch buffer of the copying path
READ_BUDGET = 4  # chunks moved per readiness callback before yielding to other connections

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends RST instead of FIN


class _PipePool:
    """Empty pipes to splice through, shared by every connection of the process."""

    __slots__ = ("free", "out", "size")

    def __init__(self) -> None:
        self.free: list[tuple[int, int]] = []
        self.out = 0  # pipes handed out and not given back: directions with bytes stuck
        self.size = 0  # capacity of the first pipe made (0 until then)

    def get(self) -> tuple[int, int]:
        """An empty pipe; OSError when none can be made (out of file descriptors)."""
        if self.free:
            self.out += 1
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.out += 1
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except (OSError, AttributeError):
            pass  # over the per-user pipe budget or an old kernel: keep the default size
        if not self.size:
            self.size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        return r, w

    def chunk(self) -> int:
        """How much to read into a pipe now."""
        return self.size if self.out <= BIG_CHUNKS_HELD else min(self.size, SMALL_CHUNK)

    def put(self, pipe: tuple[int, int]) -> None:
        """Give back an empty pipe."""
        self.out -= 1
        if len(self.free) < PIPE_POOL_KEEP:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def discard(self, pipe: tuple[int, int]) -> None:
        """Close a pipe that may still hold bytes."""
        self.out -= 1
        os.close(pipe[0])
        os.close(pipe[1])


_PIPES = _PipePool()
_SCRATCH = bytearray(COPY_CHUNK)
_SCRATCH_VIEW = memoryview(_SCRATCH)


@functools.lru_cache(maxsize=4096)
def _ip_family(host: str) -> int:
    """AF_INET / AF_INET6 for an IP literal, 0 for a name that needs resolving."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return 0


class _Pump:
    """One direction of a connection: reads `src`, writes `dst`.

    `up` is True for client -> backend. Subclasses move the bytes; this base keeps the
    registration with the loop and the end-of-stream handling.
    """

    __slots__ = ("conn", "done", "dst", "dst_fd", "loop", "pending", "src", "src_fd", "up")

    def __init__(self, conn: _Connection, src: socket.socket, dst: socket.socket, up: bool):
        self.conn = conn
        self.loop = conn.loop
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.up = up
        self.pending = 0  # bytes read from src and not yet written to dst
        self.done = False

    def start(self) -> None:
        self.loop.add_reader(self.src_fd, self._readable)

    def _readable(self) -> None:
        raise NotImplementedError

    def _writable(self) -> None:
        raise NotImplementedError

    def _hold(self) -> None:
        """The destination is full: stop reading until it drains."""
        self.loop.remove_reader(self.src_fd)
        self.loop.add_writer(self.dst_fd, self._writable)

    def _drained(self) -> None:
        self.loop.remove_writer(self.dst_fd)
        self.loop.add_reader(self.src_fd, self._readable)

    def _eof(self) -> None:
        """The source sent FIN: pass the half-close on."""
        self.loop.remove_reader(self.src_fd)
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the destination is already gone; the other direction will find out
        self.conn.direction_done()

    def close(self) -> None:
        self.loop.remove_reader(self.src_fd)
        self.loop.remove_writer(self.dst_fd)
        self.done = True

    def _count_in(self, n: int) -> None:
        conn = self.conn
        conn.deadline = self.loop.time() + conn.service.policy.idle_timeout  # data moved
        if self.up:
            self.conn.service.bytes_in += n
            conn.bytes_up += n
        else:
            self.conn.backend.bytes_in += n  # type: ignore[union-attr]

    def _count_out(self, n: int) -> None:
        if self.up:
            self.conn.backend.bytes_out += n  # type: ignore[union-attr]
        else:
            self.conn.service.bytes_out += n
            self.conn.bytes_down += n


class _SplicePump(_Pump):
    """socket -> pipe -> socket with splice(2); the bytes never enter Python."""

    __slots__ = ("pipe",)

    def __init__(self, conn: _Connection, src: socket.socket, dst: socket.socket, up: bool):
        super().__init__(conn, src, dst, up)
        self.pipe: tuple[int, int] | None = None

    def _readable(self) -> None:
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = self.pipe = _PIPES.get()
            except OSError as e:
                log.warning(
                    "tcp %s: cannot make a pipe (%s); closing a connection; "
                    "raise the open files limit (ulimit -n)",
                    self.conn.service.name,
                    e,
                )
                self.conn.fail()
                return
        splice = os.splice
        src, pipe_w = self.src_fd, pipe[1]
        chunk = _PIPES.chunk()
        try:
            for _ in range(READ_BUDGET):
                try:
                    n = splice(src, pipe_w, chunk, flags=_SPLICE_FLAGS)
                except (BlockingIOError, InterruptedError):
                    break
                if n == 0:
                    self._release_pipe()
                    self._eof()
                    return
                self._count_in(n)
                self.pending = n
                if not self._flush():
                    self._hold()
                    return
        except OSError:
            self.conn.fail()
            return
        self._release_pipe()

    def _flush(self) -> bool:
        """Write what is in the pipe; True when it is empty. OSError means the peer is gone."""
        splice = os.splice
        pipe_r, dst = self.pipe[0], self.dst_fd  # type: ignore[index]
        while self.pending:
            try:
                m = splice(pipe_r, dst, self.pending, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return False
            if m == 0:
                return False
            self.pending -= m
            self._count_out(m)
        return True

    def _writable(self) -> None:
        try:
            if not self._flush():
                return
        except OSError:
            self.conn.fail()
            return
        self._release_pipe()
        self._drained()

    def _release_pipe(self) -> None:
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            _PIPES.put(pipe)

    def close(self) -> None:
        super().close()
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            if self.pending:
                _PIPES.discard(pipe)  # bytes nobody will read are still in it
            else:
                _PIPES.put(pipe)
        self.pending = 0


class _CopyPump(_Pump):
    """recv_into a shared scratch buffer, send from it; only a tail the destination refused is
    copied and kept."""

    __slots__ = ("tail",)

    def __init__(self, conn: _Connection, src: socket.socket, dst: socket.socket, up: bool):
        super().__init__(conn, src, dst, up)
        self.tail: memoryview | None = None

    def _readable(self) -> None:
        recv_into, send = self.src.recv_into, self.dst.send
        try:
            for _ in range(READ_BUDGET):
                try:
                    n = recv_into(_SCRATCH)
                except (BlockingIOError, InterruptedError):
                    return
                if n == 0:
                    self._eof()
                    return
                self._count_in(n)
                sent = 0
                while sent < n:
                    try:
                        m = send(_SCRATCH_VIEW[sent:n])
                    except (BlockingIOError, InterruptedError):
                        break
                    sent += m
                    self._count_out(m)
                if sent < n:
                    self.tail = memoryview(bytes(_SCRATCH_VIEW[sent:n]))
                    self.pending = n - sent
                    self._hold()
                    return
        except OSError:
            self.conn.fail()

    def _writable(self) -> None:
        tail = self.tail
        assert tail is not None
        try:
            while tail:
                try:
                    m = self.dst.send(tail)
                except (BlockingIOError, InterruptedError):
                    self.tail = tail
                    self.pending = len(tail)
                    return
                tail = tail[m:]
                self._count_out(m)
        except OSError:
            self.conn.fail()
            return
        self.tail = None
        self.pending = 0
        self._drained()

    def close(self) -> None:
        super().close()
        self.tail = None
        self.pending = 0


class _Connection(Relay):
    """A client connection: connect to a backend (one retry elsewhere), then relay."""

    __slots__ = ("client", "down", "header_rest", "resolver", "screen", "timer", "up", "upstream")

    def __init__(self, listener: TcpListener, client: socket.socket, service: ServiceState):
        super().__init__(listener, service)
        self.client = client
        self.upstream: socket.socket | None = None
        self.up: _Pump | None = None
        self.down: _Pump | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.resolver: asyncio.Task[Any] | None = None
        self.header_rest: memoryview | None = None  # PROXY header bytes still to send
        # accept_proxy_protocol, an untrusted peer: its first bytes must not be a PROXY header
        # (True: check before relaying; a SocketHeader while checking)
        self.screen: Any = False

    # -- connecting ---------------------------------------------------------------------

    def start(self, backend: BackendState) -> None:
        self.service.pool.acquire(backend)
        self.backend = backend
        self.backend_key = backend.key
        host, port = backend.spec.host, backend.spec.port
        self.timer = self.loop.call_later(self.service.policy.connect_timeout, self._connect_failed)
        family = _ip_family(host)
        if family:
            self._connect(family, (host, port))
        else:
            self.resolver = self.loop.create_task(self._resolve(host, port))
            self.resolver.add_done_callback(log_failure)

    async def _resolve(self, host: str, port: int) -> None:
        try:
            infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            log.debug("tcp %s: cannot resolve backend %s: %s", self.service.name, host, e)
            infos = []
        self.resolver = None
        if self.closed:
            return
        if not infos:
            self._connect_failed()
            return
        family, _, _, _, sockaddr = infos[0]
        self._connect(family, sockaddr)

    def _connect(self, family: int, sockaddr: Any) -> None:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            log.warning("tcp %s: cannot open a socket to a backend: %s", self.service.name, e)
            self._connect_failed()
            return
        self.upstream = sock
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            err = sock.connect_ex(sockaddr)
        except OSError as e:
            err = e.errno or errno.EINVAL
        if err == 0:
            self._connected()
        elif err == errno.EINPROGRESS:
            self.loop.add_writer(sock.fileno(), self._connect_done)
        else:
            self._connect_failed()

    def _connect_done(self) -> None:
        sock = self.upstream
        assert sock is not None
        self.loop.remove_writer(sock.fileno())
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._connect_failed()
        else:
            self._connected()

    def _connect_failed(self) -> None:
        """Refused, unreachable or timed out (the timer calls this too)."""
        if self.closed or self.connected:
            return
        backend = self.backend
        assert backend is not None
        self._retry_elsewhere(backend, self.loop.time())

    def _drop_attempt(self) -> None:
        """Undo one connection attempt: timer, resolver, socket and the backend's count."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.resolver is not None:
            self.resolver.cancel()
            self.resolver = None
        sock, self.upstream = self.upstream, None
        if sock is not None:
            self.loop.remove_writer(sock.fileno())
            sock.close()
        backend, self.backend = self.backend, None
        if backend is not None:
            self.service.pool.release(backend)

    def _connected(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.connected = True
        self.deadline = self.loop.time() + self.service.policy.idle_timeout
        backend = self.backend
        assert backend is not None and self.upstream is not None
        backend.connections_total += 1
        backend.open_connections += 1
        pump = _SplicePump if self.listener.splice else _CopyPump
        self.up = pump(self, self.client, self.upstream, True)
        self.down = pump(self, self.upstream, self.client, False)
        version = self.service.policy.proxy_protocol
        if version:
            self._send_header(proxy_protocol.for_socket(version, self.client, self.proxied))
        else:
            self._start_up()
        if not self.closed:
            self.down.start()

    # -- the PROXY protocol header (policy.proxy_protocol) ---------------------------------

    def _send_header(self, header: bytes) -> None:
        """Send the header, then start relaying the client's bytes: the client's reader is
        only added once the whole header is out, so nothing can overtake or split it."""
        up, upstream = self.up, self.upstream
        assert up is not None and upstream is not None
        if self._push_header(memoryview(header)):
            self._start_up()
        elif not self.closed:
            self.loop.add_writer(upstream.fileno(), self._header_writable)

    def _header_writable(self) -> None:
        assert self.header_rest is not None and self.upstream is not None
        if self._push_header(self.header_rest):
            self.loop.remove_writer(self.upstream.fileno())
            self._start_up()

    def _push_header(self, rest: memoryview) -> bool:
        """True once the header is all sent; False to wait for the backend to take more (or
        after closing on an error: the backend is gone)."""
        send = self.upstream.send  # type: ignore[union-attr]
        try:
            while rest:
                try:
                    rest = rest[send(rest):]
                except (BlockingIOError, InterruptedError):
                    self.header_rest = rest
                    return False
        except OSError:
            self.fail()
            return False
        self.header_rest = None
        return True

    def _start_up(self) -> None:
        """Relay the client's bytes; first, for an untrusted peer of a listener that accepts
        PROXY headers, make sure they do not start with one (no timeout: the backend may be
        the one to speak first)."""
        if self.screen is True:
            self.screen = proxy_protocol.SocketHeader(self.loop, self.client, False, None,
                                                      self._screened)
            return
        self.up.start()  # type: ignore[union-attr]

    def _screened(self, result: Any) -> None:
        self.screen = False
        if self.closed:
            return
        if result is False:
            self.up.start()  # type: ignore[union-attr]
            return
        if result != "closed":
            refused = self.listener.refused
            refused["proxy_protocol"] = refused.get("proxy_protocol", 0) + 1
            self.end_reason = "proxy_protocol"
        self.close()

    # -- relaying and closing -----------------------------------------------------------

    def expire(self, now: float) -> None:
        """Nothing moved either way for idle_timeout: close both sides (as HAProxy's
        `timeout client`/`timeout server` do in tcp mode)."""
        self.deadline = 0.0
        if not self.closed:
            self.end_reason = "idle_timeout"
            self.close()

    def direction_done(self) -> None:
        if self.up is not None and self.down is not None and self.up.done and self.down.done:
            self.close()

    def fail(self) -> None:
        """A reset or error on either side: close both (the other side sees a close)."""
        if not self.end_reason:
            self.end_reason = "error"
        self.close()

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.screen not in (True, False):
            self.screen.cancel()
        if self.up is not None:
            self.up.close()
        if self.down is not None:
            self.down.close()
        if self.connected and self.backend is not None:
            self.backend.open_connections -= 1
        for sock in (self.client, self.upstream):
            if sock is not None and reset:
                _set_reset_on_close(sock)
        self.client.close()
        if self.wait_until:
            self.service.pool.forget(self)
        self._drop_attempt()  # closes the upstream socket and releases the backend
        self.listener._forget(self)


def _peer_port(sock: socket.socket) -> int:
    try:
        return int(sock.getpeername()[1])
    except (OSError, IndexError, TypeError):
        return 0


def _set_reset_on_close(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass


class TcpListener:
    """A static port in tcp mode. The runtime may reassign `service` at any time; a connection
    keeps the service state it was accepted with."""

    kind = "tcp"

    def __init__(
        self,
        address: Address,
        service: ServiceState,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        splice: bool | None = None,
        ssl: Any = None,
    ) -> None:
        self.address = address
        self.service = service
        self.ssl = ssl  # an ssl.SSLContext: terminate TLS here, relay plaintext to backends
        self.loop: asyncio.AbstractEventLoop = loop  # type: ignore[assignment]
        self.splice = SPLICE_AVAILABLE if splice is None else (splice and SPLICE_AVAILABLE)
        self.accepted = 0
        self.bound: Address | None = None  # the address actually bound (port 0 resolved)
        self._socks: list[socket.socket] = []  # listening (net.accept.bind)
        self._conns: set[_Connection] = set()
        self._idle: asyncio.Event | None = None
        self._resume: asyncio.TimerHandle | None = None
        self.limits = LimitsConfig()  # set by the runtime
        self.per_client: dict[str, int] = {}  # open connections per client address
        self.refused: dict[str, int] = {}  # connections refused by a limit, by reason
        # accept_proxy_protocol (edgelb.net.proxy_protocol.AcceptPolicy), None = off
        self.accept_proxy: Any = None
        self.proxy_timeout = proxy_protocol.HEADER_TIMEOUT  # at most; tests shorten it
        self._headers: dict[socket.socket, Any] = {}  # accepted, reading a PROXY header
        # access log (edgelb.telemetry.hub.Telemetry): a record per connection; None: off
        self.telemetry: Any = None

    def set_accept_proxy(self, policy: Any) -> None:
        self.accept_proxy = policy

    def set_limits(self, limits: LimitsConfig) -> None:
        self.limits = limits

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def clients(self) -> set[_Connection]:
        """Open connections; the runtime's sweeper expires idle ones through it."""
        return self._conns

    async def start(self, serve: bool = True) -> None:
        """Listen and accept; `serve=False`: listen only (connections wait in the backlog)
        until `serve()`."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        self._socks = await bind(self.loop, self.address.host, self.address.port,
                                 f"tcp listener {self.address}")
        name = self._socks[0].getsockname()
        self.bound = Address(name[0], name[1])
        if serve:
            self._accept_on_all()

    async def serve(self) -> None:
        self._accept_on_all()

    def _accept_on_all(self) -> None:
        for sock in self._socks:
            self.loop.add_reader(sock.fileno(), self._on_accept, sock)

    def _on_accept(self, sock: socket.socket) -> None:
        accept_batch(sock, f"tcp listener {self.address}", self._pause_accepting,
                     self._accepted)

    def _pause_accepting(self) -> None:
        for sock in self._socks:
            self.loop.remove_reader(sock.fileno())
        self._resume = self.loop.call_later(ACCEPT_PAUSE, self._resume_accepting)

    def _accepted(self, sock: socket.socket, ip: str) -> None:
        self.accepted += 1
        accept = self.accept_proxy
        if accept is not None:
            self._read_header(sock, ip, accept.required(ip))
            return
        self._admit(sock, ip)

    def _admit(self, sock: socket.socket, ip: str, proxied: tuple[str, int] | None = None,
               screen: bool = False) -> None:
        """Over a limit: closed (counted); else handled. `ip` is the client's address."""
        n = self.per_client.get(ip, 0) + 1
        reason = self.limits.refusal(len(self._conns), n)
        if reason is not None:
            refuse(self.refused, reason, sock)
            return
        self.per_client[ip] = n
        self._handle(sock, ip, proxied=proxied, screen=screen)

    # -- accept_proxy_protocol: a PROXY header before the client's bytes ------------------

    def _read_header(self, sock: socket.socket, ip: str, required: bool) -> None:
        if not required and self.ssl is None:
            # an untrusted peer: relayed as itself, its first bytes checked by the relay
            # (it may be the backend that speaks first)
            self._admit(sock, ip, screen=True)
            return
        if len(self._conns) + len(self._headers) >= self.limits.connections:
            refuse(self.refused, "connections", sock)
            return
        if not nonblocking(sock):
            return
        self._headers[sock] = None
        timeout = min(self.proxy_timeout, self.service.policy.header_timeout or
                      proxy_protocol.HEADER_TIMEOUT)
        reader = proxy_protocol.SocketHeader(
            self.loop, sock, required, timeout,
            lambda result: self._header_done(sock, ip, result))
        if sock in self._headers:
            self._headers[sock] = reader

    def _header_done(self, sock: socket.socket, ip: str, result: Any) -> None:
        self._headers.pop(sock, None)
        if isinstance(result, proxy_protocol.Header):
            self._admit(sock, result.ip or ip, proxied=result.peer)
        elif result is False:
            self._admit(sock, ip)
        else:
            log.debug("tcp listener %s: peer %s: PROXY header refused: %s", self.address, ip,
                      result)
            refuse(self.refused, "proxy_protocol", sock)

    def _resume_accepting(self) -> None:
        self._resume = None
        self._accept_on_all()

    def adopt(self, sock: socket.socket, ip: str, service: ServiceState,
              proxied: tuple[str, int] | None = None) -> None:
        """Relay a connection accepted elsewhere (a TLS entrypoint passing a ClientHello
        through by SNI) to `service`, counted among this listener's connections. The caller
        has counted `ip` in nothing; limits are the accepting listener's business."""
        self.per_client[ip] = self.per_client.get(ip, 0) + 1
        self._handle(sock, ip, service, proxied=proxied)

    def _handle(self, sock: socket.socket, ip: str = "", service: ServiceState | None = None,
                proxied: tuple[str, int] | None = None, screen: bool = False) -> None:
        service = service or self.service
        service.tcp_connections += 1
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()  # the client is already gone
            self._forget_ip(ip)
            return
        sources = service.policy.sources
        if sources is not None and not sources.permits(ip):
            service.shed["source"] = service.shed.get("source", 0) + 1
            sock.close()
            self._forget_ip(ip)
            return
        if self.ssl is not None or service.policy.backend_tls is not None:
            # TLS on either side: relayed through transports (edgelb.tcp.tls), which picks a
            # backend after the client's handshake
            from edgelb.tcp.tls import TlsConnection

            tls_conn = TlsConnection(self, sock, service, ip)
            tls_conn.proxied = proxied
            if self.telemetry is not None:
                tls_conn.peer_port = _peer_port(sock)
            self._conns.add(tls_conn)  # type: ignore[arg-type]
            tls_conn.begin()
            return
        conn = _Connection(self, sock, service)
        conn.peer_ip = ip
        if self.telemetry is not None:
            conn.peer_port = _peer_port(sock)
        conn.proxied = proxied
        conn.screen = screen
        self._conns.add(conn)
        conn.dispatch(self.loop.time())
        # else: it waits for a free slot, or is closed at queue_timeout

    def _forget(self, conn: _Connection) -> None:
        if conn in self._conns:
            self._forget_ip(conn.peer_ip)
            if self.telemetry is not None:
                self.telemetry.tcp_done(conn, self.loop.time())
        self._conns.discard(conn)
        if not self._conns and self._idle is not None:
            self._idle.set()

    def _forget_ip(self, ip: str) -> None:
        n = self.per_client.get(ip, 1) - 1
        if n > 0:
            self.per_client[ip] = n
        else:
            self.per_client.pop(ip, None)
        if not self._conns and self._idle is not None:
            self._idle.set()

    def stop_accepting(self) -> None:
        """Close the listening socket; open connections go on."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        socks, self._socks = self._socks, []
        for sock in socks:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        headers, self._headers = self._headers, {}
        for client, reader in headers.items():  # no byte of theirs was relayed yet
            if reader is not None:
                reader.cancel()
            client.close()

    async def wait_closed(self, timeout: float) -> None:
        """Wait until the open connections end; reset what remains after `timeout` seconds."""
        if self._conns:
            if self._idle is None:
                self._idle = asyncio.Event()
            self._idle.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._idle.wait()
            except TimeoutError:
                pass
        self._close_all()

    def abort(self) -> None:
        """Stop accepting and reset every open connection now."""
        self.stop_accepting()
        self._close_all()

    def _close_all(self) -> None:
        for conn in list(self._conns):
            conn.close(reset=True)
