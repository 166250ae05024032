"""DNS service discovery through the whole process (App, a real config file): backends from a
real DNS server on 127.0.0.1, real HTTP backends, requests through the proxy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from dns_server import DnsServer
from httpkit import HOST, HttpBackend, eventually, fetch, free_port, within

from edgelb.ops.app import App

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(40)]

SRV = "_web._tcp.svc.test."
CHECK = "health_check: {path: /healthz, interval: 100ms, timeout: 300ms, rise: 1, fall: 1}"


def config(admin: int, port: int, dns_port: int, dns: str, extra: str = "",
           resolvers: str = "") -> str:
    return "\n".join([
        f"admin: {{listen: {HOST}:{admin}}}",
        "shutdown: {grace: 2s}",
        f"resolvers: {{nameservers: [{HOST}:{dns_port}], timeout: 200ms, attempts: 1, "
        f"min_ttl: 100ms, max_ttl: 2s{resolvers}}}",
        "services:",
        "  - name: web",
        f"    listen: {HOST}:{port}",
        f"    dns: {dns}",
        *(f"    {line}" for line in extra.splitlines()),
    ]) + "\n"


class Setup:
    def __init__(self, app: App, port: int, admin: int) -> None:
        self.app = app
        self.port = port
        self.admin = admin

    @property
    def pool(self):
        assert self.app.runtime is not None
        return self.app.runtime.services["web"].pool

    async def status(self) -> dict:
        r = await within(fetch(self.admin, target="/status.json"))
        return json.loads(r.body)

    async def dns_status(self) -> dict:
        return next(w for w in (await self.status())["watchers"] if w["name"] == "dns")

    async def metric(self, line_start: str) -> str:
        r = await within(fetch(self.admin, target="/metrics"))
        return next(line for line in r.body.decode().splitlines()
                    if line.startswith(line_start))


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    s = await DnsServer().start()
    yield s
    await s.stop()


@pytest.fixture
async def start(tmp_path: Path, dns: DnsServer
                ) -> AsyncIterator[Callable[..., Awaitable[Setup]]]:
    apps: list[App] = []

    async def make(query: str, extra: str = "", resolvers: str = "") -> Setup:
        admin, port = free_port(), free_port()
        path = tmp_path / "edgelb.yaml"
        path.write_text(config(admin, port, dns.port, query, extra, resolvers))
        app = App(path)
        await within(app.start())
        apps.append(app)
        return Setup(app, port, admin)

    yield make
    for app in apps:
        await within(app.stop(), 10)


def set_srv(dns: DnsServer, ttl: int, *records: tuple[int, int, HttpBackend]) -> None:
    """SRV records (priority, weight, backend), each backend's target a name of its own."""
    dns.set(SRV, "SRV", [(ttl, f"{p} {w} {b.port} {b.name}.hosts.test.")
                         for p, w, b in records])
    for _, _, b in records:
        dns.set(f"{b.name}.hosts.test", "A", [(ttl, HOST)])


async def served(port: int, n: int) -> list[str]:
    out = []
    for _ in range(n):
        r = await within(fetch(port))
        assert r.status == 200, (r.status, r.body)
        out.append(r.get("x-backend") or "")
    return out


async def test_srv_weights_priorities_and_failover(backend, dns, start) -> None:
    a, b, zero, backup = (await backend("a"), await backend("b"), await backend("zero"),
                          await backend("backup"))
    set_srv(dns, 30, (0, 1, a), (0, 3, b), (0, 0, zero), (1, 5, backup))
    s = await start(f"{{srv: {SRV}}}", f"balance: round-robin\n{CHECK}")
    got = await served(s.port, 40)
    # priority 0 only, by weight (smooth weighted round robin: exactly 1:3); weight 0 unused
    assert got.count("a") == 10 and got.count("b") == 30
    weights = {bs.key: (bs.spec.weight, bs.spec.tier) for bs in s.pool.backends}
    assert weights[f"{HOST}:{a.port}"] == (1.0, 0) and weights[f"{HOST}:{backup.port}"] == (5.0, 2)
    # the weight-0 target of priority 0 takes over when the rest of its priority is down
    await a.stop()
    await b.stop()
    await eventually(lambda: s.pool.tier == 1, timeout=5)
    assert set(await served(s.port, 10)) == {"zero"}
    # and priority 1 when priority 0 has no healthy target
    await zero.stop()
    await eventually(lambda: s.pool.tier == 2, timeout=5)
    assert set(await served(s.port, 10)) == {"backup"}
    # priority 0 is back (health checks): it takes the traffic again
    await a.start(a.port)
    await eventually(lambda: s.pool.tier == 0, timeout=5)
    assert set(await served(s.port, 10)) == {"a"}


