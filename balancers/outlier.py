"""Passive outlier ejection rules (as Envoy applies them), as pure functions.

The pool counts consecutive failures per backend; these helpers say what a failure is called,
whether one more backend may be taken out, and for how long.
"""

from __future__ import annotations

import math
import random

JITTER = 0.1  # an ejection lasts up to this share longer, so ejected backends return spread out

# What the data path saw -> the name used in `watchers.model.OUTLIER_KINDS`. A malformed
# response ("bad") is what a gateway answers 502 for, so it counts as a 502.
FAILURE_KINDS: dict[str, str] = {
    "connect": "connect",
    "reset": "reset",
    "timeout": "timeout",
    "bad": "502",
}
# Response statuses that count; 501 (not implemented) is an answer, not a failure.
STATUS_KINDS: dict[int, str] = {500: "500", 502: "502", 503: "503", 504: "504"}


def failure_kind(kind: str, status: int) -> str | None:
    """The outlier kind of one outcome: `kind` is "connect", "reset", "timeout" or "bad" for a
    request that got no usable response (status 0), or "" with the response `status`.
    None when the outcome is not a failure (or not one of the known kinds)."""
    if kind:
        return FAILURE_KINDS.get(kind)
    return STATUS_KINDS.get(status)


def ejection_seconds(times_ejected: int, base: float, cap: float, rng: random.Random) -> float:
    """How long the `times_ejected`-th ejection (1 = the first) of a backend lasts:
    `min(base * times_ejected, cap)`, plus 0..10% jitter. Never below `base` (also when
    `times_ejected` < 1 or `cap` < `base`: the base wins) and never above
    `max(base, cap) * 1.1`. A non-positive `base` gives 0.0."""
    if not base > 0.0:
        return 0.0
    seconds = base * times_ejected if times_ejected > 1 else base
    if seconds > cap:
        seconds = cap if cap > base else base
    return seconds * (1.0 + JITTER * rng.random())


def max_ejected(pool_size: int, max_share: float) -> int:
    """How many of a pool of `pool_size` may be ejected at once: `max_share` of it, rounded
    down, but always at least one (so a pool of 2 at 10% may lose one)."""
    if pool_size <= 0:
        return 0
    if not max_share > 0.0:  # 0, negative or NaN: still one
        return 1
    if max_share >= 1.0:
        return pool_size
    # the epsilon makes a share written in decimal (0.29 x 100) round as written
    n = math.floor(max_share * pool_size + 1e-9)
    return n if n > 1 else 1


def may_eject(ejected_now: int, pool_size: int, max_share: float) -> bool:
    """Whether one more backend of a pool of `pool_size` may be ejected while `ejected_now`
    are out, under `max_ejected(pool_size, max_share)`.

    The last backend standing may be ejected too (a pool of 1 may lose its only backend), as
    in Envoy: the pool's panic mode then balances over every backend regardless, so the
    ejection costs nothing, and a pool with one bad backend is not kept "healthy" by a rule.
    """
    return ejected_now < max_ejected(pool_size, max_share)
