"""The whole process in-loop (App) with a real config file: reload, rejected edits, drain."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from httpkit import HOST, Call, Client, HttpBackend, eventually, fetch, free_port, within

from edgelb.ops.app import App
from edgelb.ops.config import ConfigError

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(30)]



def config_text(admin: int, port: int, backends: list[HttpBackend], extra: str = "") -> str:
    lines = [
        f"admin: {{listen: {HOST}:{admin}}}",
        "shutdown: {grace: 3s}",
        "services:",
        "  - name: web",
        f"    listen: {HOST}:{port}",
        "    backends:",
        *(f"      - {{address: {HOST}:{b.port}}}" for b in backends),
    ]
    return "\n".join(lines) + "\n" + extra


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Setup:
    def __init__(self, path: Path, admin: int, port: int) -> None:
        self.path = path
        self.admin = admin
        self.port = port

    def write(self, backends: list[HttpBackend], extra: str = "") -> None:
        write(self.path, config_text(self.admin, self.port, backends, extra))


@pytest.fixture
async def running_app(
    tmp_path: Path,
) -> AsyncIterator[Callable[[list[HttpBackend]], Awaitable[tuple[App, Setup]]]]:
    apps: list[App] = []

    async def start(backends: list[HttpBackend]) -> tuple[App, Setup]:
        setup = Setup(tmp_path / "edgelb.yaml", free_port(), free_port())
        setup.write(backends)
        app = App(setup.path)
        await within(app.start())
        apps.append(app)
        return app, setup

    yield start
    for app in apps:
        if not app.stopped.is_set():
            await within(app.stop(), 10)


async def served_by(port: int) -> str | None:
    return (await within(fetch(port))).get("x-backend")


async def test_reload_applies_a_change(backend, running_app):
    a, b = await backend("a"), await backend("b")
    app, setup = await running_app([a])
    assert await served_by(setup.port) == "a"
    assert app.watcher is not None
    app.watcher.interval = 3600  # no more polling: only reload() reads the file now
    await asyncio.sleep(0.4)  # let the poll wait in progress run out
    generation = app.generation
    setup.write([b])
    await asyncio.sleep(0.6)  # polling would have picked it up by now
    assert app.generation == generation
    assert await served_by(setup.port) == "a"

    app.applied.clear()
    app.reload()
    await within(app.applied.wait())
    assert app.generation == generation + 1
    assert await served_by(setup.port) == "b"


async def test_a_file_change_is_applied_without_reload(backend, running_app):
    a, b = await backend("a"), await backend("b")
    app, setup = await running_app([a])
    setup.write([b])

    async def switched() -> None:
        while await served_by(setup.port) != "b":
            app.applied.clear()
            await app.applied.wait()

    await within(switched(), 5)


async def test_bad_edit_is_rejected_and_the_old_config_keeps_serving(backend, running_app):
    a, b = await backend("a"), await backend("b")
    app, setup = await running_app([a])
    runtime = app.runtime
    assert runtime is not None
    generation = app.generation
    setup.write([b], extra="    bakends_typo: []\n")
    app.reload()

    async def rejected() -> None:
        while "file" not in runtime.last_errors:
            await asyncio.sleep(0.02)

    await within(rejected())
    error = runtime.last_errors["file"]
    assert "bakends_typo" in error
    assert "services[0]" in error or "services.0" in error
    assert runtime.reloads.get(("file", "error"), 0) >= 1
    assert app.generation == generation
    assert await served_by(setup.port) == "a"

    # fixing the file clears the error and applies
    app.applied.clear()
    setup.write([b])
    app.reload()
    await within(app.applied.wait())
    assert "file" not in runtime.last_errors
    assert await served_by(setup.port) == "b"


async def test_a_file_watcher_loop_that_raises_is_restarted_and_the_config_keeps_serving(
    backend, running_app, caplog
):
    a, b = await backend("a"), await backend("b")
    app, setup = await running_app([a])
    runtime, watcher = app.runtime, app.watcher
    assert runtime is not None and watcher is not None
    assert runtime.watcher_up["file"] is True
    real = watcher.poll
    failures: list[int] = []
    broken = True

    async def poll(force: bool = False) -> bool:  # a bug in the loop, until `broken` is off
        if broken:
            failures.append(1)
            raise RuntimeError("poll bug")
        return await real(force)

    watcher.poll = poll  # type: ignore[method-assign]
    await eventually(lambda: len(failures) >= 2, what="the loop to be restarted (and fail again)")
    assert runtime.watcher_up["file"] is False
    assert "file watcher loop failed (RuntimeError: poll bug)" in runtime.last_errors["file"]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{HOST}:{setup.admin}/metrics") as r:
            assert 'edgelb_watcher_up{watcher="file"} 0.0' in await r.text()
        async with s.get(f"http://{HOST}:{setup.admin}/readyz") as r:
            assert r.status == 200  # synced once: stays ready on the applied config
    assert await served_by(setup.port) == "a"
    logged = [r for r in caplog.records if "file watcher loop failed" in r.getMessage()]
    assert logged and logged[0].exc_info is not None and logged[0].exc_info[0] is RuntimeError
    setup.write([b])  # changed while the loop is down
    broken = False
    await eventually(lambda: runtime.watcher_up["file"], what="the watcher up after a restart")
    await eventually(lambda: f"{HOST}:{b.port}" in runtime.services["web"].pool.by_key,
                     what="the change made while down applied")
    assert await served_by(setup.port) == "b"
    assert "file" not in runtime.last_errors


async def test_edit_with_a_busy_port_is_rejected(backend, running_app):
    a = await backend("a")
    other = await backend("other")  # holds a port the edit wants
    app, setup = await running_app([a])
    runtime = app.runtime
    assert runtime is not None
    text = config_text(setup.admin, setup.port, [a]) + (
        f"  - name: clash\n    listen: {HOST}:{other.port}\n    backends: []\n"
    )
    write(setup.path, text)
    app.reload()

    async def rejected() -> None:
        while "file" not in runtime.last_errors:
            await asyncio.sleep(0.02)

    await within(rejected())
    assert str(other.port) in runtime.last_errors["file"]
    assert set(runtime.services) == {"web"}
    assert await served_by(setup.port) == "a"


async def test_start_with_a_bad_config_raises(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"admin: {{listen: {HOST}:{free_port()}}}\nservicez: []\n")
    with pytest.raises(ConfigError) as info:
        await App(path).start()
    assert "servicez" in str(info.value)


async def test_stop_drains_inflight_requests_and_refuses_new_connections(backend, running_app):
    started = asyncio.Event()
    finish = asyncio.Event()

    async def slow(call: Call) -> None:
        await call.read_body()
        started.set()
        await finish.wait()
        await call.respond(200, b"drained")

    a = await backend("a", slow)
    app, setup = await running_app([a])
    client = await Client.open(setup.port)
    await client.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await within(started.wait())
    idle = await Client.open(setup.port)  # an idle keep-alive connection

    stopping = asyncio.get_running_loop().create_task(app.stop())

    async def refused() -> None:
        while True:
            try:
                _, w = await asyncio.open_connection(HOST, setup.port)
            except ConnectionRefusedError:
                return
            w.close()
            await asyncio.sleep(0.02)

    await within(refused())
    assert await idle.at_eof() == b""
    assert not stopping.done()
    assert app.runtime is not None and app.runtime.draining

    finish.set()
    r = await within(client.response())
    assert r.status == 200
    assert r.body == b"drained"
    assert (r.get("connection") or "").lower() == "close"
    await within(stopping)
    assert app.stopped.is_set()
    # the admin endpoint is gone too
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, setup.admin)


def routed_config(admin: int, ep: int | None, backends: dict[str, HttpBackend],
                  hosts: bool = True) -> str:
    lines = [f"admin: {{listen: {HOST}:{admin}}}", "shutdown: {grace: 1s}"]
    if ep is not None:
        lines += ["entrypoints:", f"  http: {{listen: {HOST}:{ep}}}"]
    lines.append("services:")
    for name, b in backends.items():
        lines += [f"  - name: {name}"]
        if hosts:
            lines += [f"    hosts: [{name}.example.com]"]
        else:
            lines += [f"    listen: {HOST}:{free_port()}"]
        lines += ["    backends:", f"      - {{address: {HOST}:{b.port}}}"]
    return "\n".join(lines) + "\n"


async def test_routes_on_an_entrypoint_follow_the_file(backend, tmp_path):
    a, b = await backend("a"), await backend("b")
    admin, ep = free_port(), free_port()
    path = tmp_path / "edgelb.yaml"
    write(path, routed_config(admin, ep, {"one": a}))
    app = App(path)
    await within(app.start())
    try:
        r = await within(fetch(ep, host="one.example.com"))
        assert r.get("x-backend") == "a"
        assert (await within(fetch(ep, host="two.example.com"))).status == 404
        app.applied.clear()
        write(path, routed_config(admin, ep, {"one": a, "two": b}))
        app.reload()
        await within(app.applied.wait())
        r = await within(fetch(ep, host="two.example.com"))
        assert r.get("x-backend") == "b"
    finally:
        await within(app.stop(), 10)


async def test_dropping_the_entrypoint_and_its_routes_in_one_edit(backend, tmp_path):
    """A valid edit that removes the entrypoint together with the routes that needed it."""
    a = await backend("a")
    admin, ep = free_port(), free_port()
    path = tmp_path / "edgelb.yaml"
    write(path, routed_config(admin, ep, {"one": a}))
    app = App(path)
    await within(app.start())
    runtime = app.runtime
    assert runtime is not None
    try:
        generation = app.generation
        write(path, routed_config(admin, None, {"one": a}, hosts=False))
        app.reload()

        async def settled() -> None:
            while app.generation == generation and "file" not in runtime.last_errors:
                await asyncio.sleep(0.02)

        await within(settled())
        assert runtime.last_errors.get("file") is None, runtime.last_errors.get("file")
        assert app.generation == generation + 1
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(HOST, ep)
    finally:
        await within(app.stop(), 10)
