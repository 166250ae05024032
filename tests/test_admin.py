"""The admin endpoint over real loopback sockets, against a small fake runtime.

The fake runtime carries real ServiceState objects; the tests bump their counters the way the
data path does and check that /metrics, /status.json and /status follow.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from edgelb import compiled
from edgelb.ops.admin import AdminServer
from edgelb.pool import DURATION_BUCKETS, ServiceState
from watchers.model import Address, Backend, Policy, Route, Service

HOSTILE = '<script>alert("x")</script>&'


def make_runtime() -> SimpleNamespace:
    web = ServiceState(
        Service(
            name="web",
            mode="http",
            listen=Address("127.0.0.1", 10000),
            backends=(
                Backend("127.0.0.1", 9001, weight=1, zone="a"),
                Backend("127.0.0.1", 9002, weight=3, zone="b", ready=False),
            ),
            policy=Policy(balance="least-loaded", max_inflight=64),
        )
    )
    db = ServiceState(
        Service(
            name="db",
            mode="tcp",
            listen=Address("127.0.0.1", 10001),
            backends=(Backend("127.0.0.1", 5432),),
        )
    )
    listeners = {
        "127.0.0.1:10000": SimpleNamespace(
            address=Address("127.0.0.1", 10000),
            kind="http",
            service=web,
            accepted=5,
            connections=2,
        ),
        "127.0.0.1:10001": SimpleNamespace(
            address=Address("127.0.0.1", 10001),
            kind="tcp",
            service=db,
            accepted=1,
            connections=1,
        ),
        "0.0.0.0:80": SimpleNamespace(
            address=Address("0.0.0.0", 80),
            kind="entrypoint",
            service=None,
            name="http",
            accepted=7,
            connections=0,
        ),
    }
    return SimpleNamespace(
        services={"web": web, "db": db},
        listeners=listeners,
        routes=(Route(host="web.example.com", path="/", service="web"),),
        reloads={("file", "ok"): 3, ("file", "error"): 1},
        watcher_up={"file": True, "kubernetes": False},
        watcher_synced={"file": True, "kubernetes": False},
        last_errors={"kubernetes": "connection refused"},
        draining=False,
        started_at=time.time() - 5,
        local_responses={404: 2},
        local_counts={404: 2},  # GET (method index 0) << 10 | status
    )


@pytest.fixture
def runtime() -> SimpleNamespace:
    return make_runtime()


@pytest.fixture
async def admin(runtime: SimpleNamespace) -> AsyncIterator[AdminServer]:
    server = AdminServer(runtime, Address("127.0.0.1", 0))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def get(http: aiohttp.ClientSession, admin: AdminServer, path: str) -> tuple[int, str]:
    async with http.get(admin.url + path, allow_redirects=False) as r:
        return r.status, await r.text()


async def scrape(http: aiohttp.ClientSession, admin: AdminServer) -> dict[str, Any]:
    """Families by name, each as {sample name: {frozenset(labels): value}}."""
    async with http.get(admin.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await r.text()
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        samples: dict[str, dict[frozenset, float]] = {}
        for s in fam.samples:
            samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
        out[fam.name] = (fam.type, samples)
    return out


def value(metrics: dict[str, Any], sample: str, **labels: str) -> float:
    for _fam_type, samples in metrics.values():
        if sample in samples:
            return samples[sample][frozenset(labels.items())]
    raise KeyError(sample)


# -- probes -------------------------------------------------------------------------------


async def test_healthz_and_root_redirect(admin: AdminServer, http: aiohttp.ClientSession) -> None:
    assert await get(http, admin, "/healthz") == (200, "ok\n")
    async with http.get(admin.url + "/", allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == "/status"


async def test_readyz_follows_sync_and_draining(
    admin: AdminServer, http: aiohttp.ClientSession, runtime: SimpleNamespace
) -> None:
    status, body = await get(http, admin, "/readyz")
    assert status == 503
    assert "kubernetes" in body and "file" not in body

    runtime.watcher_synced["kubernetes"] = True
    status, body = await get(http, admin, "/readyz")
    assert status == 200

    runtime.draining = True
    status, body = await get(http, admin, "/readyz")
    assert status == 503
    assert "draining" in body
    # Liveness is unaffected by draining.
    assert (await get(http, admin, "/healthz"))[0] == 200


# -- /metrics -----------------------------------------------------------------------------


async def test_metrics_required_families_and_labels(
    admin: AdminServer, http: aiohttp.ClientSession, runtime: SimpleNamespace
) -> None:
    web: ServiceState = runtime.services["web"]
    b1 = web.pool.by_key["127.0.0.1:9001"]
    b1.responses[200] = 10
    b1.counts[200] = 10  # GET: method index 0 (edgelb.http.accounting.count)
    b1.inflight = 3
    web.local_responses[503] = 4
    web.local_counts[503] = 4
    web.shed["queue_timeout"] = 6
    web.bytes_in, web.bytes_out = 100, 2000
    runtime.services["db"].tcp_connections = 9

    m = await scrape(http, admin)
    types = {name: t for name, (t, _) in m.items()}
    assert types["edgelb_requests"] == "counter"
    assert types["edgelb_request_duration_seconds"] == "histogram"
    assert types["edgelb_backend_inflight"] == "gauge"
    assert types["edgelb_backend_healthy"] == "gauge"
    for counter in (
        "edgelb_shed",
        "edgelb_ejections",
        "edgelb_tcp_connections",
        "edgelb_bytes",
        "edgelb_config_reloads",
    ):
        assert types[counter] == "counter", counter
    assert types["edgelb_watcher_up"] == "gauge"
    assert "process_cpu_seconds" in types  # process metrics ride along

    req = "edgelb_requests_total"
    get = {"method": "GET"}
    assert value(m, req, service="web", backend="127.0.0.1:9001", code="200", code_class="2xx",
                 **get) == 10
    assert value(m, req, service="web", backend="", code="503", code_class="5xx", **get) == 4
    assert value(m, req, service="", backend="", code="404", code_class="4xx", **get) == 2
    assert value(m, "edgelb_backend_inflight", service="web", backend="127.0.0.1:9001") == 3
    assert value(m, "edgelb_backend_healthy", service="web", backend="127.0.0.1:9001") == 1
    assert value(m, "edgelb_backend_healthy", service="web", backend="127.0.0.1:9002") == 0
    assert value(m, "edgelb_shed_total", service="web", reason="queue_timeout") == 6
    assert value(m, "edgelb_ejections_total", service="web", backend="127.0.0.1:9001") == 0
    assert value(m, "edgelb_tcp_connections_total", service="db") == 9
    assert value(m, "edgelb_bytes_total", service="web", direction="in") == 100
    assert value(m, "edgelb_bytes_total", service="web", direction="out") == 2000
    assert value(m, "edgelb_config_reloads_total", watcher="file", result="ok") == 3
    assert value(m, "edgelb_config_reloads_total", watcher="file", result="error") == 1
    assert value(m, "edgelb_watcher_up", watcher="file") == 1
    assert value(m, "edgelb_watcher_up", watcher="kubernetes") == 0
    assert value(m, "edgelb_backend_weight", service="web", backend="127.0.0.1:9002") == 3
    assert value(m, "edgelb_listener_connections", listener="127.0.0.1:10000", kind="http") == 2
    assert value(m, "edgelb_listener_accepted_total", listener="0.0.0.0:80", kind="entrypoint") == 7
    assert (
        value(
            m, "edgelb_upstream_connections", service="web", backend="127.0.0.1:9001", state="idle"
        )
        == 0
    )


async def test_metrics_move_with_counters(
    admin: AdminServer, http: aiohttp.ClientSession, runtime: SimpleNamespace
) -> None:
    web: ServiceState = runtime.services["web"]
    b1 = web.pool.by_key["127.0.0.1:9001"]
    labels = {"service": "web", "backend": "127.0.0.1:9001", "code": "502", "method": "GET",
              "code_class": "5xx"}
    with pytest.raises(KeyError):  # no 502 yet: no series
        value(await scrape(http, admin), "edgelb_requests_total", **labels)

    b1.counts[502] = 1  # GET (method index 0) << 10 | 502
    b1.inflight += 1
    b1.failures += 2
    b1.idle.extend([object(), object()])
    b1.open_connections = 3
    runtime.reloads[("kubernetes", "ok")] = 1
    runtime.watcher_up["kubernetes"] = True
    m = await scrape(http, admin)
    assert value(m, "edgelb_requests_total", **labels) == 1
    assert value(m, "edgelb_backend_inflight", service="web", backend="127.0.0.1:9001") == 1
    assert value(m, "edgelb_backend_failures_total", service="web", backend="127.0.0.1:9001") == 2
    assert (
        value(
            m, "edgelb_upstream_connections", service="web", backend="127.0.0.1:9001", state="idle"
        )
        == 2
    )
    assert (
        value(
            m, "edgelb_upstream_connections", service="web", backend="127.0.0.1:9001", state="open"
        )
        == 3
    )
    assert value(m, "edgelb_config_reloads_total", watcher="kubernetes", result="ok") == 1
    assert value(m, "edgelb_watcher_up", watcher="kubernetes") == 1

    b1.counts[502] += 41
    b1.inflight -= 1
    m = await scrape(http, admin)
    assert value(m, "edgelb_requests_total", **labels) == 42
    assert value(m, "edgelb_backend_inflight", service="web", backend="127.0.0.1:9001") == 0


async def test_metrics_follow_pool_updates(
    admin: AdminServer, http: aiohttp.ClientSession, runtime: SimpleNamespace
) -> None:
    """A removed backend with requests in flight is still reported until it drains."""
    web: ServiceState = runtime.services["web"]
    gone = web.pool.by_key["127.0.0.1:9002"]
    gone.inflight = 1
    web.update(
        Service(name="web", backends=(Backend("127.0.0.1", 9001), Backend("127.0.0.1", 9003)))
    )
    m = await scrape(http, admin)
    inflight = "edgelb_backend_inflight"
    assert value(m, inflight, service="web", backend="127.0.0.1:9002") == 1
    assert value(m, "edgelb_backend_draining", service="web", backend="127.0.0.1:9002") == 1
    assert value(m, inflight, service="web", backend="127.0.0.1:9003") == 0

    web.pool.release(gone)  # its last request ends: the drained backend leaves
    m = await scrape(http, admin)
    with pytest.raises(KeyError):
        value(m, inflight, service="web", backend="127.0.0.1:9002")


async def test_histogram_is_cumulative(
    admin: AdminServer, http: aiohttp.ClientSession, runtime: SimpleNamespace
) -> None:
    web: ServiceState = runtime.services["web"]
    observations = [0.0005, 0.003, 0.003, 0.2, 0.7, 30.0]
    for seconds in observations:
        web.observe(seconds)
    m = await scrape(http, admin)
    _, samples = m["edgelb_request_duration_seconds"]
    buckets = {
        dict(k)["le"]: v
        for k, v in samples["edgelb_request_duration_seconds_bucket"].items()
        if dict(k)["service"] == "web"
    }
    assert len(buckets) == len(DURATION_BUCKETS) + 1
    for bound in DURATION_BUCKETS:
        expected = sum(1 for s in observations if s <= bound)
        matching = [v for le, v in buckets.items() if le != "+Inf" and float(le) == bound]
        assert matching == [expected], bound
    ordered = [buckets[le] for le in sorted(buckets, key=float)]
    assert ordered == sorted(ordered)  # cumulative: never decreasing
    series = frozenset({("service", "web"), ("method", "GET"), ("code_class", "2xx")})
    count = samples["edgelb_request_duration_seconds_count"][series]
    total = samples["edgelb_request_duration_seconds_sum"][series]
    assert buckets["+Inf"] == count == len(observations)
    assert total == pytest.approx(sum(observations))
    # series by method and status class appear once one is seen: none for an idle service
    assert not any(dict(k)["service"] == "db"
                   for k in samples["edgelb_request_duration_seconds_count"])


# -- /status.json and /status -------------------------------------------------------------


async def test_status_json_schema(
    admin: AdminServer, http: aiohttp.ClientSession, runtime: SimpleNamespace
) -> None:
    web: ServiceState = runtime.services["web"]
    b1 = web.pool.by_key["127.0.0.1:9001"]
    b1.responses[200] = 7
    b1.requests = 8
    b1.latency = 0.012
    b1.bytes_in, b1.bytes_out = 50, 60
    web.local_responses[503] = 1

    async with http.get(admin.url + "/status.json") as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        doc = await r.json()
    assert doc["version"]
    assert doc["build"] == compiled.describe()  # what the running process loaded
    assert 4 <= doc["uptime"] < 600
    assert doc["ready"] is False and doc["draining"] is False
    assert [s["name"] for s in doc["services"]] == ["db", "web"]
    svc = doc["services"][1]
    assert svc["mode"] == "http"
    assert svc["listen"] == "127.0.0.1:10000"
    assert svc["policy"]["balance"] == "least-loaded"
    assert svc["policy"]["max_inflight"] == 64
    for key in ("connect_timeout", "header_timeout", "idle_timeout", "response_timeout"):
        assert isinstance(svc["policy"][key], float)
    assert svc["routes"] == [{"host": "web.example.com", "path": "/", "exact": False}]
    assert svc["responses"] == {"200": 7, "503": 1}
    assert svc["requests"] == 8
    backends = {b["key"]: b for b in svc["backends"]}
    assert set(backends) == {"127.0.0.1:9001", "127.0.0.1:9002"}
    b = backends["127.0.0.1:9001"]
    assert b == {
        "key": "127.0.0.1:9001",
        "host": "127.0.0.1",
        "port": 9001,
        "weight": 1,
        "weight_configured": 1,
        "slow_start": False,
        "zone": "a",
        "healthy": True,
        "ready": True,
        "health_check": None,
        "ejected": False,
        "draining": False,
        "usable": True,
        "eligible": True,
        "inflight": 0,
        "max_inflight": 32,  # max_inflight 64 x weight 1 / mean weight 2
        "max_inflight_configured": 32,
        "latency": 0.012,
        "requests": 8,
        "responses": {"200": 7},
        "failures": 0,
        "last_error": None,
        "unsolicited": 0,
        "ejections": 0,
        "connections": {"idle": 0, "open": 0, "total": 0},
        "bytes": {"in": 50, "out": 60},
    }
    assert backends["127.0.0.1:9002"]["healthy"] is False
    assert backends["127.0.0.1:9002"]["eligible"] is False

    listeners = {entry["address"]: entry for entry in doc["listeners"]}
    assert listeners["0.0.0.0:80"] == {
        "address": "0.0.0.0:80",
        "kind": "entrypoint",
        "target": "http",
        "accepted": 7,
        "connections": 0,
    }
    assert listeners["127.0.0.1:10001"]["target"] == "db"
    assert doc["routes"] == [
        {"host": "web.example.com", "path": "/", "exact": False, "service": "web"}
    ]
    watchers = {w["name"]: w for w in doc["watchers"]}
    assert watchers["file"] == {
        "name": "file",
        "up": True,
        "synced": True,
        "last_error": None,
        "reloads": {"ok": 3, "error": 1},
        "last_event_age": None,  # the fake runtime's watchers never report an event
    }
    assert watchers["kubernetes"]["last_error"] == "connection refused"
    assert doc["local_responses"] == {"404": 2}


async def test_status_html_lists_and_escapes(
    admin: AdminServer, http: aiohttp.ClientSession, runtime: SimpleNamespace
) -> None:
    runtime.services[HOSTILE] = ServiceState(
        Service(name=HOSTILE, backends=(Backend("10.0.0.7", 8080),))
    )
    async with http.get(admin.url + "/status") as r:
        assert r.status == 200
        assert r.content_type == "text/html"
        html = await r.text()
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert '<meta http-equiv="refresh" content="2">' in html
    for text in (
        "web",
        "db",
        "127.0.0.1:9001",
        "127.0.0.1:9002",
        "10.0.0.7:8080",
        "0.0.0.0:80",
        "web.example.com",
        "kubernetes",
        "connection refused",
    ):
        assert text in html, text
    assert HOSTILE not in html
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;" in html


async def test_status_html_empty_runtime(http: aiohttp.ClientSession) -> None:
    empty = SimpleNamespace(
        services={},
        listeners={},
        routes=(),
        reloads={},
        watcher_up={},
        watcher_synced={},
        last_errors={},
        draining=False,
        started_at=time.time(),
        local_responses={},
    )
    server = AdminServer(empty, Address("127.0.0.1", 0))
    await server.start()
    try:
        status, html = await get(http, server, "/status")
        assert status == 200 and "no services" in html
        assert (await get(http, server, "/readyz"))[0] == 200  # no watchers: nothing to wait on
        status, text = await get(http, server, "/metrics")
        assert status == 200 and "edgelb_info" in text
    finally:
        await server.stop()


# -- lifecycle ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_fixed_port_and_bind_error(runtime: SimpleNamespace) -> None:
    port = free_port()
    first = AdminServer(runtime, Address("127.0.0.1", port))
    await first.start()
    try:
        assert first.bound == Address("127.0.0.1", port)
        second = AdminServer(runtime, Address("127.0.0.1", port))
        with pytest.raises(OSError, match=rf"127\.0\.0\.1:{port}"):
            await second.start()
        await second.stop()  # harmless when never started
    finally:
        await first.stop()
        await first.stop()  # idempotent
    # The port is free again after stop().
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


async def test_separate_registries(runtime: SimpleNamespace) -> None:
    """Two servers in one process do not share (or collide in) a metrics registry."""
    a = AdminServer(runtime, Address("127.0.0.1", 0))
    b = AdminServer(runtime, Address("127.0.0.1", 0))
    assert a.registry is not b.registry


# -- a real browser -----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
async def test_status_renders_in_chromium(
    admin: AdminServer, runtime: SimpleNamespace, tmp_path: Any
) -> None:
    runtime.services[HOSTILE] = ServiceState(
        Service(name=HOSTILE, backends=(Backend("10.0.0.7", 8080),))
    )
    proc = await asyncio.create_subprocess_exec(
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path}",
        "--dump-dom",
        admin.url + "/status",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    dom = out.decode()
    assert "<table" in dom
    assert ">web<" in dom and "127.0.0.1:9001" in dom
    # The hostile name arrived as text (re-escaped by the serializer), not as an element.
    assert '&lt;script&gt;alert("x")&lt;/script&gt;&amp;' in dom
    assert dom.count("<script") == 1 and '<script src="/status.js"' in dom  # ours only
