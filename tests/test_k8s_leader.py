"""Leader election, Ingress status and Events against FakeKubeAPI, through the official client,
on loopback.

Waits are on events: leadership changes (`on_change`), requests and changes at the fake
(`wait_for`). Durations are short (a 1 s lease) so takeovers happen within the test's seconds.
`Fake` below adds to FakeKubeAPI, for these tests only: a gate that holds Lease reads until two
replicas have read (a forced race), hanging Lease writes (an API that stops answering), and
injected failure answers for the next writes.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from k8s_fake import FakeKubeAPI, status_object

from watchers.kubernetes.client import make_api_client
from watchers.kubernetes.events import EventRecorder, rfc3339
from watchers.kubernetes.leader import LeaderElector, micro_time, parse_time
from watchers.kubernetes.status import StatusWriter, addresses_from_service, lb_entries

pytestmark = pytest.mark.timeout(30)

STEP = 5.0
LEASE, RENEW, RETRY = 1.0, 0.2, 0.05
NS, LEASE_NAME = "edgelb", "edgelb-leader"
MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class Fake(FakeKubeAPI):
    """FakeKubeAPI with failure controls for these tests (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(bookmark_interval=0.05)
        self.lease_gate: asyncio.Barrier | None = None  # Lease GETs wait here while set
        self.hang_lease_writes = False
        self.fail_writes: list[int] = []  # codes answered to the next non-Lease writes
        self.failed_writes = 0  # answered so (they are not in `requests`)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        lease = "/leases" in request.path
        if lease and request.method == "GET" and self.lease_gate is not None:
            await self.lease_gate.wait()
        if lease and request.method != "GET" and self.hang_lease_writes:
            await asyncio.Event().wait()  # until the client gives up (the handler is cancelled)
        if not lease and request.method != "GET" and self.fail_writes:
            code = self.fail_writes.pop(0)
            self.failed_writes += 1
            return web.json_response(status_object(code, "InternalError", "injected"),
                                     status=code)
        return await super()._handle(request)

    def count(self, plural: str, method: str, suffix: str = "") -> int:
        return sum(1 for r in self.requests
                   if r.plural == plural and r.method == method and r.path.endswith(suffix))

    def lease(self) -> dict[str, Any]:
        obj = self.get("Lease", NS, LEASE_NAME)
        assert obj is not None, "no Lease was written"
        return obj["spec"]


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    async with Fake() as server:
        yield server


@pytest.fixture
async def client_for(fake: Fake, tmp_path: Path) -> AsyncIterator[Callable[[], Any]]:
    """`await client_for()`: a new ApiClient on the fake (one per replica), closed at teardown."""
    path = fake.kubeconfig(tmp_path / "kubeconfig")
    clients: list[Any] = []

    async def make() -> Any:
        clients.append(await make_api_client(path, environ={}))
        return clients[-1]

    yield make
    for c in clients:
        await c.close()


@pytest.fixture
async def api(client_for: Callable[[], Any]) -> Any:
    return await client_for()


# -- leader election ------------------------------------------------------------------------------

class Leaders:
    """Every elector's `on_change`: records (identity, leader, time) and flags two leaders."""

    def __init__(self) -> None:
        self.log: list[tuple[str, bool, float]] = []
        self.current: set[str] = set()
        self.overlaps: list[set[str]] = []
        self._changed = asyncio.Event()

    def callback(self, identity: str) -> Callable[[bool], None]:
        def on_change(leader: bool) -> None:
            self.log.append((identity, leader, time.time()))
            if leader:
                if self.current:
                    self.overlaps.append(self.current | {identity})
                self.current.add(identity)
            else:
                self.current.discard(identity)
            self._changed.set()
        return on_change

    def when(self, identity: str, leader: bool) -> float:
        return next(t for i, v, t in reversed(self.log) if i == identity and v == leader)

    async def until(self, predicate: Callable[[], bool], what: str,
                    timeout: float = STEP) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"{what} did not happen within {timeout:g}s")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue


