"""Least loaded: send a request where one more request is expected to finish soonest.

Cost of backend i (seconds, the expected time for one more request to complete):

    cost_i = lat_i * max(1, (inflight_i + 1) / capacity_i)
    capacity_i = max(1, weight_i), lowered to cap_i when a cap is set

where lat_i is the peak-EWMA latency estimate and the weight is read as the backend's
concurrency (how many requests it serves at once without slowing down; `edgelb demo` and the
capacity-weighted examples set weight = workers). Why this form:

- A backend under its capacity serves the request at its bare latency: an idle slow backend
  costs its whole latency, not latency / weight. `rtt * (inflight + 1) / weight` (the trap)
  makes a heavy but degraded backend look cheap while it is idle and so feeds it a slice of
  every burst.
- Above its capacity, the cost grows with its queue per unit of capacity (the M/D/c picture:
  k + 1 requests on c workers take about (k + 1) / c service times), so fast backends absorb
  load until their queue costs more than a slow backend's whole latency, and no further.
- Capacity is at least 1, so where weights are fractions (`cpus: 0.5`) or equal and small the
  cost is exactly Finagle's `lat * (inflight + 1)`, and during slow start (weight x 0.1) a
  backend is treated as serving one request at a time. A cap only ever lowers the capacity: it
  bounds the backend's concurrency, it is not a target.
- Ties (equal cost, then equal inflight / capacity) are broken at random in proportion
  to weight (P2C: the first sample wins, and it was drawn by weight): at low load with equal
  latencies traffic follows the weight shares.

Chosen by simulation (closed loop, capacity-limited FIFO backends, lognormal service times,
peak EWMA measured): against the alternative `share=True`, where
capacity_i = max(1, weight_i * (I + 1) / W) is the backend's weight share of the current total
in-flight I (scale free in the weights), weight-as-concurrency gave the same p99 on the issue's
8/2/8 scenario (one backend at 6x latency, 12 clients); on the demo pool (2/4/8 workers at
20/10/5 ms) a lower p99 and 12% more throughput at 8 clients (10.7 vs 15.6 ms), about the same at
16, and 4% more throughput for a 2 ms higher p99 at 24: the share overstates capacity under
overload and understates it at low load. Against HAProxy leastconn (same weights): on 8/2/8 p99
0.26x and throughput 1.4x; on the demo pool p99 0.44x / 0.73x / 0.69x at 8 / 16 / 24 clients,
throughput 1.27x / 0.96x / 1.0x (under overload the slowest backend is left nearly idle).

Unknown latency (0.0) counts as the mean of the known latencies (1.0 when none is known): a new
backend is neither starved nor flooded, since its in-flight count raises its cost at once.
With probability `probe` (1/256) a pick goes to a weight-random eligible backend if it is idle:
a backend avoided for its old slow samples is re-measured now and then, one request at a time.

Few eligible backends (<= FULL_SCAN) are scanned in full with the exact totals. Larger pools use
power of two choices: two samples drawn in proportion to weight (cumulative weights + bisect,
rebuilt when membership changes or, amortised, when a sampled weight changed), the load per unit
weight I / W (share mode) is estimated from the samples (under weight-proportional sampling
E[k/w] = I / W), and the neutral latency from a running mean of sampled latencies. O(1) per pick.

Costs within TIE_REL (25%) of the best, plus TIE_ABS (0.5 ms), count as ties: latency estimates
are noisy and sticky (a peak decays over tau), and without this a backend measured a little
slower once is shunned at low load. Among ties the lower in-flight per capacity wins, then weight.
In the simulation this cost at most 1-2 ms of p99 and bought up to 1% of throughput under
overload; a 6x degraded backend is far outside it.

`peak-ewma` is the same machinery with the capacity term off: cost = lat * (inflight + 1), and
exact comparisons (no tie tolerance), as Finagle does it.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

from balancers.base import Balancer, Candidate

FULL_SCAN = 8  # pools this small are scanned in full
PROBE = 1.0 / 256  # share of picks that may probe an idle backend regardless of cost
TIE_REL = 0.25  # costs within 25% of the best (plus TIE_ABS) are ties: estimates are noisy
TIE_ABS = 0.0005  # seconds: below the scheduling jitter of a proxy host
SMOOTH = 1.0 / 16  # weight of one pick in the running estimates of the P2C mode
MAX_TABLES = 4  # weighted-sampling tables kept, by pool size (a pool and its retry subsets)


class _Table:
    """Weighted sampling over positions of a sequence of `n` candidates."""

    __slots__ = ("cum", "n", "picks", "stale", "total", "uniform", "weights")

    def __init__(self, backends: Sequence[Candidate]) -> None:
        weights = [b.weight if b.weight > 0 else 0.0 for b in backends]
        self.weights = weights
        self.n = len(weights)
        self.cum = list(accumulate(weights))
        self.total = self.cum[-1] if weights else 0.0
        self.uniform = len(set(weights)) <= 1
        self.picks = 0
        self.stale = False


def _capacity(b: Candidate) -> float:
    """How many requests `b` serves at once: its weight (at least 1), lowered to its cap."""
    capacity = b.weight if b.weight > 1.0 else 1.0
    cap = getattr(b, "cap", 0)
    return cap if 0 < cap < capacity else capacity


class LeastLoaded(Balancer):
    name = "least-loaded"
    capacity_term = True  # False: Finagle's peak EWMA load, lat * (inflight + 1)

    def __init__(self, rng: random.Random, probe: float = PROBE, share: bool = False,
                 tie_rel: float = TIE_REL, tie_abs: float = TIE_ABS) -> None:
        super().__init__(rng)
        self.probe = probe
        self.tie_rel = tie_rel  # costs within this ratio of the best are ties...
        self.tie_abs = tie_abs  # ...give or take this many seconds
        self.share = share  # capacity from the weight share of the current load (scale free)
        self._tables: dict[int, _Table] = {}
        self._rho = 0.0  # running estimate of in-flight per unit weight (P2C mode)
        self._lat = 0.0  # running mean of known latencies (P2C mode), 0.0 = none seen

    def reset(self, backends: Sequence[Candidate]) -> None:
        self._tables.clear()

    # -- cost -------------------------------------------------------------------------------

    def _cost(self, b: Candidate, neutral: float, rho: float) -> tuple[float, float]:
        """(expected completion time of one more request on `b`, its in-flight per unit of
        capacity: the tie-break, 0 for every idle backend so idle ties go by weight)."""
        lat = b.latency if b.latency > 0.0 else neutral
        k1 = b.inflight + 1
        if not self.capacity_term:
            return lat * k1, 0.0
        capacity = b.weight * rho if self.share else b.weight
        if capacity < 1.0:
            capacity = 1.0
        cap = getattr(b, "cap", 0)
        if 0 < cap < capacity:
            capacity = cap
        q = k1 / capacity
        return (lat * q if q > 1.0 else lat), b.inflight / capacity

    # -- pick -------------------------------------------------------------------------------

    def pick(self, backends: Sequence[Candidate], key: bytes | None = None) -> Candidate | None:
        n = len(backends)
        if n <= FULL_SCAN:
            return self._scan(backends)
        table = self._tables.get(n)
        if table is None or (table.stale and table.picks >= (n >> 3)):
            table = self._table(backends)
        table.picks += 1
        rand = self.rng.random
        weights = table.weights
        first = None
        for _ in range(6):  # up to six draws for two eligible samples, else a full scan
            if table.uniform:
                i = int(rand() * n)
            else:
                i = bisect_right(table.cum, rand() * table.total)
                if i >= n:
                    i = n - 1
            b = backends[i]
            if b.weight != weights[i]:
                table.stale = True
            if not (b.eligible and b.weight > 0):
                continue
            if first is None:
                first = b
                if rand() < self.probe and b.inflight == 0:
                    return b
                continue
            if b is first:
                continue
            return self._better(first, b, table.total)
        if first is not None:
            return first
        return self._scan(backends)

    def _table(self, backends: Sequence[Candidate]) -> _Table:
        if len(self._tables) >= MAX_TABLES:
            self._tables.clear()
        table = self._tables[len(backends)] = _Table(backends)
        return table

    def _better(self, a: Candidate, b: Candidate, total_weight: float) -> Candidate:
        # running estimates: in-flight per unit weight, and the mean known latency
        self._rho += ((a.inflight / a.weight + b.inflight / b.weight) * 0.5 - self._rho) * SMOOTH
        for lat in (a.latency, b.latency):
            if lat > 0.0:
                self._lat = lat if self._lat == 0.0 else self._lat + (lat - self._lat) * SMOOTH
        neutral = self._lat if self._lat > 0.0 else 1.0
        rho = self._rho + 1.0 / total_weight if total_weight > 0 else 1.0
        ca, qa = self._cost(a, neutral, rho)
        cb, qb = self._cost(b, neutral, rho)
        tol = self.tie_rel
        if cb * (1.0 + tol) + self.tie_abs < ca:
            return b
        if ca * (1.0 + tol) + self.tie_abs < cb or qa <= qb:
            return a  # near-ties go to the lower in-flight per capacity, then the first sample
        return b

    def _scan(self, backends: Sequence[Candidate]) -> Candidate | None:
        """The full scan, written for speed (it runs per request): the default cost inline,
        capacities read from `capacity` where the caller keeps it, no allocation. Anything
        unusual (share mode, peak-ewma, an unknown latency, one candidate) takes the generic
        path."""
        if self.share or not self.capacity_term:
            return self._scan_generic(backends)
        rand = self.rng.random
        if rand() < self.probe:  # now and then, re-measure an idle backend
            pool = [b for b in backends if b.eligible and b.weight > 0]
            if pool:
                b = self._weighted(pool, sum(b.weight for b in pool))
                if b.inflight == 0:
                    return b
        # One pass. Costs within the tie band of the best so far are near-ties, settled by the
        # lower in-flight per capacity, then at random by weight; a new best that moves the
        # band past the current choice replaces it.
        mul = 1.0 + self.tie_rel
        tie_abs = self.tie_abs
        choice = None
        best = c_cost = c_q = tied_w = 0.0
        for b in backends:
            w = b.weight
            if not (b.eligible and w > 0):
                continue
            lat = b.latency
            if lat <= 0.0:
                return self._scan_generic(backends, probed=True)
            try:
                capacity = b.capacity  # type: ignore[attr-defined]
            except AttributeError:
                capacity = _capacity(b)
            k = b.inflight
            cost = lat * (k + 1) / capacity if k + 1 > capacity else lat
            if choice is None:
                choice, best, c_cost, c_q, tied_w = b, cost, cost, k / capacity, w
                continue
            if cost > best * mul + tie_abs:
                continue  # clearly dearer than the best so far
            q = k / capacity
            if cost < best:
                best = cost
                if c_cost > cost * mul + tie_abs:  # the choice is out of the new band
                    choice, c_cost, c_q, tied_w = b, cost, q, w
                    continue
            if q < c_q:
                choice, c_cost, c_q, tied_w = b, cost, q, w
            elif q == c_q:
                tied_w += w  # weighted reservoir sampling among the tied
                if rand() * tied_w < w:
                    choice, c_cost = b, cost
        return choice

    def _scan_generic(
        self, backends: Sequence[Candidate], probed: bool = False
    ) -> Candidate | None:
        eligible = []
        total_w = 0.0
        total_k = 0
        lat_sum = 0.0
        lat_n = 0
        for b in backends:
            if b.eligible and b.weight > 0:
                eligible.append(b)
                total_w += b.weight
                total_k += b.inflight
                if b.latency > 0.0:
                    lat_sum += b.latency
                    lat_n += 1
        if len(eligible) <= 1:
            return eligible[0] if eligible else None
        rand = self.rng.random
        if not probed and rand() < self.probe:
            b = self._weighted(eligible, total_w)
            if b.inflight == 0:
                return b
        neutral = lat_sum / lat_n if lat_n else 1.0
        rho = (total_k + 1) / total_w
        costs = [self._cost(b, neutral, rho) for b in eligible]
        limit = min(c for c, _ in costs) * (1.0 + self.tie_rel) + self.tie_abs
        best = None
        best_q = 0.0
        tied_w = 0.0
        for b, (cost, q) in zip(eligible, costs, strict=True):
            if cost > limit:
                continue
            if best is None or q < best_q:
                best, best_q, tied_w = b, q, b.weight
            elif q == best_q:
                tied_w += b.weight  # weighted reservoir sampling among the tied
                if rand() * tied_w < b.weight:
                    best = b
        return best

    def _weighted(self, eligible: list[Candidate], total_w: float) -> Candidate:
        x = self.rng.random() * total_w
        for b in eligible:
            x -= b.weight
            if x < 0:
                return b
        return eligible[-1]


class PeakEwma(LeastLoaded):
    """Finagle / Linkerd P2C over peak EWMA: cost = latency * (inflight + 1), no capacity."""

    name = "peak-ewma"
    capacity_term = False

    def __init__(self, rng: random.Random, probe: float = PROBE, share: bool = False,
                 tie_rel: float = 0.0, tie_abs: float = 0.0) -> None:
        super().__init__(rng, probe, share, tie_rel, tie_abs)  # Finagle compares exactly
