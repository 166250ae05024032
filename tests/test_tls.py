"""TLS termination core (edgelb/net/tls.py): loading, SNI selection, defaults and hot swap, checked
with real handshakes on 127.0.0.1 against certificates made at test time (tests/tlskit.py)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tlskit
import uvloop
from cryptography import x509

from edgelb.net import tls
from edgelb.net.tls import Certificate, CertificateStore, TLSConfigError

pytestmark = pytest.mark.timeout(30)


def make(names: list[str], serial: int, **kw: object) -> Certificate:
    cert_pem, key_pem = tlskit.ca().issue(names, serial=serial, **kw)  # type: ignore[arg-type]
    return tls.load_pem(cert_pem, key_pem, f"test cert {serial}")


@pytest.fixture(scope="module")
def certs() -> dict[str, Certificate]:
    return {
        "exact": make(["www.example.com"], 101),
        "wild": make(["*.example.com"], 102),
        "default": make(["default.test"], 103),
        "other": make(["api.example.org", "*.apps.example.org"], 104),
    }


@pytest.fixture
def store(certs: dict[str, Certificate]) -> CertificateStore:
    s = CertificateStore()
    s.set([certs["exact"], certs["wild"], certs["other"]], certs["default"])
    return s


# ---------------------------------------------------------------------------------------------
# Loading


def test_load_pem_reads_names_serial_and_expiry() -> None:
    not_after = dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    cert_pem, key_pem = tlskit.ca().issue(["WWW.Example.COM", "*.Example.com"],
                                          serial=2**100 + 7, not_after=not_after)
    cert = tls.load_pem(cert_pem + tlskit.ca().pem, key_pem, "chain")  # leaf, then the CA
    assert cert.names == ("www.example.com", "*.example.com")
    assert cert.serial == 2**100 + 7
    assert cert.not_after == not_after
    assert not cert.expired
    assert cert.source == "chain"
    assert isinstance(cert.context, ssl.SSLContext)
    info = cert.info()
    assert info["not_after"] == "2031-05-06T07:08:09Z"
    assert info["serial"] == format(2**100 + 7, "x")
    assert "PRIVATE" not in repr(cert) and "key_pem" not in repr(cert)  # no key in logs


@pytest.mark.parametrize("year", [2030, 2049, 2050, 2100])
def test_der_reading_agrees_with_openssl_and_cryptography(year: int, tmp_path: Path) -> None:
    """UTCTime until 2049, GeneralizedTime from 2050; IP SANs are not DNS names."""
    not_after = dt.datetime(year, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    cert_pem, key_pem = tlskit.ca().issue(["a.test", "b.test"], serial=year,
                                          not_after=not_after, ips=["127.0.0.1"])
    cert = tls.load_pem(cert_pem, key_pem, "x")
    theirs = x509.load_pem_x509_certificate(cert_pem)
    assert cert.not_after == theirs.not_valid_after_utc
    assert cert.serial == theirs.serial_number
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is not None:  # CPython's private decoder, as a second opinion
        path = tmp_path / "c.pem"
        path.write_bytes(cert_pem)
        decoded = decode(str(path))
        dns = [v for k, v in decoded["subjectAltName"] if k == "DNS"]
        assert list(cert.names) == dns
        assert int(decoded["serialNumber"], 16) == cert.serial


def test_rsa_certificate_loads() -> None:
    cert = make(["rsa.test"], 5, leaf_key=tlskit.rsa_key())
    assert cert.names == ("rsa.test",)


def test_expired_certificate_loads_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    with caplog.at_level(logging.WARNING, "edgelb.net.tls"):
        cert = make(["old.test"], 7, not_before=past - dt.timedelta(days=1), not_after=past)
    assert cert.expired
    assert "old.test" in caplog.text and "expired" in caplog.text and "renew" in caplog.text


def pem_error(cert_pem: bytes, key_pem: bytes, source: str = "src-x") -> str:
    with pytest.raises(TLSConfigError) as info:
        tls.load_pem(cert_pem, key_pem, source)
    assert info.value.source == source
    msg = str(info.value)
    assert msg.startswith(f"{source}: ")
    return msg


def test_bad_inputs_are_named_and_explained() -> None:
    cert_pem, key_pem = tlskit.ca().issue(["good.test"], serial=9)
    assert "not PEM" in pem_error(b"hello", key_pem)
    assert "swapped" in pem_error(key_pem, cert_pem)
    assert "not a PEM private key" in pem_error(cert_pem, b"nope")
    broken = cert_pem.replace(cert_pem.splitlines()[3], b"@@@@")
    assert "not a valid X.509" in pem_error(broken, key_pem)
    garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    assert "not a valid X.509" in pem_error(garbage, key_pem)


def test_mismatched_key_is_refused() -> None:
    cert_pem, _ = tlskit.ca().issue(["good.test"], serial=10)
    other = tlskit.key_pem(tlskit.key(2))
    msg = pem_error(cert_pem, other)
    assert "does not match" in msg


def test_certificate_without_dns_san_is_refused() -> None:
    cert_pem, key_pem = tlskit.ca().issue([], serial=11, cn="only-cn.test")
    assert "subjectAltName" in pem_error(cert_pem, key_pem)
    cert_pem, key_pem = tlskit.ca().issue([], serial=12, ips=["10.0.0.1"])
    assert "subjectAltName" in pem_error(cert_pem, key_pem)


def test_encrypted_key_is_refused_without_prompting() -> None:
    cert_pem, _ = tlskit.ca().issue(["good.test"], serial=13)
    encrypted = tlskit.key_pem(tlskit.key(1), password=b"secret")
    assert "encrypted" in pem_error(cert_pem, encrypted)


def test_loading_without_memfd_uses_a_private_temp_dir(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delattr(tls.os, "memfd_create", raising=False)
    monkeypatch.setattr(tls.tempfile, "tempdir", str(tmp_path))
    made: list[str] = []
    real = tls.tempfile.TemporaryDirectory

    def spy(*args: object, **kwargs: object) -> object:
        d = real(*args, **kwargs)  # type: ignore[call-overload]
        made.append(d.name)
        return d

    monkeypatch.setattr(tls.tempfile, "TemporaryDirectory", spy)
    cert = make(["fallback.test"], 17)
    assert cert.names == ("fallback.test",)
    assert len(made) == 2 and all(Path(d).parent == tmp_path for d in made)
    assert list(tmp_path.iterdir()) == []  # the key was not left behind


def test_runtime_does_not_need_cryptography(tmp_path: Path) -> None:
    cert_pem, key_pem = tlskit.ca().issue(["nocrypto.test"], serial=18)
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from edgelb.net import tls\n"
        "c = tls.load_files(sys.argv[1], sys.argv[2])\n"
        "assert c.names == ('nocrypto.test',) and c.serial == 18, c\n"
        "assert not any(m.startswith('cryptography') and sys.modules[m] for m in sys.modules)\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.pem"),
                           str(tmp_path / "k.pem")], cwd=root, capture_output=True, text=True,
                          timeout=20)
    assert proc.returncode == 0, proc.stderr


def test_load_files(tmp_path: Path) -> None:
    cert_pem, key_pem = tlskit.ca().issue(["files.test"], serial=14)
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(key_pem)
    (tmp_path / "both.pem").write_bytes(cert_pem + key_pem)
    crt, key = str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")
    cert = tls.load_files(crt, key)
    assert cert.names == ("files.test",) and crt in cert.source and key in cert.source
    both = str(tmp_path / "both.pem")
    assert tls.load_files(both, both).serial == 14

    missing = str(tmp_path / "nope.key")
    with pytest.raises(TLSConfigError, match=r"nope\.key: cannot read the key file"):
        tls.load_files(crt, missing)
    (tmp_path / "other.key").write_bytes(tlskit.key_pem(tlskit.key(2)))
    with pytest.raises(TLSConfigError) as info:
        tls.load_files(crt, str(tmp_path / "other.key"))
    assert "other.key does not match" in str(info.value) and "tls.crt" in str(info.value)


def test_load_secret() -> None:
    cert_pem, key_pem = tlskit.ca().issue(["k8s.test"], serial=15)
    cert = tls.load_secret(tlskit.secret("web", "web-tls", cert_pem, key_pem))
    assert cert.names == ("k8s.test",)
    assert cert.source == "Secret web/web-tls"


def secret_error(obj: dict) -> str:
    with pytest.raises(TLSConfigError) as info:
        tls.load_secret(obj)
    msg = str(info.value)
    assert msg.startswith("Secret ns1/s1: ")
    assert info.value.source == "Secret ns1/s1"
    return msg


def test_bad_secrets_are_named() -> None:
    cert_pem, key_pem = tlskit.ca().issue(["k8s.test"], serial=16)
    good = tlskit.secret("ns1", "s1", cert_pem, key_pem)
    assert "type 'Opaque'" in secret_error({**good, "type": "Opaque"})
    assert "data.tls.key is missing" in secret_error(
        {**good, "data": {"tls.crt": good["data"]["tls.crt"]}})
    assert "data.tls.crt is not valid base64" in secret_error(
        {**good, "data": {**good["data"], "tls.crt": "!!not base64!!"}})
    mismatched = tlskit.secret("ns1", "s1", cert_pem, tlskit.key_pem(tlskit.key(2)))
    msg = secret_error(mismatched)
    assert "tls.key does not match tls.crt" in msg
    assert "kubectl create secret tls" in secret_error({**good, "data": {}})


# ---------------------------------------------------------------------------------------------
# Selection and the context's defaults (no sockets)


def test_match_exact_then_one_label_wildcard_then_default(
        store: CertificateStore, certs: dict[str, Certificate]) -> None:
    assert store.match("www.example.com") is certs["exact"]
    assert store.match("WWW.Example.COM.") is certs["exact"]
    assert store.match("a.example.com") is certs["wild"]
    assert store.match("b.a.example.com") is certs["default"]
    assert store.match("example.com") is certs["default"]
    assert store.match("x.apps.example.org") is certs["other"]
    assert store.match("api.example.org") is certs["other"]
    assert store.match("unknown.test") is certs["default"]
    assert store.match(None) is certs["default"]
    store.set([certs["exact"]])
    assert store.match(None) is None
    assert store.match("a.example.com") is None
    assert store.match("www.example.com") is certs["exact"]


def test_set_replaces_everything_and_pins_hosts(certs: dict[str, Certificate]) -> None:
    store = CertificateStore()
    assert store.match("www.example.com") is None and store.summary() == []
    store.set([certs["wild"]], hosts={"www.example.com": certs["default"],
                                      "*.example.org": certs["other"], "": certs["exact"]})
    assert store.match("www.example.com") is certs["default"]  # pinned wins over the wildcard
    assert store.match("b.example.com") is certs["wild"]
    assert store.match("z.example.org") is certs["other"]
    assert store.match(None) is None  # "" is not a default; the caller passes `default`
    store.set([certs["other"]])
    assert store.match("www.example.com") is None
    assert [c.serial for c in store.certificates()] == [104]


def test_two_certificates_for_one_name_the_later_expiry_wins() -> None:
    now = dt.datetime.now(dt.UTC)
    old = make(["dup.test"], 21, not_after=now + dt.timedelta(days=5))
    new = make(["dup.test"], 22, not_after=now + dt.timedelta(days=90))
    store = CertificateStore()
    store.set([new, old])
    assert store.match("dup.test") is new
    store.set([old, new])
    assert store.match("dup.test") is new


def test_summary(store: CertificateStore, certs: dict[str, Certificate]) -> None:
    rows = {row["serial"]: row for row in store.summary()}
    assert set(rows) == {"65", "66", "67", "68"}
    assert rows["67"]["default"] is True and rows["65"]["default"] is False
    assert rows["68"]["names"] == ["api.example.org", "*.apps.example.org"]
    assert rows["65"]["source"] == "test cert 101"
    assert rows["65"]["not_after"].endswith("Z") and rows["65"]["expired"] is False


def test_context_defaults(store: CertificateStore, certs: dict[str, Certificate]) -> None:
    for ctx in (store.server_context(), certs["exact"].context):
        assert ctx.protocol == ssl.PROTOCOL_TLS_SERVER
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.options & ssl.OP_NO_RENEGOTIATION
        assert not ctx.options & ssl.OP_NO_TICKET
        for c in ctx.get_ciphers():
            if c["protocol"] == "TLSv1.2":
                assert c["kea"] == "kx-ecdhe" and c["aead"], c["name"]
    assert store.server_context() is store.server_context()


# ---------------------------------------------------------------------------------------------
# Real handshakes


class Handshakes:
    """Run on both loops (the subclasses below): the default asyncio loop, and uvloop, which the
    proxy runs on and which has its own TLS transport."""

    loop_kind = "asyncio"

    async def test_runs_on_the_intended_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, uvloop.Loop) == (self.loop_kind == "uvloop")

    async def test_sni_selects_exact_wildcard_or_default(self, store: CertificateStore) -> None:
        server, port = await tlskit.serve(store.server_context())
        try:
            # The verifying client checks the host name: the right certificate was served.
            got = await tlskit.fetch(port, "www.example.com")
            assert got.serial == 101 and got.body.endswith(b"\r\n\r\nok")
            assert (await tlskit.fetch(port, "a.example.com")).serial == 102
            assert (await tlskit.fetch(port, "x.apps.example.org")).serial == 104
            plain = tlskit.client_context(verify=False)
            for name in ("b.a.example.com", "example.com", "unknown.test", None):
                assert (await tlskit.fetch(port, name, plain)).serial == 103, name
            assert store.handshakes == {"exact": 1, "wildcard": 2, "default": 3, "no_sni": 1,
                                        "unrecognized": 0}
        finally:
            server.close()
            await server.wait_closed()

    async def test_no_default_fails_the_handshake(self, certs: dict[str, Certificate]) -> None:
        store = CertificateStore()
        store.set([certs["exact"]])
        server, port = await tlskit.serve(store.server_context())
        plain = tlskit.client_context(verify=False)
        try:
            for name in (None, "unknown.test"):
                with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                    await tlskit.fetch(port, name, plain)
            assert store.handshakes["unrecognized"] == 2
            assert (await tlskit.fetch(port, "www.example.com")).serial == 101
        finally:
            server.close()
            await server.wait_closed()

    @pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
    async def test_tls_1_1_client_is_refused(self, store: CertificateStore,
                                             certs: dict[str, Certificate],
                                             tmp_path: Path) -> None:
        # Control: this client can speak TLS 1.1 to a server that allows it.
        lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        lax.minimum_version = ssl.TLSVersion.TLSv1
        lax.set_ciphers("DEFAULT:@SECLEVEL=0")
        (tmp_path / "c.pem").write_bytes(certs["exact"].cert_pem)
        (tmp_path / "k.pem").write_bytes(certs["exact"].key_pem)
        lax.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
        server, port = await tlskit.serve(lax)
        try:
            got = await tlskit.fetch(port, None, old_client(ssl.TLSVersion.TLSv1_1))
        except ssl.SSLError as e:
            pytest.skip(f"this OpenSSL cannot speak TLS 1.1 at all: {e}")
        finally:
            server.close()
            await server.wait_closed()
        assert got.version == "TLSv1.1"

        server, port = await tlskit.serve(store.server_context())
        try:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await tlskit.fetch(port, None, old_client(ssl.TLSVersion.TLSv1_1))
            got = await tlskit.fetch(port, None, old_client(ssl.TLSVersion.TLSv1_2))
            assert got.version == "TLSv1.2" and got.serial == 103
        finally:
            server.close()
            await server.wait_closed()

    async def test_alpn_and_tls12_cipher(self, store: CertificateStore) -> None:
        server, port = await tlskit.serve(store.server_context())
        try:
            ctx = tlskit.client_context()
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            got = await tlskit.fetch(port, "www.example.com", ctx)
            assert got.alpn == "h2" and got.version == "TLSv1.3"  # edgelb/h2 serves HTTP/2

            only_h1 = tlskit.client_context()
            only_h1.set_alpn_protocols(["http/1.1"])
            assert (await tlskit.fetch(port, "www.example.com", only_h1)).alpn == "http/1.1"
            only_h2c = tlskit.client_context()
            only_h2c.set_alpn_protocols(["h2c"])  # not a TLS protocol: nothing agreed
            assert (await tlskit.fetch(port, "www.example.com", only_h2c)).alpn is None

            tls12 = tlskit.client_context()
            tls12.maximum_version = ssl.TLSVersion.TLSv1_2
            tls12.set_ciphers("ALL:@SECLEVEL=0")  # offer everything; the server must pick well
            tls12.set_alpn_protocols(["http/1.1"])
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=tls12, server_hostname="www.example.com")
            obj = writer.get_extra_info("ssl_object")
            name, version, _ = obj.cipher()
            writer.close()
            assert version == "TLSv1.2" and name.startswith("ECDHE-")
            assert "GCM" in name or "CHACHA20" in name
            assert obj.selected_alpn_protocol() == "http/1.1"
        finally:
            server.close()
            await server.wait_closed()

    async def test_hot_swap_under_handshakes(self) -> None:
        """Rotate the certificate for one name during 200 sequential handshakes and a concurrent
        burst: no handshake fails, each sees the serial current when it began, and a connection
        established before the swap keeps its certificate and keeps working."""
        old, new = make(["rot.test"], 41), make(["rot.test"], 42)
        store = CertificateStore()
        store.set([old], old)
        server, port = await tlskit.serve(store.server_context())
        try:
            # A connection established before the swap.
            ctx = tlskit.client_context()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="rot.test")
            kept_serial, _ = tlskit.peer(writer.get_extra_info("ssl_object"))

            seen = []
            for i in range(200):
                if i == 100:
                    store.set([new], new)
                seen.append((await tlskit.fetch(port, "rot.test", ctx)).serial)
            assert seen == [41] * 100 + [42] * 100

            async def one() -> int:
                return (await tlskit.fetch(port, "rot.test", ctx)).serial

            async def swap_midway() -> None:
                await asyncio.sleep(0)
                for _ in range(5):
                    store.set([old], old)
                    await asyncio.sleep(0.002)
                    store.set([new], new)
                    await asyncio.sleep(0.002)

            results = await asyncio.gather(*(one() for _ in range(40)), swap_midway())
            serials = results[:40]
            assert all(s in (41, 42) for s in serials)  # every handshake succeeded
            assert (await tlskit.fetch(port, "rot.test", ctx)).serial == 42

            assert kept_serial == 41
            writer.write(b"GET / HTTP/1.1\r\nHost: rot.test\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 5)).endswith(b"\r\n\r\nok")
            writer.close()
            assert store.handshakes["unrecognized"] == 0
        finally:
            server.close()
            await server.wait_closed()


class TestHandshakesAsyncio(Handshakes):
    pass


@pytest.mark.uvloop
class TestHandshakesUvloop(Handshakes):
    loop_kind = "uvloop"


def blocking_handshake_error(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                             server_hostname: str | None) -> ssl.SSLError:
    """The client's error against a blocking server. asyncio and uvloop drop a connection whose
    handshake failed without flushing the alert; a blocking server sends it."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        conn, _ = listener.accept()
        with contextlib.suppress(ssl.SSLError, OSError), conn:
            server_ctx.wrap_socket(conn, server_side=True).close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with pytest.raises(ssl.SSLError) as info:
                client_ctx.wrap_socket(raw, server_hostname=server_hostname)
        return info.value
    finally:
        t.join(5)
        listener.close()


