"""A route's filters applied to one exchange (edgelb/http/router.py compiles them): request
header edits, URL rewrite (Host, whole path, matched prefix), the redirect's Location, and the
response header edits the upstream protocol applies to the head it relays.

Pure functions of the exchange's bytes; nothing here reaches the network.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

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
    """Apply `rule` to `ex`: answer its redirect (None), or rewrite the request, remember the
    response edits and timeout, and pick the service of the split that takes it."""
    client = ex.client
    if rule.redirect is not None:
        location = redirect_location(rule, listener.scheme, ex.host or listener.default_host(),
                                     ex.url)
        client.answer(ex, rule.redirect.status, f"moved to {location}", None,
                      b"location: %s\r\n" % location.encode("latin-1"), "redirect")
        return None
    name = rule.pick()
    service: ServiceState | None = listener.services.get(name)
    if service is None:  # the Gateway API: an unresolved share of a split answers 500
        client.answer(ex, 500, f"service {name} of this route does not exist", None)
        return None
    rewrite_request(ex, rule)
    ex.resp_edits = rule.resp_edits
    ex.timeout = rule.timeout
    return service
