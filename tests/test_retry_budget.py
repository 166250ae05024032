"""The retry budget (balancers.retry_budget) and the idempotent methods."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancers.retry_budget import IDEMPOTENT, retry_allowed
from watchers.model import RetryBudget


def test_defaults_allow_three_then_a_fifth_of_what_is_active() -> None:
    b = RetryBudget()
    assert [retry_allowed(0, r, b.ratio, b.min) for r in range(5)] == [True] * 3 + [False] * 2
    # 100 active: 20 retries may run
    assert retry_allowed(100, 19, b.ratio, b.min)
    assert not retry_allowed(100, 20, b.ratio, b.min)
    # 10 active: 2 by the ratio, but the floor of 3 wins
    assert retry_allowed(10, 2, b.ratio, b.min)
    assert not retry_allowed(10, 3, b.ratio, b.min)


def test_zero_minimum_and_zero_ratio() -> None:
    assert not retry_allowed(0, 0, 0.2, 0)  # nothing active, no floor: no retry
    assert retry_allowed(5, 0, 0.2, 0)  # 5 x 0.2 = 1
    assert not retry_allowed(1000, 0, 0.0, 0)  # retries switched off


@settings(max_examples=500, deadline=None)
@given(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.floats(0.0, 1.0),
    st.integers(0, 1000),
)
def test_budget_rule(active: int, retrying: int, ratio: float, minimum: int) -> None:
    allowed = retry_allowed(active, retrying, ratio, minimum)
    assert allowed == (retrying < max(minimum, ratio * active))
    if retrying < minimum:
        assert allowed
    if allowed:  # more traffic never takes a retry away; fewer retries under way neither
        assert retry_allowed(active + 1, retrying, ratio, minimum)
        assert retrying == 0 or retry_allowed(active, retrying - 1, ratio, minimum)


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"])
def test_idempotent_methods(method: bytes) -> None:
    assert method in IDEMPOTENT


@pytest.mark.parametrize("method", [b"POST", b"PATCH", b"CONNECT", b"get", b""])
def test_not_idempotent(method: bytes) -> None:
    assert method not in IDEMPOTENT  # methods are case-sensitive (RFC 9110 9.1)


def test_idempotent_is_frozen() -> None:
    assert isinstance(IDEMPOTENT, frozenset)
    assert len(IDEMPOTENT) == 6
