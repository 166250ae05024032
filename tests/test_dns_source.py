"""The DNS source (watchers/dns/source.py) against a real DNS server on 127.0.0.1: it fills the
file's DNS-backed services, follows TTLs, re-applies on a change only, keeps serving stale
answers through an outage, holds NXDOMAIN, and a malformed response changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from dns_server import DnsServer
from httpkit import eventually

from watchers.dns.settings import ResolverSettings
from watchers.dns.source import DnsSource
from watchers.model import Backend, DnsQuery, Notice, Service, Snapshot
from watchers.source import Health

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(20)]

SRV = "_web._tcp.svc.example."
QUERY = DnsQuery(srv=SRV)


class Harness:
    def __init__(self, server: DnsServer, **settings: float) -> None:
        self.server = server
        self.applied: list[Snapshot] = []  # from the file path
        self.emitted: list[Snapshot] = []  # re-applied by the source
        self.health: list[Health] = []
        defaults = {"timeout": 0.2, "attempts": 1, "min_ttl": 0.1, "max_ttl": 5.0,
                    "hold_stale": 3600.0, "hold_nxdomain": 30.0}
        self.settings = ResolverSettings(nameservers=(("127.0.0.1", server.port),),
                                         **{**defaults, **settings})
        self.source = DnsSource(self._emit, self._report, self.settings)
        self.task: asyncio.Task | None = None

    async def _emit(self, snapshot: Snapshot) -> tuple[Notice, ...]:
        self.emitted.append(snapshot)
        return ()

    async def _apply(self, snapshot: Snapshot) -> tuple[Notice, ...]:
        self.applied.append(snapshot)
        return ()

    def _report(self, name: str, health: Health) -> None:
        assert name == "dns"
        self.health.append(health)

    async def start(self, *services: Service) -> tuple[Notice, ...]:
        notices = await self.source.apply(Snapshot("file", services), self._apply)
        self.task = asyncio.ensure_future(self.source.run())
        return notices

    @property
    def current(self) -> tuple[Backend, ...]:
        last = (self.emitted or self.applied)[-1]
        svc = last.service("web")
        assert svc is not None
        return svc.backends


def web(query: DnsQuery = QUERY) -> Service:
    return Service("web", dns=query)


def srv(server: DnsServer, ttl: int, *records: tuple[int, int, int, str]) -> None:
    server.set(SRV, "SRV", [(ttl, f"{p} {w} {port} {host}.") for p, w, port, host in records])


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    s = await DnsServer().start()
    s.set("a.example", "A", [(60, "127.0.0.1")])
    s.set("b.example", "A", [(60, "127.0.0.2")])
    yield s
    await s.stop()


@pytest.fixture
async def harness(server: DnsServer) -> AsyncIterator[Harness]:
    h = Harness(server)
    yield h
    if h.task is not None:
        h.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await h.task


async def test_the_first_snapshot_is_filled_before_it_is_applied(server, harness) -> None:
    srv(server, 30, (0, 10, 8080, "a.example"), (1, 5, 8081, "b.example"))
    other = Service("static", backends=(Backend("10.9.9.9", 80),))
    notices = await harness.start(web(), other)
    assert notices == ()
    assert len(harness.applied) == 1
    assert harness.current == (Backend("127.0.0.1", 8080, weight=10.0, tier=0),
                               Backend("127.0.0.2", 8081, weight=5.0, tier=2))
    assert harness.applied[0].service("static") == other
    assert harness.health[-1].up
    detail = harness.health[-1].details[0]
    assert detail["query"] == f"SRV {SRV}" and detail["ttl"] == 30
    assert detail["next_refresh"] > detail["last_answer"]


async def test_a_name_that_does_not_answer_yet_applies_with_no_backends(server, harness) -> None:
    server.mode(SRV, "drop")
    notices = await harness.start(web())
    assert harness.current == ()
    assert len(notices) == 1 and notices[0].origin == f"dns SRV {SRV}"
    assert not harness.health[-1].up and "timeout" in harness.health[-1].error
    # once it answers, the snapshot is applied again with its backends
    server.mode(SRV, "answer")
    srv(server, 30, (0, 1, 8080, "a.example"))
    await eventually(lambda: harness.emitted and harness.current, timeout=5)
    assert harness.current == (Backend("127.0.0.1", 8080),)
    await eventually(lambda: harness.health[-1].up)


async def test_ttl_driven_updates_reapply_only_on_a_change(server, harness) -> None:
    srv(server, 1, (0, 1, 8080, "a.example"))
    await harness.start(web())
    asked = len(server.stats.questions)
    # the same answer again and again: asked at its TTL (1s), nothing applied again
    await eventually(lambda: len(server.stats.questions) >= asked + 2, timeout=4)
    assert harness.emitted == []
    srv(server, 1, (0, 1, 8080, "a.example"), (0, 1, 8081, "b.example"))
    await eventually(lambda: len(harness.emitted) == 1, timeout=3)
    assert {b.key for b in harness.current} == {"127.0.0.1:8080", "127.0.0.2:8081"}


async def test_ttls_are_clamped_to_min_and_max(server) -> None:
    h = Harness(server, min_ttl=0.5, max_ttl=0.6)
    srv(server, 3600, (0, 1, 8080, "a.example"))
    try:
        await h.start(web())
        loop = asyncio.get_running_loop()
        due = h.source.names[QUERY].next_refresh - loop.time()
        assert 0.5 * 0.9 - 0.05 <= due <= 0.6
    finally:
        assert h.task is not None
        h.task.cancel()


async def test_stale_answers_serve_through_an_outage(server, harness) -> None:
    srv(server, 1, (0, 1, 8080, "a.example"))
    await harness.start(web())
    server.mode("*", "drop")  # the server stops answering
    await eventually(lambda: not harness.health[-1].up, timeout=5)
    assert "stale" in harness.health[-1].error
    assert harness.health[-1].details[0]["stale_since"] is not None
    assert harness.emitted == [] and harness.current == (Backend("127.0.0.1", 8080),)
    server.mode("*", "servfail")
    asked = len(server.stats.questions)
    await eventually(lambda: len(server.stats.questions) > asked, timeout=5)
    assert harness.emitted == [] and not harness.health[-1].up
    server.mode("*", "answer")
    await eventually(lambda: harness.health[-1].up, timeout=5)
    assert harness.health[-1].details[0]["stale_since"] is None
    assert harness.emitted == []


async def test_stale_answers_go_after_hold_stale(server) -> None:
    h = Harness(server, hold_stale=0.5)
    srv(server, 1, (0, 1, 8080, "a.example"))
    try:
        await h.start(web())
        server.mode("*", "servfail")
        await eventually(lambda: h.emitted and h.current == (), timeout=5)
    finally:
        assert h.task is not None
        h.task.cancel()


async def test_nxdomain_is_held_for_hold_nxdomain(server) -> None:
    h = Harness(server, hold_nxdomain=0.8)
    srv(server, 1, (0, 1, 8080, "a.example"))
    try:
        await h.start(web())
        loop = asyncio.get_running_loop()
        server.mode(SRV, "nxdomain")
        await eventually(lambda: h.health[-1].details[0]["nxdomain_since"] is not None, 5)
        since = loop.time()
        assert h.current == (Backend("127.0.0.1", 8080),) and not h.health[-1].up
        await eventually(lambda: h.emitted and h.current == (), timeout=5)
        assert loop.time() - since >= 0.5  # held, not dropped at once
        assert "NXDOMAIN" in h.health[-1].error
    finally:
        assert h.task is not None
        h.task.cancel()


async def test_an_empty_answer_is_held_like_nxdomain(server) -> None:
    h = Harness(server, hold_nxdomain=0.3)
    srv(server, 1, (0, 1, 8080, "a.example"))
    try:
        await h.start(web())
        server.set(SRV, "SRV", [])
        await eventually(lambda: h.emitted and h.current == (), timeout=5)
        assert "no records" in h.health[-1].error
    finally:
        assert h.task is not None
        h.task.cancel()


async def test_a_malformed_response_changes_nothing(server, harness) -> None:
    srv(server, 1, (0, 1, 8080, "a.example"))
    await harness.start(web())
    server.mode("*", "malformed")
    asked = len(server.stats.questions)
    await eventually(lambda: len(server.stats.questions) >= asked + 2, timeout=5)
    assert harness.emitted == []
    assert harness.current == (Backend("127.0.0.1", 8080),)
    assert "malformed" in harness.health[-1].error


async def test_a_new_file_snapshot_drops_names_it_no_longer_has(server, harness) -> None:
    srv(server, 30, (0, 1, 8080, "a.example"))
    server.set("b.example", "A", [(30, "127.0.0.2")])
    await harness.start(web())
    query = DnsQuery(name="b.example.", port=9000)
    await harness.source.apply(Snapshot("file", (web(query),)), harness._apply)
    assert harness.current == (Backend("127.0.0.2", 9000),)
    assert list(harness.source.names) == [query]


async def test_a_rejected_file_snapshot_keeps_the_last_names(server, harness) -> None:
    srv(server, 30, (0, 1, 8080, "a.example"))
    await harness.start(web())

    async def reject(snapshot: Snapshot) -> tuple[Notice, ...]:
        raise ValueError("rejected")

    with pytest.raises(ValueError):
        await harness.source.apply(Snapshot("file", (web(DnsQuery(name="b.example.",
                                                                   port=1)),)), reject)
    assert list(harness.source.names) == [QUERY]
