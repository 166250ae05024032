"""A small HTTP/2 client on hyper-h2 for tests: real frames on a real socket, with the knobs
an attacker has (no window updates, resets, raw frames)."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions


@dataclass
class Response:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    ended: bool = False
    reset: int | None = None

    @property
    def status(self) -> int:
        return int(self.headers.get(b":status", b"0"))


class H2Client:
    """One HTTP/2 connection. `auto_window`: give back received data's window (a reader);
    False: never (a zero-window staller)."""

    def __init__(self, auto_window: bool = True) -> None:
        self.auto_window = auto_window
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        self.responses: dict[int, Response] = {}
        self.outbox: dict[int, list] = {}  # request bodies waiting for window
        self.goaway: int | None = None
        self.closed = asyncio.Event()
        self.changed = asyncio.Event()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def connect(self, port: int, ctx: ssl.SSLContext | None = None,
                      server_hostname: str | None = None) -> H2Client:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=server_hostname)
        self.conn.initiate_connection()
        self.flush()
        self._task = asyncio.get_running_loop().create_task(self._read())
        return self

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    def raw(self, data: bytes) -> None:
        assert self.writer is not None
        if not self.writer.is_closing() and not self.closed.is_set():
            self.writer.write(data)

    async def _read(self) -> None:
        assert self.reader is not None
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for ev in events:
                    self._event(ev)
                if self.outbox:
                    self._pump()
                self.flush()
                self.changed.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            self.changed.set()

    def _event(self, ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", None)
        r = self.responses.setdefault(sid, Response()) if sid else None
        if isinstance(ev, h2.events.ResponseReceived):
            assert r is not None
            r.headers = dict(ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            assert r is not None
            r.body += ev.data
            if self.auto_window:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            assert r is not None
            r.trailers = dict(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            assert r is not None
            r.ended = True
        elif isinstance(ev, h2.events.StreamReset):
            assert r is not None
            r.reset = ev.error_code
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev.error_code

    def request(self, path: str = "/", method: str = "GET", body: bytes | None = None,
                headers: list[tuple[str, str]] | None = None, authority: str = "x.test",
                end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":scheme", "http"), (":authority", authority),
                  (":path", path), *(headers or [])]
        self.conn.send_headers(sid, [(k.encode(), v.encode()) for k, v in fields],
                               end_stream=end and body is None)
        self.responses[sid] = Response()
        if body is not None:
            self.send_body(sid, body, end)
        self.flush()
        return sid

    def send_body(self, sid: int, body: bytes, end: bool = True) -> None:
        """Queue `body`: sent as the windows allow (the rest when they open)."""
        self.outbox[sid] = [body, end]
        self._pump()

    def _pump(self) -> None:
        for sid, item in list(self.outbox.items()):
            body, end = item
            try:
                while body:
                    n = min(len(body), self.conn.local_flow_control_window(sid),
                            self.conn.max_outbound_frame_size)
                    if n <= 0:
                        break
                    self.conn.send_data(sid, body[:n])
                    body = body[n:]
                item[0] = body
                if not body:
                    del self.outbox[sid]
                    if end:
                        self.conn.end_stream(sid)
            except h2.exceptions.StreamClosedError:
                del self.outbox[sid]
        self.flush()

    async def wait(self, predicate, timeout: float = 10.0) -> None:
        async def loop() -> None:
            while not predicate():
                if self.closed.is_set():
                    if predicate():
                        return
                    raise ConnectionError("connection closed while waiting")
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(loop(), timeout)

    async def response(self, sid: int, timeout: float = 10.0) -> Response:
        r = self.responses[sid]
        await self.wait(lambda: r.ended or r.reset is not None, timeout)
        return r

    async def get(self, path: str = "/", **kw) -> Response:
        return await self.response(self.request(path, **kw))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
