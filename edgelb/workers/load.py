"""The group's shared tables, wired here. The load table (edgelb.workers.shared_load:
per-backend in-flight and latency estimates summed over the workers): control creates it
before the workers start, gives every backend key of a snapshot a slot as its runtime plans
it (before the bind, so a snapshot with more keys than slots is rejected whole;
edgelb.workers.control), and zeroes a dead worker's cells before its replacement starts; a
worker attaches to it and hands its view to the runtime (`Runtime.use_shared_load`). The
per-client limits table of routes (edgelb.workers.shared_limits) goes the same way:
`limits_table` next to it, its handle in Init, `attach_limits` (`Runtime.use_shared_limits`),
its in-flight cells zeroed for a dead worker."""

from __future__ import annotations

from typing import Any

from edgelb.workers.shared_limits import SharedLimits
from edgelb.workers.shared_load import SharedLoad

SLOTS = 16384  # backend keys the table holds (24 bytes per key per worker)


def table(workers: int) -> Any:
    """A new table for `workers` workers."""
    return SharedLoad.create(workers, SLOTS)


def attach(handle: Any, worker: int, runtime: Any) -> None:
    """A worker: its pools read the group's load from now on."""
    runtime.use_shared_load(SharedLoad.attach(handle, worker))


def limits_table(workers: int) -> SharedLimits:
    """The group's per-client limits (edgelb.workers.shared_limits), made next to the load
    table before any worker starts; its handle goes in the workers' Init."""
    return SharedLimits.create(workers)


def attach_limits(handle: Any, worker: int, runtime: Any) -> None:
    """A worker: the routers its runtime builds give their limiters the group's view."""
    runtime.use_shared_limits(SharedLimits.attach(handle, worker))


def backend_keys(runtime: Any) -> list[str]:
    """Every backend key of the live state (the table's slots are per backend key)."""
    return list(dict.fromkeys(b.key for state in runtime.services.values()
                              for b in state.pool.all_backends()))
