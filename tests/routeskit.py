"""Helpers for the routes tests: a file config with `routes:` run by a Runtime on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from httpkit import HttpBackend, free_port

from edgelb.ops.config import parse_config


async def serve_config(proxy: Callable[..., Any], backends: dict[str, HttpBackend],
                       routes_yaml: str, extra_services: str = "") -> int:
    """Run the services `backends` (name -> backend) and the `routes:` given as YAML on a
    fresh entrypoint; returns its port."""
    port = free_port()
    services = "".join(f"  - {{name: {name}, backends: [127.0.0.1:{b.port}]}}\n"
                       for name, b in backends.items())
    text = (f"entrypoints: {{http: {{listen: 127.0.0.1:{port}}}}}\n"
            f"services:\n{services}{extra_services}routes:\n{routes_yaml}")
    config = parse_config(text)
    await proxy(config.snapshot, entrypoints=[("http", port)])
    return port
