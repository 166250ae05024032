"""Passive outlier ejection rules (balancers.outlier): names, shares and durations."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancers.outlier import (
    FAILURE_KINDS,
    JITTER,
    STATUS_KINDS,
    ejection_seconds,
    failure_kind,
    max_ejected,
    may_eject,
)
from watchers.model import OUTLIER_KINDS, Outlier

# -- failure kinds --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "name"),
    [
        ("connect", 0, "connect"),
        ("reset", 0, "reset"),
        ("timeout", 0, "timeout"),
        ("bad", 0, "502"),  # a malformed response counts as the 502 a gateway would answer
        ("", 500, "500"),
        ("", 502, "502"),
        ("", 503, "503"),
        ("", 504, "504"),
        ("", 200, None),
        ("", 404, None),
        ("", 429, None),
        ("", 501, None),  # an answer ("not implemented"), not a failure of the backend
        ("", 505, None),
        ("", 0, None),
        ("eof", 0, None),  # unknown kinds are not counted
    ],
)
def test_failure_kind_names(kind: str, status: int, name: str | None) -> None:
    assert failure_kind(kind, status) == name


def test_every_outlier_kind_is_reachable_and_nothing_else_is() -> None:
    produced = set(FAILURE_KINDS.values()) | set(STATUS_KINDS.values())
    assert produced == set(OUTLIER_KINDS)
    assert Outlier().kinds <= produced


@given(st.sampled_from(["", "connect", "reset", "timeout", "bad", "x"]), st.integers(-1, 999))
def test_failure_kind_is_none_or_a_model_name(kind: str, status: int) -> None:
    name = failure_kind(kind, status)
    assert name is None or name in OUTLIER_KINDS
    if kind:  # a transport failure is named by its kind, whatever the status says
        assert name == FAILURE_KINDS.get(kind)


# -- ejection time --------------------------------------------------------------------------


def test_ejection_time_grows_with_each_ejection_up_to_the_cap() -> None:
    class NoJitter(random.Random):
        def random(self) -> float:
            return 0.0

    rng = NoJitter()
    got = [ejection_seconds(k, 30.0, 300.0, rng) for k in (1, 2, 3, 10, 11, 1000)]
    assert got == [30.0, 60.0, 90.0, 300.0, 300.0, 300.0]
    assert ejection_seconds(0, 30.0, 300.0, rng) == 30.0  # "never ejected" still gets the base
    assert ejection_seconds(3, 30.0, 10.0, rng) == 30.0  # a cap below the base: the base wins
    assert ejection_seconds(3, 0.0, 300.0, rng) == 0.0


def test_jitter_spreads_returns() -> None:
    rng = random.Random(5)
    seen = [ejection_seconds(2, 30.0, 300.0, rng) for _ in range(200)]
    assert min(seen) >= 60.0 and max(seen) <= 66.0
    assert max(seen) - min(seen) > 5.0  # spread over (nearly) the whole 10%
    assert len(set(seen)) == 200


@settings(max_examples=300, deadline=None)
@given(
    st.integers(-5, 10**6),
    st.floats(0.001, 1e4),
    st.floats(0.0, 1e5),
    st.integers(0, 2**32),
)
def test_ejection_seconds_bounds(times: int, base: float, cap: float, seed: int) -> None:
    s = ejection_seconds(times, base, cap, random.Random(seed))
    assert s >= base
    assert s <= max(base, cap) * (1 + JITTER)
    if cap >= base:
        assert s <= cap * 1.1
        unjittered = min(base * max(times, 1), cap)
        assert unjittered <= s <= unjittered * (1 + JITTER)


# -- how many may be out --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pool", "share", "allowed"),
    [
        (1, 0.1, 1),  # the only backend may go: panic mode balances over it anyway
        (2, 0.1, 1),  # 10% of 2 is 0.2: still one
        (10, 0.1, 1),
        (20, 0.1, 2),
        (29, 0.1, 2),
        (100, 0.29, 29),  # as written in decimal, not 28.999...
        (10, 0.7, 7),
        (10, 1.0, 10),
        (10, 5.0, 10),
        (10, 0.0, 1),
        (10, -1.0, 1),
        (10, float("nan"), 1),
        (0, 0.5, 0),  # nothing to eject
    ],
)
def test_max_ejected(pool: int, share: float, allowed: int) -> None:
    assert max_ejected(pool, share) == allowed


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 100), st.integers(-5, 10_100))
def test_may_eject_share_rule(pool: int, percent: int, ejected: int) -> None:
    """With the share written as a whole percentage: floor(share x pool), at least one, never
    more than the pool."""
    allowed = min(pool, max(1, percent * pool // 100))
    assert may_eject(ejected, pool, percent / 100) == (ejected < allowed)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.floats(0.0, 1.0))
def test_may_eject_always_allows_one_and_never_exceeds_the_share(pool: int, share: float) -> None:
    assert may_eject(0, pool, share)
    n = max_ejected(pool, share)
    assert 1 <= n <= pool
    assert n == 1 or n <= share * pool + 1e-6
    assert not may_eject(n, pool, share)
    # one more backend can only keep or raise what may be out
    assert max_ejected(pool + 1, share) >= n
