"""Accepting the PROXY protocol from a balancer in front of edgelb (`accept_proxy_protocol`):
the incremental parser (hand-made bytes and hypothesis), the config key, and real connections
on 127.0.0.1 to a plain entrypoint, an http static port, a TLS entrypoint (terminated and
passed through) and a tcp port. 127.0.0.1 is both the client and the balancer here: a trusted
list of [127.0.0.0/8] makes it a balancer, [10.0.0.0/8] a direct (untrusted) client."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import struct
import textwrap
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import tlskit
from httpkit import HOST, HttpBackend, eventually, free_port, within
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelb.control.runtime import EntrypointSpec, Runtime
from edgelb.net import proxy_protocol as pp
from edgelb.net.acl import SourceFilter
from edgelb.ops.config import ConfigError, LimitsConfig, parse_config, summarize
from watchers.model import Address, Backend, Policy, Route, Service, Settings, Snapshot

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
ALL = pp.parse_accept(True, "x")[0]
TRUSTED = pp.parse_accept(["127.0.0.0/8"], "x")[0]
UNTRUSTED = pp.parse_accept(["10.0.0.0/8"], "x")[0]


# -- the parser ---------------------------------------------------------------------------------


def test_v1_tcp4_tcp6_unknown() -> None:
    h = pp.parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\nGET /")
    assert isinstance(h, pp.Header)
    assert (h.length, h.ip, h.port) == (43, "203.0.113.7", 40000)
    h = pp.parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n")
    assert isinstance(h, pp.Header) and (h.ip, h.port) == ("2001:db8::7", 1)
    h = pp.parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nrest")
    assert isinstance(h, pp.Header) and h.ip is None and h.length == 35 and h.peer is None


def test_v2_tcp4_tcp6_local_and_tlvs_skipped() -> None:
    h = pp.parse(pp.v2("198.51.100.9", 5555, "10.0.0.1", 80) + b"payload")
    assert isinstance(h, pp.Header) and (h.length, h.ip, h.port) == (28, "198.51.100.9", 5555)
    h = pp.parse(pp.v2("2001:db8::9", 6, "2001:db8::1", 7))
    assert isinstance(h, pp.Header) and (h.length, h.ip, h.port) == (52, "2001:db8::9", 6)
    h = pp.parse(pp.V2_LOCAL + b"x")
    assert isinstance(h, pp.Header) and h.length == 16 and h.ip is None
    tlv = b"\x04\x00\x05vpc-1" + b"\x01\x00\x02h2"  # TLVs after the addresses
    body = socket.inet_aton("192.0.2.1") + socket.inet_aton("10.0.0.1") + b"\x00\x01\x00\x02"
    raw = SIG + b"\x21\x11" + struct.pack("!H", len(body) + len(tlv)) + body + tlv
    h = pp.parse(raw + b"GET")
    assert isinstance(h, pp.Header) and (h.length, h.ip, h.port) == (len(raw), "192.0.2.1", 1)
    mapped = pp.parse(b"PROXY TCP6 ::ffff:192.0.2.5 ::ffff:10.0.0.1 9 10\r\n")
    assert isinstance(mapped, pp.Header) and mapped.ip == "192.0.2.5"


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY " + b"A" * 120, SIG + b"\x31\x11\x00\x0c" + bytes(12),
    SIG + b"\x22\x11\x00\x0c" + bytes(12), SIG + b"\x21\x11\x00\x04" + bytes(4),
    SIG + b"\x21\x21\x00\x0c" + bytes(12), SIG + b"\x21\x51\x00\x00",
    b"\r\n\r\nGET / HTTP/1.1\r\n\r\n",
])
def test_invalid_headers_say_why(data: bytes) -> None:
    result = pp.parse(data)
    assert isinstance(result, str) and result, result


def test_every_prefix_needs_more() -> None:
    for whole in (b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\n", b"PROXY UNKNOWN\r\n",
                  pp.v2("2001:db8::9", 6, "2001:db8::1", 7), pp.V2_LOCAL):
        for n in range(len(whole)):
            assert pp.parse(whole[:n]) is None, whole[:n]
        assert isinstance(pp.parse(whole), pp.Header)


def test_screen() -> None:
    assert pp.screen(b"") is None and pp.screen(b"PRO") is None and pp.screen(SIG[:5]) is None
    assert pp.screen(b"PROXY ") is True and pp.screen(SIG) is True
    assert pp.screen(b"PROPFIND /") is False and pp.screen(b"\x16\x03") is False
    assert pp.screen(b"\r\n\r\nGET") is False


_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_port = st.integers(0, 65535)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    result = pp.parse(data)
    assert result is None or isinstance(result, str) or (
        isinstance(result, pp.Header) and 0 < result.length <= len(data))
    pp.screen(data)
    for prefix in (b"PROXY ", SIG, SIG + b"\x21"):
        result = pp.parse(prefix + data)
        assert result is None or isinstance(result, (str, pp.Header))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.tuples(_ipv4, _ipv4), st.tuples(_ipv6, _ipv6)), _port, _port,
       st.sampled_from([1, 2]), st.binary(max_size=40), st.integers(1, 12))
def test_built_headers_parse_back_in_any_pieces(ips: tuple[str, str], sport: int, dport: int,
                                                version: int, rest: bytes, step: int) -> None:
    header = pp.header(version, ips[0], sport, ips[1], dport)
    data = header + rest
    for n in range(0, len(header), step):  # a trickled header: more is always needed
        assert pp.parse(data[:n]) is None
    h = pp.parse(data)
    assert isinstance(h, pp.Header) and h.length == len(header) and h.port == sport
    want = ipaddress.ip_address(ips[0])
    if want.version == 6 and want.ipv4_mapped is not None:
        want = want.ipv4_mapped
    assert h.ip is not None and ipaddress.ip_address(h.ip) == want


# -- config -------------------------------------------------------------------------------------


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(textwrap.dedent(text))
    return e.value.errors


def test_config_values() -> None:
    config = parse_config(textwrap.dedent("""
        entrypoints:
          web: {listen: 127.0.0.1:8080, accept_proxy_protocol: true}
          lan: {listen: 127.0.0.1:8081, accept_proxy_protocol: [10.0.0.0/8, "fd00::/8"]}
          plain: {listen: 127.0.0.1:8082, accept_proxy_protocol: false}
        services:
          - name: db
            mode: tcp
            listen: 127.0.0.1:5432
            accept_proxy_protocol: [192.168.0.0/16]
            backends: [{address: 127.0.0.1:5433}]
        """))
    eps = {e.name: e.accept_proxy_protocol for e in config.entrypoints}
    assert eps["web"] == ALL and eps["plain"] is None
    assert eps["lan"].required("10.1.2.3") and not eps["lan"].required("192.0.2.1")
    (svc,) = config.snapshot.services
    text = summarize(config)
    assert "entrypoint web: 127.0.0.1:8080, PROXY header required" in text
    assert "listen 127.0.0.1:5432, PROXY header from 192.168.0.0/16" in text
    assert svc.accept_proxy_protocol.required("192.168.1.1")
    assert not svc.accept_proxy_protocol.required("127.0.0.1")


def test_config_errors_are_named() -> None:
    errs = _errors("""
        entrypoints:
          https: {listen: 127.0.0.1:8443, accept_proxy_protocol: yes-please}
          lan: {listen: 127.0.0.1:8444, accept_proxy_protocol: [10.0.0.0/8, 300.1.0.0/16]}
        services:
          - name: db
            mode: tcp
            listen: 127.0.0.1:5432
            accept_proxy_protocol: 3
            backends: []
          - name: web
            hosts: [a.example.com]
            accept_proxy_protocol: true
            backends: []
        """)
    text = "\n".join(errs)
    assert "entrypoints.https.accept_proxy_protocol: " in text
    assert "entrypoints.lan.accept_proxy_protocol[1]" in text and "300.1.0.0/16" in text
    assert "services[0].accept_proxy_protocol: expected true" in text
    assert "services[1].accept_proxy_protocol: only a service with listen" in text


# -- helpers for real connections -------------------------------------------------------------


@asynccontextmanager
async def edge(services: tuple[Service, ...] = (), routes: tuple[Route, ...] = (),
               entrypoints: tuple[EntrypointSpec, ...] = (),
               limits: LimitsConfig | None = None) -> AsyncIterator[Runtime]:
    runtime = Runtime(loop=asyncio.get_running_loop(),
                      settings=Settings(grace=0.5, limits=limits))
    if entrypoints:
        await runtime.set_entrypoints(entrypoints, Policy())
    await runtime.apply(Snapshot(source="file", services=services, routes=routes))
    try:
        yield runtime
    finally:
        await runtime.shutdown(0.2)


def web(backend: HttpBackend, listen: int | None = None, accept: Any = None,
        **policy: Any) -> Service:
    return Service(name="web", backends=(backend.spec,), policy=Policy(**policy),
                   listen=Address(HOST, listen) if listen else None,
                   accept_proxy_protocol=accept)


def entry(port: int, accept: Any, tls: tuple[str, str] | None = None) -> EntrypointSpec:
    return EntrypointSpec("web", Address(HOST, port), tls, accept)


GET = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"


async def exchange(port: int, data: bytes, trickle: bool = False) -> bytes:
    """Send `data` (byte by byte if `trickle`), return everything until the close."""
    reader, writer = await within(asyncio.open_connection(HOST, port))
    try:
        if trickle:
            for i in range(len(data)):
                writer.write(data[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0.002)
        else:
            writer.write(data)
        try:
            return await within(reader.read(), 10)
        except OSError:
            return b""
    finally:
        writer.close()


async def closed(reader: asyncio.StreamReader) -> bool:
    """True once the proxy closed the connection (EOF, or a reset: bytes left unread)."""
    try:
        return await within(reader.read(), 5) == b""
    except OSError:
        return True


def refused(runtime: Runtime, port: int) -> int:
    return runtime.listeners[str(Address(HOST, port))].refused.get("proxy_protocol", 0)


# -- plain entrypoint and http static port ------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
async def test_plain_entrypoint_uses_the_header_address(backend: Any, version: int) -> None:
    b = await backend()
    port = free_port()
    async with edge((web(b),), (Route("", "/", "web"),), (entry(port, ALL),)):
        header = pp.header(version, "203.0.113.7", 40000, HOST, port)
        reply = await exchange(port, header + GET)
        assert reply.startswith(b"HTTP/1.1 200")
        (req,) = b.requests
        assert req.get("x-forwarded-for") == "203.0.113.7"
        assert req.get("forwarded").startswith("for=203.0.113.7;proto=http")
        v6 = pp.header(version, "2001:db8::7", 1, "2001:db8::1", port)
        assert (await exchange(port, v6 + GET, trickle=True)).startswith(b"HTTP/1.1 200")
        assert b.requests[1].get("x-forwarded-for") == "2001:db8::7"
        assert b.requests[1].get("forwarded").startswith('for="[2001:db8::7]"')
        # LOCAL / UNKNOWN: the connection's own address
        assert (await exchange(port, pp.local(version) + GET)).startswith(b"HTTP/1.1 200")
        assert b.requests[2].get("x-forwarded-for") == HOST


async def test_http_static_port(backend: Any) -> None:
    b = await backend()
    port = free_port()
    async with edge((web(b, port, ALL),)) as rt:
        header = pp.v2("198.51.100.4", 1234, HOST, port)
        reply = await exchange(port, header + GET, trickle=True)
        assert reply.startswith(b"HTTP/1.1 200")
        assert b.requests[0].get("x-forwarded-for") == "198.51.100.4"
        assert await exchange(port, GET) == b""  # no header: closed, counted
        assert refused(rt, port) == 1


async def test_required_header_missing_garbage_or_slow(backend: Any) -> None:
    b = await backend()
    port = free_port()
    async with edge((web(b),), (Route("", "/", "web"),), (entry(port, ALL),)) as rt:
        assert await exchange(port, GET) == b""
        assert await exchange(port, b"PROXY TCP4 nonsense\r\n" + GET) == b""
        assert await exchange(port, SIG + b"\x2f\x11\x00\x00" + GET) == b""
        assert refused(rt, port) == 3
        rt.listeners[str(Address(HOST, port))].proxy_timeout = 0.3
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"PROXY TCP4 1.2.3.4")  # and nothing more
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await closed(reader)
        assert loop.time() - t0 < 3
        writer.close()
        assert refused(rt, port) == 4
        assert b.requests == []


async def test_trusted_list(backend: Any) -> None:
    b = await backend()
    trusted, untrusted = free_port(), free_port()
    eps = (EntrypointSpec("lb", Address(HOST, trusted), None, TRUSTED),
           EntrypointSpec("direct", Address(HOST, untrusted), None, UNTRUSTED))
    async with edge((web(b),), (Route("", "/", "web"),), eps) as rt:
        header = pp.v1("192.0.2.44", 1, HOST, 2)
        assert (await exchange(trusted, header + GET)).startswith(b"HTTP/1.1 200")
        assert b.requests[-1].get("x-forwarded-for") == "192.0.2.44"
        # an untrusted peer may not choose its address
        assert await exchange(untrusted, header + GET) == b""
        assert await exchange(untrusted, pp.v2("192.0.2.44", 1, HOST, 2) + GET) == b""
        assert refused(rt, untrusted) == 2
        # ...and is served as itself without one (even trickled, "PRO..." not a header)
        assert (await exchange(untrusted, GET, trickle=True)).startswith(b"HTTP/1.1 200")
        assert b.requests[-1].get("x-forwarded-for") == HOST
        assert len(b.requests) == 2


async def test_sources_and_per_client_limits_use_the_header_address(backend: Any) -> None:
    b = await backend()
    port = free_port()
    sources = SourceFilter(["203.0.113.0/24"])
    limits = LimitsConfig(connections_per_client=1)
    async with edge((web(b, sources=sources),), (Route("", "/", "web"),),
                    (entry(port, ALL),), limits) as rt:
        ok = pp.v1("203.0.113.5", 1, HOST, port)
        assert (await exchange(port, ok + GET)).startswith(b"HTTP/1.1 200")
        denied = await exchange(port, pp.v1("198.51.100.1", 1, HOST, port) + GET)
        assert denied.startswith(b"HTTP/1.1 403")
        # one open connection per client: counted against the header's address
        _, w1 = await asyncio.open_connection(HOST, port)
        w1.write(ok)
        listener = rt.listeners[str(Address(HOST, port))]
        await eventually(lambda: listener.per_client.get(b"203.0.113.5") == 1)
        assert await exchange(port, ok + GET) == b""
        assert listener.refused.get("per_client") == 1
        other = pp.v1("203.0.113.6", 1, HOST, port)
        assert (await exchange(port, other + GET)).startswith(b"HTTP/1.1 200")
        w1.close()


async def test_hash_on_source_uses_the_header_address(backend: Any) -> None:
    b1, b2 = await backend("b1"), await backend("b2")
    port = free_port()
    svc = Service(name="web", backends=(b1.spec, b2.spec), policy=Policy(balance="hash"))
    async with edge((svc,), (Route("", "/", "web"),), (entry(port, ALL),)):
        for i in range(16):
            header = pp.v1(f"198.51.100.{i}", 1, HOST, port)
            for _ in range(2):
                assert (await exchange(port, header + GET)).startswith(b"HTTP/1.1 200")
        by_ip: dict[str, set[str]] = {}
        for name, b in (("b1", b1), ("b2", b2)):
            for req in b.requests:
                by_ip.setdefault(req.get("x-forwarded-for"), set()).add(name)
        assert len(by_ip) == 16 and all(len(v) == 1 for v in by_ip.values())
        assert b1.requests and b2.requests  # 16 clients, not one balancer address


# -- tcp ports ----------------------------------------------------------------------------------


class Recorder:
    """A tcp backend recording each connection's bytes; says `hello` first if asked."""

    def __init__(self, greet: bytes = b"") -> None:
        self.greet = greet
        self.got: list[bytes] = []
        self.done = asyncio.Event()
        self.port = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> Recorder:
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.greet:
            writer.write(self.greet)
        data = await reader.read()
        self.got.append(data)
        writer.write(b"bye")
        writer.close()
        self.done.set()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def tcp(rec: Recorder, port: int, accept: Any, version: int = 0) -> Service:
    return Service(name="db", mode="tcp", listen=Address(HOST, port),
                   backends=(Backend(HOST, rec.port),),
                   policy=Policy(proxy_protocol=version), accept_proxy_protocol=accept)


