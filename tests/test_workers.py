"""`workers: N`: one control process and N workers, as users run it (`edgelb run --workers N`
in a subprocess, real sockets on 127.0.0.1); and the pure parts (cores, aggregation)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from httpkit import HOST, Client, eventually, fetch, free_port, ok, slow, tcp_echo_server, within
from prometheus_client import Metric

from edgelb.ops.cli import build_parser
from edgelb.ops.config import ConfigError, parse_config
from edgelb.workers.aggregate import Retired, merge, sum_status
from edgelb.workers.cores import CGROUP_V1, CGROUP_V2, quota_cores, usable_cores

ROOT = Path(__file__).resolve().parent.parent


# -- pure: cores, config, command line ---------------------------------------------------------


def test_auto_is_the_cgroup_quota_rounded_up_else_the_affinity_mask():
    v2 = {CGROUP_V2: "250000 100000\n"}
    assert quota_cores(v2.get) == 3
    assert quota_cores({CGROUP_V2: "max 100000\n"}.get) is None
    v1 = {CGROUP_V1[0]: "50000\n", CGROUP_V1[1]: "100000\n"}
    assert quota_cores(v1.get) == 1
    assert quota_cores({CGROUP_V1[0]: "-1\n", CGROUP_V1[1]: "100000\n"}.get) is None
    assert quota_cores({}.get) is None
    assert usable_cores(v2.get, affinity=lambda: 16) == 3
    assert usable_cores(v2.get, affinity=lambda: 2) == 2  # the quota never adds cores
    assert usable_cores({}.get, affinity=lambda: 8) == 8
    assert usable_cores() >= 1


def test_workers_key_and_option():
    assert parse_config(b"services: []").workers == 1
    assert parse_config(b"workers: 4").workers == 4
    assert parse_config(b"workers: auto").workers == "auto"
    for bad in (b"workers: 0", b"workers: two", b"workers: true"):
        with pytest.raises(ConfigError, match="workers: expected a count"):
            parse_config(bad)
    args = build_parser().parse_args(["run", "-c", "x.yaml", "--workers", "auto"])
    assert args.workers == "auto"
    assert build_parser().parse_args(["run", "-c", "x.yaml", "--workers", "3"]).workers == 3


# -- pure: aggregation -------------------------------------------------------------------------


def _counter(value: float, backend: str = "b1") -> tuple:
    return ("edgelb_requests", "counter", "doc",
            [("edgelb_requests_total", {"service": "web", "backend": backend}, value)])


def _gauge(name: str, value: float) -> tuple:
    return (name, "gauge", "doc", [(name, {"service": "web"}, value)])


def _values(metrics: list[Metric]) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in metrics for s in m.samples}


def test_counters_add_up_and_a_dead_workers_are_kept():
    reloads = Metric("edgelb_config_reloads", "doc", "counter")
    reloads.add_sample("edgelb_config_reloads_total", {"watcher": "file", "result": "ok"}, 1)
    ours = Metric("edgelb_requests", "doc", "counter")  # control's own: no traffic, dropped
    ours.add_sample("edgelb_requests_total", {"service": "web", "backend": "b1"}, 0)
    workers = [
        [_counter(5), _gauge("edgelb_backend_inflight", 2), _gauge("edgelb_backend_weight", 1)],
        [_counter(7), _gauge("edgelb_backend_inflight", 3), _gauge("edgelb_backend_weight", 4)],
    ]
    retired = Retired()
    got = _values(merge([reloads, ours], workers, retired))
    web = (("service", "web"),)
    assert got[("edgelb_requests_total", (("backend", "b1"), ("service", "web")))] == 12
    assert got[("edgelb_backend_inflight", web)] == 5  # a sum
    assert got[("edgelb_backend_weight", web)] == 4  # not a sum: the highest
    assert got[("edgelb_config_reloads_total", (("result", "ok"), ("watcher", "file")))] == 1
    retired.add(workers[0])  # worker 0 died; its replacement starts from zero
    got = _values(merge([], [[_counter(0)], workers[1]], retired))
    assert got[("edgelb_requests_total", (("backend", "b1"), ("service", "web")))] == 12
    assert ("edgelb_backend_inflight", web) in got and got[("edgelb_backend_inflight", web)] == 3


def test_status_sums_traffic_over_workers():
    control = {"services": [{"name": "web", "requests": 0, "responses": {},
                             "backends": [{"key": "b1", "inflight": 0, "requests": 0,
                                           "responses": {}, "failures": 0, "unsolicited": 0,
                                           "ejections": 0, "connections": {"open": 0},
                                           "bytes": {"in": 0}, "latency": 0.1}]}],
               "listeners": [{"address": "127.0.0.1:1", "accepted": 0, "connections": 0}],
               "local_responses": {}, "watchers": ["control's"]}
    worker = {"services": [{"name": "web", "requests": 3, "responses": {"200": 3},
                            "backends": [{"key": "b1", "inflight": 1, "requests": 3,
                                          "responses": {"200": 3}, "failures": 0,
                                          "unsolicited": 0, "ejections": 0,
                                          "connections": {"open": 1}, "bytes": {"in": 10},
                                          "latency": 0.5}]}],
              "listeners": [{"address": "127.0.0.1:1", "accepted": 2, "connections": 1}],
              "local_responses": {"404": 1}}
    doc = sum_status(control, [worker, worker])
    svc = doc["services"][0]
    assert svc["requests"] == 6 and svc["responses"] == {"200": 6}
    b = svc["backends"][0]
    assert b["requests"] == 6 and b["connections"] == {"open": 2} and b["latency"] == 0.1
    assert doc["listeners"][0]["accepted"] == 4 and doc["local_responses"] == {"404": 2}
    assert doc["watchers"] == ["control's"]


# -- the process group -------------------------------------------------------------------------


def _edgelb() -> list[str]:
    """The installed `edgelb` command (beside this interpreter), else `python -m edgelb`."""
    script = Path(sys.executable).parent / "edgelb"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgelb"]


class Group:
    def __init__(self, proc: asyncio.subprocess.Process, admin: int, path: Path) -> None:
        self.proc = proc
        self.admin = admin
        self.path = path

    async def json(self, target: str) -> dict:
        r = await within(fetch(self.admin, "GET", target))
        assert r.status == 200, r.body
        return json.loads(r.body)

    async def metrics(self) -> str:
        r = await within(fetch(self.admin, "GET", "/metrics"))
        assert r.status == 200
        return r.body.decode()

    async def workers(self) -> list[dict]:
        return (await self.json("/status.json"))["workers"]


def _config(admin: int, entry: int, web: int, tcp: int, backend: int, echo: int,
            workers: int | None = None, grace: str = "5s") -> str:
    return "\n".join([
        f"admin: {{listen: {HOST}:{admin}}}",
        f"shutdown: {{delay: 0s, grace: {grace}}}",
        *([f"workers: {workers}"] if workers is not None else []),
        f"entrypoints: {{main: {{listen: {HOST}:{entry}}}}}",
        "services:",
        f"  - {{name: web, listen: {HOST}:{web}, hosts: [web.test],",
        f"     backends: [{{address: {HOST}:{backend}}}]}}",
        f"  - {{name: echo, mode: tcp, listen: {HOST}:{tcp},",
        f"     backends: [{{address: {HOST}:{echo}}}]}}",
        "",
    ])


@asynccontextmanager
async def running(tmp_path: Path, text: str, *args: str) -> AsyncIterator[Group]:
    path = tmp_path / "edgelb.yaml"
    path.write_text(text)
    admin = int(text.split(f"{HOST}:", 1)[1].split("}", 1)[0])
    proc = await asyncio.create_subprocess_exec(
        *_edgelb(), "run", "-c", str(path), *args, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    lines: list[bytes] = []

    async def started() -> None:
        while True:
            line = await proc.stderr.readline()  # type: ignore[union-attr]
            assert line, b"edgelb exited before it was running: " + b"".join(lines)
            lines.append(line)
            if b"edgelb running with" in line:
                return

    group = Group(proc, admin, path)
    drain = None
    try:
        await within(started(), 30)
        drain = asyncio.ensure_future(_drain_stderr(proc))
        yield group
    finally:
        pids = []
        if proc.returncode is None:
            try:
                pids = [w["pid"] for w in await group.workers()]
            except Exception:
                pids = []
            proc.send_signal(signal.SIGTERM)
            try:
                await within(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for pid in pids:  # no worker outlives its control process
            await eventually(lambda pid=pid: not _alive(pid), 10, f"worker {pid} exited")
        if drain is not None:
            drain.cancel()


async def _drain_stderr(proc: asyncio.subprocess.Process) -> None:
    while await proc.stderr.readline():  # type: ignore[union-attr]
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _ports(backend):
    b = await backend("b", ok(b"hello"))
    server, echo = await tcp_echo_server()
    return b, server, echo, [free_port() for _ in range(4)]


async def _echo(port: int) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"ping")
    data = await reader.readexactly(4)
    writer.close()
    return data


@pytest.mark.parametrize("n", [2, 4])
async def test_every_worker_serves_on_every_listener(n, backend, tmp_path):
    b, server, echo, (admin, entry, web, tcp) = await _ports(backend)
    text = _config(admin, entry, web, tcp, b.port, echo)
    async with running(tmp_path, text, "--workers", str(n)) as group:
        workers = await group.workers()
        assert len(workers) == n and all(w["up"] for w in workers)
        assert len({w["pid"] for w in workers}) == n
        for _ in range(12 * n):  # a fresh connection each: the kernel spreads them
            assert (await within(fetch(web, "GET", "/"))).body == b"hello"
            r = await within(fetch(entry, "GET", "/", host="web.test"))
            assert r.body == b"hello"
            assert await within(_echo(tcp)) == b"ping"
        for w in range(n):
            own = await group.json(f"/status.json?worker={w}")
            assert own["worker"]["index"] == w
            accepted = {lst["address"]: lst["accepted"] for lst in own["listeners"]}
            assert set(accepted) == {f"{HOST}:{p}" for p in (entry, web, tcp)}
            assert all(count > 0 for count in accepted.values()), (w, accepted)
        total = await group.json("/status.json")
        assert sum(lst["accepted"] for lst in total["listeners"]) == 3 * 12 * n
        missing = await within(fetch(group.admin, "GET", f"/status.json?worker={n}"))
        assert missing.status == 404 and b"workers are 0.." in missing.body

        async def web_requests() -> int:  # the static port's and the entrypoint's
            doc = await group.json("/status.json")
            return next(s for s in doc["services"] if s["name"] == "web")["requests"]

        # (a request is counted as its exchange ends, a moment after the client has it all)
        await until(web_requests, 2 * 12 * n)
        page = await within(fetch(group.admin, "GET", "/status"))
        assert page.status == 200 and b"web" in page.body
    server.close()


class Load:
    """Keep-alive clients sending requests back to back; counts answers and failures."""

    def __init__(self, port: int, clients: int, host: str = "web.test") -> None:
        self.port = port
        self.host = host
        self.ok = 0
        self.failed: list[int] = [0] * clients  # per client
        self.bodies: set[bytes] = set()
        self.why: list = []  # (client, what went wrong, when)
        self.stop = asyncio.Event()
        self.tasks = [asyncio.ensure_future(self._client(i)) for i in range(clients)]

    async def _client(self, i: int) -> None:
        client = None
        while not self.stop.is_set():
            try:
                if client is None:
                    client = await within(Client.open(self.port))
                r = await within(client.request("GET", "/", host=self.host))
                if r.status == 200:
                    self.ok += 1
                    self.bodies.add(r.body)
                    continue
                self.failed[i] += 1
                self.why.append((i, r.status, asyncio.get_running_loop().time()))
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
                self.failed[i] += 1
                self.why.append((i, repr(e), asyncio.get_running_loop().time()))
            if client is not None:
                client.close()
            client = None
        if client is not None:
            client.close()

    async def finish(self) -> None:
        self.stop.set()
        await within(asyncio.gather(*self.tasks), 10)


async def test_a_config_change_under_load_reaches_every_worker_without_a_failed_request(
        backend, tmp_path):
    b, server, echo, (admin, entry, web, tcp) = await _ports(backend)
    b2 = await backend("b2", ok(b"changed"))
    text = _config(admin, entry, web, tcp, b.port, echo, workers=2)
    async with running(tmp_path, text) as group:
        load = Load(entry, 16)
        await eventually(lambda: load.ok > 200, 10, "load flowing")
        group.path.write_text(text.replace(f"{HOST}:{b.port}", f"{HOST}:{b2.port}"))

        async def everywhere() -> bool:
            for w in range(2):
                own = await group.json(f"/status.json?worker={w}")
                web_svc = next(s for s in own["services"] if s["name"] == "web")
                if [x["port"] for x in web_svc["backends"] if not x["draining"]] != [b2.port]:
                    return False
            return True

        deadline = asyncio.get_running_loop().time() + 10
        while not await everywhere():
            assert asyncio.get_running_loop().time() < deadline, "the change did not reach all"
            await asyncio.sleep(0.05)
        seen = load.ok
        await eventually(lambda: load.ok > seen + 200, 10, "load after the change")
        pids = [w["pid"] for w in await group.workers()]
        group.proc.send_signal(signal.SIGHUP)  # a reload in control (the same config)
        os.kill(pids[0], signal.SIGHUP)  # e.g. a terminal's hangup reaching the whole group
        seen = load.ok
        await eventually(lambda: load.ok > seen + 200, 10, "load after SIGHUP")
        assert [w["pid"] for w in await group.workers()] == pids  # nobody restarted
        await load.finish()
        assert sum(load.failed) == 0
        assert b"changed" in load.bodies
        assert len(b2.requests) > 0
    server.close()


async def test_sigkill_of_a_worker_loses_only_its_own_connections_and_it_comes_back(
        backend, tmp_path):
    b = await backend("b", slow(0.02, b"hello"))
    server, echo = await tcp_echo_server()
    admin, entry, web, tcp = (free_port() for _ in range(4))
    text = _config(admin, entry, web, tcp, b.port, echo, workers=2)
    async with running(tmp_path, text) as group:
        load = Load(entry, 12)
        await eventually(lambda: load.ok > 100, 10, "load flowing")
        before = _requests_total(await group.metrics())
        victim = await group.json("/status.json?worker=0")
        on_victim = sum(lst["connections"] for lst in victim["listeners"])
        assert 0 < on_victim < 12  # (12 connections spread over two workers)
        pid = victim["worker"]["pid"]
        os.kill(pid, signal.SIGKILL)
        started = asyncio.get_running_loop().time()

        async def back() -> bool:
            workers = await group.workers()
            return workers[0]["up"] and workers[0]["pid"] != pid

        while not await back():
            assert asyncio.get_running_loop().time() - started < 3, "worker 0 not replaced"
            await asyncio.sleep(0.02)
        seen = load.ok
        await eventually(lambda: load.ok > seen + 100, 10, "load after the kill")
        await load.finish()
        # only the clients on the killed worker saw failures: their connection (and the
        # request on it) was lost, and a reconnect that raced into the dying worker's listening
        # socket before the kernel closed it was reset too (SO_REUSEPORT: a closing
        # listener's queue is not handed over); nothing failed once it was gone
        assert sum(1 for f in load.failed if f) == on_victim, load.why
        assert all(what.startswith(("ConnectionResetError", "IncompleteReadError"))
                   for _, what, _ in load.why), load.why
        assert all(when - started < 0.5 for _, _, when in load.why), load.why
        workers = await group.workers()
        assert workers[0]["restarts"] == 1 and workers[1]["restarts"] == 0
        text = await group.metrics()
        assert _requests_total(text) >= before  # the dead worker's counts are kept
        assert 'edgelb_worker_restarts_total{worker="0"} 1.0' in text
    server.close()


def _requests_total(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("edgelb_requests_total{") and 'service="web"' in line)


async def test_sigterm_drains_every_worker(backend, tmp_path):
    b = await backend("b", slow(0.6, b"finished"))
    server, echo = await tcp_echo_server()
    admin, entry, web, tcp = (free_port() for _ in range(4))
    text = _config(admin, entry, web, tcp, b.port, echo, workers=2)
    async with running(tmp_path, text) as group:
        pids = [w["pid"] for w in await group.workers()]
        clients = [await within(Client.open(web)) for _ in range(16)]
        for client in clients:
            await client.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        await within(b.wait_requests(16))
        busy = [sum(lst["connections"] for lst in
                    (await group.json(f"/status.json?worker={w}"))["listeners"])
                for w in range(2)]
        assert all(n > 0 for n in busy)  # both workers hold requests in flight
        group.proc.send_signal(signal.SIGTERM)
        for client in clients:
            r = await within(client.response())
            assert r.status == 200 and r.body == b"finished"
            client.close()
        assert await within(group.proc.wait(), 10) == 0
        for pid in pids:
            await eventually(lambda pid=pid: not _alive(pid), 5, f"worker {pid} exited")
        with pytest.raises(OSError):  # no worker listens any more
            await within(Client.open(web))
    server.close()


async def test_workers_drain_and_exit_when_control_is_killed(backend, tmp_path):
    b, server, echo, (admin, entry, web, tcp) = await _ports(backend)
    text = _config(admin, entry, web, tcp, b.port, echo, workers=2, grace="1s")
    async with running(tmp_path, text) as group:
        pids = [w["pid"] for w in await group.workers()]
        group.proc.kill()
        await group.proc.wait()
        for pid in pids:  # the channel's end tells them: no orphan keeps the ports
            await eventually(lambda pid=pid: not _alive(pid), 10, f"worker {pid} exited")
        with pytest.raises(OSError):
            await within(Client.open(web))
    server.close()


async def test_metrics_count_the_traffic_sent_across_workers(backend, tmp_path):
    b, server, echo, (admin, entry, web, tcp) = await _ports(backend)
    text = _config(admin, entry, web, tcp, b.port, echo, workers=2)
    async with running(tmp_path, text) as group:
        for _ in range(30):
            assert (await within(fetch(web, "GET", "/"))).status == 200
        keep = await within(Client.open(web))
        for _ in range(20):
            assert (await within(keep.request("GET", "/"))).status == 200
        keep.close()
        for _ in range(5):
            assert await within(_echo(tcp)) == b"ping"
        async def requests_total() -> float:
            return _requests_total(await group.metrics())

        await until(requests_total, 50)
        text = await group.metrics()
        assert _requests_total(text) == 50
        accepted = f'edgelb_listener_accepted_total{{kind="http",listener="{HOST}:{web}"}}'
        assert _sample(text, accepted) == 31
        assert _sample(text, 'edgelb_tcp_connections_total{service="echo"}') == 5
        assert _sample(text, 'edgelb_config_reloads_total{result="ok",watcher="file"}') == 1
        assert _sample(text, 'edgelb_workers') == 2
        per_worker = [await group.json(f"/status.json?worker={w}") for w in range(2)]
        served = [next(s for s in d["services"] if s["name"] == "web")["requests"]
                  for d in per_worker]
        assert sum(served) == 50 and all(n > 0 for n in served)
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool (Debian's prometheus package) is missing")
        out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    server.close()


async def until(read, expected, timeout: float = 5.0) -> None:
    """Poll an async reading until it equals `expected`; fail with the last value after
    `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (value := await read()) != expected:
        assert loop.time() < deadline, f"{value} != {expected} after {timeout:g}s"
        await asyncio.sleep(0.02)


def _sample(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {prefix} in /metrics")


# -- the shared load table's wiring (a stand-in for edgelb.workers.shared_load:
# these check when control calls it, not what it does) -----------------------------


class _Table:
    def __init__(self, log: list, slots: int = 100) -> None:
        self.log = log
        self.slots = slots

    def assign(self, keys) -> None:
        keys = sorted(set(keys))
        if len(keys) > self.slots:  # as shared_load.SlotsExhausted (a ValueError)
            raise ValueError(f"the shared load table has {self.slots} slots and this snapshot "
                             f"needs {len(keys)} backend keys")
        self.log.append(("assign", keys))

    def reset_worker(self, worker: int) -> None:
        self.log.append(("reset", worker))


class _Channel:
    def __init__(self, log: list) -> None:
        self.log = log

    def send(self, message) -> bool:
        self.log.append(("send", type(message).__name__))
        return True


async def test_backend_keys_get_their_slots_before_a_snapshot_reaches_a_worker():
    from edgelb.control.runtime import SnapshotError
    from edgelb.workers.control import ControlRuntime, WorkerGroup
    from edgelb.workers.messages import Apply
    from watchers.model import Backend, Service, Snapshot

    calls: list = []
    table = _Table(calls, slots=2)
    runtime = ControlRuntime(on_apply=lambda m: group.send_all(m), on_health=lambda m: None,
                             assign=table.assign, loop=asyncio.get_running_loop())
    group = WorkerGroup(2, runtime, init=lambda i: None, per_backend=lambda: True,
                        shared=table)
    for slot in group.slots:
        slot.channel = _Channel(calls)
    snapshot = Snapshot("file", services=(
        Service("a", backends=(Backend(HOST, 1001), Backend(HOST, 1002))),
        Service("b", backends=(Backend(HOST, 1002),))))
    await runtime.apply(snapshot)
    assert calls == [("assign", [f"{HOST}:1001", f"{HOST}:1002"]),
                     ("send", Apply.__name__), ("send", Apply.__name__)]
    calls.clear()
    bigger = Snapshot("file", services=(
        Service("a", backends=tuple(Backend(HOST, p) for p in (1001, 1002, 1003))),))
    with pytest.raises(SnapshotError, match="2 slots"):  # rejected whole, sent nowhere
        await runtime.apply(bigger)
    assert calls == [("assign", [f"{HOST}:1001", f"{HOST}:1002"])]  # the live keys again
    assert len(runtime.services["a"].pool.backends) == 2
    calls.clear()

    async def spawn_stub(slot) -> None:
        calls.append(("spawn", slot.index))

    group._spawn = spawn_stub  # type: ignore[method-assign]
    await group._replace(group.slots[1], None)
    assert calls == [("reset", 1), ("spawn", 1)]  # a dead worker's cells zeroed first


def test_the_status_pages_rates_read_the_workers_counters():
    from types import SimpleNamespace

    from edgelb.ops.history import Counters
    from edgelb.workers.control import WorkerGroup

    def families(ok: float, failed: float, count: float, total: float) -> list:
        return [("edgelb_requests", "counter", "doc", [
                    ("edgelb_requests_total", {"service": "web", "code_class": "2xx"}, ok),
                    ("edgelb_requests_total", {"service": "web", "code_class": "5xx"}, failed)]),
                ("edgelb_request_duration_seconds", "histogram", "doc", [
                    ("edgelb_request_duration_seconds_count", {"service": "web"}, count),
                    ("edgelb_request_duration_seconds_sum", {"service": "web"}, total)])]

    runtime = SimpleNamespace(services={"web": None, "idle": None})
    group = WorkerGroup(2, runtime, init=lambda i: None, per_backend=lambda: True)
    group.slots[0].metrics = families(10, 1, 11, 1.5)
    group.slots[1].metrics = families(4, 0, 4, 0.5)
    group.retired.add(families(3, 3, 6, 1.0))  # a worker that died
    assert dict(group.service_counters()) == {"web": Counters(21, 4, 21, 3.0),
                                             "idle": Counters(0, 0, 0, 0.0)}


async def test_a_burst_over_the_cap_stays_within_the_group_bound(backend, tmp_path):
    """With the shared load table (edgelb.workers.shared_load), the group admits at most
    max_inflight + workers - 1 requests to a backend at once."""
    open_now = peak = 0

    async def counting(call) -> None:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        await call.read_body()
        await asyncio.sleep(0.2)
        open_now -= 1
        await call.respond(200, b"ok")

    b = await backend("b", counting)
    server, echo = await tcp_echo_server()
    admin, entry, web, tcp = (free_port() for _ in range(4))
    text = _config(admin, entry, web, tcp, b.port, echo, workers=2).replace(
        f"listen: {HOST}:{web}, hosts", f"listen: {HOST}:{web}, max_inflight: 2, "
        "queue_timeout: 10s, hosts")
    async with running(tmp_path, text) as group:
        per_worker = await group.workers()
        assert all(w["up"] for w in per_worker)
        answers = await within(asyncio.gather(*(fetch(web, "GET", "/") for _ in range(16))), 20)
        assert [r.status for r in answers] == [200] * 16
        assert peak <= 2 + 2 - 1, peak
    server.close()


async def test_a_worker_that_cannot_apply_what_control_accepted_says_so(caplog):
    """A worker's runtime rejecting a snapshot (control accepted it: e.g. a bind that failed
    only there) keeps its last good state and tells control, which logs and counts it."""
    import socket

    from edgelb.workers.aggregate import group_families
    from edgelb.workers.control import WorkerGroup
    from edgelb.workers.messages import Apply, Init, Refused
    from edgelb.workers.worker import Worker
    from watchers.model import Address, Backend, Route, Service, Snapshot

    ours, theirs = socket.socketpair()
    worker = Worker(theirs)
    sent: list = []
    worker._init(Init(0, Address(HOST, free_port())))
    worker.channel = type("Capture", (), {"send": lambda self, m: sent.append(m)})()
    try:
        good = Snapshot("file", services=(Service("web", backends=(Backend(HOST, 9),)),))
        await worker._handle(Apply(good))
        bad = Snapshot("file", services=good.services,
                       routes=(Route("x.example.com", "/", "missing"),))
        await worker._handle(Apply(bad))
        assert [type(m) for m in sent] == [Refused]
        assert sent[0].source == "file" and "missing" in " ".join(sent[0].errors)
        assert set(worker.runtime.services) == {"web"}  # the last good state kept
    finally:
        await worker.runtime.shutdown(0.1)
        ours.close()
        theirs.close()
    group = WorkerGroup(1, worker.runtime, init=lambda i: None, per_backend=lambda: True)
    group._received(group.slots[0], sent[0])
    assert "worker 0 could not apply the file configuration" in caplog.text
    samples = {s.name: s.value for m in group_families(group.slots) for s in m.samples}
    assert samples["edgelb_worker_refusals_total"] == 1.0


def _limits_config(admin: int, entry: int, web: int, held: int) -> str:
    return "\n".join([
        f"admin: {{listen: {HOST}:{admin}}}",
        "shutdown: {delay: 0s, grace: 5s}",
        "workers: 2",
        f"entrypoints: {{main: {{listen: {HOST}:{entry}}}}}",
        "services:",
        f"  - {{name: web, backends: [{{address: {HOST}:{web}}}]}}",
        f"  - {{name: held, backends: [{{address: {HOST}:{held}}}]}}",
        "routes:",
        "  - {hosts: [rate.test], filters: {limits: {rps: 0.2, burst: 10}}, backends: [web]}",
        "  - {hosts: [conn.test], filters: {limits: {connections: 2}}, backends: [held]}",
        "",
    ])


async def test_a_routes_per_client_limits_hold_for_the_group(backend, tmp_path):
    """With the shared limits table (edgelb.workers.shared_limits), one client's short
    connections spread over both workers get the route's `rps` burst and `connections` once,
    within the stated bound (W - 1 = 1 over), not once per worker."""
    web = await backend("web", ok(b"hello"))
    arrived = 0
    release = asyncio.Event()

    async def holding(call) -> None:
        nonlocal arrived
        arrived += 1
        await release.wait()
        await call.respond(200, b"done")

    held = await backend("held", holding)
    admin, entry = free_port(), free_port()
    async with running(tmp_path, _limits_config(admin, entry, web.port, held.port)) as group:
        assert all(w["up"] for w in await group.workers())
        loop = asyncio.get_running_loop()
        # rps: 60 requests, each on a fresh connection (the kernel spreads them)
        started = loop.time()
        answers = await within(asyncio.gather(
            *(fetch(entry, "GET", "/", host="rate.test") for _ in range(60))), 20)
        elapsed = loop.time() - started
        admitted = [r for r in answers if r.status == 200]
        refused = [r for r in answers if r.status != 200]
        assert 10 <= len(admitted) <= 10 + 0.2 * elapsed + 1, (len(admitted), elapsed)
        assert {r.status for r in refused} == {429}
        assert all(int(r.get("retry-after") or 0) >= 1 for r in refused)
        # connections: 8 at once, held by the backend until the refused ones are answered
        tasks = [asyncio.ensure_future(fetch(entry, "GET", "/", host="conn.test"))
                 for _ in range(8)]
        await eventually(lambda: arrived + sum(t.done() for t in tasks) == 8, 10,
                         "every request held or refused")
        assert 2 <= arrived <= 2 + 1, arrived
        release.set()
        statuses = sorted(r.status for r in await within(asyncio.gather(*tasks), 10))
        assert statuses == [200] * arrived + [429] * (8 - arrived)
        for w in range(2):  # both workers took part
            own = await group.json(f"/status.json?worker={w}")
            assert sum(lst["accepted"] for lst in own["listeners"]) > 0, w


async def test_a_dead_workers_client_slots_are_given_back(backend, tmp_path):
    """A worker killed while it held requests of a client under `connections`: control zeroes
    its cells before the replacement starts, so the client has those slots again."""
    arrived = 0
    release = asyncio.Event()

    async def holding(call) -> None:
        nonlocal arrived
        arrived += 1
        await release.wait()
        await call.respond(200, b"done")

    held = await backend("held", holding)
    admin, entry = free_port(), free_port()
    async with running(tmp_path, _limits_config(admin, entry, held.port, held.port)) as group:
        assert all(w["up"] for w in await group.workers())
        first = [asyncio.ensure_future(fetch(entry, "GET", "/", host="conn.test"))
                 for _ in range(2)]
        await eventually(lambda: arrived == 2, 10, "two requests held")
        on = [sum(lst["connections"] for lst in
                  (await group.json(f"/status.json?worker={w}"))["listeners"])
              for w in range(2)]
        victim = on.index(max(on))  # the worker with most of them (1 or 2)
        pid = (await group.json(f"/status.json?worker={victim}"))["worker"]["pid"]
        os.kill(pid, signal.SIGKILL)

        async def back() -> bool:
            w = (await group.workers())[victim]
            return w["up"] and w["pid"] != pid

        started = asyncio.get_running_loop().time()
        while not await back():
            assert asyncio.get_running_loop().time() - started < 5, "worker not replaced"
            await asyncio.sleep(0.02)
        more = [asyncio.ensure_future(fetch(entry, "GET", "/", host="conn.test"))
                for _ in range(4)]
        await eventually(lambda: arrived - 2 + sum(t.done() for t in more) == 4, 10,
                         "every new request held or refused")
        # the slots the dead worker held are free (the other's still count), within the bound
        assert on[victim] <= arrived - 2 <= on[victim] + 1, (on, arrived)
        release.set()
        await asyncio.gather(*first, *more, return_exceptions=True)
