"""Rewrite a backend's response head for the client without a Python call per header.

The response parser (httptools) validates the message and frames the body; this module works on
the raw head bytes: one lower-casing, one regex scan for the few fields a proxy must act on,
and slices. The header lines that pass keep their bytes exactly.
"""

from __future__ import annotations

import re

from edgelb.http.headers import CONNECTION_OPTIONS

_SPECIAL = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|te|transfer-encoding|upgrade|trailer"
    rb"|content-length|proxy-authenticate)[ \t]*:"
)


_Split = tuple[bytes, bytes, bool, bool, bool]
# the same, plus the whole head as sent to an HTTP/1.1 keep-alive client when no framing
# header has to be added (Content-Length responses, bodiless ones)
_Rewrite = tuple[bytes, bytes, bool, bool, bool, bytes]

# Under load a backend sends the same head over and over (same Date within a second, same
# length for the same resource): remember the last few results. Bounded; cleared when full.
_CACHE_SIZE = 512
_cache: dict[bytes, _Rewrite] = {}


VIA = b"via: 1.1 edgelb\r\n"  # RFC 9110 7.6.3: a proxy adds itself to what it forwards
STICKY_COOKIE = b"edgelb_server"  # names the backend a sticky client is pinned to


def sticky_line(sticky_id: bytes, name: bytes = STICKY_COOKIE) -> bytes:
    """The Set-Cookie line that pins a sticky client to the backend `sticky_id` (cookie
    `name`: the policy's sticky_cookie)."""
    return b"set-cookie: %s=%s; Path=/; HttpOnly; SameSite=Lax\r\n" % (name, sticky_id)


def rewrite_response_head(raw: bytes, keep_trailer: bool, keep_upgrade: bool) -> _Rewrite:
    """split_response_head with our Via line added, plus the plain head for an HTTP/1.1
    keep-alive client."""
    status, headers, chunked, has_cl, close = split_response_head(raw, keep_trailer, keep_upgrade)
    headers += VIA
    return status, headers, chunked, has_cl, close, b"HTTP/1.1 " + status + headers + b"\r\n"


def rewrite_response_head_cached(raw: bytes) -> _Rewrite:
    """rewrite_response_head(raw, False, False), memoized for repeated identical heads."""
    hit = _cache.get(raw)
    if hit is not None:
        return hit
    result = rewrite_response_head(raw, False, False)
    if len(_cache) >= _CACHE_SIZE:
        _cache.clear()
    _cache[raw] = result
    return result


# Heads that httptools has already accepted, for the fast path of the upstream protocol: a
# Content-Length response (status 200-499, not 204/304) whose head and whole body arrive in
# one read is relayed without feeding the parser. raw head (as the key of _cache) ->
# (the head for an HTTP/1.1 keep-alive client, body length, the backend asked to close, status).
_CL_VALUE = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*([0-9]{1,15})[ \t]*(?=\r\n)")
fast_heads: dict[bytes, tuple[bytes, int, bool, int]] = {}


def remember_fast(raw: bytes, status: int, rewrite: _Rewrite) -> None:
    """Record `raw` (a head httptools has just accepted, as rewritten by `rewrite`) for the
    fast path when its framing is a plain Content-Length."""
    if status < 200 or status >= 500 or status == 204 or status == 304:
        return
    _, _, chunked, has_cl, close, plain = rewrite
    if chunked or not has_cl:
        return
    values = _CL_VALUE.findall(raw.lower())
    if len(values) != 1:
        return
    if len(fast_heads) >= _CACHE_SIZE:
        fast_heads.clear()
    fast_heads[raw] = (plain, int(values[0]), close, status)


def split_response_head(
    raw: bytes, keep_trailer: bool, keep_upgrade: bool
) -> _Split:
    """Take `raw` = status line and header lines, each ending in CRLF, without the blank line.

    Returns (status, headers, chunked, has_content_length, close): `status` is the status
    line after the version (b"200 OK\\r\\n"); `headers` the lines to forward, hop-by-hop ones
    and those named in Connection removed; `close` when the backend asked to close.
    """
    lower = raw.lower()
    first = lower.find(b"\r\n")
    status = raw[9 : first + 2]
    found = _SPECIAL.findall(lower, first)
    # Fast paths for what most backends send: nothing to act on but Content-Length, and at
    # most one `Connection: keep-alive` or `Connection: close` line.
    if not found:
        return status, raw[first + 2 :], False, False, False
    has_cl = b"content-length" in found
    others = len(found) - found.count(b"content-length")
    if others == 0:
        return status, raw[first + 2 :], False, True, False
    if others == 1 and b"connection" in found:
        pos = lower.find(b"\r\nconnection:", first)
        if pos >= 0:
            end = lower.find(b"\r\n", pos + 13)
            value = lower[pos + 13 : end].strip()
            if value == b"keep-alive" or value == b"close":
                headers = raw[first + 2 : pos + 2] + raw[end + 2 :]
                return status, headers, False, has_cl, value == b"close"
    return _general(raw, lower, first, status, keep_trailer, keep_upgrade)


def _general(
    raw: bytes, lower: bytes, first: int, status: bytes, keep_trailer: bool, keep_upgrade: bool
) -> tuple[bytes, bytes, bool, bool, bool]:
    chunked = has_cl = close = False
    cuts: list[tuple[int, int]] | None = None
    named: set[bytes] | None = None
    for m in _SPECIAL.finditer(lower, first):
        name = m.group(1)
        if name == b"content-length":
            has_cl = True
            continue
        if (keep_upgrade and name == b"upgrade") or (keep_trailer and name == b"trailer"):
            continue
        end = lower.find(b"\r\n", m.end())
        if name == b"transfer-encoding":
            chunked = lower[m.end() : end].rstrip().endswith(b"chunked")
        elif name == b"connection":
            for token in lower[m.end() : end].split(b","):
                token = token.strip()
                if token == b"close":
                    close = True
                elif token and token not in CONNECTION_OPTIONS:
                    if named is None:
                        named = set()
                    named.add(token)
        if cuts is None:
            cuts = []
        cuts.append((m.start() + 2, end + 2))
    if named:
        cuts = cuts or []
        for token in named:
            pattern = re.compile(rb"\r\n" + re.escape(token) + rb"[ \t]*:")
            for m in pattern.finditer(lower, first):
                cuts.append((m.start() + 2, lower.find(b"\r\n", m.end()) + 2))
    if not cuts:
        return status, raw[first + 2 :], chunked, has_cl, close
    cuts.sort()
    pieces = []
    pos = first + 2
    for start, end in cuts:
        if start > pos:
            pieces.append(raw[pos:start])
        pos = max(pos, end)
    pieces.append(raw[pos:])
    return status, b"".join(pieces), chunked, has_cl, close