async def tcp_exchange(port: int, data: bytes, trickle: bool = False) -> bytes:
    reader, writer = await within(asyncio.open_connection(HOST, port))
    for piece in ([data[i:i + 1] for i in range(len(data))] if trickle else [data]):
        writer.write(piece)
        await writer.drain()
        if trickle:
            await asyncio.sleep(0.002)
    try:
        writer.write_eof()
        return await within(reader.read(), 10)
    except OSError:  # reset: the proxy closed with the client's bytes unread
        return b""
    finally:
        writer.close()


async def test_tcp_port_relays_exactly_the_payload() -> None:
    rec = await Recorder().start()
    port = free_port()
    try:
        async with edge((tcp(rec, port, ALL),)) as rt:
            payload = b"PROXY is also a fine payload \x00\r\n" * 50
            header = pp.v2("203.0.113.9", 555, HOST, port)
            assert await tcp_exchange(port, header + payload) == b"bye"
            assert await tcp_exchange(port, pp.v1("203.0.113.9", 5, HOST, port) + payload,
                                      trickle=True) == b"bye"
            v2_trickled = pp.v2("2001:db8::9", 5, "2001:db8::1", port) + payload[:20]
            assert await tcp_exchange(port, v2_trickled, trickle=True) == b"bye"
            assert rec.got == [payload, payload, payload[:20]]
            assert await tcp_exchange(port, payload) == b""  # no header
            assert refused(rt, port) == 1 and len(rec.got) == 3
            listener = rt.listeners[str(Address(HOST, port))]
            listener.proxy_timeout = 0.3
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(SIG)
            assert await closed(reader)
            writer.close()
            assert refused(rt, port) == 2
    finally:
        rec.close()


