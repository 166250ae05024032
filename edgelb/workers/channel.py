"""A framed, bounded channel between control and a worker over a Unix socketpair.

Each frame is a 4-byte big-endian length and a pickled message (edgelb.workers.messages:
frozen values, snapshots and their certificates' PEM included). Both ends are our own
processes, so pickle is safe here. Bounds: a frame over MAX_FRAME is refused (sender) or
ends the channel (receiver); a peer that does not read, so that more than MAX_BUFFERED bytes
wait to be sent to it, is cut off (control then replaces the worker); the receiver stops
reading while MAX_QUEUED messages wait to be handled (back-pressure up to that bound)."""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger("edgelb.workers.channel")

HEADER = struct.Struct("!I")
MAX_FRAME = 64 << 20  # a snapshot with many services and certificates fits easily
MAX_BUFFERED = 256 << 20  # bytes waiting for a peer that does not read
MAX_QUEUED = 1024  # messages received and not yet handled


class ChannelError(Exception):
    pass


def frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > MAX_FRAME:
        raise ChannelError(f"a {type(message).__name__} of {len(data)} bytes is over the "
                           f"channel's bound of {MAX_FRAME} bytes")
    return HEADER.pack(len(data)) + data


class Channel(asyncio.Protocol):
    """One end. `on_message(msg)` is called in order on the loop; `on_lost()` once at the end."""

    def __init__(self, on_message: Callable[[Any], None], on_lost: Callable[[], None]) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: Any = None  # asyncio.Transport (uvloop's is not a subclass)
        self._buf = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(buf)
            if size > MAX_FRAME:
                log.error("channel: a frame of %d bytes is over the bound; closing", size)
                self.close()
                return
            end = HEADER.size + size
            if len(buf) < end:
                return
            message = pickle.loads(bytes(buf[HEADER.size:end]))
            del buf[:end]
            self.on_message(message)
            if self.closed:
                return

    def send(self, message: Any) -> bool:
        """Queue one message; False when the channel is closed or was cut off (peer stuck)."""
        if self.closed or self.transport is None:
            return False
        self.transport.write(frame(message))
        if self.transport.get_write_buffer_size() > MAX_BUFFERED:
            log.error("channel: the peer does not read (over %d bytes waiting); closing",
                      MAX_BUFFERED)
            self.close()
            return False
        return True

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.on_lost()


async def open_channel(sock: socket.socket, on_message: Callable[[Any], None],
                       on_lost: Callable[[], None]) -> Channel:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    _, channel = await loop.create_unix_connection(lambda: Channel(on_message, on_lost),
                                                   sock=sock)
    return channel
