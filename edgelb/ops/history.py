"""Rates over the last minutes, for the status page: each service's requests and 5xx per
second and its mean latency, sampled from the live counters at a fixed interval.

The counters only grow (a reload keeps them, ARCHITECTURE.md), so a rate is the difference of
two samples over their time apart. A counter that went down anyway (a service removed and
added again under the same name) counts as a fresh start: no negative rate. The history is
bounded: `window / interval` points per service, and only services that exist now.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Counters:
    """One service's counters at one moment."""

    requests: int  # responses sent to clients (the backends' and edgelb's own)
    errors: int  # of which 5xx
    duration_count: int
    duration_sum: float


@dataclass(frozen=True, slots=True)
class Point:
    """The rates over one interval, at its end `t` (Unix time)."""

    t: float
    requests: float  # per second
    errors: float  # 5xx per second
    latency: float | None  # mean seconds of the requests that ended in it; None: none did


def counters(svc: Any) -> Counters:
    """A ServiceState's counters (edgelb.pool), summed over its backends."""
    requests = errors = 0
    for table in (svc.local_responses, *(b.responses for b in svc.pool.all_backends())):
        for code, n in table.items():
            requests += n
            if 500 <= code <= 599:
                errors += n
    return Counters(requests, errors, svc.duration_count, svc.duration_sum)


def rate_between(before: Counters, after: Counters, t: float, seconds: float) -> Point:
    if seconds <= 0 or after.requests < before.requests or after.errors < before.errors:
        return Point(t, 0.0, 0.0, None)  # a fresh start
    done = after.duration_count - before.duration_count
    latency = (after.duration_sum - before.duration_sum) / done if done > 0 else None
    return Point(t, (after.requests - before.requests) / seconds,
                 (after.errors - before.errors) / seconds, latency)


class RateHistory:
    """Per-service points, one per `sample()` call (made every `interval` seconds)."""

    def __init__(self, interval: float = 2.0, window: float = 300.0) -> None:
        if interval <= 0 or window < interval:
            raise ValueError(f"interval {interval} s must be > 0 and window {window} s at "
                             "least one interval")
        self.interval = interval
        self.window = window
        self.points = max(2, round(window / interval))
        self._last: dict[str, tuple[float, Counters]] = {}
        self._history: dict[str, deque[Point]] = {}

    def sample(self, services: Iterable[Any], now: float) -> None:
        """Record a point for each service (ServiceState) from its counters now."""
        self.sample_counters(((svc.name, counters(svc)) for svc in services), now)

    def sample_counters(self, services: Iterable[tuple[str, Counters]], now: float) -> None:
        """Record a point for each (service name, its counters now): a worker group's sums
        (edgelb.workers), or `sample`'s."""
        seen: set[str] = set()
        for name, current in services:
            seen.add(name)
            last = self._last.get(name)
            self._last[name] = (now, current)
            if last is None:
                continue  # a rate needs two samples
            history = self._history.get(name)
            if history is None:
                history = self._history[name] = deque(maxlen=self.points)
            history.append(rate_between(last[1], current, now, now - last[0]))
        for gone in set(self._last) - seen:
            del self._last[gone]
            self._history.pop(gone, None)

    def latest(self, name: str) -> Point | None:
        history = self._history.get(name)
        return history[-1] if history else None

    def series(self, name: str) -> list[Point]:
        return list(self._history.get(name, ()))


def point_json(p: Point | None) -> dict[str, Any]:
    if p is None:
        return {"t": None, "requests": 0.0, "errors": 0.0, "latency": None}
    return {"t": p.t, "requests": p.requests, "errors": p.errors, "latency": p.latency}


def series_json(points: list[Point]) -> dict[str, list[Any]]:
    return {"t": [p.t for p in points], "requests": [p.requests for p in points],
            "errors": [p.errors for p in points], "latency": [p.latency for p in points]}


# -- charts (the same arithmetic as templates/status.js) ----------------------------------

CHART_WIDTH, CHART_HEIGHT = 240, 48


def chart_scale(values: Iterable[float | None]) -> float:
    """The top of a chart: the largest value, or 1 when there is none."""
    top = max((v for v in values if v is not None), default=0.0)
    return top if top > 0 else 1.0


def polyline(values: list[float | None], points: int, top: float) -> str:
    """SVG polyline points for `values` (the newest at the right edge of a chart holding
    `points` values); a None (no request ended) is drawn as 0."""
    if not values:
        return ""
    step = CHART_WIDTH / max(1, points - 1)
    x0 = CHART_WIDTH - step * (len(values) - 1)
    out = []
    for i, v in enumerate(values):
        y = CHART_HEIGHT - (v or 0.0) / top * (CHART_HEIGHT - 2) - 1
        out.append(f"{x0 + i * step:.1f},{y:.1f}")
    return " ".join(out)
