"""The server name of a TLS ClientHello, read from the first bytes of a connection.

`parse(data)` looks at the bytes peeked from a new connection so far (nothing is consumed, so
the TLS layer or the backend later reads the same bytes) and answers one of:

- an int > len(data): more bytes are needed, this many in total from the start of the stream
  (the end of the record being read; the caller waits for them, e.g. with SO_RCVLOWAT);
- `NOT_TLS` (-1): the stream does not start with a TLS handshake record carrying a ClientHello,
  or the ClientHello is malformed;
- a str: the ClientHello's server_name (host_name), lowercased, without a trailing dot;
- None: a well-formed ClientHello without a usable server name, or one that does not fit in
  `MAX_HELLO` bytes of records (treated as "no SNI", so the connection is TLS-terminated).

A ClientHello may be split over several handshake records (RFC 8446 5.1); the records are
walked in place and only joined when there is more than one. Nothing here raises on arbitrary
input, and the answer never asks for more than `MAX_HELLO` bytes.
"""

from __future__ import annotations

NOT_TLS = -1
MAX_HELLO = 16 * 1024  # bytes of records, headers included, that a ClientHello may take
MAX_RECORD = 1 << 14  # TLSPlaintext.length limit (RFC 8446 5.1)

_HANDSHAKE = 0x16  # ContentType handshake
_CLIENT_HELLO = 1  # HandshakeType client_hello
_SERVER_NAME = 0  # ExtensionType server_name
_HOST_NAME = 0  # NameType host_name
_RECORD_HEADER = 5


def parse(data: bytes | bytearray | memoryview) -> int | str | None:
    """See the module docstring: need-more (int), NOT_TLS, the server name, or None."""
    n = len(data)
    if n == 0:
        return _RECORD_HEADER
    if data[0] != _HANDSHAKE:
        return NOT_TLS
    pos = 0
    got = 0  # handshake bytes in complete records so far
    total = -1  # length of the ClientHello message, header included, once known
    first = -1  # (start, end) of the fragments, when there are several
    frags: list[tuple[int, int]] | None = None
    while True:
        if pos + _RECORD_HEADER > n:
            need = pos + _RECORD_HEADER
            return need if need <= MAX_HELLO else None
        if data[pos] != _HANDSHAKE or data[pos + 1] != 3:
            return NOT_TLS  # another record type, or not TLS 1.x, in the middle of a hello
        length = data[pos + 3] << 8 | data[pos + 4]
        if length == 0 or length > MAX_RECORD:
            return NOT_TLS
        start = pos + _RECORD_HEADER
        end = start + length
        if end > MAX_HELLO:
            return None
        if end > n:
            if got == 0 and n > start:
                # the first record's handshake header is (partly) here: decide early
                if data[start] != _CLIENT_HELLO:
                    return NOT_TLS
                if n - start >= 4:
                    announced = data[start + 1] << 16 | data[start + 2] << 8 | data[start + 3]
                    if start + 4 + announced > MAX_HELLO:
                        return None
            return end
        if first < 0:
            first = start
        else:
            if frags is None:
                frags = [(first, pos)]
            frags.append((start, end))
        got += length
        if total < 0 and got >= 4:
            head = _head(data, first, frags)
            if head[0] != _CLIENT_HELLO:
                return NOT_TLS
            total = 4 + (head[1] << 16 | head[2] << 8 | head[3])
        if total >= 0 and got >= total:
            break
        if total >= 0 and end + _RECORD_HEADER + (total - got) > MAX_HELLO:
            return None  # the rest cannot fit, however it is split
        pos = end
    if frags is None:
        return _server_name(data, first + 4, first + total)
    joined = b"".join(bytes(data[s:e]) for s, e in frags)
    return _server_name(joined, 4, total)


def _head(data: bytes | bytearray | memoryview, first: int,
          frags: list[tuple[int, int]] | None) -> bytes:
    """The first 4 handshake bytes (they may straddle records)."""
    if frags is None:
        return bytes(data[first:first + 4])
    return b"".join(bytes(data[s:e]) for s, e in frags)[:4]


