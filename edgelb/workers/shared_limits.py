"""Per-client route limits that hold for a group of worker processes: the shared limits table.

A route's `filters.limits` (edgelb/http/client_limits.py ClientLimiter) keeps a token bucket
and an in-flight count per client address. With several workers the kernel spreads one
client's connections over them, so each worker's own state would let the client have up to W
times its `rps` and `connections`. This table gives every limiter a view of the group, as
edgelb/workers/shared_load.py does for `max_inflight`: a block of shared memory (a file under
/dev/shm, named by a handle: the same storage and the same reasons as shared_load) with a
fixed number of *cells* per worker; a worker writes only its own cells (no locks), readers
add them up.

    control                                     worker i
    shared = SharedLimits.create(workers)        view = SharedLimits.attach(shared.handle(), i)
    shared.reset_worker(i)  # i died, before     runtime.use_shared_limits(view)
                            # its replacement starts

Cells. A (limiter, client) pair has one cell index: a stable hash (blake2b, the same in every
process, unlike Python's hash()) of the limiter's identity (its route's name and its
ClientLimits, identical in every worker since they all apply the same snapshots) and the
client address, modulo `cells` (a power of two; CELLS by default). Two pairs that meet in one
cell are limited together: a client active at the same time as K - 1 other limited
(route, client) pairs shares its cell with one of them with odds about (K - 1) / cells: at
65536 cells, 0.15 % for 100, 1.5 % for 1000, 14 % for 10 000. Sharing only ever makes a limit
stricter, never looser; a pair that is gone leaves nothing that matters (its in-flight count
is back at 0 and its bucket refills with time).

A worker's cell for index c holds six 8-byte words:

- in flight: the worker's requests of the pair in flight (the `connections` limit reads the
  sum over the workers);
- admitted: how many requests of the pair the worker ever admitted under `rps` (only grows);
- the bucket the worker left at its last admission: tokens, the loop time then
  (CLOCK_MONOTONIC, one clock for every process of the machine), and `accounted`: the sum of
  every worker's `admitted` that this bucket had taken into account; and a sequence number,
  odd while the worker writes them, so that a reader takes a bucket whole (a sequence lock;
  it relies on stores being seen in the order they were made, as on x86-64: the same kind of
  assumption as shared_load's).

The rate. At a decision a worker rebuilds the group's bucket from the freshest bucket any
worker left (its own included): refill it from its time to now (capped at the burst), then
take off the admissions it had not accounted for (the group's `admitted` now minus its
`accounted`: the other workers' admissions it could not see, when several decide at once).
It admits when a token is left, adds 1 to its own `admitted` and leaves its bucket. No
admission is ever lost: one a worker did not see when it decided is taken off by the next
decision, so a race costs the group at most the W - 1 requests of that instant, never a
drift. (The design first proposed kept a local bucket per worker and took off the others'
admissions as they grew; a worker meeting a client for the first time would start with a
full bucket, letting a client that moves between workers take W bursts; and admissions made
long ago, seen late, would be taken off after the refill, limiting an idle worker's client
too hard. Rebuilding from the freshest bucket has neither flaw.) Tokens may go below 0 after
a race: the debt is paid back by the refill.

The bound (also in ARCHITECTURE.md, "Workers: per-client limits"): the same race as the caps.
A worker decides and writes its cell in one synchronous step of its loop and sees its own
cells exactly; what it can miss is only what other workers wrote after it read their cells.
W workers deciding on the same picture can each admit one: for `connections` C the group has
at most C + W - 1 of a client's requests in flight (the proof of shared_load's bound holds
word for word, a cell standing for a slot); for `rps` the group admits at most burst + W - 1
in a burst, and over any time T at most burst + rps x T + W - 1 (every admission is counted
by every later decision; only the ones in flight between a read and a write are missed).

A dead worker: its in-flight cells are zeroed (its requests ended with it) before its
replacement starts; its `admitted` counts and buckets are kept (they were real admissions,
and a count that never goes down keeps the others' arithmetic simple; a count seen going down
would only be taken as no new admission).

Memory: CELL_WORDS x 8 = 48 bytes per cell per worker: 3 MiB per worker at 65536 cells,
reserved when the table is made (posix_fallocate, so a full /dev/shm fails at start with an
error naming it, not with a SIGBUS in a worker later).
"""

