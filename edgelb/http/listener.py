"""An HTTP listener: a static port of one service, or a shared entrypoint routing by host/path.

A TLS entrypoint may also pass TLS through undecrypted, by the SNI name of the ClientHello
(`set_passthrough`). While its table is empty it serves exactly as any other listener, through
`loop.create_server` (uvloop accepts and handshakes in C). While the table names something, the
listener accepts on its own socket instead: each new connection is peeked at (MSG_PEEK, nothing
consumed) until its ClientHello is whole, then either adopted by `relay`, an unbound
`TcpListener` that splices the raw bytes to the passthrough service's backends, or handed to
TLS termination (`loop.connect_accepted_socket`), which reads the ClientHello from the start.
Both modes share one listening socket: the server is given a duplicate of it, so switching
between them at a reconcile never rebinds the port.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl as ssl_module
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgelb.control.tasks import log_failure
from edgelb.http.client import ClientProtocol
from edgelb.http.filters import routed
from edgelb.http.router import Router
from edgelb.http.upstream import UpstreamProtocol
from edgelb.net import proxy_protocol, sni
from edgelb.net.accept import ACCEPT_PAUSE, BACKLOG, accept_batch, bind, nonblocking, refuse
from edgelb.net.tls import HANDSHAKE_TIMEOUT
from watchers.model import Address, LimitsConfig, PathRules, Policy

if TYPE_CHECKING:
    from edgelb.http.exchange import Exchange
    from edgelb.pool import ServiceState

log = logging.getLogger("edgelb.http")

# Peeked ClientHello bytes land here (one buffer per process: a peek is parsed at once).
_PEEK_BUF = bytearray(sni.MAX_HELLO)
_PEEK_VIEW = memoryview(_PEEK_BUF)


class HttpListener:
    """Owns a listening socket and the client connections it accepted.

    `service` is set for a static port; `router` and `services` (swapped by the runtime in one
    step) are used on an entrypoint. `upstreams` is the runtime's registry of backend
    connections, shared by every listener, so the sweeper can expire them.
    """

    def __init__(
        self,
        address: Address,
        *,
        service: ServiceState | None = None,
        name: str = "",
        defaults: Policy | None = None,
        upstreams: set[UpstreamProtocol] | None = None,
        local_responses: dict[int, int] | None = None,
        local_counts: dict[int, int] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.address = address
        self.ssl = ssl  # TLS termination: a context whose SNI callback picks the certificate
        self.kind = "http" if service is not None else "entrypoint"
        self.name = name or (service.name if service is not None else str(address))
        self.service = service
        self.router = Router()
        self.services: dict[str, ServiceState] = {}
        self.defaults = defaults or Policy()
        self.loop = loop or asyncio.get_event_loop()
        self.clients: set[ClientProtocol] = set()
        self.upstreams: set[UpstreamProtocol] = upstreams if upstreams is not None else set()
        self.local_responses: dict[int, int] = {} if local_responses is None else local_responses
        # the same by method (edgelb.http.accounting.count), when no service was routed to
        self.local_counts: dict[int, int] = {} if local_counts is None else local_counts
        # access log, request IDs, tracing (edgelb.telemetry.hub.Telemetry); None: off. Read
        # by each new connection.
        self.telemetry: Any = None
        self.accepted = 0
        self.limits = LimitsConfig()  # set by the runtime
        self.max_headers = self.limits.headers
        self.min_body_rate = 0
        self.connecting: set[asyncio.Task[Any]] = set()  # upstream connects in progress
        self.mirroring: set[asyncio.Task[Any]] = set()  # request copies (edgelb/http/mirror.py)
        self.merge_slashes = True  # see set_path_rules
        self.keep_encoded_slashes = False
        self.per_client: dict[bytes, int] = {}  # open connections per client address
        self.refused: dict[str, int] = {}  # connections or requests refused by a limit
        self.scheme = b"https" if ssl is not None else b"http"
        self.closing = False
        self.soft_closing = False  # see soft_drain
        self._host_header = str(address).encode()
        self.header_timeout_s = self.idle_timeout_s = 0.0
        # TLS passthrough by SNI (TLS entrypoints only; see the module docstring)
        self.sni_table = sni.SniTable()
        self.relay: Any = None  # a tcp.listener.TcpListener relaying passed-through connections
        # makes `relay` (the runtime's: the http data path does not import the tcp one)
        self.make_relay: Callable[[HttpListener], Any] = _no_relay
        self.handshake_timeout = HANDSHAKE_TIMEOUT
        self.sni_outcomes: dict[str, int] = {}  # passthrough, terminated, timeout, closed
        self._socks: list[socket.socket] = []  # listening sockets (net.accept.bind)
        self._servers: list[asyncio.AbstractServer] = []  # serving duplicates of _socks
        self._own = False  # accepting on _socks here (the table names something)
        self._peeking: set[_Peek] = set()
        self._handshakes: set[asyncio.Task[Any]] = set()
        self._resume: asyncio.TimerHandle | None = None
        self._switch: asyncio.Task[None] | None = None
        self._idle: asyncio.Event | None = None  # set when wait_closed has nothing left to wait
        # accept_proxy_protocol (edgelb.net.proxy_protocol.AcceptPolicy), None = off; connections
        # whose header (or first bytes) are awaited, as protocols or raw sockets
        self.accept_proxy: Any = None
        self.proxy_timeout = proxy_protocol.HEADER_TIMEOUT  # at most; tests shorten it
        self.proxy_pending: set[Any] = set()
        # HTTP/2 (an edgelb.h2.server.H2Entry, set by the runtime; None: HTTP/1.1 only)
        self.h2: Any = None
        self.refresh()

    def set_path_rules(self, rules: PathRules) -> None:
        """merge_slashes and encoded_slashes (edgelb/http/target.py) for the next request."""
        self.merge_slashes = rules.merge_slashes
        self.keep_encoded_slashes = rules.encoded_slashes == "keep"

    def set_limits(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self.max_headers = limits.headers
        self.min_body_rate = limits.min_body_rate

    def refresh(self) -> None:
        """Re-read the timeouts after `service` or `defaults` changed (the runtime calls it)."""
        policy = self.policy()
        self.header_timeout_s = policy.header_timeout
        self.idle_timeout_s = policy.idle_timeout

    @property
    def connections(self) -> int:
        relay = self.relay
        return (len(self.clients) + len(self._peeking) + len(self.proxy_pending)
                + (relay.connections if relay else 0))

    # -- accept_proxy_protocol ----------------------------------------------------------------

    def set_accept_proxy(self, policy: Any) -> None:
        """Read a PROXY header first from now on (policy), or not (None). A TLS listener
        reads it on its own accept loop, before the TLS bytes."""
        self.accept_proxy = policy
        if self.ssl is not None:
            self.set_passthrough(self.sni_table)

    def header_timeout(self) -> float:
        return min(self.proxy_timeout, self.header_timeout_s or proxy_protocol.HEADER_TIMEOUT)

    def _new_protocol(self) -> asyncio.Protocol:
        """The protocol of a connection accepted by a server (once per connection)."""
        accept = self.accept_proxy
        if accept is None:
            return ClientProtocol(self)
        return _HeaderProtocol(self, accept)

    def refuse_proxy(self, ip: str, why: str) -> None:
        log.debug("%s %s: peer %s: PROXY header refused: %s", self.kind, self.name, ip, why)
        self.refused["proxy_protocol"] = self.refused.get("proxy_protocol", 0) + 1

    def policy(self) -> Policy:
        service = self.service
        return service.policy if service is not None else self.defaults

    def default_host(self) -> bytes:
        return self._host_header

    def route(self, ex: Exchange) -> ServiceState | None:
        """The service `ex` goes to, with its route's filters applied (edgelb/http/filters.py);
        None when no route matches (404), or when its route answered it (a redirect)."""
        rule = self.router.match(ex.host.decode("latin-1"), ex.url.decode("latin-1"),
                                 ex.method, ex.lines)
        if rule is None:
            return None
        if rule.plain:
            return self.services.get(rule.service)
        return routed(ex, rule, self)

    async def start(self, serve: bool = True) -> None:
        """Listen (net.accept.bind) and serve: uvloop accepts (and handshakes TLS) in C; a TLS
        entrypoint with passthrough names or a PROXY header to read accepts here instead.
        `serve=False`: listen only (connections wait in the backlog) until `serve()`."""
        self._socks = await bind(self.loop, self.address.host, self.address.port,
                                 f"{self.kind} {self.name}")
        if serve:
            await self.serve()

    async def serve(self) -> None:
        """Accept on the listening sockets (a no-op when it does already)."""
        if self._own or self._servers or self.closing or not self._socks:
            return
        if self.ssl is not None and (self.sni_table or self.accept_proxy is not None):
            self._accept_here()
            return
        try:
            self._servers = await self._serve()
        except OSError:
            self._close_sockets()
            raise

    def soft_drain(self) -> None:
        """Shutting down soon: still accept, but end every connection after its current
        response (`Connection: close`), so clients move to another replica while the
        endpoint is being removed, instead of losing a request sent on an idle connection
        when the listener finally closes."""
        self.soft_closing = True
        for client in self.clients:
            client.closing = True

    def stop_accepting(self) -> None:
        """Stop accepting; idle keep-alive clients are closed, busy ones after their response.
        Passed-through connections, and those still sending their ClientHello, go on."""
        self.closing = True
        self._close_sockets()
        self._drop_pending()  # nothing of theirs was served yet
        for client in list(self.clients):
            client.drain()

    async def wait_closed(self, timeout: float) -> None:
        """Wait until the open connections end (clients, ClientHellos being peeked at, TLS
        handshakes, passed-through relays); reset what remains after `timeout` seconds."""
        deadline = self.loop.time() + timeout
        if self._busy():
            self._idle = asyncio.Event()
            try:
                async with asyncio.timeout(timeout):
                    await self._idle.wait()
            except TimeoutError:
                pass
            finally:
                self._idle = None
        if self.relay is not None:
            await self.relay.wait_closed(max(0.0, deadline - self.loop.time()))
        self.abort()

    def _busy(self) -> bool:
        return bool(self.clients or self._peeking or self._handshakes)

    def connection_gone(self) -> None:
        """A client, a peeked connection or a handshake ended: wake `wait_closed` once none is
        left. Checked at the next loop step, so a peek that ends by starting a handshake does
        not look like the last connection."""
        if self._idle is not None:
            self.loop.call_soon(self._check_idle)

    def _check_idle(self) -> None:
        if self._idle is not None and not self._busy():
            self._idle.set()

    def abort(self) -> None:
        self._close_sockets()
        for client in list(self.clients):
            client.transport.abort()
        self._drop_pending()
        for peek in list(self._peeking):
            self._drop(peek, "closed")
        for task in list(self._handshakes):
            task.cancel()
        for task in list(self.mirroring):  # request copies still on their way
            task.cancel()
        if self.relay is not None:
            self.relay.abort()

    def _drop_pending(self) -> None:
        for pending in list(self.proxy_pending):
            pending.abort()
        self.proxy_pending.clear()

    # -- TLS entrypoints: terminate, or pass through by SNI ---------------------------------

    def set_passthrough(self, table: sni.SniTable) -> None:
        """The names this entrypoint passes through from now on (the runtime calls it at every
        reconcile). Switches between serving and peeking without rebinding."""
        self.sni_table = table
        if self.ssl is None or not self._socks or self.closing:
            return  # plain: nothing to pass through; not started: applied by start()
        if table or self.accept_proxy is not None:
            if not self._own:
                self._accept_here()
        elif self._own and self._switch is None:
            self._switch = self.loop.create_task(self._back_to_serving())
            self._switch.add_done_callback(log_failure)

    def sni_status(self) -> dict[str, Any]:
        """The passthrough table and what became of peeked connections (admin status)."""
        return {"passthrough": self.sni_table.summary(), "outcomes": dict(self.sni_outcomes)}

    async def _serve(self) -> list[asyncio.AbstractServer]:
        """Servers (uvloop's accept and handshake) on duplicates of the listening sockets:
        closing one later leaves the socket listening for `_accept_here`."""
        servers: list[asyncio.AbstractServer] = []
        try:
            for sock in self._socks:
                servers.append(await self.loop.create_server(
                    self._new_protocol, sock=sock.dup(), backlog=BACKLOG,
                    ssl=self.ssl,
                    ssl_handshake_timeout=self.handshake_timeout if self.ssl is not None else None))
        except BaseException:  # OSError, or cancelled by a close meanwhile
            for server in servers:
                server.close()
            raise
        return servers

    def _accept_here(self) -> None:
        for sock in self._socks:
            self.loop.add_reader(sock.fileno(), self._on_accept, sock)
        self._own = True
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()

    def _stop_accepting_here(self) -> None:
        if self._own:
            for sock in self._socks:
                self.loop.remove_reader(sock.fileno())
        self._own = False
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None

    async def _back_to_serving(self) -> None:
        """The table became empty: hand accepting back to the servers (they take over once
        they are up; until then, and if the table fills again meanwhile, nothing changes)."""
        socks = self._socks
        try:
            try:
                servers = await self._serve()
            except OSError as e:
                log.warning("entrypoint %s: cannot serve TLS on %s again (%s); keeps peeking",
                            self.name, self.address, e)
                return
            if (self.sni_table or self.accept_proxy is not None or self.closing or not self._own
                    or socks is not self._socks):
                for server in servers:
                    server.close()
                return
            self._stop_accepting_here()
            self._servers = servers
        finally:
            self._switch = None

    def _close_sockets(self) -> None:
        self._stop_accepting_here()
        if self._switch is not None:
            self._switch.cancel()
            self._switch = None
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        socks, self._socks = self._socks, []
        for sock in socks:
            sock.close()

    def _on_accept(self, lsock: socket.socket) -> None:
        accept_batch(lsock, f"entrypoint {self.name}", self._pause_accepting, self._accepted)

    def _pause_accepting(self) -> None:
        self._stop_accepting_here()
        self._resume = self.loop.call_later(ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if not self.closing and self._socks and not self._own:
            self._accept_here()

    def _accepted(self, sock: socket.socket, ip: str) -> None:
        """A new connection: its PROXY header first (accept_proxy_protocol), then `_admit`."""
        accept = self.accept_proxy
        if accept is None:
            self._admit(sock, ip)
            return
        if self.connections >= self.limits.connections:
            refuse(self.refused, "connections", sock)
            return
        if not nonblocking(sock):
            return
        pending = _PendingSocket(sock)
        self.proxy_pending.add(pending)
        # a TLS client speaks first: an untrusted peer's first bytes are checked here too
        pending.reader = proxy_protocol.SocketHeader(
            self.loop, sock, accept.required(ip), self.header_timeout(),
            lambda result: self._header_done(pending, ip, result))
        if pending not in self.proxy_pending:
            pending.reader = None

    def _header_done(self, pending: _PendingSocket, ip: str, result: Any) -> None:
        self.proxy_pending.discard(pending)
        pending.reader = None
        if isinstance(result, proxy_protocol.Header):
            self._admit(pending.sock, result.ip or ip, result.peer)
        elif result is False:
            self._admit(pending.sock, ip)
        else:
            self.refuse_proxy(ip, result)
            pending.sock.close()

    def _admit(self, sock: socket.socket, ip: str, proxied: tuple[str, int] | None = None
               ) -> None:
        """Refuse the connection over a limit, else peek at its ClientHello. `ip` is the
        client's (`proxied`: the address and port a PROXY header gave)."""
        ipb = ip.encode()
        relay = self.relay
        n = self.per_client.get(ipb, 0) + 1 + (relay.per_client.get(ip, 0) if relay else 0)
        reason = self.limits.refusal(self.connections, n)
        if reason is not None:
            refuse(self.refused, reason, sock)
            return
        if not nonblocking(sock):
            return
        self.per_client[ipb] = self.per_client.get(ipb, 0) + 1
        loop = self.loop
        peek = _Peek(sock, ip, ipb, loop.time() + self.handshake_timeout)
        peek.proxied = proxied
        self._peeking.add(peek)
        peek.timer = loop.call_at(peek.deadline, self._drop, peek, "timeout")
        self._peek(peek)  # the ClientHello is often there already
        if peek in self._peeking:
            loop.add_reader(peek.fd, self._peek, peek)
            peek.reading = True

    def _peek(self, peek: _Peek) -> None:
        try:
            n = peek.sock.recv_into(_PEEK_BUF, sni.MAX_HELLO, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(peek, "closed")
            return
        if n <= peek.seen:  # readable with nothing new: closed before the hello was whole
            self._drop(peek, "closed")
            return
        peek.seen = n
        result = sni.parse(_PEEK_VIEW[:n])
        if type(result) is int and result > 0:
            try:  # do not wake up until the rest of the record is here
                peek.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, result)
                peek.lowat = True
            except OSError:
                pass
            return
        self._end_peek(peek)
        name = self.sni_table.lookup(result) if type(result) is str else None
        state = self.services.get(name) if name is not None else None
        if state is not None:
            self._count("passthrough")
            self.accepted += 1
            self._relay().adopt(peek.sock, peek.ip, state, peek.proxied)
            return
        self._count("terminated")
        timeout = max(0.1, peek.deadline - self.loop.time())
        task = self.loop.create_task(self._terminate(peek.sock, timeout, peek.proxied))
        self._handshakes.add(task)
        task.add_done_callback(self._handshake_done)

    def _handshake_done(self, task: asyncio.Task[Any]) -> None:
        self._handshakes.discard(task)
        self.connection_gone()

    async def _terminate(self, sock: socket.socket, timeout: float,
                         proxied: tuple[str, int] | None = None) -> None:
        def factory() -> ClientProtocol:
            return ClientProtocol(self, proxied)

        try:
            await self.loop.connect_accepted_socket(
                factory, sock, ssl=self.ssl, ssl_handshake_timeout=timeout)
        except Exception as e:  # refused, timed out, reset: the client's problem
            log.debug("entrypoint %s: TLS handshake failed: %r", self.name, e)

    def _end_peek(self, peek: _Peek) -> bool:
        """Stop peeking (False if already stopped); the socket is left as it was accepted."""
        if peek not in self._peeking:
            return False
        self._peeking.discard(peek)
        self.connection_gone()
        if peek.reading:
            self.loop.remove_reader(peek.fd)
        if peek.timer is not None:
            peek.timer.cancel()
        if peek.lowat:
            try:
                peek.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass
        n = self.per_client.get(peek.ipb, 1) - 1
        if n > 0:
            self.per_client[peek.ipb] = n
        else:
            self.per_client.pop(peek.ipb, None)
        return True

    def _drop(self, peek: _Peek, outcome: str) -> None:
        if self._end_peek(peek):
            self._count(outcome)
            peek.sock.close()

    def _count(self, outcome: str) -> None:
        self.sni_outcomes[outcome] = self.sni_outcomes.get(outcome, 0) + 1

    def _relay(self) -> Any:
        relay = self.relay
        if relay is None:
            relay = self.relay = self.make_relay(self)
        return relay


def _no_relay(listener: HttpListener) -> Any:
    raise RuntimeError(f"entrypoint {listener.name} has no relay for passed-through connections")


class _Peek:
    """A connection of a TLS entrypoint whose ClientHello is being waited for."""

    __slots__ = ("deadline", "fd", "ip", "ipb", "lowat", "proxied", "reading", "seen", "sock",
                 "timer")

    def __init__(self, sock: socket.socket, ip: str, ipb: bytes, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ip = ip
        self.ipb = ipb
        self.deadline = deadline
        self.seen = 0  # bytes peeked last time
        self.lowat = False  # SO_RCVLOWAT was raised
        self.reading = False  # registered with the loop
        self.timer: asyncio.TimerHandle | None = None
        self.proxied: tuple[str, int] | None = None  # the client a PROXY header named


class _PendingSocket:
    """An accepted socket of a TLS listener whose PROXY header is awaited."""

    __slots__ = ("reader", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader: Any = None

    def abort(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        self.sock.close()


class _HeaderProtocol(asyncio.Protocol):
    """The first protocol of a connection to a plain listener with accept_proxy_protocol: reads
    the PROXY header (or, from an untrusted peer, makes sure the first bytes are not one), then
    hands the transport to a ClientProtocol with the rest of the bytes. Used once per
    connection, only while the option is on; the request path is ClientProtocol's alone."""

    __slots__ = ("buf", "ip", "listener", "policy", "required", "timer", "transport")

    def __init__(self, listener: HttpListener, policy: Any) -> None:
        self.listener = listener
        self.policy = policy
        self.buf = b""
        self.ip = ""
        self.required = True
        self.timer: asyncio.TimerHandle | None = None
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        listener = self.listener
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else ""
        if listener.connections >= listener.limits.connections:
            listener.refused["connections"] = listener.refused.get("connections", 0) + 1
            transport.abort()
            return
        self.required = self.policy.required(self.ip)
        listener.proxy_pending.add(self)
        self.timer = listener.loop.call_later(listener.header_timeout(), self._refuse, "timeout")

    def data_received(self, data: bytes) -> None:
        buf = self.buf = self.buf + data
        if self.required:
            result = proxy_protocol.parse(buf)
            if result is None:
                return
            if isinstance(result, str):
                self._refuse(result)
                return
            self._hand_off(result.peer, buf[result.length:])
            return
        found = proxy_protocol.screen(buf)
        if found is None:
            return
        if found:
            self._refuse("a header from an untrusted peer")
        else:
            self._hand_off(None, buf)

    def eof_received(self) -> bool:
        self._refuse("closed before the header")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def abort(self) -> None:
        self._end()
        self.transport.abort()

    def _end(self) -> bool:
        timer, self.timer = self.timer, None
        if timer is None:
            return False
        timer.cancel()
        self.listener.proxy_pending.discard(self)
        return True

    def _refuse(self, why: str) -> None:
        if self._end():
            self.listener.refuse_proxy(self.ip, why)
            self.transport.abort()

    def _hand_off(self, peer: tuple | None, rest: bytes) -> None:
        self._end()
        client = ClientProtocol(self.listener)
        transport = self.transport
        transport.set_protocol(client)
        client.connection_made(transport, peer)
        if rest and not client.closed:
            client.data_received(rest)
