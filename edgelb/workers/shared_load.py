"""One view of load for a group of worker processes: the shared in-flight table.

Each worker's pools count the requests they have open on a backend; with several workers, a
least-loaded pick and a per-backend cap (`max_inflight`) must see the group's count, not one
worker's. The table is a block of shared memory with one *slot* per backend key and, in each
slot, one *cell* per worker: a worker writes only its own cells (no locks; its data path is
one thread), readers add the cells of every worker up.

    control                                   worker i
    shared = SharedLoad.create(workers, slots)
    shared.assign(keys)   # every snapshot,   view = SharedLoad.attach(shared.handle(), i)
                          # before it is sent runtime.use_shared_load(view)
    shared.reset_worker(i)  # worker i died, before its replacement starts

A cell holds three 8-byte words: the worker's in-flight count on the backend (all of its
services that list that address), and its peak-EWMA latency estimate with the loop time it
was last updated (CLOCK_MONOTONIC, the same clock in every process of the machine). A reader
takes the group's in-flight as the sum of the cells (at every pick) and the latency estimate as
the freshest cell's (every 8th pick: pool.Pool._sync_latency); a worker then updates the
estimate it adopted with its own samples and publishes it at each release, so the group keeps
about one peak EWMA fed by every worker's samples (two workers updating the same estimate at
once keep one of the two samples: an estimate, not a count).

Storage: a file under /dev/shm (tmpfs; the temporary directory where there is none) mapped
with mmap, named by the handle. Chosen over an anonymous mapping made before fork because a
handle (a path) reaches a worker however it was started (fork, spawn, a replacement started
long after) and over multiprocessing.shared_memory because on Python 3.11/3.12 every process
that attaches a SharedMemory registers it with its resource tracker, which unlinks the segment
when that process exits (a worker's death would take the table away from the group). The
control process that created the table unlinks it on close (and at exit).

Layout (8-byte words): a header (magic, version, workers, slots, the directory's
generation), the directory (`slots` entries of ENTRY bytes: state and the key), then one
region of cells per worker (padded to 64 bytes, so two workers' writes never share a cache
line). The directory is written by the control process only, under a sequence lock (the
generation is odd while it writes); a worker reads it whole when a key it needs is unknown.

Fixed size: `slots` is chosen at create. A snapshot with more backend keys than slots (live
and not yet reusable) is refused with SlotsExhausted, naming the numbers and the fix; the
table does not grow, since every worker holds the mapping and growing it would mean a new
table attached by all of them at once.

Slots are stable: a key keeps its slot while it is in the snapshots. A removed key's slot is
retired; it is given to another key only once every worker's cell reads zero in-flight and
`settle` seconds have passed (time for every worker to have applied the snapshot without the
key), or after `grace` seconds whatever it reads (a request stuck on a removed backend must not
hold a slot forever; its count then lingers on the new key until it ends: an over-count,
never an under-count). A key that comes back before its slot was reused gets it again.

The bound (also in ARCHITECTURE.md, "Workers: one view of load"): with W workers and a cap C
on a backend, the group never has more than C + W - 1 requests open on it. Proof: a worker
admits a request in one synchronous step of its loop (pool.Pool.pick reads the cells and
computes eligibility, the caller's acquire adds to its own cell, with no await between), and
it sees its own count exactly. Suppose at some time the group has T >= C + W open, and for
each worker j with requests open let a_j be the last of them it admitted; its scan read every
other worker's cell at some instant, and since it admitted, it saw fewer than C - n_j of the
others' requests open (n_j: j's own). So it missed at least T - C >= W of the others' open
requests (committed after it read their cell), at least two of one worker k's (W > the W - 1
others). k admitted its second missed request, and so its own last one, in a scan that began
after its first missed one was committed, hence after j read k's cell: k's last scan began
after j's. Each worker with requests open thus points to one whose last scan began strictly
later; following the arrows through finitely many workers returns to one of them, a
contradiction. So T <= C + W - 1; W workers each deciding on the same stale picture (each
sees C - 1, each admits) reach it. It assumes an 8-byte aligned load or store of a cell is
atomic (true of x86-64 and arm64) and that a store is seen by other cores soon after it is
made (cache coherence); nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import secrets
import tempfile
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

MAGIC = b"EDGELBSL"
VERSION = 1
HEADER_WORDS = 8  # magic, version, workers, slots, generation, cells offset (words), 2 spare
_W_VERSION, _W_WORKERS, _W_SLOTS, _W_GENERATION, _W_CELLS = 1, 2, 3, 4, 5
ENTRY = 128  # bytes per directory entry: state (1), key length (1), 14 spare, the key
KEY_MAX = ENTRY - 16  # longer keys are stored by digest (see slot_name)
CELL_WORDS = 4  # in-flight (int64), latency (float64), latency_t (float64), spare
INFLIGHT, LATENCY, LATENCY_T = 0, 1, 2  # the words of a cell
FREE, LIVE, RETIRED = 0, 1, 2  # a directory entry's state
MAX_WORKERS = 1024
MAX_SLOTS = 1 << 20
SETTLE = 1.0  # seconds a retired slot that reads zero waits before it is reused
GRACE = 300.0  # seconds after which a retired slot is reused whatever its cells read


class SlotsExhausted(ValueError):
    """A snapshot has more backend keys than the table has slots."""


@dataclass(frozen=True, slots=True)
class SharedLoadHandle:
    """What a worker needs to attach the table (picklable)."""

    path: str
    workers: int
    slots: int


def slot_name(key: str) -> bytes:
    """How `key` is stored in the directory: its UTF-8, or a digest when that is too long."""
    raw = key.encode()
    if len(raw) <= KEY_MAX:
        return raw
    return b"#" + hashlib.blake2b(raw, digest_size=24).hexdigest().encode()


def _layout(workers: int, slots: int) -> tuple[int, int, int]:
    """(cells offset in words, words per worker region, total bytes)."""
    directory_end = HEADER_WORDS * 8 + slots * ENTRY
    cells = -(-directory_end // 64) * 8  # in words, 64-byte aligned
    stride = -(-(slots * CELL_WORDS) // 8) * 8  # each worker's region: whole cache lines
    return cells, stride, (cells + workers * stride) * 8


STALE_AGE = 60.0  # seconds: a table file younger than this is never swept (its maker may be
# between creating it and locking it)


def sweep_stale(directory: str, now: float | None = None) -> list[str]:
    """Remove the tables in `directory` that no running process made: the file of a control
    process killed with SIGKILL (no chance to remove it) is unlocked, since the kernel drops a
    dead process's flock; a living maker holds its lock (edgelb/workers: `_Mapping`). Works
    across PID namespaces sharing the directory, unlike a PID check. Returns what it removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith(_PREFIXES)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if now - os.fstat(fd).st_mtime < STALE_AGE:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: its maker runs
            os.unlink(path)
            removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


