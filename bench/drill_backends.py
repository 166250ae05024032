"""Capacity-limited HTTP backends that can be broken on command, for bench/drills.py.

    .venv/bin/python bench/drill_backends.py b1:8:0.005 b2:8:0.005 b3:8:0.005 b4:8:0.005

Each argument is NAME:WORKERS:SERVICE_SECONDS. A backend serves WORKERS requests at once, each
holding a worker for SERVICE_SECONDS; more wait in the backend's FIFO queue. `GET /healthz`
answers 200 at once without a worker while the backend is healthy. Every backend records the
highest number of requests it held at once (queued + in service + held by a hang), its
*concurrency*, so a drill can check a proxy's per-backend cap. Health checks are not counted.

Modes, switched at run time:
  ok     serve as above
  kill   the listener is closed and every connection reset (RST); nothing answers
  hang   connections are accepted and requests read, but nothing is ever answered (not even
         /healthz); the held connections are reset when the backend leaves this mode
  error  every request, /healthz included, gets 500 at once

Prints `PORTS b1=41001 ...` once every backend listens, then reads commands on stdin, one a
line, answering each with one line:
  set NAME MODE  ->  OK NAME MODE        (ERR <why> on a bad name or mode)
  stats          ->  STATS {json}        (per backend counters, see DrillBackend.stats)
  stats reset    ->  STATS {json}        (the same, and the counters start again from zero)
  reset          ->  OK reset            (zero the counters, the concurrency maximum included)
Runs until SIGTERM, SIGINT or stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import httptools

from bench import backends_main  # this script's folder is on sys.path when it runs

MODES = ("ok", "kill", "hang", "error")
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


@dataclass(frozen=True, slots=True)
class DrillSpec:
    name: str
    workers: int
    service_time: float  # seconds a request holds a worker


def parse_spec(text: str) -> DrillSpec:
    """'b1:8:0.005' -> DrillSpec('b1', 8, 0.005); errors name the argument and the format."""
    parts = text.split(":")
    try:
        if len(parts) != 3 or not parts[0]:
            raise ValueError
        spec = DrillSpec(parts[0], int(parts[1]), float(parts[2]))
    except ValueError:
        raise SystemExit(f"{text!r}: expected NAME:WORKERS:SERVICE_SECONDS, e.g. b1:8:0.005"
                         ) from None
    if spec.workers < 1 or spec.service_time < 0:
        raise SystemExit(f"{text!r}: workers must be >= 1 and the service time >= 0")
    return spec


class _Req:
    """One request (not a health check) from the moment it is read until it is finished."""

    __slots__ = ("conn", "done", "keep_alive", "serving")

    def __init__(self, conn: _Conn, keep_alive: bool) -> None:
        self.conn = conn
        self.keep_alive = keep_alive
        self.serving = False  # holds a worker: finished only when the worker frees
        self.done = False  # answered or dropped: no longer counted in the concurrency


class DrillBackend:
    """One backend. Counters are plain attributes, read through `stats()`."""

    def __init__(self, spec: DrillSpec, host: str = "127.0.0.1") -> None:
        self.spec = spec
        self.name = spec.name
        self.host = host
        self.port = 0
        self.mode = "ok"
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: set[_Conn] = set()
        self._queue: deque[_Req] = deque()
        self.busy = 0  # workers holding a request now
        self.concurrency = 0  # requests read and not finished (queued, in service or held)
        self.reset()

    def reset(self) -> None:
        """Zero the counters (the live `busy` and `concurrency` are facts, not counters)."""
        self.max_concurrency = self.concurrency
        self.requests = 0  # requests read (health checks not included)
        self.ok = 0  # answered 200 after holding a worker
        self.errors = 0  # answered 500 (error mode), health checks included
        self.health = 0  # /healthz answered 200
        self.held = 0  # requests read in hang mode (health checks included)
        self.connections = 0  # connections accepted

    # lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._listen()

    async def _listen(self) -> None:
        assert self._loop is not None
        self._server = await self._loop.create_server(
            lambda: _Conn(self), self.host, self.port, reuse_address=True, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and reset every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._reset_conns(lambda c: True)
        self._queue.clear()

    async def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        old, self.mode = self.mode, mode
        if old == "hang" and mode != "hang":
            self._reset_conns(lambda c: c.holding)  # a restarted process drops what it held
        if mode == "kill" and self._server is not None:
            self._server.close()
            self._server = None
            self._reset_conns(lambda c: True)
            for req in self._queue:
                self._drop(req)
            self._queue.clear()
        elif old == "kill" and mode != "kill":
            await self._listen()  # the same port again (SO_REUSEADDR)

    def _reset_conns(self, which: Callable[[_Conn], bool]) -> None:
        for conn in [c for c in self._conns if which(c)]:
            conn.reset()

    def stats(self) -> dict[str, object]:
        return {
            "mode": self.mode, "port": self.port, "workers": self.spec.workers,
            "service_ms": self.spec.service_time * 1000, "requests": self.requests,
            "ok": self.ok, "errors": self.errors, "health": self.health, "held": self.held,
            "connections": self.connections, "open_connections": len(self._conns),
            "concurrency": self.concurrency, "max_concurrency": self.max_concurrency,
            "busy": self.busy, "queued": len(self._queue),
        }

    # requests

    def _admit(self, req: _Req) -> None:
        self.requests += 1
        self.concurrency += 1
        if self.concurrency > self.max_concurrency:
            self.max_concurrency = self.concurrency
        if self.mode == "hang":
            self.held += 1
            req.conn.holding = True
        elif self.busy < self.spec.workers:
            self._serve(req)
        else:
            self._queue.append(req)

    def _serve(self, req: _Req) -> None:
        assert self._loop is not None
        self.busy += 1
        req.serving = True
        self._loop.call_later(self.spec.service_time, self._served, req)

    def _served(self, req: _Req) -> None:
        """A worker is free again (even when the client went away meanwhile)."""
        self.busy -= 1
        if not req.done:
            req.done = True
            self.concurrency -= 1
            if req.conn.answer(200, b"ok\n", req.keep_alive):
                self.ok += 1
        while self._queue and self.busy < self.spec.workers:
            nxt = self._queue.popleft()
            if not nxt.done:
                self._serve(nxt)

    def _drop(self, req: _Req) -> None:
        """A request whose connection is gone: no longer counted unless a worker holds it."""
        if not req.done:
            req.done = True
            self.concurrency -= 1


class _Conn(asyncio.Protocol):
    """One client connection: requests are answered one at a time, in order."""

    def __init__(self, backend: DrillBackend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.pending: deque[tuple[bytes, bool]] = deque()  # (path, keep-alive) not started
        self.current: _Req | None = None  # the request being served or held
        self.active = False
        self.holding = False  # a request is held by a hang
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.backend.connections += 1
        self.backend._conns.add(self)
        if self.backend.mode == "kill":  # accepted just before the listener closed
            self.reset()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.reset()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.pending.append((self.url.split(b"?", 1)[0], self.parser.should_keep_alive()))
        self._next()

    def _next(self) -> None:
        if self.active or self.closed or not self.pending:
            return
        path, keep_alive = self.pending.popleft()
        self.active = True
        b = self.backend
        if b.mode == "error":
            b.errors += 1
            self.answer(500, b"error\n", keep_alive)
        elif path == b"/healthz":
            if b.mode == "hang":
                b.held += 1
                self.holding = True
            else:
                b.health += 1
                self.answer(200, b"ok\n", keep_alive)
        else:
            self.current = _Req(self, keep_alive)
            b._admit(self.current)

    def answer(self, status: int, body: bytes, keep_alive: bool) -> bool:
        """Write a response; False when the connection is already gone."""
        if self.closed or self.transport is None:
            return False
        reason = b"OK" if status == 200 else b"Internal Server Error"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"X-Backend: %s\r\nConnection: %s\r\n\r\n%s"
            % (status, reason, len(body), self.backend.name.encode(),
               b"keep-alive" if keep_alive else b"close", body))
        self.active = False
        self.current = None
        if not keep_alive:
            self.closed = True
            self.transport.close()
            self._gone()
        else:
            self._next()
        return True

    def reset(self) -> None:
        """Close with a TCP reset, as a killed process's kernel would."""
        if self.transport is not None and not self.closed:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
            self.transport.abort()
        self._gone()

    def _gone(self) -> None:
        self.closed = True
        self.pending.clear()
        self.backend._conns.discard(self)
        if self.current is not None and not self.current.serving:
            self.backend._drop(self.current)  # queued (skipped when dequeued) or held
        self.current = None
        self.holding = False


