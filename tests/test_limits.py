"""The adaptive concurrency limit (balancers.limits.GradientLimit), driven by a simulated backend.

The backend has capacity C: it serves up to C requests at full speed and shares itself among
more (processor sharing), so at concurrency n a request of work w takes w * max(1, n / C).
A closed loop of N >> C clients keeps it busy; the proxy lets at most `limit` requests through
and holds the rest. Time is virtual (an event loop over completions): no sleeping, seeded.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancers import limits
from balancers.limits import GradientLimit

BASE = 0.02  # seconds: a request's work at no load


@dataclass
class Run:
    changes: list[tuple[float, int]]  # (time, limit) at the start and at every change
    busy: float  # share of the time the backend had at least C requests (was fully used)
    served: int

    def limit_at(self, t: float) -> int:
        last = self.changes[0][1]
        for when, limit in self.changes:
            if when > t:
                break
            last = limit
        return last

    def time_at(self, t0: float, t1: float) -> dict[int, float]:
        """Seconds spent at each limit within [t0, t1)."""
        spans: dict[int, float] = {}
        points = [*self.changes, (math.inf, 0)]
        for (start, limit), (end, _) in itertools.pairwise(points):
            lo, hi = max(start, t0), min(end, t1)
            if hi > lo:
                spans[limit] = spans.get(limit, 0.0) + hi - lo
        return spans

    def quantiles(self, t0: float, t1: float, qs: tuple[float, ...]) -> list[int]:
        """Time-weighted quantiles of the limit over [t0, t1)."""
        return quantiles(self.time_at(t0, t1), qs)


def quantiles(spans: dict[int, float], qs: tuple[float, ...]) -> list[int]:
    total = sum(spans.values())
    out = []
    for q in qs:
        acc = 0.0
        for limit in sorted(spans):
            acc += spans[limit]
            if acc >= q * total:
                out.append(limit)
                break
    return out


def simulate(
    capacity: int | Callable[[float], int],
    clients: int,
    duration: float,
    *,
    base: float | Callable[[float], float] = BASE,
    initial: int = 20,
    max_limit: int = 1000,
    noise: bool = False,
    seed: int = 1,
    count_self: bool = True,
) -> Run:
    """Run the closed loop for `duration` virtual seconds. `capacity` and `base` may change
    with time (a function of it). `noise`: exponential work (mean `base`) instead of fixed."""
    cap_at = capacity if callable(capacity) else (lambda _t: capacity)
    base_at = base if callable(base) else (lambda _t: base)
    rng = random.Random(seed)
    lim = GradientLimit(initial, 1, max_limit, rng=random.Random(seed))
    t = 0.0
    attained = 0.0  # service every request in flight has received so far (processor sharing)
    inflight: list[tuple[float, float]] = []  # heap of (attained at which it is done, start)
    waiting = clients
    changes = [(0.0, lim.limit)]
    busy = 0.0
    served = 0

    def dispatch() -> None:
        nonlocal waiting
        while waiting and len(inflight) < lim.limit:
            waiting -= 1
            w = base_at(t) * (rng.expovariate(1.0) if noise else 1.0)
            heapq.heappush(inflight, (attained + w, t))

    dispatch()
    while t < duration:
        n = len(inflight)
        c = cap_at(t)
        rate = 1.0 if n <= c else c / n
        done, started = inflight[0]
        dt = (done - attained) / rate
        if n >= c:
            busy += dt
        t += dt
        attained = done
        heapq.heappop(inflight)
        served += 1
        changed = lim.sample(t - started, t, n if count_self else n - 1)
        waiting += 1  # the client sends its next request at once
        if changed:
            changes.append((t, lim.limit))
        dispatch()
    return Run(changes, busy / t, served)


# -- settling -------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [2, 8, 32])
def test_settles_between_capacity_and_twice_it(capacity: int) -> None:
    run = simulate(capacity, clients=10 * capacity + 20, duration=60.0)
    p10, p50, p90 = run.quantiles(10.0, 60.0, (0.1, 0.5, 0.9))
    # measured: C=2 -> 4, C=8 -> 16, C=32 -> 55 (the gradient settles where the latency is
    # TOLERANCE x baseline plus the queue allowance); probes dip below C for a window or two
    assert capacity <= p10 and p90 <= 2 * capacity, (p10, p50, p90)
    assert run.busy > 0.95  # and the backend is kept fully used


@pytest.mark.parametrize("capacity", [2, 8, 32])
def test_settles_with_noisy_service_times(capacity: int) -> None:
    """Exponential work (as noisy as service times get): pooled over four seeds, the limit
    spends at least 3/4 of the time at or above C and at least 3/4 at or below 3C."""
    pooled: dict[int, float] = {}
    for seed in range(1, 5):
        run = simulate(
            capacity, clients=10 * capacity + 20, duration=60.0, base=0.05, noise=True, seed=seed
        )
        assert run.busy > 0.9
        for limit, seconds in run.time_at(10.0, 60.0).items():
            pooled[limit] = pooled.get(limit, 0.0) + seconds
    p25, p50, p75 = quantiles(pooled, (0.25, 0.5, 0.75))
    # measured (quartiles): C=2 -> 3/4/4, C=8 -> 13/15/18, C=32 -> 41/45/53
    assert capacity <= p25 and p75 <= 3 * capacity, (p25, p50, p75)
    assert 1.2 * capacity <= p50 <= 2.2 * capacity, (p25, p50, p75)


def test_either_inflight_convention_settles_the_same() -> None:
    a = simulate(8, clients=100, duration=30.0, count_self=True)
    b = simulate(8, clients=100, duration=30.0, count_self=False)
    assert a.quantiles(10.0, 30.0, (0.5,)) == b.quantiles(10.0, 30.0, (0.5,)) == [16]


def test_does_not_drift_up_under_sustained_overload() -> None:
    """Ten minutes at 10x capacity: the baseline must not creep up with the queue."""
    run = simulate(8, clients=100, duration=600.0, base=0.05, noise=True, seed=7)
    for t0 in (60.0, 300.0, 500.0):
        (p50,) = run.quantiles(t0, t0 + 100.0, (0.5,))
        assert 8 <= p50 <= 2.2 * 8, (t0, p50)


@pytest.mark.parametrize("initial", [1, 1000])
def test_any_start_converges(initial: int) -> None:
    """A start far too high (the first baseline is then all queue) or at the floor."""
    run = simulate(8, clients=100, duration=20.0, initial=initial, max_limit=1000)
    lo, hi = run.quantiles(5.0, 20.0, (0.1, 0.9))
    assert 8 <= lo and hi <= 16


# -- reacting -------------------------------------------------------------------------------


def test_latency_step_up_drops_the_limit_and_it_recovers() -> None:
    """Every request gets 3x slower from t=20 to t=40: the gradient cannot tell that from
    overload, so the limit drops within a few windows; at the floor it re-measures the
    baseline and climbs back; when the latency returns to normal it settles again."""
    slow = 3 * BASE
    run = simulate(8, clients=100, duration=60.0, base=lambda t: slow if 20 <= t < 40 else BASE)
    before = run.limit_at(19.9)
    assert before == 16
    # windows last >= 0.1 s (2 x the mean latency, here 0.12 s and more): within about five
    # of them the limit is halved
    assert run.limit_at(21.0) <= before // 2
    lo, hi = run.quantiles(30.0, 40.0, (0.1, 0.9))  # recovered at the new latency
    assert 8 <= lo and hi <= 16
    assert run.limit_at(40.0) >= 8
    lo, hi = run.quantiles(42.0, 60.0, (0.1, 0.9))  # and back at the old one
    assert 8 <= lo and hi <= 16


def test_capacity_loss_drops_the_limit_and_recovery_raises_it() -> None:
    """The backend's capacity falls from 16 to 4 (latency up at the same concurrency)."""
    run = simulate(lambda t: 4 if 20 <= t < 40 else 16, clients=200, duration=60.0)
    before = run.limit_at(19.9)
    assert 16 <= before <= 32
    assert run.limit_at(21.0) <= before // 2
    assert run.limit_at(22.0) <= 8
    lo, hi = run.quantiles(25.0, 40.0, (0.1, 0.9))
    assert 4 <= lo and hi <= 8
    assert run.limit_at(42.0) >= 16  # capacity is back: the limit follows within 2 s
    lo, hi = run.quantiles(45.0, 60.0, (0.1, 0.9))
    assert 16 <= lo and hi <= 32


