"""The HTTP/1.1 data path over real loopback sockets: framing, streaming, headers, upgrades,
routing on an entrypoint and the errors the proxy answers itself.

Each test starts scriptable backends (tests/httpkit.py) and a Runtime in its own event loop,
talks to the proxy with a raw client and asserts on both ends: what the backend received and
what the client got.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
import tracemalloc

import aiohttp
import pytest
from aiohttp import web
from httpkit import (
    CHUNK,
    Blackhole,
    Call,
    Client,
    build_request,
    by_path,
    chunked,
    close_delimited,
    closed_port,
    continue_then,
    echo,
    eventually,
    fetch,
    free_port,
    hang,
    ok,
    raw,
    reset_after_request,
    service,
    slow,
    snapshot,
    upgrade_echo,
    within,
)

from watchers.model import Backend, Route

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(30)]



async def static(proxy, backends, **policy) -> int:
    """A static-port http service in front of `backends`; returns the port."""
    port = free_port()
    await proxy(snapshot(service("web", backends, listen=port, **policy)))
    return port


# -- keep-alive, pipelining, HTTP/1.0 ------------------------------------------------------


async def test_keep_alive_reuses_one_upstream_connection(backend, proxy):
    b = await backend("a")
    port = await static(proxy, [b])
    client = await Client.open(port)
    for i in range(10):
        r = await within(client.request("GET", f"/r{i}"))
        assert r.status == 200
        assert r.body == f"a GET /r{i}".encode()
        assert r.get("connection") is None  # 1.1: keep-alive is implied
    client.close()
    assert len(b.requests) == 10
    assert b.connections == 1, "every request should reuse the one kept-alive upstream connection"
    assert {r.conn for r in b.requests} == {1}
    for req in b.requests:
        assert req.version == "HTTP/1.1"


async def test_pipelined_requests_are_answered_in_order(backend, proxy):
    async def slow_first(call: Call) -> None:
        # the first request is the slowest: the proxy must still answer in request order
        delay = {"/1": 0.3, "/2": 0.1, "/3": 0.0}[call.req.target]
        await asyncio.sleep(delay)
        await call.respond(200, call.req.target.encode())

    b = await backend("a", slow_first)
    port = await static(proxy, [b])
    client = await Client.open(port)
    await client.send(b"".join(build_request("GET", f"/{i}") for i in (1, 2, 3)))
    bodies = [(await within(client.response())).body for _ in range(3)]
    assert bodies == [b"/1", b"/2", b"/3"]
    assert [r.target for r in b.requests] == ["/1", "/2", "/3"]
    # and the connection is still good afterwards
    r = await within(client.request("GET", "/3"))
    assert r.body == b"/3"
    client.close()


async def test_pipelined_requests_with_bodies(backend, proxy):
    b = await backend("a", echo())
    port = await static(proxy, [b])
    client = await Client.open(port)
    payloads = [b"first body", b"x" * 70000, b"third"]
    await client.send(b"".join(build_request("POST", f"/{i}", body=p) for i, p in
                               enumerate(payloads)))
    got = [await within(client.response("POST")) for _ in payloads]
    assert [r.status for r in got] == [200, 200, 200]
    assert [r.body for r in got] == payloads
    assert [r.body for r in b.requests] == payloads
    assert b.connections == 1
    client.close()


async def test_http10_client_without_keep_alive(backend, proxy):
    b = await backend("a")
    port = await static(proxy, [b])
    client = await Client.open(port)
    await client.send(build_request("GET", "/old", version="1.0"))
    head = await within(client.read_head())
    assert head.status == 200
    assert (head.get("connection") or "").lower() == "close"
    rest = await client.at_eof()
    assert rest == b"a GET /old"
    # the backend still got HTTP/1.1 with a Host
    assert b.requests[0].version == "HTTP/1.1"
    assert b.requests[0].get("host") == "test.local"


async def test_http10_client_without_host_gets_one_added(backend, proxy):
    b = await backend("a")
    port = await static(proxy, [b])
    client = await Client.open(port)
    await client.send(build_request("GET", "/", version="1.0", host=None))
    await client.at_eof()
    assert b.requests[0].get("host") == f"127.0.0.1:{port}"
    assert not b.requests[0].has("x-forwarded-host")


async def test_http10_client_with_keep_alive(backend, proxy):
    b = await backend("a")
    port = await static(proxy, [b])
    client = await Client.open(port)
    for i in range(3):
        r = await within(client.request("GET", f"/k{i}", [("Connection", "keep-alive")],
                                        version="1.0"))
        assert r.status == 200
        assert (r.get("connection") or "").lower() == "keep-alive"
        assert r.framing == "length"
        assert r.body == f"a GET /k{i}".encode()
    assert b.connections == 1
    assert all(not req.has("connection") for req in b.requests)
    client.close()


async def test_chunked_response_is_not_chunked_to_http10_client(backend, proxy):
    b = await backend("a", chunked([b"hello ", b"old ", b"world"], trailers=[("x-sum", "1")]))
    port = await static(proxy, [b])
    client = await Client.open(port)
    await client.send(build_request("GET", "/", [("Connection", "keep-alive")], version="1.0"))
    head = await within(client.read_head())
    assert head.status == 200
    assert head.get("transfer-encoding") is None
    assert (head.get("connection") or "").lower() == "close"
    assert await client.at_eof() == b"hello old world"


# -- bodies: streaming both ways, bounded memory, full duplex ---------------------------


BIG = 100 * 1024 * 1024
MEMORY_BOUND = 16 * 1024 * 1024  # well below the 100 MB that crosses the proxy


async def test_100mb_upload_streams_with_bounded_memory(backend, proxy):
    b = await backend("a")
    b.keep_bodies = False
    port = await static(proxy, [b])
    client = await Client.open(port)
    block = bytes(range(256)) * (CHUNK // 256)
    digest = hashlib.sha256()
    await client.send(build_request("POST", "/upload", [("Content-Length", str(BIG))]))
    tracemalloc.start()
    try:
        sent = 0
        while sent < BIG:
            client.writer.write(block)
            digest.update(block)
            sent += len(block)
            await client.writer.drain()
        r = await within(client.response("POST"), 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status == 200
    req = b.requests[0]
    assert req.body_size == BIG
    assert req.body_sha256 == digest.hexdigest()
    assert peak < MEMORY_BOUND, f"the proxy held {peak / 1e6:.1f} MB while streaming 100 MB"
    client.close()


async def test_100mb_download_streams_with_bounded_memory(backend, proxy):
    block = bytes(range(256)) * (CHUNK // 256)

    async def big(call: Call) -> None:
        await call.read_body()
        call.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BIG)
        sent = 0
        while sent < BIG:
            call.write(block)
            sent += len(block)
            await call.drain()

    b = await backend("a", big)
    port = await static(proxy, [b])
    client = await Client.open(port)
    expected = hashlib.sha256()
    for _ in range(BIG // len(block)):
        expected.update(block)
    await client.send(build_request("GET", "/download"))
    tracemalloc.start()
    try:
        r = await within(client.response(keep=False), 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status == 200
    assert r.framing == "length"
    assert r.body_size == BIG
    assert r.body_sha256 == expected.hexdigest()
    assert peak < MEMORY_BOUND, f"the proxy held {peak / 1e6:.1f} MB while streaming 100 MB"
    assert b.connections == 1
    client.close()


async def read_chunked_bytes(reader: asyncio.StreamReader, n: int) -> bytes:
    """Read chunks of a chunked body until `n` bytes of data arrived."""
    out = b""
    while len(out) < n:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        assert size > 0, "the body ended early"
        out += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"
    return out


async def test_full_duplex_response_streams_before_request_ends(backend, proxy):
    """The backend answers at once and echoes each piece as it arrives; the client sends the
    next piece only after it has received the echo of the previous one."""

    async def duplex(call: Call) -> None:
        call.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await call.drain()

        def back(piece: bytes) -> None:
            call.write(b"%x\r\n%s\r\n" % (len(piece), piece))

        await call.read_body(sink=back)
        call.write(b"0\r\n\r\n")
        await call.drain()

    b = await backend("a", duplex)
    port = await static(proxy, [b])
    client = await Client.open(port)
    pieces = [bytes([65 + i]) * 5000 for i in range(4)]
    total = sum(map(len, pieces))
    await client.send(build_request("PUT", "/duplex", [("Content-Length", str(total))]))
    await client.send(pieces[0])
    head = await within(client.read_head())
    assert head.status == 200
    for i, piece in enumerate(pieces):
        got = await within(read_chunked_bytes(client.reader, len(piece)))
        assert got == piece, f"echo of piece {i}"
        if i + 1 < len(pieces):
            await client.send(pieces[i + 1])
    assert await within(client.reader.readuntil(b"\r\n\r\n")) == b"0\r\n\r\n"
    assert b.requests[0].body == b"".join(pieces)
    # the exchange completed cleanly: the connection serves the next request
    b.handler = ok()
    r = await within(client.request("GET", "/after"))
    assert r.body == b"a GET /after"
    client.close()


async def test_chunked_request_body_with_trailers(backend, proxy):
    b = await backend("a", echo())
    port = await static(proxy, [b])
    client = await Client.open(port)
    head = build_request("POST", "/up", [("Transfer-Encoding", "chunked"), ("TE", "trailers")])
    await client.send(head + b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-check: 42\r\n\r\n")
    r = await within(client.response("POST"))
    assert r.status == 200
    assert r.body == b"hello world"
    req = b.requests[0]
    assert req.chunked
    assert req.all("transfer-encoding") == ["chunked"]
    assert req.trailers == [("x-check", "42")]
    client.close()


# -- response framing ------------------------------------------------------------------


async def test_content_length_response_passes_through(backend, proxy):
    b = await backend("a", ok(b"exactly this"))
    port = await static(proxy, [b])
    r = await within(fetch(port))
    assert r.framing == "length"
    assert r.get("content-length") == "12"
    assert r.body == b"exactly this"


async def test_chunked_trailers_only_for_clients_that_accept_them(backend, proxy):
    b = await backend("a", chunked([b"part1,", b"part2"], trailers=[("x-digest", "abc")]))
    port = await static(proxy, [b])
    client = await Client.open(port)
    with_te = await within(client.request("GET", "/", [("TE", "trailers")]))
    without = await within(client.request("GET", "/"))
    client.close()
    assert with_te.framing == without.framing == "chunked"
    assert with_te.body == without.body == b"part1,part2"
    assert with_te.trailers == [("x-digest", "abc")]
    assert with_te.get("trailer") == "x-digest"
    assert without.trailers == []
    assert without.get("trailer") is None
    assert b.requests[0].get("te") == "trailers"
    assert not b.requests[1].has("te")
    assert b.connections == 1


async def test_close_delimited_response_is_rechunked_for_http11(backend, proxy):
    b = await backend("a", close_delimited(b"until the end " * 1000))
    port = await static(proxy, [b])
    client = await Client.open(port)
    r = await within(client.request("GET", "/"))
    assert r.status == 200
    assert r.framing == "chunked"
    assert r.body == b"until the end " * 1000
    # the client connection survives the upstream's close
    r2 = await within(client.request("GET", "/"))
    assert r2.body == r.body
    assert b.connections == 2
    client.close()


async def test_expect_100_continue(backend, proxy):
    b = await backend("a", continue_then())
    port = await static(proxy, [b])
    client = await Client.open(port)
    body = b"z" * 1000
    await client.send(build_request("POST", "/c", [("Expect", "100-continue"),
                                                  ("Content-Length", str(len(body)))]))
    interim = await within(client.read_head())
    assert interim.status == 100
    await client.send(body)
    r = await within(client.response("POST"))
    assert r.status == 200
    assert r.body == b"continued 1000"
    assert b.requests[0].get("expect") == "100-continue"
    client.close()


def bodiless(status: int) -> object:
    async def handler(call: Call) -> None:
        await call.read_body()
        if call.req.method == "HEAD" or status != 200:
            extra = b"etag: \"v1\"\r\n" if status == 304 else b""
            length = b"content-length: 5\r\n" if status != 204 else b""
            call.write(b"HTTP/1.1 %d X\r\n%s%s\r\n" % (status, length, extra))
        else:
            call.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
        await call.drain()

    return handler


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
async def test_bodiless_responses_keep_the_upstream_usable(backend, proxy, method, status):
    b = await backend("a")
    b.handler = by_path({"/empty": bodiless(status)}, bodiless(200))  # type: ignore[arg-type]
    port = await static(proxy, [b])
    client = await Client.open(port)
    r = await within(client.request(method, "/empty"))
    assert r.status == status
    if status != 204:
        assert r.get("content-length") == "5"
    assert r.get("transfer-encoding") is None
    # nothing after the head: the next response on this connection must parse cleanly
    r2 = await within(client.request("GET", "/next"))
    assert r2.status == 200
    assert r2.body == b"hello"
    assert b.connections == 1, "the upstream connection should be reused after a bodiless answer"
    client.close()


# -- headers ---------------------------------------------------------------------------


async def test_request_hop_by_hop_headers_are_removed(backend, proxy):
    b = await backend("a")
    port = await static(proxy, [b])
    client = await Client.open(port)
    r = await within(client.request("GET", "/h", [
        ("Connection", "keep-alive, X-Hop-Named"),
        ("X-Hop-Named", "secret"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "gzip"),
        ("Upgrade", "h2c"),  # without `Connection: upgrade` this is no upgrade
        ("X-End-To-End", "kept"),
    ], host="Example.COM:8080"))
    assert r.status == 200
    req = b.requests[0]
    for name in ("connection", "x-hop-named", "keep-alive", "proxy-connection", "te", "upgrade",
                 "transfer-encoding"):
        assert not req.has(name), f"{name} reached the backend"
    assert req.get("x-end-to-end") == "kept"
    assert req.all("host") == ["Example.COM:8080"]
    client.close()


async def test_response_hop_by_hop_headers_are_removed(backend, proxy):
    resp = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Resp-Named\r\nX-Resp-Named: 1\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nTE: x\r\n"
        b"X-End: yes\r\nContent-Length: 2\r\n\r\nok"
    )
    b = await backend("a", raw(resp))
    port = await static(proxy, [b])
    client = await Client.open(port)
    r = await within(client.request("GET", "/"))
    assert r.status == 200
    assert r.body == b"ok"
    for name in ("x-resp-named", "keep-alive", "proxy-connection", "upgrade", "te"):
        assert not r.has(name), f"{name} reached the client"
    assert r.get("connection") is None
    assert r.get("x-end") == "yes"
    client.close()


async def test_forwarding_headers(backend, proxy):
    b = await backend("a")
    port = await static(proxy, [b])
    client = await Client.open(port)
    await within(client.request("GET", "/", [
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Proto", "https"),  # set by the proxy, never trusted from the client
        ("X-Forwarded-Host", "spoofed.example"),
        ("Forwarded", "for=203.0.113.9"),
        ("Via", "1.0 upstream-cache"),
    ], host="web.example.com"))
    await within(client.request("GET", "/"))
    await within(client.request("GET", "/", host="other.example.com"))
    await within(client.request("GET", "/", host=None, version="1.0",
                                headers=[("Connection", "keep-alive")]))
    client.close()
    first, second, third, fourth = b.requests
    assert first.all("x-forwarded-for") == ["203.0.113.9, 127.0.0.1"]
    assert first.all("x-forwarded-proto") == ["http"]
    assert first.all("x-forwarded-host") == ["web.example.com"]
    assert first.all("forwarded") == [
        'for=203.0.113.9, for=127.0.0.1;proto=http;host="web.example.com"'
    ]
    assert first.all("via") == ["1.0 upstream-cache, 1.1 edgelb"]
    assert first.all("host") == ["web.example.com"]
    assert second.all("x-forwarded-for") == ["127.0.0.1"]
    assert second.all("forwarded") == ['for=127.0.0.1;proto=http;host="test.local"']
    assert second.all("via") == ["1.1 edgelb"]
    assert third.all("x-forwarded-host") == ["other.example.com"]
    assert third.all("forwarded") == ['for=127.0.0.1;proto=http;host="other.example.com"']
    assert not fourth.has("x-forwarded-host")
    assert fourth.all("forwarded") == ["for=127.0.0.1;proto=http"]
    assert fourth.all("host") == [f"127.0.0.1:{port}"]


# -- WebSocket and other upgrades ------------------------------------------------------


async def test_websocket_echo_through_the_proxy(proxy):
    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    ws_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        port = await static(proxy, [ws_port])
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(
                f"http://127.0.0.1:{port}/ws", timeout=aiohttp.ClientWSTimeout(ws_close=5)
            ) as ws:
                for i in range(20):
                    await ws.send_str(f"m{i}")
                    msg = await within(ws.receive())
                    assert msg.data == f"echo:m{i}"
                blob = bytes(range(256)) * 400
                await ws.send_bytes(blob)
                msg = await within(ws.receive())
                assert msg.data == blob[::-1]
            # plain requests still work after a tunnel ended
            async with session.get(f"http://127.0.0.1:{port}/ws") as resp:
                assert resp.status == 400  # aiohttp refuses a plain GET on a WebSocket route
    finally:
        await runner.cleanup()


async def test_raw_upgrade_tunnels_bytes_exactly(backend, proxy):
    b = await backend("a", upgrade_echo("x-echo"))
    port = await static(proxy, [b])
    client = await Client.open(port)
    early = b"GET / HTTP/1.1\r\n\r\n\x00\xff early bytes"  # sent with the head, looks like HTTP
    await client.send(build_request("GET", "/tunnel", [("Connection", "Upgrade"),
                                                        ("Upgrade", "x-echo")]) + early)
    head = await within(client.read_head())
    assert head.status == 101
    assert (head.get("upgrade") or "").lower() == "x-echo"
    assert "upgrade" in (head.get("connection") or "").lower()
    assert await within(client.reader.readexactly(len(early))) == early
    for size in (1, 1000, 300000):
        data = bytes((i * 7) % 256 for i in range(size))
        await client.send(data)
        assert await within(client.reader.readexactly(size)) == data
    req = b.requests[0]
    assert req.get("upgrade") == "x-echo"
    assert (req.get("connection") or "").lower() == "upgrade"
    client.writer.write_eof()
    assert await client.at_eof() == b""


async def test_a_silent_tunnel_closes_after_tunnel_timeout(backend, proxy):
    """Bytes either way keep an upgraded connection open; silence for tunnel_timeout closes
    it (HAProxy's `timeout tunnel`), counted as reason tunnel_idle."""
    b = await backend("a", upgrade_echo("x-echo"))
    port = free_port()
    rt = await proxy(snapshot(service("web", [b], listen=port, tunnel_timeout=0.6)))
    client = await Client.open(port)
    await client.send(build_request("GET", "/t", [("Connection", "Upgrade"),
                                                   ("Upgrade", "x-echo")]))
    assert (await within(client.read_head())).status == 101
    # traffic for three times the timeout: the tunnel stays up
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        await client.send(b"ping")
        assert await within(client.reader.readexactly(4)) == b"ping"
        last = loop.time()  # the last byte either way
        if last - start >= 1.8:
            break
        await asyncio.sleep(0.15)
    listener = rt.listeners[f"127.0.0.1:{port}"]
    assert listener.refused.get("tunnel_idle", 0) == 0
    # then silence: closed once the timeout has passed, within a sweep (0.25 s) or two
    assert await within(client.at_eof(), 3) == b""
    waited = loop.time() - last
    assert 0.55 <= waited <= 0.6 + 0.6, waited
    assert listener.refused["tunnel_idle"] == 1


# -- routing on an entrypoint ----------------------------------------------------------


async def test_entrypoint_routing(backend, proxy):
    names = ["exact", "wild", "api", "apiv2", "any", "exact_root"]
    bs = {n: await backend(n) for n in names}
    routes = [
        Route("www.example.com", "/", "exact_root"),
        Route("www.example.com", "/shop", "exact"),
        Route("*.example.com", "/", "wild"),
        Route("", "/api", "api"),
        Route("", "/api/v2", "apiv2"),
        Route("", "/static", "any"),
    ]
    ep = free_port()
    await proxy(snapshot(*(service(n, [b]) for n, b in bs.items()), routes=routes),
                entrypoints=[("http", ep)])
    cases = [
        ("www.example.com", "/shop", "exact"),
        ("www.example.com:8080", "/shop/cart?x=1", "exact"),
        ("WWW.Example.com", "/shopping", "exact_root"),  # element-wise: /shop != /shopping
        ("www.example.com", "/", "exact_root"),
        ("a.example.com", "/anything", "wild"),
        ("a.b.example.com", "/api/x", "api"),  # the wildcard covers one label only
        ("example.com", "/api", "api"),
        ("other.org", "/api/v2/users", "apiv2"),  # longest prefix wins
        ("other.org", "/api/v20", "api"),
        ("other.org", "/static/app.js", "any"),
        ("other.org", "/apix", None),
        ("other.org", "/", None),
    ]
    client = await Client.open(ep)
    for host, path, want in cases:
        r = await within(client.request("GET", path, host=host))
        if want is None:
            assert r.status == 404, (host, path)
            assert b"no route" in r.body
        else:
            assert r.status == 200, (host, path, r.body)
            assert r.get("x-backend") == want, (host, path)
    client.close()
    assert sum(len(b.requests) for b in bs.values()) == sum(1 for c in cases if c[2])


# -- errors the proxy answers itself --------------------------------------------------


def logged(caplog, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def test_502_when_backend_resets_after_reading_the_request(backend, proxy, caplog):
    b = await backend("a", reset_after_request())
    port = await static(proxy, [b])
    client = await Client.open(port)
    r = await within(client.request("POST", "/p", body=b"data"))
    assert r.status == 502
    assert r.body == b"502 Bad Gateway: the backend failed before answering\n"
    # the client never learns the backend's address; the log names it and what went wrong
    assert logged(caplog, f"backend 127.0.0.1:{b.port} closed the connection before answering")
    assert len(b.requests) == 1  # a request whose body was sent is not retried
    # a GET would be retried on another backend; this is the only one: 502
    r = await within(client.request("GET", "/g"))
    assert r.status == 502
    assert [q.target for q in b.requests] == ["/p", "/g"]
    client.close()


async def test_502_on_malformed_response(backend, proxy, caplog):
    b = await backend("a", raw(b"HTTP/1.1 2x0 Nope\r\nbroken\r\n\r\n", close=True))
    port = await static(proxy, [b])
    r = await within(fetch(port))
    assert r.status == 502
    assert str(b.port).encode() not in r.body
    assert logged(caplog, "malformed response")


async def test_503_when_the_pool_is_empty(proxy):
    port = await static(proxy, [])
    client = await Client.open(port)
    r = await within(client.request("GET", "/"))
    assert r.status == 503
    assert b"no backend available for service web" in r.body
    r = await within(client.request("GET", "/"))  # the connection stays usable
    assert r.status == 503
    client.close()


async def test_504_on_response_timeout(backend, proxy, caplog):
    b = await backend("a", hang())
    port = await static(proxy, [b], response_timeout=0.4)
    start = time.monotonic()
    r = await within(fetch(port))
    elapsed = time.monotonic() - start
    assert r.status == 504
    assert r.body == b"504 Gateway Timeout: the backend did not answer in time\n"
    assert logged(caplog, f"backend 127.0.0.1:{b.port} did not answer in 0.4s")
    assert 0.3 < elapsed < 2.0
    await b.wait(lambda: b.open == 0)  # the proxy gave up the upstream connection


async def test_404_when_no_route_matches(backend, proxy):
    b = await backend("a")
    ep = free_port()
    await proxy(snapshot(service("web", [b]), routes=[Route("web.example.com", "/", "web")]),
                entrypoints=[("http", ep)])
    r = await within(fetch(ep, host="other.example.com"))
    assert r.status == 404
    assert b"no route for this host and path" in r.body
    assert b.requests == []


async def test_connect_refused_is_retried_on_another_backend(backend, proxy):
    b = await backend("a")
    dead = closed_port()
    port = free_port()
    await proxy(snapshot(service("web", [dead, b], listen=port, balance="round-robin")))
    client = await Client.open(port)
    for i in range(6):
        r = await within(client.request("POST", f"/{i}", body=b"payload"))
        assert r.status == 200, r.body
    client.close()
    assert [q.body for q in b.requests] == [b"payload"] * 6


async def test_connect_refused_everywhere_is_502(proxy, caplog):
    port = await static(proxy, [closed_port(), closed_port()])
    r = await within(fetch(port))
    assert r.status == 502
    assert logged(caplog, "refused the connection")


async def test_idle_upstream_closed_by_backend_is_replaced(backend, proxy):
    """The backend closes its kept-alive connection while idle: the next request opens a
    new one without the client noticing."""

    async def answer_then_close_soon(call: Call) -> None:
        await call.respond(200, b"ok")
        await asyncio.sleep(0.05)
        call.close()

    b = await backend("a", answer_then_close_soon)
    port = free_port()
    rt = await proxy(snapshot(service("web", [b], listen=port)))
    state = rt.services["web"].pool.backends[0]
    client = await Client.open(port)
    assert (await within(client.request("GET", "/1"))).status == 200
    await eventually(lambda: state.open_connections == 0 and not state.idle,
                     what="the proxy noticed the backend's close")
    assert (await within(client.request("GET", "/2"))).status == 200
    assert b.connections == 2
    assert state.failures == 0  # noticed while idle: no failed attempt
    client.close()


async def test_stale_kept_alive_connection_is_retried(backend, proxy):
    """A request that races the backend's idle close (read, then closed unanswered) on a reused
    connection is sent again on a fresh one."""
    seen: list[int] = []

    async def close_second_on_first_conn(call: Call) -> None:
        seen.append(call.req.conn)
        if call.req.conn == 1 and len(seen) == 2:
            await call.read_body()
            call.close()
            return
        await call.respond(200, b"fresh" if call.req.conn > 1 else b"first")

    b = await backend("a", close_second_on_first_conn)
    port = await static(proxy, [b])
    client = await Client.open(port)
    assert (await within(client.request("GET", "/1"))).body == b"first"
    r = await within(client.request("POST", "/2"))  # no body: safe to resend
    assert r.status == 200
    assert r.body == b"fresh"
    assert seen == [1, 1, 2]
    client.close()


async def test_header_timeout_answers_408_and_closes(backend, proxy):
    b = await backend("a")
    port = await static(proxy, [b], header_timeout=0.3)
    client = await Client.open(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: slow\r\n")  # the head never ends
    start = time.monotonic()
    rest = await client.at_eof(3)
    assert rest.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert time.monotonic() - start < 1.5
    assert b.requests == []
    silent = await Client.open(port)  # connects and sends nothing
    assert await silent.at_eof(3) == b""


async def test_idle_keep_alive_timeout_closes_the_client(backend, proxy):
    b = await backend("a")
    port = await static(proxy, [b], idle_timeout=0.3)
    client = await Client.open(port)
    assert (await within(client.request("GET", "/"))).status == 200
    start = time.monotonic()
    assert await client.at_eof(3) == b""
    assert time.monotonic() - start < 1.5
    await b.wait(lambda: b.open == 0)  # the idle upstream connection is closed too


async def test_malformed_request_is_400(backend, proxy):
    b = await backend("a")
    port = await static(proxy, [b])
    client = await Client.open(port)
    await client.send(b"GARBAGE\x00 / HTTP/1.1\r\n\r\n")
    rest = await client.at_eof()
    assert rest.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b.requests == []


async def test_client_gone_mid_response_releases_the_backend(backend, proxy):
    b = await backend("a", hang())
    port = free_port()
    rt = await proxy(snapshot(service("web", [b], listen=port)))
    client = await Client.open(port)
    await client.send(build_request("GET", "/"))
    await b.wait_requests(1)
    state = rt.services["web"].pool.backends[0]
    assert state.inflight == 1
    client.close()
    await b.wait(lambda: b.open == 0)
    assert state.inflight == 0


# -- regressions -----------------------------------------------------------------------


async def test_local_answer_keeps_the_connection_and_drops_the_body(backend, proxy):
    b = await backend("a")
    ep = free_port()
    await proxy(snapshot(service("web", [b]), routes=[Route("web.example.com", "/", "web")]),
                entrypoints=[("http", ep)])
    client = await Client.open(ep)
    r = await within(client.request("POST", "/", body=b"x" * 300000, host="nowhere.example"))
    assert r.status == 404
    assert (r.get("connection") or "") == "keep-alive"
    r = await within(client.request("GET", "/", host="web.example.com"))
    assert r.status == 200
    assert [q.method for q in b.requests] == ["GET"]
    client.close()


async def test_head_answered_by_the_proxy_has_no_body(backend, proxy):
    b = await backend("a")
    ep = free_port()
    await proxy(snapshot(service("web", [b]), routes=[Route("web.example.com", "/", "web")]),
                entrypoints=[("http", ep)])
    client = await Client.open(ep)
    r = await within(client.request("HEAD", "/", host="nowhere.example"))
    assert r.status == 404
    assert int(r.get("content-length") or 0) > 0
    # had the proxy sent a body after the HEAD answer, this would read it as a response
    r = await within(client.request("GET", "/", host="web.example.com"))
    assert r.status == 200
    assert r.body == b"a GET /"
    client.close()


async def test_pipelined_body_behind_a_slow_request_then_local_answer(backend, proxy):
    b = await backend("a", slow(0.2, b"slow"))
    ep = free_port()
    routes = [Route("", "/slow", "web"), Route("", "/empty", "empty")]
    await proxy(snapshot(service("web", [b]), service("empty", []), routes=routes),
                entrypoints=[("http", ep)])
    client = await Client.open(ep)
    await client.send(build_request("GET", "/slow")
                      + build_request("POST", "/empty", body=b"y" * 600000)
                      + build_request("GET", "/slow"))
    first = await within(client.response())
    second = await within(client.response("POST"))
    third = await within(client.response())
    assert (first.status, second.status, third.status) == (200, 503, 200)
    assert third.body == b"slow"
    client.close()


async def test_client_closing_connection_close_keeps_the_upstream(backend, proxy):
    b = await backend("a")
    port = await static(proxy, [b])
    for _ in range(3):
        client = await Client.open(port)
        r = await within(client.request("GET", "/", [("Connection", "close")]))
        assert r.status == 200
        assert (r.get("connection") or "").lower() == "close"
        assert await client.at_eof() == b""
    assert all(not q.has("connection") for q in b.requests)
    assert b.connections == 1


async def test_slow_upload_is_not_cut_by_the_response_timeout(backend, proxy):
    """response_timeout runs from the end of the request; a steady upload that takes longer
    is fine, and each piece restarts the idle timeout."""
    b = await backend("a", echo())
    port = await static(proxy, [b], response_timeout=0.3, idle_timeout=2.0)
    client = await Client.open(port)
    pieces = [b"%02d" % i * 100 for i in range(8)]
    await client.send(build_request("POST", "/", [("Content-Length", str(sum(map(len,
                                                                                 pieces))))]))
    for p in pieces:
        await client.send(p)
        await asyncio.sleep(0.1)
    r = await within(client.response("POST"))
    assert r.status == 200
    assert r.body == b"".join(pieces)
    client.close()


async def test_stalled_upload_times_out(backend, proxy):
    b = await backend("a", echo())
    port = await static(proxy, [b], response_timeout=5.0, idle_timeout=0.3)
    client = await Client.open(port)
    await client.send(build_request("POST", "/", [("Content-Length", "1000")]) + b"x" * 10)
    r = await within(client.response("POST"))
    assert r.status == 504
    assert await client.at_eof() == b""
    await b.wait(lambda: b.open == 0)


async def test_client_gone_while_connecting_releases_once(proxy):
    hole = Blackhole()
    try:
        port = free_port()
        rt = await proxy(snapshot(service("web", [hole.port], listen=port,
                                          connect_timeout=0.3)))
        state = rt.services["web"].pool.backends[0]
        client = await Client.open(port)
        await client.send(build_request("GET", "/"))
        await eventually(lambda: state.inflight == 1, what="the request reached the proxy")
        client.close()
        await eventually(lambda: state.failures == 1, what="the connect attempt timed out")
        await asyncio.sleep(0.05)
        assert state.inflight == 0
    finally:
        hole.close()


async def test_conflicting_framing_is_rejected(backend, proxy):
    b = await backend("a")
    port = await static(proxy, [b])
    client = await Client.open(port)
    await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    rest = await client.at_eof()
    assert rest.startswith(b"HTTP/1.1 400 ")
    assert b.requests == []


# -- flow control, interim responses, upstream connection handling ----------------------


async def test_slow_reader_pauses_the_backend(backend, proxy):
    """A client that stops reading: the proxy stops reading the backend instead of buffering."""
    size = 40 * 1024 * 1024
    block = b"r" * CHUNK
    sent = 0

    async def big(call: Call) -> None:
        nonlocal sent
        await call.read_body()
        call.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        while sent < size:
            call.write(block)
            sent += len(block)
            await call.drain()

    b = await backend("a", big)
    port = await static(proxy, [b])
    client = await Client.open(port)
    await client.send(build_request("GET", "/"))
    tracemalloc.start()
    try:
        await asyncio.sleep(0.5)  # not reading; the backend writes until everything is full
        stalled_at = sent
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stalled_at < size, "the backend could write everything: nothing pushed back"
    assert peak < MEMORY_BOUND, f"the proxy buffered {peak / 1e6:.1f} MB for a stalled client"
    r = await within(client.response(keep=False), 20)
    assert r.body_size == size
    client.close()


async def test_slow_backend_pauses_the_client(backend, proxy):
    size = 40 * 1024 * 1024
    go = asyncio.Event()

    async def late_reader(call: Call) -> None:
        await go.wait()
        await call.read_body()
        await call.respond(200, b"%d" % call.req.body_size)

    b = await backend("a", late_reader)
    b.keep_bodies = False
    port = await static(proxy, [b])
    client = await Client.open(port)
    client.writer.write(build_request("POST", "/", [("Content-Length", str(size))]))
    block = b"w" * CHUNK
    written = 0

    async def upload() -> None:
        nonlocal written
        while written < size:
            client.writer.write(block)
            written += len(block)
            await client.writer.drain()

    task = asyncio.get_running_loop().create_task(upload())
    tracemalloc.start()
    try:
        await asyncio.sleep(0.5)
        stalled_at = written
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stalled_at < size, "the client could send everything: nothing pushed back"
    assert peak < MEMORY_BOUND, f"the proxy buffered {peak / 1e6:.1f} MB for a stalled backend"
    go.set()
    await within(task, 20)
    r = await within(client.response("POST"), 20)
    assert r.body == b"%d" % size
    client.close()


async def test_backend_closing_after_each_response_under_pipelining(backend, proxy):
    async def one_shot(call: Call) -> None:
        await call.respond(200, call.req.target.encode(), [("Connection", "close")])
        call.close()

    b = await backend("a", one_shot)
    port = await static(proxy, [b])
    client = await Client.open(port)
    await client.send(b"".join(build_request("GET", f"/{i}") for i in range(3)))
    got = [await within(client.response()) for _ in range(3)]
    assert [r.body for r in got] == [b"/0", b"/1", b"/2"]
    assert all(r.get("connection") is None for r in got)  # the client keeps its connection
    assert b.connections == 3
    r = await within(client.request("GET", "/again"))
    assert r.body == b"/again"
    client.close()


async def test_http10_backend_response(backend, proxy):
    b = await backend("a", raw(b"HTTP/1.0 200 OK\r\nX-Old: 1\r\n\r\nold style body", close=True))
    port = await static(proxy, [b])
    client = await Client.open(port)
    r = await within(client.request("GET", "/"))
    assert r.status == 200
    assert r.framing == "chunked"
    assert r.body == b"old style body"
    assert r.get("x-old") == "1"
    client.close()


async def test_early_hints_are_forwarded_to_http11_only(backend, proxy):
    b = await backend("a", raw(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                              b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"))
    port = await static(proxy, [b])
    client = await Client.open(port)
    await client.send(build_request("GET", "/"))
    hint = await within(client.response(interim=True))
    assert hint.status == 103
    assert hint.get("link") == "</a.css>; rel=preload"
    final = await within(client.response())
    assert final.status == 200 and final.body == b"body"
    client.close()
    old = await Client.open(port)
    await old.send(build_request("GET", "/", version="1.0"))
    assert (await old.at_eof()).startswith(b"HTTP/1.1 200 OK\r\n")


async def test_idle_upstream_connections_are_capped(backend, proxy):
    b = await backend("a", slow(0.1))
    port = await static(proxy, [b], max_idle=1)
    await asyncio.gather(*(within(fetch(port)) for _ in range(4)))
    assert b.connections == 4
    await b.wait(lambda: b.open <= 1)
    await asyncio.sleep(0.05)
    assert b.open == 1


async def test_local_answer_to_expect_continue_does_not_wait_forever(proxy):
    port = await static(proxy, [], idle_timeout=0.3)
    client = await Client.open(port)
    await client.send(build_request("POST", "/", [("Expect", "100-continue"),
                                                 ("Content-Length", "100")]))
    r = await within(client.response("POST"))
    assert r.status == 503
    # the body never comes: the connection is closed after the idle timeout, with no more output
    assert await client.at_eof(3) == b""


async def test_upgrade_declined_by_the_backend(backend, proxy):
    b = await backend("a", ok(b"no upgrade here"))
    port = await static(proxy, [b])
    client = await Client.open(port)
    await client.send(build_request("GET", "/", [("Connection", "upgrade"),
                                                 ("Upgrade", "websocket")]))
    r = await within(client.response())
    assert r.status == 200
    assert r.body == b"no upgrade here"
    assert await client.at_eof() == b""


async def test_unrequested_switch_is_502(backend, proxy):
    b = await backend("a", upgrade_echo())
    port = await static(proxy, [b])
    r = await within(fetch(port))
    assert r.status == 502


async def test_header_timeout_is_not_extended_by_a_trickling_head(backend, proxy):
    b = await backend("a")
    port = await static(proxy, [b], header_timeout=0.4)
    client = await Client.open(port)
    head = build_request("GET", "/", [("X-Pad", "p" * 40)])
    start = time.monotonic()

    async def trickle() -> None:
        for i in range(len(head) - 4):  # never the end of the head
            client.writer.write(head[i : i + 1])
            await asyncio.sleep(0.05)

    task = asyncio.get_running_loop().create_task(trickle())
    try:
        rest = await client.at_eof(3)
    finally:
        task.cancel()
    assert rest.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - start < 1.5
    assert b.requests == []


async def test_pipelined_mix_of_local_answers_and_proxied_requests(backend, proxy):
    b = await backend("a")
    ep = free_port()
    await proxy(snapshot(service("web", [b]), routes=[Route("web.example.com", "/", "web")]),
                entrypoints=[("http", ep)])
    client = await Client.open(ep)
    hosts = ["nowhere.example", "web.example.com", "nowhere.example", "web.example.com"]
    await client.send(b"".join(build_request("GET", f"/{i}", host=h)
                               for i, h in enumerate(hosts)))
    got = [await within(client.response()) for _ in hosts]
    assert [r.status for r in got] == [404, 200, 404, 200]
    assert [r.body for r in got if r.status == 200] == [b"a GET /1", b"a GET /3"]
    client.close()


async def test_oversized_request_head_is_refused(backend, proxy):
    """A head that keeps growing is cut off (431) instead of being held in memory."""
    b = await backend("a")
    port = free_port()
    rt = await proxy(snapshot(service("web", [b], listen=port)))
    client = await Client.open(port)
    client.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent = 0
    tracemalloc.start()
    try:
        while sent < 20 * 1024 * 1024:
            client.writer.write(b"a" * CHUNK)
            sent += CHUNK
            await within(client.writer.drain())
    except ConnectionError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert sent < 4 * 1024 * 1024, "the proxy kept reading an endless request head"
    assert peak < 8 * 1024 * 1024
    rest = await client.at_eof()
    # the answer may be lost to the reset of a connection closed with unread data
    assert rest == b"" or rest.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert rt.local_responses == {431: 1}
    assert b.requests == []
    # a large but reasonable head still passes
    client = await Client.open(port)
    r = await within(client.request("GET", "/", [("X-Cookie", "c" * 30000)]))
    assert r.status == 200
    assert b.requests[0].get("x-cookie") == "c" * 30000
    client.close()


async def test_502_when_a_response_head_grows_past_the_limit(backend, proxy, caplog):
    """A backend that streams header lines without end gets cut off; the client sees 502."""

    async def endless_head(call) -> None:
        await call.read_body()
        call.write(b"HTTP/1.1 200 OK\r\n")
        line = b"x-filler: " + b"a" * 100 + b"\r\n"
        for _ in range(4000):  # ~450 KiB, in pieces, never the blank line
            call.write(line * 10)
            await call.drain()
            if call.reader.at_eof():
                break
        await call.reader.read()
        call.close()

    b = await backend("a", endless_head)
    port = await static(proxy, [b])
    r = await within(fetch(port))
    assert r.status == 502
    assert logged(caplog, "response head over 64 KiB")


async def test_504_on_a_kept_alive_upstream_connection(backend, proxy):
    """The response timeout holds when the request goes out on a reused connection too."""

    async def first_fast_then_hang(call) -> None:
        if call.req.target == "/fast":
            await call.respond(200, b"fast")
            return
        await call.read_body()
        await call.reader.read()
        call.close()

    b = await backend("a", first_fast_then_hang)
    port = await static(proxy, [b], response_timeout=0.4)
    client = await Client.open(port)
    r = await within(client.request("GET", "/fast"))
    assert r.status == 200
    start = time.monotonic()
    r = await within(client.request("GET", "/hang"))
    assert r.status == 504
    assert time.monotonic() - start < 2.0
    assert b.connections == 1  # the second request went out on the kept-alive connection
    client.close()


async def test_absolute_form_target_routes_by_its_authority(backend, proxy):
    """RFC 9112 3.2.2: `GET http://host/path` names the host; the backend gets origin-form."""
    web, other = await backend("web"), await backend("other")
    ep = free_port()
    await proxy(
        snapshot(
            service("web", [web]),
            service("other", [other]),
            routes=[Route("web.example.com", "/api", "web"), Route("", "/", "other")],
        ),
        entrypoints=[("http", ep)],
    )
    client = await Client.open(ep)
    await client.send(
        b"GET http://web.example.com/api/x?q=1 HTTP/1.1\r\nHost: ignored.example.com\r\n\r\n"
    )
    r = await within(client.response())
    assert r.status == 200
    assert other.requests == []
    req = web.requests[0]
    assert req.target == "/api/x?q=1"
    assert req.get("host") == "web.example.com"
    client.close()


async def test_responses_carry_via(backend, proxy):
    b = await backend("a")
    port = await static(proxy, [b])
    r = await within(fetch(port))
    assert r.status == 200
    assert r.get("via") == "1.1 edgelb"


async def test_sticky_cookie_pins_a_client_to_its_backend(backend, proxy):
    """marathon-lb's HAPROXY_{n}_STICKY: a cookie names the backend; it wins over the policy."""
    backends = [await backend(n) for n in ("a", "b", "c")]
    port = await static(proxy, backends, balance="round-robin", sticky=True)
    client = await Client.open(port)
    r = await within(client.request("GET", "/"))
    cookie = r.get("set-cookie")
    assert cookie and cookie.startswith("edgelb_server=") and "HttpOnly" in cookie
    pinned = r.body.split()[0]
    value = cookie.split(";")[0]
    for _ in range(9):  # round-robin alone would rotate over the three
        r = await within(client.request("GET", "/", headers=[("Cookie", f"x=1; {value}")]))
        assert r.body.split()[0] == pinned
        assert r.get("set-cookie") is None  # already pinned: nothing new to say
    r = await within(client.request("GET", "/", headers=[("Cookie", "edgelb_server=bogus")]))
    assert r.status == 200 and (r.get("set-cookie") or "").startswith("edgelb_server=")
    client.close()


async def test_the_sticky_cookie_takes_the_name_the_policy_gives(backend, proxy):
    backends = [await backend(n) for n in ("a", "b", "c")]
    port = await static(proxy, backends, balance="round-robin", sticky=True,
                        sticky_cookie="SERVERID")
    client = await Client.open(port)
    r = await within(client.request("GET", "/"))
    value = (r.get("set-cookie") or "").split(";")[0]
    assert value.startswith("SERVERID=")
    pinned = r.body.split()[0]
    for _ in range(4):
        r = await within(client.request("GET", "/", headers=[("Cookie", value)]))
        assert r.body.split()[0] == pinned and r.get("set-cookie") is None
    other = value.replace("SERVERID=", "edgelb_server=")  # the default name means nothing here
    r = await within(client.request("GET", "/", headers=[("Cookie", other)]))
    assert (r.get("set-cookie") or "").startswith("SERVERID=")
    client.close()


async def test_sticky_client_moves_when_its_backend_is_gone(backend, proxy):
    a, b = await backend("a"), await backend("b")
    port = free_port()
    rt = await proxy(snapshot(service("web", [a, b], listen=port, sticky=True)))
    r = await within(fetch(port))
    value = r.get("set-cookie").split(";")[0]
    pinned = r.body.split()[0].decode()
    survivor = b if pinned == "a" else a
    await rt.apply(snapshot(service("web", [survivor], listen=port, sticky=True)))
    r = await within(fetch(port, headers=[("Cookie", value)]))
    assert r.status == 200 and r.body.split()[0].decode() == survivor.name
    assert (r.get("set-cookie") or "").startswith("edgelb_server=")


async def test_hash_on_a_header_keeps_each_key_on_one_backend(backend, proxy):
    backends = [await backend(n) for n in ("a", "b", "c")]
    port = await static(proxy, backends, balance="hash", hash_key="header:X-User")
    client = await Client.open(port)
    seen: dict[str, set[bytes]] = {}
    for i in range(60):
        user = f"user-{i % 12}"
        r = await within(client.request("GET", "/", headers=[("X-User", user)]))
        assert r.status == 200
        seen.setdefault(user, set()).add(r.body.split()[0])
    client.close()
    assert all(len(names) == 1 for names in seen.values())  # a key always lands on one backend
    assert len({n for names in seen.values() for n in names}) > 1  # and keys spread


async def test_hash_on_the_source_address(backend, proxy):
    backends = [await backend(n) for n in ("a", "b")]
    port = await static(proxy, backends, balance="hash")  # hash_key: source
    names = set()
    for _ in range(8):  # new connections, same client address
        r = await within(fetch(port))
        names.add(r.body.split()[0])
    assert len(names) == 1


async def test_zone_aware_service_keeps_low_load_in_the_proxys_zone(backend, proxy):
    here, there = await backend("here"), await backend("there")
    port = free_port()
    specs = [
        Backend("127.0.0.1", here.port, weight=4, zone="z1"),
        Backend("127.0.0.1", there.port, weight=4, zone="z2"),
    ]
    rt = await proxy()
    # the zone a source found (e.g. the Kubernetes Node's label) when the config sets none
    snap = snapshot(service("web", specs, listen=port, zone_aware=True))
    await rt.apply(dataclasses.replace(snap, zone="z1"))
    assert rt.instance.zone == "z1"
    client = await Client.open(port)
    for _ in range(20):
        r = await within(client.request("GET", "/"))
        assert r.body.split()[0] == b"here"
    client.close()
    assert there.requests == []


# -- the response fast path (a head seen before, whole body in one read) -----------------------

FAST_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: t\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
    b"Content-Length: 5\r\n\r\nhello"
)


async def test_a_repeated_response_is_relayed_the_same_as_the_first(backend, proxy):
    b = await backend("a", raw(FAST_RESPONSE))
    port = await static(proxy, [b])
    client = await Client.open(port)
    first = await within(client.request("GET", "/1"))
    for i in range(3):
        again = await within(client.request("GET", f"/{i + 2}"))
        assert again.head == first.head
        assert again.body == first.body == b"hello"
    assert not first.has("keep-alive") and first.get("via") == "1.1 edgelb"
    # a HEAD answered with the same head (as some backends do) has no body for the client
    head = await within(client.request("HEAD", "/h"))
    assert head.status == 200 and head.body == b""
    assert head.head == first.head
    after = await within(client.request("GET", "/after"))
    assert after.head == first.head and after.body == b"hello"  # nothing left over
    # the body that came with the HEAD answer answers nothing: that connection was closed
    assert len(b.requests) == 6 and b.connections == 2
    client.close()


async def test_a_known_head_with_more_or_less_body_than_announced_takes_the_parser(
    backend, proxy
):
    calls = 0

    async def handler(call: Call) -> None:
        nonlocal calls
        calls += 1
        await call.read_body()
        if calls == 2:  # the same head, the body in two writes
            call.write(FAST_RESPONSE[:-2])
            await call.drain()
            await asyncio.sleep(0.05)  # a second read at the proxy
            call.write(FAST_RESPONSE[-2:])
        elif calls == 3:  # the same head with bytes beyond its body: not ours to relay
            call.write(FAST_RESPONSE + b"JUNK")
        else:
            call.write(FAST_RESPONSE)
        await call.drain()

    b = await backend("a", handler)
    port = await static(proxy, [b])
    client = await Client.open(port)
    assert (await within(client.request("GET", "/1"))).body == b"hello"
    assert (await within(client.request("GET", "/2"))).body == b"hello"
    r3 = await within(client.request("GET", "/3"))
    assert r3.body == b"hello"
    r4 = await within(client.request("GET", "/4"))  # on a fresh upstream connection
    assert r4.body == b"hello"
    assert b.connections == 2  # the one that sent junk was not reused
    client.close()
