"""What a backend sends beyond its answer never reaches a client; what a client sends beyond its
request is bounded. Real sockets: a pipelining client, a scripted backend, the proxy between.

- A response followed by more bytes (in the same write, or later on the idle connection): the
  extra bytes are dropped, that connection is closed and counted
  (`edgelb_backend_unsolicited_total`), and every client response is the right one.
- HEAD and 304 answers that carry a body anyway: the same.
- Proxy-Authorization never reaches a backend; Proxy-Authenticate never reaches a client.
- An upgrade waiting for its 101 stops reading the client (flow control), then relays all.
- Request and response trailers are bounded like heads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

import pytest
from httpkit import (
    HOST,
    Call,
    Client,
    HttpBackend,
    eventually,
    free_port,
    running,
    service,
    snapshot,
    within,
)
from prometheus_client import generate_latest

from edgelb.http.client import BUFFER_LIMIT
from edgelb.ops.metrics import make_registry

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(30)]


def pipelined(*targets: str, method: str = "GET", extra: str = "") -> bytes:
    return b"".join(f"{method} {t} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n".encode()
                    for t in targets)


def answer(call: Call, body: bytes, extra: bytes = b"") -> None:
    call.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s%s" % (len(body), body, extra))


SMUGGLED = b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nsmuggled!"


def unsolicited(rt, name: str = "web") -> int:
    return sum(b.unsolicited for b in rt.services[name].pool.all_backends())


@pytest.mark.parametrize("junk", [SMUGGLED, b"smuggled!", b"HTTP/1.1 200 OK\r\ncontent-le"],
                         ids=["a-whole-response", "garbage", "half-a-head"])
async def test_bytes_after_a_response_never_answer_the_next_pipelined_request(junk: bytes):
    async def handler(call: Call) -> None:
        await call.read_body()
        target = call.req.target.encode()
        answer(call, b"for " + target, junk if target == b"/1" else b"")
        await call.drain()

    b = await HttpBackend("b", handler).start()
    port = free_port()
    async with running(snapshot(service("web", [b], listen=port))) as rt:
        c = await Client.open(port)
        await c.send(pipelined("/1", "/2", "/3", "/4"))
        bodies = [(await within(c.response())).body for _ in range(4)]
        assert bodies == [b"for /1", b"for /2", b"for /3", b"for /4"]
        c.close()
        assert unsolicited(rt) == 1  # the junk-sending connection was closed, and counted
        assert f'edgelb_backend_unsolicited_total{{backend="{HOST}:{b.port}",service="web"}} ' \
               f'1.0' in generate_latest(make_registry(rt, process=False)).decode()
    assert [r.target for r in b.requests] == ["/1", "/2", "/3", "/4"]
    assert b.connections == 2  # /1 on the first; /2 to /4 on a fresh one
    await b.stop()


@pytest.mark.parametrize("method,status", [("HEAD", 200), ("GET", 304)])
async def test_a_bodiless_answer_with_a_body_anyway_is_not_reused(method: str, status: int):
    async def handler(call: Call) -> None:
        await call.read_body()
        if call.req.target == "/first":
            call.write(b"HTTP/1.1 %d X\r\ncontent-length: 9\r\n\r\nsmuggled!" % status)
        else:
            answer(call, b"right")
        await call.drain()

    b = await HttpBackend("b", handler).start()
    port = free_port()
    async with running(snapshot(service("web", [b], listen=port))) as rt:
        c = await Client.open(port)
        await c.send(pipelined("/first", method=method) + pipelined("/second"))
        first = await within(c.response(method))
        second = await within(c.response())
        assert (first.status, first.body) == (status, b"")
        assert (second.status, second.body) == (200, b"right")
        c.close()
        await eventually(lambda: unsolicited(rt) == 1, what="the junk counted")


async def test_bytes_sent_later_on_an_idle_connection_close_it():
    sent_late = asyncio.Event()

    async def handler(call: Call) -> None:
        await call.read_body()
        answer(call, b"one")
        await call.drain()
        if call.req.target == "/1":
            await asyncio.sleep(0.05)  # the proxy has parked the connection by now
            call.write(SMUGGLED)
            await call.drain()
            sent_late.set()

    b = await HttpBackend("b", handler).start()
    port = free_port()
    async with running(snapshot(service("web", [b], listen=port))) as rt:
        c = await Client.open(port)
        assert (await within(c.request("GET", "/1"))).body == b"one"
        await within(sent_late.wait())
        await eventually(lambda: unsolicited(rt) == 1, what="the late bytes counted")
        r = await within(c.request("GET", "/2"))
        assert r.body == b"one"  # a fresh connection's answer, not the late bytes
        c.close()
    assert b.connections == 2
    await b.stop()


async def test_proxy_credentials_are_hop_by_hop():
    async def handler(call: Call) -> None:
        await call.read_body()
        call.write(b"HTTP/1.1 200 OK\r\nproxy-authenticate: Basic realm=inner\r\n"
                   b"www-authenticate: Basic realm=app\r\ncontent-length: 2\r\n\r\nok")
        await call.drain()

    b = await HttpBackend("b", handler).start()
    port = free_port()
    async with running(snapshot(service("web", [b], listen=port))):
        c = await Client.open(port)
        r = await within(c.request("GET", "/", [("Proxy-Authorization", "Basic c2VjcmV0"),
                                                ("Authorization", "Bearer app-token")]))
        c.close()
    assert r.status == 200 and r.body == b"ok"
    assert not r.has("proxy-authenticate")
    assert r.get("www-authenticate") == "Basic realm=app"
    req = b.requests[0]
    assert not req.has("proxy-authorization")
    assert req.get("authorization") == "Bearer app-token"
    await b.stop()


async def test_an_upgrade_waiting_for_its_101_stops_reading_the_client():
    go = asyncio.Event()
    asked = asyncio.Event()
    received = hashlib.sha256()
    total = 0

    async def handler(call: Call) -> None:
        nonlocal total
        asked.set()
        await go.wait()
        call.write(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
                   b"upgrade: raw\r\n\r\n")
        await call.drain()
        while True:
            data = await call.reader.read(65536)
            if not data:
                break
            received.update(data)
            total += len(data)

    b = await HttpBackend("b", handler).start()
    port = free_port()
    payload = bytes(range(256)) * (32 * 4096)  # 32 MiB: more than the kernel buffers hold
    async with running(snapshot(service("web", [b], listen=port))) as rt:
        c = await Client.open(port)
        await c.send(pipelined("/ws", extra="Connection: upgrade\r\nUpgrade: raw\r\n"))
        await within(asked.wait())
        c.writer.write(payload)
        # reading is paused: the client cannot get 32 MiB out while the 101 has not come
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c.writer.drain(), 1.0)
        (listener,) = rt.listeners.values()
        (client,) = listener.clients
        held = sum(map(len, client.upgrade_buffer or []))
        assert held <= BUFFER_LIMIT  # what came before the pause took effect, if anything
        go.set()
        assert (await within(c.read_head())).status == 101
        await within(c.writer.drain(), 10)
        await eventually(lambda: total == len(payload), timeout=10, what="all bytes relayed")
        assert received.digest() == hashlib.sha256(payload).digest()
        c.close()
    await b.stop()


async def test_request_trailers_are_bounded_like_a_head():
    b = await HttpBackend("b").start()
    port = free_port()
    async with running(snapshot(service("web", [b], listen=port))) as rt:
        head = f"POST /t HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n"
        many = "".join(f"x-t{i}: v\r\n" for i in range(150))  # over limits.headers (100)
        c = await Client.open(port)
        await c.send(f"{head}5\r\nhello\r\n0\r\n{many}\r\n".encode())
        r = await within(c.response())
        assert r.status == 431
        c.close()
        c = await Client.open(port)
        await c.send(f"{head}5\r\nhello\r\n0\r\nx-big: ".encode())
        filler = b"a" * 65536
        (listener,) = rt.listeners.values()
        with contextlib.suppress(ConnectionError):  # the proxy may reset it meanwhile
            for _ in range(64):  # 4 MiB of one trailer value: refused long before
                await c.send(filler)
        # refused (the 431 itself may be lost to the reset of a connection with unread data)
        await eventually(lambda: listener.local_responses.get(431) == 2, what="the 431")
        with contextlib.suppress(ConnectionError):
            assert b"200 OK" not in await within(c.at_eof())  # closed, never forwarded whole
        c.close()
        c = await Client.open(port)
        await c.send(f"{head}5\r\nhello\r\n0\r\nx-ok: 1\r\n\r\n".encode())
        assert (await within(c.response())).status == 200
        c.close()
    # the refused ones were streamed up to their trailers but never completed at the backend
    assert [r.trailers for r in b.requests if r.complete] == [[("x-ok", "1")]]
    await b.stop()


async def test_response_trailers_over_the_limits_cut_the_response():
    async def handler(call: Call) -> None:
        await call.read_body()
        await call.respond(200, b"body", framing="chunked",
                           trailers=[(f"x-t{i}", "v") for i in range(500)])

    b = await HttpBackend("b", handler).start()
    port = free_port()
    async with running(snapshot(service("web", [b], listen=port))):
        c = await Client.open(port)
        await c.send(pipelined("/", extra="TE: trailers\r\n"))
        head = await within(c.read_head())
        assert head.status == 200
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await within(c.read_body(head))  # cut: never a complete response
        c.close()
    await b.stop()
