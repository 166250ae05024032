"""Live, mutable state beside the immutable snapshot values.

`BackendState` and `ServiceState` hold the counters of the data path as plain attributes (the
hot path only does `+= 1`); the metrics collector and /status.json read them at scrape time.
A `Pool` is updated in place by the runtime when a new snapshot arrives: a backend that stays
keeps its object (and so its counters and idle connections); a removed one drains.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from bisect import bisect_left
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Any

import balancers
from balancers.limits import GradientLimit
from balancers.outlier import ejection_seconds, may_eject
from balancers.subset import subset
from balancers.weights import slow_start_factor
from watchers.model import Backend, InstanceConfig, Outlier, Policy, Service

if TYPE_CHECKING:
    from collections.abc import Sequence

    from balancers.base import Candidate

log = logging.getLogger("edgelb.pool")

# Upper bounds (seconds) of edgelb_request_duration_seconds; the last bucket is +Inf.
ADAPTIVE_MAX = 1000  # the adaptive cap's bound when no max_inflight is set
ADAPTIVE_INITIAL = 20  # where an adaptive cap starts

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
N_DURATION = len(DURATION_BUCKETS) + 1  # per-bucket counts, +Inf last
# Upper bounds (bytes) of edgelb_request_size_bytes / edgelb_response_size_bytes: powers of 4
# from 64 B to 64 MiB (edgelb.http.accounting.size_bucket computes the index); +Inf last.
SIZE_BUCKETS = tuple(4**i for i in range(3, 14))
N_SIZE = len(SIZE_BUCKETS) + 1
# The `method` label: these, else OTHER (a bounded label). Counters keyed by method and status
# use `method_index << 10 | status`; histograms by method and status class use
# `method_index * 6 + status // 100` (class 0: no status).
METHOD_NAMES = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
                "OTHER")
METHOD_INDEX = {name.encode(): i for i, name in enumerate(METHOD_NAMES[:-1])}
OTHER_METHOD = len(METHOD_NAMES) - 1
N_CLASSES = 6
LATENCY_EVERY = 7  # a mask: the group's latency estimates are read at every 8th pick
POLL_INTERVAL = 0.002  # seconds: with a shared view, how often waiters look for a free slot
# a pool's cells before it has a shared view (the table's words, as int64 and as float64)
_NO_WORDS: memoryview[int] = memoryview(b"").cast("q")
_NO_FLOATS: memoryview[float] = memoryview(b"").cast("d")


class BackendState:
    """One backend as the data path sees it. Implements balancers.Candidate."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "cap",
        "capacity",
        "check_ok",
        "connections_total",
        "counts",
        "draining",
        "ejected_until",
        "ejections",
        "eligible",
        "fails",
        "failures",
        "healthy",
        "idle",
        "inflight",
        "key",
        "last_error",
        "last_error_t",
        "latency",
        "latency_t",
        "limiter",
        "open_connections",
        "own",
        "ramp_start",
        "requests",
        "responses",
        "returned_at",
        "slot",
        "spec",
        "static_cap",
        "sticky_id",
        "unsolicited",
        "usable",
        "weight",
        "zone",
    )

    def __init__(self, spec: Backend) -> None:
        self.spec = spec
        self.key = spec.key
        # what a sticky client's cookie holds: stable per address, says nothing about it
        self.sticky_id = hashlib.blake2b(self.key.encode(), digest_size=6).hexdigest().encode()
        self.weight = spec.weight  # effective: spec.weight, ramped while in slow start
        self.zone = spec.zone
        self.cap = 0  # the enforced concurrency cap (max_inflight, maybe adaptive); 0 = none
        self.static_cap = 0  # the configured cap for this backend (scaled by its weight)
        self.limiter: GradientLimit | None = None  # moves `cap` when `adaptive: true`
        self.capacity = 1.0  # what the balancer reads: max(1, weight), lowered to cap
        self.ramp_start = 0.0  # loop time its slow start began; 0.0 = not ramping
        self.inflight = 0  # requests (http) or connections (tcp) now open
        # With a shared view of load (Pool.use_shared): `inflight` is the group's count as last
        # read (own + the other workers'), `own` this worker's, `slot` the backend's slot in
        # the table (-1: none, counted here only). Without one, `own` stays 0.
        self.own = 0
        self.slot = -1
        # peak EWMA of response latency (balancers.ewma), updated by the data path
        self.latency = 0.0  # seconds; 0.0 = nothing measured yet
        self.latency_t = 0.0  # loop time of the last update
        self.healthy = spec.ready and not spec.terminating  # as the source reports it
        self.check_ok = True  # the active health check's verdict (True when not checked)
        self.ejected_until = 0.0  # loop time its outlier ejection ends; 0.0 = not ejected
        self.ejections = 0  # times ejected, ever
        self.returned_at = 0.0  # loop time its last ejection ended
        self.fails = 0  # consecutive failures of the kinds that count for ejection
        self.draining = False
        # usable: the pool may send it work (healthy, or the pool is in panic); eligible: usable
        # and under its cap right now. The data path flips `eligible` as in-flight crosses cap.
        self.usable = False
        self.eligible = False
        self.requests = 0  # requests sent to it
        self.responses: dict[int, int] = defaultdict(int)  # status code -> count
        self.counts: dict[int, int] = {}  # method_index << 10 | status -> responses
        self.failures = 0  # connect errors, resets, timeouts
        self.connections_total = 0  # upstream connections opened to it
        # connections closed for bytes that answered no request (after a whole response)
        self.unsolicited = 0
        self.last_error = ""  # why the last request failed on it (status.json, the log)
        self.last_error_t = 0.0  # when that was logged
        self.open_connections = 0
        self.bytes_in = 0  # from the backend
        self.bytes_out = 0  # to the backend
        self.idle: list[Any] = []  # idle keep-alive upstream connections, most recent last
        self._update_eligible()

    def _update_eligible(self) -> None:
        """Usable unless the pool decides otherwise (Pool.refresh applies health and panic)."""
        self.usable = self.healthy and self.check_ok and not self.ejected_until and (
            not self.draining and self.weight > 0
        )
        self.set_weight(self.weight)

    def set_cap(self, cap: int) -> None:
        self.cap = cap
        self.set_weight(self.weight)
        self.eligible = self.usable and (cap <= 0 or self.inflight < cap)

    def set_weight(self, weight: float) -> None:
        """The effective weight, and the capacity derived from it (kept for the balancer)."""
        self.weight = weight
        capacity = weight if weight > 1.0 else 1.0
        cap = self.cap
        self.capacity = cap if 0 < cap < capacity else capacity
        self.eligible = self.usable and (cap <= 0 or self.inflight < cap)

    def set_spec(self, spec: Backend) -> None:
        self.spec = spec
        self.zone = spec.zone
        if not self.ramp_start:
            self.weight = spec.weight
        self.healthy = spec.ready and not spec.terminating
        self._update_eligible()

    def start_ramp(self, now: float) -> None:
        """Begin slow start: the effective weight climbs from 10% (see Pool.ramp)."""
        self.ramp_start = now
        self.weight = self.spec.weight * slow_start_factor(0.0, 1.0)
        self._update_eligible()

    def start_draining(self) -> None:
        """Take no new requests; close idle upstream connections; in-flight ones finish."""
        self.draining = True
        self._update_eligible()
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


