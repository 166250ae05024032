"""FakeKubeAPI serves the Gateway API as a cluster with its CRDs does (and 404s without them),
read through the official client and edgelb's reflector."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gateway_objects import gateway_class, http_route, parent, rule
from k8s_fake import FakeKubeAPI

from watchers.kubernetes.client import make_api_client
from watchers.kubernetes.gateway.resources import (
    GATEWAYCLASSES,
    HTTPROUTES,
    TCPROUTES,
    served_kinds,
)
from watchers.kubernetes.leader import MERGE_PATCH, request_json
from watchers.kubernetes.reflector import KubeApiError, Reflector, list_objects

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[FakeKubeAPI, object]]:
    fake = FakeKubeAPI(bookmark_interval=0.05, absent={"tcproutes"})
    await fake.start()
    client = await make_api_client(str(fake.kubeconfig(tmp_path / "kc")), environ={})
    try:
        yield fake, client
    finally:
        await client.close()
        await fake.stop()


async def test_discovery_list_watch_and_status(api: tuple[FakeKubeAPI, object]) -> None:
    fake, client = api
    served = await served_kinds(client)
    assert {"gatewayclasses", "gateways", "httproutes", "grpcroutes", "tlsroutes",
            "referencegrants", "backendtlspolicies"} <= served
    assert "tcproutes" not in served
    with pytest.raises(KubeApiError) as e:
        await list_objects(client, TCPROUTES)
    assert e.value.code == 404
    fake.put(gateway_class())
    items, _ = await list_objects(client, GATEWAYCLASSES)
    assert [i["metadata"]["name"] for i in items] == ["edgelb"]
    assert items[0]["kind"] == "GatewayClass"
    changed = asyncio.Event()
    r = Reflector(client, HTTPROUTES, changed.set, read_timeout=5)
    task = asyncio.create_task(r.run())
    try:
        await asyncio.wait_for(r.synced.wait(), 5)
        route = http_route("r", [parent("gw")], [rule([])])
        fake.put(route)
        await fake.wait_for(lambda: ("default", "r") in r.cache, what="the route watched")
        assert r.cache[("default", "r")]["metadata"]["generation"] == 1
        await fake.wait_for(lambda: fake.bookmarks_sent["httproutes"] > 0, what="a bookmark")
        # status through the subresource: the generation stays, the spec is untouched
        path = f"{HTTPROUTES.path('default')}/r/status"
        doc = await request_json(client, "PATCH", path, {"status": {"parents": []}},
                                 content_type=MERGE_PATCH)
        assert doc["status"] == {"parents": []} and doc["metadata"]["generation"] == 1
        route["spec"]["hostnames"] = ["a.example.com"]
        assert fake.put(route)["metadata"]["generation"] == 2
        fake.compact()
        fake.drop_watches()
        await fake.wait_for(lambda: r.relists >= 1, what="a relist after 410")
    finally:
        await r.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_cluster_without_the_crds(tmp_path: Path) -> None:
    async with FakeKubeAPI(gateway_api=False) as fake:
        client = await make_api_client(str(fake.kubeconfig(tmp_path / "kc")), environ={})
        try:
            assert await served_kinds(client) == set()
            with pytest.raises(KubeApiError) as e:
                await list_objects(client, GATEWAYCLASSES)
            assert e.value.code == 404
        finally:
            await client.close()
