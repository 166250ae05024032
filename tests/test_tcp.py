"""TCP mode data path: real sockets on 127.0.0.1, both relay paths (splice and copy), both loops.

Each test is a plain function that runs its own event loop (uvloop, as in production, and the
stock asyncio loop), so the loop implementation is a parameter like the relay path.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import random
import socket
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import pytest
import uvloop
from httpkit import echo_handler

import edgelb.tcp.listener as tcp
from edgelb.pool import ServiceState
from edgelb.tcp.listener import TcpListener
from watchers.model import Address, Backend, Policy, Service

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
PATHS = ["splice", "copy"] if tcp.SPLICE_AVAILABLE else ["copy"]
TIMEOUT = 20.0


def run(loop_name: str, coro: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(TIMEOUT):
            return await coro()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        return runner.run(bounded())


@pytest.fixture(params=list(LOOPS))
def loop_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=PATHS)
def splice(request: pytest.FixtureRequest) -> bool:
    return request.param == "splice"


# -- helpers ---------------------------------------------------------------------------------


def make_service(ports: list[int], balance: str = "least-loaded", **policy: Any) -> ServiceState:
    backends = tuple(Backend("127.0.0.1", p) for p in ports)
    spec = Service("svc", mode="tcp", backends=backends, policy=Policy(balance=balance, **policy))
    return ServiceState(spec, random.Random(7))


@asynccontextmanager
async def proxy(service: ServiceState, splice: bool = True):
    listener = TcpListener(Address("127.0.0.1", 0), service, splice=splice)
    await listener.start()
    try:
        yield listener
    finally:
        listener.abort()


async def connect(listener: TcpListener) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert listener.bound is not None
    return await asyncio.open_connection("127.0.0.1", listener.bound.port)


@asynccontextmanager
async def server(handler: Callable[..., Awaitable[None]] = echo_handler):
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()


@contextmanager
def refused_port() -> Iterator[int]:
    """A port that refuses connections: bound, never listening (held so nobody else takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """Everything until EOF; a reset counts as the end."""
    chunks = []
    with suppress(ConnectionError):
        while data := await reader.read(65536):
            chunks.append(data)
    return b"".join(chunks)


def assert_released(service: ServiceState) -> None:
    for b in service.pool.all_backends():
        assert b.inflight == 0, b.key
        assert b.open_connections == 0, b.key


# -- relaying --------------------------------------------------------------------------------


def test_echo_and_counters(loop_name: str, splice: bool) -> None:
    async def main() -> None:
        async with server() as port:
            service = make_service([port])
            async with proxy(service, splice) as listener:
                reader, writer = await connect(listener)
                sent = 0
                for i in range(20):
                    msg = f"message {i} ".encode() * (i + 1)
                    writer.write(msg)
                    sent += len(msg)
                    assert await reader.readexactly(len(msg)) == msg
                backend = service.pool.backends[0]
                assert backend.inflight == 1 and backend.open_connections == 1
                assert listener.connections == 1
                assert tcp._PIPES.out == 0  # an idle connection holds no pipe
                writer.close()
                await wait_for(lambda: listener.connections == 0)
                assert listener.accepted == 1
                assert service.tcp_connections == 1
                assert service.bytes_in == sent == service.bytes_out
                assert backend.bytes_out == sent == backend.bytes_in
                assert backend.connections_total == 1
                assert_released(service)

    run(loop_name, main)


def test_large_transfer_both_ways_with_bounded_memory(loop_name: str, splice: bool) -> None:
    """50 MB each way at once, checksummed, while the proxy's Python allocations stay small."""
    size = 50 * 1024 * 1024
    rng = random.Random(1)
    up_data = rng.randbytes(size)
    down_data = rng.randbytes(size)
    up_sum = hashlib.sha256(up_data).hexdigest()
    down_sum = hashlib.sha256(down_data).hexdigest()
    results: dict[str, str] = {}
    buffers = {"client": bytearray(1 << 20), "backend": bytearray(1 << 20)}  # made before tracing

    def pump(sock: socket.socket, payload: bytes, name: str) -> None:
        """Send payload while reading the other way to EOF; record the received checksum."""

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        digest = hashlib.sha256()
        buf = buffers[name]
        while n := sock.recv_into(buf):
            digest.update(memoryview(buf)[:n])
        sender.join()
        sock.close()
        results[name] = digest.hexdigest()

    backend_sock = socket.create_server(("127.0.0.1", 0))
    backend_port = backend_sock.getsockname()[1]

    def backend() -> None:
        conn, _ = backend_sock.accept()
        pump(conn, down_data, "backend")

    async def main() -> tuple[int, int]:
        service = make_service([backend_port])
        async with proxy(service, splice) as listener:
            assert listener.bound is not None
            gc.collect()
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                threads = [threading.Thread(target=backend)]
                client = socket.create_connection(("127.0.0.1", listener.bound.port))
                threads.append(threading.Thread(target=pump, args=(client, up_data, "client")))
                for t in threads:
                    t.start()
                await wait_for(lambda: not any(t.is_alive() for t in threads), TIMEOUT - 2)
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
            await wait_for(lambda: listener.connections == 0)
            assert service.bytes_in == size == service.bytes_out
            b = service.pool.backends[0]
            assert b.bytes_in == size == b.bytes_out
            assert_released(service)
            return peak, size

    try:
        peak, _ = run(loop_name, main)
    finally:
        backend_sock.close()
    assert results == {"backend": up_sum, "client": down_sum}
    # The copy path keeps at most one copied tail per direction (<= 256 KiB each); the splice
    # path keeps none. The test's own threads and digests are traced too: 1 MiB is generous.
    assert peak < 1024 * 1024, f"proxy allocated {peak} bytes at peak"


def test_half_close_from_client(loop_name: str, splice: bool) -> None:
    """The client shuts down its sending side; the backend sees EOF and still answers."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # to EOF
        writer.write(b"got " + request)
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with server(handler) as port:
            service = make_service([port])
            async with proxy(service, splice) as listener:
                reader, writer = await connect(listener)
                writer.write(b"question")
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), 5) == b"got question"
                writer.close()
                await wait_for(lambda: listener.connections == 0)
                assert_released(service)

    run(loop_name, main)


def test_half_close_from_backend(loop_name: str, splice: bool) -> None:
    """The backend shuts down its sending side; the client sees EOF and can still send."""
    received: asyncio.Future[bytes] | None = None

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"greeting")
        writer.write_eof()
        data = await reader.read()
        assert received is not None
        received.set_result(data)
        writer.close()

    async def main() -> None:
        nonlocal received
        received = asyncio.get_running_loop().create_future()
        async with server(handler) as port:
            service = make_service([port])
            async with proxy(service, splice) as listener:
                reader, writer = await connect(listener)
                assert await asyncio.wait_for(reader.read(), 5) == b"greeting"
                writer.write(b"late words")
                writer.write_eof()
                assert await asyncio.wait_for(received, 5) == b"late words"
                await wait_for(lambda: listener.connections == 0)
                assert_released(service)
                writer.close()

    run(loop_name, main)


def test_client_reset_closes_backend_side(splice: bool) -> None:
    backend_eof: asyncio.Future[bytes] | None = None

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert backend_eof is not None
        backend_eof.set_result(await read_to_end(reader))
        writer.close()

    async def main() -> None:
        nonlocal backend_eof
        backend_eof = asyncio.get_running_loop().create_future()
        async with server(handler) as port:
            service = make_service([port])
            async with proxy(service, splice) as listener:
                assert listener.bound is not None
                sock = socket.create_connection(("127.0.0.1", listener.bound.port))
                sock.sendall(b"partial")
                await wait_for(lambda: service.bytes_in == 7)
                tcp._set_reset_on_close(sock)
                sock.close()  # RST
                assert await asyncio.wait_for(backend_eof, 5) == b"partial"
                await wait_for(lambda: listener.connections == 0)
                assert_released(service)

    run("uvloop", main)


def test_backend_closing_first_ends_the_client(splice: bool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with server(handler) as port:
            service = make_service([port])
            async with proxy(service, splice) as listener:
                reader, writer = await connect(listener)
                assert await asyncio.wait_for(read_to_end(reader), 5) == b"bye"
                writer.close()  # the client closes its side too: the connection is over
                await wait_for(lambda: listener.connections == 0)
                assert_released(service)

    run("uvloop", main)


def test_slow_reader_is_paused_not_buffered(splice: bool) -> None:
    """A client that does not read holds the backend back: the proxy keeps at most a chunk."""
    total = 64 * 1024 * 1024

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        block = b"x" * (1 << 20)
        with suppress(ConnectionError):
            for _ in range(total >> 20):
                writer.write(block)
                await writer.drain()
        writer.close()

    async def main() -> None:
        async with server(handler) as port:
            service = make_service([port])
            async with proxy(service, splice) as listener:
                assert listener.bound is not None
                sock = socket.create_connection(("127.0.0.1", listener.bound.port))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                backend = service.pool.backends[0]
                # wait until the transfer stalls on the client not reading
                last = -1
                while backend.bytes_in != last:
                    last = backend.bytes_in
                    await asyncio.sleep(0.2)
                held = service.pool.backends[0].bytes_in - service.bytes_out
                assert 0 <= held <= max(tcp.PIPE_SIZE, tcp.COPY_CHUNK)
                assert backend.bytes_in < total // 2  # the backend was held back
                sock.setblocking(False)
                got = 0
                while got < total:  # now read everything
                    try:
                        n = len(sock.recv(1 << 20))
                    except BlockingIOError:
                        await asyncio.sleep(0.001)
                        continue
                    assert n
                    got += n
                sock.close()
                await wait_for(lambda: listener.connections == 0)
                assert service.bytes_out == total

    run("uvloop", main)


# -- picking and connecting ------------------------------------------------------------------


def test_refused_backend_is_retried_on_another(loop_name: str, splice: bool) -> None:
    async def main() -> None:
        async with server() as port:
            with refused_port() as dead:
                # round-robin with equal weights starts with the first backend: the dead one
                service = make_service([dead, port], balance="round-robin")
                async with proxy(service, splice) as listener:
                    reader, writer = await connect(listener)
                    writer.write(b"ping")
                    assert await reader.readexactly(4) == b"ping"
                    bad, good = service.pool.backends
                    assert bad.failures == 1 and bad.connections_total == 0
                    assert good.connections_total == 1 and good.inflight == 1
                    writer.close()
                    await wait_for(lambda: listener.connections == 0)
                    assert_released(service)

    run(loop_name, main)


def test_all_backends_refusing_closes_client(loop_name: str) -> None:
    async def main() -> None:
        with refused_port() as a, refused_port() as b:
            service = make_service([a, b])
            async with proxy(service) as listener:
                reader, writer = await connect(listener)
                assert await asyncio.wait_for(read_to_end(reader), 5) == b""
                writer.close()
                await wait_for(lambda: listener.connections == 0)
                assert [x.failures for x in service.pool.backends] == [1, 1]
                assert service.shed == {"connect_failed": 1}
                assert_released(service)

    run(loop_name, main)


def test_connect_timeout_counts_a_failure_and_retries() -> None:
    async def main() -> None:
        # A listener with a full accept queue lets SYNs go unanswered: connects hang.
        with socket.socket() as stuck:
            stuck.bind(("127.0.0.1", 0))
            stuck.listen(0)
            filler = socket.create_connection(stuck.getsockname())
            try:
                async with server() as port:
                    service = make_service(
                        [stuck.getsockname()[1], port], balance="round-robin", connect_timeout=0.2
                    )
                    async with proxy(service) as listener:
                        t0 = time.monotonic()
                        reader, writer = await connect(listener)
                        writer.write(b"ping")
                        assert await reader.readexactly(4) == b"ping"
                        assert time.monotonic() - t0 >= 0.19
                        assert service.pool.backends[0].failures == 1
                        writer.close()
                        await wait_for(lambda: listener.connections == 0)
                        assert_released(service)
            finally:
                filler.close()

    run("uvloop", main)


def test_no_backend_closes_client(loop_name: str) -> None:
    async def main() -> None:
        service = make_service([])
        async with proxy(service) as listener:
            reader, writer = await connect(listener)
            assert await asyncio.wait_for(read_to_end(reader), 5) == b""
            writer.close()
            assert service.shed == {"no_backend": 1}
            assert service.tcp_connections == 1
            assert listener.connections == 0

    run(loop_name, main)


def test_hostname_backend_is_resolved() -> None:
    async def main() -> None:
        async with server() as port:
            spec = Service("svc", mode="tcp", backends=(Backend("localhost", port),))
            service = ServiceState(spec)
            async with proxy(service) as listener:
                reader, writer = await connect(listener)
                writer.write(b"named")
                assert await reader.readexactly(5) == b"named"
                writer.close()
                await wait_for(lambda: listener.connections == 0)
                assert_released(service)

    run("uvloop", main)


def test_least_loaded_spreads_open_connections_by_weight(loop_name: str) -> None:
    async def main() -> None:
        async with server() as p1, server() as p2, server() as p3:
            spec = Service(
                "svc",
                mode="tcp",
                backends=(
                    Backend("127.0.0.1", p1, weight=1),
                    Backend("127.0.0.1", p2, weight=1),
                    Backend("127.0.0.1", p3, weight=2),
                ),
            )
            service = ServiceState(spec, random.Random(3))
            async with proxy(service) as listener:
                clients = [await connect(listener) for _ in range(8)]
                for i, (reader, writer) in enumerate(clients):
                    writer.write(b"%d" % i)
                    assert await reader.readexactly(1) == b"%d" % i
                counts = [b.open_connections for b in service.pool.backends]
                assert counts == [2, 2, 4]
                assert [b.inflight for b in service.pool.backends] == [2, 2, 4]
                for _, writer in clients:
                    writer.close()
                await wait_for(lambda: listener.connections == 0)
                assert [b.connections_total for b in service.pool.backends] == [2, 2, 4]
                assert_released(service)

    run(loop_name, main)


def test_service_swap_applies_to_new_connections_only() -> None:
    async def main() -> None:
        async with server() as p1, server() as p2:
            old = make_service([p1])
            new = make_service([p2])
            async with proxy(old) as listener:
                r1, w1 = await connect(listener)
                w1.write(b"a")
                assert await r1.readexactly(1) == b"a"
                listener.service = new
                r2, w2 = await connect(listener)
                w2.write(b"b")
                assert await r2.readexactly(1) == b"b"
                w1.write(b"c")
                assert await r1.readexactly(1) == b"c"
                assert old.pool.backends[0].connections_total == 1
                assert new.pool.backends[0].connections_total == 1
                assert old.bytes_in == 2 and new.bytes_in == 1
                w1.close()
                w2.close()
                await wait_for(lambda: listener.connections == 0)

    run("uvloop", main)


def test_removed_backend_drains_and_is_released() -> None:
    async def main() -> None:
        async with server() as p1, server() as p2:
            service = make_service([p1])
            async with proxy(service) as listener:
                reader, writer = await connect(listener)
                writer.write(b"x")
                assert await reader.readexactly(1) == b"x"
                old = service.pool.backends[0]
                service.update(make_service([p2]).spec)  # p1 removed while a connection is open
                assert old.key in service.pool.draining
                writer.write(b"y")
                assert await reader.readexactly(1) == b"y"  # the open connection goes on
                writer.close()
                await wait_for(lambda: listener.connections == 0)
                assert old.key not in service.pool.draining
                assert old.inflight == 0

    run("uvloop", main)


# -- lifecycle -------------------------------------------------------------------------------


def test_stop_accepting_keeps_open_connections(loop_name: str, splice: bool) -> None:
    async def main() -> None:
        async with server() as port:
            service = make_service([port])
            async with proxy(service, splice) as listener:
                assert listener.bound is not None
                reader, writer = await connect(listener)
                writer.write(b"before")
                assert await reader.readexactly(6) == b"before"
                listener.stop_accepting()
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.open_connection("127.0.0.1", listener.bound.port)
                writer.write(b"after")
                assert await reader.readexactly(5) == b"after"
                writer.close()
                await asyncio.wait_for(listener.wait_closed(5), 6)
                assert listener.connections == 0
                assert_released(service)

    run(loop_name, main)


def test_wait_closed_aborts_at_the_timeout(loop_name: str) -> None:
    async def main() -> None:
        async with server() as port:
            service = make_service([port])
            async with proxy(service) as listener:
                reader, writer = await connect(listener)
                writer.write(b"hi")
                assert await reader.readexactly(2) == b"hi"
                listener.stop_accepting()
                t0 = time.monotonic()
                await listener.wait_closed(0.3)
                elapsed = time.monotonic() - t0
                assert 0.25 <= elapsed < 2
                assert listener.connections == 0
                assert await asyncio.wait_for(read_to_end(reader), 5) == b""
                writer.close()
                assert_released(service)

    run(loop_name, main)


def test_wait_closed_returns_when_the_last_connection_ends() -> None:
    async def main() -> None:
        async with server() as port:
            service = make_service([port])
            async with proxy(service) as listener:
                reader, writer = await connect(listener)
                writer.write(b"hi")
                assert await reader.readexactly(2) == b"hi"
                listener.stop_accepting()
                asyncio.get_running_loop().call_later(0.1, writer.close)
                t0 = time.monotonic()
                await listener.wait_closed(10)
                assert time.monotonic() - t0 < 5
                assert listener.connections == 0

    run("uvloop", main)


def test_abort_closes_everything_now(splice: bool) -> None:
    async def main() -> None:
        async with server() as port:
            service = make_service([port])
            listener = TcpListener(Address("127.0.0.1", 0), service, splice=splice)
            await listener.start()
            clients = [await connect(listener) for _ in range(3)]
            for reader, writer in clients:
                writer.write(b"z")
                assert await reader.readexactly(1) == b"z"
            listener.abort()
            assert listener.connections == 0
            for reader, writer in clients:
                with pytest.raises(ConnectionResetError):  # cut short, not a clean end
                    await asyncio.wait_for(reader.read(), 5)
                writer.close()
            assert_released(service)

    run("uvloop", main)


def test_bind_error_names_the_address() -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            listener = TcpListener(Address("127.0.0.1", port), make_service([]))
            with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
                await listener.start()

    run("uvloop", main)


def test_no_descriptor_leak_over_many_connections(splice: bool) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def main() -> None:
        async with server() as port:
            service = make_service([port])
            async with proxy(service, splice) as listener:
                for _ in range(5):  # warm up the pipe pool
                    reader, writer = await connect(listener)
                    writer.write(b"w")
                    await reader.readexactly(1)
                    writer.close()
                await wait_for(lambda: listener.connections == 0)
                before = open_fds()
                for _ in range(5):
                    clients = [await connect(listener) for _ in range(20)]
                    for _reader, writer in clients:
                        writer.write(b"." * 100_000)
                    for reader, writer in clients:
                        await reader.readexactly(100_000)
                        writer.close()
                        await writer.wait_closed()
                    await wait_for(lambda: listener.connections == 0)
                # the server side closes asynchronously; the pool may keep up to its size
                await wait_for(lambda: open_fds() <= before + 2 * tcp.PIPE_POOL_KEEP)
                assert tcp._PIPES.out == 0
                assert_released(service)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    run("uvloop", main)


def test_idle_connection_is_closed_after_idle_timeout(loop_name: str, splice: bool) -> None:
    """Traffic keeps a connection open; silence for idle_timeout closes it (via the runtime)."""
    from edgelb.control.runtime import Runtime
    from watchers.model import Snapshot

    async def main() -> None:
        async with server() as port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                lport = s.getsockname()[1]
            loop = asyncio.get_running_loop()
            rt = Runtime(loop=loop)
            svc = Service(
                "svc",
                mode="tcp",
                listen=Address("127.0.0.1", lport),
                backends=(Backend("127.0.0.1", port),),
                policy=Policy(idle_timeout=0.5),
            )
            await rt.apply(Snapshot("file", (svc,)))
            rt.listeners[str(svc.listen)].splice = splice
            rt.start_sweeper()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", lport)
                for i in range(4):  # 1.2 s of traffic every 0.3 s: longer than the timeout
                    if i:
                        await asyncio.sleep(0.3)
                    writer.write(b"ping")
                    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
                    last = time.monotonic()
                assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
                assert 0.45 <= time.monotonic() - last < 2.0
                writer.close()
                assert_released(rt.services["svc"])
            finally:
                await rt.shutdown(1.0)

    run(loop_name, main)
