"""W3C Trace Context: the `traceparent` header read and written. A pure parser that never
raises: anything malformed is no traceparent (a new trace starts), as the spec asks.

    traceparent: 00-<trace-id: 32 hex>-<parent-id: 16 hex>-<flags: 2 hex>
"""

from __future__ import annotations

import re

SAMPLED = 1
_HEX = re.compile(rb"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16


def parse(value: bytes) -> tuple[bytes, bytes, int] | None:
    """(trace id, parent span id, flags), ids as lowercase hex, or None when `value` is not a
    valid traceparent. A version other than 00 is read as 00 when it starts the same way
    (the spec's forward compatibility); version ff is invalid."""
    value = value.strip()
    m = _HEX.match(value)
    if m is None or value[:2] == b"ff":
        return None
    if value[:2] == b"00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55:56] != b"-":
        return None
    trace, parent, flags = m.group(1), m.group(2), m.group(3)
    if trace == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace, parent, int(flags, 16)


def format_header(trace: bytes, span: bytes, sampled: bool) -> bytes:
    """The traceparent a request is forwarded with: this proxy's span as the parent."""
    return b"00-%s-%s-%s" % (trace, span, b"01" if sampled else b"00")