@pytest.fixture
async def elect(client_for: Callable[[], Any]) -> AsyncIterator[Any]:
    """`await elect(identity, leaders, run=True, **kw)`: an elector (running in a task unless
    run=False) with the short test durations; tasks are cancelled and checked at teardown."""
    tasks: dict[str, asyncio.Task[None]] = {}

    async def make(identity: str, leaders: Leaders, run: bool = True,
                   **kw: Any) -> LeaderElector:
        kw = {"lease_seconds": LEASE, "renew_every": RENEW, "retry_every": RETRY, **kw}
        elector = LeaderElector(await client_for(), NS, LEASE_NAME, identity,
                                on_change=leaders.callback(identity), **kw)
        if run:
            tasks[identity] = asyncio.create_task(elector.run())
        return elector

    make.tasks = tasks  # type: ignore[attr-defined]
    yield make
    for task in tasks.values():
        task.cancel()
    for task in tasks.values():
        try:
            await asyncio.wait_for(task, STEP)
        except asyncio.CancelledError:
            pass  # run() raises nothing but its cancellation


async def stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, STEP)


async def test_two_electors_one_leader_that_renews(fake: Fake, elect: Any) -> None:
    leaders = Leaders()
    a = await elect("replica-a", leaders)
    b = await elect("replica-b", leaders)
    await leaders.until(lambda: len(leaders.current) == 1, "a leader elected")
    (winner,) = leaders.current
    leader, follower = (a, b) if winner == "replica-a" else (b, a)
    puts = fake.count("leases", "PUT")
    await fake.wait_for(lambda: fake.count("leases", "PUT") >= puts + 3, what="3 renewals")
    assert leader.is_leader and not follower.is_leader
    assert follower.holder == leader.identity
    spec = fake.lease()
    assert spec["holderIdentity"] == leader.identity
    assert spec["leaseDurationSeconds"] == 1
    assert spec["leaseTransitions"] == 0  # created by the winner, never changed hands
    assert MICRO_TIME.match(spec["renewTime"]) and MICRO_TIME.match(spec["acquireTime"])
    assert parse_time(spec["renewTime"]) > parse_time(spec["acquireTime"])  # renewed
    assert fake.count("leases", "POST") >= 1
    assert leaders.overlaps == [] and leader.errors == 0


async def test_leader_that_stops_renewing_is_replaced_after_the_lease(fake: Fake,
                                                                      elect: Any) -> None:
    leaders = Leaders()
    a = await elect("replica-a", leaders)
    await leaders.until(lambda: a.is_leader, "replica-a leading")
    b = await elect("replica-b", leaders)
    await fake.wait_for(lambda: fake.count("leases", "GET") >= 3, what="replica-b polling")
    assert not b.is_leader
    await stop_task(elect.tasks["replica-a"])  # a crash: no release
    assert not a.is_leader  # nothing renews any more
    last_renew = parse_time(fake.lease()["renewTime"])
    await leaders.until(lambda: b.is_leader, "replica-b taking over", timeout=LEASE + STEP)
    taken = leaders.when("replica-b", True)
    assert taken >= last_renew + LEASE  # not before the lease ran out
    assert taken - (last_renew + LEASE) < 1.0  # but soon after (retry_every is 50 ms)
    spec = fake.lease()
    assert spec["holderIdentity"] == "replica-b" and spec["leaseTransitions"] == 1
    assert leaders.overlaps == []


