"""The list+watch reflector against FakeKubeAPI, through the official client, on loopback.

Every wait is on an event (a change callback, a request or bookmark at the fake), bounded in
time; the one polled state is `up`, which has no event of its own.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from httpkit import eventually
from k8s_fake import FakeKubeAPI, objs
from kubernetes.aio import client as k8s

from watchers.kubernetes import reflector as reflector_mod
from watchers.kubernetes.client import CredentialsError, load_configuration, make_api_client
from watchers.kubernetes.reflector import (
    ENDPOINTSLICES,
    INGRESSCLASSES,
    NODES,
    SECRETS,
    SERVICES,
    KubeApiError,
    Reflector,
    Resource,
    list_objects,
)

pytestmark = pytest.mark.timeout(30)

STEP = 5.0


class Changes:
    """The `on_change` callback: counts calls and lets a test await a condition on them."""

    def __init__(self) -> None:
        self.count = 0
        self._event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self._event.set()

    async def until(self, predicate: Callable[[], bool], what: str = "the condition",
                    timeout: float = STEP) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            self._event.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"{what} did not hold within {timeout:g}s of changes")
            try:
                await asyncio.wait_for(self._event.wait(), remaining)
            except TimeoutError:
                continue


@pytest.fixture
async def fake() -> AsyncIterator[FakeKubeAPI]:
    async with FakeKubeAPI(bookmark_interval=0.05) as server:
        yield server


@pytest.fixture
async def api(fake: FakeKubeAPI, tmp_path: Path) -> AsyncIterator[Any]:
    path = fake.kubeconfig(tmp_path / "kubeconfig")
    client = await make_api_client(path, environ={})
    yield client
    await client.close()


@pytest.fixture
async def start(fake: FakeKubeAPI, api: Any) -> AsyncIterator[Callable[..., Reflector]]:
    """`start(resource, changes, **kw)`: a Reflector running in a task, stopped at teardown."""
    running: list[tuple[Reflector, asyncio.Task[None]]] = []

    def make(resource: Resource, changes: Changes, **kw: Any) -> Reflector:
        kw.setdefault("rng", random.Random(7))
        kw.setdefault("backoff_initial", 0.05)
        kw.setdefault("backoff_max", 0.2)
        refl = Reflector(api, resource, changes, **kw)
        running.append((refl, asyncio.create_task(refl.run())))
        return refl

    yield make
    for refl, task in running:
        await asyncio.wait_for(refl.stop(), STEP)
        assert task.done() and task.result() is None  # run() returned, raised nothing


def put_all(fake: FakeKubeAPI, items: list[dict[str, Any]]) -> None:
    for item in items:
        fake.put(item)


async def synced(refl: Reflector) -> None:
    await asyncio.wait_for(refl.synced.wait(), STEP)


# -- list, watch, resume ------------------------------------------------------------------------

async def test_initial_list_fills_cache_and_sets_synced(fake, start) -> None:
    put_all(fake, objs("Service", ["a", "b", "c"]) + objs("Service", ["d"], namespace="other"))
    changes = Changes()
    refl = start(SERVICES, changes)
    await synced(refl)
    assert refl.cache == fake.objects("Service")
    assert set(refl.cache) == {("default", "a"), ("default", "b"), ("default", "c"),
                               ("other", "d")}
    assert refl.cache[("default", "a")]["kind"] == "Service"  # list items get their TypeMeta
    assert changes.count >= 1
    assert fake.list_calls["services"] == 1
    await fake.wait_for(lambda: fake.watch_calls["services"] == 1, what="a watch")
    first_watch = fake.watch_requests("services")[0]
    assert first_watch["resourceVersion"] == str(fake.rv)  # watched from the list's version
    assert first_watch["allowWatchBookmarks"] == "true"
    assert first_watch["timeoutSeconds"] == "300"
    await eventually(lambda: refl.up, what="the watch connected")
    assert refl.errors == 0 and refl.relists == 0


async def test_added_modified_deleted_reach_the_cache(fake, start) -> None:
    put_all(fake, objs("Service", ["a", "b"]))
    changes = Changes()
    refl = start(SERVICES, changes)
    await synced(refl)

    fake.put(objs("Service", ["c"])[0])
    await changes.until(lambda: ("default", "c") in refl.cache, "ADDED c")

    modified = objs("Service", ["a"])[0]
    modified["metadata"]["annotations"] = {"edgelb.io/port": "10001"}
    fake.put(modified)
    await changes.until(
        lambda: refl.cache[("default", "a")]["metadata"].get("annotations")
        == {"edgelb.io/port": "10001"}, "MODIFIED a")

    fake.delete("Service", "default", "b")
    await changes.until(lambda: ("default", "b") not in refl.cache, "DELETED b")

    assert refl.cache == fake.objects("Service")
    assert refl.versions[""] == str(fake.rv)
    assert fake.list_calls["services"] == 1 and fake.watch_calls["services"] == 1


async def test_bookmarks_advance_the_resume_version(fake, start) -> None:
    put_all(fake, objs("Service", ["a"]))
    refl = start(SERVICES, Changes(), namespaces=("default",))
    await synced(refl)
    await fake.wait_for(lambda: fake.watch_calls["services"] == 1, what="a watch")
    listed_at = fake.watch_requests("services")[0]["resourceVersion"]

    # Changes elsewhere move the global version; this watch sees no event, only bookmarks.
    put_all(fake, objs("Service", ["x", "y"], namespace="other"))
    target = fake.rv
    assert int(listed_at) < target
    sent = fake.bookmarks_sent["services"]
    await fake.wait_for(lambda: fake.bookmarks_sent["services"] > sent, what="a bookmark")

    fake.drop_watches()  # the bookmark went out before the end of the stream
    await fake.wait_for(lambda: fake.watch_calls["services"] == 2, what="the resumed watch")
    assert fake.watch_requests("services")[1]["resourceVersion"] == str(target)
    assert fake.list_calls["services"] == 1 and refl.relists == 0
    assert set(refl.cache) == {("default", "a")}


async def test_server_ended_watch_resumes_without_relist(fake, start) -> None:
    put_all(fake, objs("Service", ["a"]))
    changes = Changes()
    refl = start(SERVICES, changes)
    await synced(refl)
    await fake.wait_for(lambda: fake.watch_calls["services"] == 1, what="a watch")

    fake.drop_watches()
    await fake.wait_for(lambda: fake.watch_calls["services"] == 2, what="the resumed watch")
    fake.put(objs("Service", ["b"])[0])
    await changes.until(lambda: ("default", "b") in refl.cache, "ADDED b after the resume")

    assert fake.list_calls["services"] == 1
    assert refl.relists == 0 and refl.errors == 0


async def test_watch_timeout_is_sent_and_the_watch_is_renewed(fake, start) -> None:
    refl = start(SERVICES, Changes(), watch_timeout=1)
    await synced(refl)
    await fake.wait_for(lambda: fake.watch_calls["services"] == 2, timeout=3,
                        what="a watch renewed after the server's timeoutSeconds")
    assert [q["timeoutSeconds"] for q in fake.watch_requests("services")] == ["1", "1"]
    assert fake.list_calls["services"] == 1 and refl.errors == 0


async def test_compaction_gives_410_and_exactly_one_relist(fake, start) -> None:
    put_all(fake, objs("Service", ["keep", "change", "gone"]))
    changes = Changes()
    refl = start(SERVICES, changes)
    await synced(refl)
    await fake.wait_for(lambda: fake.watch_calls["services"] == 1, what="a watch")
    seen_at = str(fake.rv)

    await fake.stop()  # the reflector is disconnected while things change and history goes
    fake.delete("Service", "default", "gone")
    changed = objs("Service", ["change"])[0]
    changed["metadata"]["labels"] = {"v": "2"}
    fake.put(changed)
    fake.put(objs("Service", ["new"])[0])
    fake.compact()
    await fake.start()

    await changes.until(lambda: refl.cache == fake.objects("Service"),
                        "the cache equal to the server after the relist")
    assert ("default", "gone") not in refl.cache
    assert refl.cache[("default", "change")]["metadata"]["labels"] == {"v": "2"}
    assert refl.relists == 1
    assert fake.list_calls["services"] == 2
    watches = fake.watch_requests("services")
    assert watches[1]["resourceVersion"] == seen_at  # the expired resume attempt
    await fake.wait_for(lambda: fake.watch_calls["services"] == 3, what="the watch after")
    assert fake.watch_requests("services")[2]["resourceVersion"] == str(fake.rv)


async def test_silent_watch_is_noticed_by_the_read_timeout(fake, start) -> None:
    changes = Changes()
    refl = start(SERVICES, changes, read_timeout=0.3)
    await synced(refl)
    await fake.wait_for(lambda: fake.watch_calls["services"] == 1, what="a watch")
    # Bookmarks (every 50 ms) keep a quiet but live watch open past the read timeout.
    sent = fake.bookmarks_sent["services"]
    await fake.wait_for(lambda: fake.bookmarks_sent["services"] >= sent + 8, what="bookmarks")
    assert fake.watch_calls["services"] == 1 and refl.errors == 0

    loop = asyncio.get_running_loop()
    fake.hang_watches()
    hung_at = loop.time()
    await fake.wait_for(lambda: fake.watch_calls["services"] == 2, timeout=3,
                        what="a reconnect after the read timeout")
    assert loop.time() - hung_at >= 0.2  # the last bookmark came at most 50 ms before
    assert refl.errors >= 1

    fake.hang_watches(False)
    fake.put(objs("Service", ["late"])[0])
    await changes.until(lambda: ("default", "late") in refl.cache, "an event after the hang")
    assert fake.list_calls["services"] == 1 and refl.relists == 0


async def test_api_down_backs_off_keeps_the_cache_and_recovers(fake, start, monkeypatch) -> None:
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float) -> None:
        waits.append(delay)
        await real_sleep(delay)

    monkeypatch.setattr(reflector_mod, "_sleep", recording_sleep)
    put_all(fake, objs("Service", ["a", "b"]))
    changes = Changes()
    refl = start(SERVICES, changes, backoff_initial=0.02, backoff_max=0.16)
    await synced(refl)
    await eventually(lambda: refl.up, what="the watch connected")
    before = dict(refl.cache)

    await fake.stop()
    await eventually(lambda: not refl.up, what="up false while the API is down")
    await eventually(lambda: len(waits) >= 6, what="six retries")
    assert refl.cache == before  # stale but serving
    assert refl.errors >= 5
    # Jittered (+-20%) exponential backoff from 0.02 s, doubling, capped at 0.16 s.
    expected = [0.02, 0.04, 0.08, 0.16, 0.16, 0.16]
    for got, base in zip(waits[:6], expected, strict=True):
        assert 0.8 * base <= got <= 1.2 * base, (waits, expected)
    assert len(set(waits[3:6])) > 1  # jittered, not a fixed beat

    await fake.start()
    await eventually(lambda: refl.up, what="up again once the API is back")
    fake.put(objs("Service", ["c"])[0])
    await changes.until(lambda: ("default", "c") in refl.cache, "an event after recovery")
    assert fake.list_calls["services"] == 1 and refl.relists == 0  # resumed, history retained


# -- selectors, namespaces ----------------------------------------------------------------------

def slice_for(service: str, name: str, namespace: str = "default") -> dict[str, Any]:
    obj = objs("EndpointSlice", [name], namespace=namespace,
               labels={"kubernetes.io/service-name": service})[0]
    obj.update(addressType="IPv4", endpoints=[], ports=[])
    return obj


async def test_label_selector_is_honoured(fake, start) -> None:
    put_all(fake, [slice_for("web", "web-1"), slice_for("web", "web-2"),
                   slice_for("api", "api-1")])
    changes = Changes()
    refl = start(ENDPOINTSLICES, changes, label_selector="kubernetes.io/service-name=web")
    await synced(refl)
    assert set(refl.cache) == {("default", "web-1"), ("default", "web-2")}
    assert fake.list_calls["endpointslices"] == 1
    await fake.wait_for(lambda: fake.watch_calls["endpointslices"] == 1, what="a watch")
    assert all(r.query.get("labelSelector") == "kubernetes.io/service-name=web"
               for r in fake.requests if r.plural == "endpointslices")

    fake.put(slice_for("web", "web-3"))
    fake.put(slice_for("api", "api-2"))
    fake.put(slice_for("api", "web-1"))  # relabelled: leaves the selection
    await changes.until(lambda: set(refl.cache) == {("default", "web-2"), ("default", "web-3")},
                        "the selection after relabelling")


async def test_field_selector_is_honoured(fake, start) -> None:
    tls = objs("Secret", ["cert-a", "cert-b"])
    for s in tls:
        s["type"] = "kubernetes.io/tls"
    opaque = objs("Secret", ["password"])
    opaque[0]["type"] = "Opaque"
    put_all(fake, tls + opaque)
    changes = Changes()
    refl = start(SECRETS, changes, field_selector="type=kubernetes.io/tls")
    await synced(refl)
    assert set(refl.cache) == {("default", "cert-a"), ("default", "cert-b")}
    assert all(r.query.get("fieldSelector") == "type=kubernetes.io/tls"
               for r in fake.requests if r.plural == "secrets")

    more = objs("Secret", ["cert-c", "other"])
    more[0]["type"] = "kubernetes.io/tls"
    more[1]["type"] = "Opaque"
    put_all(fake, more)
    await changes.until(lambda: ("default", "cert-c") in refl.cache, "the new TLS secret")
    assert ("default", "other") not in refl.cache


async def test_namespaces_filter_one_watch_each_one_cache(fake, start) -> None:
    put_all(fake, objs("Service", ["a1"], namespace="a") + objs("Service", ["b1"], namespace="b")
            + objs("Service", ["c1"], namespace="c"))
    changes = Changes()
    refl = start(SERVICES, changes, namespaces=("a", "b", "a"))
    await synced(refl)
    assert set(refl.cache) == {("a", "a1"), ("b", "b1")}
    assert fake.list_calls["services"] == 2
    await fake.wait_for(lambda: fake.watch_calls["services"] == 2, what="two watches")
    assert sorted(r.path for r in fake.requests if r.watch) == [
        "/api/v1/namespaces/a/services", "/api/v1/namespaces/b/services"]
    await eventually(lambda: refl.up, what="both watches connected")

    put_all(fake, objs("Service", ["c2"], namespace="c") + objs("Service", ["b2"], namespace="b"))
    await changes.until(lambda: ("b", "b2") in refl.cache, "an event in namespace b")
    fake.delete("Service", "a", "a1")
    await changes.until(lambda: ("a", "a1") not in refl.cache, "a delete in namespace a")
    assert set(refl.cache) == {("b", "b1"), ("b", "b2")}


async def test_cluster_scoped_kinds_ignore_namespaces(fake, start) -> None:
    edgelb_class = {"kind": "IngressClass", "metadata": {"name": "edgelb"},
                    "spec": {"controller": "edgelb.io/ingress-controller"}}
    put_all(fake, [*objs("Node", ["n1", "n2"]), edgelb_class])
    nodes = start(NODES, Changes(), namespaces=("default",))
    classes = start(INGRESSCLASSES, Changes())
    await synced(nodes)
    await synced(classes)
    assert set(nodes.cache) == {("", "n1"), ("", "n2")}
    assert classes.cache[("", "edgelb")]["spec"]["controller"] == "edgelb.io/ingress-controller"
    assert {r.path for r in fake.requests if r.plural in ("nodes", "ingressclasses")} == {
        "/api/v1/nodes", "/apis/networking.k8s.io/v1/ingressclasses"}


# -- lifecycle, errors, credentials -------------------------------------------------------------

async def test_stop_and_cancel_keep_the_cache(fake, api) -> None:
    put_all(fake, objs("Service", ["a"]))
    refl = Reflector(api, SERVICES, Changes())
    task = asyncio.create_task(refl.run())
    await synced(refl)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert set(refl.cache) == {("default", "a")} and not refl.up

    again = Reflector(api, SERVICES, Changes())
    task = asyncio.create_task(again.run())
    await synced(again)
    await asyncio.wait_for(again.stop(), STEP)
    assert task.done() and task.result() is None
    assert set(again.cache) == {("default", "a")}
    await fake.wait_for(lambda: fake.open_watches == 0, what="the watches closed")


async def test_a_failing_on_change_does_not_stop_the_reflector(fake, start) -> None:
    calls = Changes()

    def broken() -> None:
        calls()
        raise RuntimeError("translator bug")

    refl = start(SERVICES, broken)
    await synced(refl)
    fake.put(objs("Service", ["a"])[0])
    await calls.until(lambda: ("default", "a") in refl.cache, "an event after the failure")
    assert refl.errors == 0


async def test_a_scope_loop_that_fails_ends_run_with_its_error_and_a_new_run_resyncs(
    fake, api
) -> None:
    """A bug in one scope's loop is not silent: run() stops the other scopes and raises it (the
    Kubernetes watcher then restarts the reflector); the cache is kept and a new run lists."""
    put_all(fake, objs("Service", ["a"], namespace="one") + objs("Service", ["b"], namespace="two"))
    refl = Reflector(api, SERVICES, Changes(), namespaces=("one", "two"))
    real = refl._follow
    broken = asyncio.Event()

    async def follow(ns: str) -> None:
        if ns == "two" and not broken.is_set():
            await fake.wait_for(lambda: fake.open_watches == 1, what="scope one watching")
            broken.set()
            raise RuntimeError("a bug in the loop")
        await real(ns)

    refl._follow = follow  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        await asyncio.wait_for(refl.run(), STEP)
    await fake.wait_for(lambda: fake.open_watches == 0, what="the other scope's watch closed")
    assert ("one", "a") in refl.cache and not refl.up
    fake.put(objs("Service", ["c"], namespace="two")[0])
    task = asyncio.create_task(refl.run())  # what the supervisor does
    await eventually(lambda: ("two", "c") in refl.cache and refl.up, timeout=STEP,
                     what="the new run to list both scopes and watch")
    await asyncio.wait_for(refl.stop(), STEP)
    assert task.done() and task.result() is None


async def test_token_auth_and_401(fake, tmp_path) -> None:
    fake.token = "s3cret"
    fake.put(objs("Service", ["a"])[0])
    good = await make_api_client(fake.kubeconfig(tmp_path / "good"), environ={})
    bad = await make_api_client(fake.kubeconfig(tmp_path / "bad", token="wrong"), environ={})
    try:
        items, rv = await list_objects(good, SERVICES)
        assert [i["metadata"]["name"] for i in items] == ["a"] and rv == str(fake.rv)
        with pytest.raises(KubeApiError) as err:
            await list_objects(bad, SERVICES, "default")
        assert err.value.code == 401 and "services in default" in str(err.value)

        refl = Reflector(bad, SERVICES, Changes(), backoff_initial=0.01, backoff_max=0.02)
        task = asyncio.create_task(refl.run())
        await eventually(lambda: refl.errors >= 3, what="errors counted")
        assert not refl.synced.is_set() and not refl.up and refl.cache == {}
        await refl.stop()
        assert task.result() is None
    finally:
        await good.close()
        await bad.close()


async def test_credentials_order(fake, tmp_path) -> None:
    from_env = fake.kubeconfig(tmp_path / "env-config")
    api = await make_api_client(None, environ={"KUBECONFIG": f"{tmp_path}/missing:{from_env}"})
    try:
        items, _ = await list_objects(api, SERVICES)
        assert items == []
    finally:
        await api.close()

    with pytest.raises(CredentialsError) as err:
        await make_api_client(tmp_path / "nope", environ={})
    msg = str(err.value)
    assert "in-cluster" in msg and "nope" in msg and "$KUBECONFIG (not set)" in msg

    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("pod-token")
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n(only checked to be non-empty)\n")
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443",
           "KUBECONFIG": str(from_env)}
    cfg = await load_configuration(tmp_path / "also-set", environ=env,
                                   token_path=str(sa / "token"), ca_path=str(sa / "ca.crt"))
    assert cfg.host == "https://10.0.0.1:443"  # in-cluster wins over both kubeconfigs
    assert cfg.ssl_ca_cert == str(sa / "ca.crt")
    assert (await cfg.get_api_key_with_prefix("BearerToken")) == "bearer pod-token"
    (sa / "token").write_text("rotated")  # re-read by the client's refresh hook (after 1 min)

    # In a pod without a mounted token: fall back to the kubeconfig.
    cfg = await load_configuration(None, environ=env, token_path=str(sa / "absent"),
                                   ca_path=str(sa / "ca.crt"))
    assert cfg.host == fake.url


# -- the fake's write paths, through the official client's typed API ----------------------------

async def test_fake_accepts_events_status_and_leases(fake, api) -> None:
    core = k8s.CoreV1Api(api)
    net = k8s.NetworkingV1Api(api)
    coord = k8s.CoordinationV1Api(api)

    event = await core.create_namespaced_event("default", {
        "metadata": {"generateName": "edgelb."}, "reason": "Synced", "message": "ok",
        "involvedObject": {"kind": "Ingress", "namespace": "default", "name": "web"}})
    await core.patch_namespaced_event(event.metadata.name, "default", {"count": 2})
    assert [e.get("count") for e in fake.events] == [None, 2]

    fake.put({"kind": "Ingress", "metadata": {"name": "web"},
              "spec": {"ingressClassName": "edgelb"}})
    rv = fake.rv
    body = {"metadata": {"name": "web", "namespace": "default"},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}}
    updated = await net.replace_namespaced_ingress_status("web", "default", body)
    assert updated.status.load_balancer.ingress[0].ip == "192.0.2.10"
    assert int(updated.metadata.resource_version) == rv + 1
    assert fake.status_updates == [("default", "web", body["status"])]
    assert fake.get("Ingress", "default", "web")["spec"] == {"ingressClassName": "edgelb"}

    lease = await coord.create_namespaced_lease("default", {
        "metadata": {"name": "edgelb-leader"}, "spec": {"holderIdentity": "pod-1"}})
    stale = lease.metadata.resource_version
    lease.spec.holder_identity = "pod-2"
    await coord.replace_namespaced_lease("edgelb-leader", "default", lease)
    lease.metadata.resource_version = stale
    with pytest.raises(k8s.ApiException) as err:
        await coord.replace_namespaced_lease("edgelb-leader", "default", lease)
    assert err.value.status == 409
    got = await coord.read_namespaced_lease("edgelb-leader", "default")
    assert got.spec.holder_identity == "pod-2"