def test_app_limited_traffic_does_not_inflate_the_limit() -> None:
    """Four clients on a backend of 32: the limit may not grow far past what is used."""
    for noise in (False, True):
        run = simulate(32, clients=4, duration=60.0, initial=2, noise=noise)
        assert max(limit for _, limit in run.changes) <= 4 + 2


def test_failures_halve_at_most_once_per_window() -> None:
    lim = GradientLimit(40, min_limit=3, max_limit=100)
    assert lim.failure(10.0) is True
    assert lim.limit == 20
    assert lim.failure(10.01) is False  # the same burst
    assert lim.limit == 20
    assert lim.failure(10.5) is True
    assert lim.limit == 10
    for i in range(10):
        lim.failure(11.0 + i)
    assert lim.limit == 3  # bounded by min_limit
    assert lim.failure(30.0) is False  # nothing left to cut


def probe_starts(lim: GradientLimit, seconds: float) -> list[float]:
    """Feed a steady backend (10 ms, always at the cap) and note when the limit halves."""
    starts = []
    t = 0.0
    while t < seconds:
        t += 0.001
        before = lim.limit
        if lim.sample(0.01, t, lim.limit) and lim.limit <= before // 2:
            starts.append(round(t, 3))
    return starts


def test_probes_are_periodic_and_jittered_by_the_rng() -> None:
    plain = probe_starts(GradientLimit(20, 1, 50), 200.0)
    gaps = [b - a for a, b in itertools.pairwise(plain)]
    assert len(plain) >= 6
    assert all(limits.PROBE_INTERVAL <= g < limits.PROBE_INTERVAL + 2.0 for g in gaps), gaps
    a = probe_starts(GradientLimit(20, 1, 50, rng=random.Random(1)), 200.0)
    b = probe_starts(GradientLimit(20, 1, 50, rng=random.Random(2)), 200.0)
    assert a[0] == b[0]  # the first probe comes a few windows after the start
    assert a[1:] != b[1:]  # then each backend keeps its own schedule
    top = limits.PROBE_INTERVAL * (1 + limits.PROBE_JITTER) + 2.0
    assert all(limits.PROBE_INTERVAL <= y - x < top for x, y in itertools.pairwise(a))


