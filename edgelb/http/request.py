"""A request as the client sent it: the checks of its head (an answer is `Refuse`d before
anything reaches a backend), the fields read from it, and the head forwarded upstream.

Parser callbacks raise `Refuse` to stop httptools at once; ClientProtocol answers it in turn.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from edgelb.http.headers import CONNECTION_OPTIONS, connection_tokens, drop_named

if TYPE_CHECKING:
    from edgelb.http.client import ClientProtocol
    from edgelb.http.exchange import Exchange

MAX_HEAD = 64 * 1024  # a request head still incomplete after this much more data: 431
MAX_TARGET = 16 * 1024  # the request target: 431 beyond (HAProxy's whole buffer is 16 KiB)
# bytes of a chunked body that are not body (chunk lines, extensions, trailers) in a row:
# a head's limit plus one read's worth, since the count starts again at each piece of body
MAX_TRAILING = MAX_HEAD + 64 * 1024

_join = b"".join
_SP = b" "
_VERSION_LINE = b" HTTP/1.1\r\n"

# the request fields the proxy acts on (special_request_header); the others pass as they came
REQ_SPECIAL = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"via",
        b"expect",
        b"proxy-authorization",
        b"x-request-id",
        b"traceparent",
    }
)


class Refuse(Exception):
    """Raised in a parser callback to refuse the request (stops the parser at once)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# Connection may not name the fields that frame or route the message (a client naming
# Content-Length there would have the body forwarded without it: smuggling).
NEVER_NAMED = CONNECTION_OPTIONS | {b"content-length", b"transfer-encoding", b"host"}

_HOST = re.compile(
    rb"(?:[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    rb"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
    rb"|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
)
_host_ok: dict[bytes, bool] = {}  # hosts seen, validated once (bounded)


def valid_host(value: bytes) -> bool:
    ok = _host_ok.get(value)
    if ok is None:
        m = _HOST.fullmatch(value)
        ok = m is not None and (b"]:" in value or value.count(b":") <= 1 or value[:1] == b"[")
        if ok and b":" in value and not value.endswith(b"]"):
            port = value.rsplit(b":", 1)[1]
            ok = port.isdigit() and 0 < int(port) < 65536
        if len(_host_ok) >= 1024:
            _host_ok.clear()
        _host_ok[value] = ok
    return ok


def check_version(version: str, ex: Exchange) -> None:
    if version == "1.0":
        if ex.chunked:
            raise Refuse(400, "Transfer-Encoding in an HTTP/1.0 request")
        return
    if version.startswith("0."):
        raise Refuse(400, "HTTP/0.9 requests are not served")
    raise Refuse(505, f"HTTP/{version} is not spoken here (HTTP/1.1 and 1.0 are)")


def check_target(ex: Exchange) -> None:
    """The request target: origin-form (no fragment), `*` for OPTIONS only, or absolute-form
    with an http(s) scheme, an authority without userinfo, and a valid host."""
    url = ex.url
    if b"#" in url:
        raise Refuse(400, "a fragment (#) in the request target")
    if url == b"*":
        if ex.method != b"OPTIONS":
            raise Refuse(400, "the target * is for OPTIONS only")
        return
    if url[0] == 47:
        return
    scheme, sep, rest = url.partition(b"://")
    if not sep:
        raise Refuse(400, "the request target is not a path or an absolute URL")
    if scheme.lower() not in (b"http", b"https"):
        raise Refuse(400, "the request target's scheme is not http or https")
    authority = rest.split(b"/", 1)[0].split(b"?", 1)[0]
    if not authority or b"@" in authority or not valid_host(authority):
        raise Refuse(400, "the request target's authority is empty or not a valid host")


def special_request_header(ex: Exchange, lname: bytes, name: bytes, value: bytes) -> None:
    if lname == b"host":
        if not ex.has_host:
            ex.host = value
            ex.has_host = True
            ex.lines.append(b"%s: %s\r\n" % (name, value))
    elif lname == b"connection":
        if ex.conn_tokens is None:
            ex.conn_tokens = []
        ex.conn_tokens.extend(connection_tokens(value))
    elif lname == b"te":
        if b"trailers" in value.lower():
            ex.te_trailers = True
    elif lname == b"transfer-encoding":
        ex.chunked = True  # the parser accepts only a final "chunked"
    elif lname == b"upgrade":
        ex.upgrade_value = value
    elif lname == b"x-forwarded-for":
        ex.xff = ex.xff + b", " + value if ex.xff else value
    elif lname == b"forwarded":
        ex.fwd = ex.fwd + b", " + value if ex.fwd else value
    elif lname == b"via":
        ex.via = ex.via + b", " + value if ex.via else value
    elif lname == b"expect":
        ex.lines.append(b"%s: %s\r\n" % (name, value))
    elif lname == b"x-request-id" or lname == b"traceparent":
        # passed on as they came; telemetry (edgelb/telemetry/hub.py) may replace them
        ex.lines.append(b"%s: %s\r\n" % (name, value))
        if lname == b"traceparent":
            ex.traceparent = value
        elif not ex.request_id:
            ex.request_id = value
    # keep-alive, proxy-connection, proxy-authorization, x-forwarded-proto and
    # x-forwarded-host are dropped: the first three are hop-by-hop (credentials for this
    # proxy, never for a backend), the last two are set by the proxy itself.


