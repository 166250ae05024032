"""Pure balancing policies: given the backends' load figures, pick one. No sockets, no clocks.

Policies: least-loaded (default), peak-ewma, round-robin, least-connections, hash. Helpers that
the caller applies around them: weights (slow start), ewma (latency estimate), zones (zone
preference), subset (deterministic subsetting).
"""

from __future__ import annotations

import random

from balancers.base import Balancer, Candidate
from balancers.hashing import ConsistentHash
from balancers.least_connections import LeastConnections
from balancers.least_loaded import LeastLoaded, PeakEwma
from balancers.round_robin import RoundRobin

DEFAULT = LeastLoaded.name

POLICIES: dict[str, type[Balancer]] = {
    cls.name: cls
    for cls in (LeastLoaded, PeakEwma, RoundRobin, LeastConnections, ConsistentHash)
}


def make(name: str, rng: random.Random | None = None) -> Balancer:
    """Build the policy called `name`; raises KeyError naming the known ones."""
    try:
        cls = POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise KeyError(f"unknown balance policy {name!r}; known: {known}") from None
    return cls(rng or random.Random())


__all__ = [
    "DEFAULT",
    "POLICIES",
    "Balancer",
    "Candidate",
    "ConsistentHash",
    "LeastConnections",
    "LeastLoaded",
    "PeakEwma",
    "RoundRobin",
    "make",
]