async def test_release_hands_over_at_once_and_stops_run(fake: Fake, elect: Any) -> None:
    leaders = Leaders()
    a = await elect("replica-a", leaders, lease_seconds=10)  # expiry would take 10 s
    await leaders.until(lambda: a.is_leader, "replica-a leading")
    b = await elect("replica-b", leaders, lease_seconds=10)
    start = time.monotonic()
    assert await a.release() is True
    assert not a.is_leader
    await asyncio.wait_for(elect.tasks["replica-a"], STEP)  # run() returned on its own
    await leaders.until(lambda: b.is_leader, "replica-b taking over", timeout=2)
    assert time.monotonic() - start < 2
    spec = fake.lease()
    assert spec["holderIdentity"] == "replica-b" and spec["leaseTransitions"] == 1
    assert await a.release() is False  # nothing held any more
    assert leaders.overlaps == []


async def test_release_leaves_a_lease_another_replica_holds(fake: Fake, elect: Any) -> None:
    leaders = Leaders()
    a = await elect("replica-a", leaders, run=False)
    assert await a.try_acquire()
    lease = fake.get("Lease", NS, LEASE_NAME)
    lease["spec"]["holderIdentity"] = "replica-b"  # taken over while a was not looking
    fake.put(lease)
    assert await a.release() is False
    assert fake.lease()["holderIdentity"] == "replica-b"


@pytest.mark.parametrize("existing", [False, True], ids=["create", "take-over"])
async def test_racing_replicas_one_winner(fake: Fake, elect: Any, existing: bool) -> None:
    if existing:  # held by a replica that died 10 s ago
        fake.put({"kind": "Lease", "metadata": {"name": LEASE_NAME, "namespace": NS},
                  "spec": {"holderIdentity": "dead", "leaseDurationSeconds": 1,
                           "renewTime": micro_time(time.time() - 10), "leaseTransitions": 4}})
    leaders = Leaders()
    a = await elect("replica-a", leaders, run=False)
    b = await elect("replica-b", leaders, run=False)
    fake.lease_gate = asyncio.Barrier(2)  # both read the same version before either writes
    results = await asyncio.wait_for(asyncio.gather(a.try_acquire(), b.try_acquire()), STEP)
    fake.lease_gate = None
    assert sorted(results) == [False, True]
    winner, loser = (a, b) if results[0] else (b, a)
    assert winner.is_leader and not loser.is_leader
    assert fake.count("leases", "GET") == 2
    assert fake.count("leases", "PUT" if existing else "POST") == 2  # one of them got 409
    spec = fake.lease()
    assert spec["holderIdentity"] == winner.identity
    assert spec["leaseTransitions"] == (5 if existing else 0)
    assert loser.errors == 0  # losing a race is not an error
    assert leaders.overlaps == []


@pytest.mark.parametrize("outage", ["refused", "hanging"])
async def test_leader_steps_down_before_the_lease_can_pass(fake: Fake, elect: Any,
                                                           outage: str) -> None:
    leaders = Leaders()
    lease = 1.5
    a = await elect("replica-a", leaders, lease_seconds=lease, request_timeout=30)
    await leaders.until(lambda: a.is_leader, "replica-a leading")
    await fake.wait_for(lambda: fake.count("leases", "PUT") >= 1, what="a renewal")
    if outage == "refused":
        await fake.stop()
    else:
        fake.hang_lease_writes = True  # renewals hang; the 30 s request timeout must not hold
    await leaders.until(lambda: not a.is_leader, "replica-a stepping down", timeout=lease + 1)
    down = leaders.when("replica-a", False)
    # The last renewal that went through: others may take over at last_renew + lease.
    assert down < a.last_renew + lease
    assert down >= a.last_renew + a.renew_deadline - 0.05
    assert a.errors >= 1
    if outage == "refused":
        await fake.start()
    else:
        fake.hang_lease_writes = False
    await leaders.until(lambda: a.is_leader, "replica-a leading again")
    assert fake.lease()["holderIdentity"] == "replica-a"


