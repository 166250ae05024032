"""What gRPC adds to HTTP/2 at the proxy: the grpc-timeout deadline and the status a call gets
when edgelb answers it itself (a trailers-only response, never an HTTP error page)."""

from __future__ import annotations

from urllib.parse import quote

# grpc-status codes (grpc/doc/statuscodes.md)
OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

_UNITS = {0x48: 3600.0, 0x4D: 60.0, 0x53: 1.0, 0x6D: 1e-3, 0x75: 1e-6, 0x6E: 1e-9}  # HMSmun


def parse_timeout(value: bytes) -> float | None:
    """`grpc-timeout` (1 to 8 digits and a unit: H M S m u n) in seconds, or None."""
    value = value.strip()
    digits = value[:-1]
    unit = _UNITS.get(value[-1]) if value else None
    if unit is None or not 1 <= len(digits) <= 8 or not digits.isdigit():
        return None
    return int(digits) * unit


def local_status(status: int, text: str) -> int:
    """The grpc-status of an answer edgelb gave a gRPC call itself (HTTP `status`, its text):
    the gRPC HTTP-to-status mapping, refined where edgelb knows why."""
    if status == 503:
        if "no backend" in text:
            return UNAVAILABLE
        return RESOURCE_EXHAUSTED  # shed: every backend at its cap (queue full or timed out)
    if status == 504 or status == 408:
        return DEADLINE_EXCEEDED
    if status == 429 or status == 413 or status == 431:
        return RESOURCE_EXHAUSTED
    if status == 404:
        return UNIMPLEMENTED
    if status == 403:
        return PERMISSION_DENIED
    if status == 401:
        return UNAUTHENTICATED
    if status == 502:
        return UNAVAILABLE
    if status < 400:
        return UNKNOWN
    return INTERNAL


def message(text: str) -> bytes:
    """A grpc-message value: percent-encoded UTF-8 (the gRPC spec's encoding)."""
    return quote(text.strip(), safe=" !#$&'()*+,/:;=?@[]~").encode("ascii")


def trailers_only(code: int, text: str) -> list[tuple[bytes, bytes]]:
    """A trailers-only response: one HEADERS frame that ends the stream."""
    return [(b":status", b"200"), (b"content-type", b"application/grpc"),
            (b"grpc-status", b"%d" % code), (b"grpc-message", message(text))]
