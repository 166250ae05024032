"""split_response_head: hop-by-hop removal and framing facts from raw response heads."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgelb.http.response_head import split_response_head

HOP = ["Connection", "Keep-Alive", "Proxy-Connection", "TE", "Transfer-Encoding", "Upgrade"]
END_TO_END = ["Server", "Date", "Content-Type", "X-Content-Length", "ETag", "Set-Cookie", "X-Te"]


def head(fields: list[tuple[str, str]], status: bytes = b"HTTP/1.1 200 OK\r\n") -> bytes:
    return status + b"".join(f"{n}: {v}\r\n".encode() for n, v in fields)


def test_nginx_keep_alive_head_loses_only_its_connection_line():
    raw = head([("Server", "nginx"), ("Content-Length", "6"), ("Connection", "keep-alive")])
    status, headers, chunked, has_cl, close = split_response_head(raw, False, False)
    assert status == b"200 OK\r\n"
    assert headers == b"Server: nginx\r\nContent-Length: 6\r\n"
    assert (chunked, has_cl, close) == (False, True, False)


def test_connection_close_is_reported():
    raw = head([("Connection", "close"), ("A", "b")])
    expected = (b"200 OK\r\n", b"A: b\r\n", False, False, True)
    assert split_response_head(raw, False, False) == expected


def test_fields_named_in_connection_are_removed():
    raw = head([("Connection", "keep-alive, X-Foo"), ("X-Foo", "1"), ("X-Bar", "2")])
    _, headers, *_ = split_response_head(raw, False, False)
    assert headers == b"X-Bar: 2\r\n"


def test_chunked_transfer_encoding_is_detected_and_dropped():
    fields = [("Transfer-Encoding", "gzip, chunked"), ("Trailer", "X-Sum")]
    raw = head(fields, b"HTTP/1.0 200 OK\r\n")
    _, headers, chunked, has_cl, _ = split_response_head(raw, False, False)
    assert chunked and not has_cl
    assert headers == b""
    _, headers, *_ = split_response_head(raw, True, False)  # the client accepts trailers
    assert headers == b"Trailer: X-Sum\r\n"


def test_upgrade_is_kept_only_when_asked():
    raw = head([("Upgrade", "websocket"), ("Connection", "upgrade")], b"HTTP/1.1 101 Switching\r\n")
    assert split_response_head(raw, False, True)[1] == b"Upgrade: websocket\r\n"
    assert split_response_head(raw, False, False)[1] == b""


@given(
    st.lists(
        st.tuples(
            st.sampled_from(HOP + END_TO_END + ["Content-Length"]),
            st.sampled_from(["keep-alive", "close", "1", "chunked", "x y"]),
        ),
        max_size=8,
    )
)
def test_exactly_the_end_to_end_fields_pass_in_order(fields):
    raw = head(fields)
    named = set()
    for n, v in fields:
        if n == "Connection":
            named |= {t.strip().lower() for t in v.split(",")}
    _, headers, *_ = split_response_head(raw, False, False)
    kept = [
        (n, v)
        for n, v in fields
        if n not in HOP and n.lower() not in named - {"close", "keep-alive", "upgrade"}
    ]
    assert headers == b"".join(f"{n}: {v}\r\n".encode() for n, v in kept)


def test_the_memo_gives_the_same_answer_and_stays_bounded():
    from edgelb.http import response_head

    raw = head([("Server", "nginx"), ("Content-Length", "6"), ("Connection", "close")])
    first = response_head.rewrite_response_head_cached(raw)
    status, headers, *framing = split_response_head(raw, False, False)
    assert first[:5] == (status, headers + response_head.VIA, *framing)
    assert first[5] == (
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 6\r\nvia: 1.1 edgelb\r\n\r\n"
    )
    size = len(response_head._cache)
    assert response_head._cache[raw] == first
    # a hit: the same answer for an equal head, and the memo did not grow (compiled with
    # mypyc, the tuple is rebuilt for a Python caller, so identity is not the test)
    assert response_head.rewrite_response_head_cached(bytes(raw)) == first
    assert len(response_head._cache) == size
    for i in range(response_head._CACHE_SIZE + 10):
        response_head.rewrite_response_head_cached(head([("X-N", str(i))]))
    assert len(response_head._cache) <= response_head._CACHE_SIZE