async def test_leader_steps_down_at_once_when_the_lease_is_taken(fake: Fake,
                                                                 elect: Any) -> None:
    leaders = Leaders()
    a = await elect("replica-a", leaders, lease_seconds=10)
    await leaders.until(lambda: a.is_leader, "replica-a leading")
    lease = fake.get("Lease", NS, LEASE_NAME)
    lease["spec"].update(holderIdentity="intruder", renewTime=micro_time(time.time()))
    fake.put(lease)
    await leaders.until(lambda: not a.is_leader, "replica-a stepping down", timeout=2)
    assert a.holder == "intruder"
    gets = fake.count("leases", "GET")
    await fake.wait_for(lambda: fake.count("leases", "GET") >= gets + 3, what="polling")
    assert not a.is_leader and fake.lease()["holderIdentity"] == "intruder"


async def test_lease_without_times_expires_after_its_duration_seen_here(fake: Fake,
                                                                        elect: Any) -> None:
    fake.put({"kind": "Lease", "metadata": {"name": LEASE_NAME, "namespace": NS},
              "spec": {"holderIdentity": "ghost", "leaseDurationSeconds": 1}})
    leaders = Leaders()
    a = await elect("replica-a", leaders)
    start = time.monotonic()
    await leaders.until(lambda: a.is_leader, "replica-a taking over", timeout=LEASE + STEP)
    assert time.monotonic() - start >= 1.0 - 0.05


async def test_on_change_errors_do_not_stop_the_election(fake: Fake, client_for: Any) -> None:
    calls: list[bool] = []

    def on_change(leader: bool) -> None:
        calls.append(leader)
        raise RuntimeError("boom")

    a = LeaderElector(await client_for(), NS, LEASE_NAME, "replica-a", lease_seconds=LEASE,
                      renew_every=RENEW, retry_every=RETRY, on_change=on_change)
    task = asyncio.create_task(a.run())
    await fake.wait_for(lambda: calls == [True], what="on_change(True)")
    puts = fake.count("leases", "PUT")
    await fake.wait_for(lambda: fake.count("leases", "PUT") >= puts + 2, what="renewals")
    assert a.is_leader and not task.done()
    await stop_task(task)
    assert calls == [True, False] and not a.is_leader


def test_elector_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="two thirds of lease_seconds"):
        LeaderElector(None, NS, LEASE_NAME, "me", lease_seconds=3, renew_every=2)
    with pytest.raises(ValueError, match="identity"):
        LeaderElector(None, NS, LEASE_NAME, "")
    with pytest.raises(ValueError, match="above 0"):
        LeaderElector(None, NS, LEASE_NAME, "me", retry_every=0)


def test_micro_time_round_trips() -> None:
    stamp = micro_time(1_800_000_000.123456)
    assert stamp == "2027-01-15T08:00:00.123456Z"
    assert parse_time(stamp) == pytest.approx(1_800_000_000.123456)
    assert parse_time("2027-01-15T08:00:00Z") == 1_800_000_000
    assert parse_time("yesterday") is None and parse_time(None) is None


# -- Ingress status -------------------------------------------------------------------------------

def ingress(name: str, namespace: str = "default", addresses: list[dict[str, str]] | None = None,
            ) -> dict[str, Any]:
    obj: dict[str, Any] = {"kind": "Ingress", "apiVersion": "networking.k8s.io/v1",
                           "metadata": {"name": name, "namespace": namespace},
                           "spec": {"ingressClassName": "edgelb"}}
    if addresses is not None:
        obj["status"] = {"loadBalancer": {"ingress": addresses}}
    return obj


def lb(obj: dict[str, Any] | None) -> Any:
    return ((obj or {}).get("status") or {}).get("loadBalancer", {}).get("ingress")


A, B, C = ("default", "a"), ("default", "b"), ("other", "c")


