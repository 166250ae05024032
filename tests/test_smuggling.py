"""Request smuggling and malformed input: a catalogue of hostile requests, the edge cases that
must still pass, and a fuzz test of the request parser path (issue 6, point 3).

Every case goes over a real socket to a proxy in front of a backend that records the raw bytes of
each upstream connection. A rejected case must get its status and a closed connection, and the
backend must have received nothing of it: its streams are re-parsed by the strict parser below
and may hold only the requests the case allows (e.g. the valid first one of a pipelined pair).
An accepted case must reach the backend as one normalised message.

Decisions taken here (the proxy has to match them):
- Status codes: 400 for every ambiguous or malformed message, 431 when the request line, one
  header line or the whole head is too large or it has more than MAX_HEADERS fields, 413 when
  the body is larger than the service's `max_body` (Policy.max_body, in bytes), 505 for a
  well-formed version other than HTTP/1.0 and HTTP/1.1 (HTTP/1.2 included: no such version
  exists, so nothing legitimate is lost by refusing it).
- MAX_HEADERS is 100 header fields (Host counted): 100 pass, 101 get 431.
- An error found in a chunked body (after the head) may come after the head was forwarded, as
  the body streams: there the backend may have seen the head and part of the body on a
  connection the proxy then closes, never a complete request and never the bad bytes.
- `Transfer-Encoding:<TAB>chunked` and `Transfer-Encoding: CHUNKED` are valid (OWS may be a tab,
  codings are case-insensitive): accepted and forwarded as `transfer-encoding: chunked`.
- A Connection header naming Content-Length, Transfer-Encoding or Host never strips the
  framing or the Host from what is forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
import uvloop
from httpkit import (
    HOST,
    Client,
    HttpBackend,
    Request,
    fetch,
    free_port,
    ok,
    running,
    service,
    snapshot,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watchers.model import Policy

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

LIMIT = 1024  # max_body of the service used by the 413 cases
MAX_HEADERS = 100
BIG = 70 * 1024  # above any sane head limit (the proxy's is at most 64 KiB)
ANSWER = 1.5  # seconds the proxy may take to answer a case
SENTINEL = "/__sentinel__"


# -- the recording backend --------------------------------------------------------------


class RawBackend(HttpBackend):
    """An HttpBackend that also keeps every byte received, one bytearray per connection."""

    def __init__(self, name: str = "b", handler=None) -> None:
        super().__init__(name, handler)
        self.raw: list[bytearray] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = bytearray()
        self.raw.append(stream)
        feed = reader.feed_data

        def tee(data: bytes) -> None:
            stream.extend(data)
            feed(data)

        reader.feed_data = tee  # type: ignore[method-assign]
        await super()._serve(reader, writer)


# -- a strict parser for what reaches the backend ---------------------------------------


class Violation(AssertionError):
    """The backend received bytes that a strict HTTP/1.1 parser refuses."""


_ALNUM = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
TCHAR = frozenset(_ALNUM + b"!#$%&'*+-.^_`|~")
TARGET_CHARS = frozenset(_ALNUM + b"-._~!$&'()*+,;=:@/?%")
HEXDIG = frozenset(b"0123456789abcdefABCDEF")
FIELD_CHARS = frozenset([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
HOST_RE = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(:[0-9]*)?")
FRAMING = {b"content-length", b"transfer-encoding", b"host"}


@dataclass
class Message:
    """One request as a strict parser reads it off a backend connection."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # (lowercase name, value without OWS)
    head: bytes
    body: bytes = b""
    complete: bool = False  # False: the connection's bytes stop inside this message

    def all(self, name: str) -> list[bytes]:
        key = name.encode()
        return [v for k, v in self.headers if k == key]

    def __repr__(self) -> str:
        state = "complete" if self.complete else "cut short"
        target = self.target if len(self.target) < 60 else self.target[:40] + b"..."
        return f"<{self.method.decode('latin-1')} {target!r} {state}>"


def _field(line: bytes, where: str) -> tuple[bytes, bytes]:
    if line[:1] in (b" ", b"\t"):
        raise Violation(f"obs-fold or leading whitespace in {where}: {line!r}")
    name, colon, value = line.partition(b":")
    if not colon or not name or not set(name) <= TCHAR:
        raise Violation(f"invalid field line in {where}: {line!r}")
    value = value.strip(b" \t")
    if not set(value) <= FIELD_CHARS:
        raise Violation(f"control byte in a field value in {where}: {line!r}")
    return name.lower(), value


def _lines(block: bytes) -> list[bytes]:
    lines = block.split(b"\r\n")
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise Violation(f"bare CR or LF in {block[:200]!r}")
    return lines


def strict_head(head: bytes) -> Message:
    """Parse a request head (ending with the blank line) or raise Violation."""
    request_line, *field_lines = _lines(head[:-4])
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise Violation(f"request line is not METHOD SP target SP version: {request_line!r}")
    method, target, version = parts
    if not method or not set(method) <= TCHAR:
        raise Violation(f"invalid method {method!r}")
    if version != b"HTTP/1.1":
        raise Violation(f"forwarded version is {version!r}, not HTTP/1.1")
    if target == b"*":
        if method != b"OPTIONS":
            raise Violation(f"asterisk-form with {method!r}")
    elif not target.startswith(b"/") or not set(target) <= TARGET_CHARS:
        raise Violation(f"target is not a clean origin-form: {target!r}")
    elif re.search(rb"%(?![0-9A-Fa-f]{2})", target):
        raise Violation(f"bad percent-encoding in {target!r}")
    headers = [_field(line, "the head") for line in field_lines]
    msg = Message(method, target, headers, head)
    hosts, lengths, codings = msg.all("host"), msg.all("content-length"), msg.all(
        "transfer-encoding")
    if len(hosts) != 1 or not HOST_RE.fullmatch(hosts[0]):
        raise Violation(f"not exactly one valid Host: {hosts!r}")
    if lengths and codings:
        raise Violation("both Content-Length and Transfer-Encoding")
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
        raise Violation(f"Content-Length is not one decimal number: {lengths!r}")
    if len(codings) > 1 or (codings and codings[0].lower() != b"chunked"):
        raise Violation(f"Transfer-Encoding is not a single chunked: {codings!r}")
    return msg


