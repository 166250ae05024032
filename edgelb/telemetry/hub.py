"""`Telemetry`: the one object the data path holds for access logs, request IDs and tracing
(a listener's `telemetry`, None when all three are off).

The HTTP data path calls `begin` when a request's turn comes (request ID and trace context
decided, the header lines to add set on the exchange) and `http_done` when it ends (the access
log record, the span); tcp relays call `tcp_done` when a connection closes. Exchanges and
clients are read by attribute (edgelb.http.exchange.Exchange, edgelb.http.client.ClientProtocol):
this package imports nothing of the data path.
"""

from __future__ import annotations

import time
from random import getrandbits, random
from typing import Any

from edgelb.telemetry import traceparent
from edgelb.telemetry.access import AccessLog
from edgelb.telemetry.exporter import SpanExporter
from edgelb.telemetry.otlp import Span
from edgelb.telemetry.request_id import RequestIds, acceptable
from edgelb.telemetry.settings import TelemetrySettings

_RID = b"x-request-id:"
_TP = b"traceparent:"


class Trace:
    """The trace context of one request: this proxy's span in it."""

    __slots__ = ("parent", "sampled", "span", "trace")

    def __init__(self, trace: bytes, parent: bytes, span: bytes, sampled: bool) -> None:
        self.trace = trace  # hex
        self.parent = parent  # hex, b"" when the trace started here
        self.span = span  # hex
        self.sampled = sampled


def _without(lines: list[bytes], prefix: bytes) -> list[bytes]:
    n = len(prefix)
    return [line for line in lines if line[:n].lower() != prefix]