async def test_status_written_exactly_when_it_differs(fake: Fake, api: Any) -> None:
    fake.put(ingress("a"))
    fake.put(ingress("b", addresses=[{"ip": "10.0.0.1"}]))
    writer = StatusWriter(api)
    stale = fake.objects("Ingress")
    assert await writer.publish([A, B], ["10.0.0.1"], stale) == 1
    assert fake.status_updates == [("default", "a",
                                    {"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}})]
    # The cache has not caught up with our write yet: still nothing to do.
    assert await writer.publish([A, B], ["10.0.0.1"], stale) == 0
    assert await writer.publish([A, B], ["10.0.0.1"], fake.objects("Ingress")) == 0
    assert len(fake.status_updates) == 1
    # New addresses: both change, once each.
    assert await writer.publish([A, B], ["10.0.0.2"], fake.objects("Ingress")) == 2
    assert await writer.publish([A, B], ["10.0.0.2"], fake.objects("Ingress")) == 0
    assert len(fake.status_updates) == 3
    assert lb(fake.get("Ingress", "default", "b")) == [{"ip": "10.0.0.2"}]
    assert writer.published == {A, B} and writer.errors == 0 and not writer.needs_retry


async def test_status_ip_and_hostname(fake: Fake, api: Any) -> None:
    fake.put(ingress("a", addresses=[{"ip": "2001:db8::1"}, {"hostname": "lb.example.com"},
                                     {"ip": "10.0.0.1"}]))
    fake.put(ingress("c", namespace="other"))
    writer = StatusWriter(api)
    addresses = ["lb.example.com", "10.0.0.1", "2001:db8::1", "10.0.0.1", " "]
    # Same addresses in another order: no write.
    assert await writer.publish([A, C], addresses, fake.objects("Ingress")) == 1
    assert lb(fake.get("Ingress", "other", "c")) == [
        {"hostname": "lb.example.com"}, {"ip": "10.0.0.1"}, {"ip": "2001:db8::1"}]
    assert fake.status_updates[0][:2] == ("other", "c")
    assert lb_entries(["1.2.3.4", "a.b", "::1", "300.1.1.1"]) == [
        {"hostname": "300.1.1.1"}, {"hostname": "a.b"}, {"ip": "1.2.3.4"}, {"ip": "::1"}]


async def test_status_conflict_is_read_again_and_retried_once(fake: Fake, api: Any) -> None:
    fake.put(ingress("a"))
    stale = fake.objects("Ingress")
    edited = fake.get("Ingress", "default", "a")
    edited["metadata"]["labels"] = {"team": "x"}  # someone edits it: the cache is behind
    fake.put(edited)
    writer = StatusWriter(api)
    assert await writer.publish([A], ["10.0.0.1"], stale) == 1
    assert fake.count("ingresses", "PUT", "/status") == 2  # 409, then the retry
    assert fake.count("ingresses", "GET") == 1
    now = fake.get("Ingress", "default", "a")
    assert lb(now) == [{"ip": "10.0.0.1"}] and now["metadata"]["labels"] == {"team": "x"}
    assert writer.errors == 0


async def test_status_conflict_settled_by_the_read_writes_nothing(fake: Fake, api: Any) -> None:
    fake.put(ingress("a"))
    stale = fake.objects("Ingress")
    fake.put(ingress("a", addresses=[{"ip": "10.0.0.1"}]))  # a previous leader wrote it
    writer = StatusWriter(api)
    assert await writer.publish([A], ["10.0.0.1"], stale) == 0
    assert fake.count("ingresses", "PUT", "/status") == 1 and fake.status_updates == []
    assert writer.errors == 0 and not writer.needs_retry


async def test_status_errors_are_counted_and_retried_on_the_next_publish(fake: Fake,
                                                                         api: Any) -> None:
    fake.put(ingress("a"))
    fake.put(ingress("b"))
    writer = StatusWriter(api)
    fake.fail_writes = [500]  # the first write fails, the second goes through
    assert await writer.publish([A, B], ["10.0.0.1"], fake.objects("Ingress")) == 1
    assert writer.errors == 1 and writer.needs_retry and fake.failed_writes == 1
    assert [u[1] for u in fake.status_updates] == ["b"]
    await fake.stop()  # no API at all: no exception either
    assert await writer.publish([A, B], ["10.0.0.1"], fake.objects("Ingress")) == 0
    assert writer.errors == 2 and writer.needs_retry
    await fake.start()
    assert await writer.publish([A, B], ["10.0.0.1"], fake.objects("Ingress")) == 1
    assert [u[1] for u in fake.status_updates] == ["b", "a"]
    assert not writer.needs_retry


async def test_status_of_a_deleted_ingress_is_skipped(fake: Fake, api: Any) -> None:
    fake.put(ingress("a"))
    current = fake.objects("Ingress")
    fake.delete("Ingress", "default", "a")
    writer = StatusWriter(api)
    assert await writer.publish([A, B], ["10.0.0.1"], current) == 0  # b: not in the cache
    assert writer.errors == 0 and not writer.needs_retry and writer.published == set()


async def test_clear_empties_only_the_status_we_published(fake: Fake, api: Any) -> None:
    fake.put(ingress("a"))
    fake.put(ingress("b", addresses=[{"ip": "192.0.2.9"}]))  # another controller's
    writer = StatusWriter(api)
    assert await writer.publish([A], ["10.0.0.1"], fake.objects("Ingress")) == 1
    assert await writer.clear([A, B], fake.objects("Ingress")) == 1
    assert fake.status_updates[-1] == ("default", "a", {"loadBalancer": {"ingress": []}})
    assert lb(fake.get("Ingress", "default", "b")) == [{"ip": "192.0.2.9"}]
    assert writer.published == set()
    assert await writer.clear([A, B], fake.objects("Ingress")) == 0
    assert len(fake.status_updates) == 2


@pytest.mark.parametrize(("service", "expected"), [
    (None, []),
    ({}, []),
    ({"status": {"loadBalancer": {}}}, []),
    ({"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"},
                                              {"hostname": "lb.example.com"}]}},
      "spec": {"externalIPs": ["198.51.100.1"]}}, ["lb.example.com", "203.0.113.7"]),
    ({"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7", "hostname": "x.y"}]}}},
     ["x.y", "203.0.113.7"]),
    ({"status": {"loadBalancer": {"ingress": []}},
      "spec": {"externalIPs": ["198.51.100.1", "198.51.100.1", "198.51.100.2"]}},
     ["198.51.100.1", "198.51.100.2"]),
    ({"status": "weird", "spec": {"externalIPs": "not-a-list"}}, []),
    ({"status": {"loadBalancer": {"ingress": ["junk", {"ports": []}]}},
      "spec": {"externalIPs": [7, "198.51.100.3"]}}, ["198.51.100.3"]),
])
def test_addresses_from_service(service: Any, expected: list[str]) -> None:
    assert addresses_from_service(service) == expected


