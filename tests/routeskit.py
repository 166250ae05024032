"""Helpers for the routes tests: a file config with `routes:` run by a Runtime on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from httpkit import HttpBackend, free_port

from edgelb.ops.config import parse_config
from watchers.model import Policy


async def serve_config(proxy: Callable[..., Any], backends: dict[str, HttpBackend],
                       routes_yaml: str, extra_services: str = "") -> int:
    """Run the services `backends` (name -> backend) and the `routes:` given as YAML on a
    fresh entrypoint; returns its port."""
    port, _ = await serve(proxy, backends, routes_yaml, extra_services)
    return port


async def serve(proxy: Callable[..., Any], backends: dict[str, HttpBackend], routes_yaml: str,
                extra_services: str = "", entrypoint: str = "") -> tuple[int, Any]:
    """serve_config, returning the port and the Runtime; `entrypoint`: more keys of the
    entrypoint (e.g. "h2c: true")."""
    port = free_port()
    config = parse_config(config_text(port, backends, routes_yaml, extra_services, entrypoint))
    runtime = await proxy(None, entrypoints=[("http", port)])
    if entrypoint:  # the config's own entrypoint, with its keys (h2c, ...)
        await runtime.set_entrypoints(list(config.entrypoints), Policy())
    await runtime.apply(config.snapshot)
    return port, runtime


def config_text(port: int, backends: dict[str, HttpBackend], routes_yaml: str,
                extra_services: str = "", entrypoint: str = "") -> str:
    services = "".join(f"  - {{name: {name}, backends: [127.0.0.1:{b.port}]}}\n"
                       for name, b in backends.items())
    more = f", {entrypoint}" if entrypoint else ""
    return (f"entrypoints: {{http: {{listen: 127.0.0.1:{port}{more}}}}}\n"
            f"services:\n{services}{extra_services}routes:\n{routes_yaml}")