async def test_tcp_onward_header_carries_the_original_client() -> None:
    rec = await Recorder().start()
    port = free_port()
    try:
        async with edge((tcp(rec, port, ALL, version=2),)):
            header = pp.v1("203.0.113.9", 555, HOST, port)
            assert await tcp_exchange(port, header + b"payload") == b"bye"
            (got,) = rec.got
            onward = pp.parse(got)
            assert isinstance(onward, pp.Header)
            assert (onward.ip, onward.port) == ("203.0.113.9", 555)
            assert got[onward.length:] == b"payload"
    finally:
        rec.close()


async def test_tcp_trusted_list_and_server_first_protocols() -> None:
    rec = await Recorder(greet=b"220 hello\r\n").start()
    port = free_port()
    try:
        async with edge((tcp(rec, port, UNTRUSTED),)) as rt:
            # a direct client of a server-first protocol: the greeting comes without waiting
            reader, writer = await asyncio.open_connection(HOST, port)
            assert await within(reader.readexactly(11), 5) == b"220 hello\r\n"
            writer.write(b"QUIT\r\n")
            writer.write_eof()
            assert await within(reader.read(), 5) == b"bye"
            writer.close()
            assert rec.got == [b"QUIT\r\n"]
            # a header from a direct client is refused
            got = await tcp_exchange(port, pp.v1("192.0.2.1", 1, HOST, port) + b"x")
            assert b"bye" not in got
            await eventually(lambda: refused(rt, port) == 1)
            assert len(rec.got) == 1 or rec.got[1] == b""
    finally:
        rec.close()


