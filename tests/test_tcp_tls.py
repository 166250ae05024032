"""TCP mode with TLS (edgelb.tcp.tls): TLS terminated on a static tcp port, TLS to the
backends (`backend_tls`), or both. Real sockets on 127.0.0.1, certificates from tlskit, the
proxy run through the Runtime (and once through the App with a config file)."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import random
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tlskit
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from httpkit import HOST, free_port, within

import edgelb.tcp.tls as tcp_tls
from edgelb.control.runtime import Runtime
from edgelb.net.backend_tls import BackendTLS
from edgelb.ops.app import App
from edgelb.pool import ServiceState
from edgelb.tcp.listener import TcpListener, _Connection
from watchers.model import Address, Backend, Policy, Service, Snapshot

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

NAME = "db.example.com"  # the name on the proxy's certificate
BACKEND_NAME = "backend.internal"  # the name on the backends' certificates


# -- certificates ------------------------------------------------------------------------------


@functools.cache
def other_ca() -> tlskit.CA:
    """A second CA, trusted by nobody here: certificates it signs fail verification."""
    k = tlskit.key(7)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "some other CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(k.public_key()).serial_number(2)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(k, hashes.SHA256())
    )
    return tlskit.CA(cert, k)


def write_pair(directory: Path, stem: str, names: list[str], serial: int | None = None,
               ca: tlskit.CA | None = None) -> tuple[str, str]:
    cert, key = (ca or tlskit.ca()).issue(names, serial=serial)
    (directory / f"{stem}.crt").write_bytes(cert)
    (directory / f"{stem}.key").write_bytes(key)
    return str(directory / f"{stem}.crt"), str(directory / f"{stem}.key")


def backend_context(directory: Path, ca: tlskit.CA | None = None,
                    names: list[str] | None = None) -> ssl.SSLContext:
    stem = f"backend-{random.randrange(1 << 30)}"
    cert, key = write_pair(directory, stem, names or [BACKEND_NAME], ca=ca)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def ca_file(directory: Path) -> str:
    path = directory / "ca.pem"
    path.write_bytes(tlskit.ca().pem)
    return str(path)


# -- backends and clients ------------------------------------------------------------------------


class Recorder:
    """A backend (plain, or TLS with `ctx`) that records what each connection sent and whether
    it ended cleanly, and echoes every byte back (after `greeting`, if any)."""

    def __init__(self, ctx: ssl.SSLContext | None = None, *, greeting: bytes = b"",
                 echo: bool = True, close_after_greeting: bool = False) -> None:
        self.ctx = ctx
        self.greeting = greeting
        self.echo = echo
        self.close_after_greeting = close_after_greeting
        self.received: list[bytearray] = []
        self.ended: list[asyncio.Future[bool]] = []  # True: EOF seen, False: reset/error
        self.sni: list[str | None] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        if ctx is not None:
            ctx.sni_callback = lambda _obj, name, _ctx: self.sni.append(name)

    async def start(self) -> Recorder:
        self._server = await asyncio.start_server(self._handle, HOST, 0, ssl=self.ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> Recorder:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def accepted(self) -> int:
        return len(self.received)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        ended = asyncio.get_running_loop().create_future()
        self.received.append(got)
        self.ended.append(ended)
        try:
            if self.greeting:
                writer.write(self.greeting)
                await writer.drain()
                if self.close_after_greeting:
                    writer.close()
                    await writer.wait_closed()
            while data := await reader.read(65536):
                got += data
                if self.echo:
                    writer.write(data)
                    await writer.drain()
            ended.set_result(True)
        except (ConnectionError, ssl.SSLError, OSError):
            ended.set_result(False)
        finally:
            if not ended.done():
                ended.set_result(False)
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


def client_ctx() -> ssl.SSLContext:
    return tlskit.client_context()


async def tls_connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await within(asyncio.open_connection(HOST, port, ssl=client_ctx(),
                                                server_hostname=NAME))


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    with suppress(ConnectionError, ssl.SSLError):
        while data := await reader.read(65536):
            chunks.append(data)
    return b"".join(chunks)


async def eventually(cond: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def assert_released(service: ServiceState) -> None:
    for b in service.pool.all_backends():
        assert b.inflight == 0, b.key
        assert b.open_connections == 0, b.key


# -- the proxy ---------------------------------------------------------------------------------


@dataclass
class Proxy:
    rt: Runtime
    port: int
    listen: Address

    @property
    def listener(self) -> TcpListener:
        return self.rt.listeners[str(self.listen)]

    @property
    def service(self) -> ServiceState:
        return self.rt.services["db"]

    def conns(self) -> list[Any]:
        return list(self.listener.clients)


@asynccontextmanager
async def tcp_proxy(tmp_path: Path, ports: list[int], *, client_tls: bool = True,
                    serial: int = 501, sweeper: bool = False, **policy: Any
                    ) -> AsyncIterator[Proxy]:
    tls = write_pair(tmp_path, "proxy", [NAME], serial=serial) if client_tls else None
    rt = Runtime(loop=asyncio.get_running_loop())
    listen = Address(HOST, free_port())
    svc = Service("db", mode="tcp", listen=listen, tls=tls,
                  backends=tuple(Backend(HOST, p) for p in ports), policy=Policy(**policy))
    await rt.apply(Snapshot("file", (svc,)))
    if sweeper:
        rt.start_sweeper()
    try:
        yield Proxy(rt, listen.port, listen)
    finally:
        await rt.shutdown(0.5)


# -- (a) TLS terminated on a tcp static port ---------------------------------------------------


async def test_tls_client_plain_backend_relays_plaintext_and_counts(tmp_path: Path) -> None:
    async with Recorder() as backend:
        async with tcp_proxy(tmp_path, [backend.port], serial=4242) as p:
            assert p.listener.kind == "tcp" and p.listener.ssl is not None
            reader, writer = await tls_connect(p.port)
            served = int(writer.get_extra_info("ssl_object").getpeercert()["serialNumber"], 16)
            assert served == 4242  # the service's certificate, verified against its name
            sent = bytearray()
            for i in range(20):
                msg = f"row {i};".encode() * (i + 1)
                writer.write(msg)
                sent += msg
                assert await within(reader.readexactly(len(msg))) == msg
            assert backend.received == [sent]  # exactly the plaintext, on one connection
            (conn,) = p.conns()
            assert isinstance(conn, tcp_tls.TlsConnection)
            b = p.service.pool.backends[0]
            assert b.open_connections == 1 and b.inflight == 1
            writer.close()
            await eventually(lambda: p.listener.connections == 0)
            assert await within(backend.ended[0]) is True  # a clean end, not a reset
            n = len(sent)
            assert p.service.bytes_in == n == p.service.bytes_out
            assert b.bytes_out == n == b.bytes_in
            assert b.connections_total == 1 and p.service.tcp_connections == 1
            assert_released(p.service)
            assert p.listener.refused == {}


async def test_a_tcp_tls_port_negotiates_no_alpn(tmp_path: Path) -> None:
    """The relayed protocol is the backend's: a client offering h2 must not be told
    http/1.1 (an http static port says h2: edgelb speaks it)."""
    async with Recorder() as backend:
        async with tcp_proxy(tmp_path, [backend.port]) as p:
            ctx = client_ctx()
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            _, writer = await within(asyncio.open_connection(HOST, p.port, ssl=ctx,
                                                             server_hostname=NAME))
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
            writer.close()
            http = Service("web", listen=Address(HOST, free_port()), tls=p.service.spec.tls,
                           backends=(Backend(HOST, backend.port),))
            await p.rt.apply(Snapshot("file", (p.service.spec, http)))
            assert http.listen is not None
            _, writer = await within(asyncio.open_connection(HOST, http.listen.port, ssl=ctx,
                                                             server_hostname=NAME))
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
            writer.close()


async def test_plain_both_sides_keeps_the_splice_relay(tmp_path: Path) -> None:
    async with Recorder() as backend:
        async with tcp_proxy(tmp_path, [backend.port], client_tls=False) as p:
            reader, writer = await asyncio.open_connection(HOST, p.port)
            writer.write(b"plain")
            assert await within(reader.readexactly(5)) == b"plain"
            (conn,) = p.conns()
            assert type(conn) is _Connection
            writer.close()
            await eventually(lambda: p.listener.connections == 0)


async def test_tcp_tls_service_from_a_config_file(tmp_path: Path) -> None:
    backend = await Recorder().start()
    cert, key = write_pair(tmp_path, "db", [NAME], serial=777)
    port = free_port()
    path = tmp_path / "edgelb.yaml"
    path.write_text(
        f"admin: {{listen: {HOST}:{free_port()}}}\n"
        "services:\n"
        "  - name: db\n"
        "    mode: tcp\n"
        f"    listen: {HOST}:{port}\n"
        f"    tls: {{cert: {cert}, key: {key}}}\n"
        f"    backends: [{{address: {HOST}:{backend.port}}}]\n"
    )
    app = App(path)
    await within(app.start(), 10)
    try:
        reader, writer = await tls_connect(port)
        assert int(writer.get_extra_info("ssl_object").getpeercert()["serialNumber"], 16) == 777
        writer.write(b"SELECT 1;")
        assert await within(reader.readexactly(9)) == b"SELECT 1;"
        assert backend.received == [bytearray(b"SELECT 1;")]
        writer.close()
    finally:
        await app.stop()
        await backend.stop()


async def test_a_new_certificate_is_served_to_new_connections_only(tmp_path: Path) -> None:
    """The listener keeps its context; a swapped certificate applies from the next handshake
    (here by re-applying the service with new files, as a config change would)."""
    async with Recorder() as backend:
        async with tcp_proxy(tmp_path, [backend.port], serial=1) as p:
            listener = p.listener
            r1, w1 = await tls_connect(p.port)
            assert int(w1.get_extra_info("ssl_object").getpeercert()["serialNumber"], 16) == 1
            (tmp_path / "new").mkdir()
            tls = write_pair(tmp_path / "new", "proxy", [NAME], serial=2)
            svc = p.rt.snapshots["file"].services[0]
            await p.rt.apply(Snapshot("file", (Service(
                svc.name, mode="tcp", listen=svc.listen, tls=tls, backends=svc.backends),)))
            assert p.listener is listener  # not rebound
            r2, w2 = await tls_connect(p.port)
            assert int(w2.get_extra_info("ssl_object").getpeercert()["serialNumber"], 16) == 2
            for r, w, msg in ((r1, w1, b"old"), (r2, w2, b"new")):  # both keep working
                w.write(msg)
                assert await within(r.readexactly(3)) == msg
            w1.close()
            w2.close()


# -- (b) volume and flow control ---------------------------------------------------------------


async def test_large_transfer_both_ways_with_bounded_buffers(tmp_path: Path) -> None:
    """8 MiB each way at once through a TLS client side, checksummed; the bytes the proxy's
    transports hold stay below a bound all along."""
    size = 8 * 1024 * 1024
    rng = random.Random(5)
    up_data, down_data = rng.randbytes(size), rng.randbytes(size)
    results: dict[str, str] = {}
    backend_sock = socket.create_server((HOST, 0))
    ctx = client_ctx()

    def pump(sock: socket.socket | ssl.SSLSocket, payload: bytes, name: str) -> None:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        digest, got = hashlib.sha256(), 0
        while got < size:
            data = sock.recv(1 << 20)
            assert data, f"{name}: EOF after {got} bytes"
            digest.update(data)
            got += len(data)
        sender.join()
        results[name] = digest.hexdigest()

    def backend() -> None:
        conn, _ = backend_sock.accept()
        with conn:
            pump(conn, down_data, "backend")

    def client(port: int) -> None:
        raw = socket.create_connection((HOST, port))
        with ctx.wrap_socket(raw, server_hostname=NAME) as tls:
            pump(tls, up_data, "client")

    try:
        async with tcp_proxy(tmp_path, [backend_sock.getsockname()[1]]) as p:
            threads = [threading.Thread(target=backend),
                       threading.Thread(target=client, args=(p.port,))]
            for t in threads:
                t.start()
            peak = 0
            while any(t.is_alive() for t in threads):
                peak = max([peak, *(c.buffered() for c in p.conns()
                                    if isinstance(c, tcp_tls.TlsConnection))])
                await asyncio.sleep(0.002)
            await eventually(lambda: p.listener.connections == 0)
            assert p.service.bytes_in == size == p.service.bytes_out
            b = p.service.pool.backends[0]
            assert b.bytes_in == size == b.bytes_out
            assert_released(p.service)
    finally:
        backend_sock.close()
    assert results == {"backend": hashlib.sha256(up_data).hexdigest(),
                       "client": hashlib.sha256(down_data).hexdigest()}
    # Both transports together: about a write high-water mark plus one read chunk each side
    # (uvloop: 512 KiB for TLS, 64 KiB plain, 256 KiB reads); far below the 16 MiB moved.
    assert 0 < peak <= 2 * 1024 * 1024, peak


async def test_a_client_that_does_not_read_holds_the_backend_back(tmp_path: Path) -> None:
    total = 64 * 1024 * 1024
    written = 0
    done = asyncio.Event()

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        block = b"x" * (1 << 20)
        with suppress(ConnectionError):
            for _ in range(total >> 20):
                writer.write(block)
                await writer.drain()
                written += len(block)
        done.set()
        writer.close()

    server = await asyncio.start_server(firehose, HOST, 0)
    try:
        async with tcp_proxy(tmp_path, [server.sockets[0].getsockname()[1]]) as p:
            raw = socket.create_connection((HOST, p.port))
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            raw.setblocking(False)
            tls = TlsPipe(raw, client_ctx(), NAME)
            await within(tls.handshake())
            b = p.service.pool.backends[0]
            await eventually(lambda: b.bytes_in > 0)
            last = -1
            while b.bytes_in != last:  # until the transfer stalls on the client not reading
                last = b.bytes_in
                await asyncio.sleep(0.2)
            (conn,) = p.conns()
            held = conn.buffered()
            assert held <= 1024 * 1024, held
            assert b.bytes_in < total // 2 and not done.is_set()  # the backend was held back
            got = await within(tls.read_exactly(total), 30)
            assert got == total
            raw.close()
            await eventually(lambda: p.listener.connections == 0)
            assert p.service.bytes_out == total
    finally:
        server.close()


class TlsPipe:
    """A TLS client over a non-blocking socket that reads only when told (the test's slow
    reader): an ssl.SSLObject over memory BIOs, bytes moved with the loop's sock_* calls."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, name: str) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=name)
        self.loop = asyncio.get_running_loop()

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self.loop.sock_recv(self.sock, 65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                self.incoming.write(data)
            else:
                await self._flush()
                return

    async def read_exactly(self, n: int) -> int:
        """Read and count up to `n` plaintext bytes; fewer when the stream ends first."""
        got = 0
        while got < n:
            try:
                got += len(self.obj.read(1 << 20))
            except ssl.SSLWantReadError:
                data = await self.loop.sock_recv(self.sock, 1 << 20)
                if not data:
                    break
                self.incoming.write(data)
        return got


# -- (c) TLS to the backends -------------------------------------------------------------------


async def test_backend_tls_verified_with_the_right_ca_and_sni(tmp_path: Path) -> None:
    backend = await Recorder(backend_context(tmp_path)).start()
    spec = BackendTLS(ca=ca_file(tmp_path), sni=BACKEND_NAME)
    try:
        async with tcp_proxy(tmp_path, [backend.port], client_tls=False,
                             backend_tls=spec) as p:
            reader, writer = await asyncio.open_connection(HOST, p.port)
            writer.write(b"hello over tls")
            assert await within(reader.readexactly(14)) == b"hello over tls"
            assert backend.received == [bytearray(b"hello over tls")]
            assert backend.sni == [BACKEND_NAME]
            (conn,) = p.conns()
            assert isinstance(conn, tcp_tls.TlsConnection)
            b = p.service.pool.backends[0]
            assert b.failures == 0 and b.connections_total == 1
            writer.close()
            await eventually(lambda: p.listener.connections == 0)
            assert b.bytes_out == 14 == b.bytes_in
            assert_released(p.service)
    finally:
        await backend.stop()


async def test_backend_tls_by_ip_address_without_sni(tmp_path: Path) -> None:
    # a certificate for the IP the backend is reached at (no sni configured)
    pem, key_pem = tlskit.ca().issue([BACKEND_NAME], ips=[HOST])
    (tmp_path / "ip.crt").write_bytes(pem)
    (tmp_path / "ip.key").write_bytes(key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "ip.crt", tmp_path / "ip.key")
    async with Recorder(ctx) as backend:
        async with tcp_proxy(tmp_path, [backend.port], client_tls=False,
                             backend_tls=BackendTLS(ca=ca_file(tmp_path))) as p:
            reader, writer = await asyncio.open_connection(HOST, p.port)
            writer.write(b"ip")
            assert await within(reader.readexactly(2)) == b"ip"
            assert backend.sni == [None]  # an IP is verified, not sent as SNI
            writer.close()


async def test_wrong_ca_is_a_connect_failure_retried_on_another_backend(tmp_path: Path) -> None:
    bad = await Recorder(backend_context(tmp_path, ca=other_ca())).start()
    good = await Recorder(backend_context(tmp_path)).start()
    spec = BackendTLS(ca=ca_file(tmp_path), sni=BACKEND_NAME)
    try:
        # round-robin with equal weights starts with the first backend: the bad one
        async with tcp_proxy(tmp_path, [bad.port, good.port], client_tls=False,
                             backend_tls=spec, balance="round-robin") as p:
            reader, writer = await asyncio.open_connection(HOST, p.port)
            writer.write(b"ping")
            assert await within(reader.readexactly(4)) == b"ping"
            b_bad, b_good = p.service.pool.backends
            assert b_bad.failures == 1 and b_bad.connections_total == 0
            assert b_good.connections_total == 1 and b_good.failures == 0
            assert good.received == [bytearray(b"ping")]
            assert bad.received == [] or bad.received == [bytearray()]  # nothing reached it
            assert p.service.shed == {}
            writer.close()
            await eventually(lambda: p.listener.connections == 0)
            assert_released(p.service)
    finally:
        await bad.stop()
        await good.stop()


async def test_wrong_ca_with_no_other_backend_closes_the_client(tmp_path: Path) -> None:
    bad = await Recorder(backend_context(tmp_path, ca=other_ca())).start()
    spec = BackendTLS(ca=ca_file(tmp_path), sni=BACKEND_NAME)
    try:
        async with tcp_proxy(tmp_path, [bad.port], client_tls=False, backend_tls=spec) as p:
            reader, writer = await asyncio.open_connection(HOST, p.port)
            writer.write(b"lost")
            assert await within(read_to_end(reader)) == b""
            writer.close()
            await eventually(lambda: p.listener.connections == 0)
            (b,) = p.service.pool.backends
            assert b.failures == 1 and b.connections_total == 0
            assert p.service.shed == {"connect_failed": 1}
            assert_released(p.service)
    finally:
        await bad.stop()


async def test_a_backend_that_never_answers_the_handshake_times_out(tmp_path: Path) -> None:
    """connect_timeout bounds the TCP connect and the TLS handshake together."""
    release = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()  # accepts, never answers the ClientHello
        writer.close()

    silent = await asyncio.start_server(mute, HOST, 0)
    good = await Recorder(backend_context(tmp_path)).start()
    spec = BackendTLS(ca=ca_file(tmp_path), sni=BACKEND_NAME)
    try:
        async with tcp_proxy(tmp_path, [silent.sockets[0].getsockname()[1], good.port],
                             client_tls=False, backend_tls=spec, balance="round-robin",
                             connect_timeout=0.3) as p:
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection(HOST, p.port)
            writer.write(b"ping")
            assert await within(reader.readexactly(4)) == b"ping"
            assert time.monotonic() - t0 >= 0.29
            assert p.service.pool.backends[0].failures == 1
            writer.close()
    finally:
        release.set()
        silent.close()
        await good.stop()


# -- (d) both sides ------------------------------------------------------------------------------


async def test_tls_client_and_tls_backend(tmp_path: Path) -> None:
    backend = await Recorder(backend_context(tmp_path)).start()
    spec = BackendTLS(ca=ca_file(tmp_path), sni=BACKEND_NAME)
    try:
        async with tcp_proxy(tmp_path, [backend.port], backend_tls=spec) as p:
            reader, writer = await tls_connect(p.port)
            payload = random.Random(3).randbytes(300_000)
            writer.write(payload)
            assert await within(reader.readexactly(len(payload))) == payload
            assert backend.received == [bytearray(payload)]
            assert backend.sni == [BACKEND_NAME]
            writer.close()
            await eventually(lambda: p.listener.connections == 0)
            assert p.service.bytes_in == len(payload) == p.service.bytes_out
            assert_released(p.service)
    finally:
        await backend.stop()


# -- (e) client handshakes that fail -------------------------------------------------------------


async def test_a_silent_client_is_closed_at_the_handshake_timeout_without_a_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tcp_tls, "HANDSHAKE_TIMEOUT", 0.3)
    async with Recorder() as backend:
        async with tcp_proxy(tmp_path, [backend.port]) as p:
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection(HOST, p.port)
            assert await within(read_to_end(reader)) == b""
            assert 0.25 <= time.monotonic() - t0 < 3
            writer.close()
            await eventually(lambda: p.listener.connections == 0)
            assert p.listener.refused == {"tls_handshake": 1}
            assert backend.accepted == 0
            assert p.service.pool.backends[0].connections_total == 0
            assert_released(p.service)


