"""The balancing policies and their helpers, as pure functions of the figures they are given.

Property tests (hypothesis) over random pools; every random choice is seeded, so a failure
replays. Statistical bounds are several standard deviations wide.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import balancers
from balancers.ewma import ERROR_PENALTY, decayed, error_sample, peak_ewma
from balancers.hashing import ConsistentHash
from balancers.least_loaded import FULL_SCAN, LeastLoaded
from balancers.subset import auto_size, subset
from balancers.weights import effective_weight, slow_start_factor
from balancers.zones import prefer_zone

FAST = settings(max_examples=25, deadline=None)
SHARE_POLICIES = ["least-loaded", "peak-ewma", "round-robin", "hash"]  # hash: key None


@dataclass(eq=False)
class B:
    """A candidate as the proxy exposes it (plus the optional cap, zone and key)."""

    weight: float = 1.0
    inflight: int = 0
    latency: float = 0.01
    eligible: bool = True
    cap: int = 0
    zone: str = ""
    key: str = ""


def pool(weights: list[float], **kw: object) -> list[B]:
    return [B(weight=w, key=f"10.0.0.{i}:80", **kw) for i, w in enumerate(weights)]  # type: ignore[arg-type]


def make(name: str, seed: int = 1) -> balancers.Balancer:
    return balancers.make(name, random.Random(seed))


# -- registry -------------------------------------------------------------------------------


def test_registry_names_every_finished_policy() -> None:
    assert set(balancers.POLICIES) == {
        "least-loaded", "peak-ewma", "round-robin", "least-connections", "hash"}
    assert balancers.DEFAULT == "least-loaded"
    with pytest.raises(KeyError, match="least-loaded"):
        balancers.make("least-loded")


# -- shares, eligibility, starvation ----------------------------------------------------------


@FAST
@given(
    weights=st.lists(st.integers(1, 5), min_size=1, max_size=30),
    name=st.sampled_from(SHARE_POLICIES),
    seed=st.integers(0, 2**16),
)
def test_low_load_frequencies_follow_weight_shares(weights: list[int], name: str,
                                                    seed: int) -> None:
    backends = pool([float(w) for w in weights])
    policy = make(name, seed)
    policy.reset(backends)
    picks = 4000
    counts = Counter(id(policy.pick(backends)) for _ in range(picks))
    total = sum(weights)
    for b in backends:
        share = b.weight / total
        sd = math.sqrt(share * (1 - share) / picks)
        assert abs(counts[id(b)] / picks - share) <= 5 * sd + 0.005, (name, weights)


@FAST
@given(
    spec=st.lists(
        st.tuples(st.sampled_from([0.0, 0.5, 1.0, 3.0]), st.booleans(), st.integers(0, 20),
                  st.sampled_from([0.0, 0.005, 0.01, 0.2])),
        min_size=0, max_size=40),
    name=st.sampled_from(sorted(balancers.POLICIES)),
    seed=st.integers(0, 2**16),
)
def test_ineligible_or_weight_zero_never_picked(spec: list[tuple[float, bool, int, float]],
                                                name: str, seed: int) -> None:
    backends = [B(weight=w, eligible=e, inflight=k, latency=lat, key=f"b{i}")
                for i, (w, e, k, lat) in enumerate(spec)]
    usable = [b for b in backends if b.eligible and b.weight > 0]
    policy = make(name, seed)
    policy.reset(backends)
    rng = random.Random(seed)
    for i in range(200):
        key = None if i % 2 else rng.randbytes(6)
        got = policy.pick(backends, key)
        if not usable:
            assert got is None
        else:
            assert got is not None and got.eligible and got.weight > 0


def serve(policy: balancers.Balancer, backends: list[B], requests: int, concurrency: int,
          service: dict[int, float], seed: int = 0) -> Counter[int]:
    """Closed loop on a virtual clock: `concurrency` clients, each sends its next request when
    the previous one completes; backend i serves in service[id] seconds (x jitter). Returns
    picks per backend (by id)."""
    rng = random.Random(seed)
    counts: Counter[int] = Counter()
    done: list[tuple[float, int, B]] = []
    now = 0.0
    seq = 0
    for _ in range(requests):
        while len(done) >= concurrency:
            now, _, b = heapq.heappop(done)
            b.inflight -= 1
        b = policy.pick(backends)
        assert b is not None
        counts[id(b)] += 1
        b.inflight += 1
        seq += 1
        heapq.heappush(done, (now + service[id(b)] * rng.uniform(0.8, 1.2), seq, b))
    return counts


@FAST
@given(
    spec=st.lists(st.tuples(st.integers(1, 4), st.booleans()), min_size=1, max_size=20),
    # (not least-connections: HAProxy's leastconn, at concurrency 1, always picks the heaviest)
    name=st.sampled_from(["least-loaded", "peak-ewma", "round-robin"]),
    concurrency=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_no_eligible_backend_starved(spec: list[tuple[int, bool]], name: str, concurrency: int,
                                     seed: int) -> None:
    # equal latencies, some backends new (latency unknown): all must get traffic
    backends = [B(weight=float(w), latency=0.0 if new else 0.01, key=f"b{i}")
                for i, (w, new) in enumerate(spec)]
    policy = make(name, seed)
    policy.reset(backends)
    counts = serve(policy, backends, 3000, concurrency, {id(b): 0.01 for b in backends}, seed)
    starved = [b for b in backends if counts[id(b)] == 0]
    assert not starved, (name, spec, concurrency)


@pytest.mark.parametrize("n", [4, 24])
def test_least_loaded_avoids_degraded_backend_but_probes_it(n: int) -> None:
    backends = pool([1.0] * n)
    slow = backends[-1]
    slow.latency = 0.06  # degraded: 6x
    service = {id(b): b.latency for b in backends}
    concurrency = 2 * n
    fair = 1 / n
    shares = {}
    for name in ("least-loaded", "round-robin", "least-connections"):
        for b in backends:
            b.inflight = 0
        policy = make(name, 3)
        policy.reset(backends)
        counts = serve(policy, backends, 20000, concurrency, service)
        shares[name] = counts[id(slow)] / 20000
    assert shares["least-loaded"] > 0, "the degraded backend was never probed"
    assert shares["least-loaded"] < fair / 4, shares
    assert shares["least-loaded"] < shares["least-connections"] / 2, shares
    assert shares["round-robin"] > fair * 0.9, shares


def test_least_loaded_cost_does_not_undervalue_an_idle_slow_heavy_backend() -> None:
    # the trap: rtt * (inflight + 1) / weight would send to the idle, heavy, 6x slower one
    fast = B(weight=1.0, latency=0.01, inflight=1)
    slow = B(weight=8.0, latency=0.06, inflight=0)
    policy = LeastLoaded(random.Random(1), probe=0.0)
    assert all(policy.pick([fast, slow]) is fast for _ in range(100))


def test_least_loaded_treats_near_equal_latencies_as_ties() -> None:
    # sub-millisecond noise must not send all low-load traffic to one backend
    a = B(latency=0.00030)
    b = B(latency=0.00036)
    c = B(latency=0.00200)  # clearly slower: avoided
    policy = LeastLoaded(random.Random(1), probe=0.0)
    counts = Counter(id(policy.pick([a, b, c])) for _ in range(2000))
    assert 800 < counts[id(a)] < 1200 and counts[id(c)] == 0


def test_least_loaded_respects_cap_as_capacity() -> None:
    # heavy A has room for a second request by weight, but a cap of 1 says it is full
    a = B(weight=10.0, latency=0.01, inflight=1)
    b = B(weight=1.0, latency=0.015, inflight=0)
    policy = LeastLoaded(random.Random(1), probe=0.0)
    assert all(policy.pick([a, b]) is a for _ in range(50))
    a.cap = 1  # cost 0.01 * 2 / 1 > 0.015
    assert all(policy.pick([a, b]) is b for _ in range(50))


def test_least_loaded_share_mode_is_scale_free() -> None:
    rng = random.Random(4)
    for _ in range(200):
        backends = pool([float(rng.randint(1, 8)) for _ in range(5)])
        for b in backends:
            b.inflight = rng.randint(0, 10)
            b.latency = rng.choice([0.01, 0.02, 0.06])
        scaled = [B(weight=b.weight * 16, inflight=b.inflight, latency=b.latency)
                  for b in backends]
        one = LeastLoaded(random.Random(1), probe=0.0, share=True).pick(backends)
        two = LeastLoaded(random.Random(1), probe=0.0, share=True).pick(scaled)
        assert one is not None and two is not None
        assert backends.index(one) == scaled.index(two)


def test_new_backend_is_probed_not_flooded() -> None:
    backends = [*pool([1.0] * 3), B(weight=1.0, latency=0.0, key="new")]
    new = backends[-1]
    service = {id(b): 0.01 for b in backends}
    counts = serve(make("least-loaded"), backends, 4000, 8, service)
    assert 0.1 < counts[id(new)] / 4000 < 0.45


def test_p2c_follows_weight_changes_without_reset() -> None:
    backends = pool([1.0] * 40)
    policy = make("least-loaded", 5)
    policy.reset(backends)
    for _ in range(500):
        policy.pick(backends)
    for b in backends[:20]:
        b.weight = 4.0  # e.g. slow start ended for half of the pool
    for _ in range(200):  # let the amortised rebuild notice
        policy.pick(backends)
    counts = Counter(id(policy.pick(backends)) for _ in range(8000))
    heavy = sum(counts[id(b)] for b in backends[:20]) / 8000
    assert abs(heavy - 0.8) < 0.04


def test_p2c_scans_when_sampling_finds_nothing_eligible() -> None:
    backends = pool([1.0] * 200)
    for b in backends[:-1]:
        b.eligible = False
    policy = make("least-loaded")
    assert all(policy.pick(backends) is backends[-1] for _ in range(50))
    assert len(backends) > FULL_SCAN


def test_peak_ewma_is_finagle_load() -> None:
    # cost = latency * (inflight + 1): 0.01 * 7 > 0.06 * 1, so the slow idle one wins
    fast = B(latency=0.01, inflight=6)
    slow = B(latency=0.06, inflight=0)
    policy = make("peak-ewma")
    policy.probe = 0.0  # type: ignore[attr-defined]
    assert policy.pick([fast, slow]) is slow
    fast.inflight = 4
    assert policy.pick([fast, slow]) is fast


# -- round robin, least connections -----------------------------------------------------------


def test_smooth_weighted_round_robin_sequence() -> None:
    a, b, c = pool([5.0, 1.0, 1.0])
    policy = make("round-robin")
    names = {id(a): "a", id(b): "b", id(c): "c"}
    seq = "".join(names[id(policy.pick([a, b, c]))] for _ in range(7))
    assert seq == "aabacaa"


def test_least_connections_lowest_load_per_weight_and_rotates_among_equals() -> None:
    a, b, c = pool([1.0, 1.0, 2.0])
    a.inflight, b.inflight, c.inflight = 1, 1, 3  # loads (k+1)/w: 2, 2, 2
    policy = make("least-connections")
    picked = [policy.pick([a, b, c]) for _ in range(6)]
    assert {id(p) for p in picked} == {id(a), id(b), id(c)}
    c.inflight = 2  # now 1.5: c alone
    assert all(policy.pick([a, b, c]) is c for _ in range(5))


# -- consistent hashing -----------------------------------------------------------------------


def mapping(policy: balancers.Balancer, backends: list[B], keys: list[bytes]) -> list[str]:
    out = []
    for k in keys:
        b = policy.pick(backends, k)
        assert b is not None
        out.append(b.key)
    return out


@FAST
@given(n=st.integers(2, 40), seed=st.integers(0, 2**16), remove=st.booleans())
def test_hash_moves_about_one_nth_of_keys(n: int, seed: int, remove: bool) -> None:
    rng = random.Random(seed)
    keys = [rng.randbytes(8) for _ in range(1500)]
    backends = pool([1.0] * n)
    policy = make("hash", seed)
    policy.reset(backends)
    before = mapping(policy, backends, keys)
    assert mapping(policy, backends, keys) == before  # stable when nothing changes
    other = make("hash", seed + 1)  # another replica: the same ring
    other.reset(backends)
    assert mapping(other, backends, keys) == before
    if remove:
        gone = backends.pop(rng.randrange(n))
        changed = backends
        moved_ok = lambda old, new: old == gone.key  # noqa: E731
        m = n
    else:
        changed = [*backends, B(key="10.0.1.1:80")]
        moved_ok = lambda old, new: new == "10.0.1.1:80"  # noqa: E731
        m = n + 1
    policy.reset(changed)
    after = mapping(policy, changed, keys)
    moved = [(o, a) for o, a in zip(before, after, strict=True) if o != a]
    assert all(moved_ok(o, a) for o, a in moved)  # only keys of the changed backend move
    assert len(moved) / len(keys) <= 1.6 / m + 0.03


def test_hash_skips_ineligible_deterministically() -> None:
    rng = random.Random(2)
    keys = [rng.randbytes(8) for _ in range(2000)]
    backends = pool([1.0, 2.0, 1.0, 1.0, 3.0])
    policy = make("hash")
    before = mapping(policy, backends, keys)
    backends[1].eligible = False
    after = mapping(policy, backends, keys)
    assert mapping(policy, backends, keys) == after
    for old, new in zip(before, after, strict=True):
        assert new != backends[1].key
        if old != backends[1].key:
            assert new == old
    weight_share = Counter(before)[backends[4].key] / len(keys)
    assert abs(weight_share - 3 / 8) < 0.1


def test_hash_follows_weight_steps_without_reset_and_ignores_jitter() -> None:
    rng = random.Random(3)
    keys = [rng.randbytes(8) for _ in range(3000)]
    backends = pool([1.0] * 6)
    policy = make("hash")
    before = mapping(policy, backends, keys)
    backends[0].weight = 1.0 - 1e-9  # below a point-count step: nothing moves
    for _ in range(100):
        policy.pick(backends, rng.randbytes(8))
    assert mapping(policy, backends, keys) == before
    backends[0].weight = 0.5  # half the points: only its keys move, to others
    for _ in range(100):
        policy.pick(backends, rng.randbytes(8))
    after = mapping(policy, backends, keys)
    moved = [(o, a) for o, a in zip(before, after, strict=True) if o != a]
    assert moved and all(o == backends[0].key for o, _ in moved)
    assert 0.3 < Counter(after)[backends[0].key] / Counter(before)[backends[0].key] < 0.7


def test_hash_without_key_balances_by_load() -> None:
    a, b = pool([1.0, 1.0])
    a.inflight = 5
    policy = ConsistentHash(random.Random(1))
    assert policy.pick([a, b]) is b


# -- subsetting -------------------------------------------------------------------------------


@FAST
@given(n=st.integers(1, 150), replicas=st.integers(1, 40),
       size=st.one_of(st.none(), st.integers(1, 60)), seed=st.integers(0, 2**16))
def test_subsets_are_balanced_distinct_and_deterministic(n: int, replicas: int,
                                                         size: int | None, seed: int) -> None:
    keys = [f"10.1.{i // 250}.{i % 250}:8080" for i in range(n)]
    want = min(n, size if size is not None else auto_size(n, replicas))
    counts: Counter[str] = Counter()
    shuffled = keys[:]
    random.Random(seed).shuffle(shuffled)
    for ordinal in range(replicas):
        s = subset(keys, ordinal, replicas, size)
        assert len(s) == len(set(s)) == want
        assert s == subset(shuffled, ordinal, replicas, size)  # input order does not matter
        counts.update(s)
    per_backend = [counts[k] for k in keys]
    assert max(per_backend) - min(per_backend) <= 1


def test_subset_auto_size() -> None:
    assert auto_size(100, 10) == 30
    assert auto_size(100, 50) == 12
    assert auto_size(5, 3) == 5
    assert len(subset([f"k{i}" for i in range(100)], 0, 50)) == 12


@pytest.mark.parametrize(("n", "replicas", "size"), [(100, 10, 12), (300, 7, 20), (60, 4, 12)])
def test_subset_membership_change_moves_few(n: int, replicas: int, size: int) -> None:
    keys = [f"k{i}" for i in range(n)]
    for changed in (keys[:17] + keys[18:], [*keys, "new"]):
        diffs = [len(set(subset(keys, o, replicas, size)) ^ set(subset(changed, o, replicas,
                                                                          size)))
                 for o in range(replicas)]
        assert sum(diffs) / replicas <= 4, diffs


def test_subset_rejects_bad_ordinal() -> None:
    with pytest.raises(ValueError, match=r"ordinal 3 is outside 0\.\.2"):
        subset(["a"], 3, 3)


# -- zones ------------------------------------------------------------------------------------


def test_prefer_zone_keeps_in_zone_until_threshold_then_spills() -> None:
    a = B(weight=2.0, zone="z1", cap=4)
    b = B(weight=2.0, zone="z1", eligible=False)
    c = B(weight=2.0, zone="z2")
    backends = [a, b, c]
    assert list(prefer_zone(backends, "z1", 0.8)) == [a]
    a.inflight = 3  # (3 + 1) / 4 > 0.8
    assert prefer_zone(backends, "z1", 0.8) is backends
    assert prefer_zone(backends, "", 0.8) is backends
    assert prefer_zone(backends, "z9", 0.8) is backends


# -- slow start and peak EWMA -----------------------------------------------------------------


def test_slow_start_ramps_linearly_from_ten_percent() -> None:
    assert slow_start_factor(0.0) == pytest.approx(0.1)
    assert slow_start_factor(15.0) == pytest.approx(0.55)
    assert slow_start_factor(30.0) == 1.0
    assert slow_start_factor(99.0, 0.0) == 1.0
    assert slow_start_factor(-5.0, 10.0) == pytest.approx(0.1)
    ages = [i * 0.5 for i in range(70)]
    factors = [slow_start_factor(t, 30.0) for t in ages]
    assert factors == sorted(factors)
    assert effective_weight(4.0, 10.0, 20.0) == pytest.approx(4.0 * 0.55)
    assert effective_weight(0.0, 100.0) == 0.0


def test_peak_ewma_jumps_up_and_decays() -> None:
    assert peak_ewma(0.0, 0.0, 0.02, 5.0) == 0.02  # unknown: take the sample
    assert peak_ewma(0.01, 0.0, 0.05, 0.1) == 0.05  # slower: jump at once
    w = math.exp(-1.0)
    assert peak_ewma(0.1, 0.0, 0.01, 10.0, tau=10.0) == pytest.approx(0.1 * w + 0.01 * (1 - w))
    assert peak_ewma(0.1, 5.0, 0.01, 5.0) == 0.1  # no time passed: no decay
    est, t = 0.5, 0.0
    for _ in range(100):  # a recovered backend earns its estimate back within a few tau
        t += 1.0
        est = peak_ewma(est, t - 1.0, 0.01, t)
    assert est < 0.011
    assert error_sample(0.001) == ERROR_PENALTY
    assert error_sample(3.0) == 3.0
    assert decayed(0.5, 0.0, 10.0, 0.01) == pytest.approx(0.5 * w + 0.01 * (1 - w))


def test_hash_bounded_load_spills_a_hot_key_and_keeps_it_home_at_low_load():
    import random as _random

    from balancers.hashing import ConsistentHash

    class C:
        def __init__(self, key: str) -> None:
            self.key, self.weight, self.inflight = key, 1.0, 0
            self.latency, self.eligible = 0.0, True

    pool = [C(f"10.0.0.{i}:80") for i in range(4)]
    h = ConsistentHash(_random.Random(3))
    home = h.pick(pool, b"hot")
    assert all(h.pick(pool, b"hot") is home for _ in range(20))  # idle: the key stays home
    home.inflight = 10  # the hot key has piled up on its backend
    other = h.pick(pool, b"hot")
    assert other is not home  # past 1.25x its share: the walk goes on clockwise
    assert h.pick(pool, b"hot") is other  # deterministic
