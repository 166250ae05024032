"""Smooth weighted round robin, as nginx does it: over a cycle of sum(weights) picks each
backend is chosen in proportion to its weight, and picks of one backend are spread out."""

from __future__ import annotations

import random
from collections.abc import Sequence

from balancers.base import Balancer, Candidate


class RoundRobin(Balancer):
    name = "round-robin"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._current: dict[int, float] = {}

    def reset(self, backends: Sequence[Candidate]) -> None:
        alive = {id(b) for b in backends}
        self._current = {k: v for k, v in self._current.items() if k in alive}

    def pick(self, backends: Sequence[Candidate], key: bytes | None = None) -> Candidate | None:
        current = self._current
        total = 0.0
        best = None
        best_value = 0.0
        for b in backends:
            w = b.weight
            if not b.eligible or w <= 0:
                continue
            total += w
            v = current.get(id(b), 0.0) + w
            current[id(b)] = v
            if best is None or v > best_value:
                best, best_value = b, v
        if best is not None:
            current[id(best)] = best_value - total
        return best
