"""The demo backends of `edgelb demo`, checked over raw TCP on 127.0.0.1.

Every test runs on both the default asyncio loop and uvloop (the proxy's loop).
"""

from __future__ import annotations

import asyncio
import sys
import time
import types
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml

from edgelb.ops import demo
from edgelb.ops.demo import (
    DEFAULT_SPECS,
    BackendSpec,
    DemoBackend,
    demo_config_yaml,
    start_demo_backends,
    stop_demo_backends,
)

Runner = Callable[[Coroutine[Any, Any, Any]], Any]
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Runner:
    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            return r.run(asyncio.wait_for(coro, timeout=10))

    return runner


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


async def read_response(reader: asyncio.StreamReader, head_only: bool = False) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines[1:]:
        if line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = b""
    if not head_only:
        body = await reader.readexactly(int(headers["content-length"]))
    return Response(int(status), headers, body)


def get(path: str, close: bool = False, method: str = "GET") -> bytes:
    conn = "Connection: close\r\n" if close else ""
    return f"{method} {path} HTTP/1.1\r\nHost: demo\r\n{conn}\r\n".encode()


async def fetch(port: int, path: str = "/") -> Response:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(get(path, close=True))
        resp = await read_response(reader)
        assert await reader.read() == b"", "the backend must close after Connection: close"
        return resp
    finally:
        writer.close()


async def with_backends(
    body: Callable[[list[DemoBackend]], Awaitable[Any]],
    specs: tuple[BackendSpec, ...] = DEFAULT_SPECS,
) -> Any:
    backends = await start_demo_backends(specs)
    try:
        return await body(backends)
    finally:
        await stop_demo_backends(backends)


async def until(predicate: Callable[[], bool]) -> None:
    """Wait (bounded by the runner's timeout) for a state change made by the loop's callbacks."""
    while not predicate():
        await asyncio.sleep(0.001)


def test_each_backend_answers_get_with_its_name(run: Runner) -> None:
    async def body(backends: list[DemoBackend]) -> None:
        assert [b.name for b in backends] == ["small", "medium", "large"]
        assert [b.capacity for b in backends] == [2, 4, 8]
        assert len({b.port for b in backends}) == 3
        for b in backends:
            resp = await fetch(b.port)
            assert resp.status == 200
            assert resp.headers["x-backend"] == b.name
            assert resp.headers["connection"] == "close"
            assert resp.body == f"hello from demo backend {b.name} (port {b.port})\n".encode()
            assert b.served == 1

    run(with_backends(body))


def test_healthz_is_200(run: Runner) -> None:
    async def body(backends: list[DemoBackend]) -> None:
        for b in backends:
            resp = await fetch(b.port, "/healthz")
            assert (resp.status, resp.body) == (200, b"ok\n")
            assert b.served == 0  # health checks do not take a worker

    run(with_backends(body))


def test_keep_alive_serves_two_requests_on_one_connection(run: Runner) -> None:
    async def body(backends: list[DemoBackend]) -> None:
        b = backends[2]
        reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
        try:
            writer.write(get("/"))
            first = await read_response(reader)
            assert first.status == 200
            assert first.headers["connection"] == "keep-alive"
            writer.write(get("/?again=1"))
            second = await read_response(reader)
            assert second.status == 200
            assert second.body == first.body
            assert b.served == 2
            writer.write(get("/healthz", close=True))
            assert (await read_response(reader)).status == 200
            assert await reader.read() == b""
        finally:
            writer.close()

    run(with_backends(body))


