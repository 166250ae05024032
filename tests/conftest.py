"""Shared fixtures. Keep this generic: helpers for HTTP tests live in tests/httpkit.py.

Tests (or modules, through `pytestmark`) marked `@pytest.mark.uvloop` run on a uvloop event
loop, as the proxy does in production; all others keep the default asyncio loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from httpkit import HttpBackend, free_port, start_runtime

from edgelb import compiled
from edgelb.control.runtime import Runtime


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "uvloop: run this async test on a uvloop event loop")
    old = compiled.stale()
    if old:
        pytest.exit(f"compiled modules older than their source: {', '.join(old)}; "
                    "run `make compiled` (or `make test`), or `make clean` for pure Python",
                    returncode=2)


def pytest_report_header(config: pytest.Config) -> str:
    return f"edgelb: {compiled.describe()}"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    if item.get_closest_marker("uvloop") is not None:
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[[], int]:
    """A function returning a currently free TCP port on 127.0.0.1."""
    return free_port


@pytest.fixture
async def backend() -> AsyncIterator[Callable[..., Awaitable[HttpBackend]]]:
    """Factory: `await backend(name, handler)` starts an HttpBackend, stopped at teardown."""
    started: list[HttpBackend] = []

    async def make(name: str = "b", handler: Any = None, port: int = 0) -> HttpBackend:
        b = await HttpBackend(name, handler).start(port)
        started.append(b)
        return b

    yield make
    for b in started:
        await b.stop()


@pytest.fixture
async def proxy() -> AsyncIterator[Callable[..., Awaitable[Runtime]]]:
    """Factory: `await proxy(snapshot, entrypoints=[(name, port)], defaults=Policy())` runs a
    Runtime in the test's loop; it is shut down at teardown."""
    runtimes: list[Runtime] = []

    async def make(snap: Any = None, **kw: Any) -> Runtime:
        rt = await start_runtime(snap, **kw)
        runtimes.append(rt)
        return rt

    yield make
    for rt in runtimes:
        await rt.shutdown(0.2)
