"""An HTTP listener: a static port of one service, or a shared entrypoint routing by host/path."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl as ssl_module
from typing import TYPE_CHECKING

from edgelb.config import LimitsConfig
from edgelb.http.proxy import ClientProtocol, UpstreamProtocol
from edgelb.http.router import Router
from watchers.model import Address, Policy

if TYPE_CHECKING:
    from edgelb.pool import ServiceState

log = logging.getLogger("edgelb.http")

HANDSHAKE_TIMEOUT = 10.0  # seconds a client may take to finish its TLS handshake


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
        self.accepted = 0
        self.limits = LimitsConfig()  # set by the runtime
        self.max_headers = self.limits.headers
        self.min_body_rate = 0
        self.per_client: dict[bytes, int] = {}  # open connections per client address
        self.refused: dict[str, int] = {}  # connections or requests refused by a limit
        self.scheme = b"https" if ssl is not None else b"http"
        self.closing = False
        self.soft_closing = False  # see soft_drain
        self._server: asyncio.AbstractServer | None = None
        self._host_header = str(address).encode()
        self.header_timeout_s = self.idle_timeout_s = 0.0
        self.refresh()

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
        return len(self.clients)

    def policy(self) -> Policy:
        service = self.service
        return service.policy if service is not None else self.defaults

    def default_host(self) -> bytes:
        return self._host_header

    def route(self, host: bytes, url: bytes) -> ServiceState | None:
        name = self.router.lookup(host.decode("latin-1"), url.decode("latin-1"))
        if name is None:
            return None
        return self.services.get(name)

    async def start(self) -> None:
        host = self.address.host
        try:
            self._server = await self.loop.create_server(
                lambda: ClientProtocol(self),
                host=None if host in ("", "*") else host,
                port=self.address.port,
                reuse_address=True,
                backlog=1024,
                ssl=self.ssl,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.ssl is not None else None,
            )
        except OSError as e:
            raise OSError(
                e.errno, f"cannot listen on {self.address} for {self.name}: {e.strerror}"
            ) from e
        for sock in self._server.sockets:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def soft_drain(self) -> None:
        """Shutting down soon: still accept, but end every connection after its current
        response (`Connection: close`), so clients move to another replica while the
        endpoint is being removed, instead of losing a request sent on an idle connection
        when the listener finally closes."""
        self.soft_closing = True
        for client in self.clients:
            client.closing = True

    def stop_accepting(self) -> None:
        """Stop accepting; idle keep-alive clients are closed, busy ones after their response."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for client in list(self.clients):
            client.drain()

    async def wait_closed(self, timeout: float) -> None:
        loop = self.loop
        deadline = loop.time() + timeout
        while self.clients and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.abort()

    def abort(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in list(self.clients):
            client.transport.abort()
