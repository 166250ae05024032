"""Background tasks that are held, whose failures are seen, and loops that come back.

asyncio keeps only a weak reference to a task: one whose result nobody holds can be collected
mid-flight, and an exception it ends with is reported (if at all) when it is collected, without
saying which task it was. So every background task of edgelb is started with `spawn`, which
holds it in a set of its owner until it ends and logs, with the task's name and traceback, any
exception it ends with (a cancellation is a normal stop and is not logged).

A long-lived loop (a watcher's) runs under `supervise`: when it raises, the failure is logged,
the owner is told (`on_down`, e.g. to set `edgelb_watcher_up` to 0), and the loop is started
again after an exponential, jittered backoff; the owner is told again (`on_up`) right before
each restart. A loop that returns is finished; a cancellation stops the supervisor at once,
whether the loop is running or waiting to restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger("edgelb.control.tasks")

T = TypeVar("T")


def describe(exc: BaseException) -> str:
    """`Type: message` (or the type alone when the message is empty)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def log_failure(task: asyncio.Task[Any]) -> None:
    """Done callback: log the exception `task` ended with, naming it, with the traceback.

    Retrieving the exception here also keeps asyncio from reporting it again, nameless, when
    the task is collected. A cancelled task is not a failure."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("background task %r failed: %s", task.get_name(), describe(exc),
                  exc_info=(type(exc), exc, exc.__traceback__))


def spawn(
    coro: Coroutine[Any, Any, T],
    name: str,
    held: set[asyncio.Task[Any]],
    loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.Task[T]:
    """Start `coro` as task `name`, held in `held` until it ends; its failure is logged."""
    task = (loop or asyncio.get_running_loop()).create_task(coro, name=name)
    held.add(task)
    task.add_done_callback(held.discard)
    task.add_done_callback(log_failure)
    return task


@dataclass(frozen=True)
class Backoff:
    """Waits between restarts: `initial` seconds, doubling (`factor`) up to `maximum`, each
    spread by ±`jitter` (a fraction) so that replicas do not restart in step. A run that lasted
    `reset_after` seconds or more before it failed starts the sequence over."""

    initial: float = 0.1
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    reset_after: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("backoff needs 0 < initial <= maximum, got "
                             f"{self.initial} and {self.maximum}")
        if self.factor < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"backoff needs factor >= 1 and 0 <= jitter < 1, got "
                             f"{self.factor} and {self.jitter}")

    def spread(self, delay: float, rng: random.Random) -> float:
        """`delay` with its jitter, never above `maximum`."""
        return min(self.maximum, delay * rng.uniform(1 - self.jitter, 1 + self.jitter))

    def next(self, delay: float) -> float:
        return min(self.maximum, delay * self.factor)


DEFAULT_BACKOFF = Backoff()


def _call_hook(name: str, hook: Callable[..., Any] | None, *args: Any) -> None:
    """Call an owner's hook; its failure is logged and does not end the supervision."""
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        log.exception("%s: the supervisor's hook %r failed", name, hook)


async def supervise(
    name: str,
    factory: Callable[[], Awaitable[None]],
    on_down: Callable[[BaseException], Any] | None = None,
    on_up: Callable[[], Any] | None = None,
    backoff: Backoff = DEFAULT_BACKOFF,
    *,
    logger: logging.Logger | None = None,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> None:
    """Run `await factory()` until it returns; restart it, after a backoff, whenever it raises.

    On each failure: the exception is logged on `logger` with `name` and its traceback, then
    `on_down(exc)` is called, then the supervisor waits. Right before each restart `on_up()` is
    called. Cancelling the supervisor cancels the running loop (or the wait) and ends it; the
    CancelledError propagates. `sleep`, `clock` and `rng` are injectable for tests."""
    logger = logger or log
    rng = rng or random.Random()
    delay = backoff.initial
    while True:
        started = clock()
        try:
            await factory()
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if clock() - started >= backoff.reset_after:
                delay = backoff.initial  # it ran well for a while: not a crash loop
            wait = backoff.spread(delay, rng)
            delay = backoff.next(delay)
            logger.error("%s failed (%s); restarting in %.2fs", name, describe(e), wait,
                         exc_info=True)
            _call_hook(name, on_down, e)
        await sleep(wait)
        logger.warning("%s: restarting", name)
        _call_hook(name, on_up)
