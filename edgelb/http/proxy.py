"""The HTTP/1.1 data path: one Protocol object per client connection, one per upstream one.

A request is an `Exchange`. The client side parses with httptools and hands the exchange to
an upstream connection (a kept-alive idle one of the picked backend, or a new one); the
upstream side parses the response and writes it straight to the client transport. Bodies
stream in both directions with pause/resume flow control and are never buffered whole.
Requests pipelined behind the active one wait (with reading paused) and are answered in order.
No Task is made per request; only a new upstream connection costs one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from bisect import bisect_left
from collections import deque
from math import exp
from typing import TYPE_CHECKING, Any

import httptools

from balancers.ewma import TAU as EWMA_TAU
from balancers.ewma import error_sample, peak_ewma
from balancers.outlier import failure_kind
from balancers.retry_budget import IDEMPOTENT, retry_allowed
from balancers.zones import prefer_zone
from edgelb.control.tasks import log_failure
from edgelb.http.errors import local_response
from edgelb.http.headers import CONNECTION_OPTIONS, connection_tokens, drop_named, forwarded_for
from edgelb.http.response_head import (
    fast_heads,
    remember_fast,
    rewrite_response_head,
    rewrite_response_head_cached,
)
from edgelb.http.target import SUSPECT, normalise
from edgelb.net.acl import AUTH_BUSY, AUTH_CACHED, AUTH_PENDING, AUTH_THROTTLED
from edgelb.net.backend_tls import client_context, server_hostname
from edgelb.pool import DURATION_BUCKETS

if TYPE_CHECKING:
    from collections.abc import Sequence

    from balancers.base import Candidate
    from edgelb.http.listener import HttpListener
    from edgelb.pool import BackendState, ServiceState

log = logging.getLogger("edgelb.http")

BUFFER_LIMIT = 256 * 1024  # request body held while an upstream connection is being opened
MAX_HEAD = 64 * 1024  # a request head still incomplete after this much more data: 431
MAX_TARGET = 16 * 1024  # the request target: 431 beyond (HAProxy's whole buffer is 16 KiB)
# bytes of a chunked body that are not body (chunk lines, extensions, trailers) in a row:
# a head's limit plus one read's worth, since the count starts again at each piece of body
MAX_TRAILING = MAX_HEAD + 64 * 1024
BODY_RATE_GRACE = 10.0  # seconds before limits.min_body_rate applies to a request body

# reasons for pausing a client's reading
PAUSE_UPSTREAM = 1  # the upstream's write buffer is full
PAUSE_PIPELINE = 2  # a pipelined request waits behind the active one
PAUSE_BUFFER = 4  # body buffered while connecting
PAUSE_UPGRADE = 8  # an upgrade waits for its 101: bytes after it are the new protocol's

_join = b"".join
_COLON = b": "
_CRLF = b"\r\n"
_SP = b" "
_VERSION_LINE = b" HTTP/1.1\r\n"

_REQ_SPECIAL = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"via",
        b"expect",
        b"proxy-authorization",
    }
)
_RESP_SPECIAL = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"trailer",
    }
)


class Exchange:
    """One request and its response as it crosses the proxy."""

    __slots__ = (
        "backend",
        "bad",
        "body_buffer",
        "body_n",  # body bytes so far, counted only under limits.min_body_rate
        "body_sent",
        "body_t0",  # when the body began (0: not yet), the same
        "buffered",
        "chunked",
        "client",
        "client_chunked",
        "conn_tokens",
        "done",
        "fwd",
        "has_host",
        "head",
        "host",
        "keep_alive",
        "lines",
        "method",
        "queued",
        "received",  # body bytes so far, counted only under max_body
        "req_trailers",
        "request_complete",
        "response_started",
        "retries",
        "service",
        "set_cookie",
        "start",
        "status",
        "tail",  # chunked body: bytes read since the last body bytes (framing, trailers)
        "te_trailers",
        "trailers",
        "until_close",
        "upgrade",
        "upgrade_value",
        "upstream",
        "url",
        "version",
        "via",
        "wait_until",
        "xff",
    )

    def __init__(self, client: ClientProtocol) -> None:
        self.client = client
        self.url = b""
        self.lines: list[bytes] = []
        self.host = b""
        self.has_host = False
        self.conn_tokens: list[bytes] | None = None
        self.chunked = False
        self.te_trailers = False
        self.upgrade = False
        self.upgrade_value = b""
        self.xff = b""
        self.fwd = b""
        self.via = b""
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.body_buffer: list[bytes] | None = None
        self.buffered = 0
        self.body_sent = False
        self.request_complete = False
        self.req_trailers: list[bytes] | None = None
        self.head = b""
        self.service: ServiceState | None = None
        self.backend: BackendState | None = None
        self.upstream: UpstreamProtocol | None = None
        self.retries = 0
        self.start = 0.0
        self.status = 0
        self.response_started = False
        self.client_chunked = False
        self.until_close = False
        self.trailers: list[bytes] | None = None
        self.done = False
        self.set_cookie = b""  # a sticky backend id to hand the client with the response
        self.wait_until = 0.0  # while queued for a free backend slot: when it gives up
        self.bad: tuple[int, str] | None = None  # refused: (status, why), answered in turn
        self.body_t0 = 0.0
        self.body_n = 0
        self.received = 0
        self.queued = 0.0  # seconds it waited for a slot (not the backend's latency)
        self.tail = 0

    # A queued exchange is a waiter of its pool (edgelb.pool.Pool.enqueue).
    def resume(self) -> bool:
        """A slot may be free: go on if a backend takes it (False: keep waiting)."""
        client = self.client
        if self.done or client.closed:
            return True  # gone meanwhile: leaves the queue
        return client.dispatch_waiting(self)

    def shed(self, reason: str) -> None:
        client = self.client
        if not self.done and not client.closed:
            client.shed(self, reason)

    def auth_verdict(self, verdict: int) -> None:
        """The verdict of a password hash computed off the loop (Credentials.admit)."""
        client = self.client
        if not self.done and not client.closed:
            client.auth_verdict(self, verdict)


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
        "head_bytes",
        "listener",
        "loop",
        "parser",
        "parsing",
        "paused",
        "pipeline",
        "proxied",
        "refusing",
        "transport",
        "tunnel",
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

    # -- connection events -------------------------------------------------------------

    def connection_made(self, transport, peer: tuple | None = None) -> None:
        """`peer`: the client a PROXY header named (accept_proxy_protocol), else the
        transport's peer."""
        self.transport = transport
        listener = self.listener
        listener.accepted += 1
        ip, self.fwd_for = forwarded_for(
            peer or self.proxied or transport.get_extra_info("peername"))
        self.xff_ip = ip
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

    def connection_lost(self, exc) -> None:
        if self.closed and self not in self.listener.clients:
            return  # refused by a limit in connection_made
        self.closed = True
        listener = self.listener
        listener.clients.discard(self)
        n = listener.per_client.get(self.xff_ip, 1) - 1
        if n > 0:
            listener.per_client[self.xff_ip] = n
        else:
            listener.per_client.pop(self.xff_ip, None)
        ex = self.active
        self.active = None
        self.pipeline = None
        if ex is not None and not ex.done:
            ex.done = True
            up = ex.upstream
            if up is not None:
                up.abandon(ex)
            elif ex.backend is not None:
                # still connecting: the connect callback sees ex.done and gives the connection back
                ex.service.pool.release(ex.backend)  # type: ignore[union-attr]
            elif ex.wait_until:
                ex.service.pool.forget(ex)  # type: ignore[union-attr]  # queued: leaves the queue
            if ex.retries:
                _end_retry(ex)
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
            if isinstance(refused, _Refuse):
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
        if active is None or active.done or active is parsing:
            # nothing before it to answer, or the request being served is the broken one
            # (e.g. a bad chunk in its body): answer now and drop its backend connection
            self._fail_connection(status, detail)
            return
        ex = Exchange(self)
        ex.bad = (status, detail)
        ex.keep_alive = False
        ex.request_complete = True
        if self.pipeline is None:
            self.pipeline = deque()
        self.pipeline.append(ex)
        self._pause(PAUSE_PIPELINE)

    def _fail_connection(self, status: int, detail: str) -> None:
        """Answer a request that cannot be parsed and close: nothing reaches a backend."""
        if self.closed:
            return
        self.listener.local_responses[status] = self.listener.local_responses.get(status, 0) + 1
        ex = self.active
        if ex is None or not ex.response_started:
            self.transport.write(local_response(status, detail, False))
        if ex is not None and not ex.done and ex.upstream is not None:
            ex.done = True
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
            raise _Refuse(431, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        if ex.method:  # type: ignore[union-attr]  # after the head: a chunked trailer
            trailers = ex.req_trailers  # type: ignore[union-attr]
            if trailers is None:
                trailers = ex.req_trailers = []  # type: ignore[union-attr]
            trailers.append(b"%s: %s\r\n" % (name, value))
            # bounded as the head is: limits.headers fields, MAX_HEAD bytes
            if len(trailers) > self.listener.max_headers:
                raise _Refuse(431, "too many trailer fields")
            if sum(map(len, trailers)) > MAX_HEAD:
                raise _Refuse(431, "request trailers too large")
            return
        lname = name.lower()
        if lname not in _REQ_SPECIAL:
            ex.lines.append(_join((name, _COLON, value, _CRLF)))  # type: ignore[union-attr]
        elif lname == b"host" and not ex.has_host:  # type: ignore[union-attr]
            if not _valid_host(value):
                raise _Refuse(400, "invalid Host")
            ex.host = value  # type: ignore[union-attr]
            ex.has_host = True  # type: ignore[union-attr]
            ex.lines.append(_join((name, _COLON, value, _CRLF)))  # type: ignore[union-attr]
        elif lname == b"host":
            raise _Refuse(400, "more than one Host")
        else:
            _special_request_header(ex, lname, name, value)  # type: ignore[arg-type]

    def on_headers_complete(self) -> None:
        ex = self.parsing
        parser = self.parser
        ex.method = parser.get_method()  # type: ignore[union-attr]
        lines = ex.lines  # type: ignore[union-attr]
        if len(lines) > self.listener.max_headers:
            raise _Refuse(431, "too many header fields")
        keep_alive = ex.keep_alive = parser.should_keep_alive()  # type: ignore[union-attr]
        if keep_alive and ex.conn_tokens is None:  # type: ignore[union-attr]
            # Without a Connection header only HTTP/1.1 keeps the connection alive (llhttp
            # gives 1.0, 0.9 and 2.0 close semantics); this saves get_http_version(), which
            # formats a new string on every call.
            version = "1.1"
        else:
            version = parser.get_http_version()  # type: ignore[union-attr]
        if version != "1.1":
            _check_version(version, ex)  # type: ignore[arg-type]
        elif not ex.has_host:  # type: ignore[union-attr]
            raise _Refuse(400, "no Host (HTTP/1.1 requires one)")
        ex.version = version  # type: ignore[union-attr]
        url = ex.url  # type: ignore[union-attr]
        if url[0] != 47 or 35 in url:  # "/" and "#": anything but plain origin-form is checked
            _check_target(ex)  # type: ignore[arg-type]
            if url[0] != 47 and url != b"*":
                _absolute_form(ex)  # type: ignore[arg-type]
                url = ex.url  # type: ignore[union-attr]
        if SUSPECT.search(url) is not None:
            # routed, checked and forwarded as the backend will read it (edgelb/http/target.py)
            listener = self.listener
            normal = normalise(url, listener.merge_slashes, listener.keep_encoded_slashes)
            if isinstance(normal, str):
                raise _Refuse(400, normal)
            ex.url = normal  # type: ignore[union-attr]
        if sum(map(len, lines)) > MAX_HEAD:  # a head that came whole in one read
            raise _Refuse(431, "request head too large")
        # the parser marks an upgrade only for an Upgrade header or a CONNECT
        if (ex.upgrade_value or ex.method == b"CONNECT") and parser.should_upgrade():  # type: ignore[union-attr]
            ex.upgrade = True  # type: ignore[union-attr]
            ex.keep_alive = False  # type: ignore[union-attr]  # the parser stops at an upgrade
        if self.active is None:
            self.deadline = 0.0
            self._start(ex)  # type: ignore[arg-type]
        else:
            if self.pipeline is None:
                self.pipeline = deque()
            self.pipeline.append(ex)  # type: ignore[arg-type]
            self._pause(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        ex.tail = 0  # type: ignore[union-attr]
        if ex.done:  # type: ignore[union-attr]
            return
        service = ex.service  # type: ignore[union-attr]
        if service is not None:  # None while a pipelined request waits for its turn
            service.bytes_in += len(body)
            if service.special and service.policy.max_body is not None:
                received = ex.received = ex.received + len(body)  # type: ignore[union-attr]
                if received > service.policy.max_body:
                    self._fail_connection(413, f"the body is over the "
                                          f"{service.policy.max_body} bytes service "
                                          f"{service.name} accepts")
                    ex.done = True  # type: ignore[union-attr]
                    return
        if self.listener.min_body_rate and self._too_slow(ex, len(body)):  # type: ignore[arg-type]
            return
        up = ex.upstream  # type: ignore[union-attr]
        if up is not None:
            ex.body_sent = True  # type: ignore[union-attr]
            # the upload is alive: the response timeout starts when it is complete
            up.deadline = self.loop.time() + service.policy.idle_timeout  # type: ignore[union-attr]
            if ex.chunked:  # type: ignore[union-attr]
                up.transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
            else:
                up.transport.write(body)
            return
        if ex.body_buffer is None:  # type: ignore[union-attr]
            ex.body_buffer = []  # type: ignore[union-attr]
        ex.body_buffer.append(body)  # type: ignore[union-attr]
        ex.buffered += len(body)  # type: ignore[union-attr]
        if ex.buffered > BUFFER_LIMIT:  # type: ignore[union-attr]
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
            ex.done = True
            return True
        return False

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        ex.request_complete = True  # type: ignore[union-attr]
        if ex.done:  # type: ignore[union-attr]
            # answered by the proxy before the request was read whole: go on with the next one
            if ex.backend is None and self.active is None and not self.closed:  # type: ignore[union-attr]
                self.response_done(ex)  # type: ignore[arg-type]
            return
        up = ex.upstream  # type: ignore[union-attr]
        if up is not None:
            if ex.chunked:  # type: ignore[union-attr]
                up.transport.write(_last_chunk(ex.req_trailers))  # type: ignore[union-attr]
            if not ex.response_started:  # type: ignore[union-attr]
                # the request is whole: now the response timeout runs (from its start when
                # no body was sent, which saves a clock read on the common GET)
                timeout = ex.service.policy.response_timeout  # type: ignore[union-attr]
                if ex.body_sent:  # type: ignore[union-attr]
                    up.deadline = self.loop.time() + timeout
                else:
                    up.deadline = ex.start + timeout  # type: ignore[union-attr]

    # -- serving -------------------------------------------------------------------------

    def _start(self, ex: Exchange) -> None:
        self.active = ex
        ex.start = self.loop.time()
        if ex.bad is not None:  # a refusal queued behind earlier responses: its turn now
            status, detail = ex.bad
            self.active = None
            self._fail_connection(status, detail)
            return
        listener = self.listener
        service = listener.service
        if service is None:
            service = listener.route(ex.host, ex.url)
            if service is None:
                self._local(ex, 404, "no route for this host and path", None)
                return
        ex.service = service
        service.bytes_in += len(ex.url) + 64 + ex.buffered  # buffered: a pipelined body
        if ex.method == b"CONNECT":
            self._local(ex, 400, "CONNECT is not supported by a reverse proxy", service)
            return
        if service.special and self._special(ex, service):
            return
        self._forward(ex, service)

    def _forward(self, ex: Exchange, service: ServiceState) -> None:
        """Send `ex` to a backend of `service`, queue it, or shed it."""
        ex.head = self._request_head(ex)
        pool = service.pool
        if pool.keyed:  # sticky cookie or a hashing policy: a key from the request
            backend = self._keyed_pick(ex, service)
        else:
            backend = pool.balancer.pick(pool.candidates)  # type: ignore[assignment]
        if backend is None:
            if not pool.at_capacity():
                self.shed(ex, "no_backend")
            elif not pool.enqueue(ex, ex.start):
                self.shed(ex, "queue_full")
            return
        self._send(ex, backend)

    def _special(self, ex: Exchange, service: ServiceState) -> bool:
        """sources, redirect_to_https, max_body and auth; True when the proxy answered, or
        when the credentials are being verified off the loop (auth_verdict goes on). Auth
        comes last: a client is never asked for a password over plain http when it is to be
        redirected to https, and a verification is the only step that may wait.

        While a verification is pending the client's reading goes on, as while a backend
        connection opens: a body is buffered up to BUFFER_LIMIT, a pipelined request waits
        its turn (both pause reading), and a client that leaves is seen at once (a paused
        transport would not see it, and its request would reach the backend)."""
        policy = service.policy
        sources = policy.sources
        if sources is not None and not sources.permits(self.xff_ip):
            self._local(ex, 403, "your address may not use this service", service)
            return True
        if policy.redirect_to_https and self.listener.scheme == b"http":
            host = ex.host.decode("latin-1")
            if host.startswith("["):
                host = host[: host.find("]") + 1]
            else:
                host = host.partition(":")[0]
            if not host:
                self._local(ex, 400, "a redirect to https needs a Host", service)
                return True
            location = f"https://{host}{ex.url.decode('latin-1')}"
            self._local(ex, 308, f"use {location}", service,
                        b"location: %s\r\n" % location.encode("latin-1"))
            return True
        limit = policy.max_body
        if limit is not None:
            length = _header(ex.lines, b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                ex.keep_alive = False  # the body is not read: the connection cannot go on
                self._local(ex, 413, f"the body is over the {limit} bytes service "
                            f"{service.name} accepts", service)
                return True
        creds = policy.auth
        if creds is not None:
            verdict: int = creds.admit(_header(ex.lines, b"authorization"), self.xff_ip,
                                       self.loop, ex.auth_verdict)
            if verdict == AUTH_PENDING:
                return True
            return self._auth_refused(ex, service, creds, verdict)
        return False

    def auth_verdict(self, ex: Exchange, verdict: int) -> None:
        """The credentials of the active exchange were verified off the loop: answer the
        refusal, or go on to a backend."""
        service: ServiceState = ex.service  # type: ignore[assignment]
        creds = service.policy.auth
        if creds is None or not self._auth_refused(ex, service, creds, verdict):
            self._forward(ex, service)  # (auth removed by a reload meanwhile: let through)

    def _auth_refused(self, ex: Exchange, service: ServiceState, creds: Any,
                      verdict: int) -> bool:
        """Count an auth verdict; answer 401, 429 or 503 (True) or let the request by."""
        service.auth_results[verdict] += 1
        if verdict <= AUTH_CACHED:
            return False
        if verdict == AUTH_THROTTLED:
            self._local(ex, 429, "too many failed logins from your address; wait and retry",
                        service, b"retry-after: %d\r\n" % creds.retry_after(self.xff_ip))
        elif verdict == AUTH_BUSY:
            self._local(ex, 503, "too many logins are being checked at once; retry shortly",
                        service, RETRY_AFTER)
        else:
            self._local(ex, 401, "this service needs a user name and password", service,
                        creds.challenge_header)
        return True

    def dispatch_waiting(self, ex: Exchange) -> bool:
        """A queued exchange's turn: send it if a backend is eligible now."""
        service = ex.service
        pool = service.pool  # type: ignore[union-attr]
        if pool.keyed:
            backend = self._keyed_pick(ex, service)  # type: ignore[arg-type]
        else:
            backend = pool.balancer.pick(pool.candidates)  # type: ignore[assignment]
        if backend is None:
            return False
        ex.wait_until = 0.0
        ex.queued = self.loop.time() - ex.start
        self._send(ex, backend)
        return True

    def shed(self, ex: Exchange, reason: str) -> None:
        """Answer 503 at once: no backend, the wait queue is full, or the wait timed out;
        in panic mode an unhealthy backend under its cap takes it instead."""
        service: ServiceState = ex.service  # type: ignore[assignment]
        pool = service.pool
        if pool.spare:
            backend = pool.pick_spare()
            if backend is not None:
                pool.panic_routed += 1
                if ex.wait_until:
                    ex.queued = self.loop.time() - ex.start
                    ex.wait_until = 0.0
                self._send(ex, backend)
                return
        service.shed[reason] = service.shed.get(reason, 0) + 1
        ex.wait_until = 0.0
        if reason == "no_backend":
            detail = f"no backend available for service {service.name}"
        elif reason == "queue_full":
            detail = f"every backend of service {service.name} is at its limit and the " \
                     "queue is full"
        else:
            detail = f"every backend of service {service.name} stayed at its limit for " \
                     f"{service.policy.queue_timeout:g}s"
        self._local(ex, 503, detail, service, RETRY_AFTER)

    def _keyed_pick(self, ex: Exchange, service: ServiceState) -> BackendState | None:
        pool = service.pool
        policy = service.policy
        if policy.sticky:
            sid = _cookie(ex.lines, STICKY_COOKIE)
            if sid:
                backend = pool.by_sticky.get(sid)
                if backend is not None and backend.eligible:
                    return backend
        candidates: Sequence[Candidate] = pool.candidates
        if pool.zone:  # zone-aware: in-zone backends while the zone has room
            candidates = prefer_zone(candidates, pool.zone, pool.zone_threshold)
        key = None
        if pool.balancer_keyed:
            spec = policy.hash_key
            if spec == "source":
                key = self.xff_ip
            elif spec.startswith("cookie:"):
                key = _cookie(ex.lines, spec[7:].encode())
            else:
                key = _header(ex.lines, spec[7:].encode())
        backend = pool.balancer.pick(candidates, key)  # type: ignore[assignment]
        if backend is not None and policy.sticky:
            ex.set_cookie = backend.sticky_id
        return backend

    def _send(self, ex: Exchange, backend: BackendState) -> None:
        ex.backend = backend
        k = backend.inflight = backend.inflight + 1
        if k == backend.cap:  # Pool.acquire, inlined: at its cap, not eligible
            backend.eligible = False
        backend.requests += 1
        idle = backend.idle
        while idle:
            up = idle.pop()
            if not up.closed:
                up.attach(ex)
                return
        # a new connection: the one task per request that needs one, held by the listener
        task = self.loop.create_task(_connect(ex, backend))
        connecting = self.listener.connecting
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        task.add_done_callback(log_failure)

    def upstream_failed(self, ex: Exchange, kind: str, detail: str, safe: bool) -> None:
        """The backend failed before a response reached the client: retry it elsewhere when
        that is safe, else answer 502/504 (or nothing: the client is gone).

        `safe`: nothing of the request can have been processed (connect error, a kept-alive
        connection closed before any answer): retried whatever the method, outside the budget.
        Otherwise only an idempotent request is retried, within the service's retry budget."""
        backend: BackendState = ex.backend  # type: ignore[assignment]
        service: ServiceState = ex.service  # type: ignore[assignment]
        ex.upstream = None
        _count_failure(backend, service, kind, 0, ex.start, self.loop.time())
        if ex.done:
            return  # the client went away while connecting: connection_lost released it
        service.pool.release(backend)
        if self.closed:
            return
        if not ex.body_sent and ex.retries < service.policy.retries:
            other = self.retry_target(ex, service, backend, kind, safe)
            if other is not None:
                self.resend(ex, service, other)
                return
        status = 504 if kind == "timeout" else 502
        backend.responses[status] += 1
        _note_error(backend, service, detail, self.loop.time())
        # the client is told what kind of failure, never the backend's internal address
        self._local(ex, status, _GATEWAY_TIMEOUT if status == 504 else _BAD_GATEWAY, service)

    def retry_target(self, ex: Exchange, service: ServiceState, failed: BackendState,
                     kind: str, safe: bool) -> BackendState | None:
        """Where `ex` may go again after failing on `failed`, or None (not retried)."""
        if not safe:
            # after a reset or a 502/503 an idempotent request may go again; not after a
            # timeout (the backend may still be working on it) or a malformed answer
            if kind == "timeout" or kind == "bad" or ex.method not in IDEMPOTENT:
                return None
            if not ex.retries:
                budget = service.policy.retry_budget
                active = sum(b.inflight for b in service.pool.backends)
                if not retry_allowed(active, service.retrying, budget.ratio, budget.min):
                    service.retries_denied += 1
                    return None
        other = service.pool.pick_other(failed)
        if other is None and kind == "reset" and safe and failed.eligible:
            other = failed  # a stale kept-alive connection: a fresh one to the same backend
        return other

    def resend(self, ex: Exchange, service: ServiceState, backend: BackendState) -> None:
        if not ex.retries:
            service.retrying += 1  # this exchange holds a share of the budget until it ends
        ex.retries += 1
        service.retries_total += 1
        self._send(ex, backend)

    def _local(self, ex: Exchange, status: int, detail: str, service: ServiceState | None,
               extra: bytes = b"") -> None:
        """Answer `ex` from the proxy itself, then go on with the connection."""
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
        data = local_response(status, detail, keep, extra)
        if ex.method == b"HEAD":  # the head alone: a body would be read as the next response
            data = data[: data.index(b"\r\n\r\n") + 4]
        self.transport.write(data)
        if service is not None:
            service.bytes_out += len(data)
            service.observe(self.loop.time() - ex.start)
        self.response_done(ex)

    def response_done(self, ex: Exchange, now: float = 0.0) -> None:
        """The response to the active exchange has been written whole."""
        ex.done = True
        self.active = None
        if ex.retries:
            _end_retry(ex)
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
        closes a tunnel silent that long."""
        self.tunnel = upstream_transport
        self.tunnel_timeout = timeout
        self.deadline = self.loop.time() + timeout
        pending = self.upgrade_buffer or []
        self.upgrade_buffer = None
        for chunk in pending:
            if chunk:
                upstream_transport.write(chunk)
        self._resume(PAUSE_UPGRADE)

    def _request_head(self, ex: Exchange) -> bytes:
        lines = ex.lines
        if ex.conn_tokens:
            named = {t for t in ex.conn_tokens if t not in _NEVER_NAMED}
            if named:
                lines = drop_named(lines, named)
        if ex.xff or ex.fwd or ex.via:
            tail = self._forwarding(ex)
        else:
            # The forwarding block depends only on the client and the Host: reuse it.
            tail = self.fwd_cache
            if ex.host != self.fwd_cache_host or not tail:
                tail = self.fwd_cache = self._forwarding(ex)
                self.fwd_cache_host = ex.host
        if not ex.has_host or ex.chunked or ex.te_trailers or ex.upgrade:
            tail = self._framing_lines(ex) + tail
        # (b"".join of a tuple: cheaper than %-formatting, which parses its format each time)
        if len(lines) == 1:
            return _join((ex.method, _SP, ex.url, _VERSION_LINE, lines[0], tail))
        return _join((ex.method, _SP, ex.url, _VERSION_LINE, _join(lines), tail))

    def _framing_lines(self, ex: Exchange) -> bytes:
        parts = []
        if not ex.has_host:
            parts.append(b"host: %s\r\n" % self.listener.default_host())
        if ex.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        if ex.te_trailers:
            parts.append(b"te: trailers\r\n")
        if ex.upgrade:
            parts.append(b"connection: upgrade\r\nupgrade: %s\r\n" % ex.upgrade_value)
        return b"".join(parts)

    def _forwarding(self, ex: Exchange) -> bytes:
        """X-Forwarded-*, Forwarded and Via lines, and the blank line that ends the head."""
        ip = self.xff_ip
        proto = self.listener.scheme
        parts = [
            b"x-forwarded-for: %s\r\nx-forwarded-proto: %s\r\n"
            % (ex.xff + b", " + ip if ex.xff else ip, proto)
        ]
        fwd = self.fwd_for + b";proto=" + proto
        if ex.has_host:
            parts.append(b"x-forwarded-host: %s\r\n" % ex.host)
            fwd += b';host="' + ex.host + b'"'
        parts.append(
            b"forwarded: %s\r\nvia: %s1.1 edgelb\r\n\r\n"
            % (ex.fwd + b", " + fwd if ex.fwd else fwd, ex.via + b", " if ex.via else b"")
        )
        return b"".join(parts)

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
        elif self.parsing is not None and self.active is None and not self.parsing.done:
            self.listener.local_responses[408] = self.listener.local_responses.get(408, 0) + 1
            self.transport.write(local_response(408, "request head not received in time", False))
        self.transport.close()


class _Refuse(Exception):
    """Raised in a parser callback to refuse the request (stops the parser at once)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# Connection may not name the fields that frame or route the message (a client naming
# Content-Length there would have the body forwarded without it: smuggling).
_NEVER_NAMED = CONNECTION_OPTIONS | {b"content-length", b"transfer-encoding", b"host"}

_HOST = re.compile(
    rb"(?:[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    rb"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
    rb"|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
)
_host_ok: dict[bytes, bool] = {}  # hosts seen, validated once (bounded)


def _valid_host(value: bytes) -> bool:
    ok = _host_ok.get(value)
    if ok is None:
        m = _HOST.fullmatch(value)
        ok = m is not None and (b"]:" in value or value.count(b":") <= 1 or value[:1] == b"[")
        if ok and b":" in value and not value.endswith(b"]"):
            port = value.rsplit(b":", 1)[1]
            ok = port.isdigit() and 0 < int(port) < 65536
        if len(_host_ok) >= 1024:
            _host_ok.clear()
        _host_ok[value] = ok
    return ok


def _check_version(version: str, ex: Exchange) -> None:
    if version == "1.0":
        if ex.chunked:
            raise _Refuse(400, "Transfer-Encoding in an HTTP/1.0 request")
        return
    if version.startswith("0."):
        raise _Refuse(400, "HTTP/0.9 requests are not served")
    raise _Refuse(505, f"HTTP/{version} is not spoken here (HTTP/1.1 and 1.0 are)")


def _check_target(ex: Exchange) -> None:
    """The request target: origin-form (no fragment), `*` for OPTIONS only, or absolute-form
    with an http(s) scheme, an authority without userinfo, and a valid host."""
    url = ex.url
    if b"#" in url:
        raise _Refuse(400, "a fragment (#) in the request target")
    if url == b"*":
        if ex.method != b"OPTIONS":
            raise _Refuse(400, "the target * is for OPTIONS only")
        return
    if url[0] == 47:
        return
    scheme, sep, rest = url.partition(b"://")
    if not sep:
        raise _Refuse(400, "the request target is not a path or an absolute URL")
    if scheme.lower() not in (b"http", b"https"):
        raise _Refuse(400, "the request target's scheme is not http or https")
    authority = rest.split(b"/", 1)[0].split(b"?", 1)[0]
    if not authority or b"@" in authority or not _valid_host(authority):
        raise _Refuse(400, "the request target's authority is empty or not a valid host")


def _special_request_header(ex: Exchange, lname: bytes, name: bytes, value: bytes) -> None:
    if lname == b"host":
        if not ex.has_host:
            ex.host = value
            ex.has_host = True
            ex.lines.append(b"%s: %s\r\n" % (name, value))
    elif lname == b"connection":
        if ex.conn_tokens is None:
            ex.conn_tokens = []
        ex.conn_tokens.extend(connection_tokens(value))
    elif lname == b"te":
        if b"trailers" in value.lower():
            ex.te_trailers = True
    elif lname == b"transfer-encoding":
        ex.chunked = True  # the parser accepts only a final "chunked"
    elif lname == b"upgrade":
        ex.upgrade_value = value
    elif lname == b"x-forwarded-for":
        ex.xff = ex.xff + b", " + value if ex.xff else value
    elif lname == b"forwarded":
        ex.fwd = ex.fwd + b", " + value if ex.fwd else value
    elif lname == b"via":
        ex.via = ex.via + b", " + value if ex.via else value
    elif lname == b"expect":
        ex.lines.append(b"%s: %s\r\n" % (name, value))
    # keep-alive, proxy-connection, proxy-authorization, x-forwarded-proto and
    # x-forwarded-host are dropped: the first three are hop-by-hop (credentials for this
    # proxy, never for a backend), the last two are set by the proxy itself.


def _absolute_form(ex: Exchange) -> None:
    """`GET http://host/path` (RFC 9112 3.2.2): the target's authority is the host. Forward
    origin-form with a matching Host, which every backend understands."""
    url = ex.url
    scheme_end = url.find(b"://")
    if scheme_end < 0:
        return  # not absolute-form; the backend judges it
    rest = url[scheme_end + 3 :]
    slash = rest.find(b"/")
    authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
    at = authority.rfind(b"@")
    if at >= 0:
        authority = authority[at + 1 :]  # no userinfo in a Host
    ex.url = path
    ex.lines = [ln for ln in ex.lines if ln[:5].lower() != b"host:"]
    ex.lines.append(b"host: %s\r\n" % authority)
    ex.host = authority
    ex.has_host = True


STICKY_COOKIE = b"edgelb_server"  # names the backend a sticky client is pinned to


def _sticky_line(sticky_id: bytes) -> bytes:
    return b"set-cookie: %s=%s; Path=/; HttpOnly; SameSite=Lax\r\n" % (STICKY_COOKIE, sticky_id)


def _header(lines: list[bytes], name: bytes) -> bytes | None:
    """The value of request header `name` (first occurrence), or None."""
    prefix = name.lower() + b":"
    for line in lines:
        if line[: len(prefix)].lower() == prefix:
            return line[len(prefix) :].strip()
    return None


def _cookie(lines: list[bytes], name: bytes) -> bytes | None:
    """The value of cookie `name` in the request's Cookie headers, or None."""
    for line in lines:
        if line[:7].lower() == b"cookie:":
            for pair in line[7:].split(b";"):
                k, eq, v = pair.strip().partition(b"=")
                if eq and k == name:
                    return v.strip()
    return None


def _last_chunk(trailers: list[bytes] | None) -> bytes:
    if trailers:
        return b"0\r\n" + b"".join(trailers) + b"\r\n"
    return b"0\r\n\r\n"


RETRY_AFTER = b"retry-after: 1\r\n"  # on a 503 the proxy sheds itself
_BAD_GATEWAY = "the backend failed before answering"
_GATEWAY_TIMEOUT = "the backend did not answer in time"
ERROR_LOG_INTERVAL = 10.0  # seconds: a backend's same failure is logged again after this


def _note_error(backend: BackendState, service: ServiceState, detail: str, now: float) -> None:
    """Keep why a backend failed a request (/status.json `last_error`), and log it: at once
    when the reason changes, else at most every ERROR_LOG_INTERVAL."""
    if detail != backend.last_error or now - backend.last_error_t >= ERROR_LOG_INTERVAL:
        backend.last_error_t = now
        log.warning("service %s: backend %s %s", service.name, backend.key, detail)
    backend.last_error = detail


def _count_failure(backend: BackendState, service: ServiceState, kind: str, status: int,
                   started: float, now: float) -> None:
    """A connect error, reset, timeout, broken response or a retried 502/503: counted, a slow
    latency sample, a failure for outlier ejection and the adaptive limit."""
    backend.failures += 1
    sample = error_sample(now - started)
    backend.latency = peak_ewma(backend.latency, backend.latency_t, sample, now)
    backend.latency_t = now
    if status:
        backend.responses[status] += 1
    _failed(backend, service, failure_kind(kind, status), now)


_OVERLOAD = frozenset({"timeout", "503", "504"})  # failures that tell a backend is overloaded


def _failed(backend: BackendState, service: ServiceState, kind: str | None, now: float) -> None:
    lim = backend.limiter
    if lim is not None and kind in _OVERLOAD:
        lim.failure(now)
        service.pool.cap_changed(backend, lim.limit)
    if kind is not None:
        service.pool.failure(backend, kind, now)


def _end_retry(ex: Exchange) -> None:
    """The exchange that held a share of the retry budget has ended."""
    ex.retries = 0
    service = ex.service
    if service is not None:
        service.retrying -= 1


async def _connect(ex: Exchange, backend: BackendState) -> None:
    client = ex.client
    service = ex.service
    loop = client.loop
    timeout = service.policy.connect_timeout  # type: ignore[union-attr]
    spec = backend.spec
    tls = service.policy.backend_tls  # type: ignore[union-attr]
    extra: dict = {}
    if tls is not None:
        extra = {"ssl": client_context(tls), "server_hostname": server_hostname(tls, spec.host)}
    try:
        _, up = await asyncio.wait_for(
            loop.create_connection(
                lambda: UpstreamProtocol(backend, service, client.listener),  # type: ignore[arg-type,type-var]
                spec.host,
                spec.port,
                **extra,
            ),
            timeout,
        )
    except ssl.SSLError as e:
        why = getattr(e, "verify_message", None) or e.reason or e
        client.upstream_failed(ex, "connect", f"failed the TLS handshake ({why})", True)
        return
    except TimeoutError:
        client.upstream_failed(ex, "timeout", f"did not accept a connection in {timeout:g}s", True)
        return
    except OSError as e:
        client.upstream_failed(ex, "connect", f"refused the connection ({e.strerror or e})", True)
        return
    if ex.done or client.closed:
        up.park()  # the client went away meanwhile: keep the fresh connection for later
        return
    up.attach(ex)


class _Callbacks:
    """The callbacks a response parser calls (httptools looks them up once, by name)."""

    __slots__ = ("on_body", "on_header", "on_headers_complete", "on_message_begin",
                 "on_message_complete")

    def __init__(self, on_headers_complete, on_body, on_message_complete,
                 on_message_begin) -> None:
        self.on_headers_complete = on_headers_complete
        self.on_body = on_body
        self.on_message_complete = on_message_complete
        self.on_message_begin = on_message_begin
        self.on_header: Any = None  # set only to read trailers


class UpstreamProtocol:  # an asyncio.Protocol (not subclassed: see compiled.py)
    """One connection to a backend, serving one exchange at a time, kept alive in between."""

    __slots__ = (
        "backend",
        "closed",
        "deadline",
        "ex",
        "feeding",
        "finished",
        "got_bytes",
        "hbuf",
        "head_out",
        "in_trailers",
        "interim",
        "junk",
        "listener",
        "park_later",
        "parser",
        "parser_trailers",
        "reused",
        "service",
        "trailer_bytes",
        "transport",
        "tunnel",
        "upstream_close",
    )

    def __init__(
        self, backend: BackendState, service: ServiceState, listener: HttpListener
    ) -> None:
        self.backend = backend
        self.service = service
        self.listener = listener
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser_trailers = False
        self.parser = self._new_parser(False)
        self.ex: Exchange | None = None
        self.closed = False
        self.reused = False
        self.got_bytes = False
        self.deadline = 0.0
        self.hbuf: bytes | None = None  # raw bytes of the response head being received
        self.in_trailers = False
        self.interim = False
        self.upstream_close = False
        self.tunnel: asyncio.Transport | None = None
        self.head_out = b""  # a response head held back to go out with the first body bytes
        # Upstream hygiene: a response completed while the parser is being fed is parked
        # (made reusable) only after the read, and only if nothing followed it (`junk`).
        self.feeding = False
        self.park_later = False
        self.finished: Exchange | None = None  # its client goes on once parking is settled
        self.junk = False
        self.trailer_bytes = 0  # of the response being read (bounded like a head)

    def connection_made(self, transport) -> None:
        self.transport = transport
        backend = self.backend
        backend.connections_total += 1
        backend.open_connections += 1
        self.listener.upstreams.add(self)

    def attach(self, ex: Exchange) -> None:
        """Send `ex`'s request head and whatever body has arrived so far."""
        self.ex = ex
        ex.upstream = self
        self.got_bytes = False
        self.hbuf = b""
        self.in_trailers = False
        self.trailer_bytes = 0
        if ex.te_trailers != self.parser_trailers:
            self.parser = self._new_parser(ex.te_trailers)
        client = ex.client
        policy = self.service.policy
        # the response timeout runs from the end of the request; while the body is still
        # coming, the idle timeout applies (each piece restarts it)
        self.deadline = ex.start + (
            policy.response_timeout if ex.request_complete else policy.idle_timeout
        )
        transport = self.transport
        buf = ex.body_buffer
        if buf:
            ex.body_buffer = None
            ex.body_sent = True
            if ex.chunked:
                out = [ex.head]
                for chunk in buf:
                    out += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
                transport.writelines(out)
            else:
                transport.writelines([ex.head, *buf])
            client._resume(PAUSE_BUFFER)
        else:
            transport.write(ex.head)
        if ex.request_complete and ex.chunked:
            transport.write(_last_chunk(ex.req_trailers))
        if client.write_paused:
            transport.pause_reading()

    def park(self, now: float = 0.0) -> None:
        """Put this idle connection back in its backend's pool, or close it."""
        backend = self.backend
        if self.closed or backend.draining or len(backend.idle) >= self.service.policy.max_idle:
            self.transport.close()
            return
        self.reused = True
        self.deadline = (now or self.listener.loop.time()) + self.service.policy.idle_timeout
        backend.idle.append(self)

    def abandon(self, ex: Exchange) -> None:
        """The client went away mid-exchange: this connection cannot be reused."""
        if self.ex is ex:
            self.ex = None
            self.service.pool.release(self.backend)
        self.transport.close()

    def close(self) -> None:
        self.transport.close()

    # -- connection events -------------------------------------------------------------

    def connection_lost(self, exc) -> None:
        self.closed = True
        backend = self.backend
        backend.open_connections -= 1
        self.listener.upstreams.discard(self)
        if self.ex is None and self in backend.idle:
            backend.idle.remove(self)
        if self.tunnel is not None:
            self.tunnel.close()
            ex = self.ex
            self.ex = None
            if ex is not None:
                self.service.pool.release(backend)
            return
        ex = self.ex
        if ex is None:
            return
        self.ex = None
        client = ex.client
        if ex.response_started:
            if ex.until_close and not self.interim:
                self._complete(ex, reusable=False)
            else:
                self._cut(ex)
            return
        # a kept-alive connection closed before any answer: the backend closed it while idle
        # (the request crossed its close), so nothing was processed
        safe = self.reused and not self.got_bytes
        client.upstream_failed(ex, "reset", "closed the connection before answering", safe)

    def expire(self, now: float) -> None:
        self.deadline = 0.0
        ex = self.ex
        if ex is None:
            self.transport.close()  # idle too long
            return
        self.ex = None
        self.transport.close()
        if ex.response_started:
            self._cut(ex)
        else:
            timeout = self.service.policy.response_timeout
            ex.client.upstream_failed(ex, "timeout", f"did not answer in {timeout:g}s", False)

    def eof_received(self) -> bool | None:
        """The backend shut its side: the transport closes (asyncio.Protocol's default);
        connection_lost then ends a read-until-close response."""
        return None

    def pause_writing(self) -> None:
        ex = self.ex  # also set while tunnelling
        if ex is not None:
            ex.client._pause(PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        ex = self.ex
        if ex is not None:
            ex.client._resume(PAUSE_UPSTREAM)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            ex = self.ex  # kept while tunnelling
            if ex is not None:
                client = ex.client
                client.deadline = client.loop.time() + client.tunnel_timeout
            self.tunnel.write(data)
            return
        self.got_bytes = True
        self.backend.bytes_in += len(data)
        ex = self.ex
        if ex is None:
            self._unsolicited()  # bytes from an idle backend connection: no request's answer
            return
        hbuf = self.hbuf
        if hbuf is not None:  # a head is expected: keep its raw bytes for on_headers_complete
            if not hbuf and self._fast(ex, data):
                return
            if hbuf:  # the head did not come whole in the last read
                hbuf += data
                if len(hbuf) > MAX_HEAD + len(data):
                    self._bad_response("sent a response head over 64 KiB")
                    return
                self.hbuf = hbuf
            else:
                self.hbuf = data
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.feeding = False
            self._switch_protocols(data[e.args[0] :])
            return
        except httptools.HttpParserCallbackError as e:
            self.feeding = False
            if self.park_later:
                self.junk = True
                self._settle()
                return
            if isinstance(e.__context__, _Refuse):  # a limit on the response's trailers
                self._bad_response(e.__context__.detail)
                return
            log.exception("internal error while relaying a response")
            self._bad_response("internal error")
            return
        except httptools.HttpParserError as e:
            self.feeding = False
            if self.ex is None:  # what followed a complete response is not one
                self.junk = True
                self._settle()
                return
            self._bad_response(f"sent a malformed response ({e})")
            return
        self.feeding = False
        if self.park_later or self.junk:
            self._settle()
            return
        head = self.head_out
        if head:  # the head came without body bytes in this read: send it now
            self.head_out = b""
            ex.client.transport.write(head)
        if self.ex is not None and ex.response_started:
            # the body goes on in later reads: the idle timeout runs from the last data
            self.deadline = ex.client.loop.time() + self.service.policy.idle_timeout

    def _fast(self, ex: Exchange, data: bytes) -> bool:
        """The common response, relayed without the parser: a head httptools accepted before
        (response_head.fast_heads) with its whole Content-Length body in this one read, for
        a keep-alive HTTP/1.1 client that needs nothing added to it."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        entry = fast_heads.get(data[: end + 2])
        if entry is None:
            return False
        head, length, close, status = entry
        start = end + 4
        if len(data) - start != length or self.interim or ex.method == b"HEAD" or (
            ex.version != "1.1" or not ex.keep_alive or ex.te_trailers or ex.set_cookie
            or ex.upgrade or ex.client.closing or self.service.hsts_line
        ):
            return False
        self.hbuf = None
        ex.status = status
        ex.response_started = True
        self.service.bytes_out += len(head) + length
        if length <= 16384:
            ex.client.transport.write(head + data[start:])
        else:
            ex.client.transport.writelines((head, data[start:]))
        self._complete(ex, not close)
        return True

    def _cut(self, ex: Exchange) -> None:
        """The backend failed in the middle of a response: the client must see it broken."""
        self.service.pool.release(self.backend)
        _count_failure(self.backend, self.service, "reset", 0, ex.start, ex.client.loop.time())
        ex.done = True
        ex.client.transport.close()

    def _bad_response(self, detail: str) -> None:
        ex = self.ex
        self.ex = None
        self.transport.close()
        if ex is None:
            return
        if ex.response_started:
            self._cut(ex)
        else:
            ex.client.upstream_failed(ex, "bad", detail, False)

    # -- parser callbacks ----------------------------------------------------------------

    def _new_parser(self, trailers: bool) -> httptools.HttpResponseParser:
        """A response parser; with `trailers` it also reports header fields (for trailers).

        Head fields are read from the raw head bytes (split_response_head), so the common
        parser has no per-header callback at all.
        """
        self.parser_trailers = trailers
        cb = _Callbacks(self.on_headers_complete, self.on_body, self.on_message_complete,
                        self.on_message_begin)
        if trailers:
            cb.on_header = self.on_trailer
        return httptools.HttpResponseParser(cb)

    def on_message_begin(self) -> None:
        if self.ex is None:  # a response begins that no request is waiting for
            self.junk = True

    def _settle(self) -> None:
        """After a read in which a response completed: the connection is parked for reuse
        only if nothing followed the response in that read (else closed, `_unsolicited`);
        then the client goes on, so that its next pipelined request may take this very
        connection."""
        ex = self.finished
        self.finished = None
        later = self.park_later
        self.park_later = False
        if self.junk:
            self._unsolicited()
        elif later:
            self.park()
        if ex is not None and not ex.done:
            ex.client.response_done(ex)

    def _unsolicited(self) -> None:
        """The backend sent bytes that answer no request (after a whole response, or while
        the connection was idle): they are dropped, never parsed as the next request's
        answer, and the connection is closed and counted."""
        self.park_later = False
        transport = self.transport
        if self.closed or transport.is_closing():
            return
        self.backend.unsolicited += 1
        log.debug("backend %s of service %s sent bytes after a complete response; closing "
                  "that connection", self.backend.key, self.service.name)
        transport.close()

    def on_trailer(self, name: bytes, value: bytes) -> None:
        ex = self.ex
        if self.in_trailers and ex is not None and ex.client_chunked:
            if ex.trailers is None:
                ex.trailers = []
            line = b"%s: %s\r\n" % (name, value)
            ex.trailers.append(line)
            size = self.trailer_bytes = self.trailer_bytes + len(line)
            if size > MAX_HEAD or len(ex.trailers) > self.listener.max_headers:
                raise _Refuse(502, "sent trailers over the head limits")

    def on_headers_complete(self) -> None:
        ex = self.ex
        if ex is None:
            return
        hbuf: bytes = self.hbuf  # type: ignore[assignment]  # set while a head is read
        end = hbuf.find(b"\r\n\r\n")
        status = self.parser.get_status_code()
        if status >= 502 and status <= 503 and self._retry_answer(ex, status):
            return
        if ex.te_trailers or status == 101:
            status_line, headers, chunked, has_cl, close, plain = rewrite_response_head(
                hbuf[: end + 2], ex.te_trailers, status == 101
            )
        else:
            raw = hbuf[: end + 2]
            rewrite = rewrite_response_head_cached(raw)
            status_line, headers, chunked, has_cl, close, plain = rewrite
            if raw not in fast_heads:
                remember_fast(raw, status, rewrite)
        client = ex.client
        if status < 200:
            self.hbuf = hbuf[end + 4 :]  # another head follows
            self.interim = True
            if status == 101 and ex.upgrade:
                ex.status = 101
                ex.response_started = True
                client.transport.write(
                    b"HTTP/1.1 " + status_line + headers + b"connection: upgrade\r\n\r\n"
                )
                return
            if ex.version != "1.0" and status != 101:  # 100 Continue, 103 Early Hints
                client.transport.write(b"HTTP/1.1 " + status_line + headers + b"\r\n")
            return
        self.hbuf = None
        self.in_trailers = True
        self.interim = False
        self.upstream_close = close
        ex.status = status
        ex.response_started = True
        bodiless = ex.method == b"HEAD" or status == 204 or status == 304
        keep = ex.keep_alive and not client.closing
        add = _sticky_line(ex.set_cookie) if ex.set_cookie else b""
        if self.service.hsts_line and client.listener.scheme == b"https":
            add += self.service.hsts_line
        if keep and ex.version == "1.1" and (bodiless or (has_cl and not chunked)):
            head = plain  # the common case: nothing to add
            if add:
                head = head[:-2] + add + b"\r\n"
        else:
            parts = [b"HTTP/1.1 ", status_line, headers]
            if not bodiless:
                if chunked or not has_cl:
                    ex.until_close = not chunked
                    if ex.version == "1.1":
                        ex.client_chunked = True
                        parts.append(b"transfer-encoding: chunked\r\n")
                    else:
                        keep = False  # an HTTP/1.0 client reads to the close
            ex.keep_alive = keep
            if add:
                parts.append(add)
            if not keep:
                parts.append(b"connection: close\r\n\r\n")
            elif ex.version == "1.0":
                parts.append(b"connection: keep-alive\r\n\r\n")
            else:
                parts.append(b"\r\n")
            head = b"".join(parts)
        self.service.bytes_out += len(head)
        self.head_out = head  # written with the body, or by _complete, or after this read
        if bodiless:
            # The response parser cannot be told that a HEAD response has no body: finish
            # here and give the connection a fresh parser for its next response. Bytes after
            # the head (a body sent anyway) answer nothing: the connection is not reused.
            if len(hbuf) > end + 4:
                self.junk = True
            self.parser = self._new_parser(self.parser_trailers)
            self._complete(ex, reusable=not ex.until_close and not self.upstream_close)

    def _retry_answer(self, ex: Exchange, status: int) -> bool:
        """A 502/503 from the backend: held back and retried elsewhere when the request may
        go again (idempotent, no body sent, retries and budget left, another backend);
        otherwise False and it goes to the client as it is."""
        service = self.service
        if ex.body_sent or ex.retries >= service.policy.retries:
            return False
        client = ex.client
        other = client.retry_target(ex, service, self.backend, "", False)
        if other is None:
            return False
        # this connection is given up with its body unread
        self.ex = None
        self.hbuf = None
        ex.upstream = None
        self.transport.close()
        _count_failure(self.backend, service, "", status, ex.start, client.loop.time())
        service.pool.release(self.backend)
        client.resend(ex, service, other)
        return True

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        if ex is None:
            return
        transport = ex.client.transport
        self.service.bytes_out += len(body)
        head = self.head_out
        if head:
            self.head_out = b""
            # one write (one syscall) for a small response; join only when it is small
            if ex.client_chunked:
                transport.writelines((head, b"%x\r\n" % len(body), body, b"\r\n"))
            elif len(body) <= 16384:
                transport.write(head + body)
            else:
                transport.writelines((head, body))
        elif ex.client_chunked:
            transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
        else:
            transport.write(body)

    def on_message_complete(self) -> None:
        ex = self.ex
        if ex is None or self.interim:
            if self.interim and ex is not None and ex.status != 101:
                self.interim = False
            return
        self._complete(ex, reusable=self.parser.should_keep_alive())

    def _complete(self, ex: Exchange, reusable: bool) -> None:
        self.ex = None
        ex.upstream = None
        backend = self.backend
        service = self.service
        client = ex.client
        head = self.head_out
        if ex.client_chunked:
            if head:
                self.head_out = b""
                client.transport.writelines((head, _last_chunk(ex.trailers)))
            else:
                client.transport.write(_last_chunk(ex.trailers))
        elif head:
            self.head_out = b""
            client.transport.write(head)
        now = client.loop.time()
        elapsed = now - ex.start
        service.duration_buckets[bisect_left(DURATION_BUCKETS, elapsed)] += 1
        service.duration_sum += elapsed
        status = ex.status
        # The balancer's latency input, balancers.ewma.peak_ewma written out (it runs per
        # request); a 5xx counts as a slow sample: a fast-failing backend must not look fast.
        rtt = elapsed - ex.queued  # the backend's part: without a wait for a slot
        if status < 500:
            sample = rtt
            backend.fails = 0  # consecutive failures, for outlier ejection
        else:
            sample = error_sample(rtt)
            _failed(backend, service, failure_kind("", status), now)
        lat = backend.latency
        if lat <= 0.0 or sample >= lat:
            backend.latency = sample
        else:
            dt = now - backend.latency_t
            # exp(-dt/tau); on a busy backend dt is tiny and 1 - dt/tau is as good (< 5e-5 off)
            w = 1.0 - dt / EWMA_TAU if dt < 0.1 else exp(-dt / EWMA_TAU)
            backend.latency = lat * w + sample * (1.0 - w)
        backend.latency_t = now
        backend.responses[status] += 1  # a defaultdict
        k = backend.inflight
        backend.inflight = k - 1
        lim = backend.limiter
        if lim is not None and lim.sample(rtt, now, k):
            service.pool.cap_changed(backend, lim.limit)
        if k == backend.cap or backend.draining:  # Pool.release, inlined
            service.pool.release_slow(backend, k)
        if client.paused & PAUSE_UPSTREAM:
            client._resume(PAUSE_UPSTREAM)
        if reusable and ex.request_complete and not self.closed and not self.junk:
            if client.write_paused:
                self.transport.resume_reading()
            if self.feeding:
                # parked (and the client goes on) once the parser has seen the rest of this
                # read: a response followed by more bytes must not be reused (_settle)
                self.park_later = True
                self.finished = ex
                return
            policy = service.policy
            idle = backend.idle
            if backend.draining or len(idle) >= policy.max_idle:  # park(), inlined
                self.transport.close()
            else:
                self.reused = True
                self.deadline = now + policy.idle_timeout
                idle.append(self)
        elif self.junk:
            self._unsolicited()
        elif not self.closed:
            self.transport.close()
        if not ex.done:
            client.response_done(ex, now)

    def _switch_protocols(self, rest: bytes) -> None:
        ex = self.ex
        if ex is None or ex.status != 101:
            self._bad_response("switched protocols without being asked")
            return
        client = ex.client
        if client.closed:
            self.transport.close()
            return
        self.tunnel = client.transport
        self.deadline = 0.0
        ex.done = True
        client.active = None
        client.start_tunnel(self.transport, ex.service.policy.tunnel_timeout)  # type: ignore[union-attr]
        if rest:
            client.transport.write(rest)