def _chunked(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """A chunked body from `pos`: (decoded body, end) or None when the bytes stop inside it."""
    body = bytearray()
    while True:
        eol = data.find(b"\r\n", pos)
        line = data[pos:] if eol < 0 else data[pos:eol]
        if not set(line) <= HEXDIG or len(line) > 16 or b"\n" in line:
            raise Violation(f"forwarded chunk-size line is not bare hex: {line[:80]!r}")
        if eol < 0:
            return None
        if not line:
            raise Violation("empty chunk-size line")
        size = int(line, 16)
        pos = eol + 2
        if size == 0:
            break
        if len(data) < pos + size + 2:
            return None
        body += data[pos : pos + size]
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise Violation("chunk data not followed by CRLF")
        pos += size + 2
    while True:  # trailer section
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        line = data[pos:eol]
        pos = eol + 2
        if not line:
            return bytes(body), pos
        name, _ = _field(_lines(line)[0], "the trailers")
        if name in FRAMING:
            raise Violation(f"framing field forwarded in a trailer: {line!r}")


def strict_stream(data: bytes) -> list[Message]:
    """Every request on one backend connection; the last may be cut short (the proxy closed
    the connection mid-request). Raises Violation on anything a strict parser refuses."""
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            part = data[pos:]
            _lines(part.rstrip(b"\r"))  # a head cut short: what is there must be clean
            words = part.split(b"\r\n", 1)[0].split(b" ") if b"\r\n" in part else []
            method, target = (words[0], words[1]) if len(words) == 3 else (b"?", b"?")
            out.append(Message(method, target, [], part))
            return out
        try:
            msg = strict_head(data[pos : end + 4])
        except Violation as e:
            raise Violation(f"{e} in {data[pos : pos + 400]!r}") from None
        out.append(msg)
        pos = end + 4
        if msg.all("transfer-encoding"):
            try:
                got = _chunked(data, pos)
            except Violation as e:
                raise Violation(f"{e} in the body of {msg.head[:300]!r}") from None
            if got is None:
                return out
            msg.body, pos = got
        elif msg.all("content-length"):
            n = int(msg.all("content-length")[0])
            if len(data) < pos + n:
                return out
            msg.body, pos = data[pos : pos + n], pos + n
        msg.complete = True
    return out


def backend_messages(b: RawBackend, skip: set[int] | None = None) -> list[Message]:
    """All messages the backend received, strictly parsed (Violation on the first bad one).
    Connections whose index is in `skip` are left out; a bad one is added to it."""
    out: list[Message] = []
    for i, stream in enumerate(b.raw):
        if skip is not None and i in skip:
            continue
        try:
            out += strict_stream(bytes(stream))
        except Violation as e:
            if skip is not None:
                skip.add(i)
            raise Violation(f"backend connection {i + 1}: {e}") from None
    return out


def test_strict_parser_refuses_what_it_should():
    """The checker itself: it must catch the classic ways a forwarded message goes wrong."""
    good = b"POST /a?b=%20 HTTP/1.1\r\nHost: h:1\r\nContent-Length: 2\r\n\r\nok"
    msgs = strict_stream(good + b"GET / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
                         b"2\r\nhi\r\n0\r\n\r\nGET /cut HTTP/1.1\r\nHost: h\r\n")
    assert [(m.target, m.body, m.complete) for m in msgs] == [
        (b"/a?b=%20", b"ok", True), (b"/", b"hi", True), (b"/cut", b"", False)]
    bad = [
        b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX : y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: y\r\n z\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: h\r\n\r\n",
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;x\r\nhello\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nHost: x\r\n\r\n",
    ]
    for data in bad:
        with pytest.raises(Violation):
            strict_stream(data)


# -- the catalogue -----------------------------------------------------------------------


def msg(start: str, *fields: str, body: bytes = b"") -> bytes:
    """A request head from its lines, joined with CRLF, then `body`."""
    return ("\r\n".join((start, *fields)) + "\r\n\r\n").encode("latin-1") + body


H = "Host: test.local"


@dataclass(frozen=True)
class Case:
    id: str
    raw: bytes
    status: int  # what the proxy answers: 400, 413, 431 or 505
    why: str
    forwarded: tuple[str, ...] = ()  # targets of the valid requests before it that may pass
    body_error: bool = False  # found inside the body: the head may have gone upstream

    @property
    def limited(self) -> bool:
        return self.status == 413


def _first(rest: bytes) -> bytes:
    return msg("GET /first HTTP/1.1", H) + rest


CATALOGUE: list[Case] = [
    # -- Content-Length and Transfer-Encoding together ----------------------------------
    Case("cl-te", msg("POST / HTTP/1.1", H, "Content-Length: 6", "Transfer-Encoding: chunked",
                      body=b"0\r\n\r\nG"), 400,
         "CL.TE: a front end framing by Content-Length leaves 'G' to prefix the next request"),
    Case("te-cl", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked", "Content-Length: 3",
                      body=b"8\r\nSMUGGLED\r\n0\r\n\r\n"), 400,
         "TE.CL: a back end framing by Content-Length reads the chunk as a new request"),
    Case("te-xchunked-cl", msg("POST / HTTP/1.1", H, "Content-Length: 4",
                               "Transfer-Encoding: xchunked", body=b"5c\r\n"), 400,
         "TE.TE: an unknown coding next to a Content-Length"),
    Case("te-space-colon-cl", msg("POST / HTTP/1.1", H, "Content-Length: 4",
                                  "Transfer-Encoding : chunked", body=b"5c\r\n"), 400,
         "TE.TE: whitespace before the colon hides the name from some parsers"),
    Case("te-tab-cl", msg("POST / HTTP/1.1", H, "Content-Length: 4",
                          "Transfer-Encoding:\tchunked", body=b"5c\r\n"), 400,
         "a tab is valid OWS, so this is both framings at once"),
    Case("expect-cl-te", msg("POST / HTTP/1.1", H, "Expect: 100-continue", "Content-Length: 5",
                             "Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400,
         "no 100 Continue for an ambiguous message: the 400 comes first"),
    # -- Transfer-Encoding other than one final chunked ---------------------------------
    Case("te-xchunked", msg("POST / HTTP/1.1", H, "Transfer-Encoding: xchunked",
                            body=b"0\r\n\r\n"), 400, "unknown transfer coding"),
    Case("te-space-colon", msg("POST / HTTP/1.1", H, "Transfer-Encoding : chunked",
                               body=b"0\r\n\r\n"), 400, "whitespace between name and colon"),
    Case("te-chunked-identity", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked, identity",
                                    body=b"0\r\n\r\n"), 400, "chunked is not the final coding"),
    Case("te-identity", msg("POST / HTTP/1.1", H, "Transfer-Encoding: identity",
                            body=b"0\r\n\r\n"), 400, "identity is no longer a transfer coding"),
    Case("te-twice", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked",
                         "Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400,
         "two TE fields: chunked applied twice"),
    Case("te-twice-mixed", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked",
                               "Transfer-Encoding: identity", body=b"0\r\n\r\n"), 400,
         "two TE fields, the last one not chunked"),
    Case("te-quoted", msg("POST / HTTP/1.1", H, 'Transfer-Encoding: "chunked"',
                          body=b"0\r\n\r\n"), 400, "a quoted coding is no coding"),
    Case("te-vtab", msg("POST / HTTP/1.1", H, "Transfer-Encoding:\x0bchunked",
                        body=b"0\r\n\r\n"), 400, "vertical tab is a control byte, not OWS"),
    Case("te-nul", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked\x00",
                       body=b"0\r\n\r\n"), 400, "NUL after the coding"),
    Case("te-obs-fold", msg("POST / HTTP/1.1", H, "Transfer-Encoding:\r\n chunked",
                            body=b"0\r\n\r\n"), 400, "the coding on an obs-folded line"),
    Case("te-after-bare-lf", b"POST / HTTP/1.1\r\nHost: test.local\r\nX: y\nTransfer-Encoding:"
                             b" chunked\r\n\r\n0\r\n\r\n", 400,
         "TE hidden behind a bare LF: one parser sees it, another does not"),
    Case("te-http10", msg("POST / HTTP/1.0", H, "Transfer-Encoding: chunked",
                          body=b"0\r\n\r\n"), 400,
         "HTTP/1.0 with Transfer-Encoding: the framing is faulty (RFC 9112 6.1)"),
    # -- Content-Length -----------------------------------------------------------------
    Case("cl-plus", msg("POST / HTTP/1.1", H, "Content-Length: +5", body=b"hello"), 400,
         "a sign is not a digit"),
    Case("cl-hex", msg("POST / HTTP/1.1", H, "Content-Length: 0x5", body=b"hello"), 400,
         "hexadecimal length"),
    Case("cl-list-equal", msg("POST / HTTP/1.1", H, "Content-Length: 5, 5", body=b"hello"), 400,
         "a list, even of equal values, is refused rather than merged"),
    Case("cl-list-different", msg("POST / HTTP/1.1", H, "Content-Length: 5, 6",
                                  body=b"hello"), 400, "a list of different lengths"),
    Case("cl-twice-equal", msg("POST / HTTP/1.1", H, "Content-Length: 5", "Content-Length: 5",
                               body=b"hello"), 400, "duplicated Content-Length"),
    Case("cl-twice-different", msg("POST / HTTP/1.1", H, "Content-Length: 5",
                                   "Content-Length: 20", body=b"hello"), 400,
         "two different lengths: each side may pick another"),
    Case("cl-negative", msg("POST / HTTP/1.1", H, "Content-Length: -1"), 400,
         "negative length"),
    Case("cl-overflow", msg("POST / HTTP/1.1", H, "Content-Length: 99999999999999999999999",
                            body=b"hello"), 400, "beyond 64 bits: wraps in some parsers"),
    Case("cl-empty", msg("POST / HTTP/1.1", H, "Content-Length:", body=b"hello"), 400,
         "empty value"),
    Case("cl-inner-space", msg("POST / HTTP/1.1", H, "Content-Length: 1 0", body=b"hello"), 400,
         "space inside the number"),
    Case("cl-junk", msg("POST / HTTP/1.1", H, "Content-Length: 5x", body=b"hello"), 400,
         "trailing junk after the digits"),
    Case("cl-decimal", msg("POST / HTTP/1.1", H, "Content-Length: 5.0", body=b"hello"), 400,
         "a decimal point"),
    Case("cl-space-colon", msg("POST / HTTP/1.1", H, "Content-Length : 5", body=b"hello"), 400,
         "whitespace between name and colon"),
    # -- chunked bodies (the error is in the body: the head may have gone upstream) -------
    Case("chunk-0x", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked",
                         body=b"0x5\r\nhello\r\n0\r\n\r\n"), 400, "0x prefix", body_error=True),
    Case("chunk-negative", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked",
                               body=b"-5\r\nhello\r\n0\r\n\r\n"), 400, "negative chunk size",
         body_error=True),
    Case("chunk-overflow", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked",
                               body=b"10000000000000005\r\nhello\r\n0\r\n\r\n"), 400,
         "chunk size beyond 64 bits: truncates to 5 in some parsers", body_error=True),
    Case("chunk-non-hex", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked",
                              body=b"g\r\nhello\r\n0\r\n\r\n"), 400, "not a hex digit",
         body_error=True),
    Case("chunk-leading-space", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked",
                                    body=b" 5\r\nhello\r\n0\r\n\r\n"), 400,
         "whitespace before the size", body_error=True),
    Case("chunk-last-bare-lf", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked",
                                   body=b"0\n\n"), 400, "0\\n\\n: the last chunk with bare LFs",
         body_error=True),
    Case("chunk-data-bare-lf", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked",
                                   body=b"5\r\nhello\n0\r\n\r\n"), 400,
         "chunk data ended by a bare LF", body_error=True),
    Case("chunk-overrun", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked",
                              body=b"3\r\nhello\r\n0\r\n\r\n"), 400,
         "more data than the chunk size: no CRLF after it", body_error=True),
    Case("chunk-ext-nul", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked",
                              body=b"5;a\x00b\r\nhello\r\n0\r\n\r\n"), 400,
         "NUL in a chunk extension", body_error=True),
    Case("chunk-ext-bare-lf", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked",
                                  body=b"5;a=b\nhello\r\n0\r\n\r\n"), 400,
         "a chunk extension ended by a bare LF", body_error=True),
    # (A huge chunk extension is not refused: extensions are dropped when the body is
    # re-chunked, so the backend never sees one; llhttp bounds nothing else there.)
    # -- line endings -------------------------------------------------------------------
    Case("bare-lf-everywhere", b"GET / HTTP/1.1\nHost: test.local\n\n", 400,
         "bare LF line endings"),
    Case("bare-lf-request-line", b"GET / HTTP/1.1\nHost: test.local\r\n\r\n", 400,
         "the request line ended by a bare LF"),
    Case("bare-lf-end-of-head", b"GET / HTTP/1.1\r\nHost: test.local\r\n\n", 400,
         "the head ended by a bare LF"),
    Case("bare-cr-line-end", b"GET / HTTP/1.1\rHost: test.local\r\n\r\n", 400,
         "a line ended by a bare CR"),
    Case("bare-cr-in-value", msg("GET / HTTP/1.1", H, "X-A: a\rb"), 400,
         "a bare CR inside a value"),
    # -- control bytes ------------------------------------------------------------------
    Case("nul-in-value", msg("GET / HTTP/1.1", H, "X-A: a\x00b"), 400, "NUL in a value"),
    Case("ctl-in-value", msg("GET / HTTP/1.1", H, "X-A: a\x01b"), 400, "SOH in a value"),
    Case("del-in-value", msg("GET / HTTP/1.1", H, "X-A: a\x7fb"), 400, "DEL in a value"),
    Case("ctl-in-name", msg("GET / HTTP/1.1", H, "X\x01A: 1"), 400, "a control byte in a name"),
    Case("nul-in-target", msg("GET /a\x00b HTTP/1.1", H), 400, "NUL in the target"),
    Case("del-in-target", msg("GET /a\x7fb HTTP/1.1", H), 400, "DEL in the target"),
    Case("tab-in-target", msg("GET /a\tb HTTP/1.1", H), 400, "a tab in the target"),
    Case("high-byte-in-target", msg("GET /caf\xe9 HTTP/1.1", H), 400,
         "a raw non-ASCII byte in the target (it must be percent-encoded)"),
    Case("nul-in-method", msg("GET\x00 / HTTP/1.1", H), 400, "NUL in the method"),
    # -- field syntax -------------------------------------------------------------------
    Case("space-before-colon", msg("GET / HTTP/1.1", H, "X-A : 1"), 400,
         "whitespace between a field name and its colon"),
    Case("obs-fold", msg("GET / HTTP/1.1", H, "X-A: a", " b"), 400,
         "obs-fold: a continuation line"),
    Case("obs-fold-first", msg("GET / HTTP/1.1", " X-A: a", H), 400,
         "whitespace before the first field line"),
    Case("no-colon", msg("GET / HTTP/1.1", H, "X-A"), 400, "a field line without a colon"),
    Case("empty-name", msg("GET / HTTP/1.1", H, ": value"), 400, "an empty field name"),
    Case("space-in-name", msg("GET / HTTP/1.1", H, "X A: 1"), 400, "a space inside a name"),
    # -- Host -----------------------------------------------------------------------------
    Case("host-missing", msg("GET / HTTP/1.1"), 400, "HTTP/1.1 without Host"),
    Case("host-twice", msg("GET / HTTP/1.1", H, "Host: evil.example"), 400,
         "two Hosts: routing and the backend may each use another"),
    Case("host-twice-case", msg("GET / HTTP/1.1", "host: test.local", "HOST: test.local"), 400,
         "two Hosts differing only in the case of the name"),
    Case("host-empty", msg("GET / HTTP/1.1", "Host:"), 400,
         "an empty Host: an http target always has an authority (RFC 9112 3.2)"),
    Case("host-space", msg("GET / HTTP/1.1", "Host: test local"), 400, "a space in the Host"),
    Case("host-userinfo", msg("GET / HTTP/1.1", "Host: user@test.local"), 400,
         "userinfo in the Host"),
    Case("host-bad-port", msg("GET / HTTP/1.1", "Host: test.local:80x"), 400,
         "a port that is not a number"),
    Case("host-slash", msg("GET / HTTP/1.1", "Host: test.local/x"), 400, "a path in the Host"),
    # -- method and request line ----------------------------------------------------------
    Case("method-space", msg("G ET / HTTP/1.1", H), 400, "a space in the method"),
    Case("method-lowercase", msg("get / HTTP/1.1", H), 400,
         "methods are case-sensitive: 'get' is not GET and is not known"),
    Case("method-separator", msg("GE(T / HTTP/1.1", H), 400, "a separator in the method"),
    Case("leading-space", msg(" GET / HTTP/1.1", H), 400,
         "whitespace before the request line"),
    Case("trailing-space", msg("GET / HTTP/1.1 ", H), 400, "a space after the version"),
    Case("tab-separator", msg("GET\t/\tHTTP/1.1", H), 400, "tabs between the request parts"),
    Case("http09", b"GET /\r\n\r\n", 400, "an HTTP/0.9 request line (no version)"),
    Case("version-lowercase", msg("GET / http/1.1", H), 400, "the version name is case-sensitive"),
    Case("version-junk", msg("GET / HTTP/1.1.1", H), 400, "a malformed version"),
    Case("version-short", msg("GET / HTTP/1", H), 400, "a version without minor number"),
    Case("version-1.2", msg("GET / HTTP/1.2", H), 400,
         "no HTTP/1.2 exists (the parser refuses the version)"),
    Case("version-2.0", msg("GET / HTTP/2.0", H), 505, "HTTP/2 is not spoken in text form"),
    # -- request target -------------------------------------------------------------------
    Case("target-no-slash", msg("GET index.html HTTP/1.1", H), 400,
         "neither origin-form nor absolute-form"),
    Case("target-asterisk-get", msg("GET * HTTP/1.1", H), 400,
         "asterisk-form is for OPTIONS only"),
    Case("target-fragment", msg("GET /a#b HTTP/1.1", H), 400, "a fragment is never sent"),
    Case("absolute-userinfo", msg("GET http://user@test.local/ HTTP/1.1", H), 400,
         "userinfo in an absolute-form target (RFC 9110 4.2.4)"),
    Case("absolute-empty-authority", msg("GET http:///x HTTP/1.1", H), 400,
         "absolute-form without a host"),
    Case("absolute-scheme", msg("GET ftp://test.local/ HTTP/1.1", H), 400,
         "a scheme a reverse proxy does not serve"),
    Case("absolute-one-slash", msg("GET http:/test.local/ HTTP/1.1", H), 400,
         "a malformed absolute URI"),
    # -- sizes ----------------------------------------------------------------------------
    Case("request-line-too-long", msg("GET /" + "a" * BIG + " HTTP/1.1", H), 431,
         "the request line over the head limit"),
    Case("header-line-too-long", msg("GET / HTTP/1.1", H, "X-Big: " + "a" * BIG), 431,
         "one field line over the head limit"),
    Case("head-too-large", msg("GET / HTTP/1.1", H,
                               *(f"X-{i}: " + "a" * 8000 for i in range(10))), 431,
         "a head of 80 KB in fields of 8 KB each"),
    Case("too-many-headers", msg("GET / HTTP/1.1", H,
                                 *(f"X-{i}: {i}" for i in range(MAX_HEADERS))), 431,
         f"{MAX_HEADERS + 1} fields: over the count limit"),
    Case("body-too-large", msg("POST / HTTP/1.1", H, f"Content-Length: {2 * LIMIT}",
                               body=b"x" * 2 * LIMIT), 413,
         "Content-Length above the service's max_body: refused before forwarding"),
    Case("body-huge-length", msg("POST / HTTP/1.1", H, "Content-Length: 1000000000000",
                                 body=b"x" * 100), 413, "a terabyte announced"),
    Case("body-too-large-chunked", msg("POST / HTTP/1.1", H, "Transfer-Encoding: chunked",
                                       body=b"400\r\n" + b"x" * 1024 + b"\r\n400\r\n"
                                       + b"x" * 1024 + b"\r\n0\r\n\r\n"), 413,
         "a chunked body growing past max_body", body_error=True),
    # -- a valid request, then a smuggled one on the same connection -----------------------
    Case("pipelined-cl-te", _first(msg("POST /smuggled HTTP/1.1", H, "Content-Length: 6",
                                       "Transfer-Encoding: chunked", body=b"0\r\n\r\nG")), 400,
         "the first request passes, the ambiguous second one does not", forwarded=("/first",)),
    Case("pipelined-bare-lf", msg("POST /first HTTP/1.1", H, "Content-Length: 5",
                                  body=b"hello") + b"GET /smuggled HTTP/1.1\nHost: x\n\n", 400,
         "after a complete body, a request with bare LFs", forwarded=("/first",)),
    Case("pipelined-two-hosts", _first(msg("GET /smuggled HTTP/1.1", H, "Host: evil.example")),
         400, "the second request has two Hosts", forwarded=("/first",)),
    Case("pipelined-te-cl", _first(msg("POST /smuggled HTTP/1.1", H, "Transfer-Encoding: chunked",
                                       "Content-Length: 4", body=b"5c\r\n")), 400,
         "the second request is TE.CL", forwarded=("/first",)),
]


