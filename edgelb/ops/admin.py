"""The admin endpoint: /healthz /readyz /metrics /status /status.json on its own listener.

It is an aiohttp server on the same event loop as the data path, so every handler reads the
live state without locks. It is never one of the public ports.

The status page (/status) is rendered on the server, totals, rates and charts included, so it
is whole without JavaScript (it then refreshes itself); with JavaScript, /status.js updates it
in place from /status.json every `refresh` seconds. Rates and charts come from a sampler task
that reads the counters at that interval (edgelb.ops.history). Everything the page loads comes
from this endpoint (a Content-Security-Policy says so), and every value is escaped: names of
services and hosts come from the outside (Ingresses, labels).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import jinja2
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgelb import __version__, compiled
from edgelb.control.tasks import spawn
from edgelb.ops import history as rates
from edgelb.ops.history import RateHistory
from edgelb.ops.metrics import make_registry
from edgelb.pool import BackendState, ServiceState
from watchers.model import Address

log = logging.getLogger(__name__)

TEMPLATE_PACKAGE = "edgelb.templates"  # the top-level templates/ (setup.py)
STATUS_TEMPLATE = "status.html.j2"
STATUS_SCRIPT = "status.js"
REFRESH_SECONDS = 2  # the page's updates, and the interval of its rates
WINDOW_SECONDS = 300  # how far back its charts go
# The page loads nothing from anywhere else, and runs no inline script.
STATUS_CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; "
              "style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; "
              "form-action 'none'; frame-ancestors 'none'")


# -- /readyz ------------------------------------------------------------------------------


def readiness(runtime: Any) -> list[str]:
    """Reasons edgelb is not ready; empty when it is."""
    reasons = [
        f"watcher {name!r} has not synced yet"
        for name, synced in sorted(runtime.watcher_synced.items())
        if not synced
    ]
    if runtime.draining:
        reasons.append("draining: edgelb is shutting down")
    return reasons


# -- /status.json -------------------------------------------------------------------------


def _codes(responses: dict[int, int]) -> dict[str, int]:
    return {str(code): n for code, n in sorted(responses.items())}


def backend_status(b: BackendState, check: dict[str, Any] | None = None,
                   inflight: int | None = None) -> dict[str, Any]:
    """`inflight`: this process's requests open on it, when a shared view of load makes
    `b.inflight` the group's (then shown as `inflight_group`)."""
    out = {
        "key": b.key,
        "host": b.spec.host,
        "port": b.spec.port,
        "weight": b.weight,  # effective: ramped during slow start
        "weight_configured": b.spec.weight,
        "slow_start": bool(b.ramp_start),
        "zone": b.spec.zone,
        "healthy": b.healthy and b.check_ok,
        "ready": b.healthy,  # as the source reports it
        "health_check": check,  # the active check's last result, None when not checked
        "ejected": bool(b.ejected_until),
        "draining": b.draining,
        "usable": b.usable,
        "eligible": b.eligible,
        "inflight": b.inflight,
        "max_inflight": b.cap or None,  # the cap now (adaptive: the limiter's)
        "max_inflight_configured": b.static_cap or None,
        "latency": b.latency,
        "requests": b.requests,
        "responses": _codes(b.responses),
        "failures": b.failures,
        "last_error": b.last_error or None,  # the detail a client's 502/504 does not show
        "unsolicited": b.unsolicited,
        "ejections": b.ejections,
        "connections": {
            "idle": len(b.idle),
            "open": b.open_connections,
            "total": b.connections_total,
        },
        "bytes": {"in": b.bytes_in, "out": b.bytes_out},
    }
    if inflight is not None:
        out["inflight_group"] = b.inflight
        out["inflight"] = inflight
    return out


