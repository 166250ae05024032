"""Least loaded per unit of capacity: the backend with the fewest in-flight requests per unit
of weight wins; ties are broken at random in proportion to weight, so at low load traffic
follows capacity instead of piling on one backend. Few backends are scanned in full; many are
sampled by power of two choices (samples drawn by weight), which is O(1) and avoids herding."""

from __future__ import annotations

from collections.abc import Sequence

from balancers.base import Balancer, Candidate

FULL_SCAN = 8  # pools this small are scanned in full


class LeastLoaded(Balancer):
    name = "least-loaded"

    def pick(self, backends: Sequence[Candidate], key: bytes | None = None) -> Candidate | None:
        n = len(backends)
        if n <= FULL_SCAN:  # (on the hot path: the scan is inlined here, not a call)
            best = None
            best_load = 0.0
            tied_weight = 0.0
            for b in backends:
                if not b.eligible:
                    continue
                load = b.inflight / b.weight
                if best is None or load < best_load:
                    best, best_load, tied_weight = b, load, b.weight
                elif load == best_load:
                    # weighted reservoir sampling among the tied
                    tied_weight += b.weight
                    if self.rng.random() * tied_weight < b.weight:
                        best = b
            return best
        rand = self.rng.randrange
        for _ in range(4):  # a few tries at two eligible samples, then fall back to a scan
            a = backends[rand(n)]
            b = backends[rand(n)]
            if a.eligible and b.eligible:
                la = a.inflight / a.weight
                lb = b.inflight / b.weight
                if la < lb:
                    return a
                if lb < la:
                    return b
                return a if self.rng.random() * (a.weight + b.weight) < a.weight else b
            if a.eligible:
                return a
            if b.eligible:
                return b
        return self._scan(backends)

    def _scan(self, backends: Sequence[Candidate]) -> Candidate | None:
        best = None
        best_load = 0.0
        for b in backends:
            if b.eligible:
                load = b.inflight / b.weight
                if best is None or load < best_load:
                    best, best_load = b, load
        return best