def test_catalogue_is_large_and_unique():
    ids = [c.id for c in CATALOGUE]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(CATALOGUE) >= 40
    assert {c.status for c in CATALOGUE} == {400, 413, 431, 505}


# -- running a case ----------------------------------------------------------------------


@dataclass
class Outcome:
    statuses: list[int] = field(default_factory=list)
    closed: bool = False
    notes: list[str] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)

    def __str__(self) -> str:
        state = "closed" if self.closed else "left open"
        return f"statuses {self.statuses}, connection {state}; {'; '.join(self.notes)}"


async def converse(port: int, data: bytes, responses: int) -> Outcome:
    """Send `data`, read up to `responses` responses (1xx included), then wait for the close."""
    out = Outcome()
    client = await Client.open(port)
    try:
        try:
            await client.send(data)
        except ConnectionError as e:
            out.notes.append(f"sending failed: {e!r}")
        for _ in range(responses):
            try:
                resp = await asyncio.wait_for(client.response(interim=True), ANSWER)
            except TimeoutError:
                out.notes.append(f"no response within {ANSWER}s")
                break
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                out.closed = True
                out.notes.append(f"closed before a complete response: {e!r}")
                break
            except (ValueError, asyncio.LimitOverrunError) as e:
                out.notes.append(f"unreadable response: {e!r}")
                break
            out.statuses.append(resp.status)
            out.heads.append(resp.head)
        if not out.closed:
            try:
                rest = await client.at_eof(0.5)
                out.closed = True
                if rest:
                    out.notes.append(f"then {rest[:120]!r}")
            except TimeoutError:
                pass
    finally:
        client.close()
    return out


