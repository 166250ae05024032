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
from httpkit import HOST, eventually, free_port, ok, running

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
