"""The event-stream parser of the Marathon watcher (watchers/marathon/sse.py): frames, comments,
line ends, any split across feeds, limits, and never an exception."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from watchers.marathon.sse import Event, SseError, SseParser

STATUS = json.dumps({"eventType": "status_update_event", "appId": "/shop/web",
                     "taskStatus": "TASK_RUNNING", "ports": [31000]})
STREAM = (b"event: event_stream_attached\ndata: {\"remoteAddress\": \"127.0.0.1\"}\n\n"
          b"\r\n"  # Marathon's keep-alive
          b": a comment\n"
          b"event: status_update_event\ndata: " + STATUS.encode() + b"\n\n"
          b"data: first\ndata: second\nid: 7\n\n")
EXPECTED = [
    Event("event_stream_attached", '{"remoteAddress": "127.0.0.1"}'),
    Event("status_update_event", STATUS),
    Event("message", "first\nsecond", "7"),
]


def feed_all(parser: SseParser, pieces: list[bytes]) -> list[Event | SseError]:
    out: list[Event | SseError] = []
    for piece in pieces:
        out.extend(parser.feed(piece))
    return out


def test_frames_keepalives_and_comments() -> None:
    assert SseParser().feed(STREAM) == EXPECTED


def test_every_split_gives_the_same_events() -> None:
    for cut in range(len(STREAM) + 1):
        assert feed_all(SseParser(), [STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut
    assert feed_all(SseParser(), [bytes([b]) for b in STREAM]) == EXPECTED


def test_crlf_and_lone_cr_line_ends_and_a_crlf_split_across_feeds() -> None:
    crlf = STREAM.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert SseParser().feed(crlf) == EXPECTED
    cr = STREAM.replace(b"\r\n", b"\n").replace(b"\n", b"\r")
    assert SseParser().feed(cr) == EXPECTED
    # a CR at the end of one feed and its LF at the start of the next end one line, not two
    p = SseParser()
    assert p.feed(b"event: a\r") == []
    assert p.feed(b"\ndata: x\r") == []
    assert p.feed(b"\n\r\n") == [Event("a", "x")]


def test_fields_as_the_format_says() -> None:
    p = SseParser()
    # no space after the colon, a field without a colon, unknown fields, retry
    out = p.feed(b"event:x\ndata\ndata:y\nretry: 10\nfoo: bar\n\n")
    assert out == [Event("x", "\ny")]
    # a blank line with nothing buffered dispatches nothing; the type does not carry over
    assert p.feed(b"\n\nevent: z\n\ndata: 1\n\n") == [Event("message", "1")]


def test_a_line_too_long_is_an_error_value_and_memory_stays_bounded() -> None:
    p = SseParser(max_line=64, max_event=1024)
    assert p.feed(b"data: " + b"a" * 40) == []
    out = p.feed(b"a" * 40)
    assert out == [SseError("an event-stream line is longer than 64 bytes")]
    assert p.broken and len(p._partial) == 0
    assert p.feed(b"\n\ndata: ok\n\n") == []  # broken: ignores what follows


def test_an_event_too_long_is_an_error_value() -> None:
    p = SseParser(max_line=64, max_event=100)
    lines = b"".join(b"data: " + b"x" * 50 + b"\n" for _ in range(3))
    out = p.feed(b"event: big\n" + lines + b"\n")
    assert out == [SseError("an event's data is longer than 100 bytes")]


def test_events_before_an_error_are_kept() -> None:
    p = SseParser(max_line=32)
    out = p.feed(b"data: a\n\ndata: " + b"b" * 64 + b"\n\n")
    assert out[0] == Event("message", "a")
    assert isinstance(out[1], SseError)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_arbitrary_bytes_never_raise_and_stay_bounded(pieces: list[bytes]) -> None:
    p = SseParser(max_line=128, max_event=256)
    for piece in pieces:
        out = p.feed(piece)
        assert all(isinstance(x, (Event, SseError)) for x in out)
        assert len(p._partial) <= 128
        assert p._size <= 256


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["status_update_event", "api_post_event", "x"]),
                          st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"),
                                  max_size=30)), max_size=8),
       st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_any_split_of_well_formed_frames_gives_them_back(
        frames: list[tuple[str, str]], cuts: list[int]) -> None:
    data = b"".join(f"event: {t}\ndata: {d}\n\n".encode() for t, d in frames)
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert feed_all(SseParser(), pieces) == [Event(t, d) for t, d in frames]
