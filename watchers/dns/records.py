"""A pure function from the targets of a DNS answer to a service's backends."""

from __future__ import annotations

from collections.abc import Iterable

from watchers.dns.resolver import Target
from watchers.model import Backend


def tier_of(priority: int, weight: int) -> int:
    """RFC 2782 as failover tiers (Backend.tier): a lower priority first; within a priority,
    the targets of weight 0 only when none of the others is usable."""
    return 2 * priority + (1 if weight == 0 else 0)


def backends_of(targets: Iterable[Target]) -> tuple[Backend, ...]:
    """One backend per address: SRV weight -> capacity weight (a weight of 0 serves as 1 in
    its own tier, after the rest of its priority), SRV priority -> tier. An address listed more
    than once (two records, two targets with one address) is one backend, in the best tier any
    of them gives it, with the largest weight of that tier. Sorted, so the same records in
    another order give an equal tuple."""
    best: dict[tuple[str, int], tuple[int, int]] = {}  # (host, port) -> (tier, weight)
    for t in targets:
        if not 0 < t.port < 65536:
            continue  # port 0: not a place to connect to
        tier = tier_of(t.priority, t.weight)
        weight = max(t.weight, 1)
        held = best.get((t.host, t.port))
        if held is None or tier < held[0] or (tier == held[0] and weight > held[1]):
            best[(t.host, t.port)] = (tier, weight)
    return tuple(
        Backend(host=host, port=port, weight=float(weight), tier=tier)
        for (host, port), (tier, weight) in sorted(best.items(), key=lambda i: (i[1][0], i[0]))
    )
