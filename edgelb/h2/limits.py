"""The bounds of an HTTP/2 connection and the meters that close a flooding one.

Every buffer the peer can grow is bounded: at most MAX_STREAMS streams, each holding at most
its window (STREAM_WINDOW) of request body plus RESPONSE_HIGH of response data waiting for the
peer's window; a header block of at most MAX_HEADER_LIST bytes (decoded, HPACK bomb included)
over at most 64 CONTINUATION frames (hyper-h2's backlog); an HPACK table of HPACK_TABLE bytes.
The connection window is as large as all stream windows together, so streams whose readers
are slow (their stream windows closed) never starve the others.
"""

from __future__ import annotations

MAX_STREAMS = 100  # SETTINGS_MAX_CONCURRENT_STREAMS we announce
STREAM_WINDOW = 256 * 1024  # SETTINGS_INITIAL_WINDOW_SIZE we announce (request bodies)
CONN_WINDOW = MAX_STREAMS * STREAM_WINDOW  # our connection receive window
MAX_HEADER_LIST = 64 * 1024  # SETTINGS_MAX_HEADER_LIST_SIZE (the HTTP/1.1 head limit)
HPACK_TABLE = 4096  # SETTINGS_HEADER_TABLE_SIZE (the default; never more)
MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE (the default)
RESPONSE_HIGH = 256 * 1024  # response bytes held for one stream before its backend is paused
RESPONSE_LOW = 64 * 1024  # ... and resumed below this

# Floods: events per FLOOD_WINDOW seconds past which the connection gets GOAWAY
# (ENHANCE_YOUR_CALM) and is closed. Legitimate clients stay far below.
FLOOD_WINDOW = 10.0
MAX_RESETS = 400  # streams the client reset before their response ended (CVE-2023-44487)
MAX_CONTROL = 1000  # SETTINGS, PING, PRIORITY, empty DATA without END_STREAM, refused streams
GRPC_MESSAGE_MAX = 1024  # bytes of a local answer's text kept for grpc-message


class FloodMeter:
    """Counts events in fixed windows of `window` seconds; `hit` says when `limit` is passed."""

    __slots__ = ("count", "limit", "start", "window")

    def __init__(self, limit: int, window: float = FLOOD_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self.start = 0.0
        self.count = 0

    def hit(self, now: float, n: int = 1) -> bool:
        """Count `n` events at `now`; True once more than `limit` fell in one window."""
        if now - self.start >= self.window:
            self.start = now
            self.count = 0
        self.count += n
        return self.count > self.limit
