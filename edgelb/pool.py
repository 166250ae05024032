"""Live, mutable state beside the immutable snapshot values.

`BackendState` and `ServiceState` hold the counters of the data path as plain attributes (the
hot path only does `+= 1`); the metrics collector and /status.json read them at scrape time.
A `Pool` is updated in place by the runtime when a new snapshot arrives: a backend that stays
keeps its object (and so its counters and idle connections); a removed one drains.
"""

from __future__ import annotations

import random
from bisect import bisect_left
from collections import defaultdict
from typing import Any

import balancers
from watchers.model import Backend, Policy, Service

# Upper bounds (seconds) of edgelb_request_duration_seconds; the last bucket is +Inf.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class BackendState:
    """One backend as the data path sees it. Implements balancers.Candidate."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "connections_total",
        "draining",
        "eligible",
        "failures",
        "healthy",
        "idle",
        "inflight",
        "key",
        "latency",
        "open_connections",
        "requests",
        "responses",
        "spec",
        "weight",
    )

    def __init__(self, spec: Backend) -> None:
        self.spec = spec
        self.key = spec.key
        self.weight = spec.weight
        self.inflight = 0  # requests (http) or connections (tcp) now open
        self.latency = 0.0  # seconds, an EWMA the data path updates per response; 0.0 at first
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

    def set_spec(self, spec: Backend) -> None:
        self.spec = spec
        self.weight = spec.weight
        self.healthy = spec.ready and not spec.terminating
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

    __slots__ = ("backends", "balancer", "by_key", "draining", "policy_name")

    def __init__(self, policy_name: str, rng: random.Random | None = None) -> None:
        self.policy_name = policy_name
        self.balancer = balancers.make(policy_name, rng)
        self.backends: list[BackendState] = []  # what the balancer sees
        self.by_key: dict[str, BackendState] = {}
        self.draining: dict[str, BackendState] = {}  # removed, still finishing requests

    def pick(self, key: bytes | None = None) -> BackendState | None:
        return self.balancer.pick(self.backends, key)  # type: ignore[return-value]

    def pick_other(self, exclude: BackendState) -> BackendState | None:
        """A second choice for a retry: any eligible backend but `exclude`."""
        others = [b for b in self.backends if b is not exclude]
        return self.balancer.pick(others)  # type: ignore[return-value]

    def update(self, specs: tuple[Backend, ...], policy_name: str) -> None:
        """Apply a new backend list in place: kept backends keep their state."""
        if policy_name != self.policy_name:
            self.policy_name = policy_name
            self.balancer = balancers.make(policy_name, self.balancer.rng)
        new: dict[str, BackendState] = {}
        for spec in specs:
            if spec.key in new:
                continue  # duplicates are joined by address
            state = self.by_key.get(spec.key) or self.draining.pop(spec.key, None)
            if state is None:
                state = BackendState(spec)
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
        self.balancer.reset(self.backends)

    def released(self, backend: BackendState) -> None:
        """Call when a draining backend's in-flight count may have reached zero."""
        if backend.draining and backend.inflight == 0:
            self.draining.pop(backend.key, None)

    def all_backends(self) -> list[BackendState]:
        return [*self.backends, *self.draining.values()]


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

    def __init__(self, spec: Service, rng: random.Random | None = None) -> None:
        self.name = spec.name
        self.spec = spec
        self.policy: Policy = spec.policy
        self.pool = Pool(spec.policy.balance, rng)
        self.pool.update(spec.backends, spec.policy.balance)
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

    def update(self, spec: Service) -> None:
        self.spec = spec
        self.policy = spec.policy
        self.pool.update(spec.backends, spec.policy.balance)

    def observe(self, seconds: float) -> None:
        self.duration_buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds
