"""Pure balancing policies: given the backends' load figures, pick one. No sockets, no clocks."""

from __future__ import annotations

import random

from balancers.base import Balancer, Candidate
from balancers.least_loaded import LeastLoaded
from balancers.round_robin import RoundRobin

POLICIES: dict[str, type[Balancer]] = {
    LeastLoaded.name: LeastLoaded,
    RoundRobin.name: RoundRobin,
}


def make(name: str, rng: random.Random | None = None) -> Balancer:
    """Build the policy called `name`; raises KeyError naming the known ones."""
    try:
        cls = POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise KeyError(f"unknown balance policy {name!r}; known: {known}") from None
    return cls(rng or random.Random())


__all__ = ["POLICIES", "Balancer", "Candidate", "LeastLoaded", "RoundRobin", "make"]
