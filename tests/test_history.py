"""edgelb.ops.history: the status page's rates from counters that only grow."""

from __future__ import annotations

from edgelb.ops.history import (
    CHART_HEIGHT,
    CHART_WIDTH,
    Counters,
    RateHistory,
    chart_scale,
    polyline,
    rate_between,
)
from edgelb.pool import ServiceState
from watchers.model import Backend, Service


def state(name: str = "web") -> ServiceState:
    return ServiceState(Service(name=name, backends=(Backend("127.0.0.1", 9001),)))


def test_rates_from_two_samples() -> None:
    svc = state()
    backend = svc.pool.by_key["127.0.0.1:9001"]
    h = RateHistory(interval=2.0, window=10.0)
    h.sample([svc], now=100.0)
    assert h.latest("web") is None  # one sample: no rate yet
    backend.responses[200] = 18
    backend.responses[502] = 2
    svc.local_responses[503] = 4
    for seconds in (0.1, 0.3):
        svc.observe(seconds)
    h.sample([svc], now=102.0)
    p = h.latest("web")
    assert p is not None and p.t == 102.0
    assert (p.requests, p.errors) == (12.0, 3.0)  # 24 responses, 6 of them 5xx, over 2 s
    assert p.latency is not None and abs(p.latency - 0.2) < 1e-9
    h.sample([svc], now=104.0)  # nothing happened
    p = h.latest("web")
    assert p is not None and (p.requests, p.errors, p.latency) == (0.0, 0.0, None)


def test_history_is_bounded_and_follows_the_services() -> None:
    web, api = state("web"), state("api")
    h = RateHistory(interval=1.0, window=5.0)
    for t in range(20):
        web.pool.by_key["127.0.0.1:9001"].responses[200] = t * 3
        h.sample([web, api], now=float(t))
    assert len(h.series("web")) == h.points == 5
    assert [p.requests for p in h.series("web")] == [3.0] * 5
    h.sample([web], now=20.0)  # api removed: its history goes
    assert h.series("api") == [] and h.latest("api") is None


def test_a_counter_that_went_down_is_a_fresh_start() -> None:
    before, after = Counters(100, 10, 100, 5.0), Counters(3, 0, 3, 0.1)
    p = rate_between(before, after, t=1.0, seconds=1.0)
    assert (p.requests, p.errors, p.latency) == (0.0, 0.0, None)


def test_polyline_puts_the_newest_point_at_the_right_edge() -> None:
    values: list[float | None] = [0.0, None, 5.0, 10.0]
    top = chart_scale(values)
    assert top == 10.0 and chart_scale([None, 0.0]) == 1.0
    pts = [tuple(map(float, p.split(","))) for p in polyline(values, 11, top).split()]
    assert pts[-1][0] == CHART_WIDTH and pts[-1][1] == 1.0  # the top
    assert pts[0][1] == pts[1][1] == CHART_HEIGHT - 1  # 0 and None at the bottom
    assert [x for x, _ in pts] == sorted(x for x, _ in pts)
    assert polyline([], 10, 1.0) == ""
