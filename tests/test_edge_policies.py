"""Edge policies per service: redirect to https (308), HSTS on https responses, max_body (413)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import tlskit
from httpkit import (
    HOST,
    Client,
    HttpBackend,
    echo,
    fetch,
    free_port,
    running,
    service,
    snapshot,
    within,
)
from test_tls_proxy import https_get

from edgelb.ops.app import App


async def test_redirect_to_https_answers_308_with_the_location() -> None:
    b = await HttpBackend("b").start()
    port = free_port()
    async with running(snapshot(service("web", [b], listen=port, redirect_to_https=True))):
        client = await Client.open(port)
        r = await within(client.request("GET", "/cart?x=1", host="shop.example.com:8080"))
        assert r.status == 308
        assert r.get("location") == "https://shop.example.com/cart?x=1"
        assert b.requests == []  # the backend never sees a plain-HTTP request
        r = await within(client.request("GET", "/", host="[::1]:80"))
        assert r.get("location") == "https://[::1]/"
        client.close()
    await b.stop()


async def test_max_body_refuses_a_declared_or_streamed_body_over_the_limit() -> None:
    b = await HttpBackend("b", echo()).start()
    port = free_port()
    async with running(snapshot(service("web", [b], listen=port, max_body=1000))):
        ok = await within(fetch(port, "POST", "/", body=b"x" * 1000))
        assert ok.status == 200 and ok.body == b"x" * 1000
        big = await within(fetch(port, "POST", "/", body=b"x" * 1001))
        assert big.status == 413
        assert b"1000 bytes" in big.body
        # chunked: the size is only known as the body streams in
        client = await Client.open(port)
        await client.send(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          + b"200\r\n" + b"y" * 0x200 + b"\r\n" * 1)
        await client.send(b"400\r\n" + b"y" * 0x400 + b"\r\n0\r\n\r\n")
        rest = await within(client.at_eof(5))
        assert rest.startswith(b"HTTP/1.1 413 Content Too Large\r\n"), rest[:80]
        client.close()
    assert len(b.requests) <= 2  # the 1001-byte declared body never reached it
    assert all(r.target != "/" or r.get("content-length") == "1000" for r in b.requests)
    await b.stop()


async def test_hsts_is_added_on_https_only(tmp_path: Path) -> None:
    b = await HttpBackend("web").start()
    cert, key = tlskit.ca().issue(["shop.example.com"], serial=77)
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    https, http = free_port(), free_port()
    path = tmp_path / "edgelb.yaml"
    path.write_text(
        f"admin: {{listen: {HOST}:{free_port()}}}\n"
        f"entrypoints:\n  http: {{listen: {HOST}:{http}}}\n"
        f"  https: {{listen: {HOST}:{https}, tls: {{cert: {tmp_path}/c.pem, "
        f"key: {tmp_path}/k.pem}}}}\n"
        f"services:\n  - {{name: web, hosts: [shop.example.com], hsts: 365d,\n"
        f"     backends: [{{address: {HOST}:{b.port}}}]}}\n"
    )
    app = App(path)
    await within(app.start(), 10)
    try:
        for _ in range(3):  # the first response takes the parser, later ones the fast path
            reader, writer = await asyncio.open_connection(
                HOST, https, ssl=tlskit.client_context(), server_hostname="shop.example.com")
            writer.write(b"GET / HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n")
            data = await within(reader.read(65536))
            writer.close()
            assert b"\r\nstrict-transport-security: max-age=31536000\r\n" in data.lower()
        client = await Client.open(http)
        r = await within(client.request("GET", "/", host="shop.example.com"))
        assert r.status == 200 and not r.has("strict-transport-security")
        client.close()
        assert (await within(https_get(https, "shop.example.com")))[0] == 200
    finally:
        await app.stop()
        await b.stop()


pytestmark = [pytest.mark.timeout(30)]
