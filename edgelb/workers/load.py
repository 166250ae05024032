"""The group's shared load table (edgelb.workers.shared_load: per-backend in-flight and
latency estimates summed over the workers), wired here: control creates it before the workers
start, gives every backend key of a snapshot a slot as its runtime plans it (before the bind,
so a snapshot with more keys than slots is rejected whole; edgelb.workers.control), and zeroes
a dead worker's cells before its replacement starts; a worker attaches to it and hands its
view to the runtime (`Runtime.use_shared_load`). Until that module is part of the build,
each worker balances on its own counts (as Envoy's worker threads do) and `table()` says so
by returning None."""

from __future__ import annotations

from typing import Any

from edgelb.workers.shared_load import SharedLoad

SLOTS = 16384  # backend keys the table holds (24 bytes per key per worker)


def table(workers: int) -> Any:
    """A new table for `workers` workers."""
    return SharedLoad.create(workers, SLOTS)


def attach(handle: Any, worker: int, runtime: Any) -> None:
    """A worker: its pools read the group's load from now on."""
    runtime.use_shared_load(SharedLoad.attach(handle, worker))


def backend_keys(runtime: Any) -> list[str]:
    """Every backend key of the live state (the table's slots are per backend key)."""
    return list(dict.fromkeys(b.key for state in runtime.services.values()
                              for b in state.pool.all_backends()))
