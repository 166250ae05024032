"""One /metrics and one /status.json for the process group (edgelb's own aggregation).

Metrics: the families about configuration, watchers, certificates and the process itself
come from control, which runs the watchers and health checks (CONTROL_OWNED); every other
family comes from the workers: counters and histograms are summed over the workers, plus what
the workers that died had counted when last asked (`Retired`), so a counter never goes down
when a worker is replaced; gauges that are sums (in-flight requests, queued requests, open
connections: SUMMED_GAUGES) are summed; other gauges (a backend's cap, weight, latency
estimate, health, ejection) show the highest worker's value. Families about the group carry a
`worker` label: edgelb_worker_up, edgelb_worker_restarts_total, edgelb_worker_cpu_seconds_total.

Status: the group's document is control's (watchers, routes, health checks, certificates)
with each service's and listener's traffic figures summed over the workers (SUMMED_STATUS);
the status page's rates come from the workers' counters as last polled (at most a second old)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import Metric

CONTROL_OWNED = ("edgelb_config_", "edgelb_watcher_", "edgelb_tls_certificate_",
                 "edgelb_draining", "edgelb_start_time_seconds", "edgelb_uptime_seconds",
                 "edgelb_info", "edgelb_build_info", "process_", "python_")
SUMMED_GAUGES = frozenset({"edgelb_backend_inflight", "edgelb_queue_waiting",
                           "edgelb_upstream_connections", "edgelb_listener_connections"})
ADDITIVE = frozenset({"counter", "histogram", "summary"})

# (name, type, documentation, [(sample name, labels, value)]), as workers send them
Family = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def _owned_by_control(name: str) -> bool:
    return name.startswith(CONTROL_OWNED)


def _key(sample_name: str, labels: dict[str, str]) -> SampleKey:
    return sample_name, tuple(sorted(labels.items()))


class Retired:
    """What the workers that died had counted (counters and histograms), kept for good."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, dict[SampleKey, float]]] = {}

    def add(self, families: Iterable[Family]) -> None:
        for name, kind, doc, samples in families:
            if kind not in ADDITIVE or _owned_by_control(name):
                continue
            _, _, held = self.families.setdefault(name, (kind, doc, {}))
            for sample_name, labels, value in samples:
                if sample_name.endswith("_created"):
                    continue
                key = _key(sample_name, labels)
                held[key] = held.get(key, 0.0) + value


def merge(control: Iterable[Metric], workers: Iterable[list[Family]], retired: Retired
          ) -> list[Metric]:
    """The group's families: control's own, then the workers' combined (see the module)."""
    out: list[Metric] = [m for m in control if _owned_by_control(m.name)]
    combined: dict[str, tuple[str, str, dict[SampleKey, float]]] = {}
    for families in workers:
        for name, kind, doc, samples in families:
            if _owned_by_control(name):
                continue
            _, _, values = combined.setdefault(name, (kind, doc, {}))
            add = kind in ADDITIVE or name in SUMMED_GAUGES
            for sample_name, labels, value in samples:
                key = _key(sample_name, labels)
                if key not in values:
                    values[key] = value
                elif add:
                    values[key] += value
                else:
                    values[key] = max(values[key], value)
    for name, (kind, doc, held) in retired.families.items():
        _, _, values = combined.setdefault(name, (kind, doc, {}))
        for key, value in held.items():
            values[key] = values.get(key, 0.0) + value
    for name, (kind, doc, values) in combined.items():
        metric = Metric(name, doc, kind)
        for (sample_name, labels), value in values.items():
            metric.add_sample(sample_name, dict(labels), value)
        out.append(metric)
    return out


def group_families(workers: Iterable[Any]) -> Iterator[Metric]:
    """The families with a `worker` label: one sample per worker slot (edgelb.workers.control
    WorkerSlot: index, up, restarts, cpu_seconds, refusals)."""
    up = Metric("edgelb_worker_up", "1 while the worker process runs and serves.", "gauge")
    restarts = Metric("edgelb_worker_restarts",
                      "Times the worker process died and was replaced.", "counter")
    cpu = Metric("edgelb_worker_cpu_seconds",
                 "User and system CPU time of the worker's processes (its replaced ones "
                 "included).", "counter")
    refusals = Metric("edgelb_worker_refusals",
                      "Configurations control accepted that the worker could not apply (it "
                      "kept serving its last good one).", "counter")
    for w in workers:
        labels = {"worker": str(w.index)}
        up.add_sample("edgelb_worker_up", labels, 1.0 if w.up else 0.0)
        restarts.add_sample("edgelb_worker_restarts_total", labels, float(w.restarts))
        cpu.add_sample("edgelb_worker_cpu_seconds_total", labels, w.cpu_seconds())
        refusals.add_sample("edgelb_worker_refusals_total", labels,
                            float(getattr(w, "refusals", 0)))
    yield up
    yield restarts
    yield cpu
    yield refusals


# -- /status.json ----------------------------------------------------------------------------

SUMMED_STATUS = ("requests", "responses", "local_responses", "shed", "waiting", "retries",
                 "tcp_connections", "bytes", "duration", "inflight")
SUMMED_BACKEND = ("inflight", "requests", "responses", "failures", "unsolicited", "ejections",
                  "connections", "bytes")


def _add(a: Any, b: Any) -> Any:
    """Numbers added, dicts added key by key; anything else: the first."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _add(out[k], v) if k in out else v
        return out
    return a


def _zero(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return 0
    if isinstance(value, dict):
        return {k: _zero(v) for k, v in value.items() if not isinstance(v, str)}
    return value


def sum_status(control: dict[str, Any], workers: list[dict[str, Any]]) -> dict[str, Any]:
    """Control's document with the traffic figures of services, backends and listeners summed
    over the workers' documents."""
    doc = dict(control)
    by_service = [{s["name"]: s for s in w.get("services", ())} for w in workers]
    services = []
    for svc in control.get("services", ()):
        svc = dict(svc)
        for key in SUMMED_STATUS:
            if key in svc:
                total = _zero(svc[key])
                for held in by_service:
                    if svc["name"] in held:
                        total = _add(total, held[svc["name"]].get(key, _zero(svc[key])))
                svc[key] = total
        backends = []
        for b in svc.get("backends", ()):
            b = dict(b)
            for key in SUMMED_BACKEND:
                total = _zero(b[key])
                for held in by_service:
                    for wb in held.get(svc["name"], {}).get("backends", ()):
                        if wb["key"] == b["key"]:
                            total = _add(total, wb[key])
                b[key] = total
            backends.append(b)
        svc["backends"] = backends
        services.append(svc)
    doc["services"] = services
    listeners = []
    for lst in control.get("listeners", ()):
        lst = dict(lst)
        for key in ("accepted", "connections"):
            lst[key] = sum(wl.get(key, 0) for w in workers for wl in w.get("listeners", ())
                           if wl.get("address") == lst.get("address"))
        listeners.append(lst)
    doc["listeners"] = listeners
    local = _zero(control.get("local_responses", {}))
    for w in workers:
        local = _add(local, w.get("local_responses", {}))
    doc["local_responses"] = local
    return doc
