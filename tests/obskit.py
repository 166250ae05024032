"""Helpers for the monitoring tests: a whole edgelb (App) with a config file, and /metrics
parsed into families, over real loopback sockets."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from httpkit import HOST, HttpBackend, free_port, within
from prometheus_client.parser import text_string_to_metric_families

from edgelb.ops.app import App

# A family's samples: {sample name: {frozenset(label pairs): value}}
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


class Edgelb:
    """One running App, its config file, its public and admin ports."""

    def __init__(self, path: Path, app: App, port: int, admin: int,
                 backends: list[HttpBackend]) -> None:
        self.path = path
        self.app = app
        self.port = port
        self.admin = admin
        self.backends = backends

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin}"

    def config(self, extra: str = "", name: str = "web") -> str:
        lines = [
            f"admin: {{listen: {HOST}:{self.admin}}}",
            "shutdown: {grace: 2s}",
            "services:",
            f"  - name: {name}",
            f"    listen: {HOST}:{self.port}",
            "    backends:",
            *(f"      - {{address: {HOST}:{b.port}}}" for b in self.backends),
        ]
        return "\n".join(lines) + "\n" + extra

    def write(self, extra: str = "", name: str = "web") -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(self.config(extra, name))
        os.replace(tmp, self.path)

    async def reload(self, extra: str = "", name: str = "web") -> None:
        """Rewrite the config and wait until it is applied."""
        generation = self.app.generation
        self.app.applied.clear()
        self.write(extra, name)
        self.app.reload()
        while self.app.generation == generation:
            await within(self.app.applied.wait())
            self.app.applied.clear()

    async def scrape(self) -> dict[str, Samples]:
        return await scrape(self.admin_url)


async def scrape(base_url: str) -> dict[str, Samples]:
    """GET /metrics: {family name (as exposed: counters with _total): samples}."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(base_url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, Samples]:
    out: dict[str, Samples] = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        samples: Samples = out.setdefault(name, {})
        for s in fam.samples:
            samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def sample_names(families: dict[str, Samples]) -> set[str]:
    """Every sample name exposed (histograms' _bucket/_sum/_count, counters' _total)."""
    return {name for samples in families.values() for name in samples}


def labels_of(families: dict[str, Samples], family: str) -> list[dict[str, str]]:
    return [dict(k) for samples in families[family].values() for k in samples]


@pytest.fixture
async def edgelb(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[Edgelb]]]:
    """Factory: `await edgelb(backends, extra="...")` starts an App serving service "web" on
    a fresh port with those backends; stopped at teardown."""
    running: list[Edgelb] = []

    async def start(backends: list[HttpBackend], extra: str = "", name: str = "web") -> Edgelb:
        path = tmp_path / "edgelb.yaml"
        e = Edgelb(path, App(path), free_port(), free_port(), backends)
        e.write(extra, name)
        await within(e.app.start())
        running.append(e)
        return e

    yield start
    for e in running:
        if not e.app.stopped.is_set():
            await within(e.app.stop(), 10)


def value(families: dict[str, Samples], sample: str, **labels: str) -> Any:
    for samples in families.values():
        if sample in samples:
            return samples[sample][frozenset(labels.items())]
    raise KeyError(sample)
