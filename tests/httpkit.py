"""Test helpers for the HTTP data path: scriptable backends, a raw client, a runtime in-loop.

Everything runs on 127.0.0.1 in the test's own event loop. The backend is a raw-socket HTTP/1.1
server (asyncio streams, no HTTP library) that records what reached it, byte-exact enough to
assert on the proxy's header rewriting and body framing. Each request is handed to a handler
(`async def handler(call: Call) -> None`) that decides how to answer; the factories below
(`ok`, `echo`, `chunked`, `close_delimited`, `continue_then`, `upgrade_echo`, `hang`,
`reset_after_request`, `raw`, ...) cover the usual cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from edgelb.control.runtime import EntrypointSpec, Runtime
from watchers.model import Address, Backend, Policy, Route, Service, Settings, Snapshot

HOST = "127.0.0.1"
CHUNK = 64 * 1024
Headers = list[tuple[str, str]]


STEP = 5.0  # seconds any single awaited step of a test may take


def within(coro, timeout: float = STEP):
    """Await `coro`, failing the test if it takes longer than `timeout` seconds."""
    return asyncio.wait_for(coro, timeout)


_given_ports: set[int] = set()  # handed out by free_port in this process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to 0, then closed), and not
    one handed out before in this process: two calls in a row may otherwise get the same port
    from the kernel, and a test that asked for two would bind one of them twice."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _given_ports:
            if len(_given_ports) > 8192:
                _given_ports.clear()
            _given_ports.add(port)
            return port
    raise RuntimeError("no fresh free port on 127.0.0.1")


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A tcp backend that sends back every byte it reads."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def tcp_echo_server() -> tuple[asyncio.AbstractServer, int]:
    """A TCP echo server on 127.0.0.1 (a tcp-mode backend); (server, port). Close it after."""
    server = await asyncio.start_server(echo_handler, HOST, 0)
    return server, server.sockets[0].getsockname()[1]


def closed_port() -> int:
    """A port where nothing listens: connecting to it is refused."""
    return free_port()


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0,
                     what: str = "the condition") -> None:
    """Poll `predicate` (every 10 ms) until it holds; fail after `timeout` seconds. For state
    that changes without an event to await (proxy counters, closed connections)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout:g}s")
        await asyncio.sleep(0.01)


