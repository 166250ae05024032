"""Pure functions between HTTP/2 header lists and HTTP/1.1 heads, bounded, never raising.

An HTTP/2 request becomes the HTTP/1.1 head the existing data path parses (so the same checks,
normalisation and limits apply to it); an HTTP/1.1 response head becomes an HTTP/2 header
list. A field that could not be written as HTTP/1.1 without changing its meaning (CR, LF or
NUL in a value, a name that is not a lowercase token, a connection-specific field) refuses the
request: it would otherwise smuggle a second header or request into the HTTP/1.1 side.

WebSocket over HTTP/2 (RFC 8441): an extended CONNECT (`:protocol: websocket`) becomes the
HTTP/1.1 upgrade a WebSocket backend expects, with a Sec-WebSocket-Key made here; the
backend's 101 is checked against that key (`websocket_accept`) and answered as a 200.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from edgelb.h2 import grpc

_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\r\n\x00]")
# fields that belong to one HTTP/1.1 connection, never carried in HTTP/2 (RFC 9113 8.2.2)
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                        b"upgrade"})
PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
# what a client's extended CONNECT may not set: edgelb writes them for the HTTP/1.1 upgrade
WS_OWN = frozenset({b"sec-websocket-key", b"sec-websocket-version"})
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 4.2.2


@dataclass(slots=True)
class RequestHead:
    """An HTTP/2 request as the HTTP/1.1 data path reads it."""

    head: bytes  # request line and fields, ending with the blank line
    method: bytes
    chunked: bool  # a body of unknown length follows: framed as chunks on the HTTP/1.1 side
    grpc: bool  # content-type application/grpc*
    timeout: float  # grpc-timeout in seconds (0: none)
    ws_accept: bytes = b""  # WebSocket (extended CONNECT): the Sec-WebSocket-Accept due


@dataclass(slots=True)
class LocalAnswer:
    """A well-formed request edgelb answers itself, before the HTTP/1.1 side sees it."""

    status: int
    text: str


def websocket_key() -> bytes:
    """A fresh Sec-WebSocket-Key: 16 random bytes, base64 (RFC 6455 4.1)."""
    return base64.b64encode(os.urandom(16))


def websocket_accept(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept a backend must answer `key` with (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())


def request_head(fields: list[tuple[bytes, bytes]], end_stream: bool,
                 new_key: Callable[[], bytes] = websocket_key,
                 ) -> RequestHead | LocalAnswer | str:
    """The HTTP/1.1 head of an HTTP/2 request (`fields` as decoded, names lowercase), an
    answer edgelb gives itself, or why it is refused. `end_stream`: the HEADERS frame ended
    the stream (no body). `new_key`: makes the Sec-WebSocket-Key of an extended CONNECT."""
    method = path = authority = protocol = b""
    ws_version = b""
    lines: list[bytes] = []
    cookies: list[bytes] = []
    host = b""
    has_length = False
    is_grpc = False
    timeout = 0.0
    regular = False
    for name, value in fields:
        if _BAD_VALUE.search(value) is not None:
            return f"a forbidden character (CR, LF or NUL) in field {_show(name)}"
        if name[:1] == b":":
            if regular:
                return "a pseudo-header after a regular field"
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":protocol":
                protocol = value
            elif name != b":scheme":
                return f"unknown pseudo-header {_show(name)}"
            continue
        regular = True
        if _NAME.fullmatch(name) is None:
            return f"field name {_show(name)} is not a lowercase token"
        if name in HOP_BY_HOP:
            return f"connection-specific field {_show(name)} in HTTP/2"
        if name == b"cookie":
            cookies.append(value)
            continue
        if name in WS_OWN:
            if name == b"sec-websocket-version":
                ws_version = value
            if protocol:
                continue  # written below for the upgrade
        if name == b"host":
            if host:
                return "more than one host field"
            host = value
            continue
        if name == b"te":
            if value.strip().lower() != b"trailers":
                return "te other than trailers in HTTP/2"
        elif name == b"content-length":
            has_length = True
        elif name == b"content-type":
            is_grpc = value.startswith(b"application/grpc")
        elif name == b"grpc-timeout":
            parsed = grpc.parse_timeout(value)
            if parsed is None:
                return "grpc-timeout is not 1 to 8 digits and a unit (H, M, S, m, u, n)"
            timeout = parsed
        lines.append(b"%s: %s\r\n" % (name, value))
    if not method:
        return "no :method"
    ws_accept = b""
    if protocol:
        if method != b"CONNECT":
            return ":protocol without CONNECT"
        if not path or not authority:
            return "an extended CONNECT without :path or :authority"
        if protocol.lower() != b"websocket":
            return LocalAnswer(501, f"protocol {_show(protocol)} is not supported over "
                                    "extended CONNECT (only websocket)")
        if end_stream or has_length:
            return "an extended CONNECT that ends its stream at once or has a content-length"
        key = new_key()
        ws_accept = websocket_accept(key)
        lines += [b"connection: upgrade\r\n", b"upgrade: websocket\r\n",
                  b"sec-websocket-version: %s\r\n" % (ws_version or b"13"),
                  b"sec-websocket-key: %s\r\n" % key]
        method = b"GET"
        target = path
    elif method == b"CONNECT":
        return LocalAnswer(400, "CONNECT is not supported by a reverse proxy (a WebSocket is "
                                "an extended CONNECT with :protocol websocket)")
    else:
        if not path:
            return "no :path"
        target = path
    if authority:
        host = authority  # RFC 9113 8.3.1: :authority wins over a host field
    if host:
        lines.insert(0, b"host: %s\r\n" % host)
    if cookies:
        lines.append(b"cookie: %s\r\n" % b"; ".join(cookies))  # RFC 9113 8.2.3
    chunked = not end_stream and not has_length and not ws_accept  # a tunnel is not a body
    if chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    head = b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, b"".join(lines))
    return RequestHead(head, method, chunked, is_grpc, timeout, ws_accept)


def response_fields(status: int, fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 header list of an HTTP/1.1 response (fields as received, any case): names
    lowercased, connection-specific fields and those Connection names dropped."""
    named: set[bytes] = set()
    for name, value in fields:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    out = [(b":status", b"%d" % status)]
    for name, value in fields:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in named or lname == b"te":
            continue
        out.append((lname, value))
    return out


def websocket_fields(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The 200 an extended CONNECT gets for a backend's 101 (fields as received): what the
    101 negotiated (Sec-WebSocket-Protocol, -Extensions, cookies...) without what only
    HTTP/1.1's handshake has (the accept, Connection, Upgrade)."""
    return response_fields(200, [(n, v) for n, v in fields
                                 if n.lower() != b"sec-websocket-accept"])


def trailer_fields(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Trailers as HTTP/2 fields: lowercase, without connection-specific ones."""
    return [(n.lower(), v) for n, v in fields if n.lower() not in HOP_BY_HOP]


def _show(name: bytes) -> str:
    return repr(name[:64].decode("latin-1"))