def limited_policy() -> dict[str, object]:
    if "max_body" not in Policy.__dataclass_fields__:
        pytest.fail("watchers.model.Policy has no `max_body` field (bytes, None = no limit): "
                    "add it so that a service can cap request bodies with 413")
    return {"max_body": LIMIT}


@contextlib.asynccontextmanager
async def proxied(limited: bool = False, **policy: object):
    """A RawBackend answering 200, and a static-port http service in front of it."""
    b = await RawBackend("b", ok()).start()
    port = free_port()
    if limited:
        policy.update(limited_policy())
    try:
        async with running(snapshot(service("web", [b], listen=port, **policy))):
            yield b, port
    finally:
        await b.stop()


def _describe(b: RawBackend) -> str:
    try:
        return repr(backend_messages(b))
    except Violation as e:
        return str(e)


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
async def test_rejected(case: Case):
    async with proxied(case.limited) as (b, port):
        out = await converse(port, case.raw, len(case.forwarded) + 1)
        # the proxy still serves, and the sentinel proves the backend had its chance to record
        sentinel = await asyncio.wait_for(fetch(port, "GET", SENTINEL), ANSWER)
        seen = _describe(b)
        expected = [200] * len(case.forwarded) + [case.status]
        report = f"[{case.id}] {case.why}: expected {expected} and a close; got {out}. " \
                 f"Backend: {seen}"
        assert out.statuses == expected, report
        assert out.closed, report
        assert sentinel.status == 200, report
        messages = backend_messages(b)  # raises on anything a strict parser refuses
        complete = [m.target.decode("latin-1") for m in messages if m.complete]
        assert complete == [*case.forwarded, SENTINEL], report
        cut = [m for m in messages if not m.complete]
        if case.body_error:
            assert all(m.target == b"/" for m in cut), report
        else:
            assert not cut, report