async def test_garbage_and_untrusting_clients_never_reach_a_backend(tmp_path: Path) -> None:
    async with Recorder() as backend:
        async with tcp_proxy(tmp_path, [backend.port]) as p:
            reader, writer = await asyncio.open_connection(HOST, p.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n")  # not a ClientHello
            await within(read_to_end(reader))
            writer.close()
            # a client that does not trust the certificate aborts its handshake
            untrusting = ssl.create_default_context(cadata=other_ca().pem.decode())
            with pytest.raises(ssl.SSLCertVerificationError):
                await within(asyncio.open_connection(HOST, p.port, ssl=untrusting,
                                                     server_hostname=NAME))
            await eventually(lambda: p.listener.refused.get("tls_handshake") == 2)
            await eventually(lambda: p.listener.connections == 0)
            assert backend.accepted == 0
            r, w = await tls_connect(p.port)  # a good client still gets through
            w.write(b"ok")
            assert await within(r.readexactly(2)) == b"ok"
            w.close()


# -- (f) half-close --------------------------------------------------------------------------------


async def test_half_close_from_a_plain_client_toward_a_tls_backend_closes_after_flushing(
    tmp_path: Path
) -> None:
    """A TLS side cannot half-close: the client's FIN ends the connection once what it sent
    reached the backend (then close_notify); the backend sees every byte and a clean end."""
    backend = await Recorder(backend_context(tmp_path), echo=False).start()
    spec = BackendTLS(ca=ca_file(tmp_path), sni=BACKEND_NAME)
    try:
        async with tcp_proxy(tmp_path, [backend.port], client_tls=False,
                             backend_tls=spec) as p:
            reader, writer = await asyncio.open_connection(HOST, p.port)
            await eventually(lambda: backend.accepted == 1)
            big = b"q" * 2_000_000
            writer.write(big)
            writer.write_eof()
            assert await within(read_to_end(reader)) == b""  # closed, not half-open
            assert await within(backend.ended[0]) is True
            assert backend.received == [bytearray(big)]
            writer.close()
            await eventually(lambda: p.listener.connections == 0)
            assert_released(p.service)
    finally:
        await backend.stop()


async def test_a_tls_backend_ending_its_stream_ends_the_client_after_its_bytes(
    tmp_path: Path
) -> None:
    backend = await Recorder(backend_context(tmp_path), greeting=b"greeting" * 10_000,
                             close_after_greeting=True).start()
    spec = BackendTLS(ca=ca_file(tmp_path), sni=BACKEND_NAME)
    try:
        async with tcp_proxy(tmp_path, [backend.port], client_tls=False,
                             backend_tls=spec) as p:
            reader, writer = await asyncio.open_connection(HOST, p.port)
            assert await within(read_to_end(reader)) == b"greeting" * 10_000
            writer.close()
            await eventually(lambda: p.listener.connections == 0)
            assert_released(p.service)
    finally:
        await backend.stop()


async def test_close_notify_from_a_tls_client_ends_the_plain_backend_cleanly(
    tmp_path: Path
) -> None:
    async with Recorder(echo=False) as backend:
        async with tcp_proxy(tmp_path, [backend.port]) as p:
            _, writer = await tls_connect(p.port)
            writer.write(b"last words")
            writer.close()  # close_notify
            await writer.wait_closed()
            assert await within(backend.ended[0]) is True  # FIN after every byte
            assert backend.received == [bytearray(b"last words")]
            await eventually(lambda: p.listener.connections == 0)
            assert_released(p.service)


async def test_a_tls_client_ending_with_a_bare_fin_under_backpressure_loses_nothing(
    tmp_path: Path
) -> None:
    """The client sends 2 MB and a FIN without close_notify while the backend is not reading
    (the proxy has paused the client): every byte still reaches the backend, then its EOF."""
    size = 2_000_000
    payload = random.Random(9).randbytes(size)
    backend_sock = socket.socket()
    backend_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    backend_sock.bind((HOST, 0))
    backend_sock.listen()
    got: dict[str, Any] = {}
    ctx = client_ctx()

    def backend() -> None:
        conn, _ = backend_sock.accept()
        with conn:
            time.sleep(0.5)  # not reading: the proxy is paused when the client ends
            data = bytearray()
            while chunk := conn.recv(1 << 20):
                data += chunk
            got["data"] = bytes(data)

    def client(port: int) -> None:
        with ctx.wrap_socket(socket.create_connection((HOST, port)), server_hostname=NAME) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)  # a TCP FIN, no close_notify
            with suppress(OSError):
                while s.recv(65536):
                    pass

    try:
        async with tcp_proxy(tmp_path, [backend_sock.getsockname()[1]]) as p:
            threads = [threading.Thread(target=backend),
                       threading.Thread(target=client, args=(p.port,))]
            for t in threads:
                t.start()
            await eventually(lambda: not any(t.is_alive() for t in threads), 20)
            await eventually(lambda: p.listener.connections == 0)
            assert_released(p.service)
    finally:
        backend_sock.close()
    assert len(got["data"]) == size and got["data"] == payload


