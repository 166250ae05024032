"""Hot swap: snapshots applied to a live Runtime (and, at the end, config file rewrites applied
by the App) while requests are in flight. Nothing is dropped, kept backends keep their state,
removed ones drain, and a snapshot that fails changes nothing.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from pathlib import Path

import pytest
from httpkit import (
    HOST,
    Call,
    Client,
    HttpBackend,
    eventually,
    fetch,
    free_port,
    service,
    snapshot,
    upgrade_echo,
    within,
)

from edgelb.control.runtime import EntrypointSpec, SnapshotError
from edgelb.ops.app import App
from watchers.model import Address, Route

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(40)]



def gated(gate: asyncio.Event, body: bytes = b"late") -> object:
    """A handler that answers once `gate` is set."""

    async def handler(call: Call) -> None:
        await call.read_body()
        await gate.wait()
        await call.respond(200, body)

    return handler


async def refused(port: int) -> bool:
    try:
        _, w = await asyncio.open_connection(HOST, port)
    except ConnectionRefusedError:
        return True
    w.close()
    return False


async def test_kept_backend_keeps_its_state_object_and_counters(backend, proxy):
    a, b, c = await backend("a"), await backend("b"), await backend("c")
    port = free_port()
    rt = await proxy(snapshot(service("web", [a, b], listen=port)))
    client = await Client.open(port)
    for _ in range(10):
        assert (await within(client.request("GET", "/"))).status == 200
    pool = rt.services["web"].pool
    state_a = pool.by_key[str(a.address)]
    counts = (state_a.requests, dict(state_a.responses), state_a.connections_total)
    assert state_a.requests + pool.by_key[str(b.address)].requests == 10
    assert sum(state_a.responses.values()) == state_a.requests
    service_state = rt.services["web"]

    await rt.apply(snapshot(service("web", [a, c], listen=port)))
    assert rt.services["web"] is service_state
    assert pool.by_key[str(a.address)] is state_a
    assert (state_a.requests, dict(state_a.responses), state_a.connections_total) == counts
    assert str(b.address) not in pool.by_key
    assert {s.key for s in pool.backends} == {str(a.address), str(c.address)}
    for _ in range(20):
        assert (await within(client.request("GET", "/"))).status == 200
    assert state_a.requests - counts[0] + len(c.requests) == 20
    client.close()


async def test_a_reload_never_makes_a_service_counter_go_down(backend, proxy):
    """Every counter the metrics export from a kept service (its own answers, sheds, bytes,
    durations) goes on across snapshots that change its policy."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from edgelb.ops.metrics import make_registry

    def samples() -> dict[tuple, float]:
        text = generate_latest(make_registry(rt, process=False)).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples
                if fam.type in ("counter", "histogram") and s.labels.get("service") == "web"}

    port = free_port()
    rt = await proxy(snapshot(service("web", [], listen=port)))
    client = await Client.open(port)
    for _ in range(3):
        assert (await within(client.request("GET", "/"))).status == 503  # answered by edgelb
    before = samples()
    assert before[("edgelb_requests_total", (("backend", ""), ("code", "503"),
                                               ("code_class", "5xx"), ("method", "GET"),
                                               ("service", "web")))] == 3
    for i in range(3):  # policy changes, each a new snapshot of the same service
        await rt.apply(snapshot(service("web", [], listen=port, queue_size=10 + i,
                                        balance="round-robin" if i % 2 else "least-loaded")))
        after = samples()
        gone_down = {k: (v, after.get(k)) for k, v in before.items() if after.get(k, 0) < v}
        assert not gone_down
    client.close()