def absolute_form(ex: Exchange) -> None:
    """`GET http://host/path` (RFC 9112 3.2.2): the target's authority is the host. Forward
    origin-form with a matching Host, which every backend understands."""
    url = ex.url
    scheme_end = url.find(b"://")
    if scheme_end < 0:
        return  # not absolute-form; the backend judges it
    rest = url[scheme_end + 3 :]
    slash = rest.find(b"/")
    authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
    at = authority.rfind(b"@")
    if at >= 0:
        authority = authority[at + 1 :]  # no userinfo in a Host
    ex.url = path
    ex.lines = [ln for ln in ex.lines if ln[:5].lower() != b"host:"]
    ex.lines.append(b"host: %s\r\n" % authority)
    ex.host = authority
    ex.has_host = True


def header(lines: list[bytes], name: bytes) -> bytes | None:
    """The value of request header `name` (first occurrence), or None."""
    prefix = name.lower() + b":"
    for line in lines:
        if line[: len(prefix)].lower() == prefix:
            return line[len(prefix) :].strip()
    return None


def cookie(lines: list[bytes], name: bytes) -> bytes | None:
    """The value of cookie `name` in the request's Cookie headers, or None."""
    for line in lines:
        if line[:7].lower() == b"cookie:":
            for pair in line[7:].split(b";"):
                k, eq, v = pair.strip().partition(b"=")
                if eq and k == name:
                    return v.strip()
    return None


def last_chunk(trailers: list[bytes] | None) -> bytes:
    if trailers:
        return b"0\r\n" + b"".join(trailers) + b"\r\n"
    return b"0\r\n\r\n"


def request_head(client: ClientProtocol, ex: Exchange) -> bytes:
    """The head `ex` is forwarded with: its lines less the hop-by-hop ones, the framing the
    proxy sets, and the forwarding block (kept on `client`: it depends only on the client and
    the Host)."""
    lines = ex.lines
    if ex.conn_tokens:
        named = {t for t in ex.conn_tokens if t not in NEVER_NAMED}
        if named:
            lines = drop_named(lines, named)
    if ex.xff or ex.fwd or ex.via:
        tail = forwarding_lines(client, ex)
    else:
        # The forwarding block depends only on the client and the Host: reuse it.
        tail = client.fwd_cache
        if ex.host != client.fwd_cache_host or not tail:
            tail = client.fwd_cache = forwarding_lines(client, ex)
            client.fwd_cache_host = ex.host
    if not ex.has_host or ex.chunked or ex.te_trailers or ex.upgrade:
        tail = framing_lines(client, ex) + tail
    if ex.fwd_extra:  # the request ID and traceparent edgelb sets (telemetry on)
        tail = ex.fwd_extra + tail
    # (b"".join of a tuple: cheaper than %-formatting, which parses its format each time)
    if len(lines) == 1:
        return _join((ex.method, _SP, ex.url, _VERSION_LINE, lines[0], tail))
    return _join((ex.method, _SP, ex.url, _VERSION_LINE, _join(lines), tail))


def framing_lines(client: ClientProtocol, ex: Exchange) -> bytes:
    parts = []
    if not ex.has_host:
        parts.append(b"host: %s\r\n" % client.listener.default_host())
    if ex.chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if ex.te_trailers:
        parts.append(b"te: trailers\r\n")
    if ex.upgrade:
        parts.append(b"connection: upgrade\r\nupgrade: %s\r\n" % ex.upgrade_value)
    return b"".join(parts)


def forwarding_lines(client: ClientProtocol, ex: Exchange) -> bytes:
    """X-Forwarded-*, Forwarded and Via lines, and the blank line that ends the head."""
    ip = client.xff_ip
    proto = client.listener.scheme
    parts = [
        b"x-forwarded-for: %s\r\nx-forwarded-proto: %s\r\n"
        % (ex.xff + b", " + ip if ex.xff else ip, proto)
    ]
    fwd = client.fwd_for + b";proto=" + proto
    if ex.has_host:
        parts.append(b"x-forwarded-host: %s\r\n" % ex.host)
        fwd += b';host="' + ex.host + b'"'
    parts.append(
        b"forwarded: %s\r\nvia: %s1.1 edgelb\r\n\r\n"
        % (ex.fwd + b", " + fwd if ex.fwd else fwd, ex.via + b", " if ex.via else b"")
    )
    return b"".join(parts)
