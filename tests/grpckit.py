"""Real gRPC (grpcio) servers and clients for tests, on raw bytes (no generated stubs): the
methods of a test service `t.Echo`, served by grpcio's own HTTP/2 server (threads), and
calls made from a thread so that the event loop running edgelb goes on meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

BIG = 32 * 1024 * 1024  # message size limit on both ends (the tests send 16 MiB)
OPTIONS = [("grpc.max_send_message_length", BIG), ("grpc.max_receive_message_length", BIG)]
HEALTH = "/grpc.health.v1.Health/Check"
SERVING, NOT_SERVING = 1, 2


class GrpcBackend:
    """A grpcio server answering `t.Echo` (and grpc.health.v1 Check) on 127.0.0.1; `name`
    tags each answer so that tests see which backend served a call."""

    def __init__(self, name: str, tls: tuple[bytes, bytes] | None = None) -> None:
        self.name = name
        self.calls: list[str] = []
        self.cancelled = threading.Event()
        self.health = SERVING
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=OPTIONS)
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "Fail": grpc.unary_unary_rpc_method_handler(self._fail),
            "Sleep": grpc.unary_unary_rpc_method_handler(self._sleep),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
        }
        self.server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("t.Echo", handlers),
            grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
                "Check": grpc.unary_unary_rpc_method_handler(self._health)}),
        ))
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0).wait(5)

    def _note(self, method: str) -> None:
        with self.lock:
            self.calls.append(method)

    def _unary(self, request: bytes, context: Any) -> bytes:
        self._note("Unary")
        if len(request) > 1024:
            return request[::-1]  # a big message: sent back reversed (proves every byte)
        return self.name.encode() + b":" + request

    def _fail(self, request: bytes, context: Any) -> bytes:
        self._note("Fail")
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())

    def _sleep(self, request: bytes, context: Any) -> bytes:
        self._note("Sleep")
        deadline = time.monotonic() + float(request.decode() or "5")
        while time.monotonic() < deadline:
            if not context.is_active():
                self.cancelled.set()
                return b""
            time.sleep(0.02)
        return b"slept"

    def _server_stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        self._note("ServerStream")
        for i in range(int(request.decode())):
            yield b"%d" % i

    def _client_stream(self, requests: Iterator[bytes], context: Any) -> bytes:
        self._note("ClientStream")
        return b",".join(requests)

    def _bidi(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        self._note("Bidi")
        for r in requests:
            yield r.upper()

    def _health(self, request: bytes, context: Any) -> bytes:
        return bytes([0x08, self.health])  # HealthCheckResponse{status}


class GrpcClient:
    """A grpcio channel to edgelb (insecure: h2c; or TLS with `ca`); every call runs in a
    thread and is awaited."""

    def __init__(self, port: int, ca: bytes | None = None, name: str = "") -> None:
        target = f"127.0.0.1:{port}"
        if ca is None:
            self.channel = grpc.insecure_channel(target, options=OPTIONS)
        else:
            opts = [*OPTIONS, ("grpc.ssl_target_name_override", name)]
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca), opts)

    def close(self) -> None:
        self.channel.close()

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.to_thread(fn)

    async def unary(self, data: bytes, method: str = "/t.Echo/Unary", **kw: Any) -> bytes:
        call = self.channel.unary_unary(method)
        return await self.run(lambda: call(data, **kw))

    async def server_stream(self, n: int) -> list[bytes]:
        call = self.channel.unary_stream("/t.Echo/ServerStream")
        return await self.run(lambda: list(call(b"%d" % n, timeout=10)))

    async def client_stream(self, parts: list[bytes]) -> bytes:
        call = self.channel.stream_unary("/t.Echo/ClientStream")
        return await self.run(lambda: call(iter(parts), timeout=10))

    async def bidi(self, parts: list[bytes]) -> list[bytes]:
        """Each message sent only after the answer to the previous one came: the call is
        really interleaved (a proxy that waited for the request's end would hang)."""
        call = self.channel.stream_stream("/t.Echo/Bidi")

        def go() -> list[bytes]:
            import queue

            q: queue.Queue[bytes | None] = queue.Queue()
            for p in parts[:1]:
                q.put(p)

            def requests() -> Iterator[bytes]:
                while True:
                    item = q.get(timeout=10)
                    if item is None:
                        return
                    yield item

            got: list[bytes] = []
            for answer in call(requests(), timeout=10):
                got.append(answer)
                q.put(parts[len(got)] if len(got) < len(parts) else None)
            return got

        return await self.run(go)


def code_of(e: BaseException) -> grpc.StatusCode | None:
    return e.code() if isinstance(e, grpc.RpcError) else None  # type: ignore[attr-defined]