def _plain(value: Any) -> Any:
    """dataclasses.asdict output made JSON-ready (frozensets become sorted lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (frozenset, set)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def service_status(svc: ServiceState, routes: tuple[Any, ...], health: Any = None
                   ) -> dict[str, Any]:
    checked = svc.policy.health_check is not None and health is not None
    backends = [
        backend_status(b, health.status(svc.name, b.key) if checked else None,
                       svc.pool.open_here(b) if svc.pool.sharing else None)
        for b in svc.pool.all_backends()
    ]
    responses: dict[int, int] = dict(svc.local_responses)
    for b in svc.pool.all_backends():
        for code, n in b.responses.items():
            responses[code] = responses.get(code, 0) + n
    listen = svc.spec.listen
    return {
        "name": svc.name,
        "mode": svc.spec.mode,
        "listen": str(listen) if listen is not None else None,
        "policy": _plain(dataclasses.asdict(svc.policy)),
        "routes": [
            {"host": r.host, "path": r.path, "exact": r.exact}
            for r in routes
            if r.service == svc.name
        ],
        "requests": sum(responses.values()),
        "responses": _codes(responses),
        "local_responses": _codes(svc.local_responses),
        "shed": dict(sorted(svc.shed.items())),
        "panic": svc.pool.panic,
        "waiting": len(svc.pool.waiters),
        "retries": {"total": svc.retries_total, "denied": svc.retries_denied,
                    "in_flight": svc.retrying},
        "tcp_connections": svc.tcp_connections,
        "bytes": {"in": svc.bytes_in, "out": svc.bytes_out},
        "duration": {"count": svc.duration_count, "sum": svc.duration_sum},
        "inflight": sum(b["inflight"] for b in backends),
        "backends": backends,
    }


def listener_status(key: str, listener: Any) -> dict[str, Any]:
    svc = listener.service
    if svc is not None:
        target = svc.name
    else:
        target = getattr(listener, "name", None)
    out = {
        "address": key,
        "kind": listener.kind,
        "target": target,
        "accepted": listener.accepted,
        "connections": listener.connections,
    }
    sni_status = getattr(listener, "sni_status", None)
    if sni_status is not None and getattr(listener, "ssl", None) is not None:
        out["sni"] = sni_status()  # TLS entrypoints: the passthrough table, peek outcomes
    return out


def watcher_status(runtime: Any) -> list[dict[str, Any]]:
    """Each source's health; for a source that counts problems (objects it skipped or
    flagged), `problems` (how many) and `problem_details` (those it lists, one line each);
    for one that reports what it follows in detail (the DNS source: per name), `details`."""
    problems = getattr(runtime, "watcher_problems", {})
    lines = getattr(runtime, "watcher_problem_lines", {})
    now = time.time()
    out = [_watcher(runtime, name, now) for name in sorted(
        set(runtime.watcher_up) | set(runtime.watcher_synced) | set(runtime.last_errors)
        | {watcher for watcher, _ in runtime.reloads})]
    for entry in out:
        name = entry["name"]
        if name in problems or name in lines:
            entry["problems"] = problems.get(name)
            entry["problem_details"] = list(lines.get(name, ()))
        details = getattr(runtime, "watcher_details", {}).get(name)
        if details is not None:
            entry["details"] = details
    return out


def _watcher(runtime: Any, name: str, now: float) -> dict[str, Any]:
    last_event = getattr(runtime, "watcher_last_event", {})
    return {
        "name": name,
        "up": runtime.watcher_up.get(name, False),
        "synced": runtime.watcher_synced.get(name, False),
        "last_error": runtime.last_errors.get(name) or None,
        "reloads": {
            "ok": runtime.reloads.get((name, "ok"), 0),
            "error": runtime.reloads.get((name, "error"), 0),
        },
        # seconds since the source was last heard from (None: it never reports events)
        "last_event_age": max(0.0, now - last_event[name]) if name in last_event else None,
    }


def status(runtime: Any, history: RateHistory | None = None,
           with_history: bool = False) -> dict[str, Any]:
    """The whole /status.json document (also what the HTML page renders); with `history`,
    each service's latest rates, and with `with_history` their points over the window."""
    routes = tuple(runtime.routes)
    not_ready = readiness(runtime)
    certificates = getattr(runtime, "certificate_status", None)
    services = [
        service_status(runtime.services[n], routes, getattr(runtime, "health", None))
        for n in sorted(runtime.services)
    ]
    if history is not None:
        for svc in services:
            svc["rate"] = rates.point_json(history.latest(svc["name"]))
            if with_history:
                svc["history"] = rates.series_json(history.series(svc["name"]))
    doc = {
        "version": __version__,
        "build": compiled.describe(),  # whether the data path runs compiled (mypyc)
        "started_at": runtime.started_at,
        "uptime": max(0.0, time.time() - runtime.started_at),
        "ready": not not_ready,
        "not_ready": not_ready,
        "draining": runtime.draining,
        "services": services,
        "listeners": [listener_status(k, runtime.listeners[k]) for k in sorted(runtime.listeners)],
        "routes": [
            {"host": r.host, "path": r.path, "exact": r.exact, "service": r.service} for r in routes
        ],
        "watchers": watcher_status(runtime),
        # every loaded certificate: names, expiry, serial, source, where it is served
        "certificates": certificates() if certificates is not None else [],
        "local_responses": _codes(runtime.local_responses),
    }
    if history is not None:  # how the rates are measured, and how many points a chart holds
        doc["rates"] = {"interval": history.interval, "window": history.window,
                        "points": history.points}
    return doc


# -- /status (HTML) -----------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _fmt_seconds(s: float) -> str:
    if s == 0:
        return "-"
    if s < 1:
        return f"{s * 1000:.1f} ms"
    return f"{s:.2f} s"


def _fmt_uptime(s: float) -> str:
    s = int(s)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {s}s"
    return f"{minutes}m {s}s"


def _fmt_number(x: float) -> str:
    return f"{x:g}"


def _code_classes(responses: dict[str, int]) -> dict[str, int]:
    out = {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}
    for code, n in responses.items():
        cls = f"{code[0]}xx"
        out[cls] = out.get(cls, 0) + n
    return out


