"""One HTTP/2 request stream from a client, served by the HTTP/1.1 data path.

A Stream owns a ClientProtocol of its own (edgelb/http/client.py) and is that protocol's
transport: the request is handed to it as the HTTP/1.1 bytes the stream's HEADERS and DATA
frames mean (translate.request_head), so routing, gates, caps, queueing, retries and
accounting are the ones every HTTP/1.1 request gets; what it writes back, an HTTP/1.1
response (a backend's, relayed, or edgelb's own), is parsed again here and sent as HEADERS,
DATA and trailers, within the peer's flow-control windows.

Flow control both ways, per stream: a request body is acknowledged (WINDOW_UPDATE) only while
the HTTP/1.1 side reads (it pauses when its backend connection's buffer is full), so a slow
backend closes this stream's window and no other; a response is held up to RESPONSE_HIGH
bytes while the client's window is closed, then the backend's reading pauses.

WebSocket over HTTP/2 (RFC 8441): an extended CONNECT arrives here as the HTTP/1.1 upgrade
translate.request_head made of it; the backend's 101, its Sec-WebSocket-Accept checked, goes
out as a 200, and the stream is then a tunnel (`tunnel`): DATA payloads are the bytes the
ClientProtocol relays to the backend and back, under the same flow control. The client's
END_STREAM half-closes the backend connection (a TCP FIN, RFC 8441 5), its RST_STREAM closes
it; the backend closing it ends the stream (END_STREAM once the data before it went out).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools
from h2.errors import ErrorCodes

from edgelb.h2 import grpc
from edgelb.h2.limits import GRPC_MESSAGE_MAX, RESPONSE_HIGH, RESPONSE_LOW
from edgelb.h2.translate import RequestHead, response_fields, trailer_fields, websocket_fields
from edgelb.http.client import ClientProtocol

if TYPE_CHECKING:
    from edgelb.h2.server import H2ServerConnection

HELD_WINDOW = 1  # the client's window is closed and RESPONSE_HIGH bytes wait
HELD_WRITE = 2  # the connection's transport buffer is full


class Stream(asyncio.Transport):
    """One client stream, and the transport of the ClientProtocol that serves it."""

    __slots__ = (
        "body_left",
        "chunked",
        "client",
        "conn",
        "done",
        "ended",
        "eof_pending",
        "fields",
        "grpc",
        "head",
        "held",
        "local",
        "lost",
        "method",
        "parser",
        "paused",
        "pending",
        "pending_n",
        "request_ended",
        "sid",
        "status",
        "timer",
        "trailers",
        "tunnel",
        "unacked",
        "ws_accept",
    )

    def __init__(self, conn: H2ServerConnection, sid: int, req: RequestHead) -> None:
        super().__init__()
        self.conn = conn
        self.sid = sid
        self.method = req.method
        self.grpc = req.grpc
        self.chunked = req.chunked
        client = self.client = ClientProtocol(conn.listener)
        client.transport = self
        client.xff_ip = conn.xff_ip
        client.fwd_for = conn.fwd_for
        client.peer_port = conn.peer_port
        client.h2 = True
        self.paused = False  # the HTTP/1.1 side stopped reading the request body
        self.unacked = 0  # request bytes received while paused: acknowledged on resume
        self.request_ended = False
        self.parser: Any = None  # an httptools response parser, on the first response bytes
        self.fields: list[tuple[bytes, bytes]] | None = []  # head fields being parsed
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.status = 0
        self.head: list[tuple[bytes, bytes]] | None = None  # HEADERS not sent yet
        self.pending: deque[memoryview] = deque()  # response data waiting for the window
        self.pending_n = 0
        self.held = 0
        self.ended = False  # the response is whole (END_STREAM goes once pending is sent)
        self.done = False  # END_STREAM sent or the stream reset: nothing more goes out
        self.lost = False  # the ClientProtocol was told the connection is gone
        self.local: list[bytes] | None = None  # gRPC: the text of edgelb's own answer
        self.body_left = 0
        self.ws_accept = req.ws_accept  # extended CONNECT: the Sec-WebSocket-Accept due
        self.tunnel = False  # the 101 came: DATA both ways are the tunnel's bytes
        self.eof_pending = False  # the client ended its side before the tunnel was up
        self.timer: asyncio.TimerHandle | None = None
        if req.grpc and req.timeout:
            self.timer = conn.loop.call_later(req.timeout, self.deadline_passed)

    # -- the request, from the connection ------------------------------------------------

    def start(self, head: bytes) -> None:
        self.client.data_received(head)

    def body(self, data: bytes, flow: int) -> None:
        """A DATA frame's payload (`flow`: what it counted against the window)."""
        client = self.client
        if data and not client.closed and not self.lost:
            if self.chunked:
                client.data_received(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                client.data_received(data)
        if self.paused and not self.lost:
            self.unacked += flow
        else:
            self.conn.ack(self.sid, flow)

    def end_request(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        """END_STREAM from the client (with its trailers, if any)."""
        self.request_ended = True
        client = self.client
        if client.closed or self.lost:
            return
        if self.ws_accept:
            self.eof_pending = True
            if client.tunnel is not None:
                self._half_close()
            return
        if self.chunked:
            lines = b"".join(b"%s: %s\r\n" % f for f in trailer_fields(trailers or [])
                             if f[0][:1] != b":")
            client.data_received(b"0\r\n" + lines + b"\r\n")
        if client.parsing is not None and not self.done:
            # (hyper-h2 checks a content-length against the DATA received; this is a head
            # the HTTP/1.1 side still waits on)
            self.reset(ErrorCodes.PROTOCOL_ERROR)

    def _half_close(self) -> None:
        """The client's END_STREAM on a tunnel: FIN to the backend (what was sent goes first)."""
        tunnel = self.client.tunnel
        if tunnel is None or tunnel.is_closing():
            return
        if tunnel.can_write_eof():
            tunnel.write_eof()
        else:  # TLS to the backend has no half-close
            tunnel.close()

    def cancelled(self) -> None:
        """The client reset the stream, or the connection is gone: abandon the exchange."""
        self.done = True
        self.pending.clear()
        self.pending_n = 0
        self._lose()

    def deadline_passed(self) -> None:
        """A gRPC call's grpc-timeout ran out: DEADLINE_EXCEEDED, and the backend's part is
        abandoned (its stream reset, or its HTTP/1.1 connection closed)."""
        self.timer = None
        if self.done:
            return
        self.pending.clear()
        self.pending_n = 0
        conn = self.conn
        text = "the deadline (grpc-timeout) passed"
        if self.head is not None or self.status == 0 or self.local is not None:
            conn.send_headers(self, grpc.trailers_only(grpc.DEADLINE_EXCEEDED, text), True)
        else:
            conn.send_headers(self, [(b"grpc-status", b"%d" % grpc.DEADLINE_EXCEEDED),
                                     (b"grpc-message", grpc.message(text))], True)
        self.head = None
        self.finish()
        conn.flush()

    # -- the ClientProtocol's transport --------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.done:
            return
        if self.tunnel:
            self._tunnel_data(data)
            return
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpResponseParser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._switched(bytes(data[e.args[0]:]))
            return
        except httptools.HttpParserError:
            if not self.ended:
                self.reset(ErrorCodes.INTERNAL_ERROR)
                self.conn.flush()
            return
        if not self.done:
            self.conn.flush_stream(self)
        self.conn.flush()  # (a local gRPC answer ends the stream while parsed: it goes too)

    def _switched(self, rest: bytes) -> None:
        """The backend's 101 was parsed: the tunnel starts, or a handshake that does not
        answer edgelb's key is refused with a 502 (the backend connection is then dropped)."""
        conn = self.conn
        if not self.tunnel:
            text = b"the backend's WebSocket handshake did not answer the key edgelb sent\n"
            self.head = [(b":status", b"502"), (b"content-type", b"text/plain; charset=utf-8"),
                         (b"content-length", b"%d" % len(text))]
            self.pending.append(memoryview(text))
            self.pending_n += len(text)
            self.ended = True
            conn.flush_stream(self)
            conn.flush()
            return
        conn.flush_stream(self)  # the 200
        if rest:
            self._tunnel_data(rest)
        if self.eof_pending:
            conn.loop.call_soon(self._half_close)  # once the ClientProtocol has its tunnel
        conn.flush()

    def _tunnel_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the backend through the tunnel: DATA within the client's windows."""
        self.pending.append(memoryview(bytes(data)))
        self.pending_n += len(data)
        conn = self.conn
        conn.flush_stream(self)
        if self.pending_n > RESPONSE_HIGH:
            self.hold(HELD_WINDOW)
        conn.flush()

    def writelines(self, parts: Any) -> None:
        self.write(b"".join(parts))

    def close(self) -> None:
        """The HTTP/1.1 side is done with this stream: a response cut short is reset; a
        tunnel the backend closed ends (END_STREAM after the data before it)."""
        if self.tunnel and not self.done and not self.ended:
            self.ended = True
            self.conn.flush_stream(self)
            self.conn.flush()
        elif not self.done and not self.ended:
            self.reset(ErrorCodes.INTERNAL_ERROR)
            self.conn.flush()
        self.conn.loop.call_soon(self._lose)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.done

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        n = self.unacked
        if n and not self.done:
            self.unacked = 0
            self.conn.ack(self.sid, n)
            self.conn.flush()

    def is_reading(self) -> bool:
        return not self.paused

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.conn.transport.get_extra_info(name, default)

    # -- response parser callbacks ---------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        fields = self.fields
        if fields is not None:
            fields.append((name, value))
        elif self.status >= 200:  # after the head of a chunked body: trailers
            if self.trailers is None:
                self.trailers = []
            self.trailers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        fields = self.fields or []
        if status == 101 and self.ws_accept:
            self.fields = []
            accept = next((v for n, v in fields if n.lower() == b"sec-websocket-accept"), b"")
            if accept.strip() == self.ws_accept:
                self.status = 200
                self.head = websocket_fields(fields)
                self.tunnel = True
            return
        if status < 200:  # 100 Continue, 103: not relayed
            self.fields = []
            return
        self.fields = None
        self.status = status
        if self.grpc and not any(n.lower() == b"content-type" and v.startswith(b"application/grpc")
                                 for n, v in fields):
            self.local = []  # not a gRPC answer: edgelb's own (or a broken backend's)
            return
        self.head = response_fields(status, fields)
        if self.method == b"HEAD":  # no body follows, whatever its length says
            self.ended = True
            self.fields = []

    def on_body(self, body: bytes) -> None:
        if self.ended:
            return
        local = self.local
        if local is not None:
            if sum(map(len, local)) < GRPC_MESSAGE_MAX:
                local.append(body[:GRPC_MESSAGE_MAX])
            return
        self.pending.append(memoryview(body))
        self.pending_n += len(body)
        if self.pending_n > RESPONSE_HIGH:
            self.conn.flush_stream(self)
            if self.pending_n > RESPONSE_HIGH:
                self.hold(HELD_WINDOW)

    def on_message_complete(self) -> None:
        if self.tunnel:  # the 101's end: the tunnel follows
            return
        if self.status < 200 or self.ended:
            if self.status < 200:
                self.fields = []
            return
        self.ended = True
        local = self.local
        if local is not None:
            text = b"".join(local).decode("utf-8", "replace")[:GRPC_MESSAGE_MAX]
            self.conn.send_headers(self, grpc.trailers_only(
                grpc.local_status(self.status, text), text), True)
            self.finish()

    # -- flow control of the response ------------------------------------------------------

    def hold(self, why: int) -> None:
        """Stop reading the backend's response (its pause reaches the upstream)."""
        if not self.held:
            self.client.pause_writing()
        self.held |= why

    def release(self, why: int) -> None:
        if self.held & why:
            self.held &= ~why
            if not self.held and not self.client.closed:
                self.client.resume_writing()

    def sent(self) -> None:
        """Some pending data went out: read the backend again below RESPONSE_LOW."""
        if self.held & HELD_WINDOW and self.pending_n < RESPONSE_LOW:
            self.release(HELD_WINDOW)

    # -- the end ---------------------------------------------------------------------------

    def reset(self, code: int) -> None:
        if not self.done:
            self.conn.reset(self, code)
        self.finish()

    def finish(self) -> None:
        """END_STREAM went out (or RST_STREAM): the stream is over on our side."""
        self.done = True
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        self.conn.forget(self)
        client = self.client
        if not client.closed and (client.active is not None or client.tunnel is not None):
            # the exchange did not end (a deadline, a reset): abandon it
            self.conn.loop.call_soon(self._lose)

    def _lose(self) -> None:
        """Tell the ClientProtocol its connection is gone (abandons what it still serves)."""
        if self.lost:
            return
        self.lost = True
        client = self.client
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        if client.closed:
            return
        # its connection_lost gives back a per-client count it never took: balance it
        per_client = client.listener.per_client
        per_client[client.xff_ip] = per_client.get(client.xff_ip, 0) + 1
        client.connection_lost(None)
