"""The admin endpoint: /healthz /readyz /metrics /status /status.json on its own listener.

It is an aiohttp server on the same event loop as the data path, so every handler reads the
live state without locks. It is never one of the public ports.
"""

from __future__ import annotations

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
from edgelb.ops.metrics import make_registry
from edgelb.pool import BackendState, ServiceState
from watchers.model import Address

log = logging.getLogger(__name__)

TEMPLATE_PACKAGE = "edgelb.templates"  # the top-level templates/ (setup.py)
STATUS_TEMPLATE = "status.html.j2"
REFRESH_SECONDS = 2


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


def backend_status(b: BackendState, check: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
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
        backend_status(b, health.status(svc.name, b.key) if checked else None)
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
    names = (
        set(runtime.watcher_up)
        | set(runtime.watcher_synced)
        | set(runtime.last_errors)
        | {watcher for watcher, _ in runtime.reloads}
    )
    return [
        {
            "name": name,
            "up": runtime.watcher_up.get(name, False),
            "synced": runtime.watcher_synced.get(name, False),
            "last_error": runtime.last_errors.get(name) or None,
            "reloads": {
                "ok": runtime.reloads.get((name, "ok"), 0),
                "error": runtime.reloads.get((name, "error"), 0),
            },
        }
        for name in sorted(names)
    ]


def status(runtime: Any) -> dict[str, Any]:
    """The whole /status.json document (also what the HTML page renders)."""
    routes = tuple(runtime.routes)
    not_ready = readiness(runtime)
    certificates = getattr(runtime, "certificate_status", None)
    return {
        "version": __version__,
        "build": compiled.describe(),  # whether the data path runs compiled (mypyc)
        "started_at": runtime.started_at,
        "uptime": max(0.0, time.time() - runtime.started_at),
        "ready": not not_ready,
        "not_ready": not_ready,
        "draining": runtime.draining,
        "services": [
            service_status(runtime.services[n], routes, getattr(runtime, "health", None))
            for n in sorted(runtime.services)
        ],
        "listeners": [listener_status(k, runtime.listeners[k]) for k in sorted(runtime.listeners)],
        "routes": [
            {"host": r.host, "path": r.path, "exact": r.exact, "service": r.service} for r in routes
        ],
        "watchers": watcher_status(runtime),
        # every loaded certificate: names, expiry, serial, source, where it is served
        "certificates": certificates() if certificates is not None else [],
        "local_responses": _codes(runtime.local_responses),
    }


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


def load_template() -> jinja2.Template:
    source = resources.files(TEMPLATE_PACKAGE).joinpath(STATUS_TEMPLATE).read_text("utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters.update(
        bytes=_fmt_bytes,
        number=_fmt_number,
        seconds=_fmt_seconds,
        uptime=_fmt_uptime,
        code_classes=_code_classes,
    )
    return env.from_string(source)


# -- the server ---------------------------------------------------------------------------


class AdminServer:
    """The admin HTTP listener. `start()` binds (port 0 picks one: see `bound`)."""

    def __init__(self, runtime: Any, address: Address,
                 per_backend: Callable[[], bool] | None = None) -> None:
        self.runtime = runtime
        self.address = address
        # per_backend: whether /metrics has per-backend series now (the config's metrics:)
        self.registry = make_registry(runtime, per_backend=per_backend)
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
        host, port = runner.addresses[0][:2]
        self.bound = Address(host, port)
        log.info("admin endpoint on http://%s/status", self.bound)

    async def stop(self) -> None:
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
        body = generate_latest(self.registry)
        response = web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
        response.enable_compression()  # only if the client accepts it
        return response

    async def _status_json(self, request: web.Request) -> web.Response:
        return web.json_response(status(self.runtime), dumps=_dumps)

    async def _status_html(self, request: web.Request) -> web.Response:
        html = self._template.render(s=status(self.runtime), refresh=REFRESH_SECONDS)
        return web.Response(text=html, content_type="text/html")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1)