async def test_tls_terminating_tcp_port_reads_the_header_before_tls(tmp_path: Path) -> None:
    cert, key = tlskit.ca().issue(["db.example.com"], serial=1001)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    rec = await Recorder().start()
    port = free_port()
    svc = Service(name="db", mode="tcp", listen=Address(HOST, port),
                  backends=(Backend(HOST, rec.port),), policy=Policy(proxy_protocol=2),
                  tls=(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")),
                  accept_proxy_protocol=TRUSTED)
    try:
        async with edge((svc,)):
            header = pp.v2("203.0.113.50", 4242, HOST, port)
            sock = socket.create_connection((HOST, port))
            sock.sendall(header)
            sock.setblocking(False)
            _, writer = await within(asyncio.open_connection(
                sock=sock, ssl=tlskit.client_context(), server_hostname="db.example.com"))
            writer.write(b"select 1")
            await writer.drain()
            writer.close()  # the relay then closes the backend side: the recorder has it all
            await eventually(lambda: bool(rec.got))
            onward = pp.parse(rec.got[0])
            assert isinstance(onward, pp.Header)
            assert (onward.ip, onward.port) == ("203.0.113.50", 4242)
            assert rec.got[0][onward.length:] == b"select 1"
    finally:
        rec.close()


# -- TLS entrypoint -----------------------------------------------------------------------------


async def tls_exchange(port: int, prefix: bytes, name: str, request: bytes) -> tuple[int, bytes]:
    """Connect, send `prefix` in the clear, then TLS for `name`; (certificate serial, reply)."""
    sock = socket.create_connection((HOST, port))
    sock.sendall(prefix)
    sock.setblocking(False)
    try:
        reader, writer = await within(asyncio.open_connection(
            sock=sock, ssl=tlskit.client_context(), server_hostname=name))
    except BaseException:
        # the loop took the descriptor and closes it itself; closing it again from this
        # object (at garbage collection) could close a number reused by a later socket
        sock.detach()
        raise
    serial = tlskit.peer(writer.get_extra_info("ssl_object"))[0]
    writer.write(request)
    try:
        reply = await within(reader.read(), 10)
    except (ConnectionError, ssl.SSLError):
        reply = b""
    writer.close()
    return serial, reply


async def test_tls_entrypoint_terminates_routes_and_passes_through(
        tmp_path: Path, backend: Any) -> None:
    cert, key = tlskit.ca().issue(["shop.example.com", "blog.example.com"], serial=1001)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    shop, blog = await backend("shop"), await backend("blog")
    vault_cert, vault_key = tlskit.ca().issue(["vault.example.com"], serial=7001)
    vctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    (tmp_path / "v.crt").write_bytes(vault_cert)
    (tmp_path / "v.key").write_bytes(vault_key)
    vctx.load_cert_chain(tmp_path / "v.crt", tmp_path / "v.key")
    seen: list[bytes] = []
    vault_sock = socket.create_server((HOST, 0))
    vport = vault_sock.getsockname()[1]

    def vault() -> None:  # blocking: reads the header byte-exact, then does its own TLS
        conn, _ = vault_sock.accept()
        with conn:
            conn.settimeout(10)
            header = b""
            while not header.endswith(b"\r\n"):
                header += conn.recv(1)
            seen.append(header)
            tls_conn = vctx.wrap_socket(conn, server_side=True)
            tls_conn.sendall(b"vault:" + tls_conn.recv(100))
            tls_conn.close()

    thread = threading.Thread(target=vault, daemon=True)
    thread.start()
    port = free_port()
    services = (
        Service(name="shop", backends=(shop.spec,)),
        Service(name="blog", backends=(blog.spec,)),
        Service(name="vault", mode="tcp", tls_passthrough=True, backends=(Backend(HOST, vport),),
                policy=Policy(proxy_protocol=1)))
    routes = (Route("shop.example.com", "/", "shop"), Route("blog.example.com", "/", "blog"),
              Route("vault.example.com", "/", "vault"))
    tls_files = (str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))
    try:
        async with edge(services, routes, (entry(port, ALL, tls_files),)) as rt:
            req = GET.replace(b"a.test", b"shop.example.com")
            serial, reply = await tls_exchange(
                port, pp.v2("203.0.113.70", 7, HOST, port), "shop.example.com", req)
            assert serial == 1001 and reply.startswith(b"HTTP/1.1 200")
            assert shop.requests[0].get("x-forwarded-for") == "203.0.113.70"
            assert shop.requests[0].get("x-forwarded-proto") == "https"
            req = GET.replace(b"a.test", b"blog.example.com")
            serial, reply = await tls_exchange(
                port, pp.v1("203.0.113.71", 8, HOST, port), "blog.example.com", req)
            assert reply.startswith(b"HTTP/1.1 200")
            assert blog.requests[0].get("x-forwarded-for") == "203.0.113.71"
            serial, reply = await tls_exchange(
                port, pp.v1("203.0.113.72", 9, HOST, port), "vault.example.com", b"open")
            assert serial == 7001 and reply == b"vault:open"
            assert seen == [f"PROXY TCP4 203.0.113.72 {HOST} 9 {port}\r\n".encode()]
            # no header: closed before any TLS
            with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError,
                                TimeoutError, OSError)):
                await tls_exchange(port, b"", "shop.example.com", req)
            await eventually(lambda: refused(rt, port) == 1)
    finally:
        vault_sock.close()