from __future__ import annotations

import hashlib
import os
import weakref
from dataclasses import dataclass

from edgelb.workers.shared_load import _Mapping, new_table_file, remove_table

MAGIC = b"EDGELBCL"
VERSION = 1
HEADER_WORDS = 8  # magic, version, workers, cells, 4 spare
CELLS = 65536  # cells per worker (a power of two)
CELL_WORDS = 6
# the words of a cell: in flight, admitted, the bucket's sequence (int64); tokens, at
# (float64); accounted (int64)
INFLIGHT, ADMITTED, SEQ, TOKENS, AT, ACCOUNTED = 0, 1, 2, 3, 4, 5
READ_TRIES = 8  # reads of a bucket being written before it is taken as it reads
MAX_WORKERS = 1024
MAX_CELLS = 1 << 22


@dataclass(frozen=True, slots=True)
class SharedLimitsHandle:
    """What a worker needs to attach the table (picklable)."""

    path: str
    workers: int
    cells: int


def identity(name: str, limits: object) -> bytes:
    """A limiter's identity, the same in every worker: its route's name and its limits."""
    return hashlib.blake2b(f"{name}\0{limits!r}".encode(), digest_size=32).digest()


def cell_index(ident: bytes, ip: bytes, cells: int) -> int:
    """The cell of (limiter `ident`, client `ip`): stable across processes and runs."""
    digest = hashlib.blake2b(ip, key=ident, digest_size=8).digest()
    return int.from_bytes(digest, "little") & (cells - 1)


