"""Zone preference: keep traffic in the proxy's zone while the zone has room, spill beyond.

Load of a group = its total in-flight / its total capacity, where a backend's capacity is its
cap when one is set, else its weight (so without caps `threshold` is in-flight per unit weight).
While the in-zone eligible backends are under `threshold`, only they are offered to the policy;
above it (or with no in-zone backend, or no zone known) every backend is, and the policy then
spreads the excess by capacity across zones.
"""

from __future__ import annotations

from collections.abc import Sequence

from balancers.base import Candidate


def capacity(b: Candidate) -> float:
    cap = getattr(b, "cap", 0)
    return float(cap) if cap and cap > 0 else float(b.weight)


def prefer_zone(
    backends: Sequence[Candidate], zone: str, threshold: float
) -> Sequence[Candidate]:
    """The in-zone eligible backends while their load is under `threshold`, else `backends`."""
    if not zone:
        return backends
    local = [b for b in backends
             if b.eligible and b.weight > 0 and getattr(b, "zone", "") == zone]
    if not local:
        return backends
    inflight = sum(b.inflight for b in local)
    room = sum(capacity(b) for b in local)
    if room > 0 and (inflight + 1) / room <= threshold:
        return local
    return backends
