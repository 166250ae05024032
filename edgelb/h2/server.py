"""The client side of HTTP/2: one H2ServerConnection per connection that negotiated `h2` by
ALPN on a TLS listener, or opened with the HTTP/2 preface on a plain listener with h2c.

It takes the connection over from the ClientProtocol that accepted it (`H2Entry.take`), runs
hyper-h2's state machine over the bytes, and gives every request stream its own Stream (see
stream.py). No task per stream. It closes, with GOAWAY, a connection that floods it: resets
of streams in progress (rapid reset), control frames (SETTINGS, PING, PRIORITY, empty DATA,
refused streams), protocol errors (a CONTINUATION flood is one: hyper-h2 refuses a header
block of more than 64 frames), and a client that keeps response data waiting on a closed
window for longer than the idle timeout (a zero-window stall).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from edgelb.h2.limits import (
    CONN_WINDOW,
    HPACK_TABLE,
    MAX_CONTROL,
    MAX_FRAME,
    MAX_HEADER_LIST,
    MAX_RESETS,
    MAX_STREAMS,
    STREAM_WINDOW,
    FloodMeter,
)
from edgelb.h2.stream import HELD_WRITE, Stream
from edgelb.h2.translate import LocalAnswer, request_head, trailer_fields

if TYPE_CHECKING:
    from edgelb.http.client import ClientProtocol
    from edgelb.http.listener import HttpListener

log = logging.getLogger("edgelb.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SC = h2.settings.SettingCodes


class H2Entry:
    """What a listener does with HTTP/2 (its `h2` hook): `alpn` (TLS: serve a connection that
    negotiated h2) and `h2c` (plain: serve one that starts with the HTTP/2 preface)."""

    __slots__ = ("alpn", "h2c")

    def __init__(self, alpn: bool, h2c: bool) -> None:
        self.alpn = alpn
        self.h2c = h2c

    def negotiated(self, client: ClientProtocol, transport: Any) -> bool:
        """Called once a TLS handshake is done: True when the connection is now HTTP/2's."""
        if not self.alpn:
            return False
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            return False
        take(client, transport, b"")
        return True

    def prior_knowledge(self, client: ClientProtocol, data: bytes) -> bool:
        """Called with a plain connection's first bytes: True when they open HTTP/2."""
        if not self.h2c or not PREFACE.startswith(data[:24]) or len(data) < 3:
            return False
        take(client, client.transport, data)
        return True


def take(client: ClientProtocol, transport: Any, data: bytes) -> None:
    """Hand the connection `client` accepted (and counted) to a new H2ServerConnection."""
    listener = client.listener
    conn = H2ServerConnection(listener, client.xff_ip, client.fwd_for)
    conn.peer_port = client.peer_port
    listener.clients.discard(client)
    listener.clients.add(conn)  # type: ignore[arg-type]
    client.closed = True  # it serves nothing more (its connection_lost will not be called)
    transport.set_protocol(conn)
    conn.start(transport, data)