async def test_failover_on_outlier_ejection(backend, dns, start) -> None:
    from httpkit import ok

    a, backup = await backend("a", ok(status=503)), await backend("backup")
    set_srv(dns, 30, (0, 1, a), (1, 1, backup))
    s = await start(f"{{srv: {SRV}}}",
                    "outlier: {failures: 2, ejection: 30s, max_ejected: 1.0}\nretries: 0")
    statuses = [(await within(fetch(s.port))).status for _ in range(2)]
    assert statuses == [503, 503]  # answered by a, which is ejected after the second
    assert s.pool.tier == 2
    assert set(await served(s.port, 5)) == {"backup"}


async def test_a_records(backend, dns, start) -> None:
    a = await backend("a")
    dns.set("web.hosts.test", "A", [(30, HOST)])
    s = await start(f"{{name: web.hosts.test, port: {a.port}}}")
    assert set(await served(s.port, 3)) == {"a"}
    st = await s.dns_status()
    assert st["up"] and st["details"][0]["query"] == f"A/AAAA web.hosts.test.:{a.port}"


async def test_ttl_driven_updates_under_load_with_zero_failed_requests(backend, dns,
                                                                       start) -> None:
    a, b = await backend("a"), await backend("b")
    set_srv(dns, 1, (0, 1, a))
    s = await start(f"{{srv: {SRV}}}", "slow_start: 0s")
    kept = s.pool.by_key[f"{HOST}:{a.port}"]
    seen: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            r = await within(fetch(s.port))
            seen.append((r.status, r.get("x-backend") or ""))

    clients = [asyncio.ensure_future(client()) for _ in range(4)]
    try:
        await eventually(lambda: len(seen) > 20)
        set_srv(dns, 1, (0, 1, a), (0, 1, b))  # b added
        await eventually(lambda: any(name == "b" for _, name in seen[-20:]), timeout=5)
        assert s.pool.by_key[f"{HOST}:{a.port}"] is kept  # its state was kept
        set_srv(dns, 1, (0, 1, b))  # a removed (it drains; it is still running)
        await eventually(lambda: f"{HOST}:{a.port}" not in s.pool.by_key, timeout=5)
        mark = len(seen)
        await eventually(lambda: len(seen) > mark + 20)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert all(status == 200 for status, _ in seen), [x for x in seen if x[0] != 200][:3]
    assert {name for _, name in seen[mark:]} == {"b"}
    reloads = s.app.runtime.reloads
    assert reloads[("dns", "ok")] >= 2 and ("dns", "error") not in reloads
    assert kept.requests > 0


async def test_a_dns_outage_serves_stale_and_shows_in_status_and_metrics(backend, dns,
                                                                         start) -> None:
    a = await backend("a")
    set_srv(dns, 1, (0, 1, a))
    s = await start(f"{{srv: {SRV}}}")
    assert (await s.metric('edgelb_watcher_up{watcher="dns"}')).endswith(" 1.0")
    dns.mode("*", "drop")
    await eventually(lambda: not s.app.runtime.watcher_up.get("dns", True), timeout=5)
    st = await s.dns_status()
    assert not st["up"] and "stale" in st["last_error"]
    assert st["details"][0]["stale_since"] is not None
    assert (await s.metric('edgelb_watcher_up{watcher="dns"}')).endswith(" 0.0")
    assert set(await served(s.port, 5)) == {"a"}  # the last answer keeps serving
    assert (await s.status())["ready"]
    dns.mode("*", "answer")
    await eventually(lambda: s.app.runtime.watcher_up.get("dns"), timeout=5)
    assert (await s.dns_status())["last_error"] is None


async def test_new_dns_backends_slow_start_and_are_health_checked(backend, dns, start) -> None:
    a, b = await backend("a"), await backend("b")
    set_srv(dns, 1, (0, 4, a))
    s = await start(f"{{srv: {SRV}}}", f"slow_start: 30s\n{CHECK}")
    assert s.pool.by_key[f"{HOST}:{a.port}"].weight == 4.0  # the first backends: no ramp
    set_srv(dns, 1, (0, 4, a), (0, 4, b))
    await eventually(lambda: f"{HOST}:{b.port}" in s.pool.by_key, timeout=5)
    new = s.pool.by_key[f"{HOST}:{b.port}"]
    assert new.ramp_start > 0 and new.weight < 4.0
    await eventually(lambda: any(r.target == "/healthz" for r in b.requests), timeout=5)
    await b.stop()
    await eventually(lambda: not new.check_ok, timeout=5)


async def test_an_unresolvable_name_at_start_gives_an_empty_pool(backend, dns, start) -> None:
    a = await backend("a")
    dns.mode(SRV, "drop")
    s = await start(f"{{srv: {SRV}}}")
    r = await within(fetch(s.port))
    assert r.status == 503
    set_srv(dns, 1, (0, 1, a))
    dns.mode(SRV, "answer")
    await eventually(lambda: bool(s.pool.backends), timeout=5)
    assert set(await served(s.port, 2)) == {"a"}