class Pool:
    """The backends of one service and the policy that picks among them.

    Besides picking, the pool owns what protects its backends: the per-backend caps, the
    bounded queue of requests waiting for a free slot, outlier ejection and panic mode. The
    data path reports to it (failures, releases at a cap); health checks report to it through
    `set_check`; everything that changes which backends may be picked ends in `refresh`.
    """

    __slots__ = (
        "backends",
        "balancer",
        "balancer_keyed",
        "by_key",
        "by_sticky",
        "candidates",
        "capped",
        "draining",
        "ejected",
        "keyed",
        "load_counts",
        "load_first",
        "load_floats",
        "load_own",
        "load_stride",
        "load_ticks",
        "load_words",
        "load_workers",
        "outlier",
        "panic",
        "panic_routed",
        "panic_threshold",
        "policy_name",
        "poll",
        "queue_size",
        "queue_timeout",
        "ramping",
        "rng",
        "shared",
        "sharing",
        "spare",
        "tier",
        "tiered",
        "timer",
        "usable",
        "waiters",
        "zone",
        "zone_threshold",
    )

    def __init__(self, policy_name: str, rng: random.Random | None = None) -> None:
        self.policy_name = policy_name
        self.balancer = balancers.make(policy_name, rng)
        self.backends: list[BackendState] = []  # every backend of the pool
        self.candidates: list[BackendState] = []  # what the balancer picks from
        self.spare: list[BackendState] = []  # in panic with caps: taken only instead of a 503
        self.tiered = False  # the backends are in more than one failover tier (Backend.tier)
        self.tier = 0  # the tier that takes work now (the lowest with a usable backend)
        self.by_key: dict[str, BackendState] = {}
        self.draining: dict[str, BackendState] = {}  # removed, still finishing requests
        self.ramping = 0  # backends in slow start
        self.by_sticky: dict[bytes, BackendState] = {}
        self.balancer_keyed = self.balancer.keyed  # the policy hashes a key
        self.keyed = self.balancer_keyed  # pick via the slower path: key, cookie or zone
        self.zone = ""  # the proxy's zone when zone-aware balancing is on
        self.zone_threshold = 0.8
        self.rng = self.balancer.rng
        self.outlier: Outlier | None = None
        self.panic_threshold = 0.5
        self.panic = False  # too few healthy backends: the unhealthy ones are used too
        self.panic_routed = 0  # requests (connections) sent to a spare backend in panic
        self.usable = 0  # backends that may take work, at their cap or not
        self.ejected = 0  # backends out for failing
        self.capped = False  # the backends have caps (max_inflight or adaptive)
        self.queue_size = 0  # waiters allowed while every backend is at its cap
        self.queue_timeout = 1.0
        self.waiters: deque[Any] = deque()  # FIFO of waiting requests/connections (Waiter)
        self.timer: asyncio.TimerHandle | None = None  # fires at the first waiter's deadline
        # the shared view of load (edgelb.workers.shared_load.WorkerView; see use_shared)
        self.shared: Any = None
        self.sharing = False
        self.load_words: memoryview[int] = _NO_WORDS  # int64 words of the table
        # this worker's in-flight per slot (all its pools): what its cells hold, kept here so
        # the data path writes its cells without reading them back
        self.load_counts: list[int] = []
        self.load_floats: memoryview[float] = _NO_FLOATS  # the same bytes as float64
        self.load_first = 0  # word index of worker 0's cell of slot 0
        self.load_own = 0  # word index of this worker's cell of slot 0
        self.load_stride = 0  # words from one worker's cells to the next one's
        self.load_workers = 0
        self.load_ticks = 0  # syncs so far (every LATENCY_EVERY + 1, latency estimates too)
        self.poll: asyncio.TimerHandle | None = None  # with waiters: looks for others' releases

    def pick(self, key: bytes | None = None) -> BackendState | None:
        """The balancer's pick among the eligible backends (`key`: for a hashing policy)."""
        if self.sharing:
            self._sync(self.candidates)
        return self.balancer.pick(self.candidates, key)  # type: ignore[return-value]

    def pick_from(self, candidates: Sequence[Candidate], key: bytes | None) -> BackendState | None:
        """The balancer's pick among `candidates`, some of this pool's (e.g. one zone's), as
        they stand: the caller has called `sync` first."""
        return self.balancer.pick(candidates, key)  # type: ignore[return-value]

    def pick_spare(self) -> BackendState | None:
        """In panic: an unhealthy backend under its cap for work that would otherwise be shed."""
        if not self.spare:
            return None
        if self.sharing:
            self._sync(self.spare)
        return self.balancer.pick(self.spare)  # type: ignore[return-value]

    # -- the shared view of load (workers > 1) -------------------------------------------------

    def use_shared(self, view: Any) -> None:
        """Read the group's load from `view` (edgelb.workers.shared_load.WorkerView) from now
        on: picks, caps and the queue see every worker's in-flight on a backend, and this
        worker's own is added to its cells. Requests already open are carried over."""
        if view is None or self.sharing:
            return
        self.shared = view
        self.load_words = view.words
        self.load_counts = view.counts
        self.load_floats = view.floats
        self.load_stride = view.stride
        self.load_first = view.cells
        self.load_own = view.cells + view.worker * view.stride
        self.load_workers = view.workers
        self.sharing = True
        for b in self.all_backends():
            b.own = b.inflight
            self._bind(b)

    def _bind(self, backend: BackendState) -> None:
        """Give `backend` the slot the control process assigned its key (-1: none yet), its
        open requests moving with it into this worker's cell of that slot."""
        slot = self.shared.slot(backend.key)
        old = backend.slot
        if slot != old:
            own = backend.own
            if own and old >= 0:
                self._add(old, -own)
            if own and slot >= 0:
                self._add(slot, own)
            backend.slot = slot

    def open_here(self, backend: BackendState) -> int:
        """This process's requests open on `backend` (what adds up across workers): its own
        count with a shared view, where `inflight` is the group's as last read."""
        return backend.own if self.sharing else backend.inflight

    def sync(self) -> None:
        """Read the group's load of the candidates (and spares) before a pick that does not go
        through `pick` (a sticky cookie, a zone's subset); nothing without a shared view."""
        if self.sharing:
            self._sync(self.candidates)
            if self.spare:
                self._sync(self.spare)

    def _sync(self, backends: list[BackendState]) -> None:
        """The group's in-flight and freshest latency estimate of `backends`, and whether each
        is under its cap now (in the same step of the loop as the pick and the acquire that
        follow it: what the bound in edgelb/workers/shared_load.py rests on)."""
        words = self.load_words
        counts = self.load_counts
        stride = self.load_stride
        workers = self.load_workers
        mine = self.load_own
        ticks = self.load_ticks = self.load_ticks + 1
        if not ticks & LATENCY_EVERY:
            self._sync_latency(backends)
        for b in backends:
            slot = b.slot
            if slot < 0:
                total = b.own
            else:
                at = slot * 4
                i = self.load_first + at
                mine_i = mine + at
                total = counts[slot]  # this worker's own, known without reading its cell
                for _ in range(workers):
                    if i != mine_i:
                        total += words[i]
                    i += stride
            b.inflight = total
            cap = b.cap
            b.eligible = b.usable and (cap <= 0 or total < cap)

    def _add(self, slot: int, n: int) -> None:
        """`n` more (or fewer) requests of this worker open on `slot`, in its cell."""
        counts = self.load_counts
        c = counts[slot] = counts[slot] + n
        self.load_words[self.load_own + slot * 4] = c

    def _sync_latency(self, backends: list[BackendState]) -> None:
        """Adopt the freshest latency estimate of each of `backends` (every LATENCY_EVERY + 1
        picks: an estimate moves at responses, over tens of milliseconds; in-flight counts are
        read at every pick)."""
        floats = self.load_floats
        stride = self.load_stride
        for b in backends:
            slot = b.slot
            if slot >= 0:
                i = self.load_first + slot * 4 + 2
                fresh = b.latency_t
                found = -1
                for _ in range(self.load_workers):
                    if floats[i] > fresh:
                        fresh = floats[i]
                        found = i
                    i += stride
                if found >= 0:
                    b.latency = floats[found - 1]
                    b.latency_t = fresh

    def _acquire_shared(self, backend: BackendState, k: int) -> None:
        backend.own += 1
        slot = backend.slot
        if slot >= 0:
            self._add(slot, 1)
        if 0 < backend.cap <= k:
            backend.eligible = False

    def _release_shared(self, backend: BackendState, k: int) -> None:
        """The rest of `release` with a shared view: this worker's cell, the latency estimate
        published, eligibility, and a waiter may go (a slot of the group's cap came free)."""
        backend.own -= 1
        slot = backend.slot
        if slot >= 0:
            self._add(slot, -1)
            i = self.load_own + slot * 4
            floats = self.load_floats
            floats[i + 1] = backend.latency
            floats[i + 2] = backend.latency_t
        cap = backend.cap
        backend.eligible = backend.usable and (cap <= 0 or k - 1 < cap)
        if backend.draining:
            self._forget_if_drained(backend)
        if self.waiters:
            self.dispatch()

    def _poll_waiters(self) -> None:
        """With a shared view, another worker's release frees a slot this worker is not told
        of: while requests wait, look every POLL_INTERVAL."""
        self.poll = None
        if self.waiters:
            self.dispatch()
            if self.waiters:
                self.poll = asyncio.get_running_loop().call_later(POLL_INTERVAL,
                                                                  self._poll_waiters)

    # -- caps and the wait queue ---------------------------------------------------------------

    def acquire(self, backend: BackendState) -> None:
        """One more request (connection) on `backend`; at its cap it is not eligible."""
        k = backend.inflight = backend.inflight + 1
        if self.sharing:
            self._acquire_shared(backend, k)
        elif k == backend.cap:
            backend.eligible = False

    def release(self, backend: BackendState, rtt: float = -1.0, now: float = 0.0) -> None:
        """One request (connection) on `backend` ended. `rtt`: the backend answered it in
        that many seconds, a sample for its adaptive limit (with the in-flight count it had),
        which may move the cap before the slot is given back."""
        k = backend.inflight
        backend.inflight = k - 1
        if rtt >= 0.0:
            lim = backend.limiter
            if lim is not None and lim.sample(rtt, now, k):
                self.cap_changed(backend, lim.limit)
        if self.sharing:
            self._release_shared(backend, k)
        elif k == backend.cap or backend.draining:
            self._release_slow(backend, k)

    def _release_slow(self, backend: BackendState, k: int) -> None:
        """The rest of `release` once in-flight went down from `k`: the backend was at its
        cap or is draining."""
        if k == backend.cap:
            self._below_cap(backend)
        if backend.draining:
            self._forget_if_drained(backend)

    def cap_changed(self, backend: BackendState, cap: int) -> None:
        """The adaptive limit moved `backend`'s cap."""
        if cap != backend.cap:
            backend.set_cap(cap)
            if self.waiters and backend.eligible:
                self.dispatch()

    def _below_cap(self, backend: BackendState) -> None:
        """`backend` went below its cap: eligible again, and a waiter may go."""
        backend.eligible = backend.usable
        if self.waiters:
            self.dispatch()

    def at_capacity(self) -> bool:
        """Whether a failed pick means "wait for a slot" (some backend is usable but every
        usable one is at its cap) rather than "nothing to send to"."""
        return self.usable > 0

    def enqueue(self, waiter: Any, now: float) -> bool:
        """Queue `waiter` for a free slot until now + queue_timeout; False when full."""
        waiters = self.waiters
        if len(waiters) >= self.queue_size:
            return False
        waiter.wait_until = now + self.queue_timeout
        waiters.append(waiter)
        if self.timer is None:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_at(waiter.wait_until, self._expire_waiters)
        if self.sharing and self.poll is None:
            self.poll = asyncio.get_running_loop().call_later(POLL_INTERVAL, self._poll_waiters)
        return True

    def forget(self, waiter: Any) -> None:
        """A waiter whose client went away leaves the queue at once."""
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

    def dispatch(self) -> None:
        """Hand free slots to waiters, first come first served."""
        waiters = self.waiters
        while waiters:
            if not waiters[0].resume():
                return  # no eligible backend for it: it keeps its place
            waiters.popleft()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire_waiters(self) -> None:
        self.timer = None
        waiters = self.waiters
        if not waiters:
            return
        loop = asyncio.get_running_loop()
        now = loop.time() + 0.0005  # the timer may fire a hair early
        while waiters and waiters[0].wait_until <= now:
            waiters.popleft().shed("queue_timeout")
        if waiters:
            self.timer = loop.call_at(waiters[0].wait_until, self._expire_waiters)

    def shed_all(self, reason: str) -> None:
        """Answer every waiter at once (the service went away)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.poll is not None:
            self.poll.cancel()
            self.poll = None
        waiters, self.waiters = self.waiters, deque()
        for w in waiters:
            w.shed(reason)

    # -- health, ejection, panic -------------------------------------------------------------

    def refresh(self) -> None:
        """Recompute which backends may be picked, after any change of health, ejection,
        membership or weight.

        Panic mode: when fewer than `panic_threshold` of the backends the source calls ready
        are healthy by our own account (active checks, ejection), the unhealthy ones are used
        too rather than melt the few that remain. Without caps, that is Envoy's panic: balance
        over all of them. With caps, the healthy backends cannot melt (their caps hold), so
        they keep the traffic up to their caps and the queue, and the unhealthy ones (`spare`)
        take only what would otherwise be refused with a 503. The source's own verdict (not
        ready, terminating) is never overridden.

        Tiers (Backend.tier, e.g. SRV priorities): only the lowest tier that has a usable
        backend takes work, as if it were the whole pool (panic included); the backends of
        the other tiers are not candidates until every lower tier has none."""
        members = self._active_tier() if self.tiered else self.backends
        live = [b for b in members if b.healthy and not b.draining and b.spec.weight > 0]
        ok = sum(1 for b in live if b.check_ok and not b.ejected_until)
        panic = bool(live) and ok < self.panic_threshold * len(live)
        if panic != self.panic:
            self.panic = panic
            if panic:
                log.warning("panic: %d of %d backends healthy (below %.0f%%); balancing over "
                            "all of them", ok, len(live), self.panic_threshold * 100)
            else:
                log.warning("panic over: %d of %d backends healthy", ok, len(live))
        usable = ejected = 0
        capped = self.capped
        candidates: list[BackendState] = []
        spare: list[BackendState] = []
        for b in self.backends:
            fine = b.check_ok and not b.ejected_until
            ejected += b.ejected_until > 0
            if members is not self.backends and b.spec.tier != self.tier:
                b.usable = b.eligible = False  # a tier that waits for the ones before it
                continue
            b.usable = b.weight > 0 and not b.draining and b.healthy and (panic or fine)
            b.eligible = b.usable and (b.cap <= 0 or b.inflight < b.cap)
            if panic and capped and not fine:
                if b.usable:
                    spare.append(b)
                continue
            candidates.append(b)
            usable += b.usable
        if candidates != self.candidates:
            self.balancer.reset(candidates)  # e.g. a hash ring over the new membership
        self.candidates = candidates
        self.spare = spare
        self.usable = usable
        self.ejected = ejected
        if self.waiters:
            if usable:
                self.dispatch()
            else:
                self.shed_all("no_backend")  # (spare backends, if any, take them)

    def _active_tier(self) -> list[BackendState]:
        """The backends of the tier that takes work (`self.tier`): the lowest with a backend
        that is healthy, checked fine and not ejected; else the lowest with one the source
        calls ready (its panic mode decides); else the lowest."""
        tiers: dict[int, list[BackendState]] = {}
        for b in sorted(self.backends, key=_tier_of):
            tiers.setdefault(b.spec.tier, []).append(b)
        if not tiers:
            return []
        chosen = min(tiers)
        for wanted in (True, False):
            found = [t for t, bs in tiers.items() if any(
                b.healthy and not b.draining and b.spec.weight > 0
                and (not wanted or (b.check_ok and not b.ejected_until)) for b in bs)]
            if found:
                chosen = min(found)
                break
        if chosen != self.tier:
            log.warning("failover: tier %d takes the traffic now (was tier %d)", chosen,
                        self.tier)
            self.tier = chosen
        return tiers[chosen]

    def set_check(self, backend: BackendState, ok: bool, now: float, slow_start: float) -> None:
        """The active health check's verdict changed."""
        if backend.check_ok == ok:
            return
        backend.check_ok = ok
        if ok and backend.ejected_until:
            # back to health by its checks: that ends an ejection too (as Envoy does)
            backend.ejected_until = 0.0
            backend.returned_at = now
            backend.fails = 0
        if ok and slow_start > 0 and now:
            backend.start_ramp(now)  # a recovering backend ramps up
            self.ramping += 1
        self.refresh()

    def failure(self, backend: BackendState, kind: str, now: float) -> None:
        """A failure of `kind` (balancers.outlier.failure_kind) on `backend`: ejects it after
        `outlier.failures` in a row, within the share of the pool that may be out."""
        outlier = self.outlier
        if outlier is None or kind not in outlier.kinds:
            return
        backend.fails += 1
        if backend.fails < outlier.failures or backend.ejected_until or backend.draining:
            return
        if not may_eject(self.ejected, len(self.backends), outlier.max_ejected):
            return
        if backend.returned_at and now - backend.returned_at > outlier.max_ejection:
            times = 1  # well behaved for a while since its last ejection: start over
        else:
            times = backend.ejections + 1
        backend.ejections += 1
        seconds = ejection_seconds(times, outlier.ejection, outlier.max_ejection, self.rng)
        backend.ejected_until = now + seconds
        backend.fails = 0
        log.warning("ejected backend %s for %.1fs after %d failures in a row (last: %s)",
                    backend.key, seconds, outlier.failures, kind)
        self.refresh()

    def sweep(self, now: float, slow_start: float) -> None:
        """Called a few times a second: ejections that are over end (with a slow start)."""
        if not self.ejected:
            return
        changed = False
        for b in self.backends:
            if b.ejected_until and b.ejected_until <= now:
                b.ejected_until = 0.0
                b.returned_at = now
                b.fails = 0
                changed = True
                if slow_start > 0:
                    b.start_ramp(now)
                    self.ramping += 1
                log.warning("backend %s is back from ejection", b.key)
        if changed:
            self.refresh()

    def pick_other(self, exclude: BackendState) -> BackendState | None:
        """A second choice for a retry: any eligible backend but `exclude`."""
        self.sync()
        others = [b for b in self.candidates if b is not exclude]
        other = self.balancer.pick(others)
        if other is None and self.spare:
            other = self.balancer.pick([b for b in self.spare if b is not exclude])
        return other  # type: ignore[return-value]

    def update(
        self,
        specs: tuple[Backend, ...],
        policy_name: str,
        now: float = 0.0,
        slow_start: float = 0.0,
        cap: int = 0,
        sticky: bool = False,
        instance: InstanceConfig | None = None,
        policy: Policy | None = None,
    ) -> None:
        """Apply a new backend list in place: kept backends keep their state.

        With a clock (`now`) and a `slow_start` window, a backend added to a pool that already
        serves starts at 10% of its weight and ramps up (the first backends of a new pool do not:
        there is nothing to protect them from)."""
        if policy_name != self.policy_name:
            self.policy_name = policy_name
            self.balancer = balancers.make(policy_name, self.balancer.rng)
            self.balancer_keyed = self.balancer.keyed
        self.zone = ""
        if policy is not None and instance is not None:
            if policy.zone_aware and instance.zone:
                self.zone = instance.zone
                self.zone_threshold = policy.zone_threshold
            if policy.subset and instance.replicas > 1:
                specs = _subset(specs, policy.subset, instance)
        self.keyed = self.balancer_keyed or sticky or bool(self.zone)
        new: dict[str, BackendState] = {}
        ramp = bool(now and slow_start > 0 and self.by_key)
        for spec in specs:
            if spec.key in new:
                continue  # duplicates are joined by address
            state = self.by_key.get(spec.key) or self.draining.pop(spec.key, None)
            if state is None:
                state = BackendState(spec)
                if ramp:
                    state.start_ramp(now)
            else:
                state.draining = False
                state.set_spec(spec)
            if self.sharing:
                self._bind(state)
            new[spec.key] = state
        for key, state in self.by_key.items():
            if key not in new:
                state.start_draining()
                if state.own if self.sharing else state.inflight:
                    self.draining[key] = state
        self.by_key = new
        self.backends = list(new.values())
        adaptive = policy is not None and policy.adaptive
        self._set_caps(cap, adaptive)
        if policy is not None:
            self.outlier = policy.outlier
            self.panic_threshold = policy.panic_threshold
            self.capped = bool(cap or adaptive)
            self.queue_size = policy.queue_size
            self.queue_timeout = policy.queue_timeout
        self.by_sticky = {b.sticky_id: b for b in self.backends}
        self.tiered = len({b.spec.tier for b in self.backends}) > 1
        if not self.tiered:
            self.tier = self.backends[0].spec.tier if self.backends else 0
        self.ramping = sum(1 for b in self.backends if b.ramp_start)
        self.balancer.reset(self.backends)
        self.refresh()

    def _set_caps(self, cap: int, adaptive: bool) -> None:
        """Per-backend caps: `max_inflight` scaled by weight / mean weight (so equal weights
        get exactly `max_inflight`), at least 1; with `adaptive`, a gradient limiter moves
        each cap below that bound (1000 when no max_inflight is set)."""
        weights = [b.spec.weight for b in self.backends if b.spec.weight > 0]
        mean = sum(weights) / len(weights) if weights else 1.0
        for b in self.backends:
            static = max(1, round(cap * b.spec.weight / mean)) if cap else 0
            b.static_cap = static
            if adaptive:
                bound = static or ADAPTIVE_MAX
                lim = b.limiter
                if lim is None or lim.max_limit != bound:
                    b.limiter = lim = GradientLimit(
                        min(bound, ADAPTIVE_INITIAL), min_limit=1, max_limit=bound
                    )
                b.set_cap(lim.limit)
            else:
                b.limiter = None
                b.set_cap(static)

    def ramp(self, now: float, window: float) -> None:
        """Move slow-starting backends along their ramp (called a few times a second)."""
        ramping = 0
        for b in self.backends:
            if b.ramp_start:
                factor = slow_start_factor(now - b.ramp_start, window) if window > 0 else 1.0
                if factor >= 1.0:
                    b.ramp_start = 0.0
                    b.set_weight(b.spec.weight)
                else:
                    b.set_weight(b.spec.weight * factor)
                    ramping += 1
        self.ramping = ramping

    def _forget_if_drained(self, backend: BackendState) -> None:
        """A draining backend whose in-flight count reached zero leaves the pool."""
        if backend.draining and (backend.own if self.sharing else backend.inflight) == 0:
            self.draining.pop(backend.key, None)

    def all_backends(self) -> list[BackendState]:
        return [*self.backends, *self.draining.values()]


