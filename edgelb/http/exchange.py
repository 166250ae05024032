"""One request and its response as it crosses the proxy, and the states it goes through.

An exchange moves forward only:

    RECEIVING_HEAD -> WAITING_TURN -> ROUTED -> [WAITING_AUTH] -> [QUEUED] -> CONNECTING | SENT
        -> (a retry: CONNECTING | SENT again) -> DONE, or TUNNEL after a 101

- RECEIVING_HEAD: the parser is still delivering its head (client.parsing is it).
- WAITING_TURN: its head is whole; an earlier request on the connection is still answered.
- ROUTED: `service` is set; the gates (sources, redirect, max_body, auth) are being checked.
- WAITING_AUTH: its credentials are being verified off the loop (auth_verdict goes on).
- QUEUED: every usable backend was at its cap: it waits in the pool's queue (`wait_until`).
- CONNECTING: `backend` is set (a slot taken), a new connection to it is being opened.
- SENT: `upstream` carries it; `response_started` tells whether the client has seen bytes of
  the answer (a fact about the client, not a stage: a failed exchange may be DONE without it).
- TUNNEL: a 101 switched protocols; the connection is a byte tunnel, the exchange is over.
- DONE: answered (or abandoned); nothing more happens to it.

A local answer (404, 503, a gate's refusal) goes from any stage before SENT straight to DONE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgelb.http.client import ClientProtocol
    from edgelb.http.upstream import UpstreamProtocol
    from edgelb.pool import BackendState, ServiceState

RECEIVING_HEAD = 0
WAITING_TURN = 1
ROUTED = 2
WAITING_AUTH = 3
QUEUED = 4
CONNECTING = 5
SENT = 6
TUNNEL = 7
DONE = 8


class Exchange:
    """One request and its response as it crosses the proxy."""

    __slots__ = (
        "backend",
        "bad",
        "body_buffer",
        "body_n",  # body bytes so far, counted only under limits.min_body_rate
        "body_sent",
        "body_t0",  # when the body began (0: not yet), the same
        "buffered",
        "chunked",
        "client",
        "client_chunked",
        "client_limit",  # a route's ClientLimiter holding a slot of this request, or None
        "conn_tokens",
        "fwd",
        "fwd_extra",  # header lines added to the forwarded head (request ID, traceparent)
        "has_host",
        "head",
        "host",
        "keep_alive",
        "lines",
        "logged",  # accounting.finish has seen it (once per request)
        "method",
        "mirror",  # copies of the request gathering its body (edgelb.http.mirror), or None
        "queued",
        "received",  # request body bytes so far
        "req_trailers",
        "request_complete",
        "request_id",  # the client's X-Request-Id, then the one forwarded (telemetry on)
        "resp_body",  # response body bytes sent to the client
        "resp_edits",  # a route's response header edits (edgelb.http.router.Edits), or None
        "resp_extra",  # header lines added to the response head (X-Request-Id)
        "response_started",
        "retries",
        "sent_head",  # bytes of the response head sent to the client
        "service",
        "set_cookie",
        "start",
        "state",
        "status",
        "tail",  # chunked body: bytes read since the last body bytes (framing, trailers)
        "te_trailers",
        "timeout",  # a route's response timeout (0: the service's)
        "trace",  # the trace context (edgelb.telemetry.hub.Trace) while tracing is on
        "traceparent",  # the client's traceparent header
        "trailers",
        "until_close",
        "upgrade",
        "upgrade_value",
        "upstream",
        "upstream_time",  # seconds the backend took (to the end of the response, or the 101)
        "url",
        "version",
        "via",
        "wait_until",
        "xff",
    )

    def __init__(self, client: ClientProtocol) -> None:
        self.client = client
        self.state = RECEIVING_HEAD
        self.url = b""
        self.lines: list[bytes] = []
        self.host = b""
        self.has_host = False
        self.conn_tokens: list[bytes] | None = None
        self.chunked = False
        self.te_trailers = False
        self.upgrade = False
        self.upgrade_value = b""
        self.xff = b""
        self.fwd = b""
        self.via = b""
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.body_buffer: list[bytes] | None = None
        self.buffered = 0
        self.body_sent = False
        self.request_complete = False
        self.req_trailers: list[bytes] | None = None
        self.head = b""
        self.service: ServiceState | None = None  # set from ROUTED on
        self.backend: BackendState | None = None  # set from CONNECTING on
        self.upstream: UpstreamProtocol | None = None  # set while SENT
        self.retries = 0
        self.start = 0.0
        self.status = 0
        self.response_started = False
        self.client_chunked = False
        self.until_close = False
        self.trailers: list[bytes] | None = None
        self.set_cookie = b""  # a sticky backend id to hand the client with the response
        self.wait_until = 0.0  # while QUEUED: when it gives up (Pool.enqueue sets it)
        self.bad: tuple[int, str] | None = None  # refused: (status, why), answered in turn
        self.body_t0 = 0.0
        self.body_n = 0
        self.received = 0
        self.queued = 0.0  # seconds it waited for a slot (not the backend's latency)
        self.tail = 0
        self.resp_body = 0
        self.logged = False
        self.sent_head = 0
        self.upstream_time = -1.0  # -1: no backend answered
        self.request_id = b""
        self.traceparent = b""
        self.trace: Any = None
        self.fwd_extra = b""
        self.resp_extra = b""
        self.resp_edits: Any = None
        self.timeout = 0.0
        self.client_limit: Any = None
        self.mirror: Any = None

    # A queued exchange is a waiter of its pool (edgelb.pool.Pool.enqueue).
    def resume(self) -> bool:
        """A slot may be free: go on if a backend takes it (False: keep waiting)."""
        client = self.client
        if self.state == DONE or client.closed:
            return True  # gone meanwhile: leaves the queue
        return client.dispatch_waiting(self)

    def shed(self, reason: str) -> None:
        client = self.client
        if self.state != DONE and not client.closed:
            client.shed(self, reason)

    def auth_verdict(self, verdict: int) -> None:
        """The verdict of a password hash computed off the loop (Credentials.admit)."""
        client = self.client
        if self.state != DONE and not client.closed:
            client.auth_verdict(self, verdict)
