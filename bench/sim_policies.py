"""Policies that exist only inside the simulator: emulations of HAProxy's `leastconn` and
`roundrobin`, plain random, and candidate least-loaded cost formulas tried before one is
proposed for balancers/least_loaded.py. They follow the same interface as balancers.Balancer
(`pick(backends, key)`, `reset(backends)`) but do not depend on it."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any


class SimPolicy:
    name = ""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def reset(self, backends: Sequence[Any]) -> None:
        """Nothing to forget by default."""

    def pick(self, backends: Sequence[Any], key: bytes | None = None) -> Any:
        raise NotImplementedError


class HaproxyLeastconn(SimPolicy):
    """HAProxy `balance leastconn`: lowest (inflight + 1) / weight; equals take turns."""

    name = "haproxy-leastconn"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._last = -1

    def pick(self, backends: Sequence[Any], key: bytes | None = None) -> Any:
        n = len(backends)
        best = None
        best_i = -1
        best_load = 0.0
        # walk the ring starting after the last pick, so that equals are served in turn
        for step in range(1, n + 1):
            i = (self._last + step) % n
            b = backends[i]
            if not b.eligible:
                continue
            load = (b.inflight + 1) / b.weight
            if best is None or load < best_load:
                best, best_i, best_load = b, i, load
        if best is not None:
            self._last = best_i
        return best


class HaproxyRoundrobin(SimPolicy):
    """HAProxy `balance roundrobin` with static weights: smooth weighted round robin."""

    name = "haproxy-roundrobin"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._current: dict[int, float] = {}

    def pick(self, backends: Sequence[Any], key: bytes | None = None) -> Any:
        total = 0.0
        best = None
        best_v = 0.0
        for b in backends:
            if not b.eligible:
                continue
            v = self._current.get(id(b), 0.0) + b.weight
            self._current[id(b)] = v
            total += b.weight
            if best is None or v > best_v:
                best, best_v = b, v
        if best is not None:
            self._current[id(best)] = best_v - total
        return best


class UniformRandom(SimPolicy):
    """Any eligible backend, uniformly, blind to weight and load."""

    name = "random"

    def pick(self, backends: Sequence[Any], key: bytes | None = None) -> Any:
        eligible = [b for b in backends if b.eligible]
        return self.rng.choice(eligible) if eligible else None


class AlwaysNamed(SimPolicy):
    """Deliberately bad: always the backend called `target` while it is eligible (the tests
    point it at the degraded one), else the first eligible."""

    name = "always-named"
    target = ""

    def pick(self, backends: Sequence[Any], key: bytes | None = None) -> Any:
        first = None
        for b in backends:
            if b.eligible:
                if b.name == self.target:
                    return b
                if first is None:
                    first = b
        return first


def always(target: str) -> type[AlwaysNamed]:
    return type("Always", (AlwaysNamed,), {"name": f"always-{target}", "target": target})


Cost = Callable[[float, int, float, int], float]  # (latency, inflight, weight, cap) -> cost


class CostPolicy(SimPolicy):
    """Least cost over a full scan (pools here are small), ties broken by weight. A backend
    with no latency history is charged the mean estimate of those that have one."""

    name = ""
    cost: Cost

    def pick(self, backends: Sequence[Any], key: bytes | None = None) -> Any:
        known = [b.latency for b in backends if b.eligible and b.latency > 0.0]
        neutral = sum(known) / len(known) if known else 1.0
        best = None
        best_cost = 0.0
        tied = 0.0
        cost = self.cost
        for b in backends:
            if not b.eligible:
                continue
            rtt = b.latency if b.latency > 0.0 else neutral
            c = cost(rtt, b.inflight, b.weight, getattr(b, "cap", 0) or 0)
            if best is None or c < best_cost:
                best, best_cost, tied = b, c, b.weight
            elif c == best_cost:
                tied += b.weight
                if self.rng.random() * tied < b.weight:
                    best = b
        return best


def _textbook(rtt: float, inflight: int, weight: float, cap: int) -> float:
    return rtt * (inflight + 1) / weight


def _capacity(rtt: float, inflight: int, weight: float, cap: int) -> float:
    return rtt * max(1.0, (inflight + 1) / weight)


def _capacity_sq(rtt: float, inflight: int, weight: float, cap: int) -> float:
    # the queue beyond capacity is charged twice: the estimate already holds queueing delay
    over = (inflight + 1) / weight
    return rtt * (over * over if over > 1.0 else 1.0)


def _capacity_soft(rtt: float, inflight: int, weight: float, cap: int) -> float:
    # like _capacity, but a free slot on a big backend is still a little better than one
    # on a small one, so that equals fill in proportion to weight
    return rtt * (max(1.0, (inflight + 1) / weight) + inflight / (4.0 * weight))


def _finagle(rtt: float, inflight: int, weight: float, cap: int) -> float:
    return rtt * (inflight + 1)


def make_cost_policy(name: str, cost: Cost) -> type[CostPolicy]:
    return type(f"Cost_{name}", (CostPolicy,), {"name": name, "cost": staticmethod(cost)})


EMULATIONS: dict[str, type[SimPolicy]] = {
    HaproxyLeastconn.name: HaproxyLeastconn,
    HaproxyRoundrobin.name: HaproxyRoundrobin,
    UniformRandom.name: UniformRandom,
}

CANDIDATES: dict[str, type[SimPolicy]] = {
    "cand:rtt*(n+1)/w": make_cost_policy("cand:rtt*(n+1)/w", _textbook),
    "cand:rtt*(n+1)": make_cost_policy("cand:rtt*(n+1)", _finagle),
    "cand:rtt*max(1,(n+1)/w)": make_cost_policy("cand:rtt*max(1,(n+1)/w)", _capacity),
    "cand:rtt*max(1,(n+1)/w)^2": make_cost_policy("cand:rtt*max(1,(n+1)/w)^2", _capacity_sq),
    "cand:rtt*(max(1,(n+1)/w)+n/4w)": make_cost_policy(
        "cand:rtt*(max(1,(n+1)/w)+n/4w)", _capacity_soft
    ),
}

__all__ = ["CANDIDATES", "EMULATIONS", "AlwaysNamed", "CostPolicy", "SimPolicy", "always"]