class H2ServerConnection:  # an asyncio.Protocol
    """One HTTP/2 connection from a client."""

    __slots__ = (
        "closed",
        "closing",
        "control",
        "deadline",
        "fwd_for",
        "h2",
        "listener",
        "loop",
        "peer_port",
        "resets",
        "stall_since",
        "streams",
        "transport",
        "write_paused",
        "xff_ip",
    )

    def __init__(self, listener: HttpListener, xff_ip: bytes, fwd_for: bytes) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.xff_ip = xff_ip
        self.fwd_for = fwd_for
        self.peer_port = 0  # the client's port (the access log's client_port)
        self.transport: Any = None
        self.streams: dict[int, Stream] = {}
        self.closed = False
        self.closing = False
        self.write_paused = False
        self.deadline = 0.0
        self.stall_since = 0.0  # when response data began to wait on a closed window
        self.resets = FloodMeter(MAX_RESETS)
        self.control = FloodMeter(MAX_CONTROL)
        config = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, split_outbound_cookies=False)
        conn = self.h2 = h2.connection.H2Connection(config)
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            _SC.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            _SC.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            _SC.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            _SC.HEADER_TABLE_SIZE: HPACK_TABLE,
            _SC.MAX_FRAME_SIZE: MAX_FRAME,
            _SC.ENABLE_CONNECT_PROTOCOL: 1,  # RFC 8441: WebSocket over extended CONNECT
        })
        conn.decoder.max_header_list_size = MAX_HEADER_LIST
        conn.decoder.max_allowed_table_size = HPACK_TABLE

    def start(self, transport: Any, data: bytes) -> None:
        self.transport = transport
        self.deadline = self.loop.time() + self.listener.header_timeout_s
        conn = self.h2
        conn.initiate_connection()
        conn.increment_flow_control_window(CONN_WINDOW - 65535)
        self.flush()
        if data:
            self.data_received(data)

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # (set_protocol does not call it)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        listener = self.listener
        listener.clients.discard(self)  # type: ignore[arg-type]
        if listener.closing:
            listener.connection_gone()
        n = listener.per_client.get(self.xff_ip, 1) - 1
        if n > 0:
            listener.per_client[self.xff_ip] = n
        else:
            listener.per_client.pop(self.xff_ip, None)
        streams = list(self.streams.values())
        self.streams.clear()
        for st in streams:
            st.cancelled()

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        """The socket's buffer is full: stop reading the client (its PINGs and SETTINGS would
        queue answers) and every stream's backend."""
        self.write_paused = True
        self.transport.pause_reading()
        for st in self.streams.values():
            st.hold(HELD_WRITE)

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.closed:
            self.transport.resume_reading()
        for st in list(self.streams.values()):
            st.release(HELD_WRITE)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self._fail(ErrorCodes.PROTOCOL_ERROR, f"protocol error ({e})", "h2_protocol")
            return
        now = self.loop.time()
        for ev in events:
            if self.closed:
                return
            kind = type(ev)
            if kind is h2.events.DataReceived:
                self._data(ev, now)
            elif kind is h2.events.RequestReceived:
                self._request(ev)
            elif kind is h2.events.StreamEnded:
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.end_request(None)
            elif kind is h2.events.WindowUpdated:
                self._window(ev.stream_id)
            elif kind is h2.events.StreamReset:
                self._reset(ev, now)
            elif kind is h2.events.TrailersReceived:
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.end_request(ev.headers)
                    st.request_ended = True
            elif kind is h2.events.ConnectionTerminated:
                self.closing = True
                if not self.streams:
                    self.flush()
                    self.transport.close()
                    return
            elif kind is h2.events.RemoteSettingsChanged:
                if self._flood(self.control, now):
                    return
                self._window(0)
            elif kind in _CONTROL:
                if self._flood(self.control, now):
                    return
        if self.stall_since:
            self.deadline = self.stall_since + self.listener.idle_timeout_s
        else:
            self.deadline = now + self.listener.idle_timeout_s
        self.flush()

    # -- events ----------------------------------------------------------------------------

    def _request(self, ev: Any) -> None:
        sid = ev.stream_id
        end = ev.stream_ended is not None
        if self.closing:
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        req = request_head(ev.headers, end)
        if isinstance(req, str):
            log.debug("h2 %s: stream %d refused: %s", self.listener.name, sid, req)
            self.h2.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            self._flood(self.control, self.loop.time())
            return
        if isinstance(req, LocalAnswer):
            self._answer(sid, req)
            return
        st = Stream(self, sid, req)
        self.streams[sid] = st
        st.start(req.head)
        if end and not st.done:
            st.end_request(None)

    def _answer(self, sid: int, answer: LocalAnswer) -> None:
        """A whole response of edgelb's own on stream `sid`: its text when the windows have
        room for it (they do unless the client closed them), else the status alone."""
        local = self.listener.local_responses
        local[answer.status] = local.get(answer.status, 0) + 1
        body = answer.text.encode() + b"\n"
        if self.h2.local_flow_control_window(sid) < len(body):
            body = b""
        self.h2.send_headers(sid, [(b":status", b"%d" % answer.status),
                                   (b"content-type", b"text/plain; charset=utf-8"),
                                   (b"content-length", b"%d" % len(body))],
                             end_stream=not body)
        if body:
            self.h2.send_data(sid, body, end_stream=True)

    def _data(self, ev: Any, now: float) -> None:
        sid = ev.stream_id
        flow = ev.flow_controlled_length
        data = ev.data
        st = self.streams.get(sid)
        if not data and ev.stream_ended is None and self._flood(self.control, now):
            return
        if st is None:
            self.ack(sid, flow)
            return
        st.body(data, flow)

    def _reset(self, ev: Any, now: float) -> None:
        st = self.streams.pop(ev.stream_id, None)
        if st is None:
            return
        in_progress = not st.done
        st.cancelled()
        if in_progress:
            self._flood(self.resets, now)

    def _window(self, sid: int) -> None:
        if sid:
            st = self.streams.get(sid)
            if st is not None and (st.pending or st.head is not None):
                self.flush_stream(st)
            return
        for st in list(self.streams.values()):
            if st.pending:
                self.flush_stream(st)

    def _flood(self, meter: FloodMeter, now: float) -> bool:
        """Count one event on `meter`; past its limit the connection is closed (True)."""
        if not meter.hit(now):
            return False
        kind = "h2_rapid_reset" if meter is self.resets else "h2_flood"
        self._fail(ErrorCodes.ENHANCE_YOUR_CALM, "flooded the connection", kind)
        return True

    def _fail(self, code: int, why: str, kind: str) -> None:
        """GOAWAY with `code`, then close: what this client sent is not served further."""
        refused = self.listener.refused
        refused[kind] = refused.get(kind, 0) + 1
        log.debug("h2 %s: client %s %s; closing", self.listener.name,
                  self.xff_ip.decode("latin-1"), why)
        try:
            self.h2.close_connection(code)
            self.flush()
        except h2.exceptions.ProtocolError:
            pass
        self.transport.close()
        self.connection_lost(None)

    # -- what streams ask for --------------------------------------------------------------

    def ack(self, sid: int, n: int) -> None:
        """Give back `n` bytes of window (stream and connection)."""
        if n and not self.closed:
            try:
                self.h2.acknowledge_received_data(n, sid)
            except h2.exceptions.StreamClosedError:
                self.h2.increment_flow_control_window(n)

    def send_headers(self, st: Stream, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.closed or st.done:
            return
        try:
            self.h2.send_headers(st.sid, fields, end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            st.done = True

    def reset(self, st: Stream, code: int) -> None:
        if self.closed:
            return
        try:
            self.h2.reset_stream(st.sid, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def forget(self, st: Stream) -> None:
        self.streams.pop(st.sid, None)
        if self.closing and not self.streams and not self.closed:
            self.flush()
            self.transport.close()

    def flush_stream(self, st: Stream) -> None:
        """Send what `st` has: its HEADERS, DATA within the windows, then the end."""
        if self.closed or st.done:
            return
        conn = self.h2
        sid = st.sid
        head = st.head
        pending = st.pending
        if head is not None:
            st.head = None
            end = st.ended and not pending and not st.trailers
            self.send_headers(st, head, end)
            if end:
                st.finish()
                return
        if pending:
            before = st.pending_n
            try:
                while pending:
                    window = conn.local_flow_control_window(sid)
                    if window <= 0:
                        break
                    size = min(window, conn.max_outbound_frame_size)
                    chunk = pending[0]
                    if len(chunk) <= size:
                        pending.popleft()
                        st.pending_n -= len(chunk)
                        last = st.ended and not pending and not st.trailers
                        conn.send_data(sid, chunk, end_stream=last)
                        if last:
                            st.finish()
                            self.stall_since = 0.0
                            return
                    else:
                        pending[0] = chunk[size:]
                        st.pending_n -= size
                        conn.send_data(sid, chunk[:size])
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                st.reset(ErrorCodes.STREAM_CLOSED)
                return
            if not pending:
                self.stall_since = 0.0
            elif st.pending_n < before or not self.stall_since:
                # waiting on a window: the stall is counted from the last progress
                self.stall_since = self.loop.time()
                self.deadline = self.stall_since + self.listener.idle_timeout_s
            st.sent()
        if st.ended and not pending:
            trailers = st.trailers
            if trailers:
                self.send_headers(st, trailer_fields(trailers), True)
            else:
                try:
                    conn.end_stream(sid)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    pass
            st.finish()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    # -- timeouts and shutdown (the listener and the runtime's sweeper call these) ---------

    def expire(self, now: float) -> None:
        """Idle with no stream, or response data stalled on a closed window for the idle
        timeout: GOAWAY and close. Streams in progress otherwise keep it open (their backends'
        timeouts bound them)."""
        self.deadline = 0.0
        if self.closed:
            return
        idle = self.listener.idle_timeout_s
        if self.stall_since and now - self.stall_since >= idle:
            self._fail(ErrorCodes.FLOW_CONTROL_ERROR, "left its window closed", "h2_stall")
            return
        if self.streams:
            nxt = (self.stall_since + idle) if self.stall_since else now + idle
            for st in list(self.streams.values()):
                client = st.client  # a WebSocket tunnel: silent for tunnel_timeout, closed
                if client.tunnel is not None and not client.closed and client.deadline:
                    if client.deadline <= now:
                        client.expire(now)
                    else:
                        nxt = min(nxt, client.deadline)
            self.deadline = nxt
            return
        self._fail(ErrorCodes.NO_ERROR, "was idle", "h2_idle")

    def drain(self) -> None:
        """Shutting down: GOAWAY (streams in progress finish), then close."""
        self.closing = True
        if self.closed:
            return
        try:
            self.h2.close_connection(ErrorCodes.NO_ERROR,
                                     last_stream_id=self.h2.highest_inbound_stream_id)
        except h2.exceptions.ProtocolError:
            pass
        self.flush()
        if not self.streams:
            self.transport.close()


_CONTROL = frozenset({h2.events.PingReceived, h2.events.PriorityUpdated,
                      h2.events.UnknownFrameReceived})


def h2_entry(tls: bool, http2: bool, h2c: bool) -> H2Entry | None:
    """A listener's `h2` hook: TLS with http2 (ALPN h2), plain with h2c, or None."""
    if tls:
        return H2Entry(True, False) if http2 else None
    return H2Entry(False, True) if h2c else None
