"""PROXY protocol headers (versions 1 and 2) that tcp-mode connections may send to backends.

A backend behind edgelb sees edgelb's address, not the client's. With `proxy_protocol: 1|2` a
tcp service first writes one header on every backend connection naming the client's address
and port (source) and the address and port the client connected to (destination), as HAProxy's
`send-proxy`/`send-proxy-v2` do; the backend (nginx `listen ... proxy_protocol`, pgbouncer,
...) reads it before the relayed bytes.

Pure functions of the four values; `for_socket` reads them from an accepted socket. Both
addresses must be of one family: IPv4-mapped IPv6 addresses (a dual-stack listener's view of an
IPv4 client) are written as IPv4 when both ends are IPv4, and an IPv4 address beside an IPv6 one
is written mapped. Anything else (no address at hand) gives the "unknown" form, which tells the
backend to use the connection's own addresses.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

VERSIONS = (1, 2)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21  # version 2, command PROXY
_V2_TCP4 = 0x11  # AF_INET, STREAM
_V2_TCP6 = 0x21  # AF_INET6, STREAM
_V2_UNSPEC = 0x00  # AF_UNSPEC, UNSPEC
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V2_UNKNOWN = V2_SIGNATURE + bytes((_V2_PROXY, _V2_UNSPEC)) + b"\x00\x00"
# A health check speaks for no client: v2 has the LOCAL command for it (the receiver uses the
# connection's own addresses); v1 has only UNKNOWN, which means the same.
V2_LOCAL = V2_SIGNATURE + bytes((0x20, _V2_UNSPEC)) + b"\x00\x00"

_Ip = ipaddress.IPv4Address | ipaddress.IPv6Address


def _pair(src: str, dst: str) -> tuple[_Ip, _Ip]:
    """Both addresses in one family (ValueError when one is not an IP literal)."""
    a = ipaddress.ip_address(src.partition("%")[0])  # a zone index has no place in the header
    b = ipaddress.ip_address(dst.partition("%")[0])
    if a.version == 6 and a.ipv4_mapped is not None and (
            b.version == 4 or b.ipv4_mapped is not None):
        a = a.ipv4_mapped
    if b.version == 6 and b.ipv4_mapped is not None and a.version == 4:
        b = b.ipv4_mapped
    if a.version != b.version:  # one IPv4, one IPv6: write the IPv4 one mapped
        if a.version == 4:
            a = ipaddress.IPv6Address(f"::ffff:{a}")
        else:
            b = ipaddress.IPv6Address(f"::ffff:{b}")
    return a, b


def _check_ports(src_port: int, dst_port: int) -> None:
    for port in (src_port, dst_port):
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range 0-65535")


def v1(src: str, src_port: int, dst: str, dst_port: int) -> bytes:
    """The text header: `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`."""
    _check_ports(src_port, dst_port)
    a, b = _pair(src, dst)
    if a.version == 4:
        proto, src, dst = "TCP4", str(a), str(b)
    else:  # inet_ntop's form: compressed, with a mapped IPv4 address dotted
        proto = "TCP6"
        src = socket.inet_ntop(socket.AF_INET6, a.packed)
        dst = socket.inet_ntop(socket.AF_INET6, b.packed)
    return f"PROXY {proto} {src} {dst} {src_port} {dst_port}\r\n".encode()


def v2(src: str, src_port: int, dst: str, dst_port: int) -> bytes:
    """The binary header: signature, version/command, family/protocol, length, addresses."""
    _check_ports(src_port, dst_port)
    a, b = _pair(src, dst)
    family = _V2_TCP4 if a.version == 4 else _V2_TCP6
    body = a.packed + b.packed + struct.pack("!HH", src_port, dst_port)
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(body)) + body


def header(version: int, src: str, src_port: int, dst: str, dst_port: int) -> bytes:
    """The header of `version` (1 or 2); the unknown form when an address is not an IP."""
    if version not in VERSIONS:
        raise ValueError(f"PROXY protocol version {version}; expected 1 or 2")
    try:
        return (v1 if version == 1 else v2)(src, src_port, dst, dst_port)
    except ValueError:
        return unknown(version)


def local(version: int) -> bytes:
    """The header of a connection the proxy makes on its own behalf (a health check)."""
    return V1_UNKNOWN if version == 1 else V2_LOCAL


def unknown(version: int) -> bytes:
    """The header saying "no addresses": the backend keeps the connection's own."""
    return V1_UNKNOWN if version == 1 else V2_UNKNOWN


def for_socket(version: int, sock: socket.socket, source: tuple | None = None) -> bytes:
    """The header for a client connection accepted on `sock` (its peer is the source, its
    local address the destination); the unknown form if the socket cannot tell. `source`,
    when given, is the client named by a PROXY header the connection came with."""
    try:
        peer = source or sock.getpeername()
        local = sock.getsockname()
    except OSError:  # the client is already gone; the relay finds out on its own
        return unknown(version)
    if not (isinstance(peer, tuple) and isinstance(local, tuple)):
        return unknown(version)  # not an inet socket
    return header(version, peer[0], peer[1], local[0], local[1])


