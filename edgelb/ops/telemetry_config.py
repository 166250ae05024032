"""The `access_log:`, `request_id:` and `tracing:` sections of the config file, read into
edgelb.telemetry.settings (edgelb/ops/config.py calls `parse_telemetry`), and their JSON Schema."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from edgelb.telemetry.settings import (
    ACCESS_FORMATS,
    AccessLogSettings,
    RequestIdSettings,
    TelemetrySettings,
    TracingSettings,
)

ACCESS_KEYS = ("enabled", "format", "path", "sample", "buffer")
REQUEST_ID_KEYS = ("enabled", "trusted")
TRACING_KEYS = ("otlp_endpoint", "sample_ratio", "service_name", "headers", "buffer")
TOP_KEYS = ("access_log", "request_id", "tracing")


def _ratio(c: Any, value: Any, path: str) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        c.error(path, f"expected a number from 0 to 1 (the share kept), got {value!r}")
        return None
    return float(value)


def _access_log(c: Any, value: Any) -> AccessLogSettings:
    m = c.section(value, "access_log", "a mapping like {enabled: true, format: json, "
                  "path: stdout}", ACCESS_KEYS)
    if m is None:
        return AccessLogSettings()
    fields: dict[str, Any] = {"enabled": True}  # a section written out means on
    if "enabled" in m:
        on = c.boolean(m["enabled"], "access_log.enabled")
        if on is not None:
            fields["enabled"] = on
    if "format" in m:
        if m["format"] not in ACCESS_FORMATS:
            c.error("access_log.format", f"expected json or combined, got {m['format']!r}")
        else:
            fields["format"] = m["format"]
    if "path" in m:
        if not isinstance(m["path"], str) or not m["path"]:
            c.error("access_log.path", f"expected stdout or a file path, got {m['path']!r}")
        else:
            fields["path"] = m["path"]
    if "sample" in m:
        share = _ratio(c, m["sample"], "access_log.sample")
        if share is not None:
            fields["sample"] = share
    if "buffer" in m:
        n = c.integer(m["buffer"], "access_log.buffer", 1)
        if isinstance(n, int):
            fields["buffer"] = n
    return AccessLogSettings(**fields)


def _request_id(c: Any, value: Any) -> RequestIdSettings:
    m = c.section(value, "request_id", "a mapping like {enabled: true, trusted: [10.0.0.0/8]}",
                  REQUEST_ID_KEYS)
    if m is None:
        return RequestIdSettings()
    fields: dict[str, Any] = {}
    if "enabled" in m:
        on = c.boolean(m["enabled"], "request_id.enabled")
        if on is not None:
            fields["enabled"] = on
    trusted = m.get("trusted")
    if trusted is True:
        from edgelb.net.acl import SourceFilter

        fields["trusted"] = SourceFilter()  # permits every address
        fields["cidrs"] = ("*",)
    elif isinstance(trusted, list) and trusted:
        from edgelb.net.acl import SourceFilter, parse_cidrs

        nets, errors = parse_cidrs(trusted, "request_id.trusted")
        c.errors.extend(errors)
        if not errors:
            fields["trusted"] = SourceFilter(nets)
            fields["cidrs"] = tuple(str(n) for n in nets)
    elif trusted not in (None, False):
        c.error("request_id.trusted", "expected true (every client), false, or a list of "
                f"CIDRs like [10.0.0.0/8] whose X-Request-Id is kept, got {trusted!r}")
    return RequestIdSettings(**fields)


def _tracing(c: Any, value: Any) -> TracingSettings:
    m = c.section(value, "tracing", "a mapping like {otlp_endpoint: http://collector:4318, "
                  "sample_ratio: 0.01}", TRACING_KEYS)
    if m is None:
        return TracingSettings()
    fields: dict[str, Any] = {}
    url = m.get("otlp_endpoint")
    if url is not None:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            c.error("tracing.otlp_endpoint", "expected an http(s) URL of an OTLP/HTTP "
                    f"collector like http://otel-collector:4318, got {url!r}")
        else:
            fields["otlp_endpoint"] = url
    if "sample_ratio" in m:
        ratio = _ratio(c, m["sample_ratio"], "tracing.sample_ratio")
        if ratio is not None:
            fields["sample_ratio"] = ratio
    if "service_name" in m:
        name = m["service_name"]
        if not isinstance(name, str) or not name:
            c.error("tracing.service_name", f"expected a name, got {name!r}")
        else:
            fields["service_name"] = name
    if "headers" in m:
        headers = m["headers"]
        if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            c.error("tracing.headers", "expected a mapping of header names to strings, like "
                    "{Authorization: Bearer xyz}")
        else:
            fields["headers"] = tuple(sorted(headers.items()))
    if "buffer" in m:
        n = c.integer(m["buffer"], "tracing.buffer", 1)
        if isinstance(n, int):
            fields["buffer"] = n
    return TracingSettings(**fields)


def parse_telemetry(c: Any, top: dict) -> TelemetrySettings:
    """The three sections from the top-level mapping, problems reported on `c`."""
    return TelemetrySettings(access_log=_access_log(c, top.get("access_log")),
                             request_id=_request_id(c, top.get("request_id")),
                             tracing=_tracing(c, top.get("tracing")))


def json_schemas(strict_object: Any) -> dict[str, Any]:
    ratio = {"type": "number", "minimum": 0, "maximum": 1}
    return {
        "access_log": strict_object({
            "enabled": {"type": "boolean"}, "format": {"enum": list(ACCESS_FORMATS)},
            "path": {"type": "string", "minLength": 1}, "sample": ratio,
            "buffer": {"type": "integer", "minimum": 1}}),
        "request_id": strict_object({
            "enabled": {"type": "boolean"},
            "trusted": {"anyOf": [{"type": ["boolean", "null"]},
                                  {"type": "array", "items": {"type": "string"},
                                   "minItems": 1}]}}),
        "tracing": strict_object({
            "otlp_endpoint": {"type": "string", "pattern": "^https?://"},
            "sample_ratio": ratio, "service_name": {"type": "string", "minLength": 1},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "buffer": {"type": "integer", "minimum": 1}}),
    }


def summary(settings: TelemetrySettings) -> list[str]:
    """Lines for `edgelb check`."""
    out = []
    log = settings.access_log
    if log.enabled:
        sample = f", sample {log.sample:g}" if log.sample < 1 else ""
        out.append(f"access log: {log.format} to {log.path}{sample}")
    if settings.request_ids:
        rid = settings.request_id
        kept = f", kept from {', '.join(rid.cidrs)}" if rid.cidrs else ""
        out.append(f"request IDs: X-Request-Id{kept}")
    tracing = settings.tracing
    if tracing.otlp_endpoint:
        out.append(f"tracing: OTLP to {tracing.otlp_endpoint}, sample ratio "
                   f"{tracing.sample_ratio:g}")
    return out
