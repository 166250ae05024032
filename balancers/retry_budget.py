"""The retry budget: retries in flight stay a small share of the requests in flight.

Without a budget, retries multiply the load on a service exactly when it is failing (every
failed request becomes two). Envoy's budget: at most 20% of the active requests may be retries,
but a few (3) are always allowed, so a quiet service can still retry.
"""

from __future__ import annotations

# Methods that may be sent twice with no more effect than once (RFC 9110 9.2.2), so a
# request that failed after reaching the backend may be retried. POST, PATCH and CONNECT are not.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def retry_allowed(active: int, retrying: int, ratio: float, minimum: int) -> bool:
    """Whether one more retry may start while `retrying` retries (of `active` requests in
    flight) are under way: `retrying < max(minimum, ratio * active)`."""
    return retrying < minimum or retrying < ratio * active