# -- the receiving side: a balancer in front of edgelb sends the header ----------------------
#
# `accept_proxy_protocol` on an entrypoint or a static port: the first bytes of a connection
# are a PROXY header naming the real client. `parse` is pure and incremental (call it again
# with more bytes); the listeners feed it from a protocol (create_server listeners) or from
# MSG_PEEK on a raw socket (`SocketHeader`), so the bytes after the header stay unread.

V1_MAX = 107  # the longest v1 line, CRLF included
V1_PREFIX = b"PROXY "
V2_MAX = 16 + 65535
HEADER_TIMEOUT = 10.0  # seconds a peer gets to send its header, unless header_timeout says less


class Header:
    """A parsed header: its length in bytes and the client it names (ip None: LOCAL or
    UNKNOWN, keep the connection's own address)."""

    __slots__ = ("ip", "length", "port")

    def __init__(self, length: int, ip: str | None = None, port: int = 0) -> None:
        self.length = length
        self.ip = ip
        self.port = port

    @property
    def peer(self) -> tuple[str, int] | None:
        """A socket-style peer address, or None to use the connection's own."""
        return (self.ip, self.port) if self.ip is not None else None

    def __repr__(self) -> str:
        return f"Header(length={self.length}, ip={self.ip!r}, port={self.port})"


Parsed = Header | str | None  # a header, why the bytes are not one, or None: need more


def parse(data: bytes | bytearray | memoryview) -> Parsed:
    """The PROXY header (v1 or v2, auto-detected) at the start of `data`: a `Header`, None
    when more bytes are needed, or a string saying why `data` does not start with one.
    Never raises."""
    data = bytes(data[:V2_MAX])
    if data[:12] == V2_SIGNATURE[:len(data[:12])] and data[:1] == b"\r":
        return _parse_v2(data) if len(data) >= 16 else None
    if data[:6] == V1_PREFIX[:len(data[:6])]:
        return _parse_v1(data) if len(data) >= 6 else None
    if not data:
        return None
    return "no PROXY protocol header (expected `PROXY ` or the v2 signature first)"


def screen(data: bytes | bytearray | memoryview) -> bool | None:
    """For a peer that must NOT send a header: True if `data` starts like one, False if it
    cannot be one, None while it might still become one (a prefix of a signature)."""
    head = bytes(data[:12])
    if not head:
        return None
    for sig in (V1_PREFIX, V2_SIGNATURE):
        n = min(len(head), len(sig))
        if head[:n] == sig[:n]:
            return True if n == len(sig) else None
    return False


def _parse_v1(data: bytes) -> Parsed:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            return f"v1 header longer than {V1_MAX} bytes"
        if b"\n" in data or b"\r" in data[:-1]:
            return "v1 header line does not end with CRLF"
        return None
    length = end + 2
    try:
        line = data[6:end].decode("ascii")
    except UnicodeDecodeError:
        return "v1 header is not ASCII"
    parts = line.split(" ")
    if parts[0] == "UNKNOWN":
        return Header(length)
    if len(parts) != 5 or parts[0] not in ("TCP4", "TCP6"):
        return "v1 header is not `PROXY TCP4|TCP6 src dst sport dport` nor `PROXY UNKNOWN`"
    family = socket.AF_INET if parts[0] == "TCP4" else socket.AF_INET6
    for ip in parts[1:3]:
        try:
            socket.inet_pton(family, ip)
        except (OSError, ValueError):
            return f"v1 header: {ip!r} is not an {parts[0][:3]}v{parts[0][3]} address"
    ports = []
    for p in parts[3:5]:
        if not (p.isascii() and p.isdigit() and len(p) <= 5 and int(p) <= 65535
                and (p == "0" or p[0] != "0")):
            return f"v1 header: {p!r} is not a port"
        ports.append(int(p))
    return Header(length, _plain_ip(parts[1]), ports[0])


def _parse_v2(data: bytes) -> Parsed:
    if data[:12] != V2_SIGNATURE:
        return "v2 header signature mismatch"
    ver_cmd, fam, size = struct.unpack_from("!BBH", data, 12)
    if ver_cmd >> 4 != 2:
        return f"v2 header: version {ver_cmd >> 4}, expected 2"
    cmd = ver_cmd & 0x0F
    if cmd > 1:
        return f"v2 header: unknown command {cmd}"
    length = 16 + size
    if len(data) < length:
        return None
    if cmd == 0:  # LOCAL: the balancer's own connection (a health check)
        return Header(length)
    family, transport = fam >> 4, fam & 0x0F
    if transport > 2 or family > 3:
        return f"v2 header: unknown family/protocol byte {fam:#04x}"
    if family == 1:
        if size < 12:
            return "v2 header: IPv4 addresses truncated"
        ip = socket.inet_ntop(socket.AF_INET, data[16:20])
        port = struct.unpack_from("!H", data, 24)[0]
    elif family == 2:
        if size < 36:
            return "v2 header: IPv6 addresses truncated"
        ip = _plain_ip(socket.inet_ntop(socket.AF_INET6, data[16:32]))
        port = struct.unpack_from("!H", data, 48)[0]
    else:  # UNSPEC or a Unix socket: no IP to use; TLVs and the rest are skipped
        return Header(length)
    return Header(length, ip, port)


