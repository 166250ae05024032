"""Deterministic discrete-event simulation of the proxy in front of heterogeneous backends.

Virtual clock, one heap of events, seeded random: no sockets, no sleeping, same seed -> same
table. Each backend serves `capacity` requests at once at full speed and queues the rest FIFO
inside itself; one is degraded (6x service time), one fails fast (an error in ~1 ms). The
simulated proxy keeps, per backend, exactly what the data path keeps: in-flight count and a
peak-EWMA latency estimate (tau 10 s, errors count as a 1 s sample), weight = capacity, and
asks a policy to pick. Every policy registered in `balancers.POLICIES` is run, next to
emulations of HAProxy `leastconn` / `roundrobin`, plain random and candidate cost formulas
(bench/sim_policies.py).

    python bench/simulate.py [--requests N] [--load 0.7,0.9] [--clients K] [--seed S]
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from sim_policies import CANDIDATES, EMULATIONS  # noqa: E402

import balancers  # noqa: E402

TAU = 10.0  # peak EWMA decay time constant, seconds
ERROR_SAMPLE = 1.0  # an error counts as a latency sample this slow
SIGMA = 0.5  # default lognormal shape of service times
CLIENT_KEYS = 1024  # distinct client addresses (for hash policies) in the open-loop run


# -- latency estimate -------------------------------------------------------------------------


def local_peak_ewma(prev: float, prev_time: float, sample: float, now: float) -> float:
    """Jump up to a slower sample at once; otherwise decay toward the sample with the weight
    of the time since the previous sample. 0.0 means "nothing known yet". (The same formula
    as balancers.ewma.peak_ewma, used when that module is missing or disagrees.)"""
    if prev <= 0.0 or sample >= prev:
        return sample
    dt = now - prev_time
    w = math.exp(-dt / TAU) if dt > 0.0 else 1.0
    return prev * w + sample * (1.0 - w)


Ewma = Callable[[float, float, float, float], float]  # (prev, prev_time, sample, now) -> new


def pick_ewma() -> tuple[Ewma, str]:
    """balancers.ewma.peak_ewma when it exists and agrees with the formula on a few probes
    (the data path's own code, then), else the local copy."""
    try:
        from balancers import ewma  # type: ignore[attr-defined]
    except ImportError:
        return local_peak_ewma, "local copy (balancers.ewma not found)"
    fn = getattr(ewma, "peak_ewma", None)
    probes = [(0.01, 0.0, 0.02, 1.0), (0.02, 5.0, 0.01, 15.0), (0.05, 1.0, 0.01, 1.001)]
    try:
        if fn is None or not all(
            math.isclose(fn(*p), local_peak_ewma(*p), rel_tol=1e-9) for p in probes
        ):
            raise ValueError("disagrees")
    except Exception:
        return local_peak_ewma, "local copy (balancers.ewma.peak_ewma not usable here)"
    return fn, "balancers.ewma.peak_ewma"


# -- model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendSpec:
    name: str
    capacity: int  # concurrent requests served at full speed
    service: float  # mean service time, seconds
    fails: bool = False  # answers every request with an error after ~service
    zone: str = "a"
    sigma: float = SIGMA  # lognormal shape of its service times (0: constant)

    @property
    def rate(self) -> float:
        """Successful requests per second it sustains (0 for a failing backend)."""
        return 0.0 if self.fails else self.capacity / self.service


# The scenario: capacities 8, 2, 8, 4; the third degraded to 6x; one failing fast.
SCENARIO: tuple[BackendSpec, ...] = (
    BackendSpec("a8", 8, 0.010),
    BackendSpec("b2", 2, 0.010),
    BackendSpec("c8-slow", 8, 0.060),
    BackendSpec("d4", 4, 0.010),
    BackendSpec("e4-fail", 4, 0.001, fails=True),
)
# The live loopback test: capacities 8, 2, 8 at 10 ms, the third degraded to 60 ms.
LIVE: tuple[BackendSpec, ...] = (
    BackendSpec("a8", 8, 0.010, sigma=0.1),
    BackendSpec("b2", 2, 0.010, sigma=0.1),
    BackendSpec("c8-slow", 8, 0.060, sigma=0.1),
)
SCENARIOS = {"issue": SCENARIO, "live": LIVE}


class SimBackend:
    """Both the backend (servers + FIFO) and the proxy's view of it (the policy Candidate)."""

    __slots__ = ("busy", "cap", "eligible", "errors", "estimate", "inflight", "last_sample",
                 "latency", "mu", "name", "queue", "sent", "spec", "weight", "zone")

    def __init__(self, spec: BackendSpec, cap: int) -> None:
        self.spec = spec
        self.name = spec.name
        self.weight = float(spec.capacity)
        self.zone = spec.zone
        self.cap = cap
        self.inflight = 0
        self.latency = 0.0  # what the policy sees
        self.estimate = 0.0  # the stored peak EWMA, as of last_sample
        self.eligible = True
        self.last_sample = 0.0
        self.busy = 0
        self.queue: deque[int] = deque()
        self.sent = 0
        self.errors = 0
        self.mu = math.log(spec.service) - spec.sigma**2 / 2.0  # lognormal, mean `service`


@dataclass
class Result:
    policy: str
    requests: int  # measured (after warm-up)
    p50: float
    p99: float
    p999: float
    error_rate: float
    throughput: float  # successful completions per virtual second
    share: dict[str, float] = field(default_factory=dict)
    duration: float = 0.0  # virtual seconds of the measured window


def _pct(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


def simulate(
    policy: Any,
    specs: Sequence[BackendSpec] = SCENARIO,
    *,
    requests: int = 20_000,
    load: float = 0.9,
    clients: int = 0,
    seed: int = 1,
    warmup: float = 0.05,
    cap_factor: float = 0.0,
    label: str = "",
    ewma: Ewma | None = None,
    read_decay: bool = False,
) -> Result:
    """Run `requests` requests through `policy` (an object with pick/reset). Open loop
    (Poisson arrivals at `load` x the healthy backends' total rate) unless `clients` > 0,
    then closed loop: that many clients each send the next request when the previous ends.
    `cap_factor` > 0 sets each backend's proxy-side cap to ceil(factor * capacity); when
    every backend is at its cap the request waits in the proxy's FIFO. With `read_decay` the
    policy sees each estimate decayed toward 0 for the time since its last sample (as Finagle
    reads its peak EWMA), so that a backend that once looked slow is probed again."""
    update = ewma or pick_ewma()[0]
    arrivals_rng = random.Random(seed * 7919 + 1)
    service_rng = random.Random(seed * 7919 + 2)
    backends = [
        SimBackend(s, math.ceil(cap_factor * s.capacity) if cap_factor > 0 else 0) for s in specs
    ]
    policy.reset(backends)
    rate = load * sum(s.rate for s in specs)
    if clients <= 0 and rate <= 0:
        raise ValueError("no healthy capacity in the scenario: give a backend with fails=False")
    skip = int(requests * warmup)

    start_at = [0.0] * requests
    keys = [b""] * requests
    ok_lat: list[float] = []
    errors = 0
    sent_to = [0] * len(backends)
    first_t = -1.0
    last_t = 0.0
    ok_measured = 0
    events: list[tuple[float, int, int, int]] = []  # (time, seq, backend index or -1, request)
    seq = 0
    waiting: deque[int] = deque()  # proxy-side queue (only with caps)
    issued = 0
    closed = clients > 0
    key_of = [f"10.0.{c // 256}.{c % 256}".encode() for c in range(max(clients, CLIENT_KEYS))]
    client_of: list[int] = [0] * requests
    index = {id(b): i for i, b in enumerate(backends)}
    pick = policy.pick

    def service_time(b: SimBackend) -> float:
        sigma = b.spec.sigma
        return service_rng.lognormvariate(b.mu, sigma) if sigma > 0 else b.spec.service

    def dispatch(r: int, now: float) -> bool:
        nonlocal seq
        if read_decay:
            for c in backends:
                c.latency = c.estimate * math.exp((c.last_sample - now) / TAU)
        b = pick(backends, keys[r])
        if b is None:
            return False
        i = index[id(b)]
        b.inflight += 1
        if b.cap and b.inflight >= b.cap:
            b.eligible = False
        b.sent += 1
        if r >= skip:
            sent_to[i] += 1
        if b.spec.fails or b.busy < b.spec.capacity:
            if not b.spec.fails:
                b.busy += 1
            seq += 1
            heapq.heappush(events, (now + service_time(b), seq, i, r))
        else:
            b.queue.append(r)
        return True

    def arrive(r: int, now: float, client: int) -> None:
        nonlocal first_t
        start_at[r] = now
        client_of[r] = client
        keys[r] = key_of[client]
        if r == skip:
            first_t = now
        if waiting or not dispatch(r, now):
            waiting.append(r)

    if closed:
        for c in range(min(clients, requests)):
            client_of[c] = c
            seq += 1
            heapq.heappush(events, (arrivals_rng.random() * 0.001, seq, -1, c))
            issued += 1
    else:
        seq += 1
        heapq.heappush(events, (arrivals_rng.expovariate(rate), seq, -1, 0))
        issued = 1

    while events:
        now, _, i, r = heapq.heappop(events)
        if i < 0:  # arrival
            if closed:
                arrive(r, now, client_of[r])
            else:
                arrive(r, now, arrivals_rng.randrange(CLIENT_KEYS))
                if issued < requests:
                    seq += 1
                    heapq.heappush(events, (now + arrivals_rng.expovariate(rate), seq, -1, issued))
                    issued += 1
            continue
        b = backends[i]
        failed = b.spec.fails
        if not failed:
            if b.queue:
                seq += 1
                heapq.heappush(events, (now + service_time(b), seq, i, b.queue.popleft()))
            else:
                b.busy -= 1
        latency = now - start_at[r]
        b.estimate = update(b.estimate, b.last_sample, ERROR_SAMPLE if failed else latency, now)
        b.latency = b.estimate
        b.last_sample = now
        b.inflight -= 1
        if b.cap:
            b.eligible = b.inflight < b.cap
        if r >= skip:
            last_t = now
            if failed:
                errors += 1
            else:
                ok_lat.append(latency)
                ok_measured += 1
        while waiting and dispatch(waiting[0], now):
            waiting.popleft()
        if closed and issued < requests:
            client_of[issued] = client_of[r]
            seq += 1
            heapq.heappush(events, (now, seq, -1, issued))
            issued += 1

    ok_lat.sort()
    measured = requests - skip
    span = max(last_t - first_t, 1e-9)
    total_sent = max(1, sum(sent_to))
    return Result(
        policy=label or getattr(policy, "name", type(policy).__name__),
        requests=measured,
        p50=_pct(ok_lat, 0.50),
        p99=_pct(ok_lat, 0.99),
        p999=_pct(ok_lat, 0.999),
        error_rate=errors / max(1, measured),
        throughput=ok_measured / span,
        share={b.name: sent_to[k] / total_sent for k, b in enumerate(backends)},
        duration=span,
    )


# -- policies and report ----------------------------------------------------------------------


def policy_factories(candidates: bool = True) -> dict[str, Callable[[random.Random], Any]]:
    """Every registered policy (read at run time), then the simulator's own."""
    out: dict[str, Callable[[random.Random], Any]] = {}
    names = sorted(balancers.POLICIES, key=lambda n: (n != "least-loaded", n))
    for name in names:
        out[name] = lambda rng, n=name: balancers.make(n, rng)
    extra = {**EMULATIONS, **(CANDIDATES if candidates else {})}
    for name, cls in extra.items():
        out[f"sim-{name}" if name in out else name] = cls  # never hide a registered one
    return out


def _ms(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x * 1000:.1f}"


def table(results: Sequence[Result], specs: Sequence[BackendSpec]) -> str:
    head = ["policy", "p50 ms", "p99 ms", "p999 ms", "errors", "ok/s"] + [
        f"{s.name} share" for s in specs
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [
            f"`{r.policy}`",
            _ms(r.p50),
            _ms(r.p99),
            _ms(r.p999),
            f"{r.error_rate * 100:.2f}%",
            f"{r.throughput:.0f}",
        ] + [f"{r.share[s.name] * 100:.1f}%" for s in specs]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _run_one(args: tuple[str, dict[str, Any]]) -> Result:
    name, kw = args
    factory = policy_factories(candidates=True)[name]
    ewma, _ = pick_ewma()
    seed = kw["seed"]
    return simulate(factory(random.Random(seed * 31 + 7)), ewma=ewma, label=name, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200_000, help="requests per run")
    ap.add_argument("--load", default="0.7,0.9",
                    help="open-loop loads as fractions of healthy capacity, comma-separated")
    ap.add_argument("--clients", default="16",
                    help="closed-loop client counts, comma-separated ('' or 0: none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="issue",
                    help="issue: 8/2/8(6x slow)/4 + one failing fast; live: 8/2/8(6x slow)")
    ap.add_argument("--cap", type=float, default=0.0,
                    help="proxy-side cap per backend = ceil(CAP x capacity); 0: none")
    ap.add_argument("--read-decay", action="store_true",
                    help="policies see estimates decayed to the pick time (Finagle style)")
    ap.add_argument("--no-candidates", action="store_true",
                    help="leave out the candidate cost formulas")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (results identical)")
    a = ap.parse_args(argv)

    factories = policy_factories(candidates=not a.no_candidates)
    loads = [float(x) for x in a.load.split(",") if x.strip()]
    client_counts = [int(x) for x in a.clients.split(",") if x.strip() and int(x) > 0]
    runs: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = []
    specs = SCENARIOS[a.scenario]
    common = {"requests": a.requests, "seed": a.seed, "cap_factor": a.cap, "specs": specs,
              "read_decay": a.read_decay}
    for load in loads:
        title = f"open loop, Poisson arrivals at {load:.0%} of healthy capacity"
        runs.append((title, [(n, {**common, "load": load}) for n in factories]))
    for k in client_counts:
        title = f"closed loop, {k} clients"
        runs.append((title, [(n, {**common, "clients": k}) for n in factories]))

    flat = [job for _, jobs in runs for job in jobs]
    t0 = time.perf_counter()
    if a.jobs > 1:
        from multiprocessing import get_context

        with get_context("fork").Pool(a.jobs) as pool:
            results = pool.map(_run_one, flat, chunksize=1)
    else:
        results = [_run_one(j) for j in flat]
    wall = time.perf_counter() - t0

    _, ewma_src = pick_ewma()
    total = sum(s.rate for s in specs)
    print(f"# Balancing simulation, scenario `{a.scenario}`\n")
    print("Backends (weight = capacity; service times lognormal around the mean):\n")
    for s in specs:
        what = "fails fast (error)" if s.fails else f"{s.rate:.0f} req/s at full use"
        print(f"- `{s.name}`: capacity {s.capacity}, mean {s.service * 1000:.0f} ms, "
              f"sigma {s.sigma}, {what}")
    print(f"\nHealthy capacity {total:.0f} req/s. {a.requests} requests per run, first 5% "
          f"not measured, seed {a.seed}, latency estimate: {ewma_src}"
          + (f", proxy cap {a.cap} x capacity" if a.cap else "")
          + (", estimates decayed at read time" if a.read_decay else "") + ".")
    print("Latencies are of successful requests; errors = share of requests answered with an"
          " error; ok/s = successful completions per virtual second.\n")
    k = 0
    for title, jobs in runs:
        print(f"## {title}\n")
        print(table(results[k:k + len(jobs)], specs))
        print()
        k += len(jobs)
    print(f"_{len(flat)} runs in {wall:.1f} s wall time._")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
