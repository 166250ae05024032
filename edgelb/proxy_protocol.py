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


def for_socket(version: int, sock: socket.socket) -> bytes:
    """The header for a client connection accepted on `sock` (its peer is the source, its
    local address the destination); the unknown form if the socket cannot tell."""
    try:
        peer = sock.getpeername()
        local = sock.getsockname()
    except OSError:  # the client is already gone; the relay finds out on its own
        return unknown(version)
    if not (isinstance(peer, tuple) and isinstance(local, tuple)):
        return unknown(version)  # not an inet socket
    return header(version, peer[0], peer[1], local[0], local[1])
