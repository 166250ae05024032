"""Helpers of the Marathon watcher tests: apps on the fake Marathon (only the labels of the
host-networking minimal case both the placeholder and the full translator honour), a watcher
wired to a real Runtime, and a steady client load that counts its failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from httpkit import HOST, HttpBackend, fetch, start_runtime

from edgelb.control.runtime import Runtime
from edgelb.control.tasks import describe, spawn, supervise
from edgelb.ops.config import MarathonWatcherConfig, policy_from_annotations
from edgelb.ops.fake_marathon import FakeMarathon, app_definition
from watchers.marathon.watcher import MarathonWatcher
from watchers.model import Policy
from watchers.source import Tasks


def tcp_app(app_id: str, port: int, *, health_checks: bool = False) -> dict[str, Any]:
    """An app exposed in tcp mode on 127.0.0.1:`port` (its service port)."""
    return app_definition(app_id, port, health_checks=health_checks, labels={
        "HAPROXY_GROUP": "external", "HAPROXY_0_BIND_ADDR": HOST})


def service_name(app_id: str, port: int) -> str:
    return f"{app_id.strip('/').replace('/', '_')}_{port}"


@dataclass
class Load:
    """A bounded client loop through a proxy port: one request after another."""

    port: int
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    by_backend: dict[bytes, int] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self, limit: int = 20000) -> Load:
        self._task = asyncio.create_task(self._run(limit))
        return self

    async def _run(self, limit: int) -> None:
        for _ in range(limit):
            if self._stop.is_set():
                return
            try:
                r = await asyncio.wait_for(fetch(self.port, host="load.test"), 5)
                if r.status == 200:
                    self.ok += 1
                    self.by_backend[r.body] = self.by_backend.get(r.body, 0) + 1
                else:
                    self.failed.append(f"HTTP {r.status}")
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
                self.failed.append(repr(e))
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)


class Harness:
    """A Runtime and a MarathonWatcher following fakes, in this loop."""

    def __init__(self, runtime: Runtime, watcher: MarathonWatcher) -> None:
        self.runtime = runtime
        self.watcher = watcher

    @property
    def services(self) -> dict[str, Any]:
        return self.runtime.services

    def backends(self, name: str) -> set[int]:
        """The ports of a service's serving backends (not draining)."""
        state = self.runtime.services.get(name)
        if state is None:
            return set()
        return {b.spec.port for b in state.pool.all_backends() if not b.draining}


@asynccontextmanager
async def watching(urls: list[str], *, silence: float = 30.0, resync: float = 300.0,
                   **config: Any) -> AsyncIterator[Harness]:
    runtime = await start_runtime()
    runtime.register_watcher("marathon")
    cfg = MarathonWatcherConfig(urls=tuple(urls), resync=resync, **config)
    watcher = MarathonWatcher(cfg, emit=runtime.apply, report=runtime.report,
                              read_policy=policy_from_annotations, defaults=Policy,
                              tasks=Tasks(spawn, supervise, describe), silence=silence)
    await watcher.start()
    try:
        yield Harness(runtime, watcher)
    finally:
        await watcher.stop()
        await runtime.shutdown(0.2)


@asynccontextmanager
async def fakes(n: int = 1, **kw: Any) -> AsyncIterator[list[FakeMarathon]]:
    started = [await FakeMarathon(keepalive=0.2, **kw).start() for _ in range(n)]
    try:
        yield started
    finally:
        for f in started:
            await f.stop()


async def backends(*names: str) -> list[HttpBackend]:
    from httpkit import ok

    out = []
    for name in names:
        out.append(await HttpBackend(name, ok(name.encode())).start())
    return out
