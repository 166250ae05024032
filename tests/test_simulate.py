"""The balancing simulator (bench/simulate.py) is deterministic and its numbers are sane."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import simulate  # noqa: E402
from sim_policies import HaproxyLeastconn, always  # noqa: E402
from simulate import SCENARIO, BackendSpec, local_peak_ewma  # noqa: E402

import balancers  # noqa: E402


def run(policy_name: str, policy_seed: int = 5, **kw):
    return simulate.simulate(balancers.make(policy_name, random.Random(policy_seed)), **kw)


def test_same_seed_same_result_and_another_seed_differs() -> None:
    a = run("least-loaded", requests=4000, seed=3, load=0.8)
    b = run("least-loaded", requests=4000, seed=3, load=0.8)
    c = run("least-loaded", requests=4000, seed=4, load=0.8)
    assert a == b
    assert (a.p50, a.p99, a.share) != (c.p50, c.p99, c.share)
    closed1 = run("least-loaded", requests=3000, seed=3, clients=6)
    closed2 = run("least-loaded", requests=3000, seed=3, clients=6)
    assert closed1 == closed2


def test_single_backend_at_low_load_answers_in_its_service_time() -> None:
    spec = BackendSpec("only", capacity=4, service=0.020)
    r = run("least-loaded", specs=(spec,), requests=5000, load=0.1, seed=1)
    median = spec.service * math.exp(-simulate.SIGMA**2 / 2)  # lognormal median
    assert r.error_rate == 0.0
    assert r.share == {"only": 1.0}
    assert abs(r.p50 - median) < 0.1 * median, r
    assert r.p99 < 4 * spec.service
    # open loop: what comes out is what was offered (10% of 4 / 20 ms = 20 req/s)
    assert r.throughput == pytest.approx(0.1 * spec.rate, rel=0.1)


def test_always_the_degraded_backend_is_worse_than_least_loaded() -> None:
    kw = {"requests": 6000, "seed": 2, "load": 0.5}
    bad = simulate.simulate(always("c8-slow")(random.Random(1)), **kw)
    good = run("least-loaded", **kw)
    assert bad.share["c8-slow"] > 0.99
    assert bad.p99 > 2 * good.p99, (bad, good)


@pytest.mark.parametrize("name", sorted(simulate.policy_factories(candidates=False)))
def test_every_policy_runs_and_accounts_every_request(name: str) -> None:
    factory = simulate.policy_factories(candidates=False)[name]
    r = simulate.simulate(factory(random.Random(1)), requests=2000, seed=1, load=0.7)
    assert r.requests == 1900  # 5% warm-up is not measured
    assert 0.0 <= r.error_rate <= 1.0
    assert sum(r.share.values()) == pytest.approx(1.0)
    assert set(r.share) == {s.name for s in SCENARIO}
    assert r.p50 <= r.p99 <= r.p999
    # the failing backend answers errors only, so errors are exactly its share
    assert r.error_rate == pytest.approx(r.share["e4-fail"])


def test_proxy_cap_queues_at_the_proxy_and_keeps_backends_under_it() -> None:
    inner = balancers.make("least-loaded", random.Random(1))
    seen: list[int] = []

    class Watch:
        def reset(self, backends) -> None:
            inner.reset(backends)

        def pick(self, backends, key=None):
            b = inner.pick(backends, key)
            if b is not None:
                seen.append(b.inflight)
                assert b.inflight < b.cap
            return b

    spec = BackendSpec("only", capacity=2, service=0.010)
    r = simulate.simulate(Watch(), specs=(spec,), requests=3000, load=0.95, seed=1,
                          cap_factor=1.0)
    assert r.error_rate == 0.0 and r.requests == 2850
    assert max(seen) == 1  # the cap (2) was reached, so requests waited at the proxy


def test_peak_ewma_jumps_up_and_decays_down() -> None:
    assert local_peak_ewma(0.0, 0.0, 0.03, 5.0) == 0.03  # first sample taken as is
    assert local_peak_ewma(0.01, 1.0, 0.5, 1.001) == 0.5  # slower: at once
    decayed = local_peak_ewma(0.1, 2.0, 0.01, 12.0)  # one tau later: 1/e of the way left
    assert decayed == pytest.approx(0.01 + 0.09 / math.e)
    fn, source = simulate.pick_ewma()
    assert fn(0.1, 2.0, 0.01, 12.0) == pytest.approx(decayed), source


def test_haproxy_leastconn_takes_turns_among_equals() -> None:
    class B:
        def __init__(self, w: float) -> None:
            self.weight, self.inflight, self.latency, self.eligible = w, 0, 0.0, True

    pool = [B(1.0), B(1.0), B(1.0)]
    lc = HaproxyLeastconn(random.Random(1))
    assert [pool.index(lc.pick(pool)) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    pool[1].inflight = 1
    assert {pool.index(lc.pick(pool)) for _ in range(4)} == {0, 2}
