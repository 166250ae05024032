"""The seam between the proxy and its policies.

A policy sees each backend through four figures (the `Candidate` protocol) and returns one of
the sequence it was given, or None when none is eligible. Load is measured by the proxy
(acquire when a request is sent, release when it ends); selection is the policy's alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol


class Candidate(Protocol):
    weight: float  # capacity share, > 0 (0 means drain: never eligible)
    inflight: int  # requests (connections in tcp mode) now open on it
    latency: float  # latency estimate in seconds, 0.0 when nothing is known yet
    eligible: bool  # healthy, not draining, not ejected, under its cap


class Balancer:
    """Base of every policy. Subclasses set `name` and implement `pick`."""

    name = ""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, backends: Sequence[Candidate], key: bytes | None = None) -> Candidate | None:
        raise NotImplementedError

    def reset(self, backends: Sequence[Candidate]) -> None:
        """Called when the pool's membership changes (the sequence passed to pick changes)."""
