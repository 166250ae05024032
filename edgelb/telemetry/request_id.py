"""Request IDs: a random prefix drawn once per process and a counter, in hex.

Unique across processes and restarts with overwhelming odds (48 random bits per process) and
about 4x cheaper than 8 fresh random bytes per request (no system call): bench figures in the
README. An ID a trusted client sent is kept as it came, if it is a sane token."""

from __future__ import annotations

import os
import re

MAX_LENGTH = 128  # a longer X-Request-Id from a trusted client is replaced
_SANE = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_LENGTH)  # visible ASCII, no spaces


class RequestIds:
    """The IDs of one process."""

    __slots__ = ("count", "prefix")

    def __init__(self, prefix: bytes | None = None) -> None:
        self.prefix = prefix if prefix is not None else os.urandom(6).hex().encode()
        self.count = 0

    def new(self) -> bytes:
        self.count += 1
        return b"%s%08x" % (self.prefix, self.count)


def acceptable(value: bytes) -> bool:
    """A client's own ID that may be passed on (no control bytes, no spaces, bounded)."""
    return _SANE.fullmatch(value) is not None
