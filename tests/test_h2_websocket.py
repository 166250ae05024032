"""WebSocket over HTTP/2 (RFC 8441 extended CONNECT): a hyper-h2 client opens WebSockets
through edgelb (h2c) to aiohttp's WebSocket server, a backend that checks the HTTP/1.1
handshake and speaks real RFC 6455 frames; messages both ways, closes from each side, the
client's END_STREAM and RST_STREAM, refusals, and the requests that are not WebSockets."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from aiohttp import WSMsgType, web
from h2kit import H2Client, Response
from httpkit import HOST, eventually, free_port, running, upgrade_echo

from edgelb.h2.translate import LocalAnswer, RequestHead, request_head, websocket_accept
from watchers.model import Address, Backend, Service, Snapshot

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8


# -- RFC 6455 frames, as a client writes them (masked) and reads them (unmasked) -------------

def ws_frame(payload: bytes, opcode: int = TEXT) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
    return head + mask + masked


def ws_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The whole unmasked frames at the start of `data` (a server's)."""
    out = []
    i = 0
    while len(data) - i >= 2:
        opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
        start = i + 2
        if n == 126:
            n, start = int.from_bytes(data[start:start + 2], "big"), start + 2
        elif n == 127:
            n, start = int.from_bytes(data[start:start + 8], "big"), start + 8
        if len(data) < start + n:
            break
        out.append((opcode, data[start:start + n]))
        i = start + n
    return out


# -- the backend: aiohttp's WebSocket server -------------------------------------------------

class WsBackend:
    """/ws echoes messages ("close-me": the server closes, code 4000); /refuse answers 403;
    /plain is a plain GET. `handshakes`: the upgrade requests' headers; `ended`: sockets whose
    handler is over."""

    def __init__(self) -> None:
        self.handshakes: list[dict[str, str]] = []
        self.ended = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        self.handshakes.append({k.lower(): v for k, v in request.headers.items()})
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT and msg.data == "close-me":
                    await ws.close(code=4000, message=b"bye")
                    break
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        finally:
            self.ended += 1
        return ws

    async def refuse(self, request: web.Request) -> web.Response:
        return web.Response(status=403, text="no sockets")

    async def plain(self, request: web.Request) -> web.Response:
        return web.Response(text="plain")

    async def start(self) -> WsBackend:
        app = web.Application()
        app.router.add_get("/ws", self.ws)
        app.router.add_get("/refuse", self.refuse)
        app.router.add_get("/plain", self.plain)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, HOST, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self


@pytest.fixture
async def ws_backend() -> AsyncIterator[WsBackend]:
    b = await WsBackend().start()
    yield b
    assert b.runner is not None
    await b.runner.cleanup()


@pytest.fixture
async def proxy(ws_backend: WsBackend):
    port = free_port()
    svc = Service(name="ws", listen=Address(HOST, port), h2c=True,
                  backends=(Backend(HOST, ws_backend.port),))
    async with running(Snapshot(source="file", services=(svc,))) as rt:
        rt.test_port = port  # type: ignore[attr-defined]
        yield rt


async def connect(port: int) -> H2Client:
    client = await H2Client().connect(port)
    await client.wait(lambda: client.conn.remote_settings.enable_connect_protocol == 1)
    return client


def open_ws(client: H2Client, path: str = "/ws", protocol: str = "websocket") -> int:
    return client.request(path, method="CONNECT", end=False, headers=[
        (":protocol", protocol), ("sec-websocket-version", "13"),
        ("sec-websocket-protocol", "chat")])


async def receive(client: H2Client, r: Response, n: int) -> list[tuple[int, bytes]]:
    """Wait until the stream carried `n` whole frames; all of them so far."""
    await client.wait(lambda: len(ws_frames(r.body)) >= n or r.reset is not None)
    return ws_frames(r.body)


# -- tests -----------------------------------------------------------------------------------

async def test_messages_both_ways_a_second_stream_meanwhile_and_a_client_close(
        ws_backend: WsBackend, proxy) -> None:
    """The handshake the backend sees is a real HTTP/1.1 upgrade (aiohttp checks it), the
    client gets a 200 with the negotiated subprotocol, messages cross both ways (one larger
    than the windows), a plain request on the same connection is served meanwhile, and the
    client's close frame closes the socket at both ends."""
    client = await connect(proxy.test_port)
    try:
        sid = open_ws(client)
        r = client.responses[sid]
        await client.wait(lambda: r.status != 0)
        assert r.status == 200
        assert r.headers.get(b"sec-websocket-protocol") == b"chat"
        assert b"sec-websocket-accept" not in r.headers and b"upgrade" not in r.headers
        seen = ws_backend.handshakes[0]
        assert seen["upgrade"].lower() == "websocket" and seen["sec-websocket-version"] == "13"
        assert len(seen["sec-websocket-key"]) == 24

        big = os.urandom(700 * 1024)  # more than a stream window and RESPONSE_HIGH
        client.send_body(sid, ws_frame(b"hello") + ws_frame(big, BINARY), end=False)
        frames = await receive(client, r, 2)
        assert frames[:2] == [(TEXT, b"hello"), (BINARY, big)]

        plain = await client.get("/plain")  # another stream while the tunnel is open
        assert plain.status == 200 and plain.body == b"plain"

        client.send_body(sid, ws_frame(b"again"), end=False)
        frames = await receive(client, r, 3)
        assert frames[2] == (TEXT, b"again")

        client.send_body(sid, ws_frame(b"\x03\xe8", CLOSE), end=False)  # 1000: normal
        frames = await receive(client, r, 4)
        assert frames[3][0] == CLOSE
        await client.wait(lambda: r.ended)  # the backend closed the tunnel: END_STREAM
        assert r.reset is None
        await eventually(lambda: ws_backend.ended == 1, what="the backend's socket ended")
    finally:
        await client.close()


