"""The control process of `workers: N` (N > 1): the one that runs the watchers, the health
checks, the admin endpoint and leader election, and N worker processes that serve.

`ControlRuntime` is the single process's `Runtime` (the same validate, plan, bind and commit:
a snapshot it rejects never reaches a worker) with two differences: its listeners are
`Reservation`s, which hold each port (bound with SO_REUSEPORT, never listening: the kernel
gives connections only to the workers' listening sockets, and the port stays ours even when
every worker is dead), and whatever it accepted (snapshots, health verdicts) is handed on.

`WorkerGroup` starts the workers (spawned: a fresh interpreter, `python -m
edgelb.workers.worker`, never a fork of a process whose event loop runs), sends each the
state so far and then every accepted snapshot and verdict in order, replaces one that dies at
once (the replacement is sent the state again before it serves), asks them for metrics and
status, and drains them on SIGTERM."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from edgelb.control.runtime import Runtime, SnapshotError
from edgelb.control.tasks import spawn
from edgelb.net.accept import bind, share_ports
from edgelb.ops.history import Counters
from edgelb.ops.metrics import RuntimeCollector
from edgelb.workers.aggregate import Retired, group_families, merge, sum_status
from edgelb.workers.channel import Channel, open_channel
from edgelb.workers.load import backend_keys
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
from watchers.model import Address, Notice, Snapshot

log = logging.getLogger("edgelb.workers")

ASK_TIMEOUT = 2.0  # seconds a worker gets to answer a scrape (else its last answer is used)
POLL_INTERVAL = 1.0  # seconds between metric polls (what a worker that dies had counted)
START_TIMEOUT = 30.0  # seconds the workers get to serve at start
EXIT_MARGIN = 5.0  # seconds past delay + grace before a draining worker is killed
QUICK_DEATH = 2.0  # seconds: a worker that dies sooner after its start died "as it started"
MAX_BACKOFF = 10.0  # seconds between starts of a worker that keeps dying as it starts
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class Reservation:
    """Control's stand-in for a listener: the port held, nothing accepted (see the module).
    It has the attributes the runtime and the admin endpoint use of a listener."""

    def __init__(self, kind: str, name: str, address: Address, loop: asyncio.AbstractEventLoop,
                 tls: bool) -> None:
        self.kind = kind.removesuffix("-tls")
        self.ssl: Any = True if tls else None  # only its presence is read (_listener_kind)
        self.name = name
        self.address = address
        self.loop = loop
        self.service: Any = None
        self.router: Any = None
        self.services: Any = None
        self.defaults: Any = None
        self.sni_table: Any = None
        self.telemetry: Any = None
        self.closing = False
        self.accepted = 0
        self.connections = 0
        self.clients: tuple[()] = ()
        self.relay = None
        self._socks: list[socket.socket] = []

    async def start(self, serve: bool = True) -> None:
        self._socks = await bind(self.loop, self.address.host, self.address.port,
                                 f"{self.kind} {self.name}", listen=False)

    async def serve(self) -> None:
        pass

    def set_accept_proxy(self, accept: Any) -> None:
        pass

    def set_limits(self, limits: Any) -> None:
        pass

    def set_passthrough(self, table: Any) -> None:
        self.sni_table = table

    def stop_accepting(self) -> None:
        self.closing = True
        socks, self._socks = self._socks, []
        for sock in socks:
            sock.close()

    async def wait_closed(self, timeout: float) -> None:
        self.stop_accepting()

    def abort(self) -> None:
        self.stop_accepting()


class ControlRuntime(Runtime):
    """The runtime of the control process: validates, plans and commits as the single process
    does, holds the ports, runs the health checks, and hands on what it accepted."""

    def __init__(self, *, on_apply: Callable[[Apply], None],
                 on_health: Callable[[HealthResult], None],
                 assign: Callable[[list[str]], None] | None = None, **kwargs: Any) -> None:
        """`assign`: the shared load table's (edgelb.workers.load), given every backend key
        of a snapshot as it is planned; when it raises (more keys than slots), the snapshot
        is rejected like any other."""
        self.on_apply = on_apply
        self.on_health = on_health
        self.assign = assign
        super().__init__(**kwargs)

    def _plan(self, snapshots: dict[str, Snapshot], settings: Any, reload_files: bool) -> Any:
        plan = super()._plan(snapshots, settings, reload_files)
        if self.assign is not None:  # before the bind: a rejection changes nothing
            try:
                self.assign([b.key for svc in plan.services for b in svc.backends])
            except ValueError as e:  # shared_load.SlotsExhausted
                raise SnapshotError([str(e)]) from e
        return plan

    async def _apply(self, snapshot: Snapshot, *, record: bool, reload_files: bool = False,
                     record_as: str | None = None) -> tuple[Notice, ...]:
        """The one path of `apply` and `set_entrypoints`, under the runtime's lock: what it
        committed is handed on before the next snapshot is looked at, so the workers get the
        snapshots in the order they applied here; a rejected one raises and goes nowhere."""
        try:
            notices = await super()._apply(snapshot, record=record, reload_files=reload_files,
                                           record_as=record_as)
        except SnapshotError:
            if self.assign is not None:  # planned, then a port failed: the live keys again
                self.assign(backend_keys(self))
            raise
        self.on_apply(Apply(snapshot, reload_files, record_as))
        return notices

    def _make_listener(self, kind: str, name: str, addr: Address, store: Any = None) -> Any:
        return Reservation(kind, name, addr, self.loop, store is not None)

    def _on_health(self, service: str, key: str, healthy: bool, announce: bool = True) -> None:
        super()._on_health(service, key, healthy, announce)
        self.on_health(HealthResult(service, key, healthy, self.health.status(service, key)))

    def verdicts(self) -> list[HealthResult]:
        """The health checks' verdicts now, for a worker that starts."""
        out = []
        for name, state in self.services.items():
            if state.policy.health_check is None:
                continue
            for b in state.pool.backends:
                healthy = self.health.healthy(name, b.key)
                if healthy is not None:
                    out.append(HealthResult(name, b.key, healthy, self.health.status(name, b.key)))
        return out


