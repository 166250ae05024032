"""Lines to stdout or a file, written by a thread of their own in batches, never blocking the
event loop.

The loop only appends a record to a deque (`put`): no formatting, no system call. Every
`interval` the writer thread takes what is there, formats it (`format_batch`) and
writes it with one `os.write` loop, the GIL released while the kernel works. A sink that is
slow or stuck (a full pipe, a FIFO nobody reads, a hung disk) holds only that thread: the deque
fills up to `capacity` records, and from then on records are dropped and counted (`dropped`),
so traffic never waits for a log line.

A file is opened for appending and reopened when asked (`reopen`, on SIGUSR1) or when the
path no longer names the open file (renamed or deleted by logrotate: checked about every
second): lines written before the reopen are in the moved file, none is lost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from edgelb.telemetry.settings import STDOUT

log = logging.getLogger("edgelb.telemetry")

CHECK_EVERY = 1.0  # seconds between checks that the path still names the open file


class LineSink:
    """A bounded list of records and the thread that writes them."""

    def __init__(self, path: str, format_batch: Callable[[list[Any]], bytes], *,
                 capacity: int = 16384, interval: float = 0.1, name: str = "access log") -> None:
        self.path = path
        self.format_batch = format_batch
        self.capacity = capacity
        self.interval = interval
        self.name = name
        self.pending: deque[Any] = deque()  # append and popleft are atomic between threads
        self.dropped = 0  # by the loop: the list was full (only the loop writes it)
        self.failed = 0  # by the writer: records in a batch that could not be written
        self.written = 0  # records written
        self._fd = -1
        self._ino: tuple[int, int] | None = None
        self._checked = 0.0
        self._reopen = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._error = ""  # the last write or open error, logged once per change

    # -- the loop's side ---------------------------------------------------------------

    def put(self, record: Any) -> None:
        """Keep `record` for the writer, or drop it (counted) when `capacity` are waiting."""
        pending = self.pending
        if len(pending) >= self.capacity:
            self.dropped += 1
            return
        pending.append(record)

    @property
    def lost(self) -> int:
        """Records dropped for a full buffer or a failed write."""
        return self.dropped + self.failed

    def reopen(self) -> None:
        """Open the path again before the next write (SIGUSR1, after logrotate moved it)."""
        self._reopen = True
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._open()
            self._thread = threading.Thread(target=self._run, name=f"edgelb {self.name}",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is pending (for up to `timeout`: a stuck sink is left behind), close."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return  # stuck in a write: the daemon thread dies with the process
        self._close()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record put so far is written or counted lost (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self.pending or self._busy:
            self._wake.set()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # -- the writer thread ---------------------------------------------------------------

    _busy = False

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            stopping = self._stop.is_set()
            self._busy = True
            try:
                self._write_pending()
            except Exception:  # never let the writer die: count the batch, go on
                log.exception("%s: internal error in the writer; it goes on", self.name)
            finally:
                self._busy = False
            if stopping:
                return

    def _write_pending(self) -> None:
        if self._reopen:
            self._reopen = False
            self._close()
            self._open()
        elif self.path != STDOUT:
            now = time.monotonic()
            if now - self._checked >= CHECK_EVERY:
                self._checked = now
                if self._moved():
                    self._close()
                    self._open()
        pending = self.pending
        if not pending:
            return
        popleft = pending.popleft
        batch = [popleft() for _ in range(len(pending))]
        data = self.format_batch(batch)
        if self._fd < 0:
            self._open()
        if self._fd < 0 or not self._write(data):
            self.failed += len(batch)
            return
        self.written += len(batch)

    def _write(self, data: bytes) -> bool:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            self._report(f"cannot write to {self.path}: {e.strerror or e}")
            if self.path != STDOUT:
                self._close()  # opened again for the next batch
            return False
        if self._error:
            log.info("%s: writing to %s again", self.name, self.path)
            self._error = ""
        return True

    def _open(self) -> None:
        if self.path == STDOUT:
            self._fd = 1
            return
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o644)
            st = os.fstat(self._fd)
            self._ino = (st.st_dev, st.st_ino)
        except OSError as e:
            self._fd = -1
            self._report(f"cannot open {self.path}: {e.strerror or e}")

    def _moved(self) -> bool:
        """True if the path names another file than the open one, or none."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._ino

    def _close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass

    def _report(self, error: str) -> None:
        if error != self._error:
            self._error = error
            log.error("%s: %s; its lines are dropped and counted "
                      "(edgelb_access_log_dropped_total) until it works again", self.name, error)
