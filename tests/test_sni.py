"""edgelb.net.sni: the server name of a ClientHello from the first bytes of a stream.

Real ClientHellos come from Python's ssl (OpenSSL) through a MemoryBIO; large ones (as big as
today's browsers send with post-quantum key shares) and ones split over several records are
made from them by re-framing the handshake message."""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelb.net import sni


def client_hello(server_name: str | None, *, tls13: bool = True) -> bytes:
    """The first flight of a real TLS client: one or more records holding its ClientHello."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def handshake_message(flight: bytes) -> bytes:
    """The handshake bytes of a flight of handshake records (headers removed)."""
    out, pos = b"", 0
    while pos < len(flight):
        assert flight[pos] == 0x16
        (length,) = struct.unpack_from(">H", flight, pos + 3)
        out += flight[pos + 5:pos + 5 + length]
        pos += 5 + length
    return out


def records(message: bytes, sizes: list[int] | None = None) -> bytes:
    """`message` framed as handshake records of the given fragment sizes (the rest in one)."""
    out, pos = b"", 0
    for size in [*(sizes or []), len(message)]:
        if pos >= len(message):
            break
        chunk = message[pos:pos + size]
        out += b"\x16\x03\x01" + struct.pack(">H", len(chunk)) + chunk
        pos += len(chunk)
    return out


def padded(message: bytes, extra: int) -> bytes:
    """A ClientHello message with a padding extension (type 21) of `extra` bytes appended."""
    body = message[4:]
    pos = 2 + 32
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos:pos + 2], "big")
    pos += 1 + body[pos]
    ext_len = int.from_bytes(body[pos:pos + 2], "big")
    exts = body[pos + 2:pos + 2 + ext_len] + struct.pack(">HH", 21, extra) + bytes(extra)
    body = body[:pos] + struct.pack(">H", len(exts)) + exts
    return b"\x01" + len(body).to_bytes(3, "big") + body


@pytest.mark.parametrize("tls13", [True, False])
def test_a_real_client_hello_gives_its_server_name_lowercased(tls13: bool) -> None:
    flight = client_hello("Shop.Example.COM", tls13=tls13)
    assert sni.parse(flight) == "shop.example.com"
    assert sni.parse(bytearray(flight)) == "shop.example.com"
    assert sni.parse(memoryview(flight)) == "shop.example.com"
    assert sni.parse(flight + b"more bytes after the hello") == "shop.example.com"


def test_a_client_hello_without_server_name_gives_none() -> None:
    assert sni.parse(client_hello(None)) is None


def test_a_trailing_dot_is_dropped() -> None:
    message = handshake_message(client_hello("a.example.com"))
    # same length, so the framing stays valid: "a.example.com" -> "example.com." is shorter;
    # swap in a name of the same length that ends with a dot
    swapped = message.replace(b"a.example.com", b"aexample.com.")
    assert sni.parse(records(swapped)) == "aexample.com"


def test_every_prefix_asks_for_more_and_never_past_the_end() -> None:
    flight = client_hello("split.example.com")
    for k in range(len(flight)):
        need = sni.parse(flight[:k])
        assert isinstance(need, int) and k < need <= len(flight), k
    assert sni.parse(flight) == "split.example.com"


def test_a_large_hello_like_a_post_quantum_browser_one() -> None:
    message = padded(handshake_message(client_hello("big.example.com")), 1400)
    flight = records(message)
    assert 1800 < len(flight) < 2100
    assert sni.parse(flight) == "big.example.com"
    for k in range(len(flight)):
        need = sni.parse(flight[:k])
        assert isinstance(need, int) and k < need <= len(flight)


@pytest.mark.parametrize("sizes", [[1], [3], [4], [100], [1, 1, 1, 1, 1], [40, 60, 500],
                                   [1000, 1000]])
def test_a_hello_split_over_several_records(sizes: list[int]) -> None:
    message = padded(handshake_message(client_hello("multi.example.com")), 1400)
    flight = records(message, sizes)
    assert flight.count(b"\x16\x03\x01") >= len(sizes)
    assert sni.parse(flight) == "multi.example.com"
    for k in range(len(flight)):
        need = sni.parse(flight[:k])
        assert isinstance(need, int) and k < need <= len(flight), (sizes, k)


def test_a_hello_beyond_the_cap_counts_as_no_server_name() -> None:
    message = padded(handshake_message(client_hello("huge.example.com")), 16 * 1024)
    flight = records(message, [8000, 8000])  # records of at most 2^14 bytes
    assert len(flight) > sni.MAX_HELLO
    assert sni.parse(flight) is None
    for k in (0, 5, 100, 8005, 8010):  # never asks for more than the cap
        result = sni.parse(flight[:k])
        assert result is None or (isinstance(result, int) and k < result <= sni.MAX_HELLO)
    # a hello announced bigger than the cap is given up on as soon as its header is read
    assert sni.parse(flight[:9]) is None


@pytest.mark.parametrize("data", [
    b"G", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"\x80\x2e\x01\x03\x01",  # SSLv2 hello
    b"\x16\x02\x00\x00\x10", b"\x16\x03\x01\x00\x00",  # wrong major version; empty record
    b"\x16\x03\x01\x40\x01",  # a record longer than 2^14
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello, not a ClientHello
    b"\x16\x03\x01\x00\x10\x02",  # known to be a ServerHello before the record is whole
    b"\x16\x03\x01\x00\x02\x01\x00\x17\x03\x03\x00\x01x",  # application data mid-hello
    b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03",  # a hello too short for its random
])
def test_not_tls_or_malformed(data: bytes) -> None:
    assert sni.parse(data) == sni.NOT_TLS


def test_malformed_extensions_are_not_tls() -> None:
    message = bytearray(handshake_message(client_hello("x.example.com")))
    name_at = message.find(b"x.example.com")
    # the server_name entry claims more bytes than its list holds
    message[name_at - 2:name_at] = b"\xff\xff"
    assert sni.parse(records(bytes(message))) == sni.NOT_TLS


def test_a_non_ascii_name_counts_as_no_server_name() -> None:
    message = handshake_message(client_hello("x.example.com")).replace(b"x.ex", b"\xc3\xa9ex")
    assert sni.parse(records(message)) is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise_and_stay_bounded(data: bytes) -> None:
    result = sni.parse(data)
    assert result is None or isinstance(result, str) or result == sni.NOT_TLS or (
        isinstance(result, int) and len(data) < result <= sni.MAX_HELLO)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=600), st.integers(0, 0xFFFF), st.integers(1, 4))
def test_arbitrary_bytes_behind_a_handshake_header_never_raise(body: bytes, length: int,
                                                               kind: int) -> None:
    data = b"\x16\x03\x01" + struct.pack(">H", length) + bytes([kind]) + body
    result = sni.parse(data)
    assert result is None or isinstance(result, str) or result == sni.NOT_TLS or (
        isinstance(result, int) and len(data) < result <= sni.MAX_HELLO)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_real_hellos_mutated_never_raise(data: st.DataObject) -> None:
    flight = bytearray(client_hello("m.example.com"))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(flight) - 1))
        flight[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(flight)))
    result = sni.parse(bytes(flight[:cut]))
    assert result is None or isinstance(result, str) or result == sni.NOT_TLS or (
        isinstance(result, int) and cut < result <= sni.MAX_HELLO)


def test_a_deep_wildcard_covers_several_labels_and_the_longest_suffix_wins() -> None:
    table = sni.SniTable({}, {".example.org": "one"},
                         {".example.com": "gw", ".b.example.com": "b"})
    assert table.lookup("a.example.com") == "gw"
    assert table.lookup("x.y.example.com") == "gw"
    assert table.lookup("x.y.b.example.com") == "b"
    assert table.lookup("example.com") is None
    assert table.lookup("a.example.org") == "one"
    assert table.lookup("x.a.example.org") is None
    assert sni.SniTable({}, {}, {".example.com": "gw"})