def test_no_default_sends_unrecognized_name_alert(certs: dict[str, Certificate]) -> None:
    store = CertificateStore()
    store.set([certs["exact"]])
    plain = tlskit.client_context(verify=False)
    e = blocking_handshake_error(store.server_context(), plain, "unknown.test")
    assert "UNRECOGNIZED_NAME" in str(e)


def old_client(version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that can speak TLS 1.0 up to `version` (old versions need security level 0)."""
    ctx = tlskit.client_context(verify=False)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = version
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_1_is_refused_with_a_protocol_version_alert(store: CertificateStore) -> None:
    e = blocking_handshake_error(store.server_context(), old_client(ssl.TLSVersion.TLSv1_1),
                                 None)
    assert "PROTOCOL_VERSION" in str(e).upper()


async def test_rsa_certificate_handshake(certs: dict[str, Certificate]) -> None:
    rsa_cert = make(["rsa.test"], 31, leaf_key=tlskit.rsa_key())
    store = CertificateStore()
    store.set([rsa_cert, certs["exact"]])
    server, port = await tlskit.serve(store.server_context())
    try:
        ctx = tlskit.client_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        assert (await tlskit.fetch(port, "rsa.test", ctx)).serial == 31
        assert (await tlskit.fetch(port, "www.example.com", ctx)).serial == 101
    finally:
        server.close()
        await server.wait_closed()