def test_pipelined_requests_are_answered_in_order(run: Runner) -> None:
    async def body(backends: list[DemoBackend]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", backends[0].port)
        try:
            writer.write(get("/") + get("/healthz") + get("/", method="HEAD") + get("/", True))
            a = await read_response(reader)
            h = await read_response(reader)
            head = await read_response(reader, head_only=True)
            last = await read_response(reader)
            assert a.body.startswith(b"hello from demo backend small")
            assert h.body == b"ok\n"
            assert head.status == 200 and int(head.headers["content-length"]) == len(a.body)
            assert last.body == a.body and last.headers["connection"] == "close"
            assert await reader.read() == b""
        finally:
            writer.close()

    run(with_backends(body))


def test_malformed_request_gets_400_and_close(run: Runner) -> None:
    async def body(backends: list[DemoBackend]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", backends[0].port)
        try:
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            resp = await read_response(reader)
            assert resp.status == 400
            assert await reader.read() == b""
        finally:
            writer.close()

    run(with_backends(body))


@pytest.mark.parametrize("capacity", [1, 3])
def test_request_beyond_capacity_waits_for_a_worker(run: Runner, capacity: int) -> None:
    service = 0.3  # long enough that nothing finishes while the test looks (a loaded CI host)
    spec = BackendSpec("tiny", capacity=capacity, service_time=service)

    async def body(backends: list[DemoBackend]) -> None:
        b = backends[0]
        done_order: list[int] = []
        done_at: dict[int, float] = {}
        conns = [await asyncio.open_connection("127.0.0.1", b.port) for _ in range(capacity + 1)]

        async def one(i: int) -> None:
            reader, _ = conns[i]
            resp = await read_response(reader)
            assert resp.status == 200
            done_at[i] = time.monotonic()
            done_order.append(i)

        try:
            t0 = time.monotonic()
            tasks = []
            for i in range(capacity):  # fill every worker
                conns[i][1].write(get("/"))
                tasks.append(asyncio.create_task(one(i)))
            await until(lambda: b.busy == capacity)
            conns[capacity][1].write(get("/"))  # one more than capacity: it must queue
            tasks.append(asyncio.create_task(one(capacity)))
            await until(lambda: b.queued == 1)
            assert b.busy == capacity
            # /healthz does not queue behind the workers
            assert (await fetch(b.port, "/healthz")).status == 200
            assert done_order == []
            await asyncio.gather(*tasks)
        finally:
            for _, writer in conns:
                writer.close()

        assert done_order[-1] == capacity, "the request beyond capacity finished first"
        assert sorted(done_order[:-1]) == list(range(capacity))
        assert b.max_busy == capacity and b.busy == 0 and b.queued == 0
        # It held a worker for a full service time after one freed: at least 2 service times.
        assert done_at[capacity] - t0 >= 2 * service * 0.95
        assert done_at[capacity] >= max(done_at[i] for i in range(capacity))

    run(with_backends(body, (spec,)))


def test_close_stops_listening_and_drops_connections(run: Runner) -> None:
    async def body() -> None:
        backends = await start_demo_backends(DEFAULT_SPECS[:1])
        b = backends[0]
        reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
        writer.write(get("/"))
        await until(lambda: b.busy == 1)
        await stop_demo_backends(backends)
        try:
            rest = await reader.read()
        except ConnectionResetError:
            rest = b""
        assert rest == b""  # dropped, no response
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", b.port)

    run(body())


def test_config_yaml_weights_backends_by_capacity(run: Runner) -> None:
    async def body(backends: list[DemoBackend]) -> None:
        text = demo_config_yaml(18080, 19090, backends)
        cfg = yaml.safe_load(text)
        assert cfg["admin"] == {"listen": "127.0.0.1:19090"}
        (svc,) = cfg["services"]
        assert svc["name"] == "demo"
        assert svc["listen"] == "127.0.0.1:18080"
        assert svc["mode"] == "http"
        assert svc["balance"] == "least-loaded"
        assert svc["health_check"]["path"] == "/healthz"
        assert svc["backends"] == [
            {"address": f"127.0.0.1:{b.port}", "weight": w}
            for b, w in zip(backends, [2, 4, 8], strict=True)
        ]

    run(with_backends(body))


def test_main_starts_backends_through_the_startup_hook(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """demo.main hands run_forever a startup hook that starts the backends in its loop and
    writes the config before it is loaded."""
    seen: dict[str, Any] = {}

    def fake_run_forever(
        path: str, banner: str = "", startup: Callable[[], Awaitable[None]] | None = None
    ) -> int:
        assert startup is not None
        assert not Path(path).exists()  # written by the hook, once the ports are known

        async def serve() -> None:
            await startup()
            cfg = yaml.safe_load(Path(path).read_text())
            seen["cfg"] = cfg
            ports = [int(be["address"].rsplit(":", 1)[1]) for be in cfg["services"][0]["backends"]]
            seen["bodies"] = [(await fetch(p)).body for p in ports]

        uvloop.run(asyncio.wait_for(serve(), timeout=10))
        seen["banner"] = banner
        return 7

    fake_app = types.SimpleNamespace(run_forever=fake_run_forever)
    monkeypatch.setitem(sys.modules, "edgelb.ops.app", fake_app)
    assert demo.main(port=18081, admin_port=19091) == 7
    svc = seen["cfg"]["services"][0]
    assert svc["listen"] == "127.0.0.1:18081"
    assert seen["cfg"]["admin"]["listen"] == "127.0.0.1:19091"
    assert [b["weight"] for b in svc["backends"]] == [2, 4, 8]
    assert [body.split(b" (")[0] for body in seen["bodies"]] == [
        b"hello from demo backend small",
        b"hello from demo backend medium",
        b"hello from demo backend large",
    ]
    for needle in ("curl", "http://127.0.0.1:18081/", "/metrics", "/status.json", "/status"):
        assert needle in seen["banner"]
    out = capsys.readouterr().out
    assert "demo backend small" in out and "capacity 2" in out
