"""edgelb as an ingress controller, end to end: the whole process (App) with the Kubernetes
watcher on, the official client against a protocol-faithful API server (tests/k8s_fake.py), and
real HTTP backends on 127.0.0.1 standing for the pods."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from httpkit import HOST, Client, HttpBackend, eventually, fetch, free_port, tcp_echo_server, within
from k8s_fake import FakeKubeAPI

from edgelb.ops.app import App

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

NS = "shop"


def meta(name: str, annotations: dict[str, str] | None = None, ns: str = NS) -> dict[str, Any]:
    m: dict[str, Any] = {"name": name, "namespace": ns,
                         "creationTimestamp": "2026-11-25T10:00:00Z"}
    if annotations:
        m["annotations"] = annotations
    return m


def ingress_class() -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
            "metadata": {"name": "edgelb"},
            "spec": {"controller": "edgelb.io/ingress-controller"}}


def service(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(name, annotations),
            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def endpoint_slice(svc: str, name: str, backend: HttpBackend, ready: bool = True
                   ) -> dict[str, Any]:
    """One slice per backend: each listens on its own port (a slice has one port list)."""
    m = meta(name)
    m["labels"] = {"kubernetes.io/service-name": svc}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": m,
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": backend.port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [HOST], "conditions": {"ready": ready}}]}


def ingress(host: str, svc: str) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta("shop"),
            "spec": {"ingressClassName": "edgelb", "rules": [{"host": host, "http": {"paths": [
                {"path": "/", "pathType": "Prefix",
                 "backend": {"service": {"name": svc, "port": {"name": "http"}}}}]}}]}}


class Cluster:
    def __init__(self, fake: FakeKubeAPI, app: App, http: int, admin: int) -> None:
        self.fake = fake
        self.app = app
        self.http = http
        self.admin = admin

    async def get(self, host: str, path: str = "/") -> tuple[int, bytes]:
        client = await Client.open(self.http)
        try:
            r = await within(client.request("GET", path, host=host))
            return r.status, r.body
        finally:
            client.close()

    async def admin_get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(f"http://{HOST}:{self.admin}{path}") as r:
            return r.status, await r.text()


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a cluster
    monkeypatch.setenv("POD_NAME", "edgelb-0")
    monkeypatch.setenv("POD_NAMESPACE", "edgelb")
    fake = FakeKubeAPI(bookmark_interval=0.2)
    await fake.start()
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig")
    http, admin = free_port(), free_port()
    path = tmp_path / "edgelb.yaml"
    path.write_text(
        f"admin: {{listen: {HOST}:{admin}}}\n"
        f"entrypoints: {{http: {{listen: {HOST}:{http}}}}}\n"
        "shutdown: {grace: 1s}\n"
        "watchers:\n"
        f"  kubernetes: {{kubeconfig: {kubeconfig}, publish_address: [203.0.113.10]}}\n"
    )
    app = App(path)
    try:
        await within(app.start(), 10)
        yield Cluster(fake, app, http, admin)
    finally:
        await app.stop()
        await fake.stop()


async def test_ingress_routes_to_endpoints_and_follows_changes(cluster: Cluster) -> None:
    a = await HttpBackend("a").start()
    b = await HttpBackend("b").start()
    fake = cluster.fake
    for obj in (ingress_class(), service("web"), endpoint_slice("web", "web-a", a),
                ingress("shop.example.com", "web")):
        fake.put(obj)
    runtime = cluster.app.runtime
    assert runtime is not None
    await eventually(lambda: "shop/web:http" in runtime.services, timeout=10,
                     what="the Ingress's service")
    assert (await cluster.admin_get("/readyz"))[0] == 200
    assert (await cluster.get("shop.example.com")) == (200, b"a GET /")
    assert (await cluster.get("other.example.com"))[0] == 404
    # scale up: a new slice; the new pod gets traffic within the debounce
    fake.put(endpoint_slice("web", "web-b", b))
    await eventually(lambda: len(runtime.services["shop/web:http"].pool.backends) == 2,
                     timeout=5, what="the second endpoint")
    seen: set[bytes] = set()
    for _ in range(100):  # the new pod starts at 10% of its weight (slow start)
        seen.add((await cluster.get("shop.example.com"))[1])
        if len(seen) == 2:
            break
    assert seen == {b"a GET /", b"b GET /"}
    # a pod goes unready: no more traffic to it
    fake.put(endpoint_slice("web", "web-a", a, ready=False))
    await eventually(lambda: f"{HOST}:{a.port}" not in runtime.services[
        "shop/web:http"].pool.by_key, timeout=5, what="the unready endpoint out")
    assert {(await cluster.get("shop.example.com"))[1] for _ in range(6)} == {b"b GET /"}
    # the leader wrote the Ingress status
    await fake.wait_for(lambda: any(u[1] == "shop" for u in fake.status_updates), timeout=5,
                        what="the Ingress status")
    ns, name, st = fake.status_updates[-1]
    assert (ns, name) == (NS, "shop")
    assert st["loadBalancer"]["ingress"] == [{"ip": "203.0.113.10"}]
    await a.stop()
    await b.stop()


async def test_static_port_annotation_and_a_bad_annotation_alone_skipped(cluster: Cluster
                                                                          ) -> None:
    good = await HttpBackend("tcp-good").start()
    port = free_port()
    fake = cluster.fake
    fake.put(service("db", {"edgelb.io/port": str(port), "edgelb.io/mode": "http",
                            "edgelb.io/max-inflight": "4"}))
    fake.put(endpoint_slice("db", "db-1", good))
    fake.put(service("bad", {"edgelb.io/port": str(free_port()),
                             "edgelb.io/max-inflite": "4"}))
    runtime = cluster.app.runtime
    assert runtime is not None
    await eventually(lambda: "shop/db" in runtime.services, timeout=10, what="the db service")
    r = await within(fetch(port, "GET", "/x"))
    assert (r.status, r.body) == (200, b"tcp-good GET /x")
    assert runtime.services["shop/db"].policy.max_inflight == 4
    assert "shop/bad" not in runtime.services
    await fake.wait_for(lambda: any("max-inflite" in e.get("message", "")
                                    for e in fake.events), timeout=5, what="a Warning Event")
    event = next(e for e in fake.events if "max-inflite" in e.get("message", ""))
    assert event["type"] == "Warning"
    assert event["involvedObject"]["name"] == "bad"
    assert runtime.watcher_problems["kubernetes"] >= 1
    await good.stop()


async def test_the_last_snapshot_keeps_serving_while_the_api_is_down(cluster: Cluster) -> None:
    a = await HttpBackend("a").start()
    fake = cluster.fake
    for obj in (ingress_class(), service("web"), endpoint_slice("web", "web-a", a),
                ingress("shop.example.com", "web")):
        fake.put(obj)
    runtime = cluster.app.runtime
    assert runtime is not None
    await eventually(lambda: "shop/web:http" in runtime.services, timeout=10, what="the route")
    await fake.stop()
    await eventually(lambda: not runtime.watcher_up.get("kubernetes", True), timeout=5,
                     what="edgelb_watcher_up to drop")
    assert (await cluster.get("shop.example.com")) == (200, b"a GET /")  # stale but serving
    assert (await cluster.admin_get("/readyz"))[0] == 200  # synced once: stays ready
    _, metrics = await cluster.admin_get("/metrics")
    assert 'edgelb_watcher_up{watcher="kubernetes"} 0.0' in metrics
    assert 'edgelb_watcher_last_event_age_seconds{watcher="kubernetes"}' in metrics
    await fake.start()  # back on the same port, same objects
    await eventually(lambda: runtime.watcher_up.get("kubernetes", False), timeout=15,
                     what="the watcher to reconnect")
    fake.delete("Ingress", NS, "shop")
    await eventually(lambda: "shop/web:http" not in runtime.services, timeout=5,
                     what="the removed Ingress to leave")
    assert (await cluster.get("shop.example.com"))[0] == 404
    await a.stop()


async def serve_throughout(cluster: Cluster, host: str, stop: asyncio.Event
                           ) -> list[tuple[int, bytes]]:
    """Requests one after another until `stop`: what each got (a failure is (0, repr))."""
    got: list[tuple[int, bytes]] = []
    while not stop.is_set():
        try:
            got.append(await cluster.get(host))
        except Exception as e:
            got.append((0, repr(e).encode()))
    return got


async def watcher_json(cluster: Cluster) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://{HOST}:{cluster.admin}/status.json") as r:
        doc = await r.json()
    return next(w for w in doc["watchers"] if w["name"] == "kubernetes")


async def test_a_translate_loop_that_raises_is_restarted_and_the_routes_keep_serving(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from watchers.kubernetes import watcher as k8s_watcher

    a = await HttpBackend("a").start()
    b = await HttpBackend("b").start()
    fake = cluster.fake
    for obj in (ingress_class(), service("web"), endpoint_slice("web", "web-a", a),
                ingress("shop.example.com", "web")):
        fake.put(obj)
    runtime = cluster.app.runtime
    assert runtime is not None
    await eventually(lambda: "shop/web:http" in runtime.services
                     and runtime.watcher_up.get("kubernetes", False), timeout=10,
                     what="the route, watcher up")
    real = k8s_watcher.translate
    failures: list[int] = []
    broken = True

    def translate(*args: Any, **kw: Any) -> Any:  # a translator bug, until `broken` is off
        if broken:
            failures.append(1)
            raise RuntimeError("translator bug")
        return real(*args, **kw)

    monkeypatch.setattr(k8s_watcher, "translate", translate)
    stop = asyncio.Event()
    client = asyncio.create_task(serve_throughout(cluster, "shop.example.com", stop))
    try:
        fake.put(endpoint_slice("web", "web-b", b))  # a change: the loop raises on it
        await eventually(lambda: len(failures) >= 2, timeout=5,
                         what="the loop to be restarted (and to fail again)")
        # down: said so, the last good routes still serve, still ready
        assert runtime.watcher_up["kubernetes"] is False
        _, metrics = await cluster.admin_get("/metrics")
        assert 'edgelb_watcher_up{watcher="kubernetes"} 0.0' in metrics
        status = await watcher_json(cluster)
        assert "kubernetes translate loop failed (RuntimeError: translator bug)" in (
            status["last_error"])
        assert (await cluster.admin_get("/readyz"))[0] == 200
        assert len(runtime.services["shop/web:http"].pool.backends) == 1  # nothing removed
        logged = [r for r in caplog.records if "kubernetes translate loop failed" in
                  r.getMessage()]
        assert logged and logged[0].levelname == "ERROR"
        assert logged[0].exc_info is not None and logged[0].exc_info[0] is RuntimeError
        # fixed: the next restart translates what changed meanwhile, and the watcher is up
        broken = False
        await eventually(lambda: runtime.watcher_up["kubernetes"], timeout=5,
                         what="edgelb_watcher_up back to 1 after the restart")
        assert len(runtime.services["shop/web:http"].pool.backends) == 2
        _, metrics = await cluster.admin_get("/metrics")
        assert 'edgelb_watcher_up{watcher="kubernetes"} 1.0' in metrics
        assert (await watcher_json(cluster))["last_error"] is None
        # and updates go on
        second = ingress("new.example.com", "web")
        second["metadata"] = meta("new")
        fake.put(second)
        await eventually(lambda: any(r.host == "new.example.com" for r in runtime.routes),
                         timeout=5, what="a change after the restart")
        assert (await cluster.get("new.example.com"))[0] == 200
    finally:
        stop.set()
        served = await within(client, 10)
    assert len(served) > 5
    assert {status for status, _ in served} == {200}, served[:5]
    await a.stop()
    await b.stop()


class _Reflector:
    """Stands for a connected, synced reflector (the watcher reads `up` and `synced`)."""

    def __init__(self) -> None:
        self.up = True
        self.synced = asyncio.Event()
        self.synced.set()
        self.last_event = 0.0
        self.cache: dict[Any, Any] = {}


async def test_any_loop_of_the_watcher_that_raises_marks_it_down_until_it_restarts() -> None:
    from edgelb.control.runtime import Runtime
    from edgelb.control.tasks import Backoff, describe, spawn, supervise
    from edgelb.ops.config import KubernetesWatcherConfig, policy_from_annotations
    from watchers.kubernetes.watcher import KubernetesWatcher
    from watchers.model import Policy
    from watchers.source import Tasks

    runtime = Runtime()
    tasks = Tasks(spawn, functools.partial(supervise, backoff=Backoff(initial=0.3, jitter=0.0)),
                  describe)
    watcher = KubernetesWatcher(KubernetesWatcherConfig(enabled=True), emit=runtime.apply,
                                report=runtime.report, read_policy=policy_from_annotations,
                                defaults=Policy, zone=str, tasks=tasks, api=object())
    watcher.reflectors["services"] = _Reflector()  # type: ignore[assignment]
    runtime.register_watcher("kubernetes")
    runtime.watcher_synced["kubernetes"] = runtime.watcher_up["kubernetes"] = True
    runs = 0
    release = asyncio.Event()

    async def reflector_run() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("a bug in the reflector")
        await release.wait()

    watcher._supervise("kubernetes reflector services", reflector_run)
    try:
        await eventually(lambda: bool(watcher.down), timeout=5, what="the loop marked down")
        assert runtime.watcher_up["kubernetes"] is False
        assert "kubernetes reflector services failed (RuntimeError: a bug in the reflector)" in (
            runtime.last_errors["kubernetes"])
        watcher._report_health()  # what the health watch does every second: still down
        assert runtime.watcher_up["kubernetes"] is False
        await eventually(lambda: runs == 2 and runtime.watcher_up["kubernetes"], timeout=5,
                         what="the restart, and the watcher up again")
        assert watcher.down == {} and "kubernetes" not in runtime.last_errors
    finally:
        await within(watcher.stop())
    assert runs == 2 and not watcher._tasks  # stopped: cancelled, not restarted


async def test_not_ready_until_the_first_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    fake = FakeKubeAPI()
    await fake.start()
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig")
    await fake.stop()  # the API server is not reachable when the pod starts
    admin = free_port()
    path = tmp_path / "edgelb.yaml"
    path.write_text(f"admin: {{listen: {HOST}:{admin}}}\n"
                    f"watchers: {{kubernetes: {{kubeconfig: {kubeconfig}}}}}\n")
    app = App(path)
    await within(app.start(), 10)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{HOST}:{admin}/readyz") as r:
                assert r.status == 503
                assert "kubernetes" in await r.text()
            await fake.start()
            runtime = app.runtime
            assert runtime is not None
            await eventually(lambda: runtime.watcher_synced.get("kubernetes", False),
                             timeout=15, what="the first sync")
            async with s.get(f"http://{HOST}:{admin}/readyz") as r:
                assert r.status == 200
    finally:
        await app.stop()
        await fake.stop()


async def test_bad_credentials_stop_the_start_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    path = tmp_path / "edgelb.yaml"
    missing = tmp_path / "nope" / "kubeconfig"
    path.write_text(f"admin: {{listen: {HOST}:{free_port()}}}\n"
                    f"watchers: {{kubernetes: {{kubeconfig: {missing}}}}}\n")
    app = App(path)
    with pytest.raises(SystemExit) as info:
        await app.start()  # (not under wait_for: a task re-raises SystemExit to the loop)
    assert "watchers.kubernetes" in str(info.value)
    assert str(missing) in str(info.value)
    await app.stop()
    await asyncio.sleep(0)


# -- RBAC: every request the watcher makes is granted by `edgelb manifests` -------------------


def _granted() -> set[tuple[str, str, str]]:
    import yaml

    from edgelb.ops.cli import build_parser
    from edgelb.ops.manifests import options_from_args, render

    text = render(options_from_args(build_parser().parse_args(["manifests"]))).text
    out: set[tuple[str, str, str]] = set()
    for doc in yaml.safe_load_all(text):
        if doc and doc["kind"] in ("ClusterRole", "Role"):
            for rule in doc["rules"]:
                for group in rule["apiGroups"]:
                    for res in rule["resources"]:
                        for verb in rule["verbs"]:
                            out.add((group, res, verb))
    return out


def _used(fake: FakeKubeAPI) -> set[tuple[str, str, str]]:
    out: set[tuple[str, str, str]] = set()
    for r in fake.requests:
        parts = [p for p in r.path.split("/") if p]
        if parts[0] == "api":  # /api/v1/[namespaces/NS/]PLURAL[/NAME[/SUB]]
            group, rest = "", parts[2:]
        else:  # /apis/GROUP/v1/...
            group, rest = parts[1], parts[3:]
        if rest and rest[0] == "namespaces" and len(rest) > 2:
            rest = rest[2:]
        resource = rest[0] + ("/" + rest[2] if len(rest) > 2 else "")
        named = len(rest) > 1
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete"}.get(r.method)
        if verb is None:
            verb = "watch" if r.watch else ("get" if named else "list")
        out.add((group, resource, verb))
    return out


async def test_every_request_of_the_watcher_is_granted_by_the_manifests(cluster: Cluster
                                                                        ) -> None:
    a = await HttpBackend("a").start()
    fake = cluster.fake
    for obj in (ingress_class(), service("web"), endpoint_slice("web", "web-a", a),
                ingress("shop.example.com", "web"),
                service("bad", {"edgelb.io/port": str(free_port()), "edgelb.io/retries": "9"})):
        fake.put(obj)
    await fake.wait_for(lambda: bool(fake.status_updates) and bool(fake.events), timeout=10,
                        what="status and an Event")
    used = _used(fake)
    assert ("networking.k8s.io", "ingresses/status", "update") in used
    assert ("", "events", "create") in used
    assert ("coordination.k8s.io", "leases", "create") in used
    missing = used - _granted()
    assert not missing, f"requests the RBAC of `edgelb manifests` does not allow: {missing}"
    await a.stop()


# -- rolling replacement under steady load ---------------------------------------------------


def terminating_slice(svc: str, name: str, backend: HttpBackend) -> dict[str, Any]:
    s = endpoint_slice(svc, name, backend)
    s["endpoints"][0]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    return s


async def test_rolling_replacement_under_load_fails_no_request(cluster: Cluster) -> None:
    fake = cluster.fake
    runtime = cluster.app.runtime
    assert runtime is not None
    old = [await HttpBackend(f"old{i}").start() for i in range(3)]
    fake.put(ingress_class())
    fake.put(service("web"))
    for i, b in enumerate(old):
        fake.put(endpoint_slice("web", f"web-old{i}", b))
    fake.put(ingress("shop.example.com", "web"))
    await eventually(lambda: "shop/web:http" in runtime.services
                     and len(runtime.services["shop/web:http"].pool.backends) == 3,
                     timeout=10, what="three endpoints")
    pool = lambda: runtime.services["shop/web:http"].pool  # noqa: E731
    stop = asyncio.Event()
    results: list[int] = []
    errors: list[str] = []

    async def client() -> None:
        conn = await Client.open(cluster.http)
        try:
            while not stop.is_set():
                try:
                    r = await within(conn.request("GET", "/", host="shop.example.com"))
                    results.append(r.status)
                except Exception as e:
                    errors.append(repr(e))
                    conn.close()
                    conn = await Client.open(cluster.http)
        finally:
            conn.close()

    loop = asyncio.get_running_loop()
    clients = [asyncio.create_task(client()) for _ in range(4)]
    try:
        for i, gone in enumerate(old):
            new = await HttpBackend(f"new{i}").start()
            t0 = loop.time()
            fake.put(endpoint_slice("web", f"web-new{i}", new))
            await eventually(lambda new=new: len(new.requests) > 0, timeout=1.0,
                             what=f"new{i} to receive traffic within 1 s")
            assert loop.time() - t0 < 1.0
            t0 = loop.time()
            fake.put(terminating_slice("web", f"web-old{i}", gone))
            key = f"{HOST}:{gone.port}"
            await eventually(lambda key=key: key not in pool().by_key
                             or not pool().by_key[key].eligible, timeout=1.0,
                             what=f"old{i} to stop receiving within 1 s")
            assert loop.time() - t0 < 1.0
            state = pool().by_key.get(key)
            ceiling = len(gone.requests) + (state.inflight if state is not None else 0)
            fake.delete("EndpointSlice", NS, f"web-old{i}")
            await eventually(lambda key=key: key not in pool().by_key
                             and key not in pool().draining, timeout=5,
                             what=f"old{i} drained")
            assert len(gone.requests) <= ceiling  # nothing new after it stopped being ready
            await gone.stop()  # the pod exits once nothing is in flight
    finally:
        stop.set()
        await within(asyncio.gather(*clients), 10)
    assert errors == []
    assert len(results) > 100 and set(results) == {200}


# -- the Ingress matching table and hosts, through the whole stack ---------------------------


def ingress_paths(name: str, host: str | None, paths: list[tuple[str, str, str]],
                  default: str | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"http": {"paths": [
        {"path": p, "pathType": kind,
         "backend": {"service": {"name": svc, "port": {"number": 80}}}}
        for p, kind, svc in paths]}}
    if host is not None:
        rule["host"] = host
    spec: dict[str, Any] = {"ingressClassName": "edgelb", "rules": [rule]}
    if default:
        spec["defaultBackend"] = {"service": {"name": default, "port": {"number": 80}}}
    obj = ingress("x", "x")
    obj["metadata"] = meta(name)
    obj["spec"] = spec
    return obj


async def test_the_documentation_table_through_the_whole_stack(cluster: Cluster) -> None:
    fake = cluster.fake
    names = ["root", "aaa", "bbb", "exact", "slash", "wild", "fallback"]
    backends = {n: await HttpBackend(n).start() for n in names}
    fake.put(ingress_class())
    for n, b in backends.items():
        fake.put(service(n))
        fake.put(endpoint_slice(n, f"{n}-1", b))
    fake.put(ingress_paths("table", "table.example.com", [
        ("/", "Prefix", "root"), ("/aaa", "Prefix", "aaa"), ("/aaa/bbb", "Prefix", "bbb"),
        ("/foo", "Exact", "exact"), ("/foo/", "Exact", "slash")]))
    fake.put(ingress_paths("wild", "*.example.com", [("/", "Prefix", "wild")]))
    fake.put(ingress_paths("fallback", None, [], default="fallback"))
    runtime = cluster.app.runtime
    assert runtime is not None
    await eventually(lambda: len([s for s in runtime.services if s.startswith("shop/")]) == 7,
                     timeout=10, what="seven services")
    cases = [
        ("table.example.com", "/", "root"), ("table.example.com", "/ccc", "root"),
        ("table.example.com", "/aaa", "aaa"), ("table.example.com", "/aaa/", "aaa"),
        ("table.example.com", "/aaa/bb", "aaa"), ("table.example.com", "/aaa/bbb", "bbb"),
        ("table.example.com", "/aaa/bbb/", "bbb"), ("table.example.com", "/aaa/bbb/ccc", "bbb"),
        ("table.example.com", "/aaa/bbbxyz", "aaa"), ("table.example.com", "/foo", "exact"),
        ("table.example.com", "/foo/", "slash"), ("table.example.com", "/foo/bar", "root"),
        ("a.example.com", "/anything", "wild"), ("b.a.example.com", "/", "fallback"),
        ("example.com", "/", "fallback"), ("other.org", "/x", "fallback"),
    ]
    for host, path, want in cases:
        status, body = await cluster.get(host, path)
        assert (status, body.split(b" ")[0].decode()) == (200, want), (host, path)
    for b in backends.values():
        await b.stop()


async def test_a_static_tcp_port_from_a_service_annotation(cluster: Cluster) -> None:
    server, bport = await tcp_echo_server()
    port = free_port()
    fake = cluster.fake
    svc = service("redis", {"edgelb.io/port": str(port), "edgelb.io/max-inflight": "2"})
    svc["spec"]["ports"] = [{"name": "redis", "port": 6379, "protocol": "TCP"}]
    fake.put(svc)
    s = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {**meta("redis-1"), "labels": {"kubernetes.io/service-name": "redis"}},
         "addressType": "IPv4", "ports": [{"name": "redis", "port": bport, "protocol": "TCP"}],
         "endpoints": [{"addresses": [HOST]}]}
    fake.put(s)
    runtime = cluster.app.runtime
    assert runtime is not None
    await eventually(lambda: "shop/redis" in runtime.services, timeout=10, what="the service")
    assert runtime.services["shop/redis"].spec.mode == "tcp"  # no http appProtocol: tcp
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"PING\r\n")
    assert await within(reader.readexactly(6)) == b"PING\r\n"
    writer.close()
    server.close()


# -- the API server misbehaving in the middle of a burst -------------------------------------


async def test_a_410_and_abrupt_disconnects_in_a_burst_end_in_the_servers_state(
    cluster: Cluster,
) -> None:
    fake = cluster.fake
    runtime = cluster.app.runtime
    assert runtime is not None
    backend = await HttpBackend("pod").start()
    fake.put(ingress_class())
    fake.put(service("first"))
    fake.put(endpoint_slice("first", "first-1", backend))
    watcher = cluster.app.kubernetes
    assert watcher is not None
    await eventually(lambda: all(r.versions.get("", "0") not in ("", "0")
                                 for r in watcher.reflectors.values()),
                     timeout=10, what="every watch to have a resourceVersion to resume from")
    ports: list[int] = []
    while len(ports) < 20:  # distinct: two Services claiming one port would leave one out
        port = free_port()
        if port not in ports:
            ports.append(port)
    for i in range(20):
        fake.put(service(f"s{i}", {"edgelb.io/port": str(ports[i]), "edgelb.io/mode": "http"}))
        fake.put(endpoint_slice(f"s{i}", f"s{i}-1", backend))
        if i == 6:
            fake.hang_watches()  # the watches fall silent: the next events do not reach us
        if i == 12:
            fake.compact()  # the history the watches would resume from is gone
            await fake.stop()  # and every connection is cut at once
            await fake.start()
            fake.hang_watches(False)  # they reconnect, get 410 Expired, and relist
    for i in range(0, 20, 2):
        fake.delete("Service", NS, f"s{i}")  # deleted while some watches are reconnecting
    want = {f"shop/s{i}" for i in range(1, 20, 2)}
    await eventually(lambda: {s for s in runtime.services if s.startswith("shop/s")} == want,
                     timeout=15, what="the runtime to match the API server")
    assert sum(r.relists for r in watcher.reflectors.values()) >= 1  # the 410 made a relist
    await backend.stop()


async def test_a_storm_of_events_is_coalesced_and_the_last_one_lands_quickly(
    cluster: Cluster,
) -> None:
    fake = cluster.fake
    runtime = cluster.app.runtime
    watcher = cluster.app.kubernetes
    assert runtime is not None and watcher is not None
    backend = await HttpBackend("pod").start()
    fake.put(service("web", {"edgelb.io/port": str(free_port()), "edgelb.io/mode": "http"}))
    await eventually(lambda: "shop/web" in runtime.services, timeout=10, what="the service")
    loop = asyncio.get_running_loop()
    before = watcher.applies
    t0 = loop.time()
    for i in range(40):  # 40 changes over about 1 s: a rolling storm of endpoint updates
        fake.put(endpoint_slice("web", f"web-{i % 4}", backend, ready=i % 2 == 0))
        await asyncio.sleep(0.025)  # the pace of the storm, not a synchronisation
    last = loop.time()
    fake.put(service("web", {"edgelb.io/port": str(free_port()), "edgelb.io/mode": "http",
                             "edgelb.io/max-inflight": "7"}))
    await eventually(lambda: runtime.services["shop/web"].policy.max_inflight == 7,
                     timeout=5, what="the last change")
    landed = loop.time() - last
    applies = watcher.applies - before
    storm = last - t0
    # at most one apply per 50 ms (plus the one for the last change), far fewer than events
    assert applies <= storm / 0.05 + 2, (applies, storm)
    assert applies < 41
    assert landed < 0.5, landed  # 50 ms of debounce plus delivery; a loaded CI box is slower
    await backend.stop()


async def test_the_nodes_zone_reaches_the_runtime_in_the_watchers_snapshot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no `instance.zone`, the zone label of the proxy's Node ($NODE_NAME) is the proxy's
    zone: it travels in the cluster's snapshot (the watcher writes no runtime state), and a
    label change re-plans the zone-aware pools."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("EDGELB_ZONE", raising=False)
    monkeypatch.setenv("NODE_NAME", "node-1")
    fake = FakeKubeAPI(bookmark_interval=0.2)
    await fake.start()
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": "node-1", "labels": {"topology.kubernetes.io/zone": "zone-a"}}}
    fake.put(node)
    fake.put(ingress_class())
    fake.put(service("web", {"edgelb.io/zone-aware": "true"}))
    a = await HttpBackend("a").start()
    fake.put(endpoint_slice("web", "web-a", a))
    path = tmp_path / "edgelb.yaml"
    path.write_text(
        f"admin: {{listen: {HOST}:{free_port()}}}\n"
        f"entrypoints: {{http: {{listen: {HOST}:{free_port()}}}}}\n"
        "shutdown: {grace: 1s}\n"
        f"watchers: {{kubernetes: {{kubeconfig: {fake.kubeconfig(tmp_path / 'kc')}}}}}\n")
    fake.put(ingress("shop.example.com", "web"))
    app = App(path)
    try:
        await within(app.start(), 10)
        runtime = app.runtime
        assert runtime is not None
        await eventually(lambda: "shop/web:http" in runtime.services, timeout=10,
                         what="the cluster's snapshot")
        assert runtime.snapshots["kubernetes"].zone == "zone-a"
        assert runtime.instance.zone == "zone-a"
        assert runtime.services["shop/web:http"].pool.zone == "zone-a"
        node["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-b"
        fake.put(node)
        await eventually(lambda: runtime.services["shop/web:http"].pool.zone == "zone-b",
                         timeout=10, what="the new zone in the zone-aware pool")
        assert runtime.instance.zone == "zone-b"
    finally:
        await app.stop()
        await fake.stop()
        await a.stop()
