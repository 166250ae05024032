"""The one interface every watcher (file, Kubernetes, the coming Marathon) implements.

A source follows something outside the process and, each time what it knows changes, hands
the runtime one whole `Snapshot` through the `emit` callable it was given: the runtime applies
it or rejects it whole (it raises, and the source's last good snapshot keeps serving), and
returns what it worked around (`Notice`s). A source says how it is doing through the `report`
callable it was given (a `Health`), never by writing the runtime's state. A source never
imports `edgelb`: whatever it needs from it (a policy reader, the defaults) is passed in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from watchers.model import Notice, Snapshot


class Rejected(Exception):
    """A snapshot the runtime would not apply (raised by `Emit`); nothing of it applied.

    `errors`: why, one line per problem. `services`: the services at fault when every problem
    is one service's (a port already used, a static port that cannot be bound, an unknown mode
    or balance), so a source may drop them and hand over the rest; empty when some problem is
    not one service's (dropping services would not help)."""

    def __init__(self, errors: list[str], services: tuple[str, ...] = ()) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors
        self.services = services


# Apply one snapshot: returns the notices of what was worked around, raises Rejected when not
Emit = Callable[[Snapshot], Awaitable[tuple[Notice, ...]]]


@dataclass(frozen=True, slots=True)
class Health:
    """How a source is doing, as it sees it (edgelb_watcher_up, /status.json).

    up: connected to what it follows and no loop of it down; error: why not ("" = fine);
    last_event: unix time of the last sign of life from what it follows (0 = not known);
    problems: objects it skipped or flagged in its latest translation (None: it counts none);
    problem_lines: those problems, one line each, as /status.json lists them (bounded by
    the source); details: what it follows, in detail, for /status.json (JSON values;
    None: nothing)."""

    up: bool
    error: str = ""
    last_event: float = 0.0
    problems: int | None = None
    problem_lines: tuple[str, ...] = ()
    details: Any = None


Report = Callable[[str, Health], None]  # (source name, its health)


@dataclass(frozen=True)
class Tasks:
    """How a source runs its background work, as its host does (edgelb.control.tasks): `spawn(coro,
    name, held)` starts a task held in `held` until it ends, its failure logged;
    `supervise(name, factory, on_down=, on_up=, logger=)` runs a loop that is restarted after
    a backoff whenever it raises; `describe(exc)` says what an exception was, in one line."""

    spawn: Callable[[Coroutine[Any, Any, Any], str, set[asyncio.Task[Any]]], Any]
    supervise: Callable[..., Coroutine[Any, Any, None]]
    describe: Callable[[BaseException], str]


async def cancel_and_wait(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel a source's background tasks and wait until each has ended (its stop())."""
    held = list(tasks)
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)


class Source(Protocol):
    """A watcher: `run()` follows its source until cancelled, handing whole snapshots to its
    `emit` and its health to its `report` (both given to it when it is made)."""

    async def run(self) -> None: ...
