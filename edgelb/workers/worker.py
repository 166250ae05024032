"""A data-plane worker process: `python -m edgelb.workers.worker --fd N` (started by control,
edgelb.workers.control, with its end of a socketpair as fd N).

It runs the same `Runtime` as the single process, fed by the channel instead of watchers:
each snapshot control accepted is applied through `Runtime.apply` (the one door), each health
verdict of control's checks through `Runtime.health_changed` (the health door); it runs no
health checks of its own (`RelayedHealth` stands in for the checker). Its listeners bind with
SO_REUSEPORT beside the other workers'. It answers control's questions (metrics, status) at
once, and drains on `Drain` or SIGTERM as the single process does; when control goes away
(the channel ends) it drains too, so a killed control never leaves workers behind."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from collections.abc import Iterable
from typing import Any

from edgelb import __version__
from edgelb.control.runtime import Runtime, SnapshotError
from edgelb.net import accept
from edgelb.workers.channel import MAX_QUEUED, Channel, open_channel
from edgelb.workers.messages import (
    Answer,
    Apply,
    Ask,
    Drain,
    HealthResult,
    Hello,
    Init,
    Refused,
    Synced,
)

log = logging.getLogger("edgelb.workers.worker")


class RelayedHealth:
    """The worker runtime's health checker: the verdicts control's checks reached, as relayed
    (the interface of edgelb.control.health.HealthChecker that the runtime and admin use)."""

    def __init__(self) -> None:
        self.verdicts: dict[tuple[str, str], bool] = {}
        self.statuses: dict[tuple[str, str], dict[str, Any]] = {}

    def sync(self, targets: Any) -> None:
        """Checks run in control; nothing to start here."""

    def healthy(self, service: str, key: str) -> bool | None:
        return self.verdicts.get((service, key))

    def status(self, service: str, key: str) -> dict[str, Any]:
        return self.statuses.get((service, key)) or {}

    def record(self, result: HealthResult) -> None:
        self.verdicts[(result.service, result.key)] = result.healthy
        if result.status is not None:
            self.statuses[(result.service, result.key)] = result.status

    async def close(self) -> None:
        return None


def plain_families(metrics: Iterable[Any]) -> list[tuple[str, str, str, list[Any]]]:
    """prometheus-client metric families as plain picklable tuples:
    (name, type, documentation, [(sample name, labels, value), ...])."""
    return [(m.name, m.type, m.documentation,
             [(s.name, dict(s.labels), float(s.value)) for s in m.samples]) for m in metrics]


class Worker:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.index = -1
        self.runtime: Runtime | None = None
        self.health = RelayedHealth()
        self.telemetry: Any = None
        self.channel: Channel | None = None
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.done = asyncio.Event()
        self._draining = False
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        accept.share_ports(True)
        loop.add_signal_handler(signal.SIGTERM, self._sigterm)
        for sig in (signal.SIGINT, signal.SIGHUP):  # control handles these for the group
            loop.add_signal_handler(sig, lambda: None)
        loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)
        self.channel = await open_channel(self.sock, self._received, self._control_gone)
        handler = loop.create_task(self._handle_all())
        await self.done.wait()
        handler.cancel()
        await asyncio.gather(handler, return_exceptions=True)
        return 0

    # -- messages ----------------------------------------------------------------------------

    def _received(self, message: Any) -> None:
        if isinstance(message, Ask):
            self._answer(message)
            return
        self.queue.put_nowait(message)
        if self.queue.qsize() >= MAX_QUEUED and self.channel is not None:
            self.channel.pause()  # back-pressure: control's write buffer fills, up to its bound

    async def _handle_all(self) -> None:
        while True:
            message = await self.queue.get()
            if self.queue.qsize() < MAX_QUEUED // 2 and self.channel is not None:
                self.channel.resume()
            try:
                await self._handle(message)
            except Exception:
                log.exception("worker %d: handling %s failed", self.index,
                              type(message).__name__)

    async def _handle(self, message: Any) -> None:
        if isinstance(message, Init):
            self._init(message)
        elif isinstance(message, Apply):
            assert self.runtime is not None
            try:
                await self.runtime.apply(message.snapshot, reload_files=message.reload_files,
                                         record_as=message.record_as)
            except SnapshotError as e:  # control accepted it, so a bind failed here
                if self.channel is not None:
                    self.channel.send(Refused(self.index, message.snapshot.source,
                                              tuple(e.errors)))
        elif isinstance(message, HealthResult):
            self.health.record(message)
            if self.runtime is not None:
                self.runtime.health_changed(message.service, message.key, message.healthy,
                                           announce=False)
        elif isinstance(message, Synced):
            assert self.channel is not None
            self.channel.send(Hello(self.index, os.getpid()))
        elif isinstance(message, Drain):
            await self.drain(message.delay, message.grace)

    def _init(self, init: Init) -> None:
        loop = asyncio.get_running_loop()
        self.index = init.index
        runtime = Runtime(loop=loop, reserved=[init.admin])
        runtime.health = self.health  # type: ignore[assignment]
        runtime.serve_after_commit = True  # the group's ports: accept with the state only
        if init.shared_load is not None:
            from edgelb.workers.load import attach

            attach(init.shared_load, init.index, runtime)
        if init.shared_limits is not None:
            from edgelb.workers.load import attach_limits

            attach_limits(init.shared_limits, init.index, runtime)
        if init.telemetry is not None and init.telemetry.active:
            from edgelb.telemetry.hub import Telemetry

            self.telemetry = runtime.telemetry = Telemetry(init.telemetry, __version__)
            self.telemetry.start()
        runtime.start_sweeper()
        self.runtime = runtime

    def _answer(self, ask: Ask) -> None:
        assert self.channel is not None
        runtime = self.runtime
        value: Any = None
        if runtime is not None and ask.what == "metrics":
            from edgelb.ops.metrics import RuntimeCollector

            per_backend = bool(ask.arg) if ask.arg is not None else True
            value = plain_families(RuntimeCollector(runtime, lambda: per_backend).collect())
        elif runtime is not None and ask.what == "status":
            from edgelb.ops.admin import status

            value = status(runtime)
            value["worker"] = {"index": self.index, "pid": os.getpid()}
        self.channel.send(Answer(ask.id, value))

    # -- the end -----------------------------------------------------------------------------

    def _sigterm(self) -> None:
        grace = self.runtime.grace if self.runtime is not None else 30.0
        self._spawn(self.drain(0.0, grace))

    def _control_gone(self) -> None:
        if not self._draining:
            log.error("the control process is gone; draining and exiting")
            self._sigterm()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, delay: float, grace: float) -> None:
        """As the single process's stop: unready, keep-alive clients told to go, wait `delay`,
        stop accepting, let open requests finish up to `grace`."""
        if self._draining:
            return
        self._draining = True
        runtime = self.runtime
        if runtime is not None:
            runtime.draining = True
            for listener in runtime.listeners.values():
                soft = getattr(listener, "soft_drain", None)
                if soft is not None:
                    soft()
            if delay > 0:
                await asyncio.sleep(delay)
            await runtime.shutdown(grace)
        if self.telemetry is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.telemetry.stop)
        self.done.set()

    def _reopen_logs(self) -> None:
        if self.telemetry is not None:
            self.telemetry.reopen()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgelb-worker")
    parser.add_argument("--fd", type=int, required=True, help="this worker's channel")
    parser.add_argument("--index", type=int, default=-1, help="this worker's slot")
    parser.add_argument("--log-level", default=None)
    parser.add_argument("--log-format", default=None)
    args = parser.parse_args(argv)
    from edgelb.ops.logfmt import configure

    configure(args.log_level, args.log_format)  # as control's
    tag = f"[worker {args.index}]"

    def tagged(record: logging.LogRecord) -> bool:  # which worker a line is from
        if not record.name.endswith(tag):
            record.name = f"{record.name}{tag}"
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tagged)
    sock = socket.socket(fileno=args.fd)
    from edgelb.ops.app import _install_uvloop

    _install_uvloop()
    return asyncio.run(Worker(sock).run())


if __name__ == "__main__":
    raise SystemExit(main())