def _stride(cells: int) -> int:
    """Words per worker region, whole cache lines (two workers never share one)."""
    return -(-(cells * CELL_WORDS) // 8) * 8


def _size(workers: int, cells: int) -> int:
    return (HEADER_WORDS + workers * _stride(cells)) * 8


class _Table:
    def __init__(self, m: _Mapping, workers: int, cells: int) -> None:
        self.m = m
        self.words = m.words
        self.floats = m.floats
        self.workers = workers
        self.cells = cells
        self.stride = _stride(cells)
        self.bases = [HEADER_WORDS + w * self.stride for w in range(workers)]  # cell 0's

    def at(self, worker: int, cell: int) -> int:
        """The index (in words) of `worker`'s cell `cell`."""
        return HEADER_WORDS + worker * self.stride + cell * CELL_WORDS

    def _sum(self, cell: int, word: int) -> int:
        words = self.words
        at = cell * CELL_WORDS + word
        n = 0
        for base in self.bases:
            n += words[base + at]
        return n

    def inflight(self, cell: int) -> int:
        """The group's in flight in `cell`."""
        return self._sum(cell, INFLIGHT)

    def admitted(self, cell: int) -> int:
        """The group's admissions ever in `cell`."""
        return self._sum(cell, ADMITTED)


class SharedLimits(_Table):
    """The control process's side: makes the table, zeroes a dead worker's in-flight cells,
    and removes the table on close."""

    def __init__(self, m: _Mapping, workers: int, cells: int) -> None:
        super().__init__(m, workers, cells)
        self._remove = weakref.finalize(self, remove_table, m.path, os.getpid())

    @classmethod
    def create(cls, workers: int, cells: int = CELLS, *,
               directory: str | None = None) -> SharedLimits:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"shared limits table: workers must be 1..{MAX_WORKERS}, "
                             f"not {workers}")
        if not 1 <= cells <= MAX_CELLS or cells & (cells - 1):
            raise ValueError(f"shared limits table: cells must be a power of two in "
                             f"1..{MAX_CELLS}, not {cells}")
        m = new_table_file("limits", _size(workers, cells), directory, reserve=True)
        m.mm[:8] = MAGIC
        m.words[1], m.words[2], m.words[3] = VERSION, workers, cells
        return cls(m, workers, cells)

    def handle(self) -> SharedLimitsHandle:
        return SharedLimitsHandle(self.m.path, self.workers, self.cells)

    @staticmethod
    def attach(handle: SharedLimitsHandle, worker: int) -> LimitsView:
        """Worker `worker`'s view of the table `handle` names (in the worker's process)."""
        return LimitsView(handle, worker)

    def reset_worker(self, worker: int) -> None:
        """Zero `worker`'s in-flight counts: it died with its requests; call before its
        replacement starts. Its admissions and buckets stay (they happened)."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"shared limits table: no worker {worker} "
                             f"(0..{self.workers - 1})")
        words = self.words
        start = self.at(worker, 0)
        for i in range(start, start + self.cells * CELL_WORDS, CELL_WORDS):
            if words[i + INFLIGHT]:
                words[i + INFLIGHT] = 0
            if words[i + SEQ] & 1:  # it died writing a bucket: whole again (as it was left)
                words[i + SEQ] += 1

    def close(self) -> None:
        self._remove()
        self.m.close()

    def __enter__(self) -> SharedLimits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LimitsView(_Table):
    """One worker's view, what a ClientLimiter reads and writes (edgelb/http/client_limits.py
    calls it `group`): the cell of a client, the group's in flight, and the group's bucket."""

    def __init__(self, handle: SharedLimitsHandle, worker: int) -> None:
        if not 0 <= worker < handle.workers:
            raise ValueError(f"shared limits table: no worker {worker} "
                             f"(0..{handle.workers - 1})")
        m = _Mapping(handle.path, _size(handle.workers, handle.cells), create=False)
        if bytes(m.mm[:8]) != MAGIC or m.words[1] != VERSION:
            m.close()
            raise ValueError(f"{handle.path} is not an edgelb shared limits table of version "
                             f"{VERSION}")
        super().__init__(m, handle.workers, handle.cells)
        self.worker = worker
        self.own = HEADER_WORDS + worker * self.stride
        self.seen = 0  # the group's admissions in the cell the last `bucket` read

    def identity(self, name: str, limits: object) -> bytes:
        return identity(name, limits)

    def cell(self, ident: bytes, ip: bytes) -> int:
        return cell_index(ident, ip, self.cells)

    def add_inflight(self, cell: int, n: int) -> None:
        """This worker's in flight in `cell` changes by `n`."""
        self.words[self.own + cell * CELL_WORDS + INFLIGHT] += n

    def bucket(self, cell: int, now: float, rate: float, burst: float) -> float:
        """The group's tokens in `cell` at `now`: the freshest bucket a worker left, refilled
        and less the admissions it had not accounted for (`burst`: a bucket never left)."""
        words, floats = self.words, self.floats
        best = -1
        best_at = 0.0
        total = 0
        at = cell * CELL_WORDS
        for base in self.bases:
            i = base + at
            total += words[i + ADMITTED]
            if floats[i + AT] > best_at:
                best, best_at = i, floats[i + AT]
        if best < 0:  # no worker admitted here yet
            self.seen = total
            return burst
        # the bucket whole, not half of two: its writer's sequence is even and unchanged
        # across the read (a few tries; a writer killed mid-write leaves it odd until control
        # resets its cells, and its last bucket is then taken as it reads)
        for _ in range(READ_TRIES):
            seq = words[best + SEQ]
            tokens, left_at = floats[best + TOKENS], floats[best + AT]
            accounted = words[best + ACCOUNTED]
            if not seq & 1 and words[best + SEQ] == seq:
                break
        if now > left_at:
            tokens += (now - left_at) * rate
        if tokens > burst:
            tokens = burst
        # what it accounted for, it accounted for, even when this sum was read before
        self.seen = total if total > accounted else accounted
        unseen = total - accounted
        return tokens - unseen if unseen > 0 else tokens

    def take(self, cell: int, tokens: float, now: float) -> None:
        """This worker admitted one request in `cell` with `tokens` left (after it), deciding
        on the `bucket` it read just before (no await between): count it and leave the bucket
        for the next decision of any worker. `accounted` is what that read saw, plus this one:
        an admission another worker made meanwhile stays unaccounted, so it is taken off."""
        words, floats = self.words, self.floats
        i = self.own + cell * CELL_WORDS
        words[i + SEQ] += 1  # odd: being written
        words[i + ADMITTED] += 1
        floats[i + TOKENS] = tokens
        words[i + ACCOUNTED] = self.seen + 1
        floats[i + AT] = now
        words[i + SEQ] += 1  # even: whole again

    def close(self) -> None:
        self.m.close()
