"""Pure facts about routes that every source and the router share: which regular expressions
are safe enough to run on every request, the precedence of routes, and the conflicts in a
set of routes (a route that can never be chosen).

Precedence follows the Gateway API's HTTPRoute rules, within one host (exact host names
first, then `*.` wildcards, then routes without a host; edgelb/http/router.py):

1. an Exact path;
2. a RegularExpression path (implementation-specific in the API; edgelb puts it after Exact
   and before every prefix, longer patterns first, as Envoy Gateway does);
3. a PathPrefix, the most characters first;
4. then a method match; the most header matches; the most query parameter matches;
5. then `order` (the file's list order; the oldest route for the Gateway API), then the
   order the source gave.

Python's `re` has no RE2-like linear-time guarantee, so a pattern is bounded instead: at most
MAX_REGEX characters, no backreferences or look-arounds, and no repeat nested in a repeat
(`(a+)+`, `(a|aa)*`: the shapes of catastrophic backtracking); paths and header values
reaching it are bounded by the request head limits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from watchers.model import Route

MAX_REGEX = 256

try:  # Python 3.11+
    import re._constants as _c  # type: ignore[import-not-found]
    import re._parser as _p  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - older Pythons
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", _c.MAX_REPEAT)}
_REFUSED = {_c.GROUPREF: "a backreference", _c.ASSERT: "a look-ahead or look-behind",
            _c.ASSERT_NOT: "a look-ahead or look-behind",
            getattr(_c, "GROUPREF_EXISTS", _c.GROUPREF): "a conditional group"}


def regex_problem(pattern: str) -> str | None:
    """Why `pattern` may not be used to route (a sentence that says the fix), or None."""
    if len(pattern) > MAX_REGEX:
        return f"the regular expression is {len(pattern)} characters; at most {MAX_REGEX}"
    try:
        parsed = _p.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        return f"not a regular expression: {e}"
    return _walk(parsed, False)


def _walk(items: Any, in_repeat: bool) -> str | None:
    for op, arg in items:
        if op in _REFUSED:
            return f"{_REFUSED[op]} is not allowed (it may backtrack without bound); rewrite " \
                   "the pattern without it"
        if op in _REPEATS:
            _low, high, sub = arg
            repeats = high is _c.MAXREPEAT or high > 1
            if repeats and in_repeat:
                return "a repeat inside a repeat (like (a+)+) may backtrack without bound; " \
                       "repeat the inner part once, e.g. (ab)+ or [a-z]+"
            found = _walk(sub, in_repeat or repeats)
        elif op == _c.SUBPATTERN:
            found = _walk(arg[-1], in_repeat)
        elif op == _c.BRANCH:
            found = None
            for alt in arg[1]:
                found = found or _walk(alt, in_repeat)
        else:
            continue
        if found:
            return found
    return None


def precedence(route: Route) -> tuple[int, int, int, int, int, int]:
    """The sort key of `route` among the routes of one host: the first that matches wins."""
    kind = 0 if route.exact else 1 if route.regex else 2
    return (kind, -len(route.path), 0 if route.method else 1, -len(route.headers),
            -len(route.query), route.order)


def match_key(route: Route) -> tuple[Any, ...]:
    """Two routes with the same key match the same requests: only the first is ever used."""
    kind = "exact" if route.exact else "regex" if route.regex else "prefix"
    headers = frozenset((h.name.lower(), h.value, h.regex) for h in route.headers)
    query = frozenset((q.name, q.value, q.regex) for q in route.query)
    return (route.host.lower(), kind, route.path, route.method.upper(), headers, query)


def describe(route: Route) -> str:
    """A route's conditions in a few words, for messages."""
    kind = "exact path" if route.exact else "path regex" if route.regex else "path prefix"
    parts = [f"{kind} {route.path}", f"host {route.host}" if route.host else "any host"]
    if route.method:
        parts.append(f"method {route.method}")
    for what, items in (("header", route.headers), ("query", route.query)):
        for m in items:
            parts.append(f"{what} {m.name}{'~' if m.regex else '='}{m.value}")
    return ", ".join(parts)


def shadowed(routes: Iterable[Route]) -> list[tuple[Route, Route]]:
    """(first, later) pairs of routes with the same conditions: `later` is never chosen."""
    seen: dict[tuple[Any, ...], Route] = {}
    out: list[tuple[Route, Route]] = []
    for r in sorted(routes, key=precedence):
        key = match_key(r)
        first = seen.setdefault(key, r)
        if first is not r:
            out.append((first, r))
    return out


def explain(routes: Iterable[Route]) -> list[str]:
    """The precedence conflicts of `routes`, one sentence each, naming both routes."""
    out = []
    for first, later in shadowed(routes):
        out.append(f"{later.name or 'a route'} ({describe(later)}) is never chosen: "
                   f"{first.name or 'another route'} has the same host, path, method, headers "
                   "and query parameters and comes first; change one of their conditions or "
                   "merge them (a split between services goes in backends)")
    return out
