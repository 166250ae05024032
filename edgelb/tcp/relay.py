"""What every tcp-mode client connection does, whichever relay carries its bytes (splice in
`edgelb.tcp.listener`, asyncio transports for TLS in `edgelb.tcp.tls`): wait in the pool's queue
for a slot, go to a backend, retry one other backend after a failed connect, or be shed."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgelb.pool import BackendState, ServiceState
    from edgelb.tcp.listener import TcpListener


class Relay:
    """What the splice relay (`_Connection`) and the TLS relay (`edgelb.tcp.tls`) share: waiting
    in the pool's queue for a slot, and one retry elsewhere after a failed connect, and the
    state that goes with a client connection either way. Subclasses add `start(backend)`,
    `_drop_attempt()` and `close()`."""

    __slots__ = (
        "backend",
        "backend_key",
        "bytes_down",
        "bytes_up",
        "closed",
        "connected",
        "deadline",
        "end_reason",
        "listener",
        "loop",
        "peer_ip",
        "peer_port",
        "proxied",
        "retried",
        "service",
        "started",
        "wait_until",
    )

    def __init__(self, listener: TcpListener, service: ServiceState, peer_ip: str = "") -> None:
        self.listener = listener
        self.loop = listener.loop
        self.service = service
        self.peer_ip = peer_ip
        self.backend: BackendState | None = None
        self.retried = False
        self.connected = False
        self.closed = False  # closing or closed: nothing more is relayed
        self.deadline = 0.0  # idle_timeout after the last byte either way (runtime's sweeper)
        self.wait_until = 0.0  # while queued for a free backend slot (edgelb.pool.Pool)
        self.proxied: tuple[str, int] | None = None  # the client a PROXY header named
        # for the access log (edgelb.telemetry.hub.Telemetry.tcp_done)
        self.started = self.loop.time()
        self.bytes_up = 0  # from the client
        self.bytes_down = 0  # to the client
        self.backend_key = ""  # the last backend it went to
        self.end_reason = ""  # how it ended, when not by a close from either side
        self.peer_port = 0

    def start(self, backend: BackendState) -> None:
        raise NotImplementedError

    def close(self, reset: bool = False) -> None:
        raise NotImplementedError

    def _drop_attempt(self) -> None:
        raise NotImplementedError

    def dispatch(self, now: float) -> None:
        """To a backend now, else into the pool's queue (when every backend is at its cap),
        else shed."""
        pool = self.service.pool
        backend = pool.pick()
        if backend is not None:
            self.start(backend)
        elif not pool.at_capacity():
            self.shed("no_backend")
        elif not pool.enqueue(self, now):
            self.shed("queue_full")
        # else: it waits for a free slot, or is closed at queue_timeout

    # -- waiting for a slot (a waiter of edgelb.pool.Pool) ---------------------------------

    def resume(self) -> bool:
        if self.closed:
            return True
        backend = self.service.pool.pick()
        if backend is None:
            return False
        self.wait_until = 0.0
        self.start(backend)
        return True

    def shed(self, reason: str) -> None:
        if self.closed:
            return
        pool = self.service.pool
        backend = pool.pick_spare()  # in panic: an unhealthy backend rather than nothing
        if backend is not None:
            pool.panic_routed += 1
            self.wait_until = 0.0
            self.start(backend)
            return
        shed = self.service.shed
        shed[reason] = shed.get(reason, 0) + 1
        self.wait_until = 0.0
        self.end_reason = "shed"
        self.close()

    def _retry_elsewhere(self, backend: BackendState, now: float) -> None:
        """A connect to `backend` failed (refused, timed out, a failed TLS handshake): count
        it, then try one other backend, or give up."""
        backend.failures += 1
        self.service.pool.failure(backend, "connect", now)
        self._drop_attempt()
        if not self.retried:
            self.retried = True
            other = self.service.pool.pick_other(backend)
            if other is not None:
                self.start(other)
                return
        self.service.shed["connect_failed"] = self.service.shed.get("connect_failed", 0) + 1
        self.end_reason = "connect_failed"
        self.close()