# -- Events ---------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def event_writes(fake: Fake) -> int:
    return fake.count("events", "POST") + fake.count("events", "PATCH")


WARN = ("Ingress", "networking.k8s.io/v1", "default", "web", "uid-1", "BadAnnotation",
        "edgelb.io/balance: unknown policy 'fastest'")


async def test_event_posted_then_counted(fake: Fake, api: Any) -> None:
    clock = Clock()
    rec = EventRecorder(api, host="edgelb-0", clock=clock)
    await rec.warn(*WARN)
    (stored,) = fake.objects("Event").values()
    assert stored["type"] == "Warning" and stored["reason"] == "BadAnnotation"
    assert stored["message"] == WARN[-1] and stored["count"] == 1
    assert stored["involvedObject"] == {"kind": "Ingress", "apiVersion": "networking.k8s.io/v1",
                                        "namespace": "default", "name": "web", "uid": "uid-1"}
    assert stored["source"] == {"component": "edgelb-ingress-controller", "host": "edgelb-0"}
    assert stored["firstTimestamp"] == stored["lastTimestamp"] == rfc3339(clock.now)
    assert stored["metadata"]["namespace"] == "default"
    assert stored["metadata"]["name"].startswith("web.")
    clock.now += 61
    await rec.warn(*WARN)
    (stored,) = fake.objects("Event").values()  # the same Event, not a second one
    assert stored["count"] == 2 and stored["lastTimestamp"] == rfc3339(clock.now)
    assert stored["firstTimestamp"] == rfc3339(clock.now - 61)
    assert fake.count("events", "POST") == 1 and fake.count("events", "PATCH") == 1
    assert len(fake.events) == 2 and (rec.posted, rec.updated, rec.errors) == (1, 1, 0)