class Blackhole:
    """A port that accepts no connection: its backlog is full, so a connect hangs until the
    caller's timeout (SYNs are dropped). `close()` releases it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((HOST, 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self._fillers = []
        for _ in range(3):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect((HOST, self.port))
            self._fillers.append(c)

    def close(self) -> None:
        for c in self._fillers:
            c.close()
        self.sock.close()


def _get(headers: Headers, name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _all(headers: Headers, name: str) -> list[str]:
    name = name.lower()
    return [v for k, v in headers if k.lower() == name]


def _parse_headers(lines: Sequence[str]) -> Headers:
    out: Headers = []
    for line in lines:
        if not line:
            continue
        name, _, value = line.partition(":")
        out.append((name.strip(), value.strip()))
    return out


async def _read_chunked(
    reader: asyncio.StreamReader, sink: Callable[[bytes], None]
) -> Headers:
    """Read a chunked body, feeding each piece to `sink`; returns the trailers."""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            break
        left = size
        while left:
            piece = await reader.read(min(left, CHUNK))
            if not piece:
                raise asyncio.IncompleteReadError(b"", left)
            sink(piece)
            left -= len(piece)
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
    trailer_lines = []
    while True:
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            break
        trailer_lines.append(line.decode("latin-1").rstrip("\r\n"))
    return _parse_headers(trailer_lines)


async def _read_exact(
    reader: asyncio.StreamReader, n: int, sink: Callable[[bytes], None]
) -> None:
    while n:
        piece = await reader.read(min(n, CHUNK))
        if not piece:
            raise asyncio.IncompleteReadError(b"", n)
        sink(piece)
        n -= len(piece)


class BodySink:
    """Collects a body, or only its size and digest when `keep` is false (large transfers)."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.parts: list[bytes] = []
        self.size = 0
        self.digest = hashlib.sha256()

    def __call__(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.keep:
            self.parts.append(piece)
        else:
            self.digest.update(piece)

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


# -- the backend --------------------------------------------------------------------------


@dataclass
class Request:
    """One request as the backend received it."""

    method: str
    target: str
    version: str
    headers: Headers
    head: bytes  # the raw request head, up to and including the blank line
    conn: int  # 1-based number of the backend connection it arrived on
    body: bytes = b""
    body_size: int = 0
    body_sha256: str = ""
    trailers: Headers = field(default_factory=list)
    complete: bool = False  # the whole body arrived

    def get(self, name: str) -> str | None:
        return _get(self.headers, name)

    def all(self, name: str) -> list[str]:
        return _all(self.headers, name)

    def has(self, name: str) -> bool:
        return _get(self.headers, name) is not None

    @property
    def chunked(self) -> bool:
        return "chunked" in (self.get("transfer-encoding") or "").lower()


class Call:
    """One request being answered by a handler: read the body, write the response."""

    def __init__(
        self, backend: HttpBackend, req: Request, reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.backend = backend
        self.req = req
        self.reader = reader
        self.writer = writer
        self.body_done = False
        self.closed = False

    async def read_body(self, sink: Callable[[bytes], None] | None = None) -> bytes:
        """Read the whole request body (recorded on the Request) and return it if kept."""
        if self.body_done:
            return self.req.body
        self.body_done = True
        req = self.req
        store = BodySink(self.backend.keep_bodies)

        def feed(piece: bytes) -> None:
            store(piece)
            if sink is not None:
                sink(piece)

        if req.chunked:
            req.trailers = await _read_chunked(self.reader, feed)
        else:
            length = req.get("content-length")
            if length:
                await _read_exact(self.reader, int(length), feed)
        req.body = store.body
        req.body_size = store.size
        req.body_sha256 = store.digest.hexdigest()
        req.complete = True
        self.backend.changed()
        return req.body

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def respond(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
        *,
        framing: str = "length",
        reason: str = "OK",
        trailers: Iterable[tuple[str, str]] = (),
        read_body: bool = True,
    ) -> None:
        """Answer with `body`, framed by Content-Length ("length"), "chunked" or "close"."""
        if read_body:
            await self.read_body()
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"x-backend: {self.backend.name}")
        if framing == "length":
            lines.append(f"content-length: {len(body)}")
        elif framing == "chunked":
            lines.append("transfer-encoding: chunked")
        elif framing == "close":
            lines.append("connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if framing == "chunked":
            out = [head]
            if body:
                out.append(b"%x\r\n%s\r\n" % (len(body), body))
            out.append(b"0\r\n")
            out += [f"{k}: {v}\r\n".encode("latin-1") for k, v in trailers]
            out.append(b"\r\n")
            self.writer.writelines(out)
        else:
            self.writer.writelines([head, body])
        await self.writer.drain()
        if framing == "close":
            self.close()

    def close(self) -> None:
        self.closed = True
        self.writer.close()

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0)."""
        self.closed = True
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Call], Awaitable[None]]


class HttpBackend:
    """A scriptable HTTP/1.1 backend on 127.0.0.1 that records what it received."""

    def __init__(self, name: str = "b", handler: Handler | None = None) -> None:
        self.name = name
        self.handler: Handler = handler or ok()
        self.requests: list[Request] = []
        self.connections = 0  # accepted in total
        self.open = 0  # open now
        self.keep_bodies = True
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._event = asyncio.Event()

    @property
    def address(self) -> Address:
        return Address(HOST, self.port)

    @property
    def spec(self) -> Backend:
        return Backend(HOST, self.port)

    async def start(self, port: int = 0) -> HttpBackend:
        self._server = await asyncio.start_server(self._serve, HOST, port, limit=256 * 1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    def changed(self) -> None:
        self._event.set()

    async def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until `predicate()` holds (checked on every recorded change)."""

        async def loop() -> None:
            while not predicate():
                self._event.clear()
                await self._event.wait()

        await asyncio.wait_for(loop(), timeout)

    async def wait_requests(self, n: int, timeout: float = 5.0) -> None:
        await self.wait(lambda: len(self.requests) >= n, timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        cid = self.connections
        self._writers.add(writer)
        self.changed()
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                text = head.decode("latin-1").split("\r\n")
                method, target, version = text[0].split(" ", 2)
                req = Request(method, target, version, _parse_headers(text[1:]), head, cid)
                self.requests.append(req)
                self.changed()
                call = Call(self, req, reader, writer)
                await self.handler(call)
                if call.closed:
                    break
                await call.read_body()
                await writer.drain()
                conn = (req.get("connection") or "").lower()
                if "close" in conn or version == "HTTP/1.0":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            self.open -= 1
            writer.close()
            self.changed()


# -- handler factories ------------------------------------------------------------------


def ok(body: bytes | None = None, status: int = 200, headers: Headers | None = None) -> Handler:
    """Content-Length response; the default body names the backend and the request."""

    async def handler(call: Call) -> None:
        text = body
        if text is None:
            text = f"{call.backend.name} {call.req.method} {call.req.target}".encode()
        await call.respond(status, text, headers or [])

    return handler


def echo() -> Handler:
    """Answer with the request body (Content-Length)."""

    async def handler(call: Call) -> None:
        data = await call.read_body()
        await call.respond(200, data)

    return handler


def chunked(
    parts: Sequence[bytes],
    trailers: Sequence[tuple[str, str]] = (),
    headers: Sequence[tuple[str, str]] = (),
) -> Handler:
    """A chunked response written as one chunk per part, then the trailers."""

    async def handler(call: Call) -> None:
        await call.read_body()
        lines = ["HTTP/1.1 200 OK", "transfer-encoding: chunked", f"x-backend: {call.backend.name}"]
        if trailers:
            lines.append("trailer: " + ", ".join(k for k, _ in trailers))
        lines += [f"{k}: {v}" for k, v in headers]
        out = [("\r\n".join(lines) + "\r\n\r\n").encode()]
        for p in parts:
            out.append(b"%x\r\n%s\r\n" % (len(p), p))
        out.append(b"0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers) + b"\r\n")
        for piece in out:
            call.write(piece)
            await call.drain()

    return handler


def close_delimited(body: bytes) -> Handler:
    """No Content-Length, no chunking: the body ends when the backend closes."""

    async def handler(call: Call) -> None:
        await call.read_body()
        call.write(b"HTTP/1.1 200 OK\r\nx-backend: %s\r\n\r\n" % call.backend.name.encode())
        call.write(body)
        await call.drain()
        call.close()

    return handler


def raw(data: bytes, close: bool = False) -> Handler:
    """Write `data` as the response, byte for byte (e.g. a malformed one)."""

    async def handler(call: Call) -> None:
        await call.read_body()
        call.write(data)
        await call.drain()
        if close:
            call.close()

    return handler


def hang() -> Handler:
    """Read the request and never answer (until the connection is closed)."""

    async def handler(call: Call) -> None:
        await call.read_body()
        await call.reader.read()  # returns at EOF
        call.close()

    return handler


def slow(delay: float, body: bytes = b"slow") -> Handler:
    async def handler(call: Call) -> None:
        await call.read_body()
        await asyncio.sleep(delay)
        await call.respond(200, body)

    return handler


def reset_after_request() -> Handler:
    """Read the whole request, then reset the connection without answering."""

    async def handler(call: Call) -> None:
        await call.read_body()
        call.reset()

    return handler


def continue_then(body: bytes = b"continued") -> Handler:
    """Send `100 Continue` when asked to, then read the body and answer with its size."""

    async def handler(call: Call) -> None:
        if (call.req.get("expect") or "").lower() == "100-continue":
            call.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await call.drain()
        data = await call.read_body()
        await call.respond(200, body + b" %d" % len(data))

    return handler


def upgrade_echo(protocol: str = "echo") -> Handler:
    """Switch protocols with a 101, then echo every byte back until the peer closes."""

    async def handler(call: Call) -> None:
        call.write(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: %s\r\n\r\n"
            % protocol.encode()
        )
        await call.drain()
        while True:
            data = await call.reader.read(CHUNK)
            if not data:
                break
            call.write(data)
            await call.drain()
        call.close()

    return handler


def by_path(routes: dict[str, Handler], default: Handler | None = None) -> Handler:
    """Dispatch on the request target's path."""
    fallback = default or ok()

    async def handler(call: Call) -> None:
        path = call.req.target.split("?", 1)[0]
        await routes.get(path, fallback)(call)

    return handler


# -- the raw client ---------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: Headers
    head: bytes
    body: bytes = b""
    body_size: int = 0
    body_sha256: str = ""
    trailers: Headers = field(default_factory=list)
    framing: str = "none"  # length | chunked | close | none

    def get(self, name: str) -> str | None:
        return _get(self.headers, name)

    def all(self, name: str) -> list[str]:
        return _all(self.headers, name)

    def has(self, name: str) -> bool:
        return _get(self.headers, name) is not None


def build_request(
    method: str = "GET",
    target: str = "/",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    host: str | None = "test.local",
    version: str = "1.1",
    length: bool = True,
) -> bytes:
    """A request as bytes; Content-Length is added for a body unless `length` is false."""
    lines = [f"{method} {target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body and length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Client:
    """A raw HTTP client connection: send bytes, read responses with exact framing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = HOST) -> Client:
        reader, writer = await asyncio.open_connection(host, port, limit=256 * 1024)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(
        self, method: str = "GET", target: str = "/", headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"", **kw: object,
    ) -> Response:
        await self.send(build_request(method, target, headers, body, **kw))  # type: ignore[arg-type]
        return await self.response(method)

    async def read_head(self) -> Response:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status, *rest = lines[0].split(" ", 2)
        return Response(int(status), rest[0] if rest else "", version, _parse_headers(lines[1:]),
                        head)

    async def response(
        self, method: str = "GET", *, interim: bool = False, keep: bool = True,
        sink: Callable[[bytes], None] | None = None,
    ) -> Response:
        """Read one response. 1xx responses are skipped unless `interim`."""
        while True:
            resp = await self.read_head()
            if resp.status >= 200 or interim or resp.status == 101:
                break
        await self.read_body(resp, method, keep=keep, sink=sink)
        return resp

    async def read_body(
        self, resp: Response, method: str = "GET", *, keep: bool = True,
        sink: Callable[[bytes], None] | None = None,
    ) -> None:
        store = BodySink(keep)

        def feed(piece: bytes) -> None:
            store(piece)
            if sink is not None:
                sink(piece)

        te = (resp.get("transfer-encoding") or "").lower()
        length = resp.get("content-length")
        if method == "HEAD" or resp.status < 200 or resp.status in (204, 304):
            resp.framing = "none"
        elif "chunked" in te:
            resp.framing = "chunked"
            resp.trailers = await _read_chunked(self.reader, feed)
        elif length is not None:
            resp.framing = "length"
            await _read_exact(self.reader, int(length), feed)
        else:
            resp.framing = "close"
            while True:
                piece = await self.reader.read(CHUNK)
                if not piece:
                    break
                feed(piece)
        resp.body = store.body
        resp.body_size = store.size
        resp.body_sha256 = store.digest.hexdigest()

    async def at_eof(self, timeout: float = 3.0) -> bytes:
        """Read until the proxy closes the connection; returns whatever came before."""

        async def rest() -> bytes:
            out = b""
            while True:
                try:
                    piece = await self.reader.read(CHUNK)
                except ConnectionError:
                    return out
                if not piece:
                    return out
                out += piece

        return await asyncio.wait_for(rest(), timeout)

    def close(self) -> None:
        self.writer.close()


async def fetch(port: int, method: str = "GET", target: str = "/", **kw: object) -> Response:
    """One request on a fresh connection, closed afterwards."""
    client = await Client.open(port)
    try:
        return await client.request(method, target, **kw)  # type: ignore[arg-type]
    finally:
        client.close()


# -- the proxy under test ---------------------------------------------------------------


def service(
    name: str,
    backends: Iterable[HttpBackend | Backend | Address | int],
    *,
    listen: int | None = None,
    mode: str = "http",
    **policy: object,
) -> Service:
    """A Service; `backends` may be HttpBackends, Backends, Addresses or bare ports."""
    specs = []
    for b in backends:
        if isinstance(b, HttpBackend):
            specs.append(b.spec)
        elif isinstance(b, Backend):
            specs.append(b)
        elif isinstance(b, Address):
            specs.append(Backend(b.host, b.port))
        else:
            specs.append(Backend(HOST, int(b)))
    return Service(
        name=name,
        mode=mode,
        listen=Address(HOST, listen) if listen is not None else None,
        backends=tuple(specs),
        policy=Policy(**policy),  # type: ignore[arg-type]
    )


def snapshot(*services: Service, routes: Iterable[Route] = (), source: str = "file") -> Snapshot:
    return Snapshot(source=source, services=tuple(services), routes=tuple(routes))


async def start_runtime(
    snap: Snapshot | None = None,
    *,
    entrypoints: Iterable[tuple[str, int]] = (),
    defaults: Policy | None = None,
) -> Runtime:
    """A Runtime in the running loop, with `snap` applied and the deadline sweeper on."""
    runtime = Runtime(loop=asyncio.get_running_loop(), settings=Settings(grace=1.0))
    eps = [EntrypointSpec(name, Address(HOST, port)) for name, port in entrypoints]
    if eps or defaults is not None:
        await runtime.set_entrypoints(eps, defaults or Policy())
    if snap is not None:
        await runtime.apply(snap)
    runtime.start_sweeper()
    return runtime


@contextlib.asynccontextmanager
async def running(
    snap: Snapshot | None = None, **kw: object
) -> AsyncIterator[Runtime]:
    runtime = await start_runtime(snap, **kw)  # type: ignore[arg-type]
    try:
        yield runtime
    finally:
        await runtime.shutdown(0.2)