def _plain_ip(ip: str) -> str:
    """A v4-mapped IPv6 address as IPv4 (how `sources` and X-Forwarded-For want it)."""
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


class AcceptPolicy:
    """`accept_proxy_protocol`: `trusted` None means every peer must send a header; otherwise
    peers in `trusted` (a `edgelb.net.acl.SourceFilter`) must, and the others must not."""

    __slots__ = ("cidrs", "trusted")

    def __init__(self, trusted: Any = None, cidrs: tuple[str, ...] = ()) -> None:
        self.trusted = trusted
        self.cidrs = cidrs

    def required(self, ip: str) -> bool:
        """True if the peer at `ip` must send a header, False if it must not."""
        return self.trusted is None or self.trusted.permits(ip)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AcceptPolicy) and (self.trusted is None) == (
            other.trusted is None) and self.cidrs == other.cidrs

    def __hash__(self) -> int:
        return hash((self.trusted is None, self.cidrs))

    def __repr__(self) -> str:
        return "AcceptPolicy(all)" if self.trusted is None else f"AcceptPolicy({self.cidrs})"


def parse_accept(value: Any, path: str) -> tuple[AcceptPolicy | None, list[str]]:
    """The config value: false/null (off), true (every peer), or a list of trusted CIDRs."""
    if value is None or value is False:
        return None, []
    if value is True:
        return AcceptPolicy(), []
    if not isinstance(value, list) or not value:
        return None, [f"{path}: expected true (every peer sends a PROXY header), false, or a "
                      f"non-empty list of the balancers' CIDRs like [10.0.0.0/8], got "
                      f"{type(value).__name__ if value != [] else 'an empty list'}"]
    from edgelb.net.acl import SourceFilter, parse_cidrs

    nets, errors = parse_cidrs(value, path)
    if errors:
        return None, errors
    return AcceptPolicy(SourceFilter(nets), tuple(str(n) for n in nets)), []


# -- reading a header from a raw non-blocking socket ------------------------------------------

_BUF = bytearray(V2_MAX)
_VIEW = memoryview(_BUF)


class SocketHeader:
    """Wait for and read a PROXY header from `sock` (required), or make sure its first bytes
    are not one (not required). MSG_PEEK finds the header's end, then exactly its bytes are
    received, so what follows stays in the socket for TLS or the relay. SO_RCVLOWAT keeps a
    trickled header from waking the loop until a new byte arrives.

    `done(result)` is called once: a `Header` (required and read), False (not required and
    the first bytes are no header; nothing consumed), or a string saying why to refuse
    ("closed" when the peer went away, "timeout")."""

    __slots__ = ("active", "done", "fd", "loop", "lowat", "required", "seen", "sock", "timer")

    def __init__(self, loop: Any, sock: socket.socket, required: bool, timeout: float | None,
                 done: Any) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.required = required
        self.done = done
        self.seen = 0
        self.lowat = False
        self.active = True
        self.timer = None if timeout is None else loop.call_later(timeout, self._finish,
                                                                   "timeout")
        loop.add_reader(self.fd, self._readable)
        self._readable()

    def cancel(self) -> None:
        """Stop waiting, without calling `done`."""
        if self.active:
            self.active = False
            if self.timer is not None:
                self.timer.cancel()
            self.loop.remove_reader(self.fd)

    def _finish(self, result: Any) -> None:
        if not self.active:
            return
        self.cancel()
        if self.lowat:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass
        self.done(result)

    def _readable(self) -> None:
        if not self.active:
            return
        try:
            n = self.sock.recv_into(_BUF, V2_MAX, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._finish("closed")
            return
        if n <= self.seen:  # readable with nothing new: the peer closed
            self._finish("closed")
            return
        self.seen = n
        if not self.required:
            found = screen(_VIEW[:n])
            if found is None:
                self._wait_for(n + 1)
            else:
                self._finish("header from an untrusted peer" if found else False)
            return
        result = parse(_VIEW[:n])
        if result is None:
            want = n + 1
            if n >= 16 and _BUF[:1] == b"\r":
                want = 16 + struct.unpack_from("!H", _BUF, 14)[0]
            self._wait_for(max(n + 1, min(want, 16384)))  # within any receive buffer
            return
        if isinstance(result, str):
            self._finish(result)
            return
        try:
            got = self.sock.recv_into(_BUF, result.length)
        except OSError:
            got = -1
        self._finish(result if got == result.length else "closed")

    def _wait_for(self, n: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self.lowat = True
        except OSError:
            pass