# -- accepted edge cases -----------------------------------------------------------------

Check = Callable[[list[Message], list[Request]], None]


@dataclass(frozen=True)
class Accepted:
    id: str
    raw: bytes
    why: str
    check: Check
    responses: int = 1
    limited: bool = False


def one(target: str) -> Callable[[list[Message]], Message]:
    def pick(messages: list[Message]) -> Message:
        got = [m for m in messages if m.complete]
        assert [m.target for m in got] == [target.encode()], f"backend got {messages!r}"
        return got[0]

    return pick


def _host_port(ms, _):
    m = one("/")(ms)
    assert m.all("host") == [b"test.local:8080"]


def _host_is(ms, host: bytes) -> None:
    assert one("/")(ms).all("host") == [host]


def _percent(ms, _):
    # unreserved escapes decoded, the others kept (hex upper-cased), the query untouched
    one("/a%20b/~%C3%A9?q=%41&x=~y")(ms)


def _chunk_ext(ms, reqs):
    m = one("/up")(ms)
    assert m.body == b"hello world"
    assert m.all("transfer-encoding") == [b"chunked"] and not m.all("content-length")


def _cl_zero(ms, _):
    m = one("/z")(ms)
    assert m.all("content-length") in ([b"0"], []) and m.body == b""
    assert not m.all("transfer-encoding")