# -- pool semantics and deadlines ----------------------------------------------------------------


async def test_no_backend_sheds_after_the_handshake(tmp_path: Path) -> None:
    async with tcp_proxy(tmp_path, []) as p:
        reader, writer = await tls_connect(p.port)
        assert await within(read_to_end(reader)) == b""
        writer.close()
        await eventually(lambda: p.listener.connections == 0)
        assert p.service.shed == {"no_backend": 1}


async def test_queued_connection_waits_for_a_free_slot(tmp_path: Path) -> None:
    async with Recorder() as backend:
        async with tcp_proxy(tmp_path, [backend.port], max_inflight=1, queue_size=4,
                             queue_timeout=5.0) as p:
            r1, w1 = await tls_connect(p.port)
            w1.write(b"1")
            assert await within(r1.readexactly(1)) == b"1"
            r2, w2 = await tls_connect(p.port)
            w2.write(b"2")
            await eventually(lambda: len(p.service.pool.waiters) == 1)
            assert backend.accepted == 1
            w1.close()  # frees the slot: the waiter goes
            assert await within(r2.readexactly(1)) == b"2"
            assert backend.accepted == 2
            w2.close()
            await eventually(lambda: p.listener.connections == 0)
            assert_released(p.service)


async def test_idle_tls_connection_is_closed_after_idle_timeout(tmp_path: Path) -> None:
    async with Recorder() as backend:
        async with tcp_proxy(tmp_path, [backend.port], idle_timeout=0.5, sweeper=True) as p:
            reader, writer = await tls_connect(p.port)
            for i in range(4):  # 0.9 s of traffic every 0.3 s: longer than the timeout
                if i:
                    await asyncio.sleep(0.3)
                writer.write(b"ping")
                assert await within(reader.readexactly(4)) == b"ping"
                last = time.monotonic()
            assert await within(read_to_end(reader)) == b""
            assert 0.45 <= time.monotonic() - last < 2.5
            writer.close()
            await eventually(lambda: p.listener.connections == 0)
            assert_released(p.service)


