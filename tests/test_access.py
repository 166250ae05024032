"""Access control per service on real sockets: source addresses (403 / closed) and basic auth
(401 with a challenge); and TLS to backends (verification on, a wrong CA refused)."""

from __future__ import annotations

import asyncio
import base64
import ssl
from pathlib import Path

import pytest
import tlskit
from httpkit import (
    HOST,
    Client,
    HttpBackend,
    free_port,
    running,
    service,
    snapshot,
    tcp_echo_server,
    within,
)

from edgelb.net.acl import parse_auth, parse_source_filter, scrypt_hash
from edgelb.net.backend_tls import BackendTLS

pytestmark = [pytest.mark.timeout(30)]


def sources(value: object):
    f, errs = parse_source_filter(value, "sources")
    assert not errs
    return f


async def test_a_source_outside_the_allow_list_gets_403_and_never_reaches_a_backend() -> None:
    b = await HttpBackend("b").start()
    open_port, closed_port = free_port(), free_port()
    snap = snapshot(
        service("open", [b], listen=open_port, sources=sources({"allow": ["127.0.0.0/8"]})),
        service("shut", [b], listen=closed_port,
                sources=sources({"allow": ["10.0.0.0/8"], "deny": ["127.0.0.1"]})),
    )
    async with running(snap):
        c = await Client.open(open_port)
        assert (await within(c.request("GET", "/ok"))).status == 200
        c.close()
        c = await Client.open(closed_port)
        r = await within(c.request("GET", "/no"))
        assert r.status == 403
        c.close()
    assert [r.target for r in b.requests] == ["/ok"]
    await b.stop()


async def test_basic_auth_asks_then_lets_the_right_user_through() -> None:
    b = await HttpBackend("b").start()
    port = free_port()
    creds, errs = parse_auth({"realm": "shop", "users": [f"alice:{scrypt_hash('s3cret')}"]},
                             "auth")
    assert not errs
    async with running(snapshot(service("web", [b], listen=port, auth=creds))):
        c = await Client.open(port)
        r = await within(c.request("GET", "/"))
        assert r.status == 401
        assert 'realm="shop"' in (r.get("www-authenticate") or "")
        bad = base64.b64encode(b"alice:wrong").decode()
        r = await within(c.request("GET", "/", [("Authorization", f"Basic {bad}")]))
        assert r.status == 401
        good = base64.b64encode(b"alice:s3cret").decode()
        for _ in range(3):  # the second and third take the cache
            r = await within(c.request("GET", "/in", [("Authorization", f"Basic {good}")]))
            assert r.status == 200
        c.close()
    assert [r.target for r in b.requests] == ["/in"] * 3
    assert creds is not None and creds.verifications == 2  # wrong once, right once
    await b.stop()


async def test_tcp_source_filter_closes_refused_clients() -> None:
    server, bport = await tcp_echo_server()
    port = free_port()
    snap = snapshot(service("t", [bport], listen=port, mode="tcp",
                            sources=sources(["10.0.0.0/8"])))
    async with running(snap) as rt:
        reader, writer = await asyncio.open_connection(HOST, port)
        assert await within(reader.read()) == b""
        writer.close()
        assert rt.services["t"].shed == {"source": 1}
    server.close()


async def tls_backend(tmp_path: Path) -> tuple[asyncio.AbstractServer, int, Path]:
    cert, key = tlskit.ca().issue(["backend.internal"])
    (tmp_path / "b.crt").write_bytes(cert)
    (tmp_path / "b.key").write_bytes(key)
    (tmp_path / "ca.pem").write_bytes(tlskit.ca().pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "b.crt", tmp_path / "b.key")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecure")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, HOST, 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1], tmp_path / "ca.pem"


async def test_tls_to_backends_verified_and_a_wrong_ca_refused(tmp_path: Path, caplog) -> None:
    server, bport, ca = await tls_backend(tmp_path)
    good, bad = free_port(), free_port()
    # a "CA" that did not sign the backend's certificate: another leaf stands in for it
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(tlskit.ca().issue(["someone.else"])[0])
    snap = snapshot(
        service("good", [bport], listen=good,
                backend_tls=BackendTLS(ca=str(ca), sni="backend.internal")),
        service("bad", [bport], listen=bad,
                backend_tls=BackendTLS(ca=str(wrong), sni="backend.internal")),
    )
    async with running(snap):
        c = await Client.open(good)
        r = await within(c.request("GET", "/"))
        assert (r.status, r.body) == (200, b"secure")
        c.close()
        c = await Client.open(bad)
        r = await within(c.request("GET", "/"))
        assert r.status == 502
        assert any("TLS handshake" in rec.getMessage() for rec in caplog.records)
        c.close()
    server.close()
