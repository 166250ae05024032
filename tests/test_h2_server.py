"""HTTP/2 from clients (edgelb/h2): real clients (curl --http2, h2load, a hyper-h2 client that
can misbehave) through edgelb to HTTP/1.1 backends: ALPN and h2c, bodies both ways, flow
control per stream, gRPC-style local answers, limits and the known attacks."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import h2.errors
import h2.exceptions
import hyperframe.frame as hf
import pytest
import tlskit
from h2kit import H2Client
from hpack import Encoder
from httpkit import HOST, Call, HttpBackend, echo, eventually, free_port, ok, running

from edgelb.h2 import limits
from edgelb.h2.server import H2ServerConnection
from edgelb.h2.translate import request_head
from watchers.model import Address, Policy, Service, Snapshot

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]


def h2c_service(port: int, *backends: HttpBackend, **kw) -> Snapshot:
    svc = Service(name="web", listen=Address(HOST, port), h2c=True,
                  backends=tuple(b.spec for b in backends), **kw)
    return Snapshot(source="file", services=(svc,))


async def run(*cmd: str, timeout: float = 30) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), timeout)
    return p.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def h2_connections(rt) -> list[H2ServerConnection]:
    return [c for lst in rt.listeners.values() for c in getattr(lst, "clients", ())
            if isinstance(c, H2ServerConnection)]


# -- ALPN and h2c ------------------------------------------------------------------------------

async def test_curl_http2_over_tls_and_http2_false(tmp_path: Path, backend) -> None:
    """A TLS static port offers h2 by ALPN (curl --http2 speaks it, body both ways); with
    http2: false the same port offers http/1.1 only."""
    b = await backend("b1", echo())
    ca = tlskit.ca()
    cert, key = ca.issue(["web.test"])
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    port = free_port()
    svc = Service(name="web", listen=Address(HOST, port), backends=(b.spec,),
                  tls=(str(tmp_path / "c.pem"), str(tmp_path / "k.pem")))
    body = bytes(range(256)) * 4096  # 1 MiB
    (tmp_path / "body").write_bytes(body)
    url = f"https://web.test:{port}/up"
    curl = ("curl", "-sS", "--cacert", str(tmp_path / "ca.pem"), "--resolve",
            f"web.test:{port}:{HOST}", "-o", str(tmp_path / "out"), "-w", "%{http_version}")
    async with running(Snapshot(source="file", services=(svc,))) as rt:
        code, out, err = await run(*curl, "--http2", "--data-binary", f"@{tmp_path / 'body'}",
                                   url)
        assert code == 0, err
        assert out == "2"
        assert (tmp_path / "out").read_bytes() == body
        assert b.requests[-1].method == "POST" and b.requests[-1].body_size == len(body)
        assert b.requests[-1].get("x-forwarded-proto") == "https"
        await rt.apply(Snapshot(source="file", services=(
            Service(name="web", listen=svc.listen, backends=svc.backends, tls=svc.tls,
                    http2=False),)))
        code, out, err = await run(*curl, "--http2", url)
        assert code == 0, err
        assert out == "1.1"


async def test_h2c_prior_knowledge_and_http1_on_one_port(backend) -> None:
    b = await backend("b1", ok(b"hello"))
    port = free_port()
    async with running(h2c_service(port, b)):
        code, out, err = await run("curl", "-sS", "--http2-prior-knowledge", "-w",
                                   " %{http_version}", f"http://{HOST}:{port}/a")
        assert (code, out) == (0, "hello 2"), err
        code, out, err = await run("curl", "-sS", "-w", " %{http_version}",
                                   f"http://{HOST}:{port}/a")
        assert (code, out) == (0, "hello 1.1"), err


async def test_h2c_off_answers_the_preface_as_http1(backend) -> None:
    b = await backend("b1")
    port = free_port()
    svc = Service(name="web", listen=Address(HOST, port), backends=(b.spec,))
    async with running(Snapshot(source="file", services=(svc,))):
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(100), 5)
        assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 505"))  # not HTTP/2
        writer.close()


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
async def test_h2load_many_streams_on_few_connections(backend) -> None:
    b1 = await backend("b1", ok(b"x" * 100))
    b2 = await backend("b2", ok(b"y" * 100))
    port = free_port()
    async with running(h2c_service(port, b1, b2)):
        code, out, err = await run("h2load", "-n", "2000", "-c", "4", "-m", "32",
                                   f"http://{HOST}:{port}/")
        assert code == 0, err
        assert "2000 succeeded, 0 failed, 0 errored" in out, out
        assert len(b1.requests) + len(b2.requests) == 2000
        assert len(b1.requests) > 300 and len(b2.requests) > 300  # balanced per request


# -- streams ---------------------------------------------------------------------------------

async def test_streams_carry_bodies_trailers_and_local_answers(backend) -> None:
    async def trailers(call: Call) -> None:
        await call.respond(200, b"abc", framing="chunked", trailers=[("grpc-status", "0")],
                           headers=[("content-type", "application/grpc")])

    b = await backend("b1", echo())
    t = await backend("t", trailers)
    port = free_port()
    snap = h2c_service(port, b)
    svc2 = Service(name="grpc", listen=Address(HOST, free_port()), h2c=True,
                   backends=(t.spec,))
    nob = Service(name="none", listen=Address(HOST, free_port()), h2c=True)
    async with running(Snapshot(source="file", services=(*snap.services, svc2, nob))):
        c = await H2Client().connect(port)
        # a body of unknown length goes chunked to the HTTP/1.1 backend
        r = await c.get("/e", method="POST", body=b"z" * 100000)
        assert r.status == 200 and r.body == b"z" * 100000
        assert b.requests[-1].chunked
        # several streams at once
        sids = [c.request(f"/{i}", method="POST", body=b"%d" % i) for i in range(20)]
        for i, sid in enumerate(sids):
            assert (await c.response(sid)).body == b"%d" % i
        await c.close()
        # trailers from a backend reach the client as HTTP/2 trailers
        assert svc2.listen is not None and nob.listen is not None
        g = await H2Client().connect(svc2.listen.port)
        r = await g.get("/pkg.Svc/M", method="POST", body=b"\0\0\0\0\0",
                        headers=[("content-type", "application/grpc"), ("te", "trailers")])
        assert r.body == b"abc" and r.trailers == {b"grpc-status": b"0"}
        await g.close()
        # edgelb's own answer to a gRPC call: trailers-only with a grpc-status
        n = await H2Client().connect(nob.listen.port)
        r = await n.get("/pkg.Svc/M", method="POST", body=b"\0\0\0\0\0",
                        headers=[("content-type", "application/grpc"), ("te", "trailers")])
        assert r.status == 200 and r.headers[b"grpc-status"] == b"14"  # UNAVAILABLE
        assert b"no backend" in r.headers[b"grpc-message"] and r.body == b""
        # ... and an HTTP error page to a plain request
        r = await n.get("/")
        assert r.status == 503 and b"no backend" in r.body
        await n.close()


async def test_a_field_that_would_smuggle_into_http1_is_refused(backend) -> None:
    b = await backend("b1")
    port = free_port()
    async with running(h2c_service(port, b)):
        c = await H2Client().connect(port)
        # hyper-h2 as a client does not send this; frame it by hand
        block = Encoder().encode([(b":method", b"GET"), (b":scheme", b"http"),
                                  (b":authority", b"x.test"), (b":path", b"/"),
                                  (b"x-a", b"1\r\nx-injected: 1")])
        frame = hf.HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"])
        c.raw(frame.serialize())
        await asyncio.wait_for(c.closed.wait(), 5)  # hyper-h2 refuses it: a protocol error
        assert c.goaway == h2.errors.ErrorCodes.PROTOCOL_ERROR
        await c.close()
        other = await H2Client().connect(port)
        assert (await other.get("/fine")).status == 200
        assert [q.target for q in b.requests] == ["/fine"]
        await other.close()


def test_request_translation_refuses_what_http1_would_read_otherwise() -> None:
    base = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.test"),
            (b":path", b"/p")]
    got = request_head([*base, (b"cookie", b"a=1"), (b"cookie", b"b=2")], True)
    assert not isinstance(got, str)
    assert got.head == (b"GET /p HTTP/1.1\r\nhost: a.test\r\ncookie: a=1; b=2\r\n\r\n")
    assert not got.chunked
    chunked = request_head(base, False)
    assert not isinstance(chunked, str) and chunked.chunked
    assert b"transfer-encoding: chunked" in chunked.head
    for bad in ([(b"x-a", b"1\r\nx-b: 2")], [(b"x-a", b"1\n")], [(b"x-a", b"\x00")],
                [(b"X-Up", b"1")], [(b"bad name", b"1")], [(b"connection", b"close")],
                [(b"transfer-encoding", b"chunked")], [(b"te", b"gzip")],
                [(b"grpc-timeout", b"123456789S")], [(b":protocol", b"websocket")]):
        assert isinstance(request_head([*base, *bad], True), str), bad
    assert isinstance(request_head(base[1:], True), str)  # no :method
    grpc = request_head([*base, (b"content-type", b"application/grpc+proto"),
                         (b"grpc-timeout", b"250m")], False)
    assert not isinstance(grpc, str) and grpc.grpc and grpc.timeout == 0.25


async def test_a_slow_reader_stalls_only_its_stream_and_memory_stays_bounded(backend) -> None:
    """A client that never opens its window for a 16 MiB response: the other streams of the
    same connection are served; the proxy holds at most a window's worth for it (the
    backend's reading paused) and closes the connection after the idle timeout."""
    big = b"B" * (16 << 20)
    b = await backend("b1", ok(big))
    s = await backend("s", ok(b"small"))
    port = free_port()
    small = Service(name="small", listen=Address(HOST, free_port()), h2c=True,
                    backends=(s.spec,))
    snap = h2c_service(port, b, policy=Policy(idle_timeout=1.5))
    async with running(Snapshot(source="file", services=(*snap.services, small))) as rt:
        c = await H2Client(auto_window=False).connect(port)
        sid = c.request("/big")
        conn = (await _one_h2(rt))
        st = conn.streams[sid]
        await eventually(lambda: st.held != 0)
        assert st.pending_n <= limits.RESPONSE_HIGH + 512 * 1024
        # a second stream on the same connection is answered meanwhile... until the
        # connection's window is spent: its response is tiny
        c2 = await H2Client().connect(port)
        r = await c2.response(c2.request("/big2"), timeout=20)
        assert len(r.body) == len(big)
        await c2.close()
        # the staller is closed after the idle timeout
        await asyncio.wait_for(c.closed.wait(), 10)
        assert rt.listeners[str(snap.services[0].listen)].refused.get("h2_stall") == 1
        await c.close()


