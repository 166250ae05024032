"""Health checks speak to a backend as its traffic does: over TLS for a service with
`backend_tls`, with a PROXY protocol header first for a tcp service that sends one."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import tlskit

from edgelb.control.health import probe
from edgelb.net.backend_tls import BackendTLS
from edgelb.net.proxy_protocol import V1_UNKNOWN, V2_LOCAL
from watchers.model import Address, HealthCheck

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
NAME = "backend.example.com"
HTTP = HealthCheck(path="/healthz", timeout=2.0)
TCP = HealthCheck(kind="tcp", timeout=2.0)
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def server_context(tmp_path: Path) -> ssl.SSLContext:
    cert, key = tlskit.ca().issue([NAME])
    (tmp_path / "b.crt").write_bytes(cert)
    (tmp_path / "b.key").write_bytes(key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "b.crt", tmp_path / "b.key")
    return ctx


def trusting(tmp_path: Path) -> BackendTLS:
    (tmp_path / "ca.pem").write_bytes(tlskit.ca().pem)
    return BackendTLS(ca=str(tmp_path / "ca.pem"), sni=NAME)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler, ctx: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(run, HOST, 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def answer_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"GET /healthz HTTP/1.1\r\n"), head
    writer.write(OK)
    await writer.drain()


async def test_an_http_check_over_tls_with_the_services_verification(tmp_path: Path) -> None:
    async with serving(answer_http, server_context(tmp_path)) as port:
        result = await probe(Address(HOST, port), HTTP, trusting(tmp_path))
        assert result.ok, result.text
        # plain HTTP to a TLS backend is what the checks did before: a failed check
        assert not (await probe(Address(HOST, port), HTTP)).ok
        # and a CA that did not sign the backend's certificate fails, naming the handshake
        other = tlskit.CA(*_other_ca())
        (tmp_path / "other.pem").write_bytes(other.pem)
        wrong = BackendTLS(ca=str(tmp_path / "other.pem"), sni=NAME)
        result = await probe(Address(HOST, port), HTTP, wrong)
        assert not result.ok and "TLS handshake failed" in result.text, result.text


async def test_a_tcp_check_over_tls_passes_on_a_completed_handshake(tmp_path: Path) -> None:
    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)

    async with serving(idle, server_context(tmp_path)) as port:
        result = await probe(Address(HOST, port), TCP, trusting(tmp_path))
        assert result.ok and result.text.startswith("TLS handshake in"), result.text


@pytest.mark.parametrize(("version", "header"), [(1, V1_UNKNOWN), (2, V2_LOCAL)])
async def test_a_proxy_protocol_header_comes_first(version: int, header: bytes) -> None:
    got: list[bytes] = []

    async def expect_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.readexactly(len(header)))
        await answer_http(reader, writer)

    async with serving(expect_header) as port:
        result = await probe(Address(HOST, port), HTTP, None, version)
        assert result.ok, result.text
    assert got == [header]


async def test_the_header_precedes_the_tls_client_hello(tmp_path: Path) -> None:
    """A backend reading PROXY then TLS on one connection (nginx `proxy_protocol ssl`)."""
    got: list[bytes] = []

    async def header_then_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                              ) -> None:
        got.append(await reader.readexactly(len(V2_LOCAL)))
        got.append(await reader.readexactly(1))  # the first byte of the TLS record
        # a real server would now do its handshake; this one proves the order and hangs up

    async with serving(header_then_tls) as port:
        result = await probe(Address(HOST, port), TCP, trusting(tmp_path), 2)
        assert not result.ok  # the handshake cannot finish
    assert got == [V2_LOCAL, b"\x16"]  # the header, then a TLS handshake record


def _other_ca() -> tuple[object, object]:
    """A second, unrelated CA (certificate and key) for the wrong-CA case."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    k = tlskit.key(5)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(k.public_key()).serial_number(77)
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(k, hashes.SHA256()))
    return cert, k


async def test_a_backend_tls_service_is_checked_over_tls_end_to_end(tmp_path: Path) -> None:
    """Through the runtime: an https-only backend behind `backend_tls` passes its http check
    (it failed every check before checks spoke TLS) and serves through the proxy."""
    from httpkit import eventually, free_port

    from edgelb.control.runtime import Runtime
    from watchers.model import Backend, Policy, Service, Snapshot

    async def always_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()

    async with serving(always_ok, server_context(tmp_path)) as port:
        rt = Runtime(loop=asyncio.get_running_loop())
        listen = Address(HOST, free_port())
        check = HealthCheck(path="/healthz", interval=0.2, timeout=1.0, rise=1, fall=1)
        svc = Service("web", listen=listen, backends=(Backend(HOST, port),),
                      policy=Policy(backend_tls=trusting(tmp_path), health_check=check))
        await rt.apply(Snapshot("file", (svc,)))
        try:
            key = f"{HOST}:{port}"
            # healthy is assumed at start; wait for a check that ran and passed over TLS
            await eventually(lambda: str(rt.health.status("web", key).get("last_result"))
                             .startswith("HTTP 200"), what="the TLS backend passing a check")
            assert rt.health.healthy("web", key) is True
            reader, writer = await asyncio.open_connection(HOST, listen.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await reader.read(-1)).startswith(b"HTTP/1.1 200")
            writer.close()
        finally:
            await rt.shutdown(0.2)