async def test_the_backend_closes_the_websocket(ws_backend: WsBackend, proxy) -> None:
    """The server's close frame reaches the client; the backend's closed connection ends the
    stream cleanly."""
    client = await connect(proxy.test_port)
    try:
        sid = open_ws(client)
        r = client.responses[sid]
        client.send_body(sid, ws_frame(b"close-me"), end=False)
        frames = await receive(client, r, 1)
        assert frames[0] == (CLOSE, (4000).to_bytes(2, "big") + b"bye")
        client.send_body(sid, ws_frame(frames[0][1][:2], CLOSE), end=False)  # the reply
        await client.wait(lambda: r.ended)
        assert r.status == 200 and r.reset is None
        await eventually(lambda: ws_backend.ended == 1, what="the backend's socket ended")
    finally:
        await client.close()


async def test_end_stream_and_reset_from_the_client_end_the_tunnel(
        ws_backend: WsBackend, proxy) -> None:
    """END_STREAM half-closes the backend connection (its data first), which then closes and
    ends the stream; RST_STREAM closes the backend connection."""
    client = await connect(proxy.test_port)
    try:
        a, b = open_ws(client), open_ws(client)
        ra, rb = client.responses[a], client.responses[b]
        await client.wait(lambda: ra.status == 200 and rb.status == 200)
        client.send_body(a, ws_frame(b"last words"), end=True)
        assert (await receive(client, ra, 1))[0] == (TEXT, b"last words")
        await client.wait(lambda: ra.ended)
        assert ra.reset is None
        await eventually(lambda: ws_backend.ended == 1, what="the first socket ended")

        client.conn.reset_stream(b)
        client.flush()
        await eventually(lambda: ws_backend.ended == 2, what="the reset socket ended")
        assert (await client.get("/plain")).body == b"plain"  # the connection serves on
        assert not proxy.listeners[next(iter(proxy.listeners))].refused.get("h2_rapid_reset")
    finally:
        await client.close()


async def test_a_refused_upgrade_gives_the_backend_status(ws_backend: WsBackend, proxy) -> None:
    client = await connect(proxy.test_port)
    try:
        r = client.responses[open_ws(client, "/refuse")]
        await client.wait(lambda: r.ended or r.reset is not None)
        assert r.status == 403 and r.body == b"no sockets" and r.reset is None
        assert (await client.get("/plain")).status == 200
    finally:
        await client.close()


async def test_a_101_that_does_not_answer_the_key_is_a_502(backend) -> None:
    """httpkit's upgrade_echo switches protocols without Sec-WebSocket-Accept: not a
    WebSocket handshake for the key edgelb sent."""
    b = await backend("raw", upgrade_echo("websocket"))
    port = free_port()
    svc = Service(name="ws", listen=Address(HOST, port), h2c=True, backends=(b.spec,))
    async with running(Snapshot(source="file", services=(svc,))):
        client = await connect(port)
        try:
            r = await client.response(open_ws(client))
            assert r.status == 502 and b"key" in r.body
            assert r.reset is None and not client.closed.is_set()  # the connection serves on
        finally:
            await client.close()


async def test_plain_connect_and_an_unknown_protocol_get_errors(
        ws_backend: WsBackend, proxy) -> None:
    """A CONNECT without :protocol is the reverse proxy's 400; an extended CONNECT for a
    protocol other than websocket is 501; neither reaches the backend."""
    client = await connect(proxy.test_port)
    try:
        sid = client.conn.get_next_available_stream_id()
        client.responses[sid] = Response()
        client.conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"x.test:443")])
        client.flush()
        r = await client.response(sid)
        assert r.status == 400 and b"CONNECT" in r.body
        r = await client.response(open_ws(client, protocol="connect-udp"))
        assert r.status == 501 and b"connect-udp" in r.body
        assert ws_backend.handshakes == []
    finally:
        await client.close()


def test_extended_connect_translation() -> None:
    """The HTTP/1.1 upgrade an extended CONNECT becomes, and what is refused."""
    assert websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    base = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
            (b":path", b"/chat?x=1"), (b":authority", b"a.test")]
    req = request_head([*base, (b"sec-websocket-protocol", b"chat"),
                               (b"sec-websocket-key", b"client's"),
                               (b"sec-websocket-version", b"13")], False, lambda: b"K")
    assert isinstance(req, RequestHead)
    assert req.method == b"GET" and not req.chunked and req.ws_accept == websocket_accept(b"K")
    assert req.head == (b"GET /chat?x=1 HTTP/1.1\r\nhost: a.test\r\n"
                        b"sec-websocket-protocol: chat\r\nconnection: upgrade\r\n"
                        b"upgrade: websocket\r\nsec-websocket-version: 13\r\n"
                        b"sec-websocket-key: K\r\n\r\n")
    unknown = request_head([*base[:1], (b":protocol", b"x"), *base[2:]], False)
    assert isinstance(unknown, LocalAnswer) and unknown.status == 501
    assert isinstance(request_head(base, True), str)  # ends at once: no tunnel
    plain = request_head([(b":method", b"CONNECT"), (b":authority", b"a.test:443")], False)
    assert isinstance(plain, LocalAnswer) and plain.status == 400
    assert isinstance(request_head([(b":method", b"GET"), *base[1:]], False), str)
    assert isinstance(request_head([f for f in base if f[0] != b":path"], False), str)
