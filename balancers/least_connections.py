"""HAProxy `leastconn`: the lowest (inflight + 1) / weight wins; equals take turns (the scan
starts one position further each pick, so among equally loaded backends each gets its go).
Latency is ignored: it is here for comparison and for users who ask for it. O(n) per pick."""

from __future__ import annotations

import random
from collections.abc import Sequence

from balancers.base import Balancer, Candidate


class LeastConnections(Balancer):
    name = "least-connections"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._next = 0

    def pick(self, backends: Sequence[Candidate], key: bytes | None = None) -> Candidate | None:
        n = len(backends)
        if n == 0:
            return None
        start = self._next % n
        self._next = start + 1
        best = None
        best_load = 0.0
        for j in range(n):
            b = backends[(start + j) % n]
            w = b.weight
            if not b.eligible or w <= 0:
                continue
            load = (b.inflight + 1) / w
            if best is None or load < best_load:
                best, best_load = b, load
        return best
