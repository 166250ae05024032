"""Effective weights: slow start (placeholder until the balancing work lands; same API)."""

from __future__ import annotations


def slow_start_factor(age_seconds: float, window: float = 30.0) -> float:
    """0.1 at age 0, rising linearly to 1.0 at `window` seconds."""
    if window <= 0 or age_seconds >= window:
        return 1.0
    return 0.1 + 0.9 * max(0.0, age_seconds) / window


def effective_weight(weight: float, age_seconds: float, window: float = 30.0) -> float:
    return weight * slow_start_factor(age_seconds, window)