def _tab_value(ms, _):
    assert one("/")(ms).all("x-a") == [b"a\tb"]


def _ows_length(ms, _):
    m = one("/p")(ms)
    assert m.all("content-length") == [b"5"] and m.body == b"hello"


def _te_normalised(ms, _):
    m = one("/c")(ms)
    assert m.all("transfer-encoding") == [b"chunked"] and m.body == b"hello"
    assert b"transfer-encoding: chunked\r\n" in m.head.lower()


def _http10(ms, _):
    m = one("/old")(ms)
    assert len(m.all("host")) == 1


def _absolute(ms, _):
    m = one("/p?q=1")(ms)
    assert m.all("host") == [b"test.local:8080"]


def _body_like_request(ms, reqs):
    m = one("/a")(ms)
    assert m.body == SMUGGLE
    assert [r.target for r in reqs] == ["/a"], "the body was read as a request"


def _chunked_then_get(ms, _):
    got = [(m.target, m.body) for m in ms if m.complete]
    assert got == [(b"/a", b""), (b"/b", b"")], f"backend got {ms!r}"


def _conn_names_cl(ms, reqs):
    m = one("/a")(ms)
    assert m.all("content-length") == [str(len(SMUGGLE)).encode()] and m.body == SMUGGLE
    assert [r.target for r in reqs] == ["/a"], "the body was read as a request"


def _conn_names_te(ms, reqs):
    m = one("/a")(ms)
    assert m.all("transfer-encoding") == [b"chunked"] and m.body == SMUGGLE
    assert [r.target for r in reqs] == ["/a"], "the body was read as a request"


def _conn_names_host(ms, _):
    assert one("/")(ms).all("host") == [b"test.local"]


def _many_headers(ms, _):
    assert len(one("/")(ms).all("x-9")) == 1


def _obs_text(ms, _):
    assert one("/")(ms).all("x-a") == [b"caf\xe9"]


