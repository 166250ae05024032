"""PROXY protocol headers to tcp-mode backends (`proxy_protocol: 1|2`): the header builders
against bytes written out by hand from the spec, the config key, and real connections through
the plain (splice) relay, a TLS-terminated port, backend_tls, and SNI passthrough.

The backends here run in threads on blocking sockets and parse the header themselves, reading
it byte-exact from the raw socket, so whatever follows it (payload, or a ClientHello they then
answer with their own TLS) is read as the backend would read it."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import struct
import textwrap
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tlskit
from httpkit import HOST, eventually, free_port, within

from edgelb.control.runtime import Runtime
from edgelb.net import proxy_protocol as pp
from edgelb.net.backend_tls import BackendTLS
from edgelb.ops.app import App
from edgelb.ops.config import ConfigError, parse_config, policy_from_annotations, summarize
from edgelb.pool import ServiceState
from edgelb.tcp.listener import TcpListener, _Connection
from watchers.model import Address, Backend, Policy, Service, Snapshot

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # the v2 signature, from the spec


# -- (g) the builders, against bytes written out by hand ------------------------------------------


def test_v1_ipv4() -> None:
    assert pp.v1("192.0.2.10", 56324, "198.51.100.1", 443) == (
        b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n")


def test_v1_ipv6_is_written_compressed() -> None:
    assert pp.v1("2001:db8:0:0:0:0:0:1", 1, "2001:db8::ff", 65535) == (
        b"PROXY TCP6 2001:db8::1 2001:db8::ff 1 65535\r\n")


def test_v2_ipv4() -> None:
    expected = (SIG + b"\x21" + b"\x11" + b"\x00\x0c"
                + b"\xc0\x00\x02\x0a" + b"\xc6\x33\x64\x01" + b"\xdc\x04" + b"\x01\xbb")
    assert pp.v2("192.0.2.10", 56324, "198.51.100.1", 443) == expected
    assert len(expected) == 16 + 12


def test_v2_ipv6() -> None:
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes.fromhex("20010db80000000000000000000000ff")
    expected = SIG + b"\x21\x21\x00\x24" + src + dst + b"\x00\x01" + b"\xff\xff"
    assert pp.v2("2001:db8::1", 1, "2001:db8::ff", 65535) == expected
    assert len(expected) == 16 + 36


def test_mapped_and_mixed_families_are_written_in_one_family() -> None:
    # a dual-stack listener sees an IPv4 client as ::ffff:a.b.c.d on both ends
    assert pp.v1("::ffff:10.0.0.1", 5, "::ffff:10.0.0.2", 6) == (
        b"PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n")
    assert pp.v1("10.0.0.1", 5, "2001:db8::2", 6) == (
        b"PROXY TCP6 ::ffff:10.0.0.1 2001:db8::2 5 6\r\n")
    assert pp.v2("fe80::1%eth0", 5, "fe80::2%eth0", 6)[13:16] == b"\x21\x00\x24"


def test_unknown_when_not_an_ip_and_bad_input_refused() -> None:
    assert pp.header(1, "localhost", 1, "10.0.0.1", 2) == b"PROXY UNKNOWN\r\n"
    assert pp.header(2, "", 0, "", 0) == SIG + b"\x21\x00\x00\x00"
    with pytest.raises(ValueError, match="version 3"):
        pp.header(3, "10.0.0.1", 1, "10.0.0.2", 2)
    with pytest.raises(ValueError, match="65536"):
        pp.v2("10.0.0.1", 65536, "10.0.0.2", 2)


def test_for_socket_reads_the_peer_and_the_local_address() -> None:
    with socket.create_server((HOST, 0)) as srv:
        with socket.create_connection(srv.getsockname()) as cli:
            conn, _ = srv.accept()
            with conn:
                cport, sport = cli.getsockname()[1], srv.getsockname()[1]
                assert pp.for_socket(1, conn) == (
                    f"PROXY TCP4 {HOST} {HOST} {cport} {sport}\r\n".encode())
    a, b = socket.socketpair()
    with a, b:
        assert pp.for_socket(2, a) == pp.unknown(2)  # not an inet socket


# -- a backend that parses the header -------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} header bytes")
        buf += chunk
    return buf


def read_header(sock: socket.socket) -> tuple[int, str, int, str, int]:
    """(version, src, sport, dst, dport) of the PROXY header at the start of `sock`, read
    without consuming a byte past it (a parser written here, apart from the builders)."""
    first = _recv_exact(sock, 1)
    if first == b"P":  # v1: one text line of at most 107 bytes
        line = first
        while not line.endswith(b"\r\n"):
            assert len(line) < 107, line
            line += _recv_exact(sock, 1)
        parts = line[:-2].decode("ascii").split(" ")
        assert parts[0] == "PROXY" and parts[1] in ("TCP4", "TCP6"), line
        return 1, parts[2], int(parts[4]), parts[3], int(parts[5])
    head = first + _recv_exact(sock, 15)
    assert head[:12] == SIG, head
    ver_cmd, fam, length = struct.unpack("!BBH", head[12:])
    assert ver_cmd == 0x21, hex(ver_cmd)
    body = _recv_exact(sock, length)
    if fam == 0x11:
        assert length == 12
        src, dst = socket.inet_ntop(socket.AF_INET, body[:4]), socket.inet_ntop(
            socket.AF_INET, body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
    else:
        assert fam == 0x21 and length == 36, (fam, length)
        src, dst = socket.inet_ntop(socket.AF_INET6, body[:16]), socket.inet_ntop(
            socket.AF_INET6, body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
    return 2, src, sport, dst, dport


@dataclass
class Seen:
    header: tuple[int, str, int, str, int] | None = None  # None: no header came
    first: bytes = b""  # the first byte after the header
    received: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    done: threading.Event = field(default_factory=threading.Event)


class ProxyBackend:
    """Threads on blocking sockets: per connection, parse a PROXY header (when `expect`),
    note the next byte, optionally do a TLS handshake (`ctx`), then echo everything back."""

    def __init__(self, ctx: ssl.SSLContext | None = None, expect: bool = True,
                 host: str = HOST) -> None:
        self.ctx = ctx
        self.expect = expect
        self.sock = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host
                                         else socket.AF_INET)
        self.port = self.sock.getsockname()[1]
        self.seen: list[Seen] = []
        self.errors: list[BaseException] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            seen = Seen()
            self.seen.append(seen)
            threading.Thread(target=self._serve, args=(conn, seen), daemon=True).start()

    def _serve(self, conn: socket.socket, seen: Seen) -> None:
        try:
            conn.settimeout(10)
            if self.expect:
                seen.header = read_header(conn)
            seen.first = conn.recv(1, socket.MSG_PEEK)
            if self.ctx is not None:
                conn = self.ctx.wrap_socket(conn, server_side=True)
            while data := conn.recv(1 << 16):
                seen.received += len(data)
                seen.digest.update(data)
                conn.sendall(data)
        except (OSError, AssertionError) as e:
            self.errors.append(e)
        finally:
            seen.done.set()
            conn.close()

    def close(self) -> None:
        self.sock.close()


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     payload: bytes) -> None:
    writer.write(payload)
    got = await within(reader.readexactly(len(payload)), 20)
    assert got == payload


def backend_ctx(tmp_path: Path, names: list[str], serial: int | None = None) -> ssl.SSLContext:
    cert, key = tlskit.ca().issue(names, serial=serial)
    (tmp_path / "b.crt").write_bytes(cert)
    (tmp_path / "b.key").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "b.crt", tmp_path / "b.key")
    return ctx


@asynccontextmanager
async def tcp_proxy(ports: list[int], *, tls: tuple[str, str] | None = None, host: str = HOST,
                    **policy: Any) -> AsyncIterator[tuple[Runtime, Address]]:
    rt = Runtime(loop=asyncio.get_running_loop())
    listen = Address(host, free_port())
    svc = Service("db", mode="tcp", listen=listen, tls=tls,
                  backends=tuple(Backend(HOST, p) for p in ports), policy=Policy(**policy))
    await rt.apply(Snapshot("file", (svc,)))
    try:
        yield rt, listen
    finally:
        await rt.shutdown(0.5)


# -- (a, b) the plain relay ---------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
async def test_plain_tcp_sends_the_client_address_then_the_payload(version: int) -> None:
    backend = ProxyBackend()
    try:
        async with tcp_proxy([backend.port], proxy_protocol=version) as (rt, listen):
            reader, writer = await asyncio.open_connection(HOST, listen.port)
            client_port = writer.get_extra_info("sockname")[1]
            await round_trip(reader, writer, b"hello")
            payload = bytes(range(256)) * (16 * 1024)  # 4 MiB: the relay is unaffected
            await round_trip(reader, writer, payload)
            writer.close()
            (seen,) = backend.seen
            assert await asyncio.to_thread(seen.done.wait, 10)
            assert seen.header == (version, HOST, client_port, HOST, listen.port)
            assert seen.first == b"h"
            assert seen.received == 5 + len(payload)
            assert seen.digest.digest() == hashlib.sha256(b"hello" + payload).digest()
            service = rt.services["db"]
            # counters count the relayed bytes, not the header
            await eventually(lambda: service.bytes_in == 5 + len(payload))
            assert backend.errors == []
    finally:
        backend.close()


async def test_off_by_default_no_header_and_the_splice_relay() -> None:
    backend = ProxyBackend(expect=False)
    try:
        async with tcp_proxy([backend.port]) as (rt, listen):
            assert rt.services["db"].policy.proxy_protocol == 0
            reader, writer = await asyncio.open_connection(HOST, listen.port)
            await round_trip(reader, writer, b"PING")
            (conn,) = rt.listeners[str(listen)].clients
            assert isinstance(conn, _Connection) and conn.header_rest is None
            writer.close()
            (seen,) = backend.seen
            assert await asyncio.to_thread(seen.done.wait, 10)
            assert seen.header is None and seen.first == b"P" and seen.received == 4
    finally:
        backend.close()


async def test_a_client_talking_first_and_half_closing_comes_after_the_header() -> None:
    # the client's bytes (and its FIN) may be there before the backend connects: they wait
    # in the client socket until the header is out
    backend = ProxyBackend()
    try:
        async with tcp_proxy([backend.port], proxy_protocol=1) as (_, listen):
            sock = socket.create_connection((HOST, listen.port))
            port = sock.getsockname()[1]
            sock.sendall(b"early bytes")
            sock.shutdown(socket.SHUT_WR)  # and a half-close, passed on after them
            sock.settimeout(10)
            got = b""
            while data := await asyncio.to_thread(sock.recv, 1024):
                got += data
            sock.close()
            assert got == b"early bytes"
            (seen,) = backend.seen
            assert seen.header == (1, HOST, port, HOST, listen.port)
            assert seen.first == b"e"
    finally:
        backend.close()


async def test_a_header_the_backend_cannot_take_at_once_is_finished_before_the_payload(
) -> None:
    # Drive _Connection directly over real sockets: the upstream's send buffer is filled up
    # first, so the header is refused (or cut) and has to wait for writability.
    loop = asyncio.get_running_loop()
    service = ServiceState(Service("db", mode="tcp", backends=(Backend(HOST, 1),),
                                   policy=Policy(proxy_protocol=2)))
    listener = TcpListener(Address(HOST, 0), service, loop)
    with socket.create_server((HOST, 0)) as front, socket.create_server((HOST, 0)) as back:
        client = socket.create_connection(front.getsockname())
        accepted, _ = front.accept()
        upstream = socket.create_connection(back.getsockname())
        peer, _ = back.accept()
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        upstream.setblocking(False)
        filler = 0
        with suppress(BlockingIOError):
            while True:
                filler += upstream.send(b"f" * 65536)
        accepted.setblocking(False)
        client.sendall(b"payload")
        conn = _Connection(listener, accepted, service)
        (conn.backend,) = service.pool.all_backends()
        service.pool.acquire(conn.backend)
        conn.upstream = upstream
        conn._connected()
        assert conn.header_rest is not None  # waiting for the backend
        await asyncio.sleep(0.05)
        assert conn.header_rest is not None and accepted.recv(1, socket.MSG_PEEK) == b"p"
        # the backend reads: filler, then the whole header, then the payload
        peer.settimeout(10)
        got = bytearray()

        def drain() -> None:
            while len(got) < filler + 28 + 7:
                got.extend(peer.recv(1 << 16))

        await asyncio.to_thread(drain)
        assert got[:filler] == b"f" * filler
        expected = pp.v2(HOST, client.getsockname()[1], HOST, front.getsockname()[1])
        assert bytes(got[filler:filler + 28]) == expected
        assert bytes(got[filler + 28:]) == b"payload"
        assert conn.header_rest is None
        conn.close()
        for s in (client, peer):
            s.close()


async def test_ipv6_listener_sends_tcp6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.create_server(("::1", 0)).close()
    except OSError:
        pytest.skip("no ::1")
    backend = ProxyBackend()
    try:
        async with tcp_proxy([backend.port], host="::1", proxy_protocol=1) as (_, listen):
            reader, writer = await asyncio.open_connection("::1", listen.port)
            await round_trip(reader, writer, b"six")
            port = writer.get_extra_info("sockname")[1]
            writer.close()
            (seen,) = backend.seen
            assert seen.header == (1, "::1", port, "::1", listen.port)
    finally:
        backend.close()


# -- (c, d) the TLS relay -----------------------------------------------------------------------


async def test_tls_terminated_port_sends_v2_then_plaintext(tmp_path: Path) -> None:
    cert, key = tlskit.ca().issue(["db.example.com"], serial=501)
    (tmp_path / "p.crt").write_bytes(cert)
    (tmp_path / "p.key").write_bytes(key)
    backend = ProxyBackend()
    try:
        async with tcp_proxy([backend.port], tls=(str(tmp_path / "p.crt"),
                             str(tmp_path / "p.key")), proxy_protocol=2) as (_, listen):
            reader, writer = await within(asyncio.open_connection(
                HOST, listen.port, ssl=tlskit.client_context(),
                server_hostname="db.example.com"))
            port = writer.get_extra_info("sockname")[1]
            await round_trip(reader, writer, b"select 1")
            await round_trip(reader, writer, b"x" * (1 << 20))
            writer.close()
            (seen,) = backend.seen
            assert await asyncio.to_thread(seen.done.wait, 10)
            assert seen.header == (2, HOST, port, HOST, listen.port)
            assert seen.first == b"s" and seen.received == 8 + (1 << 20)
    finally:
        backend.close()


async def test_backend_tls_header_precedes_the_client_hello(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(tlskit.ca().pem)
    backend = ProxyBackend(backend_ctx(tmp_path, ["backend.internal"]))
    try:
        async with tcp_proxy([backend.port], proxy_protocol=1,
                             backend_tls=BackendTLS(ca=str(ca), sni="backend.internal"),
                             ) as (rt, listen):
            reader, writer = await asyncio.open_connection(HOST, listen.port)
            port = writer.get_extra_info("sockname")[1]
            await round_trip(reader, writer, b"over tls")
            writer.close()
            (seen,) = backend.seen
            assert seen.header == (1, HOST, port, HOST, listen.port)
            assert seen.first == b"\x16"  # a TLS handshake record: the ClientHello
            assert await asyncio.to_thread(seen.done.wait, 10)
            assert seen.received == 8 and backend.errors == []
            (b,) = rt.services["db"].pool.all_backends()
            assert b.failures == 0 and b.connections_total == 1
    finally:
        backend.close()


async def test_backend_tls_with_a_header_keeps_the_retry_elsewhere(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(tlskit.ca().pem)
    backend = ProxyBackend(backend_ctx(tmp_path, ["backend.internal"]))
    refused = free_port()  # nothing listens there: the first pick (or the only other) fails
    try:
        async with tcp_proxy([refused, backend.port], proxy_protocol=2, balance="round-robin",
                             backend_tls=BackendTLS(ca=str(ca), sni="backend.internal"),
                             ) as (rt, listen):
            for _ in range(2):
                reader, writer = await asyncio.open_connection(HOST, listen.port)
                await round_trip(reader, writer, b"ok")
                writer.close()
            assert len(backend.seen) == 2
            assert all(s.header is not None and s.header[0] == 2 for s in backend.seen)
            assert rt.services["db"].shed.get("connect_failed", 0) == 0
            failed = [b for b in rt.services["db"].pool.all_backends() if b.failures]
            assert [b.spec.port for b in failed] == [refused]
    finally:
        backend.close()


def test_header_paths_also_run_on_the_stock_asyncio_loop(tmp_path: Path) -> None:
    asyncio.run(test_backend_tls_header_precedes_the_client_hello(tmp_path))
    asyncio.run(test_plain_tcp_sends_the_client_address_then_the_payload(2))


# -- (e) passthrough ------------------------------------------------------------------------------


async def test_passthrough_sends_v2_then_the_untouched_client_hello(tmp_path: Path) -> None:
    cert, key = tlskit.ca().issue(["shop.example.com"], serial=1001)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    backend = ProxyBackend(backend_ctx(tmp_path, ["vault.example.com"], serial=7001))
    https, admin = free_port(), free_port()
    path = tmp_path / "edgelb.yaml"
    path.write_text(textwrap.dedent(f"""\
        admin: {{listen: {HOST}:{admin}}}
        entrypoints:
          https: {{listen: {HOST}:{https}, tls: {{cert: {tmp_path}/tls.crt,
                   key: {tmp_path}/tls.key}}}}
        services:
          - name: vault
            mode: tcp
            tls: passthrough
            hosts: [vault.example.com]
            proxy_protocol: v2
            backends: [{{address: {HOST}:{backend.port}}}]
        """))
    app = App(path)
    await within(app.start(), 10)
    try:
        reader, writer = await within(asyncio.open_connection(
            HOST, https, ssl=tlskit.client_context(), server_hostname="vault.example.com"))
        port = writer.get_extra_info("sockname")[1]
        assert tlskit.peer(writer.get_extra_info("ssl_object"))[0] == 7001  # the backend's
        await round_trip(reader, writer, b"unseal")
        writer.close()
        (seen,) = backend.seen
        assert seen.header == (2, HOST, port, HOST, https)
        assert seen.first == b"\x16"
        assert await asyncio.to_thread(seen.done.wait, 10)
        assert seen.received == 6 and backend.errors == []
    finally:
        await within(app.stop(), 20)
        backend.close()


# -- (f) config -----------------------------------------------------------------------------------


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(textwrap.dedent(text))
    return e.value.errors


TCP = """
    services:
      - name: db
        mode: {mode}
        listen: 127.0.0.1:5432
        proxy_protocol: {value}
        backends: [{{address: 127.0.0.1:5433}}]