async def _one_h2(rt) -> H2ServerConnection:
    await eventually(lambda: len(h2_connections(rt)) == 1)
    return h2_connections(rt)[0]


# -- attacks ---------------------------------------------------------------------------------

async def _meanwhile(port: int, stop: asyncio.Event) -> int:
    """Requests of a well-behaved client while an attack runs: how many succeeded."""
    n = 0
    c = await H2Client().connect(port)
    try:
        while not stop.is_set():
            r = await c.get(f"/ok{n}")
            assert r.status == 200
            n += 1
    finally:
        await c.close()
    return n


async def test_rapid_reset_closes_the_attacker_only(backend) -> None:
    b = await backend("b1", ok(b"ok"))
    port = free_port()
    async with running(h2c_service(port, b)) as rt:
        stop = asyncio.Event()
        good = asyncio.get_running_loop().create_task(_meanwhile(port, stop))
        bad = await H2Client().connect(port)
        for _ in range(limits.MAX_RESETS * 3):
            if bad.closed.is_set():
                break
            try:
                sid = bad.request("/")
                bad.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:
                break  # GOAWAY received
            bad.flush()
            await asyncio.sleep(0)
        await asyncio.wait_for(bad.closed.wait(), 10)
        assert bad.goaway == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        stop.set()
        assert await good > 0
        assert rt.listeners[str(Address(HOST, port))].refused.get("h2_rapid_reset") == 1
        await bad.close()


