"""What an ended or failed exchange leaves behind: durations, status counts, the backend's
peak-EWMA latency (balancers/ewma.py), outlier and adaptive-limit failures, its slot back in the
pool, its share of the retry budget, the backend's last error; and, once per request at its
end (`finish`), the counts by method and status, the duration and size histograms, and the
telemetry (access log, span) when it is on.

`reason` says why a request ended as it did: "" when a backend's response went out whole,
else one of REASONS (edgelb answered itself, the backend failed, the client left, a tunnel
closed)."""

from __future__ import annotations

import logging
from bisect import bisect_left
from typing import TYPE_CHECKING

from balancers.ewma import error_sample, peak_ewma
from balancers.outlier import failure_kind
from edgelb.pool import (
    DURATION_BUCKETS,
    METHOD_INDEX,
    N_CLASSES,
    N_DURATION,
    OTHER_METHOD,
)

if TYPE_CHECKING:
    from edgelb.http.exchange import Exchange
    from edgelb.pool import BackendState, ServiceState

log = logging.getLogger("edgelb.http")

ERROR_LOG_INTERVAL = 10.0  # seconds: a backend's same failure is logged again after this
_OVERLOAD = frozenset({"timeout", "503", "504"})  # failures that tell a backend is overloaded

# Why a request ended, when not with a backend's whole response (the access log's `reason`).
# The first ones involve the backend: counted under its label in edgelb_requests_total.
BACKEND_REASONS = frozenset({"timeout", "upstream_error", "upstream_reset", "upgraded",
                             "client_closed"})
REASONS = (*sorted(BACKEND_REASONS), "no_route", "shed", "refused", "auth", "redirect",
           "bad_request", "too_large", "client_timeout", "internal_error", "cors")


_LOCAL_REASONS = {404: "no_route", 403: "refused", 401: "auth", 429: "auth", 308: "redirect",
                  413: "too_large", 431: "too_large", 400: "bad_request", 505: "bad_request",
                  408: "client_timeout", 504: "timeout", 502: "upstream_error", 503: "shed",
                  500: "internal_error"}


def local_reason(status: int) -> str:
    """Why edgelb answered `status` itself, when its caller does not say."""
    return _LOCAL_REASONS.get(status, "bad_request")


def size_bucket(n: int) -> int:
    """The index of `n` bytes in pool.SIZE_BUCKETS (powers of 4 from 64 to 64 MiB), 11: +Inf."""
    if n <= 64:
        return 0
    i = ((n - 1).bit_length() + 1) // 2 - 3
    return i if i < 11 else 11


def method_index(method: bytes) -> int:
    return METHOD_INDEX.get(method, OTHER_METHOD)


def count(ex: Exchange, reason: str, now: float) -> None:
    """Count `ex`'s response (its status is set): edgelb_requests_total by method and status,
    under its backend or as edgelb's own answer, and its service's duration and size
    histograms."""
    status = ex.status
    m = METHOD_INDEX.get(ex.method, OTHER_METHOD)
    key = m << 10 | status
    service = ex.service
    backend = ex.backend
    if backend is not None and (not reason or reason in BACKEND_REASONS):
        counts = backend.counts
    elif service is not None:
        counts = service.local_counts
    else:
        counts = ex.client.listener.local_counts
    counts[key] = counts.get(key, 0) + 1
    if service is None:
        return
    elapsed = now - ex.start
    i = bisect_left(DURATION_BUCKETS, elapsed)
    c = m * N_CLASSES + (status // 100 if status < 600 else 5)
    service.durations[c * N_DURATION + i] += 1
    service.duration_sums[c] += elapsed
    n = ex.received
    service.req_sizes[size_bucket(n)] += 1
    service.req_size_sum += n
    n = ex.resp_body
    service.resp_sizes[size_bucket(n)] += 1
    service.resp_size_sum += n


def finish(ex: Exchange, reason: str, now: float) -> None:
    """`ex` ended (once per request): counted when a response (or its head) went out, and
    handed to the telemetry when it is on. A 101's count was taken at the switch
    (`count` in the upstream); its record is written when the tunnel closes."""
    if ex.logged:
        return
    ex.logged = True
    limiter = ex.client_limit
    if limiter is not None:  # a route's per-client limit: the request's slot back
        ex.client_limit = None
        limiter.release(ex.client.xff_ip)
    if ex.status and reason != "upgraded":
        count(ex, reason, now)
    client = ex.client
    tel = client.telemetry
    if tel is not None:
        tel.http_done(ex, client, reason, now, client.tunnel_bytes)


def record_response(ex: Exchange, backend: BackendState, service: ServiceState,
                    now: float) -> None:
    """`backend`'s response to `ex` went out whole: its duration, the backend's latency
    estimate, its status count, and its slot back (with a sample for the adaptive limit).
    A 5xx counts as a slow sample: a fast-failing backend must not look fast."""
    elapsed = now - ex.start
    status = ex.status
    rtt = ex.upstream_time = elapsed - ex.queued  # the backend's part: without a slot's wait
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
