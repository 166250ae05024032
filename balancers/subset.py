"""Deterministic subsetting: each proxy replica balances over a subset of the backends.

A variant of the Google SRE book's algorithm. Round r orders all N backends by a hash of
(r, key) instead of a seeded shuffle, and the rounds are laid end to end; replica `ordinal`
takes the `size` entries starting at `ordinal * size`. Any run of M * size consecutive entries
holds every backend q or q + 1 times, so every backend is in the same number of subsets (±1).
A subset that straddles two rounds would repeat a backend: the next round's order is adjusted
(the straddling tail's backends are moved out of its head), so every subset has `size` distinct
backends. Ordering by hash rather than shuffling means adding or removing one backend shifts
the sequence by one entry instead of reshuffling it: a replica's subset changes by a few
backends, not all of them. Pure and cheap: O(N * rounds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from hashlib import blake2b

MIN_SIZE = 12


def auto_size(backends: int, replicas: int) -> int:
    """max(12, ceil(3N/M)), capped at N."""
    return min(backends, max(MIN_SIZE, math.ceil(3 * backends / max(1, replicas))))


def _order(keys: list[str], round_: int) -> list[str]:
    salt = f"{round_}:".encode()
    return sorted(keys, key=lambda k: blake2b(salt + k.encode(), digest_size=8).digest())


def subset(
    keys: Sequence[str], ordinal: int, replicas: int, size: int | None = None
) -> list[str]:
    """The backends (by key) that replica `ordinal` of `replicas` balances over."""
    if replicas < 1:
        raise ValueError(f"subset replicas must be at least 1, got {replicas}")
    if not 0 <= ordinal < replicas:
        raise ValueError(f"subset ordinal {ordinal} is outside 0..{replicas - 1}; "
                         "set it to this replica's index (e.g. the StatefulSet ordinal)")
    unique = sorted(set(keys))
    n = len(unique)
    if n == 0:
        return []
    if size is None:
        size = auto_size(n, replicas)
    if size < 1:
        raise ValueError(f"subset size must be at least 1, got {size}")
    size = min(size, n)
    if size == n:
        return unique
    start = ordinal * size
    end = start + size
    taken: list[str] = []
    order = _order(unique, 0)
    round_ = 0
    base = 0  # position of order[0] in the endless sequence
    while True:
        lo, hi = max(start, base), min(end, base + n)
        if lo < hi:
            taken.extend(order[lo - base:hi - base])
        if base + n >= end:
            return taken
        # the subset straddling the next boundary starts at the last multiple of size in round
        window = ((base + n) // size) * size
        tail = set(order[window - base:]) if window > base else set()
        round_ += 1
        base += n
        nxt = _order(unique, round_)
        if tail:
            head_len = window + size - base  # entries of the next round in that subset
            head = [k for k in nxt if k not in tail][:head_len]
            heads = set(head)
            nxt = head + [k for k in nxt if k not in heads]
        order = nxt
