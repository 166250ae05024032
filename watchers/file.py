"""Follow one file by polling and hand each new, successfully loaded content to `emit`.

Polling is cheap and works everywhere (bind mounts, Kubernetes ConfigMap symlink swaps, network
file systems) where inotify does not. Each poll is one `stat`; the file is read and hashed only
when its signature (mtime, ctime, size, inode) changed, plus every `verify_every`-th poll to catch
a rewrite that kept the same size within the file system's timestamp granularity.

A changed signature is read once it has held for one poll, so a half-written file (an editor
writing in place) is not loaded; with the default interval a change is applied within 0.5 s.
An atomic rename (write elsewhere, then `os.replace`) is always complete, so a new inode is read
at the next poll without waiting; it is the recommended way to update the file. The first read
and `trigger()` do not wait either.

The loader is injected: it gets the file's bytes and returns a value (or raises). Failures
keep the last good value: `on_error` is called and `emit` is not.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

_MAX_SETTLE_POLLS = 4
_Signature = tuple[int, int, int, int, int]


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)


def _log_error(exc: Exception) -> None:
    log.error("%s", exc)


class FileWatcher(Generic[T]):
    """Poll `path`; `load(bytes) -> T`; `emit(T)` on each new content; `on_error(exc)` else."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        load: Callable[[bytes], T],
        emit: Callable[[T], Any],
        on_error: Callable[[Exception], Any] | None = None,
        interval: float = 0.25,
        verify_every: int = 8,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be more than 0 seconds, got {interval}")
        self.path = os.fspath(path)
        self.load = load
        self.emit = emit
        self.on_error = on_error or _log_error
        self.interval = interval
        self.verify_every = max(1, verify_every)
        self.value: T | None = None  # the last good value
        self.loaded = False  # true once some content loaded successfully
        self.polls = 0
        self._applied_sig: _Signature | None = None  # signature of the content last read
        self._pending_sig: _Signature | None = None  # a new signature waiting to settle
        self._waited = 0  # polls spent waiting for a changing file to settle
        self._seen_hash: bytes | None = None  # hash of the content last read (good or bad)
        self._io_error: tuple[type, int | None] | None = None  # last I/O problem reported
        self._forced = False
        self._stopping = False
        self._wake = asyncio.Event()

    def trigger(self) -> None:
        """Re-read now and emit even if the content is unchanged (e.g. on SIGHUP)."""
        self._forced = True
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Load at once, then poll every `interval` seconds until `stop()`."""
        force = True
        while not self._stopping:
            await self.poll(force=force)
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            force, self._forced = self._forced, False

    async def poll(self, force: bool = False) -> bool:
        """One check of the file; returns True when a value was emitted."""
        self.polls += 1
        try:
            sig = _signature(os.stat(self.path))
        except OSError as e:
            await self._io_failed(e)
            return False
        if not force:
            if sig != self._applied_sig:
                # Let an in-progress write finish first, but not forever if it keeps changing.
                # A file replaced by rename (a new inode) is complete: read it at once.
                replaced = self._applied_sig is not None and sig[3:] != self._applied_sig[3:]
                if (
                    not replaced
                    and sig != self._pending_sig
                    and self._waited < _MAX_SETTLE_POLLS
                ):
                    self._pending_sig = sig
                    self._waited += 1
                    return False
            elif self.polls % self.verify_every != 0:
                return False
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            await self._io_failed(e)
            return False
        self._io_error = None
        self._applied_sig = sig
        self._pending_sig = None
        self._waited = 0
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest == self._seen_hash and not force:
            return False
        self._seen_hash = digest
        try:
            value = self.load(data)
        except Exception as e:  # the loader's failure is the caller's to judge
            await self._call(self.on_error, e)
            return False
        self.value = value
        self.loaded = True
        await self._call(self.emit, value)
        return True

    async def _io_failed(self, e: OSError) -> None:
        """Report a missing or unreadable file once per kind of problem, keep the last value."""
        self._applied_sig = self._pending_sig = None
        self._waited = 0
        self._seen_hash = None  # whatever comes back is loaded and emitted
        kind = (type(e), e.errno)
        if kind == self._io_error:
            return
        self._io_error = kind
        if e.errno == errno.ENOENT:
            err: OSError = FileNotFoundError(
                errno.ENOENT, "file not found; keeping the last good content until it returns",
                self.path)
        else:
            err = e
        await self._call(self.on_error, err)

    async def _call(self, fn: Callable[[Any], Any], arg: Any) -> None:
        try:
            result = fn(arg)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("file watcher %s: callback %r failed", self.path, fn)
