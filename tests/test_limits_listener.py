"""Listener limits against floods and slow clients: connections per listener and per client
address, header count, minimum body rate; counted in metrics."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from httpkit import (
    HOST,
    Client,
    HttpBackend,
    eventually,
    free_port,
    running,
    service,
    snapshot,
    tcp_echo_server,
    within,
)

from edgelb.ops.config import LimitsConfig
from edgelb.ops.metrics import make_registry
from watchers.model import Settings


def refused(runtime, reason: str) -> float | None:
    registry = make_registry(runtime, process=False)
    for listener in runtime.listeners:
        value = registry.get_sample_value(
            "edgelb_listener_refused_total",
            {"listener": listener, "kind": runtime.listeners[listener].kind, "reason": reason})
        if value is not None:
            return value
    return None


async def start(limits: LimitsConfig, mode: str = "http"):
    b = await HttpBackend("b").start()
    port = free_port()
    ctx = running(snapshot(service("web", [b], listen=port, mode=mode)))
    rt = await ctx.__aenter__()
    # through the one door: the file config's settings come with its snapshot
    await rt.apply(dataclasses.replace(rt.snapshots["file"],
                                       settings=Settings(grace=1.0, limits=limits)))
    assert all(listener.limits == limits for listener in rt.listeners.values())
    return b, port, rt, ctx


async def test_connections_per_client_and_per_listener_are_capped() -> None:
    b, port, rt, ctx = await start(LimitsConfig(connections=3, connections_per_client=2))
    try:
        kept = [await Client.open(port) for _ in range(2)]
        for c in kept:
            assert (await within(c.request("GET", "/"))).status == 200
        third = await Client.open(port)  # a third from the same address: closed at once
        assert await within(third.at_eof(3)) == b""
        assert refused(rt, "per_client") == 1
        kept[0].close()
        listener = next(iter(rt.listeners.values()))
        await eventually(lambda: listener.per_client.get(HOST.encode()) == 1,
                         what="the proxy to see the close")
        again = await Client.open(port)
        assert (await within(again.request("GET", "/"))).status == 200
        again.close()
        kept[1].close()
        third.close()
    finally:
        await ctx.__aexit__(None, None, None)
        await b.stop()


async def test_too_many_header_fields_get_431() -> None:
    b, port, _rt, ctx = await start(LimitsConfig(headers=10))
    try:
        client = await Client.open(port)
        ok = await within(client.request("GET", "/", headers=[(f"x-{i}", "v") for i in range(8)]))
        assert ok.status == 200
        many = [(f"x-{i}", "v") for i in range(20)]
        await client.send(b"GET /many HTTP/1.1\r\nHost: h\r\n"
                          + b"".join(f"{k}: {v}\r\n".encode() for k, v in many) + b"\r\n")
        rest = await within(client.at_eof(3))
        assert rest.startswith(b"HTTP/1.1 431 ")
        assert [r.target for r in b.requests] == ["/"]
        client.close()
    finally:
        await ctx.__aexit__(None, None, None)
        await b.stop()


async def test_tcp_listener_caps_connections_per_client() -> None:
    server, bport = await tcp_echo_server()
    port = free_port()
    async with running(snapshot(service("t", [bport], listen=port, mode="tcp"))) as rt:
        for listener in rt.listeners.values():
            listener.set_limits(LimitsConfig(connections_per_client=1))
        r1, w1 = await asyncio.open_connection(HOST, port)
        w1.write(b"hi")
        assert await within(r1.readexactly(2)) == b"hi"
        r2, w2 = await asyncio.open_connection(HOST, port)
        assert await within(r2.read()) == b""  # refused: closed at once
        assert refused(rt, "per_client") == 1
        w1.close()
        w2.close()
    server.close()


pytestmark = [pytest.mark.timeout(30)]