def _at_limit(ms, _):
    assert one("/big")(ms).body == b"x" * LIMIT


def _options(ms, _):
    one("*")(ms)


def _mixed_case(ms, _):
    m = one("/p")(ms)
    assert m.all("content-length") == [b"5"] and m.body == b"hello"


def _get_chunked(ms, _):
    m = one("/g")(ms)
    assert m.body == b"abc" and m.all("transfer-encoding") == [b"chunked"]


SMUGGLE = b"GET /smuggled HTTP/1.1\r\nHost: test.local\r\n\r\n"

ACCEPTED: list[Accepted] = [
    Accepted("host-with-port", msg("GET / HTTP/1.1", "Host: test.local:8080"), "a port in Host",
             _host_port),
    Accepted("host-ipv6-literal", msg("GET / HTTP/1.1", "Host: [::1]:8080"),
             "an IP-literal Host", lambda ms, _: _host_is(ms, b"[::1]:8080")),
    Accepted("percent-encoding", msg("GET /a%20b/%7e%c3%a9?q=%41&x=~y HTTP/1.1", H),
             "a percent-encoded target forwarded normalised", _percent),
    Accepted("chunk-extensions", msg("POST /up HTTP/1.1", H, "Transfer-Encoding: chunked",
                                     body=b"5;name=value\r\nhello\r\n6;x\r\n world\r\n0\r\n\r\n"),
             "chunk extensions are valid and dropped when re-chunked", _chunk_ext),
    Accepted("content-length-zero", msg("POST /z HTTP/1.1", H, "Content-Length: 0"),
             "an empty body", _cl_zero),
    Accepted("tab-in-value", msg("GET / HTTP/1.1", H, "X-A: a\tb"), "HTAB inside a value",
             _tab_value),
    Accepted("ows-around-length", msg("POST /p HTTP/1.1", H, "Content-Length: \t5 \t",
                                      body=b"hello"), "OWS around a value is not part of it",
             _ows_length),
    Accepted("te-tab", msg("POST /c HTTP/1.1", H, "Transfer-Encoding:\tchunked",
                           body=b"5\r\nhello\r\n0\r\n\r\n"), "a tab is OWS", _te_normalised),
    Accepted("te-uppercase", msg("POST /c HTTP/1.1", H, "Transfer-Encoding: CHUNKED",
                                 body=b"5\r\nhello\r\n0\r\n\r\n"),
             "codings are case-insensitive; forwarded lowercase", _te_normalised),
    Accepted("http10-without-host", msg("GET /old HTTP/1.0", "Connection: keep-alive"),
             "Host is optional in 1.0",
             _http10),
    Accepted("leading-crlf", b"\r\n" + msg("GET / HTTP/1.1", H),
             "an empty line before the request line is ignored (RFC 9112 2.2)",
             lambda ms, _: one("/")(ms) and None),
    Accepted("absolute-form", msg("GET http://test.local:8080/p?q=1 HTTP/1.1", "Host: other"),
             "the authority of the target replaces Host", _absolute),
    Accepted("body-looks-like-request", msg("POST /a HTTP/1.1", H,
                                            f"Content-Length: {len(SMUGGLE)}", body=SMUGGLE),
             "a body is only a body", _body_like_request),
    Accepted("chunked-then-pipelined", msg("POST /a HTTP/1.1", H, "Transfer-Encoding: chunked",
                                           body=b"0\r\n\r\n") + msg("GET /b HTTP/1.1", H),
             "a request after the last chunk is the next request", _chunked_then_get,
             responses=2),
    Accepted("connection-names-content-length",
             msg("POST /a HTTP/1.1", H, "Connection: Content-Length",
                 f"Content-Length: {len(SMUGGLE)}", body=SMUGGLE),
             "hop-by-hop abuse must not strip the framing", _conn_names_cl),
    Accepted("connection-names-transfer-encoding",
             msg("POST /a HTTP/1.1", H, "Connection: Transfer-Encoding",
                 "Transfer-Encoding: chunked",
                 body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLE), SMUGGLE)),
             "hop-by-hop abuse must not strip the framing", _conn_names_te),
    Accepted("connection-names-host", msg("GET / HTTP/1.1", H, "Connection: Host"),
             "hop-by-hop abuse must not strip the Host", _conn_names_host),
    Accepted("max-headers", msg("GET / HTTP/1.1", H,
                                *(f"X-{i}: {i}" for i in range(MAX_HEADERS - 1))),
             f"exactly {MAX_HEADERS} fields", _many_headers),
    Accepted("obs-text-value", msg("GET / HTTP/1.1", H, "X-A: caf\xe9"),
             "obs-text (bytes >= 0x80) is allowed in values", _obs_text),
    Accepted("body-at-limit", msg("POST /big HTTP/1.1", H, f"Content-Length: {LIMIT}",
                                  body=b"x" * LIMIT), "exactly max_body", _at_limit,
             limited=True),
    Accepted("options-asterisk", msg("OPTIONS * HTTP/1.1", H), "asterisk-form with OPTIONS",
             _options),
    Accepted("mixed-case-names", msg("POST /p HTTP/1.1", "hOsT: test.local",
                                     "cOnTeNt-LeNgTh: 5", body=b"hello"),
             "field names are case-insensitive", _mixed_case),
    Accepted("get-with-chunked-body", msg("GET /g HTTP/1.1", H, "Transfer-Encoding: chunked",
                                          body=b"3\r\nabc\r\n0\r\n\r\n"),
             "a GET may carry a body", _get_chunked),
]


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
async def test_accepted(case: Accepted):
    async with proxied(case.limited) as (b, port):
        out = await converse(port, case.raw + msg("GET /__last__ HTTP/1.1", H,
                                                  "Connection: close"), case.responses + 1)
        report = f"[{case.id}] {case.why}: got {out}. Backend: {_describe(b)}"
        assert out.statuses == [200] * (case.responses + 1), report
        messages = [m for m in backend_messages(b) if m.target != b"/__last__"]
        try:
            case.check(messages, [r for r in b.requests if r.target != "/__last__"])
        except AssertionError as e:
            raise AssertionError(f"{report}\n{e}") from None


