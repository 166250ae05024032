"""Prometheus metrics, built at scrape time from the plain counters of the live state.

The data path only does `+= 1` on attributes of `ServiceState` / `BackendState` and on the
runtime's dicts. `RuntimeCollector.collect()` walks that state when /metrics is scraped and
turns it into metric families, so prometheus-client never sits on the hot path. The collector
runs on the event loop thread (from the admin handler), so it reads a consistent picture.

Per-backend series (`metrics: {per_backend: false}` in the config) are what grows with a large
cluster: every family labelled by backend. With the switch off, the per-backend families are
not exported, `edgelb_requests_total` sums the backends of each service into
`backend="*"` (edgelb's own answers keep `backend=""`), and the per-service families stay,
`edgelb_service_backends` among them (how many backends are healthy, ejected, ...).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from edgelb import __version__, compiled
from edgelb.net.acl import AUTH_RESULTS
from edgelb.pool import (
    DURATION_BUCKETS,
    METHOD_NAMES,
    N_CLASSES,
    N_DURATION,
    SIZE_BUCKETS,
    ServiceState,
)

# The `backend` label of edgelb_requests_total for the backends of a service summed together,
# when per-backend series are off (backend="" stays edgelb's own answers).
ALL_BACKENDS = "*"

# The `le` labels of edgelb_request_duration_seconds, +Inf last.
_BUCKET_LABELS = (*(floatToGoString(b) for b in DURATION_BUCKETS), "+Inf")


_SIZE_LABELS = (*(floatToGoString(b) for b in SIZE_BUCKETS), "+Inf")


def cumulative_buckets(per_bucket: Iterable[int],
                       labels: tuple[str, ...] = _BUCKET_LABELS) -> list[tuple[str, float]]:
    """Turn per-bucket counts (as `ServiceState.observe` keeps them) into `le` pairs."""
    out: list[tuple[str, float]] = []
    total = 0
    for label, count in zip(labels, per_bucket, strict=True):
        total += count
        out.append((label, float(total)))
    return out


class RuntimeCollector:
    """A custom collector over a runtime object (edgelb.control.runtime: the attributes read)."""

    def __init__(self, runtime: Any, per_backend: Callable[[], bool] | None = None) -> None:
        self.runtime = runtime
        # read at every scrape, so a reloaded config's `metrics.per_backend` applies at once
        self.per_backend = per_backend or (lambda: True)

    def describe(self) -> list[Metric]:
        # The series are only known at scrape time; an empty description skips the
        # registry's duplicate check instead of running a collection at registration.
        return []

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        services: list[ServiceState] = [rt.services[k] for k in sorted(rt.services)]
        per_backend = self.per_backend()
        families = self._service_families(services, getattr(rt, "local_counts", {}))
        yield from families if per_backend else (sum_backends(f) for f in families)
        yield _service_backends(services)
        yield from _telemetry_families(getattr(rt, "telemetry", None))
        if per_backend:
            yield from self._backend_families(services)
        yield from self._runtime_families(rt)

    # -- per service --------------------------------------------------------------------

    @staticmethod
    def _service_families(
        services: list[ServiceState], global_local: dict[int, int]
    ) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "edgelb_requests_total",
            "HTTP responses sent to clients, by service, backend, status code, method (GET, "
            "HEAD, POST, PUT, DELETE, PATCH, OPTIONS, CONNECT, TRACE, else OTHER) and status "
            'class (1xx..5xx); WebSocket upgrades count as 101 (backend="" when edgelb '
            'answered itself; service="" when no service matched).',
            labels=["service", "backend", "code", "method", "code_class"],
        )
        duration = HistogramMetricFamily(
            "edgelb_request_duration_seconds",
            "Time from a request's head to the end of its response (to the 101 for an "
            "upgrade), per service, method and status class.",
            labels=["service", "method", "code_class"],
        )
        req_size = HistogramMetricFamily(
            "edgelb_request_size_bytes",
            "Request body bytes, per service (buckets: powers of 4 from 64 B to 64 MiB).",
            labels=["service"],
        )
        resp_size = HistogramMetricFamily(
            "edgelb_response_size_bytes",
            "Response body bytes sent to clients, per service (buckets: powers of 4 from 64 B "
            "to 64 MiB).",
            labels=["service"],
        )
        shed = CounterMetricFamily(
            "edgelb_shed_total",
            "Requests or connections refused to protect backends, by reason (rate_limit and "
            "client_connections: a route's per-client limits).",
            labels=["service", "reason"],
        )
        mirrored = CounterMetricFamily(
            "edgelb_mirror_requests_total",
            'Copies of requests sent to the service by routes\' mirrors: result="sent" (it '
            'answered), "failed" (no connection or no answer in time), "skipped" (not sent: '
            "body over the bound, no backend, too many in flight).",
            labels=["service", "result"],
        )
        tcp = CounterMetricFamily(
            "edgelb_tcp_connections_total",
            "Client connections accepted by tcp-mode services.",
            labels=["service"],
        )
        nbytes = CounterMetricFamily(
            "edgelb_bytes_total",
            'Bytes relayed for clients: direction="in" from clients, "out" to clients.',
            labels=["service", "direction"],
        )
        retries = CounterMetricFamily(
            "edgelb_retries_total",
            'Requests sent again to another backend (result="sent"), or not because the retry '
            'budget was spent (result="denied").',
            labels=["service", "result"],
        )
        waiting = GaugeMetricFamily(
            "edgelb_queue_waiting",
            "Requests (connections) waiting for a backend under its cap.",
            labels=["service"],
        )
        panic = GaugeMetricFamily(
            "edgelb_service_panic",
            "1 while too few backends are healthy and the service balances over all of them.",
            labels=["service"],
        )
        auth = CounterMetricFamily(
            "edgelb_auth_total",
            'Basic auth verdicts: result="ok" (a password hash verified), "cached" (verified '
            'earlier, no hash), "failed" (wrong user or password: 401), "missing" (no usable '
            'credentials: 401), "throttled" (too many failures from the address: 429), '
            '"busy" (too many hashes in flight: 503).',
            labels=["service", "result"],
        )
        for svc in services:
            if svc.policy.auth is not None or any(svc.auth_results):
                for result, count in zip(AUTH_RESULTS, svc.auth_results, strict=True):
                    auth.add_metric([svc.name, result], count)
            name = svc.name
            retries.add_metric([name, "sent"], svc.retries_total)
            retries.add_metric([name, "denied"], svc.retries_denied)
            waiting.add_metric([name], len(svc.pool.waiters))
            panic.add_metric([name], 1.0 if svc.pool.panic else 0.0)
            for backend in svc.pool.all_backends():
                _add_counts(requests, name, backend.key, backend.counts)
            _add_counts(requests, name, "", svc.local_counts)
            _add_durations(duration, svc)
            req_size.add_metric([name], cumulative_buckets(svc.req_sizes, _SIZE_LABELS),
                                svc.req_size_sum)
            resp_size.add_metric([name], cumulative_buckets(svc.resp_sizes, _SIZE_LABELS),
                                 svc.resp_size_sum)
            for reason, count in sorted(svc.shed.items()):
                shed.add_metric([name, reason], count)
            for result, count in sorted(svc.mirrors.items()):
                mirrored.add_metric([name, result], count)
            tcp.add_metric([name], svc.tcp_connections)
            nbytes.add_metric([name, "in"], svc.bytes_in)
            nbytes.add_metric([name, "out"], svc.bytes_out)
        _add_counts(requests, "", "", global_local)
        yield from (requests, duration, req_size, resp_size, shed, mirrored, tcp, nbytes, retries,
                    waiting, panic, auth)

    # -- per backend --------------------------------------------------------------------

    @staticmethod
    def _backend_families(services: list[ServiceState]) -> Iterator[Metric]:
        labels = ["service", "backend"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=labels)

        inflight = gauge(
            "edgelb_backend_inflight",
            "Requests (http) or connections (tcp) now in flight to the backend.",
        )
        healthy = gauge(
            "edgelb_backend_healthy",
            "1 if the backend is healthy (ready by its source and passing its active checks).",
        )
        eligible = gauge(
            "edgelb_backend_eligible",
            "1 if the balancer may pick the backend now (usable and under its cap).",
        )
        ejected = gauge("edgelb_backend_ejected", "1 while the backend is ejected for failing.")
        cap = gauge(
            "edgelb_backend_max_inflight",
            "The backend's cap on concurrent requests now (adaptive: the limiter's); 0 = none.",
        )
        draining = gauge(
            "edgelb_backend_draining", "1 if the backend was removed and is finishing its work."
        )
        weight = gauge("edgelb_backend_weight", "The backend's weight (capacity).")
        latency = gauge(
            "edgelb_backend_latency_seconds", "The balancer's decaying latency estimate."
        )
        ejections = counter(
            "edgelb_ejections_total", "Times the backend was ejected for failing (outlier)."
        )
        sent = counter("edgelb_backend_requests_total", "Requests sent to the backend.")
        failures = counter("edgelb_backend_failures_total", "Connect errors, resets and timeouts.")
        opened = counter(
            "edgelb_backend_connections_total", "Upstream connections opened to the backend."
        )
        unsolicited = counter(
            "edgelb_backend_unsolicited_total",
            "Upstream connections closed because the backend sent bytes no request asked for "
            "(after a complete response); they never reach a client.",
        )
        upstream = GaugeMetricFamily(
            "edgelb_upstream_connections",
            'Upstream connections to the backend: state="open" all, "idle" kept alive unused.',
            labels=["service", "backend", "state"],
        )
        bbytes = CounterMetricFamily(
            "edgelb_backend_bytes_total",
            'Bytes exchanged with the backend: direction="in" from it, "out" to it.',
            labels=["service", "backend", "direction"],
        )
        for svc in services:
            for b in svc.pool.all_backends():
                lv = [svc.name, b.key]
                inflight.add_metric(lv, svc.pool.open_here(b))  # adds up across workers
                healthy.add_metric(lv, 1.0 if b.healthy and b.check_ok else 0.0)
                eligible.add_metric(lv, 1.0 if b.eligible else 0.0)
                ejected.add_metric(lv, 1.0 if b.ejected_until else 0.0)
                cap.add_metric(lv, b.cap)
                draining.add_metric(lv, 1.0 if b.draining else 0.0)
                weight.add_metric(lv, b.weight)
                latency.add_metric(lv, b.latency)
                ejections.add_metric(lv, b.ejections)
                sent.add_metric(lv, b.requests)
                failures.add_metric(lv, b.failures)
                opened.add_metric(lv, b.connections_total)
                unsolicited.add_metric(lv, b.unsolicited)
                upstream.add_metric([*lv, "idle"], len(b.idle))
                upstream.add_metric([*lv, "open"], b.open_connections)
                bbytes.add_metric([*lv, "in"], b.bytes_in)
                bbytes.add_metric([*lv, "out"], b.bytes_out)
        yield from (inflight, healthy, eligible, ejected, cap, draining, weight, latency)
        yield ejections
        yield from (sent, failures, opened, unsolicited, upstream, bbytes)

    # -- runtime-wide -------------------------------------------------------------------

    @staticmethod
    def _runtime_families(rt: Any) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "edgelb_config_reloads_total",
            "Snapshots from each watcher, applied (ok) or rejected (error).",
            labels=["watcher", "result"],
        )
        for (watcher, result), count in sorted(rt.reloads.items()):
            reloads.add_metric([watcher, result], count)
        last_ok = GaugeMetricFamily(
            "edgelb_config_last_reload_successful",
            "1 if the watcher's last snapshot was applied, 0 if it was rejected (the one before "
            "keeps serving; /status.json says why).",
            labels=["watcher"],
        )
        for watcher, ok in sorted(getattr(rt, "last_reload_ok", {}).items()):
            last_ok.add_metric([watcher], 1.0 if ok else 0.0)
        last_success = GaugeMetricFamily(
            "edgelb_config_last_reload_success_timestamp_seconds",
            "Unix time of the watcher's last applied snapshot.",
            labels=["watcher"],
        )
        for watcher, when in sorted(getattr(rt, "last_reload_success", {}).items()):
            last_success.add_metric([watcher], when)
        up = GaugeMetricFamily(
            "edgelb_watcher_up", "1 if the watcher is connected to its source.", labels=["watcher"]
        )
        for watcher, is_up in sorted(rt.watcher_up.items()):
            up.add_metric([watcher], 1.0 if is_up else 0.0)
        synced = GaugeMetricFamily(
            "edgelb_watcher_synced",
            "1 once the watcher has delivered a first full snapshot.",
            labels=["watcher"],
        )
        for watcher, done in sorted(rt.watcher_synced.items()):
            synced.add_metric([watcher], 1.0 if done else 0.0)
        age = GaugeMetricFamily(
            "edgelb_watcher_last_event_age_seconds",
            "Seconds since the watcher last heard from its source (an event or a keep-alive).",
            labels=["watcher"],
        )
        now = time.time()
        for watcher, at in sorted(getattr(rt, "watcher_last_event", {}).items()):
            age.add_metric([watcher], max(0.0, now - at))
        problems = GaugeMetricFamily(
            "edgelb_watcher_problems",
            "Objects of the source skipped or flagged in its last snapshot (see the log).",
            labels=["watcher"],
        )
        for watcher, n in sorted(getattr(rt, "watcher_problems", {}).items()):
            problems.add_metric([watcher], n)
        open_conns = GaugeMetricFamily(
            "edgelb_listener_connections",
            "Client connections now open on the listener.",
            labels=["listener", "kind"],
        )
        accepted = CounterMetricFamily(
            "edgelb_listener_accepted_total",
            "Client connections accepted by the listener.",
            labels=["listener", "kind"],
        )
        refused = CounterMetricFamily(
            "edgelb_listener_refused_total",
            "Connections (or requests) refused by a listener limit: reason=connections, "
            "per_client, slow_body, tunnel_idle (an upgraded connection silent for "
            "tunnel_timeout), tls_handshake (a tcp-mode TLS handshake failed or timed out).",
            labels=["listener", "kind", "reason"],
        )
        for key in sorted(rt.listeners):
            listener = rt.listeners[key]
            open_conns.add_metric([key, listener.kind], listener.connections)
            accepted.add_metric([key, listener.kind], listener.accepted)
            for reason, n in sorted(getattr(listener, "refused", {}).items()):
                refused.add_metric([key, listener.kind, reason], n)
        yield from (reloads, last_ok, last_success, up, synced, age, problems, open_conns,
                    accepted, refused)
        yield _certificate_expiry(rt)
        yield GaugeMetricFamily(
            "edgelb_draining", "1 while edgelb is shutting down.", value=1.0 if rt.draining else 0.0
        )
        yield GaugeMetricFamily(
            "edgelb_start_time_seconds",
            "When this edgelb started, in seconds since the Unix epoch.",
            value=rt.started_at,
        )
        yield GaugeMetricFamily(
            "edgelb_uptime_seconds", "Seconds since start.", value=time.time() - rt.started_at
        )
        info = GaugeMetricFamily("edgelb_info", "The running edgelb version.", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info
        yield build_info()


def build_info() -> Metric:
    """edgelb_build_info: always 1; its labels say what runs (the dashboards' version panel)."""
    info = GaugeMetricFamily(
        "edgelb_build_info",
        'What runs: edgelb version, Python version, build="compiled" (the data path compiled '
        'with mypyc), "pure" (plain Python) or "partial".',
        labels=["version", "python", "build"],
    )
    info.add_metric([__version__, platform.python_version(), compiled.build_kind()], 1.0)
    return info


# The states counted by edgelb_service_backends, each a test on a BackendState.
_BACKEND_STATES: tuple[tuple[str, Callable[[Any], bool]], ...] = (
    ("all", lambda b: True),
    ("healthy", lambda b: b.healthy and b.check_ok),
    ("usable", lambda b: b.usable),
    ("eligible", lambda b: b.eligible),
    ("ejected", lambda b: bool(b.ejected_until)),
    ("draining", lambda b: b.draining),
)


def _service_backends(services: list[ServiceState]) -> Metric:
    """Per-service backend counts by state: what per-backend gauges tell, without their
    cardinality (it stays when per-backend series are off)."""
    family = GaugeMetricFamily(
        "edgelb_service_backends",
        'Backends of the service by state: "all" (draining ones included), "healthy", '
        '"usable" (may take work: healthy, not ejected nor draining), "eligible" (usable and '
        'under its cap: the balancer may pick it now), "ejected", "draining".',
        labels=["service", "state"],
    )
    for svc in services:
        backends = list(svc.pool.all_backends())
        for state, test in _BACKEND_STATES:
            family.add_metric([svc.name, state], sum(1 for b in backends if test(b)))
    return family


def sum_backends(family: Metric) -> Metric:
    """`family` with the samples of each service's backends summed into backend="*" (the
    other labels kept); backend="" (edgelb answered itself) and families without a backend
    label are left as they are."""
    merged: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
    for sample in family.samples:
        labels = sample.labels
        if labels.get("backend"):
            labels = {**labels, "backend": ALL_BACKENDS}
        key = (sample.name, tuple(labels.items()))
        seen = merged.get(key)
        if seen is None:
            merged[key] = sample._replace(labels=labels, exemplar=None)
        else:
            merged[key] = seen._replace(value=seen.value + sample.value)
    family.samples = list(merged.values())
    return family


def _add_counts(family: CounterMetricFamily, service: str, backend: str,
                counts: dict[int, int]) -> None:
    """Counts keyed `method_index << 10 | status` (edgelb.http.accounting.count)."""
    for key, n in sorted(counts.items()):
        status = key & 1023
        family.add_metric([service, backend, str(status), METHOD_NAMES[key >> 10],
                           f"{min(status // 100, 5)}xx"], n)


def _add_durations(family: HistogramMetricFamily, svc: ServiceState) -> None:
    """One histogram per (method, status class) seen: ServiceState.durations."""
    per = svc.durations
    for c, total in enumerate(svc.duration_sums):
        buckets = per[c * N_DURATION:(c + 1) * N_DURATION]
        if any(buckets):
            method, cls = divmod(c, N_CLASSES)
            family.add_metric([svc.name, METHOD_NAMES[method], f"{cls}xx"],
                              cumulative_buckets(buckets), total)


def _telemetry_families(telemetry: Any) -> Iterator[Metric]:
    """What the access log and the span exporter could not keep (edgelb.telemetry)."""
    yield CounterMetricFamily(
        "edgelb_access_log_dropped_total",
        "Access-log records dropped: the writer's buffer was full (a slow or stuck sink) or "
        "a write failed. Traffic never waits for the log.",
        value=telemetry.log_dropped if telemetry is not None else 0)
    yield CounterMetricFamily(
        "edgelb_tracing_spans_dropped_total",
        "Spans dropped: the exporter's buffer was full or the collector did not take a batch.",
        value=telemetry.spans_dropped if telemetry is not None else 0)


def _certificate_expiry(rt: Any) -> Metric:
    expiry = GaugeMetricFamily(
        "edgelb_tls_certificate_expiry_timestamp_seconds",
        "When each loaded certificate expires (notAfter), in seconds since the Unix epoch: "
        "name is its first DNS name, source its files or Secret (as in /status.json).",
        labels=["name", "source"],
    )
    status = getattr(rt, "certificate_status", None)
    for cert in status() if status is not None else ():
        expiry.add_metric([cert["name"], cert["source"]], cert["not_after_timestamp"])
    return expiry


def make_registry(
    runtime: Any, process: bool = True, per_backend: Callable[[], bool] | None = None
) -> CollectorRegistry:
    """A fresh registry (never the global one) with the runtime and process collectors;
    `per_backend` says at each scrape whether per-backend series are exported (default yes)."""
    registry = CollectorRegistry()
    registry.register(RuntimeCollector(runtime, per_backend))
    if process:
        ProcessCollector(registry=registry)  # reads /proc; registers nothing elsewhere
        PlatformCollector(registry=registry)
    return registry
