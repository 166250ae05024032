"""Peak EWMA of response latency (as Finagle and Linkerd keep it), as pure functions.

The estimate jumps up to a slower sample at once (so a backend that degrades is avoided after
one slow response) and otherwise decays toward new samples with weight `exp(-dt / tau)`, so a
recovered backend earns traffic back over a few `tau`. Errors count as slow samples of at least
`ERROR_PENALTY` seconds: a backend that fails fast must not look like the fastest one.
"""

from __future__ import annotations

import math

TAU = 10.0  # seconds; the decay time constant
ERROR_PENALTY = 1.0  # seconds; the least latency an error (reset, timeout, 5xx) counts for


def peak_ewma(prev: float, prev_time: float, sample: float, now: float, tau: float = TAU) -> float:
    """The new estimate after observing `sample` seconds at time `now` (any monotonic clock).

    `prev` is the estimate last updated at `prev_time`; 0.0 (or less) means unknown, and then
    the sample is taken as it is.
    """
    if prev <= 0.0 or sample >= prev:
        return sample
    if tau <= 0.0:
        return sample
    dt = now - prev_time
    w = math.exp(-dt / tau) if dt > 0.0 else 1.0
    return prev * w + sample * (1.0 - w)


def error_sample(elapsed: float) -> float:
    """The latency sample to record for a failed request that took `elapsed` seconds."""
    return elapsed if elapsed > ERROR_PENALTY else ERROR_PENALTY


def decayed(prev: float, prev_time: float, now: float, floor: float, tau: float = TAU) -> float:
    """The estimate read at `now` without a new sample, decaying toward `floor` (for a backend
    that gets no traffic: its stale peak fades so that it is probed again)."""
    if prev <= floor or now <= prev_time or tau <= 0.0:
        return prev
    w = math.exp(-(now - prev_time) / tau)
    return prev * w + floor * (1.0 - w)