def _fmt_age(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s ago" if s < 120 else f"{_fmt_uptime(s)} ago"


def _fmt_rate(x: float) -> str:
    return f"{x:.3g}/s" if x < 1000 else f"{x:,.0f}/s"


def _fmt_days_left(t: float) -> str:
    return f"{(t - time.time()) / 86400:.1f}"


def _fmt_date(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def _chart(values: list[float | None], points: int) -> str:
    return rates.polyline(values, points, rates.chart_scale(values))


def load_script() -> bytes:
    """/status.js, from the templates package (as the page's template)."""
    return resources.files(TEMPLATE_PACKAGE).joinpath(STATUS_SCRIPT).read_bytes()


def load_template() -> jinja2.Template:
    source = resources.files(TEMPLATE_PACKAGE).joinpath(STATUS_TEMPLATE).read_text("utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters.update(
        bytes=_fmt_bytes,
        number=_fmt_number,
        seconds=_fmt_seconds,
        uptime=_fmt_uptime,
        code_classes=_code_classes,
        age=_fmt_age,
        rate=_fmt_rate,
        date=_fmt_date,
        days_left=_fmt_days_left,
        chart=_chart,
        chart_top=rates.chart_scale,
    )
    return env.from_string(source)


# -- the server ---------------------------------------------------------------------------


class AdminServer:
    """The admin HTTP listener. `start()` binds (port 0 picks one: see `bound`)."""

    def __init__(self, runtime: Any, address: Address,
                 per_backend: Callable[[], bool] | None = None,
                 refresh: float | None = None, window: float | None = None,
                 group: Any = None) -> None:
        """`group`: the worker group (edgelb.workers.control.WorkerGroup) when this is the
        control process of `workers: N`: /metrics and /status.json are the group's."""
        self.runtime = runtime
        self.group = group
        self.address = address
        self.refresh = refresh or REFRESH_SECONDS  # (read now: tests may shorten them)
        self.history = RateHistory(self.refresh, window or WINDOW_SECONDS)
        self._script = load_script()
        self._tasks: set[asyncio.Task[Any]] = set()
        # per_backend: whether /metrics has per-backend series now (the config's metrics:)
        self.registry = (make_registry(runtime, per_backend=per_backend) if group is None
                         else group.registry(runtime, per_backend or (lambda: True)))
        self._template = load_template()
        self._runner: web.AppRunner | None = None
        self.bound: Address | None = None  # the address actually listened on

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._root)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status_html)
        app.router.add_get("/status.json", self._status_json)
        app.router.add_get("/status.js", self._status_script)
        return app

    async def start(self) -> None:
        if self._runner is not None:
            return
        runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.address.host, self.address.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            hint = (
                "another process holds it; pick another admin.listen port"
                if e.errno == errno.EADDRINUSE
                else "check admin.listen in the config"
            )
            raise OSError(
                e.errno, f"admin endpoint cannot listen on {self.address}: {e.strerror}; {hint}"
            ) from e
        self._runner = runner
        spawn(self._sample(), name="status page rates", held=self._tasks)
        host, port = runner.addresses[0][:2]
        self.bound = Address(host, port)
        log.info("admin endpoint on http://%s/status", self.bound)

    async def _sample(self) -> None:
        """Every `refresh` seconds: the counters, for the page's rates and charts."""
        while True:
            if self.group is not None:  # the workers' counters, summed
                self.history.sample_counters(self.group.service_counters(), time.time())
            else:
                self.history.sample(list(self.runtime.services.values()), time.time())
            await asyncio.sleep(self.refresh)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. http://127.0.0.1:9090."""
        if self.bound is None:
            raise RuntimeError("the admin server is not started; await start() first")
        return f"http://{self.bound}"

    # -- handlers -------------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/status")

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        reasons = readiness(self.runtime)
        if reasons:
            return web.Response(status=503, text="not ready: " + "; ".join(reasons) + "\n")
        return web.Response(text="ready\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.group is not None:
            await self.group.refresh()  # every worker's counters as of now
        body = generate_latest(self.registry)
        response = web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
        response.enable_compression()  # only if the client accepts it
        return response

    async def _status_json(self, request: web.Request) -> web.Response:
        """?history=1 adds each service's points over the window (the page's first load)."""
        with_history = request.query.get("history", "") not in ("", "0")
        doc = status(self.runtime, self.history, with_history)
        if self.group is not None:  # the group's total, or ?worker=N: that worker's own
            try:
                doc = await self.group.status(doc, request.query.get("worker"))
            except LookupError as e:
                return web.Response(status=404, text=f"{e}\n")
        return web.json_response(doc, dumps=_dumps, headers={"Cache-Control": "no-store"})

    async def _status_script(self, request: web.Request) -> web.Response:
        return web.Response(body=self._script, content_type="text/javascript",
                            headers={"Cache-Control": "no-cache"})

    async def _status_html(self, request: web.Request) -> web.Response:
        doc = status(self.runtime, self.history, with_history=True)
        if self.group is not None:  # the group's totals (rates: control's sampling)
            doc = await self.group.status(doc, None)
        html = self._template.render(s=doc,
                                     refresh=_fmt_number(self.refresh),
                                     points=self.history.points)
        return web.Response(text=html, content_type="text/html",
                            headers={"Content-Security-Policy": STATUS_CSP,
                                     "Cache-Control": "no-store"})


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1)