# -- (g) shutdown ----------------------------------------------------------------------------------


async def test_wait_closed_resets_tls_connections_after_the_grace_not_before(
    tmp_path: Path
) -> None:
    backend = await Recorder(backend_context(tmp_path)).start()
    spec = BackendTLS(ca=ca_file(tmp_path), sni=BACKEND_NAME)
    try:
        async with tcp_proxy(tmp_path, [backend.port], backend_tls=spec) as p:
            listener = p.listener
            reader, writer = await tls_connect(p.port)
            writer.write(b"before")
            assert await within(reader.readexactly(6)) == b"before"
            # a client in the middle of its handshake is covered too
            pending = socket.create_connection((HOST, p.port))
            await eventually(lambda: listener.connections == 2)
            listener.stop_accepting()
            t0 = time.monotonic()
            closing = asyncio.ensure_future(listener.wait_closed(0.6))
            await asyncio.sleep(0.3)
            writer.write(b"during")  # still relayed within the grace
            assert await within(reader.readexactly(6)) == b"during"
            assert not closing.done()
            await within(closing)
            assert time.monotonic() - t0 >= 0.55
            assert listener.connections == 0
            with pytest.raises((ConnectionResetError, ssl.SSLError)):
                data = await within(reader.read())
                if not data:
                    raise ConnectionResetError  # an EOF is acceptable too
            writer.close()
            pending.settimeout(5)
            with suppress(ConnectionResetError):
                assert pending.recv(10) == b""
            pending.close()
            assert_released(p.service)
    finally:
        await backend.stop()