async def test_tls_entrypoint_trusted_list_switches_back(tmp_path: Path, backend: Any) -> None:
    cert, key = tlskit.ca().issue(["shop.example.com"], serial=1001)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    shop = await backend("shop")
    port = free_port()
    tls_files = (str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))
    services = (Service(name="shop", backends=(shop.spec,)),)
    routes = (Route("shop.example.com", "/", "shop"),)
    req = GET.replace(b"a.test", b"shop.example.com")
    async with edge(services, routes, (entry(port, UNTRUSTED, tls_files),)) as rt:
        _, reply = await tls_exchange(port, b"", "shop.example.com", req)
        assert reply.startswith(b"HTTP/1.1 200")
        assert shop.requests[-1].get("x-forwarded-for") == HOST
        with suppress(ConnectionError, ssl.SSLError, OSError, TimeoutError):
            await tls_exchange(port, pp.v1("192.0.2.1", 1, HOST, port), "shop.example.com", req)
        assert refused(rt, port) == 1 and len(shop.requests) == 1
        # the option off again: served by the plain TLS server
        await rt.set_entrypoints((entry(port, None, tls_files),), Policy())
        listener = rt.listeners[str(Address(HOST, port))]
        await eventually(lambda: not listener._own)
        _, reply = await tls_exchange(port, b"", "shop.example.com", req)
        assert reply.startswith(b"HTTP/1.1 200")


def test_header_protocol_hand_off_on_the_stock_asyncio_loop() -> None:
    async def main() -> None:
        b = await HttpBackend().start()
        port = free_port()
        try:
            async with edge((web(b),), (Route("", "/", "web"),), (entry(port, ALL),)):
                header = pp.v2("203.0.113.8", 1, HOST, port)
                assert (await exchange(port, header + GET)).startswith(b"HTTP/1.1 200")
                assert b.requests[0].get("x-forwarded-for") == "203.0.113.8"
        finally:
            await b.stop()

    asyncio.run(main())
