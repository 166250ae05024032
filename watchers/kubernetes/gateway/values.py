"""Small pure readers of Gateway API values: host name intersection, label selectors,
durations. None of them raises."""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^(?:[0-9]{1,5}(?:h|ms|m|s)){1,4}$")
_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def duration(value: Any) -> float | None:
    """A Gateway API Duration ("10s", "1m30s", "500ms", "0s") in seconds; None if malformed."""
    if not isinstance(value, str) or not _DURATION.match(value):
        return None
    return sum(int(n) * _SECONDS[u] for n, u in _PART.findall(value))


def port_number(value: Any) -> int:
    """A port (1-65535) as written, or 0 when it is none."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    return 0


def _covers(wild: str, host: str) -> bool:
    """`*.example.com` covers `a.example.com` and `*.a.example.com`."""
    suffix = wild[1:]  # ".example.com"
    bare = host[2:] if host.startswith("*.") else host
    return bare.endswith(suffix) and len(bare) > len(suffix)


def intersect(listener: str, route: str) -> str | None:
    """The host names both a listener's hostname and a route's hostname match ("" = any), as
    the Gateway API intersects them: the more specific of the two, or None when disjoint."""
    if not listener:
        return route
    if not route or route == listener:
        return listener
    if listener.startswith("*.") and _covers(listener, route):
        return route
    if route.startswith("*.") and _covers(route, listener):
        return listener
    return None


def route_hosts(listener: str, hostnames: list[str]) -> list[str]:
    """The hosts a route with `hostnames` (empty: any) is served at on a listener."""
    if not hostnames:
        return [listener]
    out = []
    for h in hostnames:
        got = intersect(listener, h)
        if got is not None and got not in out:
            out.append(got)
    return out


def selector_matches(selector: Any, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist)
    against `labels`; an empty selector matches everything, a malformed one nothing."""
    if not isinstance(selector, dict):
        return False
    match = selector.get("matchLabels") or {}
    if not isinstance(match, dict):
        return False
    for k, v in match.items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        if not isinstance(expr, dict):
            return False
        key, op = expr.get("key"), expr.get("operator")
        values = expr.get("values") or []
        if not isinstance(key, str) or not isinstance(values, list):
            return False
        if op == "In":
            ok = labels.get(key) in values
        elif op == "NotIn":
            ok = labels.get(key) not in values
        elif op == "Exists":
            ok = key in labels
        elif op == "DoesNotExist":
            ok = key not in labels
        else:
            return False
        if not ok:
            return False
    return True
