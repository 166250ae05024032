"""The parts of Marathon's app JSON the translation reads, without trusting it: networking
mode, ports (Marathon 1.4 and 1.5+ shapes), and each task's address for a port index.

Networking modes (how a task is reached):
- host: `task.host` + `task.ports[n]`; service ports from `portDefinitions[n].port` (old apps:
  `ports[n]`).
- bridge (`networks[].mode` container/bridge; old: `container.docker.network` BRIDGE):
  `task.host` + `task.ports[n]` (the host ports); ports from `portMappings`.
- container (`networks[].mode` container; old: network USER or an `ipAddress`): IP-per-task,
  `task.ipAddresses[0].ipAddress` + the container port (`portMappings[n].containerPort`, old:
  `ipAddress.discovery.ports[n].number`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from watchers.values import Obj, as_list, as_map, valid_port

HOST, BRIDGE, CONTAINER = "host", "bridge", "container"
NETWORK_MODES = {"host": HOST, "container/bridge": BRIDGE, "container": CONTAINER}
DOCKER_NETWORKS = {"HOST": HOST, "BRIDGE": BRIDGE, "USER": CONTAINER, "NONE": HOST}
RUNNING = "TASK_RUNNING"
KILLING = "TASK_KILLING"


@dataclass(frozen=True)
class Ports:
    """An app's networking mode and its ports, by index."""

    mode: str
    service: tuple[int | None, ...]  # service port per index (None: none assigned)
    container: tuple[int | None, ...]  # container port per index (IP-per-task only)

    @property
    def count(self) -> int:
        return len(self.service)


def networking(app: Obj) -> tuple[str, str]:
    """(mode, "") or ("", error)."""
    networks = app.get("networks")
    if isinstance(networks, list) and networks:
        modes = set()
        for i, net in enumerate(networks):
            mode = as_map(net).get("mode", "container")
            if mode not in NETWORK_MODES:
                return "", (f"networks[{i}].mode {mode!r} is not host, container/bridge or "
                            "container")
            modes.add(NETWORK_MODES[mode])
        for mode in (CONTAINER, BRIDGE, HOST):
            if mode in modes:
                return mode, ""
    docker = as_map(as_map(app.get("container")).get("docker"))
    net = docker.get("network")
    if net is not None:
        if not isinstance(net, str) or net.upper() not in DOCKER_NETWORKS:
            return "", f"container.docker.network {net!r} is not HOST, BRIDGE or USER"
        mode = DOCKER_NETWORKS[net.upper()]
        if mode == HOST and isinstance(app.get("ipAddress"), dict):
            return CONTAINER, ""
        return mode, ""
    if isinstance(app.get("ipAddress"), dict):
        return CONTAINER, ""
    return HOST, ""


def port_mappings(app: Obj) -> list[Any] | None:
    """`container.portMappings` (1.5+), else `container.docker.portMappings` (1.4)."""
    container = as_map(app.get("container"))
    for holder in (container, as_map(container.get("docker"))):
        mappings = holder.get("portMappings")
        if isinstance(mappings, list):
            return mappings
    return None


def _number(value: Any) -> int | None:
    return value if valid_port(value) else None


def ports(app: Obj) -> tuple[Ports | None, str]:
    """The app's ports, or (None, error)."""
    mode, error = networking(app)
    if error:
        return None, error
    mappings = port_mappings(app)
    definitions = app.get("portDefinitions")
    old = app.get("ports")
    for name, value in (("portDefinitions", definitions), ("ports", old),
                        ("portMappings", mappings)):
        if value is not None and not isinstance(value, list):
            return None, f"{name} is not a list"
    defs = as_list(definitions)
    olds = as_list(old)
    maps = as_list(mappings)
    discovery = as_list(as_map(as_map(app.get("ipAddress")).get("discovery")).get("ports"))
    if mode == HOST:
        count = len(defs) if definitions is not None else len(olds)
    elif mode == BRIDGE:
        count = len(maps)
    else:
        count = len(maps) if maps else len(discovery)
    service: list[int | None] = []
    container: list[int | None] = []
    for n in range(count):
        sp = None
        if n < len(maps):
            sp = _number(as_map(maps[n]).get("servicePort"))
        if sp is None and n < len(defs):
            sp = _number(as_map(defs[n]).get("port"))
        if sp is None and n < len(olds):
            sp = _number(olds[n])
        service.append(sp)
        cp = None
        if mode == CONTAINER:
            if n < len(maps):
                cp = _number(as_map(maps[n]).get("containerPort"))
            elif n < len(discovery):
                cp = _number(as_map(discovery[n]).get("number"))
        container.append(cp)
    return Ports(mode, tuple(service), tuple(container)), ""


def task_address(task: Obj, layout: Ports, n: int) -> tuple[str, int] | None:
    """Where task `task` serves port index n, or None."""
    if layout.mode == CONTAINER:
        port = layout.container[n]
        if port is None:
            return None
        for entry in as_list(task.get("ipAddresses")):
            ip = as_map(entry).get("ipAddress")
            if not isinstance(ip, str):
                return None
            try:
                return str(ipaddress.ip_address(ip)), port
            except ValueError:
                return None
        return None
    host = task.get("host")
    task_ports = as_list(task.get("ports"))
    if (not isinstance(host, str) or not host or len(host) > 253 or any(c.isspace() or c in
            "/[]@" for c in host) or n >= len(task_ports) or not valid_port(task_ports[n])):
        return None
    return host, task_ports[n]


def task_state(task: Obj, app: Obj, health: bool) -> str:
    """"ready", "terminating" (Marathon is killing it: drained) or "" (left out).

    A task without `state` is running (old Marathons). With `health` and the app's health
    checks, a running task is ready once some `healthCheckResults[].alive` is true; with the
    readiness results of a deployment (`embed=apps.readiness`), one that is not yet ready waits.
    """
    state = task.get("state", RUNNING)
    if state == KILLING:
        return "terminating"
    if state != RUNNING:
        return ""
    if health and as_list(app.get("healthChecks")):
        results = as_list(task.get("healthCheckResults"))
        if not any(as_map(r).get("alive") is True for r in results):
            return ""
    if health:
        task_id = task.get("id")
        verdicts = [as_map(r).get("ready") for r in as_list(app.get("readinessCheckResults"))
                    if as_map(r).get("taskId") == task_id and task_id is not None]
        if verdicts and True not in verdicts:
            return ""
    return "ready"