class WorkerSlot:
    """One of the N places a worker process fills; a replacement takes the same slot."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Channel | None = None
        self.up = False  # serving: it applied the state it was sent at start
        self.quick_deaths = 0  # deaths in a row within QUICK_DEATH of the start
        self.restarts = 0
        self.refusals = 0  # snapshots control accepted that it could not apply
        self.started_at = 0.0
        self.metrics: list[Any] = []  # its last answer to a metrics question
        self.cpu_retired = 0.0  # CPU seconds of its processes that ended

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def cpu_seconds(self) -> float:
        return self.cpu_retired + (_cpu(self.proc.pid) if self.proc is not None else 0.0)


def _cpu(pid: int) -> float:
    """utime + stime of a process, in seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class WorkerGroup:
    def __init__(self, count: int, runtime: Runtime, init: Callable[[int], Init],
                 per_backend: Callable[[], bool], log_args: tuple[str, ...] = (),
                 shared: Any = None, limits: Any = None) -> None:
        """`shared`: the shared load table (edgelb.workers.load.table; None: none);
        `limits`: the shared per-client limits table (edgelb.workers.load.limits_table)."""
        self.count = count
        self.shared = shared
        self.limits = limits
        self.runtime = runtime
        self.init = init
        self.per_backend = per_backend
        self.log_args = log_args
        self.slots = [WorkerSlot(i) for i in range(count)]
        self.retired = Retired()
        self.lost_connections = 0.0
        self.stopping = False
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._all_up = asyncio.Event()

    def signal_all(self, signum: int) -> None:
        """Forward a signal (SIGUSR1: reopen the access log) to every worker."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signum)

    # -- starting and replacing --------------------------------------------------------------

    async def start(self) -> None:
        share_ports(True)
        for slot in self.slots:
            await self._spawn(slot)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self._all_up.wait()  # (a worker that died meanwhile was replaced)
        except TimeoutError:
            raise OSError(f"edgelb workers did not start within {START_TIMEOUT:.0f}s; "
                          "see their log lines above") from None
        spawn(self._poll(), name="worker metrics poll", held=self._tasks)
        log.info("%d workers serving (pids %s)", self.count,
                 ", ".join(str(s.pid) for s in self.slots))

    async def _spawn(self, slot: WorkerSlot) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = [sys.executable, "-m", "edgelb.workers.worker", "--fd", str(theirs.fileno()),
                "--index", str(slot.index), *self.log_args]
        try:
            slot.proc = subprocess.Popen(args, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        slot.started_at = time.time()
        slot.channel = await open_channel(ours, lambda m: self._received(slot, m),
                                          lambda: self._lost(slot))
        # the state so far, then (from the broadcasts) whatever comes next: no await between
        send = slot.channel.send
        send(self.init(slot.index))
        for snapshot in self.runtime.snapshots.values():
            send(Apply(snapshot, False, None))
        verdicts = getattr(self.runtime, "verdicts", None)
        for result in verdicts() if verdicts is not None else ():
            send(result)
        send(Synced())

    def _received(self, slot: WorkerSlot, message: Any) -> None:
        if isinstance(message, Answer):
            future = self._pending.pop(message.id, None)
            if future is not None and not future.done():
                future.set_result(message.value)
        elif isinstance(message, Refused):
            slot.refusals += 1
            log.error("worker %d could not apply the %s configuration control accepted; it "
                      "keeps serving its last good one: %s", message.index, message.source,
                      "; ".join(message.errors))
        elif isinstance(message, Hello):
            slot.up = True
            if all(s.up for s in self.slots):
                self._all_up.set()
            if slot.restarts:
                log.warning("worker %d is back (pid %d)", slot.index, message.pid)

    def _lost(self, slot: WorkerSlot) -> None:
        """The channel ended: the worker died (or stopped reading). Its counters are kept, its
        open connections counted as lost, and it is replaced at once unless draining."""
        proc, slot.proc = slot.proc, None
        slot.up = False
        slot.channel = None
        self.retired.add(slot.metrics)
        self.lost_connections += sum(
            value for name, _, _, samples in slot.metrics if name == "edgelb_listener_connections"
            for _, _, value in samples)
        slot.metrics = []
        if proc is not None:
            slot.cpu_retired += _cpu(proc.pid)
        if self.stopping:
            return
        slot.restarts += 1
        quick = time.time() - slot.started_at < QUICK_DEATH
        slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
        spawn(self._replace(slot, proc), name=f"replace worker {slot.index}", held=self._tasks)

    async def _replace(self, slot: WorkerSlot, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None:
            await _reap(proc)
        # at once; a worker that keeps dying as it starts is started again after a backoff
        backoff = 0.0 if slot.quick_deaths < 2 else min(MAX_BACKOFF,
                                                         0.25 * 2 ** (slot.quick_deaths - 2))
        log.error("worker %d (pid %s) died (%s); replacing it%s", slot.index,
                  proc.pid if proc is not None else "?", _exit_text(proc),
                  f" in {backoff:g}s (it died as it started {slot.quick_deaths} times in a row)"
                  if backoff else "")
        if backoff:
            await asyncio.sleep(backoff)
        if not self.stopping:
            if self.shared is not None:
                self.shared.reset_worker(slot.index)  # what it had in flight ended with it
            if self.limits is not None:
                self.limits.reset_worker(slot.index)  # its clients' requests too
            await self._spawn(slot)

    # -- handing on --------------------------------------------------------------------------

    def send_all(self, message: Any) -> None:
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.send(message)

    # -- questions ---------------------------------------------------------------------------

    async def ask(self, what: str, arg: Any = None) -> dict[int, Any]:
        """Each live worker's answer (a worker that does not answer in time is left out)."""
        loop = asyncio.get_running_loop()
        asked: dict[int, asyncio.Future[Any]] = {}
        for slot in self.slots:
            if slot.channel is not None and slot.up:
                ask_id = next(self._ids)
                future = self._pending[ask_id] = loop.create_future()
                if slot.channel.send(Ask(ask_id, what, arg)):
                    asked[slot.index] = future
                else:
                    self._pending.pop(ask_id, None)
        if asked:
            await asyncio.wait(asked.values(), timeout=ASK_TIMEOUT)
        out = {}
        for index, future in asked.items():
            if future.done():
                out[index] = future.result()
            else:
                future.cancel()
        for ask_id in [i for i, f in self._pending.items() if f.done()]:
            del self._pending[ask_id]
        return out

    async def refresh(self) -> None:
        """Ask every worker for its metrics (a scrape, or the poll)."""
        answers = await self.ask("metrics", self.per_backend())
        for index, families in answers.items():
            if families is not None:
                self.slots[index].metrics = families

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            await self.refresh()

    def registry(self, runtime: Any, per_backend: Callable[[], bool]) -> CollectorRegistry:
        """The admin endpoint's registry: the group's families (`refresh` before a scrape)."""
        registry = CollectorRegistry()
        registry.register(_GroupCollector(self, RuntimeCollector(runtime, per_backend)))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        return registry

    def service_counters(self) -> list[tuple[str, Counters]]:
        """Each service's requests, 5xx and durations summed over the workers (as last
        polled, the dead ones' included): the status page's rates."""
        requests: dict[str, float] = {}
        errors: dict[str, float] = {}
        count: dict[str, float] = {}
        total: dict[str, float] = {}
        for family in merge((), (s.metrics for s in self.slots), self.retired):
            for sample in family.samples:
                svc = sample.labels.get("service", "")
                if sample.name == "edgelb_requests_total":
                    requests[svc] = requests.get(svc, 0.0) + sample.value
                    if sample.labels.get("code_class") == "5xx":
                        errors[svc] = errors.get(svc, 0.0) + sample.value
                elif sample.name == "edgelb_request_duration_seconds_count":
                    count[svc] = count.get(svc, 0.0) + sample.value
                elif sample.name == "edgelb_request_duration_seconds_sum":
                    total[svc] = total.get(svc, 0.0) + sample.value
        return [(name, Counters(int(requests.get(name, 0)), int(errors.get(name, 0)),
                                int(count.get(name, 0)), total.get(name, 0.0)))
                for name in self.runtime.services]

    async def status(self, control: dict[str, Any], worker: str | None) -> dict[str, Any]:
        """/status.json: the group's (control's, traffic summed) with a `workers` list, or one
        worker's own with ?worker=N."""
        answers = await self.ask("status")
        if worker is not None:  # LookupError: the admin endpoint answers 404
            try:
                own = answers[int(worker)]
            except (ValueError, KeyError):
                raise LookupError(f"no worker {worker!r} answered; workers are 0.."
                                  f"{self.count - 1} (see /status.json's workers)") from None
            if own is None:
                raise LookupError(f"worker {worker} has not applied its first snapshot yet")
            return own
        doc = sum_status(control, [d for d in answers.values() if d])
        doc["workers"] = [{"index": s.index, "pid": s.pid, "up": s.up, "restarts": s.restarts,
                           "started_at": s.started_at, "cpu_seconds": s.cpu_seconds(),
                           "answered": s.index in answers} for s in self.slots]
        doc["lost_connections"] = self.lost_connections
        return doc

    # -- the end -----------------------------------------------------------------------------

    async def drain(self, delay: float, grace: float) -> None:
        """Every worker drains as the single process does; a worker still running after
        delay + grace + EXIT_MARGIN is killed."""
        self.stopping = True
        self.send_all(Drain(delay, grace))
        procs = [s.proc for s in self.slots if s.proc is not None]
        loop = asyncio.get_running_loop()
        waits = [loop.run_in_executor(None, p.wait) for p in procs]
        await asyncio.wait(waits, timeout=delay + grace + EXIT_MARGIN)
        for proc in procs:
            if proc.poll() is None:
                log.error("worker pid %d did not exit in time; killing it", proc.pid)
                proc.kill()
        await asyncio.gather(*waits, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for table in (self.shared, self.limits):
            close = getattr(table, "close", None)
            if close is not None:
                close()  # the tables' memory goes with the group


class _GroupCollector:
    def __init__(self, group: WorkerGroup, control: RuntimeCollector) -> None:
        self.group = group
        self.control = control

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        group = self.group
        yield from merge(self.control.collect(), (s.metrics for s in group.slots), group.retired)
        yield from group_families(group.slots)
        from prometheus_client import Metric

        lost = Metric("edgelb_worker_lost_connections",
                      "Client connections open on a worker when it died (as it last reported "
                      "them): lost with it.", "counter")
        lost.add_sample("edgelb_worker_lost_connections_total", {}, group.lost_connections)
        yield lost
        workers = Metric("edgelb_workers", "Worker processes configured (workers:).", "gauge")
        workers.add_sample("edgelb_workers", {}, float(group.count))
        yield workers


async def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a worker whose channel ended; one still running after a moment is killed."""
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, proc.wait), 0.2)
        return
    except TimeoutError:
        pass
    proc.kill()
    await loop.run_in_executor(None, proc.wait)


def _exit_text(proc: subprocess.Popen[bytes] | None) -> str:
    if proc is None:
        return "not started"
    code = proc.poll()
    if code is None:
        return "stopped answering"
    if code < 0:
        return f"signal {-code}"
    return f"exit status {code}"