async def test_continuation_flood_and_ping_flood_close_the_attacker_only(backend) -> None:
    b = await backend("b1", ok(b"ok"))
    port = free_port()
    async with running(h2c_service(port, b)) as rt:
        stop = asyncio.Event()
        good = asyncio.get_running_loop().create_task(_meanwhile(port, stop))
        # HEADERS without END_HEADERS, then CONTINUATION frames without end
        bad = await H2Client().connect(port)
        block = Encoder().encode([(b":method", b"GET"), (b":scheme", b"http"),
                                  (b":authority", b"x"), (b":path", b"/")])
        bad.raw(hf.HeadersFrame(1, block).serialize())
        piece = hf.ContinuationFrame(1, b"\x40\x01a\x01b" * 2000).serialize()
        for _ in range(200):
            if bad.closed.is_set():
                break
            bad.raw(piece)
            await asyncio.sleep(0)
        await asyncio.wait_for(bad.closed.wait(), 10)
        await bad.close()
        # PING flood
        pinger = await H2Client().connect(port)
        for i in range(limits.MAX_CONTROL * 2):
            if pinger.closed.is_set():
                break
            pinger.raw(hf.PingFrame(0, opaque_data=b"%08d" % i).serialize())
            if i % 100 == 0:
                await asyncio.sleep(0)
        await asyncio.wait_for(pinger.closed.wait(), 10)
        assert pinger.goaway == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        await pinger.close()
        stop.set()
        assert await good > 0
        refused = rt.listeners[str(Address(HOST, port))].refused
        assert refused.get("h2_protocol") == 1 and refused.get("h2_flood") == 1
