"""Follow one file, and the files its value is built from, by polling; hand each new,
successfully loaded value to `emit`.

Polling is cheap and works everywhere (bind mounts, Kubernetes ConfigMap symlink swaps, network
file systems) where inotify does not. Each poll is one `stat` per file; a file is read and
hashed only when its signature (mtime, ctime, size, inode) changed, plus every `verify_every`-th
poll to catch a rewrite that kept the same size within the file system's timestamp granularity.
`stat` follows symlinks, so a swap of the link chain (kubelet's `..data` link to a new
timestamped directory in a mounted Secret or ConfigMap; certbot's `live/` links) is a new inode.

A changed signature is read once it has held for one poll, so a half-written file (an editor
writing in place) is not loaded; with the default interval a change is applied within 0.5 s.
An atomic rename (write elsewhere, then `os.replace`) is always complete, so a new inode is read
at the next poll without waiting; it is the recommended way to update the file. The first read
and `trigger()` do not wait either.

The loader is injected: it gets the file's bytes and returns a value (or raises). Failures
keep the last good value: `on_error` is called and `emit` is not.

Other files (dependencies): a value may be built from more files than `path`, e.g. the
certificates a config names. The loader reads them through `FileWatcher.read(path)`, which
returns their bytes and records them; from then on they are watched exactly like `path` (the
same signature, settling and periodic hashing), and a change to any of them re-runs the loader
on `path`'s current bytes even though `path` did not change. The watched set is what the
latest load read, so it follows the value's edits. Recording what the loader actually read
(rather than asking the value afterwards which files it names) means the watcher compares
later contents with exactly the bytes the value was built from: a change in between is not
lost. The value itself should reflect those bytes (e.g. carry their digests), so its consumer
can tell a real change from a re-read.
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
_UNREADABLE = b""  # the digest recorded for a file that could not be read (never a real one)


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _log_error(exc: Exception) -> None:
    log.error("%s", exc)


class _Tracked:
    """What the watcher knows of one file: the signature and digest of what was last read."""

    __slots__ = ("digest", "path", "pending", "sig", "waited")

    def __init__(self, path: str) -> None:
        self.path = path
        self.sig: _Signature | None = None  # signature of the content last read
        self.pending: _Signature | None = None  # a new signature waiting to settle
        self.waited = 0  # polls spent waiting for a changing file to settle
        self.digest: bytes | None = None  # digest of the content last read (good or bad)

    def due(self, sig: _Signature, verify: bool) -> bool:
        """Whether to read the file now: its signature changed and settled, or it is time to
        verify the content. An in-progress write gets one poll to finish (not forever, if it
        keeps changing); a file replaced by rename (a new inode) is complete: read at once."""
        if sig == self.sig:
            return verify
        replaced = self.sig is not None and sig[3:] != self.sig[3:]
        if not replaced and sig != self.pending and self.waited < _MAX_SETTLE_POLLS:
            self.pending = sig
            self.waited += 1
            return False
        return True

    def read(self, sig: _Signature) -> bytes:
        """Read the file whose signature is `sig` (raises OSError)."""
        with open(self.path, "rb") as f:
            data = f.read()
        self.sig = sig
        self.pending = None
        self.waited = 0
        return data

    def forget(self) -> None:
        """The file is gone or unreadable: whatever comes back is read (the digest stays, to
        tell whether it came back changed)."""
        self.sig = self.pending = None
        self.waited = 0


class FileWatcher(Generic[T]):
    """Poll `path`; `load(bytes) -> T`; `emit(T)` on each new content; `on_error(exc)` else.

    `load` may read other files with `self.read(path)`; they are watched too (module doc)."""

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
        self._main = _Tracked(self.path)
        self._depends: dict[str, _Tracked] = {}  # the other files the latest load read
        self._reading: dict[str, _Tracked] = {}  # those read by the load in progress
        self._io_error: tuple[type, int | None] | None = None  # last I/O problem reported
        self._forced = False
        self._stopping = False
        self._wake = asyncio.Event()

    @property
    def depends(self) -> tuple[str, ...]:
        """The other files watched: those the latest load read with `read()`."""
        return tuple(self._depends)

    def read(self, path: str | os.PathLike[str]) -> bytes:
        """For `load`: the bytes of another file the value is built from; the file is watched
        from now on (until a load no longer reads it). Raises OSError as `open` does; a file
        that cannot be read is watched too, so its arrival re-runs the load."""
        tracked = _Tracked(os.fspath(path))
        self._reading[tracked.path] = tracked
        try:
            sig = _signature(os.stat(tracked.path))  # before reading: a later write is seen
            data = tracked.read(sig)
        except OSError:
            tracked.digest = _UNREADABLE
            raise
        tracked.digest = _digest(data)
        return data

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
                async with asyncio.timeout(self.interval):  # (wait_for may lose a cancel)
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            force, self._forced = self._forced, False

    async def poll(self, force: bool = False) -> bool:
        """One check of the file and its dependencies; returns True when a value was emitted."""
        self.polls += 1
        verify = self.polls % self.verify_every == 0
        changed = self._changed_depends(verify)
        main = self._main
        try:
            sig = _signature(os.stat(self.path))
        except OSError as e:
            await self._io_failed(e)
            return False
        if not (force or changed or main.due(sig, verify)):
            return False
        try:
            data = main.read(sig)
        except OSError as e:
            await self._io_failed(e)
            return False
        self._io_error = None
        digest = _digest(data)
        if digest == main.digest and not (force or changed):
            return False
        main.digest = digest
        if changed:
            log.info("%s: %s changed; reloading", self.path, ", ".join(changed))
        self._reading = {}
        try:
            value = self.load(data)
        except Exception as e:  # the loader's failure is the caller's to judge
            await self._call(self.on_error, e)
            return False
        finally:
            self._depends, self._reading = self._reading, {}
        self.value = value
        self.loaded = True
        await self._call(self.emit, value)
        return True

    def _changed_depends(self, verify: bool) -> list[str]:
        """The dependencies whose content changed since the load read them (or since they were
        last found changed); a file that disappears or becomes unreadable counts once."""
        changed = []
        for tracked in self._depends.values():
            try:
                sig = _signature(os.stat(tracked.path))
                if not tracked.due(sig, verify):
                    continue
                digest = _digest(tracked.read(sig))
            except OSError:
                tracked.forget()
                digest = _UNREADABLE
            if digest != tracked.digest:
                tracked.digest = digest
                changed.append(tracked.path)
        return changed

    async def _io_failed(self, e: OSError) -> None:
        """Report a missing or unreadable file once per kind of problem, keep the last value."""
        self._main.forget()
        self._main.digest = None  # whatever comes back is loaded and emitted
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