async def test_event_rate_limit(fake: Fake, api: Any) -> None:
    clock = Clock()
    rec = EventRecorder(api, clock=clock)
    await rec.warn(*WARN)
    for _ in range(5):
        clock.now += 10
        await rec.warn(*WARN)
    assert event_writes(fake) == 1 and rec.suppressed == 5
    clock.now += 10  # 60 s after the first
    await rec.warn(*WARN)
    assert event_writes(fake) == 2
    # Another message on the same object is its own Event, at once.
    await rec.warn(*WARN[:-1], "edgelb.io/max-inflight: not a number")
    assert fake.count("events", "POST") == 2 and len(fake.objects("Event")) == 2


async def test_event_on_a_cluster_scoped_object(fake: Fake, api: Any) -> None:
    rec = EventRecorder(api, component="edgelb", clock=Clock())
    await rec.warn("IngressClass", "networking.k8s.io/v1", "", "edgelb", "", "BadClass",
                   "x" * 5000)
    (stored,) = fake.objects("Event").values()
    assert stored["metadata"]["namespace"] == "default"
    assert stored["involvedObject"] == {"kind": "IngressClass",
                                        "apiVersion": "networking.k8s.io/v1", "name": "edgelb"}
    assert stored["source"] == {"component": "edgelb"} and len(stored["message"]) == 1024


async def test_event_errors_are_swallowed(fake: Fake, api: Any) -> None:
    clock = Clock()
    rec = EventRecorder(api, clock=clock)
    fake.fail_writes = [500]
    await rec.warn(*WARN)  # does not raise
    assert rec.errors == 1 and fake.objects("Event") == {}
    await rec.warn(*WARN)  # the failed attempt counts for the rate limit
    assert fake.failed_writes == 1 and event_writes(fake) == 0
    await fake.stop()
    clock.now += 61
    await rec.warn(*WARN)
    assert rec.errors == 2
    await fake.start()
    clock.now += 61
    await rec.warn(*WARN)
    (stored,) = fake.objects("Event").values()
    assert stored["count"] == 1 and rec.posted == 1


async def test_expired_event_is_posted_again(fake: Fake, api: Any) -> None:
    clock = Clock()
    rec = EventRecorder(api, clock=clock)
    await rec.warn(*WARN)
    (key,) = fake.objects("Event")
    fake.delete("Event", *key)  # the API server's event TTL ran out
    clock.now += 61
    await rec.warn(*WARN)
    (stored,) = fake.objects("Event").values()
    assert stored["count"] == 1 and rec.posted == 2 and rec.errors == 0


async def test_event_memory_is_bounded(fake: Fake, api: Any) -> None:
    rec = EventRecorder(api, clock=Clock(), max_keys=2)
    for name in ("a", "b", "c"):
        await rec.warn("Service", "v1", "default", name, "", "BadPort", "no port")
    assert len(rec._seen) == 2
    await rec.warn("Service", "v1", "default", "a", "", "BadPort", "no port")  # forgotten: new
    await rec.warn("Service", "v1", "default", "c", "", "BadPort", "no port")  # remembered
    assert fake.count("events", "POST") == 4 and rec.suppressed == 1
