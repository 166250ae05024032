"""What an ended or failed exchange leaves behind: durations, status counts, the backend's
peak-EWMA latency (balancers/ewma.py), outlier and adaptive-limit failures, its slot back in the
pool, its share of the retry budget, and the backend's last error."""

from __future__ import annotations

import logging
from bisect import bisect_left
from typing import TYPE_CHECKING

from balancers.ewma import error_sample, peak_ewma
from balancers.outlier import failure_kind
from edgelb.pool import DURATION_BUCKETS

if TYPE_CHECKING:
    from edgelb.http.exchange import Exchange
    from edgelb.pool import BackendState, ServiceState

log = logging.getLogger("edgelb.http")

ERROR_LOG_INTERVAL = 10.0  # seconds: a backend's same failure is logged again after this
_OVERLOAD = frozenset({"timeout", "503", "504"})  # failures that tell a backend is overloaded


def record_response(ex: Exchange, backend: BackendState, service: ServiceState,
                    now: float) -> None:
    """`backend`'s response to `ex` went out whole: its duration, the backend's latency
    estimate, its status count, and its slot back (with a sample for the adaptive limit).
    A 5xx counts as a slow sample: a fast-failing backend must not look fast."""
    elapsed = now - ex.start
    service.duration_buckets[bisect_left(DURATION_BUCKETS, elapsed)] += 1
    service.duration_sum += elapsed
    status = ex.status
    rtt = elapsed - ex.queued  # the backend's part: without a wait for a slot
    if status < 500:
        sample = rtt
        backend.fails = 0  # consecutive failures, for outlier ejection
    else:
        sample = error_sample(rtt)
        failed(backend, service, failure_kind("", status), now)
    backend.latency = peak_ewma(backend.latency, backend.latency_t, sample, now)
    backend.latency_t = now
    backend.responses[status] += 1  # a defaultdict
    service.pool.release(backend, rtt, now)


def count_failure(backend: BackendState, service: ServiceState, kind: str, status: int,
                  started: float, now: float) -> None:
    """A connect error, reset, timeout, broken response or a retried 502/503: counted, a slow
    latency sample, a failure for outlier ejection and the adaptive limit."""
    backend.failures += 1
    sample = error_sample(now - started)
    backend.latency = peak_ewma(backend.latency, backend.latency_t, sample, now)
    backend.latency_t = now
    if status:
        backend.responses[status] += 1
    failed(backend, service, failure_kind(kind, status), now)


def failed(backend: BackendState, service: ServiceState, kind: str | None, now: float) -> None:
    """A failure of `kind` (balancers.outlier.failure_kind; None: not one) on `backend`."""
    lim = backend.limiter
    if lim is not None and kind in _OVERLOAD:
        lim.failure(now)
        service.pool.cap_changed(backend, lim.limit)
    if kind is not None:
        service.pool.failure(backend, kind, now)


def note_error(backend: BackendState, service: ServiceState, detail: str, now: float) -> None:
    """Keep why a backend failed a request (/status.json `last_error`), and log it: at once
    when the reason changes, else at most every ERROR_LOG_INTERVAL."""
    if detail != backend.last_error or now - backend.last_error_t >= ERROR_LOG_INTERVAL:
        backend.last_error_t = now
        log.warning("service %s: backend %s %s", service.name, backend.key, detail)
    backend.last_error = detail


def end_retry(ex: Exchange) -> None:
    """The exchange that held a share of the retry budget has ended."""
    ex.retries = 0
    service = ex.service
    if service is not None:
        service.retrying -= 1