class Telemetry:
    def __init__(self, settings: TelemetrySettings, version: str = "") -> None:
        self.settings = settings
        log = settings.access_log
        self.access: AccessLog | None = AccessLog(log) if log.enabled else None
        self.ids: RequestIds | None = RequestIds() if settings.request_ids else None
        self.trusted: Any = settings.request_id.trusted
        tracing = settings.tracing
        self.exporter: SpanExporter | None = None
        if tracing.otlp_endpoint:
            self.exporter = SpanExporter(tracing.otlp_endpoint, tracing.service_name, version,
                                         headers=tracing.headers, capacity=tracing.buffer)
        self.ratio = tracing.sample_ratio

    def start(self) -> None:
        if self.access is not None:
            self.access.start()
        if self.exporter is not None:
            self.exporter.start()

    def stop(self) -> None:
        if self.access is not None:
            self.access.stop()
        if self.exporter is not None:
            self.exporter.stop()

    def reopen(self) -> None:
        if self.access is not None:
            self.access.reopen()

    # -- HTTP --------------------------------------------------------------------------

    def begin(self, ex: Any, client: Any) -> None:
        """A request's turn: its ID and trace context, and the lines that carry them on
        (`fwd_extra` to the backend, `resp_extra` to the client)."""
        extra = b""
        ids = self.ids
        if ids is not None:
            rid = ex.request_id
            if rid:
                trusted = self.trusted
                if trusted is None or not acceptable(rid) or not trusted.permits(client.xff_ip):
                    ex.lines = _without(ex.lines, _RID)
                    rid = b""
            if not rid:
                rid = ex.request_id = ids.new()
                extra = b"x-request-id: %s\r\n" % rid
            ex.resp_extra = b"x-request-id: %s\r\n" % rid
        if self.exporter is not None:
            parsed = traceparent.parse(ex.traceparent) if ex.traceparent else None
            if parsed is not None:
                trace_id, parent, flags = parsed
                sampled = bool(flags & traceparent.SAMPLED)
                ex.lines = _without(ex.lines, _TP)
            else:
                if ex.traceparent:
                    ex.lines = _without(ex.lines, _TP)  # malformed: a new trace replaces it
                trace_id = b"%032x" % getrandbits(128)
                parent = b""
                sampled = random() < self.ratio
            span = b"%016x" % getrandbits(64)
            ex.trace = Trace(trace_id, parent, span, sampled)
            extra += b"traceparent: %s\r\n" % traceparent.format_header(trace_id, span, sampled)
        ex.fwd_extra = extra

    def http_done(self, ex: Any, client: Any, reason: str, now: float,
                  tunnel_bytes: int = 0) -> None:
        """`ex` ended (answered, failed, abandoned, or its tunnel closed) at `now` (the
        loop's clock): its access-log record and its span."""
        access = self.access
        trace = ex.trace
        sampled = trace is not None and trace.sampled and self.exporter is not None
        if access is None and not sampled:
            return
        status = ex.status
        if reason == "client_closed" and not ex.response_started:
            status = 0
        duration = now - ex.start
        end = time.time()
        start = end - duration
        backend = ex.backend
        upstream = ex.upstream_time
        if sampled:
            self._span(ex, client, trace, reason, status, start, end, upstream)
        if access is None or not access.keep(status):
            return
        trace_id = trace.trace if trace is not None else _trace_of(ex.traceparent)
        service = ex.service
        access.put((
            start, client.xff_ip, client.peer_port, ex.method, ex.host, ex.url,
            "2.0" if client.h2 else ex.version,
            status, ex.received + tunnel_bytes, ex.sent_head + ex.resp_body, ex.resp_body,
            duration, upstream, service.name if service is not None else "",
            backend.key if backend is not None else "", ex.retries, ex.request_id, trace_id,
            reason, ex.lines if access.combined else None,
        ))

    def _span(self, ex: Any, client: Any, trace: Trace, reason: str, status: int,
              start: float, end: float, upstream: float) -> None:
        assert self.exporter is not None
        service = ex.service
        backend = ex.backend
        method = ex.method.decode("latin-1")
        attributes: list[tuple[str, Any]] = [
            ("http.request.method", method),
            ("http.response.status_code", status),
            ("url.path", ex.url.partition(b"?")[0][:2048].decode("utf-8", "replace")),
            ("server.address", ex.host.decode("latin-1")),
            ("client.address", client.xff_ip.decode("latin-1")),
            ("network.protocol.version", "2" if client.h2 else ex.version),
            ("edgelb.service", service.name if service is not None else ""),
            ("edgelb.backend", backend.key if backend is not None else ""),
            ("http.request.resend_count", ex.retries),
        ]
        if upstream >= 0:
            attributes.append(("edgelb.upstream_duration_s", upstream))
        if reason:
            attributes.append(("edgelb.reason", reason))
        if ex.request_id:
            attributes.append(("edgelb.request_id", ex.request_id.decode("latin-1")))
        self.exporter.put(Span(
            bytes.fromhex(trace.trace.decode()), bytes.fromhex(trace.span.decode()),
            bytes.fromhex(trace.parent.decode()) if trace.parent else b"", "",
            method if service is None else f"{method} {service.name}",
            int(start * 1e9), int(end * 1e9), tuple(attributes),
            status >= 500 or status == 0,
        ))

    # -- tcp ---------------------------------------------------------------------------

    def tcp_done(self, conn: Any, now: float) -> None:
        """A tcp connection closed (edgelb.tcp.relay.Relay): its access-log record."""
        access = self.access
        if access is None:
            return
        duration = now - conn.started
        backend = conn.backend_key
        client = conn.proxied
        ip, port = (client[0], client[1]) if client else (conn.peer_ip, conn.peer_port)
        access.put((time.time() - duration, ip, port, "tcp", conn.service.name, backend,
                    conn.bytes_up, conn.bytes_down, duration, conn.end_reason or "closed"))

    @property
    def log_dropped(self) -> int:
        return self.access.dropped if self.access is not None else 0

    @property
    def spans_dropped(self) -> int:
        return self.exporter.lost if self.exporter is not None else 0


def _trace_of(value: bytes) -> bytes:
    """The trace ID of a client's traceparent, for the log when tracing is off."""
    if not value:
        return b""
    parsed = traceparent.parse(value)
    return parsed[0] if parsed is not None else b""
