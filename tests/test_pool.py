"""Pool: in-place updates, draining, and slow start of backends added to a running pool."""

from __future__ import annotations

import random

from edgelb.pool import Pool
from watchers.model import Backend

A, B, C = Backend("127.0.0.1", 1, weight=4), Backend("127.0.0.1", 2, weight=4), Backend(
    "127.0.0.1", 3, weight=4
)


def pool(*specs: Backend) -> Pool:
    p = Pool("least-loaded", random.Random(1))
    p.update(specs, "least-loaded", now=100.0, slow_start=30.0)
    return p


def test_first_backends_of_a_pool_start_at_full_weight():
    p = pool(A, B)
    assert [b.weight for b in p.backends] == [4, 4]
    assert p.ramping == 0


def test_an_added_backend_ramps_from_ten_percent_to_full_over_the_window():
    p = pool(A, B)
    p.update((A, B, C), "least-loaded", now=200.0, slow_start=30.0)
    c = p.by_key[C.key]
    assert c.weight == 0.4 and c.ramp_start == 200.0 and p.ramping == 1
    assert p.by_key[A.key].weight == 4  # the others are untouched
    p.ramp(215.0, 30.0)
    assert 0.4 < c.weight < 4 and abs(c.weight - 4 * (0.1 + 0.9 * 0.5)) < 1e-9
    p.ramp(230.0, 30.0)
    assert c.weight == 4 and c.ramp_start == 0.0 and p.ramping == 0


def test_a_ramping_backend_is_picked_less_often():
    p = pool(A, B)
    p.update((A, B, C), "least-loaded", now=200.0, slow_start=30.0)
    counts = {k: 0 for k in p.by_key}
    for _ in range(3000):
        counts[p.pick().key] += 1  # type: ignore[union-attr]
    assert counts[C.key] < counts[A.key] / 3


def test_no_slow_start_without_a_window_or_a_clock():
    p = pool(A)
    p.update((A, B), "least-loaded", now=200.0, slow_start=0.0)
    assert p.by_key[B.key].weight == 4
    q = Pool("least-loaded")
    q.update((A,), "least-loaded")
    q.update((A, B), "least-loaded")
    assert q.by_key[B.key].weight == 4


def test_a_kept_backend_keeps_its_state_and_a_weight_change_applies():
    p = pool(A, B)
    a = p.by_key[A.key]
    a.requests = 7
    heavier = Backend("127.0.0.1", 1, weight=8)
    p.update((heavier, B), "least-loaded", now=300.0, slow_start=30.0)
    assert p.by_key[A.key] is a and a.requests == 7 and a.weight == 8
