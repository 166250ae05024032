"""Effective weights: slow start ramps a new or returning backend from 10% to 100%.

A weight of 0 means drain: the caller makes such a backend ineligible, and no policy ever
returns a backend whose weight is not positive.
"""

from __future__ import annotations

SLOW_START_WINDOW = 30.0  # seconds
SLOW_START_FLOOR = 0.1  # share of its weight a backend gets at age 0


def slow_start_factor(age_seconds: float, window: float = SLOW_START_WINDOW) -> float:
    """0.1 at age 0, rising linearly to 1.0 at `window` seconds (1.0 when window <= 0)."""
    if window <= 0 or age_seconds >= window:
        return 1.0
    return SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * max(0.0, age_seconds) / window


def effective_weight(weight: float, age_seconds: float, window: float = SLOW_START_WINDOW) -> float:
    """`weight` scaled by the slow start factor; 0 (drain) and negative weights give 0."""
    if weight <= 0:
        return 0.0
    return weight * slow_start_factor(age_seconds, window)