# -- fuzzing the request parser path -----------------------------------------------------

SEEDS = [
    msg("GET / HTTP/1.1", H),
    msg("POST /p HTTP/1.1", H, "Content-Length: 5", body=b"hello"),
    msg("POST /c HTTP/1.1", H, "Transfer-Encoding: chunked",
        body=b"5;e=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"),
    msg("GET http://test.local/abs?q=1 HTTP/1.1", "Host: x", "Connection: keep-alive"),
    msg("GET /old HTTP/1.0", "Connection: keep-alive"),
    msg("GET /a HTTP/1.1", H) + msg("GET /b HTTP/1.1", H),
    msg("POST / HTTP/1.1", H, "Content-Length: 6", "Transfer-Encoding: chunked",
        body=b"0\r\n\r\nG"),
    msg("OPTIONS * HTTP/1.1", H, "Expect: 100-continue", "Content-Length: 0"),
    msg("GET /ws HTTP/1.1", H, "Connection: upgrade", "Upgrade: websocket"),
]
TOKENS = [
    b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b";", b",", b"\x00", b"\x0b", b"\x7f", b"\xff",
    b"0", b"5", b"f", b"-", b"+", b"0x", b"\r\n\r\n", b"\r\n ",
    b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n", b"Content-Length: 0\r\n",
    b"Host: a\r\n", b"Connection: close\r\n", b"Connection: content-length\r\n",
    b"Expect: 100-continue\r\n", b"0\r\n\r\n", b"GET / HTTP/1.1\r\n", b" HTTP/1.0",
]


# mutation kinds, repeated to weight them: structural edits keep most requests near-valid
OPS = ["token"] * 4 + ["delete"] * 2 + ["dup-line"] * 2 + ["byte", "random", "truncate"]


@st.composite
def payloads(draw) -> bytes:
    """Mutations of valid requests (up to three edits, possibly none), or now and then random
    bytes; sometimes followed by another valid request on the same connection."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(min_size=1, max_size=200))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(OPS))
        i = draw(st.integers(0, len(data)))
        if op == "token":
            data[i:i] = draw(st.sampled_from(TOKENS))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 12))]
        elif op == "dup-line":
            lines = bytes(data).split(b"\r\n")
            k = draw(st.integers(0, len(lines) - 1))
            lines.insert(k, lines[k])
            data = bytearray(b"\r\n".join(lines))
        elif op == "byte" and i < len(data):
            data[i] = draw(st.sampled_from(b"\x00\t\n\r :;,\x7f\xff0aA-+\"/"))
        elif op == "random":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate" and i:
            del data[i:]
    if draw(st.booleans()):
        data += draw(st.sampled_from(SEEDS))
    return bytes(data) or b"\r\n"


async def _fuzz_one(payload: bytes, port: int, b: RawBackend, reported: set[int]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(payload)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            writer.write_eof()  # the proxy must finish with what it has

        async def until_eof() -> bytes:
            out = b""
            with contextlib.suppress(ConnectionError):
                while piece := await reader.read(65536):
                    out += piece
            return out

        try:
            answer = await asyncio.wait_for(until_eof(), 2.0)
        except TimeoutError:
            raise AssertionError(f"the proxy neither answered nor closed within 2s after "
                                 f"{payload!r}") from None
    finally:
        writer.close()
    assert not answer or answer.startswith(b"HTTP/1.1 "), f"garbage answer {answer[:200]!r}"
    assert b"HTTP/1.1 500 " not in answer, f"an internal error for {payload!r}: {answer!r}"
    alive = await asyncio.wait_for(fetch(port, "GET", "/__alive__"), 2.0)
    assert alive.status == 200, f"the proxy stopped serving after {payload!r}"
    try:
        # a bad connection is reported once: later examples (and shrinking) skip it
        backend_messages(b, reported)
    except Violation as e:
        raise AssertionError(f"after {payload!r}: {e}") from None


def test_fuzz_request_parser(caplog):
    """Hypothesis over raw bytes, through real sockets: the proxy answers or closes in time,
    keeps serving, logs no error, and forwards only what a strict parser accepts."""
    examples = int(os.environ.get("EDGELB_FUZZ_EXAMPLES", "300"))
    loop = uvloop.new_event_loop()
    b = RawBackend("b", ok())
    port = free_port()
    stack = contextlib.AsyncExitStack()
    reported: set[int] = set()
    caplog.set_level(logging.ERROR)

    async def setup() -> None:
        await b.start()
        stack.push_async_callback(b.stop)
        await stack.enter_async_context(running(snapshot(service(
            "web", [b], listen=port, header_timeout=1.0, idle_timeout=1.0,
            response_timeout=1.0))))

    @settings(max_examples=examples, deadline=timedelta(seconds=6), derandomize=True,
              database=None, suppress_health_check=[HealthCheck.too_slow,
                                                    HealthCheck.data_too_large])
    @given(payloads())
    def run(payload: bytes) -> None:
        loop.run_until_complete(_fuzz_one(payload, port, b, reported))

    try:
        loop.run_until_complete(setup())
        run()
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR
                  and r.name.split(".")[0] in ("edgelb", "asyncio")]
        assert not errors, "errors logged while fuzzing: " + "; ".join(
            r.getMessage() for r in errors[:5])
        reached = [m for m in backend_messages(b, reported) if m.target != b"/__alive__"]
        assert reached, "no fuzzed request ever reached the backend: the fuzz tests nothing"
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()
