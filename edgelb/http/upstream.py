"""The backend side of the HTTP data path: one UpstreamProtocol per connection to a backend,
serving one exchange at a time and kept alive in between (parked in the backend's `idle` list),
and `send_to`, which hands an exchange to an idle connection or opens a new one.

The response is parsed with httptools (or relayed without it: `_fast`) and written straight to
the client's transport; the client connection is told what happened through its public methods.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any

import httptools

from edgelb.control.tasks import log_failure
from edgelb.h2.upstream import open_lane
from edgelb.http.accounting import (
    count,
    count_failure,
    finish,
    method_index,
    record_response,
)
from edgelb.http.exchange import CONNECTING, DONE, SENT, TUNNEL
from edgelb.http.filters import edit_head
from edgelb.http.request import MAX_HEAD, Refuse, last_chunk
from edgelb.http.response_head import (
    fast_heads,
    remember_fast,
    rewrite_response_head,
    rewrite_response_head_cached,
    sticky_line,
)
from edgelb.net.backend_tls import client_context, server_hostname

if TYPE_CHECKING:
    from edgelb.http.exchange import Exchange
    from edgelb.http.listener import HttpListener
    from edgelb.pool import BackendState, ServiceState

log = logging.getLogger("edgelb.http")


def send_to(ex: Exchange, service: ServiceState, backend: BackendState) -> None:
    """Hand `ex` to a kept-alive connection of `backend`, or open a new one (the one task per
    request that needs one, held by the listener)."""
    idle = backend.idle
    while idle:
        up = idle.pop()
        if not up.closed:
            up.attach(ex)
            return
    ex.state = CONNECTING
    client = ex.client
    task = client.loop.create_task(connect(ex, service, backend))
    connecting = client.listener.connecting
    connecting.add(task)
    task.add_done_callback(connecting.discard)
    task.add_done_callback(log_failure)


async def connect(ex: Exchange, service: ServiceState, backend: BackendState) -> None:
    """Open a connection to `backend` for `ex`: attached when it opens, kept (parked) if the
    client left meanwhile; a failure goes to the client (retried or answered)."""
    client = ex.client
    loop = client.loop
    listener = client.listener
    timeout = service.policy.connect_timeout
    spec = backend.spec
    tls = service.policy.backend_tls
    via = service.policy.backend_protocol
    extra: dict = {}
    if tls is not None and via == "http1":
        extra = {"ssl": client_context(tls), "server_hostname": server_hostname(tls, spec.host)}

    def protocol() -> UpstreamProtocol:
        return UpstreamProtocol(backend, service, listener)

    try:
        if via == "http1":
            opening = loop.create_connection(protocol, spec.host, spec.port, **extra)  # type: ignore[type-var]
        else:  # h2, h2c: a lane (one stream at a time) on a shared HTTP/2 connection
            opening = open_lane(loop, protocol, spec.host, spec.port, via, tls)
        _, up = await asyncio.wait_for(opening, timeout)
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
    if ex.state == DONE or client.closed:
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
        ex.state = SENT
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
            (ex.timeout or policy.response_timeout) if ex.request_complete
            else policy.idle_timeout
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
            client.buffer_flushed()
        else:
            transport.write(ex.head)
        if ex.request_complete and ex.chunked:
            transport.write(last_chunk(ex.req_trailers))
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
                finish(ex, "upgraded", self.listener.loop.time())
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
            timeout = ex.timeout or self.service.policy.response_timeout
            ex.client.upstream_failed(ex, "timeout", f"did not answer in {timeout:g}s", False)

    def eof_received(self) -> bool | None:
        """The backend shut its side: the transport closes (asyncio.Protocol's default);
        connection_lost then ends a read-until-close response."""
        return None

    def pause_writing(self) -> None:
        ex = self.ex  # also set while tunnelling
        if ex is not None:
            ex.client.upstream_full()

    def resume_writing(self) -> None:
        ex = self.ex
        if ex is not None:
            ex.client.upstream_drained()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            ex = self.ex  # kept while tunnelling
            if ex is not None:
                client = ex.client
                client.deadline = client.loop.time() + client.tunnel_timeout
                ex.resp_body += len(data)
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
            if isinstance(e.__context__, Refuse):  # a limit on the response's trailers
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
            or ex.resp_edits is not None
        ):
            return False
        self.hbuf = None
        ex.status = status
        ex.response_started = True
        if ex.resp_extra:  # the request ID (telemetry on)
            head = head[:-2] + ex.resp_extra + b"\r\n"
        ex.sent_head = len(head)
        ex.resp_body = length
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
        now = ex.client.loop.time()
        count_failure(self.backend, self.service, "reset", 0, ex.start, now)
        ex.state = DONE
        finish(ex, "upstream_reset", now)
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
        if ex is not None and ex.state != DONE:
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
                raise Refuse(502, "sent trailers over the head limits")

    def on_headers_complete(self) -> None:
        ex = self.ex
        if ex is None:
            return
        hbuf = self.hbuf
        assert hbuf is not None  # set while a head is read
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
        if ex.resp_edits is not None and status >= 200:  # a route's response header filter
            headers = edit_head(headers, ex.resp_edits)
            plain = b"HTTP/1.1 " + status_line + headers + b"\r\n"
        client = ex.client
        if status < 200:
            self.hbuf = hbuf[end + 4 :]  # another head follows
            self.interim = True
            if status == 101 and ex.upgrade:
                ex.status = 101
                ex.response_started = True
                head = (b"HTTP/1.1 " + status_line + headers + ex.resp_extra
                        + b"connection: upgrade\r\n\r\n")
                ex.sent_head = len(head)
                client.transport.write(head)
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
        add = sticky_line(ex.set_cookie, self.service.sticky_cookie) if ex.set_cookie else b""
        if ex.resp_extra:
            add += ex.resp_extra
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
        ex.sent_head = len(head)
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
        count_failure(self.backend, service, "", status, ex.start, client.loop.time())
        counts = self.backend.counts  # an answer, if not to the client: counted by method too
        key = method_index(ex.method) << 10 | status
        counts[key] = counts.get(key, 0) + 1
        service.pool.release(self.backend)
        client.resend(ex, service, other)
        return True

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        if ex is None:
            return
        transport = ex.client.transport
        self.service.bytes_out += len(body)
        ex.resp_body += len(body)
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
        """The response to `ex` went out whole: accounted, this connection parked for reuse
        (or closed), and the client goes on with its next request."""
        self.ex = None
        ex.upstream = None
        backend = self.backend
        service = self.service
        client = ex.client
        head = self.head_out
        if ex.client_chunked:
            if head:
                self.head_out = b""
                client.transport.writelines((head, last_chunk(ex.trailers)))
            else:
                client.transport.write(last_chunk(ex.trailers))
        elif head:
            self.head_out = b""
            client.transport.write(head)
        now = client.loop.time()
        record_response(ex, backend, service, now)
        finish(ex, "", now)
        client.upstream_drained()
        if reusable and ex.request_complete and not self.closed and not self.junk:
            if client.write_paused:
                self.transport.resume_reading()
            if self.feeding:
                # parked (and the client goes on) once the parser has seen the rest of this
                # read: a response followed by more bytes must not be reused (_settle)
                self.park_later = True
                self.finished = ex
                return
            self.park(now)
        elif self.junk:
            self._unsolicited()
        elif not self.closed:
            self.transport.close()
        if ex.state != DONE:
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
        service = ex.service
        assert service is not None  # it was sent
        self.tunnel = client.transport
        self.deadline = 0.0
        ex.state = TUNNEL
        # the upgrade is counted now (its duration: to the 101); logged when the tunnel closes
        now = client.loop.time()
        ex.upstream_time = now - ex.start - ex.queued
        self.backend.responses[101] += 1
        count(ex, "upgraded", now)
        client.start_tunnel(self.transport, service.policy.tunnel_timeout)
        if rest:
            client.transport.write(rest)
