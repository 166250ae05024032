"""Host and path routing on the shared entrypoints.

Hosts: exact names first, then `*.example.com` wildcards (exactly one label), then rules
without a host. Within a host, the longest matching path wins, an exact path before a prefix
of the same length; prefixes match element-wise (`/foo` matches `/foo` and `/foo/bar`, never
`/foobar`) and a trailing slash in a prefix is ignored. Paths arrive normalised
(edgelb/http/target.py), and `;parameters` end an element (`/foo;x=1` is `/foo`).
"""

from __future__ import annotations

from collections.abc import Iterable

from watchers.model import Route

# (path, exact, service name), sorted so that the first match is the right one
_Rules = list[tuple[str, bool, str]]


def _sort(rules: _Rules) -> _Rules:
    return sorted(rules, key=lambda r: (-len(r[0]), not r[1]))


def _normalise_prefix(path: str) -> str:
    stripped = path.rstrip("/")
    return stripped or "/"


def path_matches(path: str, rule_path: str, exact: bool) -> bool:
    """`;` ends a path element as `/` does: `/admin;jsessionid=1` is `/admin` to Tomcat and
    Spring, so it must meet `/admin`'s rules, never fall through to `/`'s."""
    if rule_path == "/" and not exact:
        return True
    if not path.startswith(rule_path):
        return False
    n = len(rule_path)
    if len(path) == n or path[n] == ";":
        return True
    return not exact and path[n] == "/"


class Router:
    """An immutable routing table; the runtime builds a new one on every snapshot."""

    __slots__ = ("_any", "_exact", "_wild")

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        exact: dict[str, _Rules] = {}
        wild: dict[str, _Rules] = {}
        anyhost: _Rules = []
        for r in routes:
            path = r.path if r.exact else _normalise_prefix(r.path)
            rule = (path, r.exact, r.service)
            host = r.host.lower()
            if not host:
                anyhost.append(rule)
            elif host.startswith("*."):
                wild.setdefault(host[1:], []).append(rule)  # key ".example.com"
            else:
                exact.setdefault(host, []).append(rule)
        self._exact = {h: _sort(v) for h, v in exact.items()}
        self._wild = {h: _sort(v) for h, v in wild.items()}
        self._any = _sort(anyhost)

    @staticmethod
    def _first(rules: _Rules, path: str) -> str | None:
        for rule_path, exact, service in rules:
            if path_matches(path, rule_path, exact):
                return service
        return None

    def lookup(self, host: str, path: str) -> str | None:
        """The service for a request's Host (port allowed) and path (query allowed)."""
        q = path.find("?")
        if q >= 0:
            path = path[:q]
        host = _strip_port(host).lower().rstrip(".")
        rules = self._exact.get(host)
        if rules is not None:
            found = self._first(rules, path)
            if found is not None:
                return found
        dot = host.find(".")
        if dot > 0:
            rules = self._wild.get(host[dot:])
            if rules is not None:
                found = self._first(rules, path)
                if found is not None:
                    return found
        return self._first(self._any, path)


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [::1]:8080
        end = host.find("]")
        return host[1:end] if end > 0 else host
    colon = host.rfind(":")
    if colon >= 0 and host.count(":") == 1:
        return host[:colon]
    return host
