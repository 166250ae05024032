"""Shared fixtures. Keep this generic: helpers for HTTP tests live in tests/httpkit.py.

Tests (or modules, through `pytestmark`) marked `@pytest.mark.uvloop` run on a uvloop event
loop, as the proxy does in production; all others keep the default asyncio loop.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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
        return {"uvloop": _watched(uvloop.new_event_loop)}
    return {"asyncio": _watched(asyncio.new_event_loop)}


# A test whose loop waits forever is stopped here: pytest-timeout's alarm is a Python signal
# handler, which never runs while a loop (uvloop above all) sleeps in C with nothing to do. The
# watchdog prints every task's stack (where the test waits) and cancels them: the test fails
# with CancelledError instead of hanging the suite.
HANG_AFTER = float(os.environ.get("EDGELB_TEST_HANG_AFTER", "100"))  # s: before pytest-timeout
_LOOPS: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def _watched(factory: Callable[[], asyncio.AbstractEventLoop]
             ) -> Callable[[], asyncio.AbstractEventLoop]:
    def make() -> asyncio.AbstractEventLoop:
        loop = factory()
        _LOOPS.add(loop)
        return loop

    return make


@pytest.fixture(autouse=True)
def _hang_watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    timer = threading.Timer(HANG_AFTER, _unhang, args=(request.node.nodeid,))
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


def _unhang(nodeid: str) -> None:
    for loop in list(_LOOPS):
        if loop.is_running():
            loop.call_soon_threadsafe(_dump_and_cancel, loop, nodeid)


def _dump_and_cancel(loop: asyncio.AbstractEventLoop, nodeid: str) -> None:
    out = sys.__stderr__
    print(f"\n{nodeid}: its loop still runs after {HANG_AFTER:g} s; its tasks:", file=out)
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.print_stack(file=out)
    for task in tasks:
        task.cancel()


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
