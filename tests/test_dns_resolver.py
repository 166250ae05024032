"""The DNS lookups (watchers/dns/resolver.py) against a real DNS server on 127.0.0.1
(tests/dns_server.py), the records -> backends translation, and resolv.conf."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from dns_server import DnsServer

from watchers.dns.records import backends_of
from watchers.dns.resolver import Answer, Failure, NoRecords, Resolver, Target
from watchers.dns.settings import ResolverSettings, parse_resolv_conf, system_settings
from watchers.model import Backend, DnsQuery

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(20)]

SRV = "_http._tcp.web.service.consul."


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    s = await DnsServer().start()
    yield s
    await s.stop()


def resolver(*servers: DnsServer, timeout: float = 0.3, attempts: int = 1) -> Resolver:
    return Resolver(ResolverSettings(nameservers=tuple(("127.0.0.1", s.port) for s in servers),
                                     timeout=timeout, attempts=attempts))


def srv_zone(server: DnsServer, ttl: int = 30) -> None:
    server.set(SRV, "SRV", [(ttl, "1 10 8080 a.node.consul."), (ttl, "1 30 8081 b.node.consul."),
                            (ttl, "2 5 9090 c.node.consul.")])
    server.set("a.node.consul", "A", [(60, "10.0.0.1")])
    server.set("b.node.consul", "A", [(20, "10.0.0.2")])
    server.set("b.node.consul", "AAAA", [(60, "fd00::2")])
    server.set("c.node.consul", "A", [(60, "10.0.0.3")])


EXPECTED = {
    Target("10.0.0.1", 8080, 1, 10), Target("10.0.0.2", 8081, 1, 30),
    Target("fd00::2", 8081, 1, 30), Target("10.0.0.3", 9090, 2, 5),
}


async def test_srv_targets_from_the_additional_section(server: DnsServer) -> None:
    srv_zone(server, ttl=30)
    result = await resolver(server).lookup(DnsQuery(srv=SRV))
    assert isinstance(result, Answer)
    assert set(result.targets) == EXPECTED
    assert result.ttl == 20  # the smallest TTL of the records that made the targets
    assert server.stats.questions == [(SRV, "SRV")]  # no question for the targets


async def test_srv_targets_asked_when_the_additional_section_is_empty(server: DnsServer) -> None:
    srv_zone(server, ttl=7)
    server.additional = False
    result = await resolver(server).lookup(DnsQuery(srv=SRV))
    assert isinstance(result, Answer)
    assert set(result.targets) == EXPECTED
    assert result.ttl == 7
    asked = {q for q in server.stats.questions}
    assert ("a.node.consul.", "A") in asked and ("b.node.consul.", "AAAA") in asked


async def test_a_and_aaaa(server: DnsServer) -> None:
    server.set("web.internal", "A", [(5, "10.1.0.1"), (5, "10.1.0.2")])
    server.set("web.internal", "AAAA", [(9, "fd00::1")])
    result = await resolver(server).lookup(DnsQuery(name="web.internal.", port=8080))
    assert isinstance(result, Answer)
    assert {(t.host, t.port) for t in result.targets} == {
        ("10.1.0.1", 8080), ("10.1.0.2", 8080), ("fd00::1", 8080)}
    assert result.ttl == 5


async def test_a_truncated_answer_is_asked_again_over_tcp(server: DnsServer) -> None:
    records = [(30, f"1 1 {8000 + i} host{i}.big.example.") for i in range(40)]
    server.set("_big._tcp.example", "SRV", records)
    for i in range(40):
        server.set(f"host{i}.big.example", "A", [(30, f"10.2.0.{i + 1}")])
    result = await resolver(server).lookup(DnsQuery(srv="_big._tcp.example."))
    assert server.stats.truncated >= 1 and server.stats.tcp >= 1
    assert isinstance(result, Answer)
    assert len(result.targets) == 40


@pytest.mark.parametrize(("mode", "expected"), [
    ("servfail", Failure), ("drop", Failure), ("malformed", Failure), ("nxdomain", NoRecords),
])
async def test_failures_are_values(server: DnsServer, mode: str, expected: type) -> None:
    srv_zone(server)
    server.mode("*", mode)
    result = await resolver(server, timeout=0.2).lookup(DnsQuery(srv=SRV))
    assert isinstance(result, expected)
    if isinstance(result, Failure):
        assert result.kind == {"servfail": "servfail", "drop": "timeout",
                               "malformed": "malformed"}[mode]
    else:
        assert result.kind == "nxdomain"


async def test_no_records_of_the_type_is_an_empty_answer(server: DnsServer) -> None:
    server.set("web.internal", "TXT", [(5, '"hello"')])
    result = await resolver(server).lookup(DnsQuery(name="web.internal", port=80))
    assert result == NoRecords("empty")


async def test_the_next_nameserver_answers_when_the_first_fails(server: DnsServer) -> None:
    other = await DnsServer().start()
    try:
        server.mode("*", "drop")
        srv_zone(other)
        result = await resolver(server, other, timeout=0.2).lookup(DnsQuery(srv=SRV))
        assert isinstance(result, Answer) and set(result.targets) == EXPECTED
    finally:
        await other.stop()


async def test_a_failing_target_fails_the_whole_lookup(server: DnsServer) -> None:
    srv_zone(server)
    server.additional = False
    server.mode("c.node.consul", "servfail")
    result = await resolver(server).lookup(DnsQuery(srv=SRV))
    assert isinstance(result, Failure) and "c.node.consul" in result.detail


def test_backends_of_merges_duplicates_and_maps_priority_and_weight() -> None:
    backends = backends_of([
        Target("10.0.0.2", 80, priority=1, weight=5),
        Target("10.0.0.1", 80, priority=1, weight=10),
        Target("10.0.0.1", 80, priority=1, weight=20),  # the same address twice: one backend
        Target("10.0.0.1", 80, priority=3, weight=50),  # and in a worse priority: ignored
        Target("10.0.0.3", 80, priority=1, weight=0),  # weight 0: after the rest of its tier
        Target("10.0.0.4", 80, priority=2, weight=1),
        Target("10.0.0.5", 0, priority=0, weight=1),  # port 0: nowhere to connect
    ])
    assert backends == (
        Backend("10.0.0.1", 80, weight=20.0, tier=2),
        Backend("10.0.0.2", 80, weight=5.0, tier=2),
        Backend("10.0.0.3", 80, weight=1.0, tier=3),
        Backend("10.0.0.4", 80, weight=1.0, tier=4),
    )
    assert backends_of(reversed([Target("b", 1), Target("a", 1)])) == backends_of(
        [Target("a", 1), Target("b", 1)])


def test_resolv_conf(tmp_path) -> None:
    text = ("# comment\nsearch example.com\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\n"
            "nameserver not-an-ip\noptions ndots:5 timeout:3 attempts:4\n")
    assert parse_resolv_conf(text) == ((("10.0.0.53", 53), ("fe80::1", 53)), 3.0, 4)
    path = tmp_path / "resolv.conf"
    path.write_text("options timeout:2\n")
    s = system_settings(ResolverSettings(hold_stale=5.0), str(path))
    assert s.nameservers == (("127.0.0.1", 53),) and s.timeout == 2.0 and s.hold_stale == 5.0
    assert system_settings(ResolverSettings(), str(tmp_path / "none")).nameservers