def _server_name(b: bytes | bytearray | memoryview, pos: int, end: int) -> int | str | None:
    """Walk a ClientHello body b[pos:end] to its server_name extension."""
    pos += 2 + 32  # legacy_version, random
    if pos + 1 > end:
        return NOT_TLS
    pos += 1 + b[pos]  # legacy_session_id
    if pos + 2 > end:
        return NOT_TLS
    pos += 2 + (b[pos] << 8 | b[pos + 1])  # cipher_suites
    if pos + 1 > end:
        return NOT_TLS
    pos += 1 + b[pos]  # legacy_compression_methods
    if pos > end:
        return NOT_TLS
    if pos == end:
        return None  # no extensions at all (TLS 1.2 allows it)
    if pos + 2 > end:
        return NOT_TLS
    ext_end = pos + 2 + (b[pos] << 8 | b[pos + 1])
    if ext_end > end:
        return NOT_TLS
    pos += 2
    while pos + 4 <= ext_end:
        kind = b[pos] << 8 | b[pos + 1]
        length = b[pos + 2] << 8 | b[pos + 3]
        pos += 4
        if pos + length > ext_end:
            return NOT_TLS
        if kind == _SERVER_NAME:
            return _host_name(b, pos, pos + length)
        pos += length
    return None if pos == ext_end else NOT_TLS


def _host_name(b: bytes | bytearray | memoryview, pos: int, end: int) -> int | str | None:
    """The first host_name of a ServerNameList b[pos:end]."""
    if pos + 2 > end:
        return NOT_TLS
    list_end = pos + 2 + (b[pos] << 8 | b[pos + 1])
    if list_end > end:
        return NOT_TLS
    pos += 2
    while pos + 3 <= list_end:
        kind = b[pos]
        length = b[pos + 1] << 8 | b[pos + 2]
        pos += 3
        if pos + length > list_end:
            return NOT_TLS
        if kind == _HOST_NAME:
            try:
                name = bytes(b[pos:pos + length]).decode("ascii")
            except UnicodeDecodeError:
                return None
            name = name.lower().rstrip(".")
            return name or None
        pos += length
    return None


class SniTable:
    """Which server names a TLS entrypoint passes through, and to which service.

    `exact` maps a name to a service name, or to "" for a name that an https route claims
    exactly (terminated here, so an exact https host beats a passthrough wildcard);
    `wildcard` maps ".example.com" (from `*.example.com`, one label) to a service name.
    Immutable once built: the runtime makes a new one on every change.
    """

    __slots__ = ("deep", "exact", "wildcard")

    def __init__(self, exact: dict[str, str] | None = None,
                 wildcard: dict[str, str] | None = None,
                 deep: dict[str, str] | None = None) -> None:
        """`deep`: ".example.com" (from a Gateway API `*.example.com`) covering one or more
        labels; a longer suffix wins."""
        self.exact = exact or {}
        self.wildcard = wildcard or {}
        self.deep = deep or {}

    def __bool__(self) -> bool:
        """True when some name is passed through (an empty table means: terminate all)."""
        return any(self.exact.values()) or bool(self.wildcard) or bool(self.deep)

    def lookup(self, name: str | None) -> str | None:
        """The passthrough service for a server name; None: terminate TLS here."""
        if not name:
            return None
        service = self.exact.get(name)
        if service is not None:
            return service or None
        dot = name.find(".")
        if dot <= 0:
            return None
        found = self.wildcard.get(name[dot:])
        while found is None and self.deep and dot > 0:
            found = self.deep.get(name[dot:])
            dot = name.find(".", dot + 1)
        return found

    def summary(self) -> dict[str, str]:
        """host pattern -> service, for the admin status (passthrough names only)."""
        out = {name: svc for name, svc in self.exact.items() if svc}
        out.update({"*" + suffix: svc for suffix, svc in self.wildcard.items()})
        out.update({"*" + suffix + " (any depth)": svc for suffix, svc in self.deep.items()})
        return dict(sorted(out.items()))
