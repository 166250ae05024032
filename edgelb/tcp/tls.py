"""TCP mode when either side speaks TLS: terminate the client's TLS on a static port
(`TcpListener.ssl`), speak TLS to the backends (`policy.backend_tls`), or both.

Plain-to-plain connections stay on the splice/copy relay of `edgelb.tcp.listener._Connection`; this
relay is only chosen by `TcpListener._handle` when a TLS layer is involved, because TLS
records have to pass through Python anyway. Both sides are asyncio Transports (uvloop's TLS
implementation on the production loop) driven by one small Protocol per side.

Behaviour, documented because it differs from the splice relay:
- The client's handshake comes first (HANDSHAKE_TIMEOUT, as on the https entrypoints); only
  then is a backend picked, so a client that stalls or sends garbage never reaches a backend.
  A failed handshake closes the connection and counts in the listener's
  `refused["tls_handshake"]` (edgelb_listener_refused_total).
- Connecting to a backend includes its TLS handshake; the whole is bounded by
  `connect_timeout`, and a failed handshake (a refused certificate, a wrong name) counts as a
  connect failure: `pool.failure(b, "connect")`, one retry on another backend, else
  `shed["connect_failed"]`.
- Flow control: a side whose transport buffers more than its high-water mark pauses reading on
  the other side until it drains, so a slow reader holds back the fast writer and the proxy
  keeps about one high-water mark (+ one read chunk) per direction, plus TLS record buffers.
- Half-close: TLS transports cannot half-close (asyncio offers no close_notify-only
  shutdown), so when either side ends its stream (FIN or close_notify) the connection is
  closed: what was already relayed is flushed to both sides first (with a close_notify on TLS
  sides), then both are closed. Only plain-to-plain connections pass half-closes on.
- Byte counters count plaintext, when it is read from one side and handed to the other.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from typing import TYPE_CHECKING, Any

from edgelb.control.tasks import log_failure
from edgelb.net import proxy_protocol
from edgelb.net.backend_tls import client_context, server_hostname
from edgelb.net.tls import HANDSHAKE_TIMEOUT
from edgelb.tcp.relay import Relay

if TYPE_CHECKING:
    from edgelb.pool import BackendState, ServiceState
    from edgelb.tcp.listener import TcpListener

log = logging.getLogger(__name__)

# Seconds a TLS side may take to exchange close_notify alerts once the connection ends (uvloop's
# default is 30 s; the peer has nothing more to say, so this only bounds a silent one).
SHUTDOWN_TIMEOUT = 5.0
WARN_EVERY = 30.0  # seconds between two warnings about one backend's failing TLS handshakes
_LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends RST instead of FIN
_warned: dict[str, float] = {}


class _Side(asyncio.Protocol):
    """One side of a relayed connection: what it reads goes to the other side (`peer`).

    `up` is True for the client side (its bytes travel to the backend). Bytes read before the
    other side exists (a client talking first while the backend is being connected) are kept
    in `early` with reading paused, and relayed once it does."""

    __slots__ = ("conn", "early", "lost", "peer", "transport", "up")

    def __init__(self, conn: TlsConnection, up: bool) -> None:
        self.conn = conn
        self.up = up
        self.transport: Any = None
        self.peer: _Side | None = None
        self.early: list[bytes] | None = None
        self.lost = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        # Until both sides are there. uvloop starts reading plain transports after this
        # returns all the same, hence `early`.
        transport.pause_reading()
        conn = self.conn
        if conn.closed or (not self.up and conn.upstream is not self):
            transport.abort()  # an attempt given up while its connect was completing

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        peer = self.peer
        if conn.closed:
            return
        if peer is None:
            if self.early is None:
                self.early = []
            self.early.append(data)
            self.transport.pause_reading()
            return
        n = len(data)
        conn.deadline = conn.loop.time() + conn.service.policy.idle_timeout
        backend = conn.backend
        if self.up:
            conn.service.bytes_in += n
            conn.bytes_up += n
            backend.bytes_out += n  # type: ignore[union-attr]
        else:
            backend.bytes_in += n  # type: ignore[union-attr]
            conn.service.bytes_out += n
            conn.bytes_down += n
        peer.transport.write(data)

    def flush_early(self) -> None:
        early, self.early = self.early, None
        if early:
            self.data_received(b"".join(early))

    def eof_received(self) -> bool:
        self.conn.close()  # see the module docstring: flush both ways, then close
        return False

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.lost:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.lost and not self.conn.closed:
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.conn.side_lost(self)


class TlsConnection(Relay):
    """A tcp-mode client connection relayed through asyncio transports (see the module
    docstring). Offers the interface of `edgelb.tcp.listener._Connection` that the listener,
    the pool's queue and the runtime's sweeper use."""

    __slots__ = ("client", "finished", "proxy_header", "sock", "task", "upstream")

    def __init__(self, listener: TcpListener, sock: socket.socket, service: ServiceState,
                 ip: str = "") -> None:
        super().__init__(listener, service, ip)
        self.sock = sock
        self.client: _Side | None = None
        self.upstream: _Side | None = None
        self.task: asyncio.Task[None] | None = None  # the client's handshake, or a connect
        self.finished = False  # both sides gone, everything released
        self.proxy_header = b""  # the PROXY protocol header, once made (policy.proxy_protocol)

    # -- the client side ----------------------------------------------------------------

    def begin(self) -> None:
        """Take the accepted socket over (and do the client's handshake), then pick."""
        self.client = _Side(self, True)
        task = self.task = self.loop.create_task(self._accept())
        task.add_done_callback(self._accept_done)

    def _accept_done(self, task: asyncio.Task[None]) -> None:
        # Cancelled before the client's transport existed (or before the accept started at
        # all): nothing else closes the socket.
        client = self.client
        if task.cancelled() and (client is None or client.transport is None):
            self.sock.close()
        log_failure(task)

    async def _accept(self) -> None:
        ctx = self.listener.ssl
        side = self.client
        assert side is not None
        extra: dict[str, Any] = {}
        if ctx is not None:
            extra = {"ssl": ctx, "ssl_handshake_timeout": HANDSHAKE_TIMEOUT,
                     "ssl_shutdown_timeout": SHUTDOWN_TIMEOUT}
        try:
            await self.loop.connect_accepted_socket(lambda: side, self.sock, **extra)
        except OSError as e:  # ssl.SSLError, the handshake timeout, a reset
            if ctx is not None:
                log.debug("tcp %s: client %s: TLS handshake failed: %s", self.service.name,
                          self.peer_ip, e)
                refused = self.listener.refused
                refused["tls_handshake"] = refused.get("tls_handshake", 0) + 1
                self.end_reason = "tls_handshake"
            self.task = None
            self.close()
            return
        self.task = None
        if self.closed:  # the client went away right after its handshake
            return
        self.dispatch(self.loop.time())

    # -- the backend side ---------------------------------------------------------------

    def start(self, backend: BackendState) -> None:
        self.service.pool.acquire(backend)
        self.backend = backend
        self.backend_key = backend.key
        task = self.task = self.loop.create_task(self._connect(backend))
        task.add_done_callback(log_failure)

    async def _connect(self, backend: BackendState) -> None:
        side = self.upstream = _Side(self, False)
        spec = backend.spec
        extra: dict[str, Any] = {}
        tls = self.service.policy.backend_tls
        if tls is not None:
            extra = {"ssl": client_context(tls, alpn=()),
                     "server_hostname": server_hostname(tls, spec.host),
                     "ssl_shutdown_timeout": SHUTDOWN_TIMEOUT}
        timeout = self.service.policy.connect_timeout
        header = self._proxy_header()
        try:
            async with asyncio.timeout(timeout):
                if header and tls is not None:
                    # the header goes before the ClientHello, in the clear: send it on our own
                    # socket, then hand that socket to the TLS transport
                    sock = await self._dial(spec.host, spec.port, header)
                    await self.loop.create_connection(lambda: side, sock=sock, **extra)
                else:
                    await self.loop.create_connection(lambda: side, spec.host, spec.port, **extra)
        except ssl.SSLError as e:
            why = getattr(e, "verify_message", None) or e.reason or e
            self._warn_tls(backend, f"failed the TLS handshake ({why})")
            self._connect_failed(backend)
        except TimeoutError:
            log.debug("tcp %s: backend %s did not connect in %gs", self.service.name,
                      backend.key, timeout)
            self._connect_failed(backend)
        except OSError as e:
            log.debug("tcp %s: backend %s: %s", self.service.name, backend.key, e)
            self._connect_failed(backend)
        else:
            if header and tls is None:
                side.transport.write(header)  # ahead of every relayed byte
            self._connected(side)

    def _proxy_header(self) -> bytes:
        """The PROXY protocol header for this client (b"" when the policy sends none); the
        client's addresses are read once, from the accepted socket."""
        version = self.service.policy.proxy_protocol
        if not version:
            return b""
        if not self.proxy_header:
            self.proxy_header = proxy_protocol.for_socket(version, self.sock, self.proxied)
        return self.proxy_header

    async def _dial(self, host: str, port: int, header: bytes) -> socket.socket:
        """A socket connected to the backend with `header` sent on it. Addresses are tried in
        order, as create_connection does; the caller's timeout bounds the whole."""
        infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        error: OSError = OSError(f"cannot resolve {host}")
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await self.loop.sock_connect(sock, addr)
                await self.loop.sock_sendall(sock, header)
            except OSError as e:
                sock.close()
                error = e
                continue
            except BaseException:  # cancelled (the connect timeout, the client went away)
                sock.close()
                raise
            return sock
        raise error

    def _warn_tls(self, backend: BackendState, detail: str) -> None:
        """A refused certificate is a configuration problem: say so, once in a while."""
        now = self.loop.time()
        key = f"{self.service.name}/{backend.key}"
        if now - _warned.get(key, -WARN_EVERY) >= WARN_EVERY:
            _warned[key] = now
            log.warning("tcp %s: backend %s %s; check backend_tls (ca, sni) against the "
                        "backend's certificate", self.service.name, backend.key, detail)

    def _connect_failed(self, backend: BackendState) -> None:
        self.task = None
        if self.closed:
            return
        self._retry_elsewhere(backend, self.loop.time())

    def _drop_attempt(self) -> None:
        """Undo one connection attempt: its transport (if any) and the backend's slot."""
        side, self.upstream = self.upstream, None
        if side is not None and side.transport is not None and not side.lost:
            side.transport.abort()
        backend, self.backend = self.backend, None
        if backend is not None:
            self.service.pool.release(backend)

    def _connected(self, upstream: _Side) -> None:
        self.task = None
        client = self.client
        if self.closed or client is None or upstream.lost:
            if not self.closed:
                self.close()
            return
        self.connected = True
        self.deadline = self.loop.time() + self.service.policy.idle_timeout
        backend = self.backend
        assert backend is not None
        backend.connections_total += 1
        backend.open_connections += 1
        client.peer, upstream.peer = upstream, client
        client.transport.resume_reading()
        upstream.transport.resume_reading()
        client.flush_early()  # after resuming: a full peer may pause this side again
        if not self.closed:
            upstream.flush_early()

    # -- ending -------------------------------------------------------------------------

    def side_lost(self, side: _Side) -> None:
        if self.finished or (side is not self.client and side is not self.upstream):
            return  # already over, or an abandoned attempt
        if not self.closed:
            self.close()  # the other side gets what was relayed to it, then closes
        elif self._sides_gone():
            self._finish()

    def expire(self, now: float) -> None:
        """Nothing moved for idle_timeout: close (flushing); if already closing, reset."""
        self.deadline = 0.0
        if not self.end_reason:
            self.end_reason = "idle_timeout"
        self.close(reset=self.closed)

    def close(self, reset: bool = False) -> None:
        """End the connection: flush what was relayed and close both sides, or with `reset`
        drop everything at once (RST)."""
        if self.finished:
            return
        if not self.closed:
            self.closed = True
            if self.task is not None:
                self.task.cancel()
            if self.wait_until:
                self.service.pool.forget(self)
                self.wait_until = 0.0
            if not self.connected:
                self._drop_attempt()
        if reset:
            if self.client is None or self.client.transport is None:
                _linger(self.sock)  # still in the handshake
            for side in (self.client, self.upstream):
                if side is not None and side.transport is not None and not side.lost:
                    _reset(side.transport)
            self._finish()
            return
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None and not side.lost:
                side.transport.close()
        self.deadline = self.loop.time() + self.service.policy.idle_timeout  # bounds the flush
        if self._sides_gone():
            self._finish()

    def _sides_gone(self) -> bool:
        return all(s is None or s.transport is None or s.lost
                   for s in (self.client, self.upstream))

    def _finish(self) -> None:
        self.finished = True
        self.deadline = 0.0
        if self.connected and self.backend is not None:
            self.backend.open_connections -= 1
        self._drop_attempt()
        client = self.client
        if self.task is None and (client is None or client.transport is None):
            self.sock.close()  # no transport took it (while a task runs, _accept_done does)
        self.listener._forget(self)  # type: ignore[arg-type]

    def buffered(self) -> int:
        """Bytes held in this connection's transport write buffers (plaintext and records)."""
        return sum(s.transport.get_write_buffer_size() for s in (self.client, self.upstream)
                   if s is not None and s.transport is not None and not s.lost)


def _linger(sock: Any) -> None:
    """Make the socket's close send a RST rather than a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except (OSError, ValueError, AttributeError):
        pass  # closed already, or a transport's socket that does not allow it


def _reset(transport: Any) -> None:
    """Close now, with a RST where the socket allows it."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        _linger(sock)
    transport.abort()
