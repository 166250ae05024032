"""Host and path routing on the shared entrypoints, with the Gateway API's matches.

Hosts: exact names first, then `*.example.com` wildcards (exactly one label), then rules
without a host; a host's rules are found by one dict lookup, so the cost of a request does not
grow with the routes of other hosts. Within a host the rules are tried in the precedence of
watchers/routing.py (exact path, regex, the longest prefix, then method, headers, query); a
host whose rules all miss falls through to the wildcard's, then to the any-host rules.
Prefixes match element-wise (`/foo` matches `/foo` and `/foo/bar`, never `/foobar`) and a
trailing slash in a prefix is ignored. Paths arrive normalised (edgelb/http/target.py), and
`;parameters` end an element (`/foo;x=1` is `/foo`). Regular expressions must match the whole
path (or header value) and are compiled once, when the table is built.

A Rule that only names a service (`plain`) costs what a host/path route always did; the
others carry their conditions, their filters (edgelb/http/filters.py) and a weighted picker.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from edgelb.http.client_limits import ClientLimiter
from edgelb.http.cors import RESPONSE_FIELDS, CompiledCors
from watchers.model import HeaderEdits, Route
from watchers.routing import precedence


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


class Picker:
    """A deterministic weighted choice among a route's services: smooth weighted round robin
    (nginx's), so N requests over weights 90/10 land exactly 90 % / 10 % of every 100."""

    __slots__ = ("current", "names", "total", "weights")

    def __init__(self, pairs: Iterable[tuple[str, int]]) -> None:
        kept = [(n, w) for n, w in pairs if w > 0]
        self.names = [n for n, _ in kept]
        self.weights = [w for _, w in kept]
        self.current = [0] * len(kept)
        self.total = sum(self.weights)

    def pick(self) -> str:
        best = 0
        current = self.current
        for i, w in enumerate(self.weights):
            current[i] += w
            if current[i] > current[best]:
                best = i
        current[best] -= self.total
        return self.names[best]


class Edits:
    """A header modifier as the data path applies it to raw header lines."""

    __slots__ = ("drop", "lines")

    def __init__(self, edits: HeaderEdits) -> None:
        self.drop = tuple({n.encode("latin-1") + b":" for n, _ in edits.set}
                          | {n.encode("latin-1") + b":" for n in edits.remove})
        self.lines = b"".join(b"%s: %s\r\n" % (n.encode("latin-1"), v.encode("latin-1"))
                              for n, v in (*edits.set, *edits.add))


class Rule:
    """One route compiled for the data path (mutable only in its picker)."""

    __slots__ = ("cors", "exact", "headers", "limiter", "method", "mirrors", "path", "picker",
                 "plain", "query", "redirect", "regex", "req_edits", "resp_edits", "rewrite",
                 "route", "service", "timeout")

    def __init__(self, route: Route, picker: Picker | None,
                 limiter: ClientLimiter | None = None) -> None:
        self.route = route
        self.service = route.service
        self.exact = route.exact
        self.path = route.path if route.exact or route.regex else _normalise_prefix(route.path)
        self.regex = re.compile(route.path) if route.regex else None
        self.method = route.method.encode("latin-1")
        self.headers = tuple(
            (m.name.lower().encode("latin-1") + b":",
             re.compile(m.value) if m.regex else None, m.value.encode("latin-1"))
            for m in route.headers)
        self.query = tuple((m.name, re.compile(m.value) if m.regex else None, m.value)
                           for m in route.query)
        f = route.filters
        self.req_edits = Edits(f.request_headers) if f and f.request_headers else None
        resp = f.response_headers if f else None
        self.cors = CompiledCors(f.cors) if f and f.cors else None
        if self.cors is not None:  # the route's CORS fields are the only ones
            resp = resp or HeaderEdits()
            resp = HeaderEdits(set=resp.set, add=resp.add,
                               remove=tuple(dict.fromkeys((*resp.remove, *RESPONSE_FIELDS))))
        self.resp_edits = Edits(resp) if resp else None
        self.limiter = limiter
        self.mirrors = f.mirrors if f else ()
        self.redirect = f.redirect if f else None
        self.rewrite = f.rewrite if f else None
        self.timeout = route.timeout or 0.0
        self.picker = picker
        self.plain = (not route.regex and not route.method and not route.headers
                      and not route.query and f is None and picker is None and not self.timeout)

    def pick(self) -> str:
        """The service this request goes to ("" when the route only redirects)."""
        picker = self.picker
        return picker.pick() if picker is not None else self.service

    def matches(self, path: str, url: str, method: bytes, lines: list[bytes]) -> bool:
        """`path`: the target's path; `url`: the whole target (its query is read here)."""
        regex = self.regex
        if regex is not None:
            if regex.fullmatch(path) is None:
                return False
        elif not path_matches(path, self.path, self.exact):
            return False
        if self.plain:
            return True
        if self.method and method != self.method:
            return False
        for prefix, pattern, value in self.headers:
            got = _header(lines, prefix)
            if got is None:
                return False
            if pattern is not None:
                if pattern.fullmatch(got.decode("latin-1")) is None:
                    return False
            elif got != value:
                return False
        if self.query:
            params: dict[str, str] = {}
            q = url.find("?")
            for k, v in parse_qsl(url[q + 1:] if q >= 0 else "", keep_blank_values=True):
                params.setdefault(k, v)
            for name, qpattern, qvalue in self.query:
                val = params.get(name)
                if val is None:
                    return False
                if qpattern is not None:
                    if qpattern.fullmatch(val) is None:
                        return False
                elif val != qvalue:
                    return False
        return True


_NO_LINES: list[bytes] = []


def _first(rules: list[Rule], path: str, url: str, method: bytes, lines: list[bytes]
           ) -> Rule | None:
    for rule in rules:
        if rule.plain:  # a host/path route: its path alone, without another call
            if path_matches(path, rule.path, rule.exact):
                return rule
        elif rule.matches(path, url, method, lines):
            return rule
    return None


def _header(lines: list[bytes], prefix: bytes) -> bytes | None:
    n = len(prefix)
    for line in lines:
        if line[:n].lower() == prefix:
            return line[n:].strip()
    return None


class Router:
    """An immutable routing table (but for its pickers' positions); the runtime builds a new
    one on every snapshot."""

    __slots__ = ("_any", "_deep", "_exact", "_limiters", "_pickers", "_wild")

    def __init__(self, routes: Iterable[Route] = (), previous: Router | None = None,
                 group: Any = None) -> None:
        """`previous`: the table this one replaces; a route (by name) whose limits did not
        change keeps its clients' buckets and requests in flight, and one whose split did not
        change keeps its picker's place (a reload does not restart a 90/10 split's cycle).
        `group`: a worker's view of the group's per-client limits
        (edgelb/workers/shared_limits.py LimitsView; None: this process alone), given to
        every limiter."""
        exact: dict[str, list[Rule]] = {}
        wild: dict[str, list[Rule]] = {}
        deep: dict[str, list[Rule]] = {}
        anyhost: list[Rule] = []
        pickers: dict[tuple[str, tuple[tuple[str, int], ...]], Picker] = {}
        limiters: dict[tuple[str, object], ClientLimiter] = {}
        kept = previous._limiters if previous is not None else {}
        kept_pickers = previous._pickers if previous is not None else {}
        for r in routes:
            picker = None
            if r.backends and (len(r.backends) > 1 or r.backends[0].service != r.service):
                pairs = tuple((b.service, b.weight) for b in r.backends)
                # one picker per route of the source, shared by its hosts and matches
                key = (r.name, pairs)
                picker = (pickers.get(key) or kept_pickers.get(key)) if r.name else None
                if picker is None:
                    picker = Picker(pairs)
                pickers[key] = picker
            limiter = None
            lim = r.filters.limits if r.filters else None
            if lim is not None and (lim.rps > 0 or lim.connections > 0):
                # one per route of the source: its hosts and matches share a client's budget
                lkey = (r.name, lim)
                limiter = (limiters.get(lkey) or kept.get(lkey)) if r.name else None
                if limiter is None or limiter.group is not group:
                    # named alike in every worker: an unnamed route by all it is
                    limiter = ClientLimiter(lim, group, r.name or repr(r))
                limiters[lkey] = limiter
            rule = Rule(r, picker, limiter)
            host = r.host.lower()
            if not host:
                anyhost.append(rule)
            elif host.startswith("*."):
                wild.setdefault(host[1:], []).append(rule)  # key ".example.com"
                if r.any_depth:  # also for names some labels deeper
                    deep.setdefault(host[1:], []).append(rule)
            else:
                exact.setdefault(host, []).append(rule)
        self._exact = {h: _sort(v) for h, v in exact.items()}
        self._wild = {h: _sort(v) for h, v in wild.items()}
        self._deep = {h: _sort(v) for h, v in deep.items()}
        self._any = _sort(anyhost)
        self._limiters = {k: v for k, v in limiters.items() if k[0]}
        self._pickers = {k: v for k, v in pickers.items() if k[0]}

    def match(self, host: str, url: str, method: bytes = b"GET",
              lines: list[bytes] | None = None) -> Rule | None:
        """The rule for a request's Host (port allowed), target, method and header lines."""
        q = url.find("?")
        path = url[:q] if q >= 0 else url
        host = _strip_port(host).lower().rstrip(".")
        head = lines if lines is not None else _NO_LINES
        rules = self._exact.get(host)
        if rules is not None:
            found = _first(rules, path, url, method, head)
            if found is not None:
                return found
        dot = host.find(".")
        if dot > 0:
            rules = self._wild.get(host[dot:])
            if rules is not None:
                found = _first(rules, path, url, method, head)
                if found is not None:
                    return found
            if self._deep:  # `*.` of any depth: the longest suffix first
                dot = host.find(".", dot + 1)
                while dot > 0:
                    rules = self._deep.get(host[dot:])
                    if rules is not None:
                        found = _first(rules, path, url, method, head)
                        if found is not None:
                            return found
                    dot = host.find(".", dot + 1)
        return _first(self._any, path, url, method, head)

    def lookup(self, host: str, path: str) -> str | None:
        """The service for a request's Host (port allowed) and path (query allowed)."""
        rule = self.match(host, path)
        return rule.pick() if rule is not None else None


def _sort(rules: list[Rule]) -> list[Rule]:
    # a prefix is compared as normalised; stable: equal keys keep the source's order
    return sorted(rules, key=_key)


def _key(rule: Rule) -> tuple[int, ...]:
    kind, _, *rest = precedence(rule.route)
    return (kind, -len(rule.path), *rest)


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [::1]:8080
        end = host.find("]")
        return host[1:end] if end > 0 else host
    colon = host.rfind(":")
    if colon >= 0 and host.count(":") == 1:
        return host[:colon]
    return host
