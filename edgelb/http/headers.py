"""Header handling shared by the request and response sides.

Hop-by-hop fields (RFC 9110 section 7.6.1) are dropped when a message crosses the proxy, and
so is every field named in `Connection`. Framing (Content-Length, Transfer-Encoding) is
re-decided by the proxy for each hop.
"""

from __future__ import annotations

# Connection tokens that are about the connection itself, not names of other fields.
CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})


def connection_tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def drop_named(lines: list[bytes], names: set[bytes]) -> list[bytes]:
    """Remove header lines (b"Name: value\\r\\n") whose field name is in `names` (lowercase)."""
    kept = []
    for line in lines:
        colon = line.find(b":")
        if line[:colon].strip().lower() not in names:
            kept.append(line)
    return kept


def forwarded_for(peer: tuple | None) -> tuple[bytes, bytes]:
    """(X-Forwarded-For element, Forwarded `for=` element) for a client's peer address."""
    if not peer:
        return b"unknown", b"for=unknown"
    ip = str(peer[0]).encode()
    if b":" in ip:
        return ip, b'for="[%s]"' % ip
    return ip, b"for=%s" % ip