async def test_wait_closed_returns_when_the_last_tls_connection_ends(tmp_path: Path) -> None:
    async with Recorder() as backend:
        async with tcp_proxy(tmp_path, [backend.port]) as p:
            listener = p.listener
            reader, writer = await tls_connect(p.port)
            writer.write(b"hi")
            assert await within(reader.readexactly(2)) == b"hi"
            listener.stop_accepting()
            asyncio.get_running_loop().call_later(0.1, writer.close)
            t0 = time.monotonic()
            await within(listener.wait_closed(10), 12)
            assert time.monotonic() - t0 < 5
            assert listener.connections == 0


# -- the stock asyncio loop ------------------------------------------------------------------------


def test_the_relay_also_runs_on_the_stock_asyncio_loop(tmp_path: Path) -> None:
    """Production runs uvloop; the relay only uses the asyncio Transport API, so the stock
    loop works too (both sides TLS, and a plain client talking first to a TLS backend)."""

    async def main() -> None:
        backend = await Recorder(backend_context(tmp_path)).start()
        spec = BackendTLS(ca=ca_file(tmp_path), sni=BACKEND_NAME)
        try:
            async with tcp_proxy(tmp_path, [backend.port], backend_tls=spec) as p:
                reader, writer = await tls_connect(p.port)
                writer.write(b"x" * 200_000)
                assert await within(reader.readexactly(200_000)) == b"x" * 200_000
                writer.close()
                await eventually(lambda: p.listener.connections == 0)
                assert_released(p.service)
            (tmp_path / "plain").mkdir()
            async with tcp_proxy(tmp_path / "plain", [backend.port], client_tls=False,
                                 backend_tls=spec) as p:
                reader, writer = await asyncio.open_connection(HOST, p.port)
                writer.write(b"first")
                assert await within(reader.readexactly(5)) == b"first"
                writer.close()
                await eventually(lambda: p.listener.connections == 0)
        finally:
            await backend.stop()

    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 30))
