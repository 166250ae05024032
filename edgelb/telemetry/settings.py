"""The settings of access logs, request IDs and tracing, as the config file gives them
(edgelb/ops/config.py parses them; this package reads them and imports nothing of edgelb.ops)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ACCESS_FORMATS = ("json", "combined")
STDOUT = "stdout"


@dataclass(frozen=True, slots=True)
class AccessLogSettings:
    enabled: bool = False
    format: str = "json"  # json | combined
    path: str = STDOUT  # "stdout" or a file (appended to; reopened on SIGUSR1 or when moved)
    sample: float = 1.0  # the share of requests logged; status >= 500 always is
    buffer: int = 16384  # records held for the writer at most; beyond, dropped and counted


@dataclass(frozen=True, slots=True)
class RequestIdSettings:
    # None: on when the access log or tracing is (the log's request_id field wants one)
    enabled: bool | None = None
    # who may send its own X-Request-Id (kept): None nobody, else an edgelb.net.acl.SourceFilter
    # (`true` in the config: a filter that permits every address)
    trusted: Any = None
    cidrs: tuple[str, ...] = ()  # as written, for comparison and `edgelb check`


@dataclass(frozen=True, slots=True)
class TracingSettings:
    otlp_endpoint: str = ""  # "" = tracing off
    sample_ratio: float = 0.01  # traces started here (no traceparent) that are sampled
    service_name: str = "edgelb"  # the spans' resource service.name
    headers: tuple[tuple[str, str], ...] = ()  # sent with each export (e.g. an API key)
    buffer: int = 4096  # spans held for the exporter at most; beyond, dropped and counted


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    access_log: AccessLogSettings = field(default_factory=AccessLogSettings)
    request_id: RequestIdSettings = field(default_factory=RequestIdSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)

    @property
    def active(self) -> bool:
        return (self.access_log.enabled or bool(self.tracing.otlp_endpoint)
                or bool(self.request_id.enabled))

    @property
    def request_ids(self) -> bool:
        rid = self.request_id.enabled
        if rid is None:
            return self.access_log.enabled or bool(self.tracing.otlp_endpoint)
        return rid
