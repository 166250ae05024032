"""PLACEHOLDER (replaced by the translator's full version at merge): Marathon apps -> a
Snapshot, for the host-network minimal case only (HAPROXY_GROUP, HAPROXY_0_PORT or
portDefinitions[0].port, HAPROXY_0_VHOST, HAPROXY_0_BIND_ADDR, TASK_RUNNING, health results).
The interface is the fixed one of the watcher and the translator."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from watchers.model import Address, Backend, Policy, Route, Service, Snapshot

SOURCE = "marathon"
PolicyReader = Callable[[dict[str, str], Policy], tuple[Policy, list[str]]]


@dataclass(frozen=True)
class Options:
    group: str = "external"
    health: bool = True
    defaults: Policy = field(default_factory=Policy)
    tls_entrypoint: bool = True


@dataclass(frozen=True, slots=True)
class Problem:
    app: str
    message: str

    def __str__(self) -> str:
        return f"app {self.app}: {self.message}"


@dataclass(frozen=True)
class Translation:
    snapshot: Snapshot
    problems: tuple[Problem, ...] = ()
    apps: Mapping[str, str] = field(default_factory=dict)
    exposed: int = 0


def translate(apps: Sequence[Any], options: Options, *, read_policy: PolicyReader
              ) -> Translation:
    services: list[Service] = []
    routes: list[Route] = []
    problems: list[Problem] = []
    origin: dict[str, str] = {}
    for app in apps if isinstance(apps, (list, tuple)) else ():
        try:
            svc, app_routes = _app(app, options)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            app_id = app.get("id") if isinstance(app, dict) else None
            problems.append(Problem(str(app_id), f"not understood ({e}); fix the app"))
            continue
        if svc is None:
            continue
        services.append(svc)
        routes.extend(app_routes)
        origin[svc.name] = app["id"]
    return Translation(Snapshot(SOURCE, tuple(services), tuple(routes)), tuple(problems),
                       origin, len(services))


def _app(app: dict, options: Options) -> tuple[Service | None, list[Route]]:
    labels = app.get("labels") or {}
    groups = [g.strip() for g in str(labels.get("HAPROXY_GROUP", "")).split(",") if g.strip()]
    if not groups or not (options.group == "*" or "*" in groups or options.group in groups):
        return None, []
    app_id = app["id"]
    defs = app.get("portDefinitions") or []
    service_port = int(defs[0]["port"]) if defs else None
    port = labels.get("HAPROXY_0_PORT")
    listen_port = int(port) if port is not None else service_port
    name = app_id.lstrip("/").replace("/", "_")
    name += f"_{service_port}" if service_port is not None else "_p0"
    vhost = labels.get("HAPROXY_0_VHOST", "")
    hosts = [h.strip() for h in vhost.split(",") if h.strip()]
    bind = labels.get("HAPROXY_0_BIND_ADDR", "0.0.0.0")
    listen = Address(bind, listen_port) if listen_port else None
    cpus = app.get("cpus")
    weight = float(cpus) if isinstance(cpus, (int, float)) and cpus > 0 else 1.0
    checked = options.health and bool(app.get("healthChecks"))
    backends = []
    for task in app.get("tasks") or []:
        if task.get("state", "TASK_RUNNING") != "TASK_RUNNING":
            continue
        if checked and not any(r.get("alive") for r in task.get("healthCheckResults") or []):
            continue
        ports = task.get("ports") or []
        if not ports or not task.get("host"):
            continue
        backends.append(Backend(task["host"], int(ports[0]), weight=weight))
    svc = Service(name=name, mode="http" if hosts else "tcp", listen=listen,
                  backends=tuple(backends), policy=options.defaults)
    return svc, [Route(h, "/", name) for h in hosts]
