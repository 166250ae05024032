"""The OTLP/HTTP protobuf body of a batch of spans: the subset of ExportTraceServiceRequest
edgelb sends, encoded by hand (a few dozen lines instead of protobuf and opentelemetry-proto
as run-time dependencies; the tests decode it with opentelemetry-proto).

    ExportTraceServiceRequest { repeated ResourceSpans resource_spans = 1 }
    ResourceSpans { Resource resource = 1; repeated ScopeSpans scope_spans = 2 }
    Resource { repeated KeyValue attributes = 1 }
    ScopeSpans { InstrumentationScope scope = 1; repeated Span spans = 2 }
    InstrumentationScope { string name = 1; string version = 2 }
    Span { bytes trace_id = 1; bytes span_id = 2; string trace_state = 3;
           bytes parent_span_id = 4; string name = 5; SpanKind kind = 6;
           fixed64 start_time_unix_nano = 7; fixed64 end_time_unix_nano = 8;
           repeated KeyValue attributes = 9; Status status = 15; fixed32 flags = 16 }
    KeyValue { string key = 1; AnyValue value = 2 }
    AnyValue { string string_value = 1; bool bool_value = 2; int64 int_value = 3;
               double double_value = 4 }
    Status { string message = 2; StatusCode code = 3 }   (code 2: error)
"""

from __future__ import annotations

import struct
from typing import NamedTuple

SPAN_KIND_SERVER = 2
STATUS_ERROR = 2
_FLAGS_SAMPLED = 0x101  # W3C sampled flag, and "the parent's remoteness is known" (0x100)
_FLAGS_REMOTE = 0x200  # the parent came from another process

Value = str | int | float | bool


class Span(NamedTuple):
    trace_id: bytes  # 16 bytes
    span_id: bytes  # 8 bytes
    parent_id: bytes  # 8 bytes, or b"" for a root span
    trace_state: str
    name: str
    start_ns: int
    end_ns: int
    attributes: tuple[tuple[str, Value], ...]
    error: bool


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 as protobuf writes it: ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _len(field: int, payload: bytes) -> bytes:
    return _tag(field, 2) + _varint(len(payload)) + payload


def _str(field: int, text: str) -> bytes:
    return _len(field, text.encode("utf-8", "replace"))


def _any(value: Value) -> bytes:
    if isinstance(value, bool):
        return _tag(2, 0) + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return _tag(3, 0) + _varint(value)
    if isinstance(value, float):
        return _tag(4, 1) + struct.pack("<d", value)
    return _str(1, value)


def _key_value(key: str, value: Value) -> bytes:
    return _str(1, key) + _len(2, _any(value))


def encode_span(span: Span) -> bytes:
    out = [_len(1, span.trace_id), _len(2, span.span_id)]
    if span.trace_state:
        out.append(_str(3, span.trace_state))
    if span.parent_id:
        out.append(_len(4, span.parent_id))
    out.append(_str(5, span.name))
    out.append(_tag(6, 0) + _varint(SPAN_KIND_SERVER))
    out.append(_tag(7, 1) + struct.pack("<Q", span.start_ns))
    out.append(_tag(8, 1) + struct.pack("<Q", span.end_ns))
    out.extend(_len(9, _key_value(k, v)) for k, v in span.attributes)
    if span.error:
        out.append(_len(15, _tag(3, 0) + _varint(STATUS_ERROR)))
    flags = _FLAGS_SAMPLED | (_FLAGS_REMOTE if span.parent_id else 0)
    out.append(_tag(16, 5) + struct.pack("<I", flags))
    return b"".join(out)


def encode_request(spans: list[Span], service_name: str, version: str) -> bytes:
    """An ExportTraceServiceRequest holding `spans`, from one resource and one scope."""
    resource = _len(1, _key_value("service.name", service_name))
    scope = _str(1, "edgelb") + _str(2, version)
    scope_spans = _len(1, scope) + b"".join(_len(2, encode_span(s)) for s in spans)
    resource_spans = _len(1, resource) + _len(2, scope_spans)
    return _len(1, resource_spans)