"""


@pytest.mark.parametrize(("value", "version"), [
    ("false", 0), ("null", 0), ("0", 0), ("1", 1), ("v1", 1), ("2", 2), ("V2", 2),
    ('"2"', 2)])
def test_config_values(value: str, version: int) -> None:
    config = parse_config(textwrap.dedent(TCP.format(mode="tcp", value=value)))
    (svc,) = config.snapshot.services
    assert svc.policy.proxy_protocol == version
    line = f"PROXY protocol v{version} to backends"
    assert (line in summarize(config)) == bool(version)


@pytest.mark.parametrize("value", ["3", "true", "v3", "[1]", "proxy"])
def test_config_bad_values_are_named(value: str) -> None:
    (err,) = _errors(TCP.format(mode="tcp", value=value))
    assert err.startswith("services[0].proxy_protocol: expected 1 or v1, 2 or v2"), err


def test_config_http_mode_is_an_error_naming_the_key() -> None:
    (err,) = _errors(TCP.format(mode="http", value="2"))
    assert err.startswith("services[0].proxy_protocol: "), err
    assert "X-Forwarded-For" in err and "mode: tcp" in err
    # off is fine anywhere, and a default reaches the tcp services only
    parse_config(textwrap.dedent(TCP.format(mode="http", value="false")))
    config = parse_config(textwrap.dedent("""
        defaults: {proxy_protocol: 1}
        services:
          - {name: web, listen: 127.0.0.1:8080, backends: [{address: 127.0.0.1:8081}]}
          - {name: db, mode: tcp, listen: 127.0.0.1:5432, backends: [{address: 127.0.0.1:1}]}
    """))
    assert "PROXY protocol v1" in summarize(config).split("db (tcp)")[1]
    assert "PROXY protocol" not in summarize(config).split("db (tcp)")[0]


def test_annotation_form() -> None:
    policy, errs = policy_from_annotations({"edgelb.io/proxy-protocol": "2"}, Policy())
    assert errs == [] and policy.proxy_protocol == 2
    policy, errs = policy_from_annotations({"edgelb.io/proxy-protocol": "v1"}, Policy())
    assert errs == [] and policy.proxy_protocol == 1
    base = Policy()
    policy, errs = policy_from_annotations({"edgelb.io/proxy-protocol": "yes"}, base)
    assert policy is base
    assert len(errs) == 1 and errs[0].startswith("edgelb.io/proxy-protocol: expected 1"), errs
