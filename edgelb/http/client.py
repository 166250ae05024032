"""The client side of the HTTP/1.1 data path: one ClientProtocol per downstream connection.

It parses requests with httptools (checks in edgelb/http/request.py), opens an `Exchange` per
request, hands it to edgelb/http/dispatch.py (route, gates, pick, queue, retry) and answers
what the proxy answers itself. Bodies stream to the upstream with pause/resume flow control
and are never buffered whole. Requests pipelined behind the active one wait (with reading
paused) and are answered in order. No Task is made per request; only a new upstream
connection costs one (edgelb/http/upstream.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools

from edgelb.http import dispatch
from edgelb.http.accounting import end_retry, finish, local_reason
from edgelb.http.errors import local_response
from edgelb.http.exchange import (
    CONNECTING,
    DONE,
    QUEUED,
    RECEIVING_HEAD,
    WAITING_TURN,
    Exchange,
)
from edgelb.http.headers import forwarded_for
from edgelb.http.mirror import body as mirror_body
from edgelb.http.mirror import complete as mirror_complete
from edgelb.http.request import (
    MAX_HEAD,
    MAX_TARGET,
    MAX_TRAILING,
    REQ_SPECIAL,
    Refuse,
    absolute_form,
    check_target,
    check_version,
    last_chunk,
    special_request_header,
    valid_host,
)
from edgelb.http.target import SUSPECT, normalise

if TYPE_CHECKING:
    from edgelb.http.listener import HttpListener
    from edgelb.pool import BackendState, ServiceState

log = logging.getLogger("edgelb.http")

BUFFER_LIMIT = 256 * 1024  # request body held while an upstream connection is being opened
BODY_RATE_GRACE = 10.0  # seconds before limits.min_body_rate applies to a request body

# reasons for pausing a client's reading
PAUSE_UPSTREAM = 1  # the upstream's write buffer is full
PAUSE_PIPELINE = 2  # a pipelined request waits behind the active one
PAUSE_BUFFER = 4  # body buffered while connecting
PAUSE_UPGRADE = 8  # an upgrade waits for its 101: bytes after it are the new protocol's


class ClientProtocol:  # an asyncio.Protocol (not subclassed: see compiled.py)
    """One downstream (client) connection."""

    __slots__ = (
        "active",
        "closed",
        "closing",
        "deadline",
        "fwd_cache",
        "fwd_cache_host",
        "fwd_for",
        "h2",
        "head_bytes",
        "listener",
        "loop",
        "parser",
        "parsing",
        "paused",
        "peer_port",
        "pipeline",
        "proxied",
        "refusing",
        "telemetry",
        "transport",
        "tunnel",
        "tunnel_bytes",
        "tunnel_timeout",
        "upgrade_buffer",
        "write_paused",
        "xff_ip",
    )

    def __init__(self, listener: HttpListener, proxied: tuple | None = None) -> None:
        """`proxied`: the client a PROXY header named, when it came before the TLS handshake."""
        self.listener = listener
        self.proxied = proxied
        self.loop = listener.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser: Any = None  # an httptools.HttpRequestParser, once a request began
        self.parsing: Exchange | None = None  # receiving parser callbacks
        self.active: Exchange | None = None  # being served
        self.pipeline: deque[Exchange] | None = None
        self.paused = 0
        self.write_paused = False
        self.closing = False
        self.closed = False
        self.deadline = 0.0
        self.tunnel: asyncio.Transport | None = None  # set once a 101 switched protocols
        self.tunnel_timeout = 0.0  # the service's tunnel_timeout, while tunnelling
        self.upgrade_buffer: list[bytes] | None = None
        self.xff_ip = b""
        self.fwd_for = b""
        self.head_bytes = 0  # bytes read since the current, incomplete request head began
        self.refusing = False  # a request was refused: nothing more is read
        self.fwd_cache = b""  # the forwarding header block last made, for fwd_cache_host
        self.fwd_cache_host = b""
        self.telemetry: Any = listener.telemetry  # edgelb.telemetry.hub.Telemetry, None: off
        self.peer_port = 0
        self.h2 = False  # drives one HTTP/2 stream (edgelb/h2/stream.py), not a connection
        self.tunnel_bytes = 0  # bytes from the client through an upgraded tunnel

    # -- connection events -------------------------------------------------------------

    def connection_made(self, transport, peer: tuple | None = None) -> None:
        """`peer`: the client a PROXY header named (accept_proxy_protocol), else the
        transport's peer."""
        self.transport = transport
        listener = self.listener
        listener.accepted += 1
        addr = peer or self.proxied or transport.get_extra_info("peername")
        ip, self.fwd_for = forwarded_for(addr)
        self.xff_ip = ip
        if addr and len(addr) > 1:
            self.peer_port = addr[1]
        n = listener.per_client.get(ip, 0) + 1
        reason = listener.limits.refusal(len(listener.clients), n)
        if reason is not None:
            # over a listener limit: closed at once (counted), before it costs anything more
            listener.refused[reason] = listener.refused.get(reason, 0) + 1
            self.closed = True
            transport.abort()
            return
        listener.per_client[ip] = n
        listener.clients.add(self)
        self.closing = listener.soft_closing
        self.deadline = self.loop.time() + listener.header_timeout_s
        h2 = listener.h2  # HTTP/2 (edgelb/h2/server.py): by ALPN on a TLS listener
        if h2 is not None and listener.ssl is not None:
            h2.negotiated(self, transport)

    def connection_lost(self, exc) -> None:
        if self.closed and self not in self.listener.clients:
            return  # refused by a limit in connection_made
        self.closed = True
        listener = self.listener
        listener.clients.discard(self)
        if listener.closing:
            listener.connection_gone()
        n = listener.per_client.get(self.xff_ip, 1) - 1
        if n > 0:
            listener.per_client[self.xff_ip] = n
        else:
            listener.per_client.pop(self.xff_ip, None)
        ex = self.active
        self.active = None
        self.pipeline = None
        if ex is not None and ex.state != DONE:
            state = ex.state
            ex.state = DONE
            up = ex.upstream
            service = ex.service
            if up is not None:
                up.abandon(ex)
            elif state == CONNECTING and service is not None and ex.backend is not None:
                # the connect callback sees the exchange DONE and keeps the connection for later
                service.pool.release(ex.backend)
            elif state == QUEUED and service is not None:
                service.pool.forget(ex)  # leaves the queue
            if state != RECEIVING_HEAD:
                finish(ex, "client_closed", self.loop.time())
            if ex.retries:
                end_retry(ex)
        elif self.tunnel is not None:
            self.tunnel.close()

    def eof_received(self) -> bool | None:
        """The client shut its side: the transport closes (asyncio.Protocol's default)."""
        return None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.tunnel is not None:
            self.tunnel.pause_reading()
            return
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.tunnel is not None:
            self.tunnel.resume_reading()
            return
        ex = self.active
        if ex is not None and ex.upstream is not None and not ex.upstream.closed:
            ex.upstream.transport.resume_reading()

    # what the upstream connection tells its client about reading
    def upstream_full(self) -> None:
        """The upstream's write buffer is full: stop reading the client until it drains."""
        self._pause(PAUSE_UPSTREAM)

    def upstream_drained(self) -> None:
        """The upstream takes writes again (or its exchange ended): read the client again."""
        self._resume(PAUSE_UPSTREAM)

    def buffer_flushed(self) -> None:
        """The body buffered while connecting went to the upstream: read the client again."""
        self._resume(PAUSE_BUFFER)

    def _pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.deadline = self.loop.time() + self.tunnel_timeout
            self.tunnel_bytes += len(data)
            self.tunnel.write(data)
            return
        if self.upgrade_buffer is not None:  # upgrade asked, the 101 not seen yet
            # reading is paused meanwhile; what was already read is bounded all the same
            self.upgrade_buffer.append(data)
            if sum(map(len, self.upgrade_buffer)) > BUFFER_LIMIT:
                self._fail_connection(400, "too much data sent before the upgrade was accepted")
            return
        if self.refusing:
            return  # a refused request ends what this connection may send
        parser = self.parser
        if parser is None:
            h2 = self.listener.h2  # h2c: the HTTP/2 preface on a plain listener
            if h2 is not None and data[:1] == b"P" and h2.prior_knowledge(self, data):
                return
            parser = self.parser = httptools.HttpRequestParser(self)
        before = self.parsing
        if before is not None and before.chunked and before.method:
            # Chunk framing and trailers are not body: bounded like a head (the parser would
            # gather a trailer of any size). on_body starts the count again.
            before.tail += len(data)
            if before.tail > MAX_TRAILING:
                self._refuse(431, "request trailers or chunk extensions too large")
                return
        try:
            parser.feed_data(data)
            parsing = self.parsing
            if parsing is not None and not parsing.method:
                # a request head that did not come whole
                if parsing is not before:
                    self.head_bytes = 0
                    if self.active is None:
                        # header_timeout counts from its first bytes; more do not extend it
                        self.deadline = self.loop.time() + self.listener.header_timeout_s
                else:
                    self.head_bytes += len(data)
                    if self.head_bytes > MAX_HEAD:
                        self._fail_connection(431, "request head too large")
        except httptools.HttpParserUpgrade as e:
            self.upgrade_buffer = [data[e.args[0] :]]
            self._pause(PAUSE_UPGRADE)  # until the 101 (start_tunnel) or the end
        except httptools.HttpParserCallbackError as e:
            refused = e.__context__
            if isinstance(refused, Refuse):
                self._refuse(refused.status, refused.detail)
                return
            log.exception("internal error while handling a request")
            self._fail_connection(500, "internal error")
        except httptools.HttpParserError as e:
            self._refuse(400, f"malformed request ({e})")

    def _refuse(self, status: int, detail: str) -> None:
        """A request that must not reach a backend: answered after the responses still due
        on this connection (pipelining keeps its order), then the connection closes. Nothing
        after it is read."""
        parsing = self.parsing
        self.parsing = None
        self.refusing = True
        active = self.active
        if active is None or active.state == DONE or active is parsing:
            # nothing before it to answer, or the request being served is the broken one
            # (e.g. a bad chunk in its body): answer now and drop its backend connection
            self._fail_connection(status, detail)
            return
        ex = Exchange(self)
        ex.bad = (status, detail)
        ex.state = WAITING_TURN
        ex.keep_alive = False
        ex.request_complete = True
        if self.pipeline is None:
            self.pipeline = deque()
        self.pipeline.append(ex)
        self._pause(PAUSE_PIPELINE)

    def _fail_connection(self, status: int, detail: str, bad: Exchange | None = None) -> None:
        """Answer a request that cannot be parsed and close: nothing reaches a backend.
        `bad`: the refused request answered in its turn (else the active or parsing one)."""
        if self.closed:
            return
        self.listener.local_responses[status] = self.listener.local_responses.get(status, 0) + 1
        ex = self.active
        if ex is None or not ex.response_started:
            data = local_response(status, detail, False)
            self.transport.write(data)
            answered = ex or bad or self.parsing
            if answered is None:  # not even a request line could be read
                answered = Exchange(self)
            if not answered.logged:
                # the request it answers (or the one being parsed) ends here
                answered.status = status
                answered.response_started = True
                answered.sent_head = len(data)
                if answered.start == 0.0:
                    answered.start = self.loop.time()
                finish(answered, local_reason(status), self.loop.time())
        if ex is not None and ex.state != DONE and ex.upstream is not None:
            ex.state = DONE
            ex.upstream.abandon(ex)
        self.transport.close()

    # -- parser callbacks ----------------------------------------------------------------

    # No on_message_begin: a request always starts with its target, so on_url opens the
    # exchange (one callback less per request).
    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        if ex is None:
            ex = self.parsing = Exchange(self)
            ex.url = url
        else:
            ex.url += url  # the target came in pieces
        if len(ex.url) > MAX_TARGET:
            raise Refuse(431, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None  # on_url opened it
        if ex.method:  # after the head: a chunked trailer
            trailers = ex.req_trailers
            if trailers is None:
                trailers = ex.req_trailers = []
            trailers.append(b"%s: %s\r\n" % (name, value))
            # bounded as the head is: limits.headers fields, MAX_HEAD bytes
            if len(trailers) > self.listener.max_headers:
                raise Refuse(431, "too many trailer fields")
            if sum(map(len, trailers)) > MAX_HEAD:
                raise Refuse(431, "request trailers too large")
            return
        lname = name.lower()
        if lname not in REQ_SPECIAL:
            ex.lines.append(b"".join((name, b": ", value, b"\r\n")))
        elif lname == b"host" and not ex.has_host:
            if not valid_host(value):
                raise Refuse(400, "invalid Host")
            ex.host = value
            ex.has_host = True
            ex.lines.append(b"".join((name, b": ", value, b"\r\n")))
        elif lname == b"host":
            raise Refuse(400, "more than one Host")
        else:
            special_request_header(ex, lname, name, value)

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None  # on_url opened it
        parser = self.parser
        ex.method = parser.get_method()
        lines = ex.lines
        if len(lines) > self.listener.max_headers:
            raise Refuse(431, "too many header fields")
        keep_alive = ex.keep_alive = parser.should_keep_alive()
        if keep_alive and ex.conn_tokens is None:
            # Without a Connection header only HTTP/1.1 keeps the connection alive (llhttp
            # gives 1.0, 0.9 and 2.0 close semantics); this saves get_http_version(), which
            # formats a new string on every call.
            version = "1.1"
        else:
            version = parser.get_http_version()
        if version != "1.1":
            check_version(version, ex)
        elif not ex.has_host:
            raise Refuse(400, "no Host (HTTP/1.1 requires one)")
        ex.version = version
        url = ex.url
        if url[0] != 47 or 35 in url:  # "/" and "#": anything but plain origin-form is checked
            check_target(ex)
            if url[0] != 47 and url != b"*":
                absolute_form(ex)
                url = ex.url
        if SUSPECT.search(url) is not None:
            # routed, checked and forwarded as the backend will read it (edgelb/http/target.py)
            listener = self.listener
            normal = normalise(url, listener.merge_slashes, listener.keep_encoded_slashes)
            if isinstance(normal, str):
                raise Refuse(400, normal)
            ex.url = normal
        if sum(map(len, lines)) > MAX_HEAD:  # a head that came whole in one read
            raise Refuse(431, "request head too large")
        # the parser marks an upgrade only for an Upgrade header or a CONNECT
        if (ex.upgrade_value or ex.method == b"CONNECT") and parser.should_upgrade():
            ex.upgrade = True
            ex.keep_alive = False  # the parser stops at an upgrade
        ex.state = WAITING_TURN
        if self.active is None:
            self.deadline = 0.0
            self._start(ex)
        else:
            if self.pipeline is None:
                self.pipeline = deque()
            self.pipeline.append(ex)
            self._pause(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None  # on_url opened it
        ex.tail = 0
        if ex.state == DONE:
            return
        if ex.mirror is not None:  # a route's mirrors keep a copy (bounded)
            mirror_body(ex, body)
        received = ex.received = ex.received + len(body)
        service = ex.service
        if service is not None:  # None while a pipelined request waits for its turn
            service.bytes_in += len(body)
            if service.special and service.policy.max_body is not None:
                if received > service.policy.max_body:
                    self._fail_connection(413, f"the body is over the "
                                          f"{service.policy.max_body} bytes service "
                                          f"{service.name} accepts")
                    ex.state = DONE
                    return
        if self.listener.min_body_rate and self._too_slow(ex, len(body)):
            return
        up = ex.upstream
        if up is not None and service is not None:  # (sent: routed)
            ex.body_sent = True
            # the upload is alive: the response timeout starts when it is complete
            up.deadline = self.loop.time() + service.policy.idle_timeout
            if ex.chunked:
                up.transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
            else:
                up.transport.write(body)
            return
        if ex.body_buffer is None:
            ex.body_buffer = []
        ex.body_buffer.append(body)
        ex.buffered += len(body)
        if ex.buffered > BUFFER_LIMIT:
            self._pause(PAUSE_BUFFER)

    def _too_slow(self, ex: Exchange, n: int) -> bool:
        """limits.min_body_rate: after a 10 s grace, a body must average at least that many
        bytes per second (a slowloris on the body); else 408 and close."""
        now = self.loop.time()
        t0 = ex.body_t0
        if not t0:
            ex.body_t0 = now
            ex.body_n = n
            return False
        got = ex.body_n = ex.body_n + n
        elapsed = now - t0
        if elapsed > BODY_RATE_GRACE and got < elapsed * self.listener.min_body_rate:
            self.listener.refused["slow_body"] = self.listener.refused.get("slow_body", 0) + 1
            self._fail_connection(408, "request body too slow")
            ex.state = DONE
            return True
        return False

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        assert ex is not None  # on_url opened it
        ex.request_complete = True
        if ex.state == DONE:
            # answered by the proxy before the request was read whole: go on with the next one
            if ex.backend is None and self.active is None and not self.closed:
                self.response_done(ex)
            return
        if ex.mirror is not None:
            mirror_complete(ex)
        up = ex.upstream
        service = ex.service
        if up is not None and service is not None:  # (sent: routed)
            if ex.chunked:
                up.transport.write(last_chunk(ex.req_trailers))
            if not ex.response_started:
                # the request is whole: now the response timeout runs (from its start when
                # no body was sent, which saves a clock read on the common GET)
                timeout = ex.timeout or service.policy.response_timeout
                if ex.body_sent:
                    up.deadline = self.loop.time() + timeout
                else:
                    up.deadline = ex.start + timeout

    # -- serving (edgelb/http/dispatch.py decides where a request goes) -----------------

    def _start(self, ex: Exchange) -> None:
        """`ex`'s turn: a refusal queued behind earlier responses is answered now; any other
        request is routed and sent (dispatch.start)."""
        self.active = ex
        ex.start = self.loop.time()
        if ex.bad is not None:
            status, detail = ex.bad
            ex.state = DONE  # answered here, and the connection closes
            self.active = None
            self._fail_connection(status, detail, ex)
            return
        tel = self.telemetry
        if tel is not None:
            tel.begin(ex, self)
        dispatch.start(self, ex)

    def dispatch_waiting(self, ex: Exchange) -> bool:
        """A queued exchange's turn (Pool.dispatch): sent if a backend is eligible now."""
        return dispatch.dispatch_waiting(self, ex)

    def shed(self, ex: Exchange, reason: str) -> None:
        """Answer 503 (or, in panic, take a spare backend): see dispatch.shed."""
        dispatch.shed(self, ex, reason)

    def auth_verdict(self, ex: Exchange, verdict: int) -> None:
        """The credentials of `ex` were verified off the loop: see dispatch.auth_verdict."""
        dispatch.auth_verdict(self, ex, verdict)

    def upstream_failed(self, ex: Exchange, kind: str, detail: str, safe: bool) -> None:
        """The backend failed before a response reached the client: see
        dispatch.upstream_failed (retried elsewhere, or answered 502/504)."""
        dispatch.upstream_failed(self, ex, kind, detail, safe)

    def retry_target(self, ex: Exchange, service: ServiceState, failed: BackendState,
                     kind: str, safe: bool) -> BackendState | None:
        """Where `ex` may go again after failing on `failed` (None: not retried)."""
        return dispatch.retry_target(ex, service, failed, kind, safe)

    def resend(self, ex: Exchange, service: ServiceState, backend: BackendState) -> None:
        """Send `ex` again, to `backend` (a retry)."""
        dispatch.resend(ex, service, backend)

    def answer(self, ex: Exchange, status: int, detail: str, service: ServiceState | None,
               extra: bytes = b"", reason: str = "") -> None:
        """Answer `ex` from the proxy itself, then go on with the connection. `reason`: why,
        for the access log (accounting.local_reason of the status when not given)."""
        counts = service.local_responses if service is not None else self.listener.local_responses
        if ex.backend is None or status in (404, 400):
            counts[status] = counts.get(status, 0) + 1
        # Without a backend, the rest of the request (if any) is read and dropped, and the
        # connection goes on; a failed upstream exchange whose body was cut off closes it.
        keep = ex.keep_alive and not self.closing and (
            ex.request_complete or (ex.backend is None and self.parsing is ex)
        )
        ex.keep_alive = keep
        ex.response_started = True
        ex.status = status
        data = local_response(status, detail, keep, extra + ex.resp_extra)
        head = data.index(b"\r\n\r\n") + 4
        if ex.method == b"HEAD":  # the head alone: a body would be read as the next response
            data = data[:head]
        ex.sent_head = head
        ex.resp_body = len(data) - head
        self.transport.write(data)
        now = self.loop.time()
        if service is not None:
            service.bytes_out += len(data)
        finish(ex, reason or local_reason(status), now)
        self.response_done(ex, now)

    def response_done(self, ex: Exchange, now: float = 0.0) -> None:
        """The response to the active exchange has been written whole."""
        ex.state = DONE
        self.active = None
        if ex.retries:
            end_retry(ex)
        if self.closed:
            return
        if not ex.keep_alive or self.closing:
            self.transport.close()
            return
        if not ex.request_complete:
            if ex.backend is None and self.parsing is ex:
                # a local answer: on_message_complete goes on once the body is read (and
                # dropped); the client gets the idle timeout to finish sending it
                ex.body_buffer = None
                self._resume(PAUSE_BUFFER)
                self.deadline = self.loop.time() + self.listener.idle_timeout_s
                return
            self.transport.close()
            return
        pipeline = self.pipeline
        if pipeline:
            nxt = pipeline.popleft()
            if not pipeline:
                self._resume(PAUSE_PIPELINE)
            self._start(nxt)
        else:
            self.deadline = (now or self.loop.time()) + self.listener.idle_timeout_s

    def start_tunnel(self, upstream_transport: asyncio.Transport, timeout: float) -> None:
        """Switch to a byte-for-byte tunnel after a 101 (WebSocket and other upgrades). Bytes
        either way push `deadline` on by `timeout` (HAProxy's `timeout tunnel`); the sweeper
        closes a tunnel silent that long. The exchange that asked for it is over."""
        self.active = None
        self.tunnel = upstream_transport
        self.tunnel_timeout = timeout
        self.deadline = self.loop.time() + timeout
        pending = self.upgrade_buffer or []
        self.upgrade_buffer = None
        for chunk in pending:
            if chunk:
                upstream_transport.write(chunk)
        self._resume(PAUSE_UPGRADE)

    # -- shutdown ------------------------------------------------------------------------

    def drain(self) -> None:
        """Finish the request in progress, then close; close at once when idle."""
        self.closing = True
        if self.active is None and self.tunnel is None and self.parsing is None:
            self.transport.close()

    def expire(self, now: float) -> None:
        """Called by the sweeper once `deadline` has passed."""
        self.deadline = 0.0
        if self.closed:
            return
        if self.tunnel is not None:
            refused = self.listener.refused
            refused["tunnel_idle"] = refused.get("tunnel_idle", 0) + 1
        elif self.parsing is not None and self.active is None and self.parsing.state != DONE:
            self.listener.local_responses[408] = self.listener.local_responses.get(408, 0) + 1
            data = local_response(408, "request head not received in time", False)
            self.transport.write(data)
            ex = self.parsing
            ex.status = 408
            ex.response_started = True
            ex.sent_head = len(data)
            if ex.start == 0.0:
                ex.start = now
            finish(ex, "client_timeout", now)
        self.transport.close()