def counter_samples(rt) -> dict[tuple, float]:
    """Every counter and histogram sample (buckets, counts, sums) /metrics exports."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from edgelb.ops.metrics import make_registry

    text = generate_latest(make_registry(rt, process=False)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if fam.type in ("counter", "histogram") and not s.name.endswith("_created")}


def gone_down(before: dict[tuple, float], after: dict[tuple, float]) -> dict[tuple, tuple]:
    """The samples that went down, or disappeared, from `before` to `after`."""
    return {k: (v, after.get(k)) for k, v in before.items() if after.get(k, -1.0) < v}


async def test_an_unrelated_reload_under_traffic_resets_no_counter_estimate_or_connection(
        backend, proxy):
    """New services arrive (another source's, then the file's) while clients keep sending:
    every counter and histogram /metrics exports goes on, and the kept service's backends keep
    their latency estimates and their idle connections (no new connection to a backend)."""
    a, b, other = await backend("a"), await backend("b"), await backend("other")
    port = free_port()
    rt = await proxy(snapshot(service("web", [a, b], listen=port)))
    stop = asyncio.Event()
    answered: list[int] = []

    async def traffic() -> None:
        client = await Client.open(port)
        try:
            while not stop.is_set():
                answered.append((await within(client.request("GET", "/"))).status)
        finally:
            client.close()

    clients = [asyncio.create_task(traffic()) for _ in range(3)]
    try:
        await eventually(lambda: len(answered) >= 30, what="traffic")
        before = counter_samples(rt)
        assert any(name == "edgelb_request_duration_seconds_bucket" for name, _ in before)
        added: dict[str, list] = {"file": [service("web", [a, b], listen=port)],
                                  "kubernetes": []}
        for i in range(4):  # a new service each time, from two sources, under traffic
            source = "kubernetes" if i % 2 else "file"
            added[source].append(service(f"new{i}", [other], listen=free_port()))
            await rt.apply(snapshot(*added[source], source=source))
            assert set(rt.services) == {s.name for held in added.values() for s in held}
            seen = len(answered)
            await eventually(lambda seen=seen: len(answered) >= seen + 10, what="more traffic")
            after = counter_samples(rt)
            assert not gone_down(before, after), gone_down(before, after)
            before = after
    finally:
        stop.set()
        await within(asyncio.gather(*clients))
    assert set(answered) == {200}
    # quiet now: an apply of an unrelated change keeps each estimate and idle connection as is
    pool = rt.services["web"].pool
    kept = {bs.key: (bs, bs.latency, list(bs.idle)) for bs in pool.backends}
    assert all(latency > 0 and idle for _, latency, idle in kept.values())
    connections = a.connections + b.connections
    await rt.apply(snapshot(service("later", [other], listen=free_port()), source="other"))
    for key, (state, latency, idle) in kept.items():
        assert pool.by_key[key] is state
        assert state.latency == latency
        assert state.idle == idle and all(not c.transport.is_closing() for c in idle)
    client = await Client.open(port)
    for _ in range(4):
        assert (await within(client.request("GET", "/"))).status == 200
    client.close()
    assert a.connections + b.connections == connections  # the idle ones were used
    assert not gone_down(before, counter_samples(rt))


async def test_an_unchanged_service_is_not_touched_by_another_sources_apply(backend, proxy):
    """The plan leaves a service whose spec did not change alone: no update, so the balancer
    keeps its object and its round-robin position, the pool its backend list."""
    a, b, c = await backend("a"), await backend("b"), await backend("c")
    port = free_port()
    rt = await proxy(snapshot(service("web", [a, b, c], listen=port, balance="round-robin")))
    client = await Client.open(port)
    for _ in range(4):
        assert (await within(client.request("GET", "/"))).status == 200
    state = rt.services["web"]
    pool = state.pool
    balancer, backends, position = pool.balancer, pool.backends, dict(pool.balancer._current)
    spec = state.spec
    updates: list[str] = []
    real = type(state).update

    def update(self, *args, **kw) -> None:
        updates.append(self.name)
        real(self, *args, **kw)

    type(state).update = update  # type: ignore[method-assign]
    try:
        await rt.apply(snapshot(service("api", [c], listen=free_port()), source="kubernetes"))
        await rt.apply(snapshot(service("web", [a, b, c], listen=port, balance="round-robin")))
        assert updates == []
        assert rt.services["web"] is state and state.spec is spec
        assert pool.balancer is balancer and pool.backends is backends
        assert pool.balancer._current == position
        # the next pick goes on from there: the three requests reach a, b and c once each
        counts = [len(x.requests) for x in (a, b, c)]
        for _ in range(3):
            assert (await within(client.request("GET", "/"))).status == 200
        assert [len(x.requests) - n for x, n in zip((a, b, c), counts, strict=True)] == [1, 1, 1]
        # a changed one is updated (and only it)
        await rt.apply(snapshot(service("web", [a, b], listen=port, balance="round-robin")))
        assert updates == ["web"]
    finally:
        type(state).update = real  # type: ignore[method-assign]
    client.close()


async def test_removed_backend_finishes_its_inflight_request_and_gets_no_new_ones(
    backend, proxy
):
    gate = asyncio.Event()
    old = await backend("old", gated(gate, b"from old"))
    new = await backend("new")
    port = free_port()
    rt = await proxy(snapshot(service("web", [old], listen=port)))
    slow_client = await Client.open(port)
    await slow_client.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await old.wait_requests(1)
    old_state = rt.services["web"].pool.by_key[str(old.address)]
    assert old_state.inflight == 1

    await rt.apply(snapshot(service("web", [new], listen=port)))
    pool = rt.services["web"].pool
    assert old_state.draining and not old_state.eligible
    assert pool.draining == {str(old.address): old_state}
    for i in range(10):
        r = await within(fetch(port, "GET", f"/n{i}"))
        assert r.status == 200
        assert r.get("x-backend") == "new"
    assert len(old.requests) == 1

    gate.set()
    r = await within(slow_client.response())
    assert r.status == 200
    assert r.body == b"from old"
    assert old_state.inflight == 0
    assert pool.draining == {}
    await old.wait(lambda: old.open == 0)  # not parked for reuse: it drained
    slow_client.close()


async def test_backend_removed_and_readded_while_draining_is_the_same_state(backend, proxy):
    gate = asyncio.Event()
    a = await backend("a", gated(gate))
    b = await backend("b")
    port = free_port()
    rt = await proxy(snapshot(service("web", [a], listen=port)))
    client = await Client.open(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await a.wait_requests(1)
    state = rt.services["web"].pool.by_key[str(a.address)]
    await rt.apply(snapshot(service("web", [b], listen=port)))
    await rt.apply(snapshot(service("web", [a, b], listen=port)))
    assert rt.services["web"].pool.by_key[str(a.address)] is state
    assert state.eligible and state.inflight == 1
    gate.set()
    assert (await within(client.response())).status == 200
    assert state.inflight == 0
    client.close()


async def test_new_port_is_bound_and_removed_port_drains(backend, proxy):
    gate = asyncio.Event()
    a = await backend("a", gated(gate, b"finished"))
    b = await backend("b")
    port_a, port_b = free_port(), free_port()
    rt = await proxy(snapshot(service("one", [a], listen=port_a)))
    assert await refused(port_b)
    client = await Client.open(port_a)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await a.wait_requests(1)
    idle = await Client.open(port_a)  # an idle keep-alive client on the removed port

    await rt.apply(snapshot(service("two", [b], listen=port_b)))
    assert set(rt.listeners) == {f"{HOST}:{port_b}"}
    r = await within(fetch(port_b))
    assert r.status == 200 and r.get("x-backend") == "b"
    assert await refused(port_a)
    assert await idle.at_eof() == b""  # idle connections are closed at once

    gate.set()
    r = await within(client.response())
    assert r.status == 200
    assert r.body == b"finished"
    assert (r.get("connection") or "").lower() == "close"
    assert await client.at_eof() == b""


async def test_a_closing_listener_is_done_when_its_last_request_ends_not_at_the_grace(
    backend, proxy
):
    gate = asyncio.Event()
    a = await backend("a", gated(gate, b"finished"))
    port = free_port()
    rt = await proxy(snapshot(service("one", [a], listen=port)))
    client = await Client.open(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await a.wait_requests(1)
    listener = rt.listeners[f"{HOST}:{port}"]
    listener.stop_accepting()
    closing = asyncio.ensure_future(listener.wait_closed(60))
    await asyncio.sleep(0)
    assert not closing.done()  # a request is in flight
    gate.set()
    r = await within(client.response())
    assert r.status == 200 and r.body == b"finished"
    await within(closing, 10)  # woken by the last connection, long before 60 s
    assert listener.connections == 0


async def test_snapshot_with_a_port_in_use_is_rejected_whole(backend, proxy):
    a = await backend("a")
    port, new_port, busy_port = free_port(), free_port(), free_port()
    rt = await proxy(snapshot(service("web", [a], listen=port)))
    blocker = socket.socket()
    blocker.bind((HOST, busy_port))
    blocker.listen(1)
    try:
        bad = snapshot(
            service("web", [a], listen=port),
            service("extra", [a], listen=new_port),
            service("clash", [a], listen=busy_port),
        )
        with pytest.raises(SnapshotError) as info:
            await rt.apply(bad)
        assert str(busy_port) in str(info.value)
        assert rt.reloads[("file", "error")] == 1
        assert str(busy_port) in rt.last_errors["file"]
        assert set(rt.services) == {"web"}
        assert set(rt.listeners) == {f"{HOST}:{port}"}
        assert await refused(new_port), "a port bound by the failed snapshot must be released"
        r = await within(fetch(port))
        assert r.status == 200
    finally:
        blocker.close()
    # once the port is free the same snapshot applies
    await rt.apply(bad)
    assert rt.reloads[("file", "ok")] == 2
    assert "file" not in rt.last_errors
    assert (await within(fetch(busy_port))).status == 200


async def test_snapshot_with_an_unknown_route_service_is_rejected(backend, proxy):
    a = await backend("a")
    ep = free_port()
    good = snapshot(service("web", [a]), routes=[Route("", "/", "web")])
    rt = await proxy(good, entrypoints=[("http", ep)])
    bad = snapshot(service("web", [a]), routes=[Route("", "/", "web"),
                                                Route("", "/api", "nosuch")])
    with pytest.raises(SnapshotError):
        await rt.apply(bad)
    assert "nosuch" in rt.last_errors["file"]
    assert rt.reloads[("file", "error")] == 1
    assert rt.routes == good.routes
    r = await within(fetch(ep, target="/api"))
    assert r.status == 200 and r.get("x-backend") == "a"


async def test_removed_service_drains_and_its_route_disappears(backend, proxy):
    gate = asyncio.Event()
    a = await backend("a", gated(gate, b"api done"))
    b = await backend("b")
    ep = free_port()
    rt = await proxy(snapshot(service("api", [a]), service("web", [b]),
                              routes=[Route("", "/api", "api"), Route("", "/", "web")]),
                     entrypoints=[("http", ep)])
    client = await Client.open(ep)
    await client.send(b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
    await a.wait_requests(1)
    await rt.apply(snapshot(service("web", [b]), routes=[Route("", "/", "web")]))
    r = await within(fetch(ep, target="/api/y"))
    assert r.get("x-backend") == "b"
    gate.set()
    r = await within(client.response())
    assert r.status == 200 and r.body == b"api done"
    client.close()


# -- the big one: config rewrites under load, through the App --------------------------


def write_config(path: Path, admin: int, port: int, backends: list[HttpBackend]) -> None:
    lines = [
        f"admin: {{listen: {HOST}:{admin}}}",
        "shutdown: {grace: 1s}",
        "services:",
        "  - name: web",
        f"    listen: {HOST}:{port}",
        "    slow_start: 0s",  # membership is what changes here; see test_pool for the ramp
        "    backends:",
        *(f"      - {{address: {HOST}:{b.port}}}" for b in backends),
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def configured(app: App) -> set[int]:
    assert app.config is not None
    svc = app.config.snapshot.service("web")
    return {b.port for b in svc.backends} if svc else set()


async def test_config_rewrites_under_load_drop_nothing(backend, tmp_path):
    backends = [await backend(f"b{i}") for i in range(4)]
    by_name = {b.name: b for b in backends}
    admin, port = free_port(), free_port()
    path = tmp_path / "edgelb.yaml"
    write_config(path, admin, port, backends)
    app = App(path)
    await within(app.start())
    stop = asyncio.Event()
    ok = 0
    failures: list[str] = []
    answered_by: set[str] = set()

    async def load(i: int) -> None:
        nonlocal ok
        client = await Client.open(port)
        try:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = await within(client.request("GET", f"/c{i}/{n}"))
                except Exception as e:  # a dropped connection or a hang counts as a failure
                    failures.append(f"client {i} request {n}: {e!r}")
                    client.close()
                    client = await Client.open(port)
                    continue
                if r.status != 200:
                    failures.append(f"client {i} request {n}: {r.status} {r.body[:80]!r}")
                else:
                    ok += 1
                    answered_by.add(r.get("x-backend") or "?")
        finally:
            client.close()

    rng = random.Random(7)
    subsets = [[b for j, b in enumerate(backends) if m >> j & 1] for m in range(1, 16)]
    generation0 = app.generation
    clients = [asyncio.get_running_loop().create_task(load(i)) for i in range(32)]
    last = backends
    try:
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline:
            choice = rng.choice([s for s in subsets if s != last])
            write_config(path, admin, port, choice)
            last = choice
            await asyncio.sleep(0.2)
        want = {b.port for b in last}

        async def settled() -> None:
            while configured(app) != want:
                app.applied.clear()
                await app.applied.wait()

        await within(settled(), 5)
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
    applies = app.generation - generation0
    try:
        assert failures == [], f"{len(failures)} failed of {ok + len(failures)}: {failures[:5]}"
        assert ok > 1000, f"only {ok} requests in 8 s"
        # an atomic rename is read at the next poll (every 0.25 s): with a rewrite every
        # 200 ms, most rewrites land (some coalesce between two polls)
        assert applies >= 16, f"only {applies} of ~40 config rewrites were applied"
        assert answered_by == {b.name for b in backends}
        # only the last configured backends answer now
        before = {b.name: len(b.requests) for b in backends}
        client = await Client.open(port)
        names = set()
        for i in range(60):
            r = await within(client.request("GET", f"/final/{i}"))
            assert r.status == 200
            names.add(r.get("x-backend"))
        client.close()
        # only configured backends answer (which of them does is the policy's business: a
        # latency-aware one may keep low load on the fastest)
        assert names and names <= {b.name for b in last}
        for name, b in by_name.items():
            if b not in last:
                assert len(b.requests) == before[name], f"{name} was removed but got requests"
        runtime = app.runtime
        assert runtime is not None
        assert runtime.reloads.get(("file", "error"), 0) == 0
        # the load accounting balanced out: nothing in flight, nothing left draining
        pool = runtime.services["web"].pool
        await eventually(lambda: not pool.draining, what="removed backends finished draining")
        assert [s.inflight for s in pool.all_backends()] == [0] * len(pool.backends)
    finally:
        await within(app.stop(), 10)


async def test_entrypoints_and_snapshot_change_together(backend, proxy):
    """Dropping an entrypoint with the routes that needed it, and giving its port to a static
    service, is one valid change when both land in the same step."""
    a = await backend("a")
    ep = free_port()
    rt = await proxy(snapshot(service("web", [a]), routes=[Route("", "/", "web")]),
                     entrypoints=[("http", ep)])
    assert (await within(fetch(ep))).get("x-backend") == "a"
    moved = snapshot(service("web", [a], listen=ep))
    await rt.set_entrypoints([], rt.defaults, moved)
    assert rt.reloads[("file", "ok")] == 2
    assert rt.entrypoints == ()
    assert rt.listeners[f"{HOST}:{ep}"].kind == "http"
    assert (await within(fetch(ep))).get("x-backend") == "a"
    # an invalid combination is rejected whole and recorded for its source
    ep2 = free_port()
    with pytest.raises(SnapshotError):
        await rt.set_entrypoints([EntrypointSpec("http", Address(HOST, ep2))], rt.defaults,
                                 snapshot(service("web", [a], listen=ep2)))
    assert rt.reloads[("file", "error")] == 1
    assert rt.entrypoints == ()
    assert await refused(ep2)
    assert (await within(fetch(ep))).get("x-backend") == "a"


async def test_tunnel_survives_the_removal_of_its_backend(backend, proxy):
    old = await backend("old", upgrade_echo())
    new = await backend("new")
    port = free_port()
    rt = await proxy(snapshot(service("web", [old], listen=port)))
    client = await Client.open(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
    assert (await within(client.read_head())).status == 101
    state = rt.services["web"].pool.by_key[str(old.address)]
    await rt.apply(snapshot(service("web", [new], listen=port)))
    await client.send(b"still here")
    assert await within(client.reader.readexactly(10)) == b"still here"
    assert (await within(fetch(port))).get("x-backend") == "new"
    assert rt.services["web"].pool.draining == {str(old.address): state}
    client.close()
    await old.wait(lambda: old.open == 0)
    await eventually(lambda: state.inflight == 0 and not rt.services["web"].pool.draining)