def _tier_of(b: BackendState) -> int:
    return b.spec.tier


def _subset(specs: tuple[Backend, ...], size: int, instance: InstanceConfig) -> tuple[Backend, ...]:
    """The backends this replica balances over (balancers.subset: the same size for all)."""
    keys = list(dict.fromkeys([s.key for s in specs]))
    if size > 0 and size >= len(keys):
        return specs
    chosen = set(subset(keys, instance.replica, instance.replicas, size if size > 0 else None))
    return tuple(s for s in specs if s.key in chosen)


class ServiceState:
    """A service's live state: its spec, its pool, and its counters."""

    __slots__ = (
        "auth_results",
        "bytes_in",
        "bytes_out",
        "duration_sums",
        "durations",
        "hsts_line",
        "local_counts",
        "local_responses",
        "mirrors",
        "name",
        "policy",
        "pool",
        "req_size_sum",
        "req_sizes",
        "resp_size_sum",
        "resp_sizes",
        "retries_denied",
        "retries_total",
        "retrying",
        "shed",
        "spec",
        "special",
        "sticky_cookie",
        "tcp_connections",
    )

    def __init__(
        self,
        spec: Service,
        rng: random.Random | None = None,
        instance: InstanceConfig | None = None,
    ) -> None:
        self.name = spec.name
        self.spec = spec
        self.policy: Policy = spec.policy
        self.pool = Pool(spec.policy.balance, rng)
        policy = spec.policy
        self.pool.update(
            spec.backends,
            policy.balance,
            cap=policy.max_inflight or 0,
            sticky=policy.sticky,
            instance=instance,
            policy=policy,
        )
        self.bytes_in = 0  # from clients
        self.bytes_out = 0  # to clients
        self.tcp_connections = 0  # accepted client connections, tcp mode
        self.shed: dict[str, int] = {}  # reason -> count
        self.retrying = 0  # requests now on a retry (each holds a share of the retry budget)
        self.retries_total = 0  # retries sent
        self.retries_denied = 0  # retries not sent because the budget was spent
        # basic auth verdicts, indexed as edgelb.net.acl.AUTH_RESULTS (ok, cached, failed, ...)
        self.auth_results = [0] * 6
        self.local_responses: dict[int, int] = {}  # answered by edgelb itself, no backend
        self.mirrors: dict[str, int] = {}  # copies sent here by routes' mirrors, by result
        self.local_counts: dict[int, int] = {}  # the same by method: method_index << 10 | status
        # edgelb_request_duration_seconds by method and status class: N_DURATION buckets for
        # each (method_index * N_CLASSES + status // 100), and their sums
        self.durations = [0] * (len(METHOD_NAMES) * N_CLASSES * N_DURATION)
        self.duration_sums = [0.0] * (len(METHOD_NAMES) * N_CLASSES)
        self.req_sizes = [0] * N_SIZE  # request body bytes, per SIZE_BUCKETS bucket
        self.resp_sizes = [0] * N_SIZE  # response body bytes
        self.req_size_sum = 0
        self.resp_size_sum = 0
        self._derive()

    def _derive(self) -> None:
        """Per-request switches derived from the policy (read on the data path)."""
        policy = self.policy
        # `special`: the request path must look at sources, auth, redirect_to_https, max_body
        self.special = (policy.redirect_to_https or policy.max_body is not None
                        or policy.sources is not None or policy.auth is not None)
        self.hsts_line = (
            b"strict-transport-security: max-age=%d\r\n" % policy.hsts if policy.hsts else b""
        )
        self.sticky_cookie = policy.sticky_cookie.encode("latin-1")

    @property
    def duration_count(self) -> int:
        """Responses timed (status.json, the page's rates): the labelled histogram's total."""
        return sum(self.durations)

    @property
    def duration_sum(self) -> float:
        return sum(self.duration_sums)

    def update(
        self, spec: Service, now: float = 0.0, instance: InstanceConfig | None = None
    ) -> None:
        """A new spec for this service; `now` (the loop's clock) enables slow start."""
        self.spec = spec
        if spec.policy.auth is not None and self.policy.auth is not None:
            spec.policy.auth.adopt(self.policy.auth)  # same users: keep caches and throttle
        policy = self.policy = spec.policy
        self._derive()
        self.pool.update(
            spec.backends,
            policy.balance,
            now,
            policy.slow_start,
            policy.max_inflight or 0,
            policy.sticky,
            instance,
            policy,
        )

    def observe(self, seconds: float, method: int = 0, status: int = 200) -> None:
        """One response's duration (the data path inlines this: accounting.count)."""
        i = bisect_left(DURATION_BUCKETS, seconds)
        c = method * N_CLASSES + min(status // 100, 5)
        self.durations[c * N_DURATION + i] += 1
        self.duration_sums[c] += seconds
