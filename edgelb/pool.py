"""Live, mutable state beside the immutable snapshot values.

`BackendState` and `ServiceState` hold the counters of the data path as plain attributes (the
hot path only does `+= 1`); the metrics collector and /status.json read them at scrape time.
A `Pool` is updated in place by the runtime when a new snapshot arrives: a backend that stays
keeps its object (and so its counters and idle connections); a removed one drains.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_left
from collections import defaultdict
from typing import Any

import balancers
from balancers.subset import subset
from balancers.weights import slow_start_factor
from edgelb.config import InstanceConfig
from watchers.model import Backend, Policy, Service

# Upper bounds (seconds) of edgelb_request_duration_seconds; the last bucket is +Inf.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class BackendState:
    """One backend as the data path sees it. Implements balancers.Candidate."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "cap",
        "capacity",
        "connections_total",
        "draining",
        "eligible",
        "failures",
        "healthy",
        "idle",
        "inflight",
        "key",
        "latency",
        "latency_t",
        "open_connections",
        "ramp_start",
        "requests",
        "responses",
        "spec",
        "sticky_id",
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
        self.cap = 0  # concurrency cap the cost model may use (max_inflight); 0 = none
        self.capacity = 1.0  # what the balancer reads: max(1, weight), lowered to cap
        self.ramp_start = 0.0  # loop time its slow start began; 0.0 = not ramping
        self.inflight = 0  # requests (http) or connections (tcp) now open
        # peak EWMA of response latency (balancers.ewma), updated by the data path
        self.latency = 0.0  # seconds; 0.0 = nothing measured yet
        self.latency_t = 0.0  # loop time of the last update
        self.healthy = spec.ready and not spec.terminating
        self.draining = False
        self.eligible = False
        self.requests = 0  # requests sent to it
        self.responses: dict[int, int] = defaultdict(int)  # status code -> count
        self.failures = 0  # connect errors, resets, timeouts
        self.connections_total = 0  # upstream connections opened to it
        self.open_connections = 0
        self.bytes_in = 0  # from the backend
        self.bytes_out = 0  # to the backend
        self.idle: list[Any] = []  # idle keep-alive upstream connections, most recent last
        self._update_eligible()

    def _update_eligible(self) -> None:
        self.eligible = self.healthy and not self.draining and self.weight > 0
        self.set_weight(self.weight)

    def set_weight(self, weight: float) -> None:
        """The effective weight, and the capacity derived from it (kept for the balancer)."""
        self.weight = weight
        capacity = weight if weight > 1.0 else 1.0
        cap = self.cap
        self.capacity = cap if 0 < cap < capacity else capacity

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
    """The backends of one service and the policy that picks among them."""

    __slots__ = (
        "backends",
        "balancer",
        "balancer_keyed",
        "by_key",
        "by_sticky",
        "draining",
        "keyed",
        "policy_name",
        "ramping",
        "zone",
        "zone_threshold",
    )

    def __init__(self, policy_name: str, rng: random.Random | None = None) -> None:
        self.policy_name = policy_name
        self.balancer = balancers.make(policy_name, rng)
        self.backends: list[BackendState] = []  # what the balancer sees
        self.by_key: dict[str, BackendState] = {}
        self.draining: dict[str, BackendState] = {}  # removed, still finishing requests
        self.ramping = 0  # backends in slow start
        self.by_sticky: dict[bytes, BackendState] = {}
        self.balancer_keyed = self.balancer.keyed  # the policy hashes a key
        self.keyed = self.balancer_keyed  # pick via the slower path: key, cookie or zone
        self.zone = ""  # the proxy's zone when zone-aware balancing is on
        self.zone_threshold = 0.8

    def pick(self, key: bytes | None = None) -> BackendState | None:
        return self.balancer.pick(self.backends, key)  # type: ignore[return-value]

    def pick_other(self, exclude: BackendState) -> BackendState | None:
        """A second choice for a retry: any eligible backend but `exclude`."""
        others = [b for b in self.backends if b is not exclude]
        return self.balancer.pick(others)  # type: ignore[return-value]

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
            new[spec.key] = state
        for key, state in self.by_key.items():
            if key not in new:
                state.start_draining()
                if state.inflight:
                    self.draining[key] = state
        self.by_key = new
        self.backends = list(new.values())
        for state in self.backends:
            state.cap = cap
            state.set_weight(state.weight)
        self.by_sticky = {b.sticky_id: b for b in self.backends}
        self.ramping = sum(1 for b in self.backends if b.ramp_start)
        self.balancer.reset(self.backends)

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

    def released(self, backend: BackendState) -> None:
        """Call when a draining backend's in-flight count may have reached zero."""
        if backend.draining and backend.inflight == 0:
            self.draining.pop(backend.key, None)

    def all_backends(self) -> list[BackendState]:
        return [*self.backends, *self.draining.values()]


def _subset(specs: tuple[Backend, ...], size: int, instance: InstanceConfig) -> tuple[Backend, ...]:
    """The backends this replica balances over (balancers.subset: the same size for all)."""
    keys = list(dict.fromkeys(s.key for s in specs))
    if size > 0 and size >= len(keys):
        return specs
    chosen = set(subset(keys, instance.replica, instance.replicas, size if size > 0 else None))
    return tuple(s for s in specs if s.key in chosen)


class ServiceState:
    """A service's live state: its spec, its pool, and its counters."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "duration_buckets",
        "duration_sum",
        "local_responses",
        "name",
        "policy",
        "pool",
        "shed",
        "spec",
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
        self.duration_buckets = [0] * (len(DURATION_BUCKETS) + 1)  # per bucket, not cumulative
        self.duration_sum = 0.0
        self.bytes_in = 0  # from clients
        self.bytes_out = 0  # to clients
        self.tcp_connections = 0  # accepted client connections, tcp mode
        self.shed: dict[str, int] = {}  # reason -> count
        self.local_responses: dict[int, int] = {}  # answered by edgelb itself, no backend

    @property
    def duration_count(self) -> int:
        return sum(self.duration_buckets)

    def update(
        self, spec: Service, now: float = 0.0, instance: InstanceConfig | None = None
    ) -> None:
        """A new spec for this service; `now` (the loop's clock) enables slow start."""
        self.spec = spec
        policy = self.policy = spec.policy
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

    def observe(self, seconds: float) -> None:
        self.duration_buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds
