"""A route's filters applied to one exchange (edgelb/http/router.py compiles them): request
header edits, URL rewrite (Host, whole path, matched prefix), the redirect's Location, the
response header edits the upstream protocol applies to the head it relays, CORS
(edgelb/http/cors.py), per-client limits (edgelb/http/client_limits.py) and the start of
mirrored copies (edgelb/http/mirror.py, the only part that reaches the network).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from edgelb.http import mirror
from edgelb.http.client_limits import ADMITTED, EXEMPT, RATE_LIMITED, ClientLimiter
from edgelb.http.request import header

if TYPE_CHECKING:
    from edgelb.http.exchange import Exchange
    from edgelb.http.router import Edits, Rule
    from edgelb.pool import ServiceState


def edit_lines(lines: list[bytes], edits: Edits) -> list[bytes]:
    """`lines` (each `Name: value\\r\\n`) less the fields set or removed, plus those set or
    added."""
    drop = edits.drop
    if drop:
        kept = []
        for line in lines:
            low = line[:64].lower()
            if not any(low.startswith(d) for d in drop):
                kept.append(line)
        lines = kept
    if edits.lines:
        lines.append(edits.lines)
    return lines


def edit_head(headers: bytes, edits: Edits) -> bytes:
    """A response's header lines (CRLF-ended, no blank line) edited the same way."""
    lines = headers.splitlines(keepends=True)
    return b"".join(edit_lines(lines, edits))


def replace_path(path: str, prefix: str, new: str) -> str:
    """`path` with its matched `prefix` (element-wise, normalised) replaced by `new`."""
    rest = path if prefix == "/" else path[len(prefix):]
    if new.endswith("/") and rest.startswith("/"):
        rest = rest[1:]
    return (new + rest) or "/"


_GROUP = re.compile(r"\$([0-9])")


def expand_groups(template: str, match: re.Match[str] | None) -> str:
    """`template` with `$1`..`$9` replaced by `match`'s groups ("" for a group that did not
    take part or does not exist), as nginx's `rewrite` does (ingress-nginx's rewrite-target
    on a regex path)."""
    groups = match.re.groups if match is not None else 0

    def group(m: re.Match[str]) -> str:
        n = int(m.group(1))
        if match is None or n > groups:
            return ""
        return match.group(n) or ""

    return _GROUP.sub(group, template)


def _split_target(url: str) -> tuple[str, str]:
    q = url.find("?")
    return (url[:q], url[q:]) if q >= 0 else (url, "")


def rewrite_request(ex: Exchange, rule: Rule) -> None:
    """Apply the rule's request header edits and URL rewrite to `ex` before it is sent."""
    if rule.req_edits is not None:
        ex.lines = edit_lines(ex.lines, rule.req_edits)
    rw = rule.rewrite
    if rw is None:
        return
    if rw.path is not None or rw.prefix is not None:
        path, query = _split_target(ex.url.decode("latin-1"))
        path_only = path
        if rw.path is not None:
            path = rw.path
            if rule.regex is not None and "$" in path:  # `$1`..: the regex path's groups
                path = expand_groups(path, rule.regex.fullmatch(path_only))
                if not path.startswith("/"):
                    path = "/" + path
        else:
            path = replace_path(path, rule.path, rw.prefix or "/")
        ex.url = (path + query).encode("latin-1")
    if rw.host:
        host = rw.host.encode("latin-1")
        ex.lines = [ln for ln in ex.lines if ln[:5].lower() != b"host:"]
        ex.lines.append(b"host: %s\r\n" % host)
        if not ex.has_host:  # HTTP/1.0 without a Host: the rewritten one is the only one
            ex.has_host = True
            ex.host = host


def redirect_location(rule: Rule, scheme: bytes, host: bytes, url: bytes) -> str:
    """The Location of the rule's redirect for a request to `scheme`://`host``url`."""
    r: Any = rule.redirect
    hostname, port = _host_port(host.decode("latin-1"))
    new_scheme = r.scheme or scheme.decode("latin-1")
    new_host = r.host or hostname
    if r.port:
        new_port = r.port
    elif r.scheme and r.scheme != scheme.decode("latin-1"):
        new_port = 0  # the new scheme's own port
    else:
        new_port = port
    if new_port == (443 if new_scheme == "https" else 80):
        new_port = 0
    path, query = _split_target(url.decode("latin-1"))
    if r.path is not None:
        path = r.path
    elif r.prefix is not None:
        path = replace_path(path, rule.path, r.prefix)
    authority = f"{new_host}:{new_port}" if new_port else new_host
    return f"{new_scheme}://{authority}{path}{query}"


def _host_port(host: str) -> tuple[str, int]:
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1:]
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else 0
        return host[: end + 1], port
    name, _, port = host.partition(":")
    return name, int(port) if port.isdigit() else 0


def routed(ex: Exchange, rule: Rule, listener: Any) -> ServiceState | None:
    """Apply `rule` to `ex`: answer its redirect, CORS preflight or per-client limit (None),
    or rewrite the request, remember the response edits and timeout, start its mirrors, and
    pick the service of the split that takes it."""
    client = ex.client
    if rule.redirect is not None:
        location = redirect_location(rule, listener.scheme, ex.host or listener.default_host(),
                                     ex.url)
        client.answer(ex, rule.redirect.status, f"moved to {location}", None,
                      b"location: %s\r\n" % location.encode("latin-1"), "redirect")
        return None
    cors = rule.cors
    origin = None
    if cors is not None:
        origin = header(ex.lines, b"origin")
        if (origin is not None and ex.method == b"OPTIONS"
                and header(ex.lines, b"access-control-request-method") is not None):
            client.answer(ex, 204, "", None, cors.preflight(origin), "cors")
            return None
    name = rule.pick()
    service: ServiceState | None = listener.services.get(name)
    if service is None:  # the Gateway API: an unresolved share of a split answers 500
        client.answer(ex, 500, f"service {name} of this route does not exist", None)
        return None
    if cors is not None:  # (before the limits: a 429 is readable by the page too)
        ex.resp_extra += cors.response(origin)
    limiter = rule.limiter
    if limiter is not None and limited(ex, limiter, service):
        return None
    rewrite_request(ex, rule)
    ex.resp_edits = rule.resp_edits
    ex.timeout = rule.timeout
    if rule.mirrors:
        mirror.start(ex, rule, listener)
    return service


def limited(ex: Exchange, limiter: ClientLimiter, service: ServiceState) -> bool:
    """The route's per-client limits: True when `ex` was answered 429 (counted in the
    service's shed: rate_limit or client_connections); else it may hold a slot until it
    ends (accounting.finish gives it back)."""
    client = ex.client
    ip = client.xff_ip
    verdict = limiter.admit(ip, client.loop.time())
    if verdict == ADMITTED:
        if limiter.connections:
            ex.client_limit = limiter
        return False
    if verdict == EXEMPT:
        return False
    if verdict == RATE_LIMITED:
        reason = "rate_limit"
        detail = "too many requests from your address; slow down"
        wait = limiter.retry_after(ip)
    else:
        reason = "client_connections"
        detail = "too many requests from your address at once"
        wait = 1
    service.shed[reason] = service.shed.get(reason, 0) + 1
    client.answer(ex, 429, detail, service, b"retry-after: %d\r\n" % wait, "shed")
    return True
