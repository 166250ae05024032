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


def test_each_replica_balances_over_its_deterministic_subset():
    from edgelb.ops.config import InstanceConfig
    from watchers.model import Policy

    specs = tuple(Backend("127.0.0.1", 9000 + i) for i in range(12))
    policy = Policy(subset=4)
    seen: dict[str, int] = {}
    for replica in range(3):
        p = Pool("least-loaded")
        inst = InstanceConfig(replica=replica, replicas=3)
        p.update(specs, "least-loaded", instance=inst, policy=policy)
        assert len(p.backends) == 4
        again = Pool("least-loaded")
        again.update(specs, "least-loaded", instance=inst, policy=policy)
        assert [b.key for b in again.backends] == [b.key for b in p.backends]  # deterministic
        for b in p.backends:
            seen[b.key] = seen.get(b.key, 0) + 1
    assert len(seen) == 12 and set(seen.values()) == {1}  # every backend in one subset


def test_zone_aware_pool_prefers_its_zone_until_it_is_loaded():
    from balancers.zones import prefer_zone
    from edgelb.ops.config import InstanceConfig
    from watchers.model import Policy

    specs = (
        Backend("127.0.0.1", 1, weight=2, zone="a"),
        Backend("127.0.0.1", 2, weight=2, zone="b"),
    )
    p = Pool("least-loaded")
    p.update(specs, "least-loaded", instance=InstanceConfig(zone="a"),
             policy=Policy(zone_aware=True, zone_threshold=1.0))
    assert p.keyed and p.zone == "a"
    local = p.by_key["127.0.0.1:1"]
    assert [b.key for b in prefer_zone(p.backends, p.zone, p.zone_threshold)] == [local.key]
    local.inflight = 2  # (2 + 1) / 2 > 1.0: the zone is full, spill to all
    assert len(prefer_zone(p.backends, p.zone, p.zone_threshold)) == 2
