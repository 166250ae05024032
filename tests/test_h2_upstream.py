"""HTTP/2 to backends (edgelb/h2/upstream.py) and gRPC end to end: real grpcio clients and
servers through edgelb, backends spoken to in h2c or h2 (TLS, ALPN), each call its own
stream on a shared connection and balanced on its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import tlskit
from grpckit import GrpcBackend, GrpcClient, code_of
from httpkit import HOST, closed_port, eventually, free_port, ok, running

from edgelb.control.runtime import EntrypointSpec, Runtime
from edgelb.h2 import upstream as h2up
from watchers.model import Address, Backend, Policy, Service, Settings, Snapshot

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]


@pytest.fixture
def grpc_backend():
    started: list[GrpcBackend] = []

    def make(name: str, **kw) -> GrpcBackend:
        b = GrpcBackend(name, **kw)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


def grpc_service(port: int, *ports: int, protocol: str = "h2c", **policy) -> Snapshot:
    svc = Service(name="g", listen=Address(HOST, port), h2c=True,
                  backends=tuple(Backend(HOST, p) for p in ports),
                  policy=Policy(backend_protocol=protocol, **policy))
    return Snapshot(source="file", services=(svc,))


def shared_connections() -> int:
    return sum(len(v) for v in h2up._conns.values())


# -- every kind of call, h2c both sides -------------------------------------------------------

async def test_grpc_every_streaming_kind_through_an_h2c_backend(grpc_backend) -> None:
    b = grpc_backend("b1")
    port = free_port()
    async with running(grpc_service(port, b.port)):
        c = GrpcClient(port)
        try:
            assert await c.unary(b"hi", timeout=10) == b"b1:hi"
            assert await c.server_stream(5) == [b"0", b"1", b"2", b"3", b"4"]
            assert await c.client_stream([b"a", b"b", b"c"]) == b"a,b,c"
            assert await c.bidi([b"x", b"y", b"z"]) == [b"X", b"Y", b"Z"]
            # the backend's own status and message cross in its trailers
            with pytest.raises(grpc.RpcError) as err:
                await c.unary(b"thing", method="/t.Echo/Fail", timeout=10)
            assert code_of(err.value) == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == "no such thing: thing"
            # many calls, one shared upstream connection
            results = await asyncio.gather(*(c.unary(b"%d" % i, timeout=10) for i in range(40)))
            assert results == [b"b1:%d" % i for i in range(40)]
            assert shared_connections() == 1
        finally:
            c.close()
    assert b.calls.count("Unary") == 41


async def test_16_mib_messages_both_ways(grpc_backend) -> None:
    b = grpc_backend("b1")
    port = free_port()
    big = bytes(range(256)) * (16 * 4096)  # 16 MiB
    async with running(grpc_service(port, b.port)):
        c = GrpcClient(port)
        try:
            got = await c.unary(big, timeout=30)
            assert len(got) == len(big) and got == big[::-1]
        finally:
            c.close()


async def test_each_call_is_balanced_on_its_own_across_three_backends(grpc_backend) -> None:
    """One client connection: calls in turn go round robin (each backend a third exactly);
    concurrent calls under the default least-loaded policy spread over all three."""
    backends = [grpc_backend(f"b{i}") for i in range(3)]
    ports = [b.port for b in backends]

    def served(answers: list[bytes]) -> dict[str, int]:
        return {name: sum(a.startswith(name.encode() + b":") for a in answers)
                for name in ("b0", "b1", "b2")}

    port = free_port()
    async with running(grpc_service(port, *ports, balance="round-robin")):
        c = GrpcClient(port)
        try:
            answers = [await c.unary(b"x", timeout=10) for _ in range(60)]
        finally:
            c.close()
    assert served(answers) == {"b0": 20, "b1": 20, "b2": 20}
    port = free_port()
    async with running(grpc_service(port, *ports)):
        c = GrpcClient(port)
        try:
            answers = await asyncio.gather(*(c.unary(b"x", timeout=10) for _ in range(90)))
        finally:
            c.close()
    counts = served(answers)
    assert sum(counts.values()) == 90
    assert all(n >= 5 for n in counts.values()), counts


async def test_grpc_timeout_is_the_deadline_and_the_backend_sees_the_cancel(grpc_backend) -> None:
    b = grpc_backend("b1")
    port = free_port()
    async with running(grpc_service(port, b.port)):
        c = GrpcClient(port)
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(grpc.RpcError) as err:
                await c.unary(b"5", method="/t.Echo/Sleep", timeout=0.5)
            assert code_of(err.value) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert loop.time() - began < 3
            await eventually(b.cancelled.is_set, 5)  # its stream was reset at the backend
            assert await c.unary(b"after", timeout=10) == b"b1:after"
        finally:
            c.close()


async def test_a_client_cancel_reaches_the_backend_and_others_go_on(grpc_backend) -> None:
    b = grpc_backend("b1")
    port = free_port()
    async with running(grpc_service(port, b.port)):
        c = GrpcClient(port)
        try:
            future = c.channel.unary_unary("/t.Echo/Sleep").future(b"5", timeout=20)
            await eventually(lambda: "Sleep" in b.calls, 5)
            future.cancel()
            await eventually(b.cancelled.is_set, 5)  # RST_STREAM passed on to the backend
            assert await c.unary(b"on", timeout=10) == b"b1:on"  # same connections go on
        finally:
            c.close()


async def test_grpcio_sees_edgelbs_own_answers_as_grpc_statuses(grpc_backend) -> None:
    """No route UNIMPLEMENTED; no backend up UNAVAILABLE: trailers-only, as grpcio reads
    them (the first helper built them; this is a real client)."""
    port = free_port()
    svc = Service(name="g", listen=Address(HOST, port), h2c=True, backends=(),
                  policy=Policy(backend_protocol="h2c"))
    entry = free_port()
    async with running(Snapshot(source="file", services=(svc,))):
        c = GrpcClient(port)
        try:
            with pytest.raises(grpc.RpcError) as err:
                await c.unary(b"x", timeout=10)
            assert code_of(err.value) == grpc.StatusCode.UNAVAILABLE
            assert "no backend" in err.value.details()
        finally:
            c.close()
    rt = Runtime(loop=asyncio.get_running_loop(), settings=Settings(grace=1.0))
    await rt.set_entrypoints([EntrypointSpec("web", Address(HOST, entry), h2c=True)], Policy())
    try:
        c = GrpcClient(entry)
        try:
            with pytest.raises(grpc.RpcError) as err:
                await c.unary(b"x", timeout=10)
            assert code_of(err.value) == grpc.StatusCode.UNIMPLEMENTED
        finally:
            c.close()
    finally:
        await rt.shutdown(0.2)


async def test_an_http1_client_reaches_an_h2c_grpc_backend_with_trailers(grpc_backend) -> None:
    """HTTP/1.1 in front, HTTP/2 behind: the call's trailers come back chunked."""
    b = grpc_backend("b1")
    port = free_port()
    async with running(grpc_service(port, b.port)):
        reader, writer = await asyncio.open_connection(HOST, port)
        message = b"\x00\x00\x00\x00\x02hi"
        writer.write(b"POST /t.Echo/Unary HTTP/1.1\r\nhost: g\r\ncontent-type: application/grpc"
                     b"\r\nte: trailers\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(message), message))
        data = b""
        while not data.endswith(b"\r\n\r\n") or b"grpc-status" not in data:
            more = await asyncio.wait_for(reader.read(65536), 10)
            assert more, data
            data += more
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"\x00\x00\x00\x00\x05b1:hi" in rest
    assert b"grpc-status: 0" in rest


async def test_a_backend_that_is_not_http2_fails_the_call_cleanly(backend) -> None:
    """h2c to an HTTP/1.1 server: the call fails (UNAVAILABLE), edgelb goes on."""
    b = await backend("b1", ok(b"hello"))
    port = free_port()
    async with running(grpc_service(port, b.spec.port, retries=0)):
        c = GrpcClient(port)
        try:
            with pytest.raises(grpc.RpcError) as err:
                await c.unary(b"x", timeout=10)
            assert code_of(err.value) in (grpc.StatusCode.UNAVAILABLE,
                                          grpc.StatusCode.INTERNAL)
        finally:
            c.close()


# -- h2 over TLS ---------------------------------------------------------------------------

async def test_h2_over_tls_to_backends_with_alpn(grpc_backend, tmp_path: Path) -> None:
    ca = tlskit.ca()
    cert, key = ca.issue(["backend.test"])
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    b = grpc_backend("tls1", tls=(cert, key))
    port = free_port()
    from edgelb.net.backend_tls import BackendTLS

    tls = BackendTLS(ca=str(tmp_path / "ca.pem"), sni="backend.test")
    async with running(grpc_service(port, b.port, protocol="h2", backend_tls=tls)):
        c = GrpcClient(port)
        try:
            assert await c.unary(b"sec", timeout=10) == b"tls1:sec"
            assert await c.bidi([b"a", b"b"]) == [b"A", b"B"]
        finally:
            c.close()


# -- grpc.health.v1 as an active health check -------------------------------------------------

def test_health_check_type_grpc_is_read_from_the_config() -> None:
    from watchers.schema import Checker, read_health_check

    c = Checker()
    hc = read_health_check(c, {"type": "grpc", "service": "t.Echo", "interval": "1s"}, "hc",
                           None)
    assert (hc.kind, hc.service, hc.interval) == ("grpc", "t.Echo", 1.0)
    read_health_check(c, {"type": "grpcc"}, "hc", None)
    assert any("http, tcp or grpc" in e for e in map(str, c.errors)), c.errors


def test_health_messages_are_encoded_and_read_bounded() -> None:
    from edgelb.h2.health import check_request, serving_status

    assert check_request("") == b"\x00\x00\x00\x00\x00"
    assert check_request("a.B") == b"\x00\x00\x00\x00\x05\x0a\x03a.B"
    assert serving_status(b"\x00\x00\x00\x00\x02\x08\x01") == 1
    assert serving_status(b"\x00\x00\x00\x00\x00") == 0  # no field: UNKNOWN
    for bad in (b"", b"\x01\x00\x00\x00\x00", b"\x00\x00\x00\x00\x05\x08",
                b"\x00\x00\x00\x00\x01\x0f"):
        assert serving_status(bad) is None


async def test_grpc_health_check_marks_a_not_serving_backend_down(grpc_backend,
                                                                  tmp_path: Path) -> None:
    from edgelb.control.health import probe
    from edgelb.net.backend_tls import BackendTLS
    from watchers.model import HealthCheck

    check = HealthCheck(kind="grpc", timeout=5)
    b = grpc_backend("b1")
    result = await probe(Address(HOST, b.port), check)
    assert result.ok, result
    assert "SERVING" in result.text
    b.health = 2
    result = await probe(Address(HOST, b.port), check)
    assert not result.ok and "NOT_SERVING" in result.text, result
    # over TLS (ALPN h2), verified as the traffic is
    ca = tlskit.ca()
    cert, key = ca.issue(["backend.test"])
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    t = grpc_backend("t1", tls=(cert, key))
    tls = BackendTLS(ca=str(tmp_path / "ca.pem"), sni="backend.test")
    result = await probe(Address(HOST, t.port), check, tls)
    assert result.ok, result
    # nothing listening
    result = await probe(Address(HOST, closed_port()), check)
    assert not result.ok


async def test_grpc_health_checks_steer_calls_away_from_a_not_serving_backend(
        grpc_backend) -> None:
    from watchers.model import HealthCheck

    good, sick = grpc_backend("good"), grpc_backend("sick")
    sick.health = 2
    port = free_port()
    check = HealthCheck(kind="grpc", interval=0.1, timeout=2, rise=1, fall=1)
    async with running(grpc_service(port, good.port, sick.port, health_check=check)) as rt:
        state = rt.services["g"]
        await eventually(lambda: [b.check_ok for b in state.pool.backends].count(False) == 1, 10)
        c = GrpcClient(port)
        try:
            answers = [await c.unary(b"x", timeout=10) for _ in range(10)]
        finally:
            c.close()
    assert all(a == b"good:x" for a in answers)


async def test_16_mib_messages_cross_an_edgelb_process_in_bounded_memory(grpc_backend,
                                                                          tmp_path: Path) -> None:
    """edgelb as its own process (`edgelb run`), so its memory is its own: while 16 MiB
    messages cross both ways, four times, its resident memory (sampled every 5 ms) stays far
    below what holding one message would take."""
    import subprocess
    import sys
    import threading

    b = grpc_backend("b1")
    port, admin = free_port(), free_port()
    conf = tmp_path / "edgelb.yaml"
    conf.write_text(f"""admin: {{listen: {HOST}:{admin}}}
services:
  - name: g
    listen: {HOST}:{port}
    h2c: true
    backend_protocol: h2c
    backends: [{{address: {HOST}:{b.port}}}]
""")
    proc = subprocess.Popen([sys.executable, "-m", "edgelb", "run", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def rss_kib() -> int:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    c = GrpcClient(port)
    done = threading.Event()
    peak, samples = [0], [0]

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_kib())
            samples[0] += 1

    try:
        async def ready() -> None:
            while True:
                try:
                    await c.unary(b"warm", timeout=2, wait_for_ready=True)
                    return
                except grpc.RpcError:
                    await asyncio.sleep(0.1)

        await asyncio.wait_for(ready(), 20)
        await c.unary(bytes(1 << 20), timeout=30)  # buffers of a first big call made once
        before = rss_kib()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        big = bytes(range(256)) * (16 * 4096)  # 16 MiB
        for _ in range(4):
            got = await c.unary(big, timeout=60)
            assert got == big[::-1]
        done.set()
        sampler.join(5)
        grown_mib = (peak[0] - before) / 1024
        assert samples[0] >= 10  # the transfers took long enough to be watched
        assert grown_mib < 8, f"edgelb's resident memory grew by {grown_mib:.1f} MiB"
    finally:
        done.set()
        c.close()
        proc.terminate()
        proc.wait(10)
