"""TLS to backends (edgelb/net/backend_tls.py): config parsing, client contexts and the names they
verify and send, checked with real handshakes on 127.0.0.1 against TLS servers whose
certificates are made at test time (tests/tlskit.py)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tlskit
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgelb.net import backend_tls, tls
from edgelb.net.backend_tls import (
    BackendTLS,
    BackendTLSError,
    client_context,
    parse_backend_tls,
    server_hostname,
)

pytestmark = pytest.mark.timeout(30)

REQUEST = b"GET / HTTP/1.1\r\nHost: backend.test\r\n\r\n"


# ---------------------------------------------------------------------------------------------
# Certificates and files


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def other_ca() -> tlskit.CA:
    """A second CA, with its own key and name: it signs nothing the test CA would accept."""
    k = tlskit.key(7)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("unrelated CA")).issuer_name(_name("unrelated CA"))
        .public_key(k.public_key()).serial_number(2)
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=9))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(k, hashes.SHA256())
    )
    return tlskit.CA(cert, k)


def client_cert() -> tuple[bytes, bytes]:
    """A client-auth certificate for the proxy, signed by the test CA."""
    ca, k = tlskit.ca(), tlskit.key(8)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("edgelb-proxy")).issuer_name(ca.cert.subject)
        .public_key(k.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=9))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), tlskit.key_pem(k)


@dataclass
class Files:
    dir: Path
    ca: str  # the test CA
    other_ca: str
    client_cert: str
    client_key: str
    other_key: str  # a key that is not the client certificate's
    encrypted_key: str
    not_pem: str


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    d = tmp_path_factory.mktemp("backend-tls")

    def put(name: str, data: bytes) -> str:
        (d / name).write_bytes(data)
        return str(d / name)

    cert_pem, key_pem = client_cert()
    return Files(
        dir=d,
        ca=put("ca.pem", tlskit.ca().pem),
        other_ca=put("other-ca.pem", other_ca().pem),
        client_cert=put("client.crt", cert_pem),
        client_key=put("client.key", key_pem),
        other_key=put("other.key", tlskit.key_pem(tlskit.key(9))),
        encrypted_key=put("enc.key", tlskit.key_pem(tlskit.key(8), password=b"secret")),
        not_pem=put("not-pem.txt", b"hello\n"),
    )


@pytest.fixture(autouse=True)
def fresh_cache() -> None:
    backend_tls.clear_cache()


# ---------------------------------------------------------------------------------------------
# A TLS backend that records what each handshake brought


@dataclass
class Backend:
    port: int
    sni: list[str | None] = field(default_factory=list)  # server name of each ClientHello
    peers: list[dict[str, Any]] = field(default_factory=list)  # client certificates seen


Start = Callable[..., Awaitable[Backend]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    servers: list[asyncio.AbstractServer] = []

    async def start_(names: tuple[str, ...] = ("backend.test",), *, ips: tuple[str, ...] = (),
                     issuer: tlskit.CA | None = None, client_ca: bytes | None = None) -> Backend:
        cert_pem, key_pem = (issuer or tlskit.ca()).issue(names, ips=ips)
        ctx = tls.load_pem(cert_pem, key_pem, "test backend").context
        if client_ca is not None:
            ctx.load_verify_locations(cadata=client_ca.decode())
            ctx.verify_mode = ssl.CERT_REQUIRED
        backend = Backend(0)

        def on_sni(_obj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
            backend.sni.append(name)

        ctx.sni_callback = on_sni

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            backend.peers.append(writer.get_extra_info("peercert"))
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(tlskit.RESPONSE)
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=ctx)
        servers.append(server)
        backend.port = server.sockets[0].getsockname()[1]
        return backend

    yield start_
    for server in servers:
        server.close()


@dataclass
class Reply:
    body: bytes
    alpn: str | None
    version: str | None


async def get(port: int, spec: BackendTLS, host: str) -> Reply:
    """Connect as the proxy's `_connect` would (to 127.0.0.1, as if `host` resolved there),
    send one request and read the whole response."""
    loop = asyncio.get_running_loop()

    async def go() -> Reply:
        reader = asyncio.StreamReader()
        transport, _ = await loop.create_connection(
            lambda: asyncio.StreamReaderProtocol(reader), "127.0.0.1", port,
            ssl=client_context(spec), server_hostname=server_hostname(spec, host))
        try:
            obj = transport.get_extra_info("ssl_object")
            transport.write(REQUEST)
            body = await reader.read()
            return Reply(body, obj.selected_alpn_protocol(), obj.version())
        finally:
            transport.close()

    return await asyncio.wait_for(go(), 5)


# ---------------------------------------------------------------------------------------------
# Handshakes, as `_connect` makes them (streams) and as TCP mode does (raw sockets); every test
# runs on the default loop and, through the subclass, on uvloop as the proxy does.


def _connected_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    return sock


class TestOnAsyncio:
    uvloop = False

    @pytest.fixture(autouse=True)
    async def on_the_right_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert type(loop).__module__.startswith("uvloop") == self.uvloop, type(loop)

    async def test_verified_with_the_right_ca(self, start: Start, files: Files) -> None:
        backend = await start(("backend.test",))
        reply = await get(backend.port, BackendTLS(ca=files.ca), "backend.test")
        assert reply.body.endswith(b"\r\n\r\nok")
        assert reply.alpn == "http/1.1"
        assert reply.version in ("TLSv1.2", "TLSv1.3")
        assert backend.sni == ["backend.test"]  # the backend's host name is sent as SNI

    async def test_a_wrong_ca_fails_the_handshake(self, start: Start, files: Files) -> None:
        backend = await start(("backend.test",))
        with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
            await get(backend.port, BackendTLS(ca=files.other_ca), "backend.test")
        assert backend.peers == []  # no request reached it

    async def test_without_ca_the_system_store_decides(
            self, start: Start, files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
        backend = await start(("backend.test",))
        with pytest.raises(ssl.SSLCertVerificationError):  # the real store: a private CA fails
            await get(backend.port, BackendTLS(), "backend.test")
        # OpenSSL's default locations follow SSL_CERT_FILE/SSL_CERT_DIR: make the test CA the
        # whole "system store" and the same spec now verifies.
        monkeypatch.setenv("SSL_CERT_FILE", files.ca)
        monkeypatch.setenv("SSL_CERT_DIR", str(files.dir / "no-such-dir"))
        backend_tls.clear_cache()
        assert (await get(backend.port, BackendTLS(), "backend.test")).body.endswith(b"ok")

    async def test_verify_off_accepts_any_certificate(self, start: Start) -> None:
        # Signed by a CA nobody trusts, for a name that is not the backend's.
        backend = await start(("unrelated.example",), issuer=other_ca())
        reply = await get(backend.port, BackendTLS(verify=False), "backend.test")
        assert reply.body.endswith(b"ok")
        assert backend.sni == ["backend.test"]  # SNI is still sent

    async def test_configured_sni_is_sent_and_verified(self, start: Start, files: Files) -> None:
        backend = await start(("api.internal",))
        spec = BackendTLS(ca=files.ca, sni="api.internal")
        reply = await get(backend.port, spec, "10.1.2.3")  # a pod IP: the name comes from sni
        assert reply.body.endswith(b"ok")
        assert backend.sni == ["api.internal"]

    async def test_hostname_mismatch_is_rejected(self, start: Start, files: Files) -> None:
        backend = await start(("backend.test",))
        with pytest.raises(ssl.SSLCertVerificationError, match=r"[Hh]ostname mismatch"):
            await get(backend.port, BackendTLS(ca=files.ca, sni="other.test"), "backend.test")
        with pytest.raises(ssl.SSLCertVerificationError, match=r"[Hh]ostname mismatch"):
            await get(backend.port, BackendTLS(ca=files.ca), "www.backend.test")
        assert backend.sni == ["other.test", "www.backend.test"]

    async def test_an_ip_host_sends_no_sni_and_is_checked_against_ip_sans(
            self, start: Start, files: Files) -> None:
        with_ip = await start(("backend.test",), ips=("127.0.0.1",))
        reply = await get(with_ip.port, BackendTLS(ca=files.ca), "127.0.0.1")
        assert reply.body.endswith(b"ok")
        assert with_ip.sni == [None]

        without_ip = await start(("backend.test",))
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
            await get(without_ip.port, BackendTLS(ca=files.ca), "127.0.0.1")
        assert without_ip.sni == [None]

    async def test_verify_off_with_an_ip_host(self, start: Start) -> None:
        backend = await start(("anything.test",), issuer=other_ca())
        assert (await get(backend.port, BackendTLS(verify=False), "127.0.0.1")).body.endswith(b"ok")
        assert backend.sni == [None]

    async def test_client_certificate_is_presented(self, start: Start, files: Files) -> None:
        backend = await start(("backend.test",), client_ca=tlskit.ca().pem)
        spec = BackendTLS(ca=files.ca, cert=files.client_cert, key=files.client_key)
        assert (await get(backend.port, spec, "backend.test")).body.endswith(b"ok")
        [peer] = backend.peers
        assert dict(x[0] for x in peer["subject"])["commonName"] == "edgelb-proxy"

        # Without it the backend refuses: no request reaches it and no response comes back.
        reply: Reply | None = None
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            reply = await get(backend.port, BackendTLS(ca=files.ca), "backend.test")
        assert reply is None or not reply.body
        assert len(backend.peers) == 1

    async def test_tcp_mode_handshake_on_a_raw_socket(self, start: Start, files: Files) -> None:
        loop = asyncio.get_running_loop()
        backend = await start(("backend.test",))
        tls_sock = backend_tls.wrap(_connected_socket(backend.port), BackendTLS(ca=files.ca),
                                    "backend.test")
        try:
            await asyncio.wait_for(backend_tls.handshake(loop, tls_sock), 5)
            assert tls_sock.selected_alpn_protocol() is None  # no ALPN: TCP relays any protocol
            assert backend.sni == ["backend.test"]

            def exchange() -> bytes:
                tls_sock.settimeout(5)
                tls_sock.sendall(REQUEST)
                chunks = []
                while chunk := tls_sock.recv(4096):
                    chunks.append(chunk)
                return b"".join(chunks)

            assert (await asyncio.to_thread(exchange)).endswith(b"ok")
        finally:
            tls_sock.close()

        bad = backend_tls.wrap(_connected_socket(backend.port), BackendTLS(ca=files.other_ca),
                               "backend.test")
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.wait_for(backend_tls.handshake(loop, bad), 5)
        finally:
            bad.close()

    async def test_tcp_mode_handshake_timeout_leaves_nothing_registered(self, files: Files) -> None:
        loop = asyncio.get_running_loop()
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # never answers
        port = silent.sockets[0].getsockname()[1]
        spec = BackendTLS(ca=files.ca)
        tls_sock = backend_tls.wrap(_connected_socket(port), spec, "backend.test")
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(backend_tls.handshake(loop, tls_sock), 0.2)
            assert not loop.remove_reader(tls_sock.fileno())
            assert not loop.remove_writer(tls_sock.fileno())
        finally:
            tls_sock.close()
            silent.close()


@pytest.mark.uvloop
class TestOnUvloop(TestOnAsyncio):
    uvloop = True


# ---------------------------------------------------------------------------------------------
# Contexts


def test_context_defaults(files: Files) -> None:
    ctx = client_context(BackendTLS(ca=files.ca))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.cert_store_stats()["x509_ca"] == 1  # only the given CA, not the system store
    off = client_context(BackendTLS(verify=False))
    assert not off.check_hostname and off.verify_mode == ssl.CERT_NONE


def test_contexts_are_cached_per_spec_and_alpn(files: Files) -> None:
    a = client_context(BackendTLS(ca=files.ca, sni="x.test"))
    assert client_context(BackendTLS(ca=files.ca, sni="x.test")) is a  # equal spec, same ctx
    assert client_context(BackendTLS(ca=files.ca, sni="y.test")) is not a
    assert client_context(BackendTLS(ca=files.ca, sni="x.test"), alpn=()) is not a


def test_a_missing_system_store_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "none.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "none"))
    monkeypatch.setattr(backend_tls, "_warned_no_store", False)
    ctx = client_context(BackendTLS())
    assert ctx.cert_store_stats()["x509_ca"] == 0
    assert "no system CA certificates found" in caplog.text
    assert "give tls.ca" in caplog.text


def test_first_build_of_a_vanished_file_raises(tmp_path: Path) -> None:
    with pytest.raises(BackendTLSError, match="cannot read") as info:
        client_context(BackendTLS(ca=str(tmp_path / "gone.pem")))
    assert info.value.key == "ca"


async def test_a_rotated_ca_file_is_picked_up(start: Start, files: Files, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    monkeypatch.setattr(backend_tls, "_clock", lambda: now[0])
    ca_file = tmp_path / "ca.pem"

    def rotate(data: bytes) -> None:  # a new file swapped in, as a mounted Secret changes
        (tmp_path / "new.pem").write_bytes(data)
        os.replace(tmp_path / "new.pem", ca_file)

    rotate(other_ca().pem)
    spec = BackendTLS(ca=str(ca_file))
    backend = await start(("backend.test",))
    with pytest.raises(ssl.SSLCertVerificationError):
        await get(backend.port, spec, "backend.test")

    rotate(tlskit.ca().pem)
    now[0] += backend_tls.RECHECK_SECONDS / 2  # not looked at yet: still the old CA
    with pytest.raises(ssl.SSLCertVerificationError):
        await get(backend.port, spec, "backend.test")
    now[0] += backend_tls.RECHECK_SECONDS
    assert (await get(backend.port, spec, "backend.test")).body.endswith(b"ok")

    good = client_context(spec)
    rotate(b"not a certificate")  # a broken rotation keeps the working context
    now[0] += backend_tls.RECHECK_SECONDS * 2
    assert client_context(spec) is good
    assert "cannot be loaded" in caplog.text
    assert (await get(backend.port, spec, "backend.test")).body.endswith(b"ok")


# ---------------------------------------------------------------------------------------------
# Names


def test_server_hostname() -> None:
    assert server_hostname(BackendTLS(), "web-1.default.svc") == "web-1.default.svc"
    assert server_hostname(BackendTLS(), "10.0.0.7") == "10.0.0.7"  # verified, not sent
    assert server_hostname(BackendTLS(), "fd00::7") == "fd00::7"
    assert server_hostname(BackendTLS(sni="api.internal"), "10.0.0.7") == "api.internal"
    assert server_hostname(BackendTLS(verify=False, sni="a.test"), "b.test") == "a.test"



# ---------------------------------------------------------------------------------------------
# Parsing


def parse(value: Any) -> tuple[BackendTLS | None, list[str]]:
    return parse_backend_tls(value, "services.web.tls")


def parse_yaml(text: str) -> tuple[BackendTLS | None, list[str]]:
    return parse(yaml.safe_load(text)["tls"])


def test_parse_accepted_forms(files: Files) -> None:
    assert parse(None) == (None, [])
    assert parse_yaml("tls: false") == (None, [])
    assert parse_yaml("tls: true") == (BackendTLS(), [])
    assert parse_yaml("tls: {}") == (BackendTLS(), [])
    assert parse_yaml("tls: {verify: false}") == (BackendTLS(verify=False), [])
    assert parse_yaml("tls: {verify: false, sni: Api.Internal.}") == (
        BackendTLS(verify=False, sni="api.internal"), [])
    assert parse_yaml(f"tls: {{ca: '{files.ca}', sni: api.internal}}") == (
        BackendTLS(ca=files.ca, sni="api.internal"), [])
    spec, errors = parse({"ca": files.ca, "cert": files.client_cert, "key": files.client_key})
    assert errors == []
    assert spec == BackendTLS(ca=files.ca, cert=files.client_cert, key=files.client_key)


@pytest.mark.parametrize(("value", "expected"), [
    ("yes please", "services.web.tls: expected true, {verify: false} or {ca: ca.pem, "
                   "sni: api.internal}, got a string"),
    ([], "services.web.tls: expected true"),
    ({"verfy": False}, "services.web.tls.verfy: unknown key; did you mean 'verify'?"),
    ({"bogus": 1}, "services.web.tls.bogus: unknown key; valid keys: verify, ca, sni, cert, key"),
    ({True: 1}, "services.web.tls.true: YAML reads a bare on/off/yes/no/true/false key"),
    ({"verify": "no"}, "services.web.tls.verify: expected true or false, got a string"),
    ({"sni": ""}, "services.web.tls.sni: expected a host name, got an empty string"),
    ({"sni": 7}, "services.web.tls.sni: expected a host name, got a number"),
    ({"sni": "10.0.0.1"}, "services.web.tls.sni: 10.0.0.1 is an IP address, which cannot be "
                          "sent as SNI"),
    ({"sni": "bad name!"}, "services.web.tls.sni: 'bad name!' is not a valid host name"),
    ({"ca": ["a"]}, "services.web.tls.ca: expected the path of a PEM file, got a list"),
    ({"cert": "c.pem"}, "services.web.tls.key: key is required with cert"),
    ({"key": "k.pem"}, "services.web.tls.cert: cert is required with key"),
])
def test_parse_errors(value: Any, expected: str) -> None:
    spec, errors = parse(value)
    assert spec is None
    assert len(errors) == 1, errors
    assert errors[0].startswith(expected), errors


def test_parse_file_errors(files: Files) -> None:
    missing = str(files.dir / "missing.pem")
    cases = [
        ({"ca": missing}, "services.web.tls.ca: cannot read",
         "No such file or directory"),
        ({"ca": files.not_pem}, "services.web.tls.ca: ", "holds no PEM certificate"),
        ({"ca": files.ca, "verify": False}, "services.web.tls.ca: ",
         "remove ca, or remove verify: false"),
        ({"cert": missing, "key": files.client_key}, "services.web.tls.cert: cannot read",
         "client certificate"),
        ({"cert": files.client_cert, "key": missing}, "services.web.tls.key: cannot read",
         "key"),
        ({"cert": files.client_cert, "key": files.other_key}, "services.web.tls.key: ",
         "is not the key of"),
        ({"cert": files.client_cert, "key": files.encrypted_key}, "services.web.tls.key: ",
         "is encrypted; give the key without a passphrase"),
        ({"cert": files.not_pem, "key": files.client_key}, "services.web.tls.cert: ",
         "OpenSSL cannot load"),
    ]
    for value, prefix, fragment in cases:
        spec, errors = parse(value)
        assert spec is None, value
        assert len(errors) == 1 and errors[0].startswith(prefix) and fragment in errors[0], (
            value, errors)


def test_parse_reports_every_problem_at_once() -> None:
    spec, errors = parse({"verify": 1, "sni": "1.2.3.4", "cert": "c.pem", "colour": "red"})
    assert spec is None
    assert [e.split(":")[0] for e in errors] == [
        "services.web.tls.colour", "services.web.tls.verify", "services.web.tls.sni",
        "services.web.tls.key"]
