"""TLS passthrough by SNI on a TLS entrypoint, through the whole process (App + config file).

The passthrough backends terminate TLS themselves with their own certificates (serials 7xxx);
edgelb's entrypoint certificate has serial 1001. A client that sees a backend's serial was
relayed without decryption; one that sees 1001 was terminated by edgelb."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tlskit
from cryptography import x509
from httpkit import HOST, HttpBackend, eventually, free_port, within

from edgelb.control.runtime import EntrypointSpec, Runtime, SnapshotError
from edgelb.net import tls
from edgelb.ops.app import App
from watchers.model import Address, Backend, Route, Service, Snapshot

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

EDGE_SERIAL = 1001
EDGE_NAMES = ["shop.example.com", "vault.example.com", "*.db.example.com", "a.b.db.example.com"]


# ---------------------------------------------------------------------------------------------
# a TLS backend that echoes, and clients


@dataclass
class TlsEcho:
    server: asyncio.AbstractServer
    port: int
    serial: int
    handshakes: int = 0


async def tls_echo(names: list[str], serial: int) -> TlsEcho:
    """A TLS server with its own certificate for `names`, echoing every byte back."""
    cert, key = tlskit.ca().issue(names, serial=serial)
    ctx = tls.load_pem(cert, key, f"backend {serial}").context
    box: list[TlsEcho] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        box[0].handshakes += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, HOST, 0, ssl=ctx)
    box.append(TlsEcho(server, server.sockets[0].getsockname()[1], serial))
    return box[0]


async def closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True once the peer closed: EOF, or a reset (a socket closed with unread bytes)."""
    try:
        return await within(reader.read(), timeout) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def serial_of(writer: asyncio.StreamWriter) -> int:
    return tlskit.peer(writer.get_extra_info("ssl_object"))[0]


