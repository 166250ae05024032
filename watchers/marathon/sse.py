"""Server-sent events (the text/event-stream format Marathon's `/v2/events` speaks), parsed from
bytes as they arrive.

`SseParser.feed(data)` takes the next bytes of the stream (any split: a frame may come in
pieces, several frames in one piece) and returns what they completed, in order: an `Event` for
each dispatched event (`event:` type, default "message"; `data:` lines joined with "\\n"; `id:`),
and an `SseError` when the stream breaks a limit (a line longer than `max_line`, an event whose
data grows beyond `max_event`). Comment lines (`:...`, Marathon's keep-alives among them) and
blank lines with nothing buffered dispatch nothing. Lines end with LF, CRLF or a lone CR, as the
format allows; a CRLF split between two feeds counts once.

Nothing here raises on any input, and memory is bounded: the partial line is at most `max_line`
bytes and the buffered data at most `max_event` bytes. After an error the parser is `broken`
and ignores what follows (the caller drops the connection and starts a new parser).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LINE = 1 << 20  # bytes a line may take (an api_post_event carries a whole app definition)
MAX_EVENT = 4 << 20  # bytes of data one event may gather


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    data: str
    id: str = ""


@dataclass(frozen=True, slots=True)
class SseError:
    """The stream broke a limit; `message` says which (the stream cannot be trusted after)."""

    message: str


class SseParser:
    """A bounded, incremental text/event-stream parser (see the module docstring)."""

    def __init__(self, max_line: int = MAX_LINE, max_event: int = MAX_EVENT) -> None:
        self.max_line = max_line
        self.max_event = max_event
        self.broken = False
        self._partial = bytearray()  # the line being read, without its end
        self._skip_lf = False  # the last byte seen was a CR: an LF right after ends nothing
        self._type = ""
        self._data: list[str] = []
        self._size = 0  # bytes in _data, with the joining newlines
        self._id = ""
        self._has_data = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event | SseError]:
        out: list[Event | SseError] = []
        if self.broken:
            return out
        view = bytes(data)
        pos = 0
        n = len(view)
        if self._skip_lf and n and view[0] == 0x0A:
            pos = 1
        self._skip_lf = False
        while pos < n:
            cr = view.find(b"\r", pos)
            lf = view.find(b"\n", pos)
            if cr < 0 and lf < 0:
                if len(self._partial) + n - pos > self.max_line:
                    return self._fail(out, f"an event-stream line is longer than "
                                           f"{self.max_line} bytes")
                self._partial += view[pos:]
                break
            end = lf if cr < 0 else cr if lf < 0 else min(cr, lf)
            if len(self._partial) + end - pos > self.max_line:
                return self._fail(out, f"an event-stream line is longer than "
                                       f"{self.max_line} bytes")
            if self._partial:
                line = bytes(self._partial) + view[pos:end]
                self._partial.clear()
            else:
                line = view[pos:end]
            pos = end + 1
            if view[end] == 0x0D:
                if pos < n:
                    if view[pos] == 0x0A:
                        pos += 1
                else:
                    self._skip_lf = True
            error = self._line(line, out)
            if error is not None:
                return self._fail(out, error)
        return out

    def _fail(self, out: list[Event | SseError], message: str) -> list[Event | SseError]:
        self.broken = True
        self._partial.clear()
        self._data = []
        out.append(SseError(message))
        return out

    def _line(self, raw: bytes, out: list[Event | SseError]) -> str | None:
        """Handle one complete line; an error message when a limit is broken."""
        if not raw:
            if self._has_data:
                out.append(Event(self._type or "message", "\n".join(self._data), self._id))
            self._type = ""
            self._data = []
            self._size = 0
            self._has_data = False
            return None
        line = raw.decode("utf-8", "replace")
        if line[0] == ":":
            return None  # a comment: keep-alive
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._type = value
        elif name == "data":
            self._size += len(value) + (1 if self._has_data else 0)
            if self._size > self.max_event:
                return f"an event's data is longer than {self.max_event} bytes"
            self._data.append(value)
            self._has_data = True
        elif name == "id":
            if "\0" not in value:
                self._id = value
        # "retry" and unknown fields are ignored, as the format says
        return None
