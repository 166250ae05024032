"""During the shutdown delay edgelb still serves, but ends each connection after its response
(Connection: close), so clients reconnect to another replica before the listener closes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from httpkit import HOST, Client, HttpBackend, eventually, free_port, within

from edgelb.ops.app import App

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(30)]


async def test_keep_alive_clients_are_told_to_close_during_the_delay(tmp_path: Path) -> None:
    b = await HttpBackend("b").start()
    port = free_port()
    path = tmp_path / "edgelb.yaml"
    path.write_text(
        f"admin: {{listen: {HOST}:{free_port()}}}\n"
        "shutdown: {delay: 1s, grace: 1s}\n"
        f"services: [{{name: web, listen: {HOST}:{port},\n"
        f"             backends: [{{address: {HOST}:{b.port}}}]}}]\n"
    )
    app = App(path)
    await within(app.start(), 10)
    idle = await Client.open(port)
    first = await within(idle.request("GET", "/before"))
    assert first.status == 200 and not first.has("connection")  # kept alive
    stopping = asyncio.create_task(app.stop())
    runtime = app.runtime
    assert runtime is not None
    await eventually(lambda: runtime.draining, what="the stop to begin")
    r = await within(idle.request("GET", "/during"))  # the idle connection, reused once more
    assert r.status == 200 and r.get("connection") == "close"
    assert await within(idle.at_eof(3)) == b""
    fresh = await Client.open(port)  # new connections are still accepted during the delay
    r = await within(fresh.request("GET", "/new"))
    assert r.status == 200 and r.get("connection") == "close"
    fresh.close()
    idle.close()
    await within(stopping, 10)
    assert [q.target for q in b.requests] == ["/before", "/during", "/new"]
    await b.stop()
