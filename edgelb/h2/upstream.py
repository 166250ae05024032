"""HTTP/2 to backends (`backend_protocol: h2c`, or `h2`: TLS with ALPN h2): few shared
connections per backend address, each request one stream on one of them.

The HTTP/1.1 upstream protocol (edgelb/http/upstream.py) serves these requests unchanged:
`open_lane` is its `loop.create_connection` for such a service and gives it, in place of a TCP
connection, a Lane: a transport over one shared H2UpstreamConnection that turns the HTTP/1.1
request it writes into HEADERS, DATA and trailers of a new stream, and the stream's response
back into HTTP/1.1 bytes for its parser. So retries, timeouts, caps, accounting and parking
(a parked lane is an idle slot; its next request opens the next stream) are the ones every
request gets. A lane is bound to one connection; a connection takes no more lanes than the
backend's SETTINGS_MAX_CONCURRENT_STREAMS, so a lane can always open its stream.

Flow control both ways per stream: request body waits for the backend's window (past
REQUEST_HIGH bytes the client's reading pauses, through the upstream protocol's
pause_writing); response data is acknowledged (WINDOW_UPDATE) only while the upstream protocol
reads, so a slow client closes its stream's window at the backend and no other.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import httptools
from h2.errors import ErrorCodes

from edgelb.h2.limits import CONN_WINDOW, HPACK_TABLE, MAX_HEADER_LIST, STREAM_WINDOW
from edgelb.net.backend_tls import client_context, server_hostname

log = logging.getLogger("edgelb.h2")

REQUEST_HIGH = 256 * 1024  # request body held for a stream's window before the client pauses
REQUEST_LOW = 64 * 1024  # ... and resumed below this
DEFAULT_STREAMS = 100  # lanes per connection until the backend's SETTINGS say otherwise
_SC = h2.settings.SettingCodes
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                  b"upgrade", b"host", b"te"})
_RESPONSE_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                           b"transfer-encoding", b"upgrade"})

# open connections by (host, port, backend_protocol, BackendTLS), and connections being opened
_conns: dict[tuple[Any, ...], list[H2UpstreamConnection]] = {}
_opening: dict[tuple[Any, ...], asyncio.Future[H2UpstreamConnection]] = {}


class NotHTTP2(ConnectionError):
    """The backend did not choose h2 by ALPN."""


async def open_lane(loop: asyncio.AbstractEventLoop, factory: Callable[[], Any], host: str,
                    port: int, protocol: str, tls: Any) -> tuple[Lane, Any]:
    """A lane to `host:port` on a shared connection (opened if none has room), with the
    protocol `factory` makes on it: what `loop.create_connection` gives, and raising what it
    raises (OSError, ssl.SSLError)."""
    key = (host, port, protocol, tls)
    while True:
        conn = _with_room(loop, key)
        if conn is not None:
            return conn.new_lane(factory)
        opening = _opening.get(key)
        if opening is not None and opening.get_loop() is loop:
            await asyncio.shield(opening)  # raises its failure; else look for room again
            continue
        opening = _opening[key] = loop.create_future()
        opening.add_done_callback(_consume)
        try:
            conn = await _connect(loop, host, port, protocol, tls)
        except BaseException as e:
            if not opening.done():
                opening.set_exception(e if isinstance(e, Exception)
                                      else ConnectionError("the connection attempt was dropped"))
            raise
        finally:
            if _opening.get(key) is opening:
                del _opening[key]
        _conns.setdefault(key, []).append(conn)
        conn.key = key
        if not opening.done():
            opening.set_result(conn)


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # a failure every waiter saw: not to be logged as never retrieved


def _with_room(loop: asyncio.AbstractEventLoop, key: tuple[Any, ...]
               ) -> H2UpstreamConnection | None:
    conns = _conns.get(key)
    if not conns:
        return None
    for conn in list(conns):
        if conn.closed or conn.loop is not loop:
            conns.remove(conn)
        elif not conn.goaway and len(conn.lanes) < conn.room():
            return conn
    return None


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int, protocol: str,
                   tls: Any) -> H2UpstreamConnection:
    extra: dict[str, Any] = {}
    if protocol == "h2":
        if tls is None:
            from edgelb.net.backend_tls import BackendTLS

            tls = BackendTLS()
        extra = {"ssl": client_context(tls, alpn=("h2",)),
                 "server_hostname": server_hostname(tls, host)}
    transport, conn = await loop.create_connection(
        lambda: H2UpstreamConnection(loop, protocol == "h2"), host, port, **extra)
    if protocol == "h2":
        ssl_object = transport.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if chosen != "h2":
            transport.abort()
            raise NotHTTP2(f"did not choose h2 by ALPN (chose {chosen or 'nothing'}); "
                           "serve HTTP/2 there or set backend_protocol: http1")
    return conn


class H2UpstreamConnection:  # an asyncio.Protocol
    """One HTTP/2 connection to a backend, shared by its lanes (one stream each at a time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: bool) -> None:
        self.loop = loop
        self.scheme = b"https" if tls else b"http"
        self.key: tuple[Any, ...] = ()
        self.transport: Any = None
        self.closed = False
        self.goaway = False
        self.lanes: set[Lane] = set()  # bound to this connection, busy or parked
        self.streams: dict[int, Lane] = {}  # open streams and the lane each belongs to
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, split_outbound_cookies=False)
        conn = self.h2 = h2.connection.H2Connection(config)
        conn.local_settings = h2.settings.Settings(client=True, initial_values={
            _SC.ENABLE_PUSH: 0,
            _SC.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            _SC.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            _SC.HEADER_TABLE_SIZE: HPACK_TABLE,
        })
        conn.decoder.max_header_list_size = MAX_HEADER_LIST
        conn.decoder.max_allowed_table_size = HPACK_TABLE

    def room(self) -> int:
        """Lanes this connection takes: the backend's stream limit (bounded)."""
        return min(self.h2.remote_settings.max_concurrent_streams, DEFAULT_STREAMS * 10)

    def new_lane(self, factory: Callable[[], Any]) -> tuple[Lane, Any]:
        lane = Lane(self)
        self.lanes.add(lane)
        protocol = lane.protocol = factory()
        protocol.connection_made(lane)
        return lane, protocol

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        conn = self.h2
        conn.initiate_connection()
        conn.increment_flow_control_window(CONN_WINDOW - 65535)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        conns = _conns.get(self.key)
        if conns is not None and self in conns:
            conns.remove(self)
            if not conns:
                del _conns[self.key]
        lanes = list(self.lanes)
        self.lanes.clear()
        self.streams.clear()
        for lane in lanes:
            lane.lost(exc)

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        for lane in self.lanes:
            lane.write_full(True)

    def resume_writing(self) -> None:
        for lane in list(self.lanes):
            lane.write_full(False)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            log.debug("h2 backend %s: protocol error (%s); closing", self.key[:2], e)
            self.abort()
            return
        for ev in events:
            if self.closed:
                return
            kind = type(ev)
            if kind is h2.events.DataReceived:
                lane = self._lane(ev.stream_id)
                if lane is None:
                    self.ack(ev.stream_id, ev.flow_controlled_length)
                else:
                    lane.response_data(ev.data, ev.flow_controlled_length)
            elif kind is h2.events.ResponseReceived:
                lane = self._lane(ev.stream_id)
                if lane is not None:
                    lane.response_head(ev.headers, ev.stream_ended is not None)
            elif kind is h2.events.TrailersReceived:
                lane = self._lane(ev.stream_id)
                if lane is not None:
                    lane.response_end(ev.headers)
            elif kind is h2.events.StreamEnded:
                lane = self._lane(ev.stream_id)
                self.streams.pop(ev.stream_id, None)
                if lane is not None:
                    lane.response_end(None)
            elif kind is h2.events.StreamReset:
                lane = self.streams.pop(ev.stream_id, None)
                if lane is not None and lane.sid == ev.stream_id:
                    lane.reset_by_peer(ev.error_code == ErrorCodes.REFUSED_STREAM)
            elif kind is h2.events.WindowUpdated:
                self._pump_all(ev.stream_id)
            elif kind is h2.events.RemoteSettingsChanged:
                self._pump_all(0)
            elif kind is h2.events.ConnectionTerminated:
                self._goaway(ev.last_stream_id)
        self.flush()
        if self.goaway and not self.streams and not self.closed:
            self.transport.close()

    # -- for the lanes ---------------------------------------------------------------------

    def _lane(self, sid: int) -> Lane | None:
        lane = self.streams.get(sid)
        if lane is not None and lane.sid == sid:
            return lane
        return None

    def _pump_all(self, sid: int) -> None:
        if sid:
            lane = self._lane(sid)
            if lane is not None:
                lane.pump()
            return
        for lane in list(self.streams.values()):
            lane.pump()

    def _goaway(self, last: int | None) -> None:
        """The backend is going away: no new streams here; those it will not process
        (above `last`) fail as never processed (retried anywhere)."""
        self.goaway = True
        conns = _conns.get(self.key)
        if conns is not None and self in conns:
            conns.remove(self)
        for sid, lane in list(self.streams.items()):
            if last is not None and sid > last and lane.sid == sid:
                del self.streams[sid]
                lane.reset_by_peer(True)
        for lane in list(self.lanes):
            if not lane.sid:  # parked: closed, so that no new stream goes here
                lane.close()

    def start(self, lane: Lane, fields: list[tuple[bytes, bytes]], end: bool) -> int:
        """Open a stream for `lane`'s request; 0 when this connection cannot take it."""
        if self.closed or self.goaway:
            return 0
        conn = self.h2
        sid = conn.get_next_available_stream_id()
        try:
            conn.send_headers(sid, fields, end_stream=end)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            return 0
        self.streams[sid] = lane
        return sid

    def ack(self, sid: int, n: int) -> None:
        """Give back `n` bytes of window: the stream's and the connection's, or (`sid` 0,
        a stream gone) the connection's alone."""
        if n and not self.closed:
            if not sid:
                self.h2.increment_flow_control_window(n)
                return
            try:
                self.h2.acknowledge_received_data(n, sid)
            except (h2.exceptions.StreamClosedError, KeyError):
                self.h2.increment_flow_control_window(n)
            except h2.exceptions.ProtocolError:
                pass

    def reset(self, sid: int, code: int = ErrorCodes.CANCEL) -> None:
        self.streams.pop(sid, None)
        if self.closed:
            return
        try:
            self.h2.reset_stream(sid, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def unbind(self, lane: Lane) -> None:
        """`lane` closed: once no lane is left this connection closes."""
        self.lanes.discard(lane)
        if not self.lanes and not self.streams and not self.closed:
            self.flush()
            try:
                self.h2.close_connection()
                self.flush()
            except h2.exceptions.ProtocolError:
                pass
            self.transport.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.connection_lost(None)


class Lane(asyncio.Transport):
    """The transport an HTTP/1.1 UpstreamProtocol gets for an h2/h2c backend: each request it
    writes is a new stream on the shared connection, each response it reads that stream's."""

    def __init__(self, conn: H2UpstreamConnection) -> None:
        super().__init__()
        self.conn = conn
        self.protocol: Any = None
        self.closing = False
        self.sid = 0  # the stream of the request being served (0: none)
        self.parser = httptools.HttpRequestParser(self)
        self.fields: list[tuple[bytes, bytes]] | None = None  # request head being parsed
        self.url = b""
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.out: deque[bytes] = deque()  # request body waiting for the backend's window
        self.out_n = 0
        self.out_end = False  # the request is whole: END_STREAM once `out` is sent
        self.out_done = True  # END_STREAM sent (or nothing to send)
        self.full = 0  # 1: the stream's window held REQUEST_HIGH; 2: the socket's buffer
        self.chunked = False  # the response goes to the parser chunked
        self.head_only = False  # a HEAD request: its response has no body
        self.paused = False  # the UpstreamProtocol stopped reading
        self.unacked = 0
        self.protocol_lost = False

    # -- the request, written by the UpstreamProtocol ------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            log.debug("h2 backend %s: an upgrade (WebSocket) request cannot go over HTTP/2; "
                      "closing its lane", self.conn.key[:2])
            self.close()
            return
        except httptools.HttpParserError as e:
            log.debug("h2 backend %s: request not forwarded (%s)", self.conn.key[:2], e)
            self.close()
            return
        self.conn.flush()

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.write(part)

    def on_message_begin(self) -> None:
        self.fields = []
        self.url = b""
        self.trailers = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.fields is not None:
            self.fields.append((name, value))
        else:
            if self.trailers is None:
                self.trailers = []
            self.trailers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        fields = self.fields or []
        self.fields = None
        method = self.parser.get_method()
        host = b""
        body = False
        out = [(b":method", method), (b":scheme", self.conn.scheme), (b":authority", b""),
               (b":path", self.url)]
        for name, value in fields:
            lname = name.lower()
            if lname == b"host":
                host = value
            elif lname == b"transfer-encoding":
                body = True
            elif lname == b"content-length":
                body = value.strip() not in (b"0", b"")
                out.append((lname, value))
            elif lname == b"te":
                if b"trailers" in value.lower():
                    out.append((lname, b"trailers"))
            elif lname not in _HOP:
                out.append((lname, value))
        out[2] = (b":authority", host)
        if self.sid:  # the last stream's request side was left open (an early response)
            self.conn.reset(self.sid)
        self.head_only = method == b"HEAD"
        self.chunked = False
        self.out.clear()
        self.out_n = 0
        self.out_end = False
        self.out_done = not body
        sid = self.sid = self.conn.start(self, out, not body)
        if not sid:
            self.protocol.reused = True  # never sent: as safe to retry as a stale connection
            self.close()

    def on_body(self, body: bytes) -> None:
        if not self.sid or self.out_done:
            return
        self.out.append(bytes(body))
        self.out_n += len(body)
        self.pump()

    def on_message_complete(self) -> None:
        if not self.sid or self.out_done:
            return
        self.out_end = True
        self.pump()

    def pump(self) -> None:
        """Send the request body the windows allow, then its end."""
        sid = self.sid
        if not sid or self.out_done:
            return
        conn = self.conn.h2
        out = self.out
        try:
            while out:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = out[0]
                if len(chunk) <= window:
                    out.popleft()
                    conn.send_data(sid, chunk)
                    self.out_n -= len(chunk)
                else:
                    out[0] = chunk[window:]
                    conn.send_data(sid, chunk[:window])
                    self.out_n -= window
            if not out and self.out_end:
                self.out_done = True
                if self.trailers:
                    conn.send_headers(sid, self.trailers, end_stream=True)
                else:
                    conn.end_stream(sid)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.out.clear()
            self.out_n = 0
            self.out_done = True
        if self.out_n > REQUEST_HIGH:
            self._full(1, True)
        elif self.out_n < REQUEST_LOW:
            self._full(1, False)

    def write_full(self, full: bool) -> None:
        self._full(2, full)

    def _full(self, why: int, full: bool) -> None:
        before = self.full
        self.full = (before | why) if full else (before & ~why)
        protocol = self.protocol
        if protocol is None or self.protocol_lost:
            return
        if self.full and not before:
            protocol.pause_writing()
        elif before and not self.full:
            protocol.resume_writing()

    # -- the response, from the connection -------------------------------------------------

    def response_head(self, fields: list[tuple[bytes, bytes]], ended: bool) -> None:
        status = 0
        lines = []
        length = None
        for name, value in fields:
            if name == b":status":
                status = int(value) if value.isdigit() else 0
            elif name[:1] == b":" or name in _RESPONSE_HOP:
                continue
            else:
                if name == b"content-length":
                    length = value
                lines.append(b"%s: %s\r\n" % (name, value))
        if status < 200:
            self.protocol_error("sent a bad :status")
            return
        protocol = self.protocol
        ex = protocol.ex
        bodiless = self.head_only or status in (204, 304)
        if ended:
            if length is None and not bodiless:
                lines.append(b"content-length: 0\r\n")
        elif not bodiless and (length is None or (ex is not None and ex.te_trailers)):
            # a body of unknown length, or trailers wanted: chunked, so they can follow
            self.chunked = True
            lines = [line for line in lines if not line.startswith(b"content-length:")]
            lines.append(b"transfer-encoding: chunked\r\n")
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b"Status"
        self._deliver(b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, b"".join(lines)))
        if ended:
            self.response_end(None)

    def response_data(self, data: bytes, flow: int) -> None:
        sid = self.sid
        if data:
            if self.chunked:
                self._deliver(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self._deliver(data)
        if self.paused or self.sid != sid:
            if self.sid == sid:
                self.unacked += flow
            else:
                self.conn.ack(0, flow)
        else:
            self.conn.ack(sid, flow)

    def response_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        """The stream ended (with `trailers`): the last bytes go to the parser. The stream is
        let go first, so that the next request (sent from inside) opens a new one."""
        sid = self.sid
        if not sid:
            return
        self.sid = 0
        if not self.out_done:  # answered before the request was whole: stop sending it
            self.out_done = True
            self.out.clear()
            self.out_n = 0
            self.conn.reset(sid, ErrorCodes.NO_ERROR)
        self._full(1, False)
        if self.unacked:
            self.conn.ack(0, self.unacked)
            self.unacked = 0
        if self.chunked:
            self.chunked = False
            lines = b"".join(b"%s: %s\r\n" % f for f in trailers or () if f[0][:1] != b":")
            self._deliver(b"0\r\n" + lines + b"\r\n")

    def reset_by_peer(self, unprocessed: bool) -> None:
        """The backend reset the stream; `unprocessed`: refused (REFUSED_STREAM, or above a
        GOAWAY's last stream), so the request may go anywhere again."""
        self.sid = 0
        if unprocessed and self.protocol is not None:
            self.protocol.reused = True
            self.protocol.got_bytes = False
        self.close()

    def protocol_error(self, why: str) -> None:
        log.debug("h2 backend %s: %s", self.conn.key[:2], why)
        self.close()

    def _deliver(self, data: bytes) -> None:
        if not self.closing and not self.protocol_lost:
            self.protocol.data_received(data)

    # -- asyncio.Transport -----------------------------------------------------------------

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.sid:
            self.conn.reset(self.sid)
            self.sid = 0
            self.conn.flush()
        if self.unacked:
            self.conn.ack(0, self.unacked)
            self.unacked = 0
        self.conn.loop.call_soon(self.lost, None)
        self.conn.unbind(self)

    def abort(self) -> None:
        self.close()

    def lost(self, exc: Exception | None) -> None:
        """Tell the UpstreamProtocol its connection is gone (once)."""
        self.closing = True
        if self.protocol_lost:
            return
        self.protocol_lost = True
        self.sid = 0
        self.conn.lanes.discard(self)
        if self.protocol is not None:
            self.protocol.connection_lost(exc)

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        if self.unacked:
            n, self.unacked = self.unacked, 0
            self.conn.ack(self.sid, n) if self.sid else self.conn.ack(0, n)
            self.conn.flush()

    def is_reading(self) -> bool:
        return not self.paused

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self.conn.transport
        return transport.get_extra_info(name, default) if transport is not None else default

    def get_write_buffer_size(self) -> int:
        return self.out_n