def test_a_failure_during_a_probe_lowers_where_it_resumes() -> None:
    lim = GradientLimit(40, 1, 40)
    t = 0.0
    while lim.limit == 40:  # the first probe starts after a few windows
        t += 0.001
        lim.sample(0.01, t, lim.limit)
    assert lim.limit == 20
    assert lim.failure(t) is False  # already low: nothing to cut now
    steps = [20]
    for _ in range(1000):  # a second: the probe ends, then the gradient grows it
        t += 0.001
        if lim.sample(0.01, t, lim.limit):
            steps.append(lim.limit)
    # it resumed at 40 x 0.5 (no jump back to 40), then grew a window at a time
    assert all(b - a <= 3 for a, b in itertools.pairwise(steps)), steps
    assert steps[-1] > 20


# -- bounds and garbage ---------------------------------------------------------------------

ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
EVENT = st.one_of(
    st.tuples(st.just("sample"), ANY_FLOAT, ANY_FLOAT, st.integers(-(2**40), 2**40)),
    st.tuples(st.just("sample"), st.floats(0, 10), st.floats(0, 1e4), st.integers(0, 2000)),
    st.tuples(st.just("failure"), ANY_FLOAT),
)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 50),
    st.integers(0, 2000),
    st.integers(0, 3000),
    st.lists(EVENT, max_size=300),
)
def test_limit_stays_an_int_within_bounds(
    lo: int, span: int, initial: int, events: list[tuple]
) -> None:
    hi = lo + span
    lim = GradientLimit(initial, min_limit=lo, max_limit=hi, rng=random.Random(0))
    assert lo <= lim.limit <= hi
    for ev in events:
        before = lim.limit
        if ev[0] == "sample":
            changed = lim.sample(ev[1], ev[2], ev[3])
        else:
            changed = lim.failure(ev[1])
        assert type(lim.limit) is int
        assert lo <= lim.limit <= hi
        assert changed == (lim.limit != before)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(0.0, 1e300), min_size=1, max_size=50),
    st.lists(st.floats(-1e9, 1e9), min_size=1, max_size=50),
)
def test_extreme_and_backwards_clocks_still_close_windows(
    rtts: list[float], times: list[float]
) -> None:
    """Huge latencies, zero latencies, a clock that jumps back: the limit keeps adapting
    (windows still close, by count) and stays in bounds."""
    lim = GradientLimit(50, 1, 100)
    for i in range(limits.MAX_SAMPLES + 1):
        lim.sample(rtts[i % len(rtts)], times[i % len(times)], 50)
    assert 1 <= lim.limit <= 100


def test_garbage_window_is_dropped_not_applied() -> None:
    lim = GradientLimit(10, 1, 100)
    for i in range(limits.MIN_SAMPLES):
        lim.sample(0.01, i * 0.01, 10)  # the first window: a baseline
    limit = lim.limit
    for k, rtt in enumerate((math.nan, math.inf, -1.0)):
        for i in range(limits.MIN_SAMPLES):  # one window each
            assert lim.sample(rtt, 10.0 * k + 1.0 + i, 10) is False
    assert lim.limit == limit
    for i in range(limits.MIN_SAMPLES):  # while a window of 10x the baseline is applied
        lim.sample(0.1, 40.0 + i, 10)
    assert lim.limit < limit


def test_bad_bounds_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="min_limit must be >= 1"):
        GradientLimit(10, min_limit=0)
    with pytest.raises(ValueError, match=r"max_limit \(2\) must be >= min_limit \(5\)"):
        GradientLimit(10, min_limit=5, max_limit=2)
    assert GradientLimit(5000, 1, 100).limit == 100
    assert GradientLimit(-3, 2, 100).limit == 2


# -- cost -----------------------------------------------------------------------------------


def test_sample_is_cheap_and_allocates_nothing_lasting() -> None:
    lim = GradientLimit(20, 1, 1000)
    assert not hasattr(lim, "__dict__")
    rng = random.Random(1)
    rtts = [0.01 + 0.01 * rng.random() for _ in range(1000)]
    for i in range(20_000):  # warm up: windows closed, probes done
        lim.sample(rtts[i % 1000], i * 1e-3, 20)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000, 120_000):
            lim.sample(rtts[i % 1000], i * 1e-3, 20)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 1024  # no per-sample (or per-window) structure kept
