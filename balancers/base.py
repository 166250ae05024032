"""The seam between the proxy and its policies.

A policy sees each backend through four figures (the `Candidate` protocol) and returns one of
the sequence it was given, or None when none is eligible. Load is measured by the proxy
(acquire when a request is sent, release when it ends); selection is the policy's alone.

Optional figures, read with `getattr` defaults because older candidates may lack them:
`cap` (int, per-backend concurrency cap, 0 = none), `zone` (str, "" = unknown) and `key`
(str, a stable identity such as "host:port", used by consistent hashing).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar, Protocol


class Candidate(Protocol):
    weight: float  # effective capacity share, > 0 (0 means drain: never picked)
    inflight: int  # requests (connections in tcp mode) now open on it
    latency: float  # latency estimate in seconds, 0.0 when nothing is known yet
    eligible: bool  # healthy, not draining, not ejected, under its cap


class Balancer:
    """Base of every policy. Subclasses set `name` and implement `pick`."""

    # class attributes, read from the classes too (balancers.POLICIES)
    name: ClassVar[str] = ""
    keyed: ClassVar[bool] = False  # True when pick() wants a key (the caller then finds one)

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, backends: Sequence[Candidate], key: bytes | None = None) -> Candidate | None:
        raise NotImplementedError

    def reset(self, backends: Sequence[Candidate]) -> None:
        """Called when the pool's membership changes (the sequence passed to pick changes)."""


def usable(b: Candidate) -> bool:
    """Eligible and with a positive weight: the only backends a policy may return."""
    return b.eligible and b.weight > 0
