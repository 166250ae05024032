"""edgelb as a marathon-lb replacement, end to end: `edgelb run -c FILE` as a subprocess (the
repo's examples/marathon.yaml, its ports moved to free ones) following the fake Marathon of
this process, real HTTP backends standing for the tasks, a steady client load."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
import pytest
from httpkit import HOST, eventually, fetch, free_port, within
from marathon_kit import Load, backends, fakes, service_name

from edgelb.ops.fake_marathon import app_definition

pytestmark = [pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "marathon.yaml"
APP = "/shop/web"


def example_config(tmp_path: Path, marathon_url: str, http: int, admin: int) -> Path:
    """examples/marathon.yaml with its ports free and its Marathon URLs the fake's."""
    text = EXAMPLE.read_text()
    for old, new in ((f"{HOST}:8080", f"{HOST}:{http}"), (f"{HOST}:9090", f"{HOST}:{admin}"),
                     (f"http://{HOST}:8180", marathon_url),
                     (f"http://{HOST}:8181", f"http://{HOST}:{free_port()}")):
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "marathon.yaml"
    path.write_text(text + "shutdown: {grace: 1s}\n")
    return path


async def start(path: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgelb", "run", "-c", str(path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=REPO)

    async def running() -> None:
        while True:
            line = await proc.stderr.readline()  # type: ignore[union-attr]
            assert line, "edgelb exited before it was running"
            if b"edgelb running with" in line:
                return

    try:
        await within(running(), 20)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    asyncio.get_running_loop().create_task(_drain(proc))
    return proc


async def _drain(proc: asyncio.subprocess.Process) -> None:
    while await proc.stderr.readline():  # type: ignore[union-attr]
        pass  # keep the pipe from filling


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def admin_get(admin: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(f"http://{HOST}:{admin}{path}") as r:
        return r.status, await r.text()


async def wait_admin(admin: int, path: str, predicate, timeout: float = 10, what: str = ""):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while loop.time() < deadline:
        try:
            last = await admin_get(admin, path)
            if predicate(*last):
                return last
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what or path} did not hold within {timeout}s; last: {last}")


def backend_keys(status: str, service: str) -> dict[str, dict]:
    doc = json.loads(status)
    for svc in doc["services"]:
        if svc["name"] == service:
            return {b["key"]: b for b in svc["backends"]}
    return {}


async def test_the_example_follows_the_fake_and_readyz_waits_for_the_first_read(
        tmp_path: Path) -> None:
    (a,) = await backends("a")
    service_port, http, admin = free_port(), free_port(), free_port()
    async with fakes() as [m]:
        m.put_app(app_definition(APP, service_port, labels={
            "HAPROXY_GROUP": "external", "HAPROXY_0_BIND_ADDR": HOST,
            "HAPROXY_0_VHOST": "shop.example.com"}))
        m.add_task(APP, HOST, a.port)
        await m.refuse()  # Marathon is not there yet
        proc = await start(example_config(tmp_path, m.url, http, admin))
        try:
            status, text = await admin_get(admin, "/readyz")
            assert status == 503 and "marathon" in text
            await m.accept()
            await wait_admin(admin, "/readyz", lambda s, _t: s == 200, what="ready")
            r = await fetch(http, host="shop.example.com")
            assert (r.status, r.body) == (200, b"a")
            assert (await fetch(service_port)).body == b"a"  # its service port too
            _, metrics = await admin_get(admin, "/metrics")
            assert 'edgelb_watcher_up{watcher="marathon"} 1.0' in metrics
            assert 'edgelb_watcher_problems{watcher="marathon"} 0.0' in metrics
            # Marathon gone: still ready and serving (stale), the watcher down
            await m.refuse()
            _, metrics = await wait_admin(
                admin, "/metrics", lambda _s, t: 'edgelb_watcher_up{watcher="marathon"} 0.0' in t,
                what="the watcher down")
            assert (await admin_get(admin, "/readyz"))[0] == 200
            assert (await fetch(http, host="shop.example.com")).body == b"a"
            _, status_json = await admin_get(admin, "/status.json")
            watcher = {w["name"]: w for w in json.loads(status_json)["watchers"]}["marathon"]
            assert watcher["up"] is False and watcher["last_error"]
        finally:
            await stop(proc)
    await a.stop()


async def test_an_unbindable_app_is_reported_in_status_and_metrics(tmp_path: Path) -> None:
    a, b = await backends("a", "b")
    good, http, admin = free_port(), free_port(), free_port()
    async with fakes() as [m]:
        m.put_app(app_definition("/shop/good", good, labels={
            "HAPROXY_GROUP": "external", "HAPROXY_0_BIND_ADDR": HOST}))
        m.add_task("/shop/good", HOST, a.port)
        m.put_app(app_definition("/shop/bad", admin, labels={  # the admin port: taken
            "HAPROXY_GROUP": "external", "HAPROXY_0_BIND_ADDR": HOST}))
        m.add_task("/shop/bad", HOST, b.port)
        proc = await start(example_config(tmp_path, m.url, http, admin))
        try:
            await wait_admin(admin, "/readyz", lambda s, _t: s == 200, what="ready")
            assert (await fetch(good)).body == b"a"
            _, text = await admin_get(admin, "/status.json")
            doc = json.loads(text)
            watcher = {w["name"]: w for w in doc["watchers"]}["marathon"]
            assert watcher["problems"] == 1
            assert any("/shop/bad" in line for line in watcher["problem_details"])
            assert service_name("/shop/bad", admin) not in {s["name"] for s in doc["services"]}
            _, metrics = await admin_get(admin, "/metrics")
            assert 'edgelb_watcher_problems{watcher="marathon"} 1.0' in metrics
        finally:
            await stop(proc)
    for x in (a, b):
        await x.stop()


async def test_a_rolling_deploy_of_every_task_fails_no_request(tmp_path: Path) -> None:
    old = await backends("old-1", "old-2", "old-3")
    new = await backends("new-1", "new-2", "new-3")
    service_port, http, admin = free_port(), free_port(), free_port()
    name = service_name(APP, service_port)
    async with fakes() as [m]:
        m.put_app(app_definition(APP, service_port, health_checks=True, labels={
            "HAPROXY_GROUP": "external", "HAPROXY_0_BIND_ADDR": HOST}))
        old_ids = [m.add_task(APP, HOST, b.port, healthy=True) for b in old]
        proc = await start(example_config(tmp_path, m.url, http, admin))
        try:
            await wait_admin(admin, "/readyz", lambda s, _t: s == 200, what="ready")
            load = Load(service_port).start()
            await eventually(lambda: load.ok >= 30, timeout=10, what="the load running")
            loop = asyncio.get_running_loop()
            for old_backend, old_id, new_backend in zip(old, old_ids, new, strict=True):
                # the new task starts: not routed before its health check passes
                new_id = m.add_task(APP, HOST, new_backend.port)
                await asyncio.sleep(0.6)  # past the debounce: the sync did happen
                assert new_backend.requests == []
                m.set_health(APP, new_id, alive=True)
                healthy_at = loop.time()
                await new_backend.wait_requests(1, timeout=2)
                assert loop.time() - healthy_at < 2.0
                _, text = await admin_get(admin, "/status.json")
                joined = backend_keys(text, name)[f"{HOST}:{new_backend.port}"]
                assert joined["slow_start"] is True  # it ramps up
                # the old task is killed: no new request to it after 2 s
                m.kill_task(APP, old_id)
                await asyncio.sleep(2.0)
                seen = len(old_backend.requests)
                await asyncio.sleep(0.5)
                assert len(old_backend.requests) == seen, "a killed task got a new request"
            await load.stop()
            assert load.failed == [], load.failed[:5]
            assert load.ok > 100
            served = {b.name for b in new if b.requests}
            assert served == {"new-1", "new-2", "new-3"}
        finally:
            await stop(proc)
    for x in (*old, *new):
        await x.stop()


def test_edgelb_check_on_the_example() -> None:
    import subprocess

    r = subprocess.run([sys.executable, "-m", "edgelb", "check", "-c", str(EXAMPLE)],
                       capture_output=True, text=True, cwd=REPO, timeout=30,
                       env={**os.environ})
    assert r.returncode == 0, r.stderr
    assert "watcher marathon: http://127.0.0.1:8180, http://127.0.0.1:8181 (group external" \
        in r.stdout

