"""The Gateway API status writer against the fake API server: merge patches of /status, the
lastTransitionTime of a condition kept while its status stays, failures retried."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from gateway_objects import gateway, gateway_class, http_route, listener, parent, rule
from k8s_fake import FakeKubeAPI

from watchers.kubernetes.client import make_api_client
from watchers.kubernetes.gateway.status import GatewayStatusWriter, gateway_addresses
from watchers.kubernetes.gateway.translate import StatusUpdate

pytestmark = pytest.mark.timeout(30)

Obj = dict[str, Any]
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[FakeKubeAPI, GatewayStatusWriter, Clock]]:
    fake = FakeKubeAPI()
    await fake.start()
    api = await make_api_client(str(fake.kubeconfig(tmp_path / "kc")), environ={})
    clock = Clock()
    try:
        yield fake, GatewayStatusWriter(api, clock=clock), clock
    finally:
        await api.close()
        await fake.stop()


def cond(kind: str, ok: bool, reason: str) -> Obj:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason,
            "message": reason, "observedGeneration": 1}


def caches(fake: FakeKubeAPI) -> dict[str, dict]:
    return {"gatewayclasses": fake.objects("GatewayClass"), "gateways": fake.objects("Gateway"),
            "httproutes": fake.objects("HTTPRoute")}


def test_addresses() -> None:
    assert gateway_addresses(["lb.example.com", "203.0.113.10", " ", "203.0.113.10"]) == [
        {"type": "Hostname", "value": "lb.example.com"},
        {"type": "IPAddress", "value": "203.0.113.10"}]


async def test_conditions_keep_their_time_until_their_status_changes(
        setup: tuple[FakeKubeAPI, GatewayStatusWriter, Clock]) -> None:
    fake, writer, clock = setup
    fake.put(gateway_class())
    fake.put(gateway("gw", [listener("http")]))
    gw_status = {"conditions": [cond("Accepted", True, "Accepted"),
                                cond("Programmed", True, "Programmed")],
                 "listeners": [{"name": "http", "supportedKinds": [], "attachedRoutes": 0,
                                "conditions": [cond("Accepted", True, "Accepted")]}]}
    updates = [StatusUpdate("gatewayclasses", ("", "edgelb"),
                            {"conditions": [cond("Accepted", True, "Accepted")]}),
               StatusUpdate("gateways", ("default", "gw"), gw_status)]
    assert await writer.publish(updates, ["203.0.113.10"], caches(fake)) == 2
    st = fake.get("Gateway", "default", "gw")["status"]  # type: ignore[index]
    assert st["addresses"] == [{"type": "IPAddress", "value": "203.0.113.10"}]
    assert {c["lastTransitionTime"] for c in st["conditions"]} == {"2027-01-15T08:00:00Z"}
    assert await writer.publish(updates, ["203.0.113.10"], caches(fake)) == 0  # unchanged
    clock.now += 60
    gw_status["conditions"][1] = cond("Programmed", False, "Invalid")
    assert await writer.publish(updates, ["203.0.113.10"], caches(fake)) == 1
    st = fake.get("Gateway", "default", "gw")["status"]  # type: ignore[index]
    times = {c["type"]: c["lastTransitionTime"] for c in st["conditions"]}
    assert times == {"Accepted": "2027-01-15T08:00:00Z", "Programmed": "2027-01-15T08:01:00Z"}
    assert writer.writes == 3 and not writer.needs_retry


async def test_a_failed_write_is_retried_and_a_vanished_object_forgotten(
        setup: tuple[FakeKubeAPI, GatewayStatusWriter, Clock]) -> None:
    fake, writer, _ = setup
    fake.put(http_route("r", [parent("gw")], [rule([])]))
    update = StatusUpdate("httproutes", ("default", "r"), {"parents": [
        {"parentRef": {"name": "gw"}, "controllerName": "edgelb.io/gateway-controller",
         "conditions": [cond("Accepted", True, "Accepted")]}]})
    current = caches(fake)
    await fake.stop()
    assert await writer.publish([update], [], current) == 0
    assert writer.needs_retry and writer.errors == 1
    await fake.start()
    assert await writer.publish([update], [], current) == 1
    assert not writer.needs_retry
    fake.delete("HTTPRoute", "default", "r")
    changed = StatusUpdate("httproutes", ("default", "r"), {"parents": [
        {**update.status["parents"][0], "conditions": [cond("Accepted", False, "NoMatch")]}]})
    patches = sum(r.method == "PATCH" for r in fake.requests)
    assert await writer.publish([changed], [], current) == 0  # 404: gone, not an error
    assert sum(r.method == "PATCH" for r in fake.requests) == patches + 1
    assert not writer.needs_retry and writer.errors == 1
