"""edgelb.control.tasks: held background tasks whose failures are logged, and supervised loops that
restart with a jittered exponential backoff (the sleep, clock and randomness are injected)."""

from __future__ import annotations

import asyncio
import gc
import logging
import random

import pytest
from httpkit import within

from edgelb.control.tasks import Backoff, log_failure, spawn, supervise

pytestmark = pytest.mark.timeout(10)


class Sleeps:
    """An injected sleep: records each delay and returns at once (or waits when `block`)."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.block = False
        self.waiting = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.block:
            self.waiting.set()
            await asyncio.Event().wait()  # until cancelled


class Flaky:
    """A loop that raises `failures` times, then returns."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.runs = 0

    async def __call__(self) -> None:
        self.runs += 1
        if self.runs <= self.failures:
            raise RuntimeError(f"boom {self.runs}")


async def test_a_loop_that_raises_is_restarted_with_a_doubling_jittered_backoff(caplog) -> None:
    sleeps = Sleeps()
    flaky = Flaky(failures=12)
    downs: list[str] = []
    ups: list[int] = []
    await within(supervise("the loop", flaky, on_down=lambda e: downs.append(str(e)),
                           on_up=lambda: ups.append(flaky.runs), sleep=sleeps,
                           rng=random.Random(7)))
    assert flaky.runs == 13  # twelve failures, twelve restarts, then it returned
    assert downs == [f"boom {i}" for i in range(1, 13)]
    assert ups == list(range(1, 13))  # on_up comes right before each restart
    base = [min(30.0, 0.1 * 2 ** i) for i in range(12)]  # 0.1 0.2 0.4 ... 25.6 30 30
    for delay, want in zip(sleeps.delays, base, strict=True):
        assert want * 0.8 <= delay <= min(30.0, want * 1.2), (delay, want)
    assert len(set(sleeps.delays[:10])) == 10  # jittered: no two waits alike below the cap
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 12
    assert "the loop failed (RuntimeError: boom 1); restarting in" in failures[0].getMessage()
    assert failures[0].exc_info is not None and failures[0].exc_info[0] is RuntimeError


async def test_a_loop_that_ran_long_enough_starts_the_backoff_over() -> None:
    now = [0.0]
    sleeps = Sleeps()
    runs = 0

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs == 4:
            now[0] += 61.0  # the fourth run lasts a minute before it fails
        if runs <= 4:
            raise RuntimeError("boom")

    await within(supervise("x", loop, backoff=Backoff(jitter=0.0), sleep=sleeps,
                           clock=lambda: now[0]))
    assert sleeps.delays == pytest.approx([0.1, 0.2, 0.4, 0.1])


async def test_cancelling_stops_a_running_loop_without_calling_it_a_failure(caplog) -> None:
    started = asyncio.Event()
    downs: list[BaseException] = []

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    held: set[asyncio.Task] = set()
    task = spawn(supervise("forever", forever, on_down=downs.append), "forever", held)
    await within(started.wait())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert downs == [] and held == set()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_cancelling_during_the_backoff_stops_it_and_nothing_restarts() -> None:
    sleeps = Sleeps()
    sleeps.block = True
    flaky = Flaky(failures=1)
    ups: list[None] = []
    task = asyncio.get_running_loop().create_task(
        supervise("x", flaky, on_up=lambda: ups.append(None), sleep=sleeps))
    await within(sleeps.waiting.wait())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert flaky.runs == 1 and ups == []


async def test_a_failing_hook_is_logged_and_the_loop_still_restarts(caplog) -> None:
    flaky = Flaky(failures=2)

    def bad_hook(exc: BaseException) -> None:
        raise ValueError("hook bug")

    await within(supervise("x", flaky, on_down=bad_hook, sleep=Sleeps()))
    assert flaky.runs == 3
    assert sum("hook" in r.getMessage() for r in caplog.records) == 2


async def test_a_spawned_task_is_held_until_it_ends_and_its_failure_logged(caplog) -> None:
    held: set[asyncio.Task] = set()
    go = asyncio.Event()

    async def fails() -> None:
        await go.wait()
        raise KeyError("lost")

    task = spawn(fails(), "apply the config file", held)
    del task
    gc.collect()
    assert len(held) == 1  # held: not collected while it waits
    go.set()
    await within(asyncio.gather(*held, return_exceptions=True))  # its callbacks ran first
    assert held == set()
    [record] = [r for r in caplog.records if r.name == "edgelb.control.tasks"]
    assert record.levelno == logging.ERROR
    assert "'apply the config file' failed: KeyError: 'lost'" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    assert record.exc_info[2] is not None  # with the traceback


async def test_a_cancelled_or_successful_task_is_not_logged(caplog) -> None:
    held: set[asyncio.Task] = set()
    done = spawn(asyncio.sleep(0), "quick", held)
    stuck = spawn(asyncio.Event().wait(), "stuck", held)
    await done
    stuck.cancel()
    await asyncio.gather(stuck, return_exceptions=True)
    assert held == set()
    log_failure(stuck)  # a cancelled task is not a failure, however often asked
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="initial <= maximum"):
        Backoff(initial=5, maximum=1)
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=1.5)