@contextlib.asynccontextmanager
async def tls_connect(port: int, name: str | None, verify: bool = True
                      ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    ctx = tlskit.client_context(verify=verify and name is not None)
    reader, writer = await within(asyncio.open_connection(
        HOST, port, ssl=ctx, server_hostname=name or ""))
    try:
        yield reader, writer
    finally:
        writer.close()


async def echo_round_trip(port: int, name: str, size: int = 256 * 1024) -> int:
    """Send `size` bytes through a TLS connection with SNI `name`, read them back; the serial
    of the certificate the client was served."""
    async with tls_connect(port, name) as (reader, writer):
        payload = bytes(range(256)) * (size // 256)
        writer.write(payload)
        got = await within(reader.readexactly(len(payload)))
        assert got == payload
        return serial_of(writer)


async def https_get(port: int, name: str | None, host: str, path: str = "/"
                    ) -> tuple[int, bytes, int]:
    """(status, body, certificate serial) of one request, SNI `name` (None: no SNI)."""
    async with tls_connect(port, name, verify=name is not None and name != "a.b.db.example.com"
                           ) as (reader, writer):
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await within(reader.read(-1))
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body, serial_of(writer)


def client_hello(name: str | None) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    """A TLS client on memory BIOs, and its first flight (the ClientHello)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tlskit.client_context(verify=name is not None).wrap_bio(
        incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return obj, incoming, outgoing, outgoing.read()


async def finish_handshake(obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                           reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        if pending := outgoing.read():
            writer.write(pending)
        data = await within(reader.read(65536))
        assert data, "the connection closed during the handshake"
        incoming.write(data)
    if pending := outgoing.read():
        writer.write(pending)


# ---------------------------------------------------------------------------------------------
# the process under test


@dataclass
class Edge:
    app: App
    path: Path
    https: int
    http: int
    web: HttpBackend
    vault: TlsEcho
    db: TlsEcho

    @property
    def listener(self) -> Any:
        assert self.app.runtime is not None
        return self.app.runtime.listeners[f"{HOST}:{self.https}"]

    def write(self, vault_hosts: str = "[vault.example.com]", web_hosts: str = "[shop.example.com]",
              extra: str = "", vault_extra: str = "", passthrough: bool = True) -> None:
        d = self.path.parent

        def tcp(name: str, hosts: str, port: int) -> str:
            exposed = (f"    tls: passthrough\n    hosts: {hosts}\n" if passthrough
                       else f"    listen: {HOST}:{free_port()}\n")
            return (f"  - name: {name}\n    mode: tcp\n{exposed}"
                    f"    backends: [{{address: {HOST}:{port}}}]\n")

        self.path.write_text(
            f"admin: {{listen: {HOST}:{self.admin}}}\n"
            "entrypoints:\n"
            f"  https: {{listen: {HOST}:{self.https}, tls: {{cert: {d}/tls.crt, "
            f"key: {d}/tls.key}}}}\n"
            f"  http: {{listen: {HOST}:{self.http}}}\n"
            f"{extra}"
            "services:\n"
            "  - name: web\n"
            f"    hosts: {web_hosts}\n"
            f"    backends: [{{address: {HOST}:{self.web.port}}}]\n"
            + tcp("vault", vault_hosts, self.vault.port) + vault_extra
            + tcp("db", "['*.db.example.com']", self.db.port)
        )

    admin: int = 0

    async def reapply(self, **kw: Any) -> None:
        generation = self.app.generation
        self.write(**kw)
        self.app.reload()
        await eventually(lambda: self.app.generation > generation, timeout=10,
                         what="the rewritten config applied")


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[Edge]:
    cert, key = tlskit.ca().issue(EDGE_NAMES, serial=EDGE_SERIAL)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    web = await HttpBackend("web").start()
    vault = await tls_echo(["vault.example.com"], 7001)
    db = await tls_echo(["*.db.example.com"], 7002)
    e = Edge(App(tmp_path / "edgelb.yaml"), tmp_path / "edgelb.yaml", free_port(), free_port(),
             web, vault, db, admin=free_port())
    e.write()
    await within(e.app.start(), 10)
    try:
        yield e
    finally:
        await within(e.app.stop(), 20)
        await web.stop()
        for b in (vault, db):
            b.server.close()


# ---------------------------------------------------------------------------------------------
# routing


async def test_sni_passthrough_and_termination_share_the_port(edge: Edge) -> None:
    # the passthrough host: the backend's own certificate, bytes both ways
    assert await echo_round_trip(edge.https, "vault.example.com") == 7001
    assert edge.vault.handshakes == 1
    # another name on the same port: edgelb terminates and routes HTTP
    status, body, serial = await https_get(edge.https, "shop.example.com", "shop.example.com",
                                           "/x")
    assert (status, body, serial) == (200, b"web GET /x", EDGE_SERIAL)
    # no SNI at all: terminated too (the default certificate), routed by Host
    status, body, serial = await https_get(edge.https, None, "shop.example.com")
    assert (status, body, serial) == (200, b"web GET /", EDGE_SERIAL)
    # a one-label wildcard
    assert await echo_round_trip(edge.https, "eu.db.example.com", 1024) == 7002
    # two labels under the wildcard: not passed through (edgelb answers; no route -> 404)
    status, _, serial = await https_get(edge.https, "a.b.db.example.com", "a.b.db.example.com")
    assert (status, serial) == (404, EDGE_SERIAL)
    assert edge.vault.handshakes == 1 and edge.db.handshakes == 1
    # the plain-HTTP entrypoint knows nothing of passthrough hosts
    runtime = edge.app.runtime
    assert runtime is not None
    assert runtime.router.lookup("vault.example.com", "/") is None
    assert runtime.services["vault"].tcp_connections == 1
    assert runtime.services["db"].tcp_connections == 1
    assert runtime.services["vault"].bytes_in >= 256 * 1024
    listener = edge.listener
    assert listener.sni_outcomes == {"passthrough": 2, "terminated": 3}
    assert listener.sni_status()["passthrough"] == {"*.db.example.com": "db",
                                                    "vault.example.com": "vault"}
    await eventually(lambda: listener.connections == 0, what="every connection closed")
    # the admin status shows the table and the outcomes on the TLS entrypoint
    status = json.loads(await admin_get(edge.admin, "/status.json"))
    [entry] = [lst for lst in status["listeners"] if lst["address"] == f"{HOST}:{edge.https}"]
    assert entry["sni"]["outcomes"] == {"passthrough": 2, "terminated": 3}
    assert entry["sni"]["passthrough"]["vault.example.com"] == "vault"


async def test_many_concurrent_passthrough_and_terminated_connections(edge: Edge) -> None:
    async def one(i: int) -> int:
        if i % 2:
            return await echo_round_trip(edge.https, "vault.example.com", 4096)
        return (await https_get(edge.https, "shop.example.com", "shop.example.com"))[2]

    serials = await within(asyncio.gather(*(one(i) for i in range(40))), 20)
    assert serials.count(7001) == 20 and serials.count(EDGE_SERIAL) == 20


async def test_a_rewrite_switches_a_host_without_rebinding(edge: Edge) -> None:
    listener = edge.listener
    sock = listener._socks[0]
    assert await echo_round_trip(edge.https, "vault.example.com", 1024) == 7001
    # vault.example.com becomes an https host of web; db keeps its wildcard
    await edge.reapply(vault_hosts="[vault.internal]",
                       web_hosts="[shop.example.com, vault.example.com]")
    status, body, serial = await https_get(edge.https, "vault.example.com", "vault.example.com")
    assert (status, body, serial) == (200, b"web GET /", EDGE_SERIAL)
    assert await echo_round_trip(edge.https, "x.db.example.com", 1024) == 7002
    # and back
    await edge.reapply()
    assert await echo_round_trip(edge.https, "vault.example.com", 1024) == 7001
    assert edge.listener is listener and listener._socks[0] is sock
    assert listener._own  # peeking while the table names something


async def test_an_empty_table_hands_accepting_back_to_the_server(edge: Edge) -> None:
    listener = edge.listener
    sock = listener._socks[0]
    assert listener._own
    # no passthrough host left: TLS is terminated through uvloop's own server again
    await edge.reapply(passthrough=False)
    assert not listener.sni_table
    await eventually(lambda: not listener._own and listener._servers, what="served again")
    status, _, serial = await https_get(edge.https, "shop.example.com", "shop.example.com")
    assert (status, serial) == (200, EDGE_SERIAL)
    # no connection was peeked at: nothing is counted
    assert sum(listener.sni_outcomes.values()) == 0
    assert edge.listener is listener and listener._socks[0] is sock
    # and passthrough again
    await edge.reapply()
    assert listener._own and not listener._servers
    assert await echo_round_trip(edge.https, "vault.example.com", 1024) == 7001


# ---------------------------------------------------------------------------------------------
# slow and silent clients


async def test_a_silent_client_is_closed_after_the_handshake_timeout(edge: Edge) -> None:
    listener = edge.listener
    listener.handshake_timeout = 0.3
    loop = asyncio.get_running_loop()
    reader, writer = await within(asyncio.open_connection(HOST, edge.https))
    _, _, _, hello = client_hello("vault.example.com")
    reader2, writer2 = await within(asyncio.open_connection(HOST, edge.https))
    writer2.write(hello[:100])  # half a ClientHello, then nothing
    start = loop.time()
    assert await closed(reader, 3)
    assert await closed(reader2, 3)
    assert 0.2 < loop.time() - start < 2.5
    writer.close()
    writer2.close()
    assert listener.sni_outcomes.get("timeout") == 2
    assert listener.connections == 0 and listener.per_client == {}
    assert edge.vault.handshakes == 0


@pytest.mark.parametrize("name, serial", [("vault.example.com", 7001),
                                          ("shop.example.com", EDGE_SERIAL)])
async def test_a_client_hello_trickled_byte_by_byte_still_routes(edge: Edge, name: str,
                                                                 serial: int) -> None:
    listener = edge.listener
    peeks = 0
    peek = listener._peek

    def counting(p: Any) -> None:
        nonlocal peeks
        peeks += 1
        peek(p)

    listener._peek = counting  # add_reader is given the instance attribute
    obj, incoming, outgoing, hello = client_hello(name)
    reader, writer = await within(asyncio.open_connection(HOST, edge.https))
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for i in range(len(hello)):
            writer.write(hello[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0.001)
        await finish_handshake(obj, incoming, outgoing, reader, writer)
        der = obj.getpeercert(binary_form=True)
        assert der is not None
        assert x509.load_der_x509_certificate(der).serial_number == serial
    finally:
        writer.close()
    # SO_RCVLOWAT holds the wake-ups back until the record is whole: a few, not one a byte
    assert peeks <= 8, peeks
    key = "passthrough" if serial != EDGE_SERIAL else "terminated"
    assert listener.sni_outcomes == {key: 1}


async def test_not_tls_and_an_early_close_are_dropped(edge: Edge) -> None:
    listener = edge.listener
    reader, writer = await within(asyncio.open_connection(HOST, edge.https))
    writer.write(b"GET / HTTP/1.1\r\nHost: shop.example.com\r\n\r\n")
    assert await closed(reader)  # handed to TLS, which refuses it
    writer.close()
    _, _, _, hello = client_hello("vault.example.com")
    reader, writer = await within(asyncio.open_connection(HOST, edge.https))
    writer.write(hello[:50])
    await writer.drain()
    writer.write_eof()  # gives up half-way through its hello
    assert await closed(reader)
    writer.close()
    await eventually(lambda: listener.sni_outcomes.get("closed") == 1, what="the close seen")
    assert listener.sni_outcomes.get("terminated") == 1
    assert edge.vault.handshakes == 0
    await eventually(lambda: listener.connections == 0, what="nothing left open")


# ---------------------------------------------------------------------------------------------
# limits, idle timeout, shutdown


async def test_listener_limits_count_passthrough_connections(edge: Edge) -> None:
    await edge.reapply(extra="limits: {connections: 2, connections_per_client: 0}\n")
    listener = edge.listener
    async with tls_connect(edge.https, "vault.example.com") as (r1, w1), \
            tls_connect(edge.https, "vault.example.com") as (r2, w2):
        w1.write(b"one")
        w2.write(b"two")
        assert await within(r1.readexactly(3)) == b"one"
        assert await within(r2.readexactly(3)) == b"two"
        assert listener.connections == 2
        # a third (whatever its ClientHello would say) is refused at accept
        for _ in range(2):
            reader, writer = await within(asyncio.open_connection(HOST, edge.https))
            assert await closed(reader)
            writer.close()
        assert listener.refused == {"connections": 2}
    await eventually(lambda: listener.connections == 0, what="both closed")
    await edge.reapply(extra="limits: {connections_per_client: 1}\n")
    async with tls_connect(edge.https, "vault.example.com") as (r1, w1):
        w1.write(b"x")
        assert await within(r1.readexactly(1)) == b"x"
        reader, writer = await within(asyncio.open_connection(HOST, edge.https))
        assert await closed(reader)
        writer.close()
        assert listener.refused.get("per_client") == 1
    await eventually(lambda: listener.per_client == {} and listener.relay.per_client == {},
                     what="per-client counts back to zero")


async def test_idle_passthrough_connections_expire(edge: Edge) -> None:
    await edge.reapply(vault_extra="    idle_timeout: 0.4\n")
    loop = asyncio.get_running_loop()
    async with tls_connect(edge.https, "vault.example.com") as (reader, writer):
        writer.write(b"ping")
        assert await within(reader.readexactly(4)) == b"ping"
        start = loop.time()
        assert await closed(reader)
        assert 0.3 < loop.time() - start < 3
    await eventually(lambda: edge.listener.connections == 0, what="the idle one closed")


async def test_tcp_policies_apply_sources_and_queueing(edge: Edge) -> None:
    runtime = edge.app.runtime
    assert runtime is not None
    await edge.reapply(vault_extra="    sources: {deny: [127.0.0.1]}\n")
    reader, writer = await within(asyncio.open_connection(HOST, edge.https))
    _, _, _, hello = client_hello("vault.example.com")
    writer.write(hello)
    assert await closed(reader)
    writer.close()
    assert runtime.services["vault"].shed == {"source": 1}
    assert edge.vault.handshakes == 0
    # one connection per backend, the next one waits for it (queue_timeout), then is shed
    await edge.reapply(vault_extra="    max_inflight: 1\n    queue_timeout: 0.3\n")
    async with tls_connect(edge.https, "vault.example.com") as (r1, w1):
        w1.write(b"1")
        assert await within(r1.readexactly(1)) == b"1"
        reader, writer = await within(asyncio.open_connection(HOST, edge.https))
        writer.write(hello)
        await eventually(lambda: len(runtime.services["vault"].pool.waiters) == 1,
                         what="the second one queued")
        assert await closed(reader)
        writer.close()
        assert runtime.services["vault"].shed.get("queue_timeout") == 1


async def test_shutdown_drains_then_resets_passthrough_connections(edge: Edge) -> None:
    await edge.reapply(extra="shutdown: {grace: 0.5}\n")
    listener = edge.listener
    loop = asyncio.get_running_loop()
    async with tls_connect(edge.https, "vault.example.com") as (reader, writer):
        writer.write(b"ping")
        assert await within(reader.readexactly(4)) == b"ping"
        pending = await within(asyncio.open_connection(HOST, edge.https))  # never says hello
        start = loop.time()
        await within(edge.app.stop(), 10)
        assert loop.time() - start < 5
        assert await closed(reader)
        assert await closed(pending[0])
        pending[1].close()
    assert listener.connections == 0 and listener._socks == []
    with pytest.raises(OSError):
        await within(asyncio.open_connection(HOST, edge.https))


# ---------------------------------------------------------------------------------------------
# validation


async def test_passthrough_hosts_need_a_tls_entrypoint() -> None:
    runtime = Runtime(loop=asyncio.get_running_loop())
    snap = Snapshot("k8s", services=(
        Service("vault", mode="tcp", tls_passthrough=True, backends=(Backend(HOST, 1),)),),
        routes=(Route("vault.example.com", "/", "vault"),))
    await runtime.set_entrypoints([EntrypointSpec("http", Address(HOST, free_port()))],
                                  runtime.defaults)
    with pytest.raises(SnapshotError, match="none has tls; add tls to an entrypoint"):
        await runtime.apply(snap)
    await runtime.shutdown(0.1)


async def test_one_host_passed_through_to_two_services_is_rejected() -> None:
    runtime = Runtime(loop=asyncio.get_running_loop())
    await runtime.set_entrypoints(
        [EntrypointSpec("https", Address(HOST, free_port()), ("", ""))], runtime.defaults)
    services = tuple(Service(n, mode="tcp", tls_passthrough=True, backends=(Backend(HOST, 1),))
                     for n in ("a", "b"))
    await runtime.apply(Snapshot("file", services=services[:1],
                                 routes=(Route("x.example.com", "/", "a"),)))
    with pytest.raises(SnapshotError, match="already passed through to service a"):
        await runtime.apply(Snapshot("k8s", services=services[1:],
                                     routes=(Route("X.example.com", "/", "b"),)))
    with pytest.raises(SnapshotError, match="routed by SNI name only"):
        await runtime.apply(Snapshot("k8s", services=services[1:],
                                     routes=(Route("y.example.com", "/api", "b"),)))
    await runtime.shutdown(0.1)


def test_the_config_check_names_a_passthrough_service_without_a_tls_entrypoint() -> None:
    from edgelb.ops.config import ConfigError, parse_config

    text = (f"entrypoints: {{http: {{listen: {HOST}:8080}}}}\n"
            "services:\n"
            "  - name: vault\n    mode: tcp\n    tls: passthrough\n"
            "    hosts: [vault.example.com]\n"
            f"    backends: [{{address: {HOST}:8443}}]\n")
    with pytest.raises(ConfigError, match=r"services\[0\]\.tls.*no entrypoint has tls"):
        parse_config(text)
    config = parse_config(text.replace("{http: {listen: ", "{https: {tls: {}, listen: "))
    (svc,) = config.snapshot.services
    assert svc.tls_passthrough and config.snapshot.routes == (
        Route("vault.example.com", "/", "vault"),)


async def admin_get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body