_PREFIXES = ("edgelb-load-", "edgelb-limits-")


def new_table_file(kind: str, size: int, directory: str | None = None, *,
                   reserve: bool = False) -> _Mapping:
    """A new table file `edgelb-<kind>-<pid>-<random>` of `size` bytes, mapped and locked by
    this process: in `directory`, else /dev/shm, else the temp directory (stale tables there
    swept first). `reserve`: allocate the memory now (an error naming the fix if it is not
    there), not a SIGBUS in a worker later."""
    if directory is None:
        directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    sweep_stale(directory)  # what a SIGKILLed control left behind
    path = os.path.join(directory, f"edgelb-{kind}-{os.getpid()}-{secrets.token_hex(6)}")
    m = _Mapping(path, size, create=True)
    if reserve:
        try:
            os.posix_fallocate(m.lock_fd, 0, size)
        except OSError as e:
            m.close()
            remove_table(path, os.getpid())
            raise OSError(f"shared {kind} table: cannot reserve {size >> 10} KiB in "
                          f"{directory} ({e.strerror}); give it more room (a container's "
                          "--shm-size) or run fewer workers") from e
    return m


def remove_table(path: str, owner: int) -> None:
    """Remove a table's file, in the process that made it only (a finalizer: a forked child
    inheriting the object never removes it)."""
    if os.getpid() == owner:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class _Mapping:
    """The mapped file and its typed views, shared by the control side and a worker's view.
    The maker keeps the file open with an exclusive flock while it lives (`sweep_stale`)."""

    def __init__(self, path: str, size: int, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        self.lock_fd = -1
        try:
            if create:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size < size:
                raise ValueError(f"shared load table {path} is smaller than its handle says; "
                                 "attach with the handle of the table that made it")
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        if create:
            self.lock_fd = fd
        else:
            os.close(fd)
        self.path = path
        self.words = memoryview(self.mm).cast("q")  # int64 view of the whole table
        self.floats = memoryview(self.mm).cast("d")  # float64 view of the same bytes

    def close(self) -> None:
        self.words.release()
        self.floats.release()
        with contextlib.suppress(BufferError):  # a view still held elsewhere: the OS unmaps
            self.mm.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


class _Table:
    """The layout of a table and what both sides read."""

    def __init__(self, m: _Mapping, workers: int, slots: int) -> None:
        self.m = m
        self.workers = workers
        self.slots = slots
        self.cells, self.stride, _ = _layout(workers, slots)

    def cell(self, worker: int, slot: int) -> int:
        """The index (in words) of `worker`'s cell for `slot`."""
        return self.cells + worker * self.stride + slot * CELL_WORDS

    def inflight(self, worker: int, slot: int) -> int:
        return self.m.words[self.cell(worker, slot) + INFLIGHT]

    def total(self, slot: int) -> int:
        """The group's in-flight on `slot`: every worker's cell added up."""
        return sum(self.inflight(w, slot) for w in range(self.workers))

    def latency(self, slot: int) -> tuple[float, float]:
        """(the freshest latency estimate of `slot`, its time); (0.0, 0.0) when none."""
        best = (0.0, 0.0)
        floats = self.m.floats
        for w in range(self.workers):
            i = self.cell(w, slot)
            if floats[i + LATENCY_T] > best[1]:
                best = (floats[i + LATENCY], floats[i + LATENCY_T])
        return best

    def directory(self) -> tuple[int, dict[bytes, int]]:
        """(the generation, the live entries: name -> slot), read consistently (a sequence
        lock: read again while the control process writes)."""
        words = self.m.words
        mm = self.m.mm
        while True:
            before = words[_W_GENERATION]
            if before & 1:
                time.sleep(0)  # the control process is writing it: a few microseconds
                continue
            found = {}
            for slot in range(self.slots):
                at = HEADER_WORDS * 8 + slot * ENTRY
                if mm[at] == LIVE:
                    n = mm[at + 1]
                    found[bytes(mm[at + 16:at + 16 + n])] = slot
            if words[_W_GENERATION] == before:
                return before, found


class SharedLoad(_Table):
    """The control process's side: creates the table, gives keys their slots, resets the
    cells of a dead worker, and removes the table on close."""

    def __init__(self, m: _Mapping, workers: int, slots: int, settle: float,
                 grace: float) -> None:
        super().__init__(m, workers, slots)
        self.settle = settle
        self.grace = grace
        self._live: dict[bytes, int] = {}  # name -> slot
        self._retired: dict[bytes, tuple[int, float]] = {}  # name -> (slot, retired at)
        self._free = list(range(slots - 1, -1, -1))  # never used; pop() gives the lowest
        # the file goes when the table is closed, collected, or its process exits (a forked
        # child inheriting this object never removes it)
        self._remove = weakref.finalize(self, remove_table, m.path, os.getpid())

    @classmethod
    def create(cls, workers: int, slots: int, *, settle: float = SETTLE,
               grace: float = GRACE, directory: str | None = None) -> SharedLoad:
        """A new table for `workers` workers and up to `slots` backend keys."""
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"shared load table: workers must be 1..{MAX_WORKERS}, "
                             f"not {workers}")
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"shared load table: slots must be 1..{MAX_SLOTS}, not {slots}")
        m = new_table_file("load", _layout(workers, slots)[2], directory)
        m.mm[:8] = MAGIC
        words = m.words
        words[_W_VERSION] = VERSION
        words[_W_WORKERS] = workers
        words[_W_SLOTS] = slots
        words[_W_CELLS] = _layout(workers, slots)[0]
        return cls(m, workers, slots, settle, grace)

    def handle(self) -> SharedLoadHandle:
        return SharedLoadHandle(self.m.path, self.workers, self.slots)

    @staticmethod
    def attach(handle: SharedLoadHandle, worker: int) -> WorkerView:
        """Worker `worker`'s view of the table `handle` names (in the worker's process)."""
        return WorkerView(handle, worker)

    def slot_of(self, key: str) -> int | None:
        """The slot `key` holds now (None: not in the table)."""
        return self._live.get(slot_name(key))

    def assign(self, keys: Iterable[str], *, now: float | None = None) -> None:
        """Give every key of a snapshot a slot (call before the snapshot reaches a worker).

        Keys that were live keep their slots; keys no longer given are retired; new keys take
        a never-used slot, else a retired one that may be reused. Raises SlotsExhausted (and
        changes nothing) when there are not enough."""
        now = time.monotonic() if now is None else now
        wanted = list(dict.fromkeys(slot_name(k) for k in keys))
        wanted_set = set(wanted)
        live: dict[bytes, int] = {}
        retired = dict(self._retired)
        for name in wanted:
            slot = self._live.get(name)
            if slot is None and name in retired:
                slot = retired.pop(name)[0]  # back before its slot was reused
            if slot is not None:
                live[name] = slot
        for name, slot in self._live.items():
            if name not in wanted_set:
                retired[name] = (slot, now)
        new = [name for name in wanted if name not in live]
        free = list(self._free)
        reusable = sorted(
            (since, name) for name, (slot, since) in retired.items()
            if now - since >= self.grace
            or (now - since >= self.settle and self.total(slot) == 0)
        )
        if len(new) > len(free) + len(reusable):
            raise SlotsExhausted(
                f"the shared load table has {self.slots} slots and this snapshot needs "
                f"{len(wanted)} backend keys ({len(retired) - len(reusable)} more are held by "
                f"removed backends still draining): start edgelb with more slots")
        cleared = []
        for name in new:
            if free:
                slot = free.pop()
            else:
                _, old = reusable.pop(0)
                slot = retired.pop(old)[0]
                cleared.append(slot)
            live[name] = slot
        self._write(live, retired, cleared)
        self._live, self._retired, self._free = live, retired, free

    def _write(self, live: dict[bytes, int], retired: dict[bytes, tuple[int, float]],
               cleared: list[int]) -> None:
        """The directory (and the latency of reused slots) under the sequence lock."""
        words, floats, mm = self.m.words, self.m.floats, self.m.mm
        words[_W_GENERATION] += 1  # odd: being written
        states = {slot: RETIRED for slot, _ in retired.values()}
        states.update({slot: LIVE for slot in live.values()})
        names = {slot: name for name, slot in live.items()}
        names.update({slot: name for name, (slot, _) in retired.items()})
        for slot, state in states.items():
            at = HEADER_WORDS * 8 + slot * ENTRY
            name = names[slot]
            mm[at + 1] = len(name)
            mm[at + 16:at + 16 + len(name)] = name
            mm[at] = state
        for slot in cleared:  # a reused slot starts with no latency estimate
            for w in range(self.workers):
                i = self.cell(w, slot)
                floats[i + LATENCY] = floats[i + LATENCY_T] = 0.0
        words[_W_GENERATION] += 1  # even: consistent again

    def reset_worker(self, worker: int) -> None:
        """Zero `worker`'s cells: it died (its requests with it); call before its
        replacement starts."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"shared load table: no worker {worker} (0..{self.workers - 1})")
        start = self.cell(worker, 0)
        self.m.mm[start * 8:(start + self.stride) * 8] = bytes(self.stride * 8)

    def close(self) -> None:
        """Unmap, and remove the table (in the process that created it)."""
        self._remove()
        self.m.close()

    def __enter__(self) -> SharedLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WorkerView(_Table):
    """One worker's view: what edgelb.pool reads and writes on the data path (`words`,
    `floats`, `cells`, `stride`, `workers`, `worker`, and `counts`: the worker's own cells'
    in-flight values, which it alone writes, kept in a list so that it need not read them
    back) and the slot of a key."""

    def __init__(self, handle: SharedLoadHandle, worker: int) -> None:
        if not 0 <= worker < handle.workers:
            raise ValueError(f"shared load table: no worker {worker} "
                             f"(0..{handle.workers - 1})")
        m = _Mapping(handle.path, _layout(handle.workers, handle.slots)[2], create=False)
        if bytes(m.mm[:8]) != MAGIC or m.words[_W_VERSION] != VERSION:
            m.close()
            raise ValueError(f"{handle.path} is not an edgelb shared load table of version "
                             f"{VERSION}")
        super().__init__(m, handle.workers, handle.slots)
        self.worker = worker
        self.counts = [0] * handle.slots  # this worker's in-flight per slot: its cells' value
        self.words = m.words
        self.floats = m.floats
        self._known: dict[bytes, int] = {}
        self._generation = -1

    def slot(self, key: str) -> int:
        """`key`'s slot, -1 when the control process has not given it one."""
        if self.words[_W_GENERATION] != self._generation:  # (read again after an assign)
            self._generation, self._known = self.directory()
        return self._known.get(slot_name(key), -1)

    def close(self) -> None:
        self.m.close()