async def start_backends(specs: list[DrillSpec], host: str = "127.0.0.1") -> list[DrillBackend]:
    started: list[DrillBackend] = []
    try:
        for spec in specs:
            b = DrillBackend(spec, host)
            await b.start()
            started.append(b)
    except BaseException:
        for b in started:
            await b.close()
        raise
    return started


async def _command(backends: dict[str, DrillBackend], line: str) -> str:
    words = line.split()
    if words in (["stats"], ["stats", "reset"]):
        line = "STATS " + json.dumps({n: b.stats() for n, b in backends.items()})
        if len(words) == 2:
            for b in backends.values():
                b.reset()
        return line
    if words == ["reset"]:
        for b in backends.values():
            b.reset()
        return "OK reset"
    if len(words) == 3 and words[0] == "set":
        b = backends.get(words[1])
        if b is None:
            return f"ERR unknown backend {words[1]!r}; known: {', '.join(backends)}"
        try:
            await b.set_mode(words[2])
        except (ValueError, OSError) as exc:
            return f"ERR {words[1]}: {exc}"
        return f"OK {words[1]} {words[2]}"
    return (f"ERR unknown command {line.strip()!r}; "
            "use: set NAME MODE | stats | stats reset | reset")


def _read_commands(loop: asyncio.AbstractEventLoop, backends: dict[str, DrillBackend],
                   stop: asyncio.Event) -> None:
    """Blocking stdin reader (a daemon thread); each command runs in the event loop."""
    for line in sys.stdin:
        if not line.strip():
            continue
        fut = asyncio.run_coroutine_threadsafe(_command(backends, line), loop)
        try:
            print(fut.result(10), flush=True)
        except Exception as exc:  # keep answering: the drill waits for one line per command
            print(f"ERR {type(exc).__name__}: {exc}", flush=True)
    loop.call_soon_threadsafe(stop.set)


async def serve(specs: list[DrillSpec]) -> None:
    started = await start_backends(specs)
    backends = {b.name: b for b in started}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("PORTS " + " ".join(f"{b.name}={b.port}" for b in started), flush=True)
    threading.Thread(target=_read_commands, args=(loop, backends, stop), daemon=True).start()
    try:
        await stop.wait()
    finally:
        for b in started:
            await b.close()


def main(argv: list[str]) -> int:
    return backends_main(argv, __doc__, parse_spec, serve)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
