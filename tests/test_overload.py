"""Protecting backends (issue 4) on real sockets: per-backend caps with a bounded queue and
shedding, retries with a budget, passive outlier ejection, active health checks, source health,
panic mode and slow start on return."""

from __future__ import annotations

import asyncio
import dataclasses

from httpkit import (
    Call,
    Client,
    HttpBackend,
    by_path,
    eventually,
    fetch,
    free_port,
    ok,
    running,
    service,
    snapshot,
    tcp_echo_server,
    within,
)

from edgelb.ops.metrics import make_registry
from watchers.model import Backend, HealthCheck, Outlier, RetryBudget


class Concurrency:
    """A backend behaviour: serves each request for `seconds`, counting how many it serves at
    once (`peak`), like a worker pool the proxy must not overrun."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.now = 0
        self.peak = 0
        self.served = 0
        self.release: asyncio.Event | None = None  # when set, requests wait for it instead

    async def __call__(self, call: Call) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            if self.release is not None:
                await self.release.wait()
            else:
                await asyncio.sleep(self.seconds)  # the backend's service time
        finally:
            self.now -= 1
        self.served += 1
        await call.respond(200, b"done")


async def timed_get(port: int, target: str = "/") -> tuple[int, float, str | None, bytes]:
    """One request on a fresh connection, timed from when it is sent (not from the connect:
    a hundred connects at once in one test loop take a while themselves)."""
    loop = asyncio.get_running_loop()
    client = await Client.open(port)
    try:
        t0 = loop.time()
        resp = await client.request("GET", target)
        return resp.status, loop.time() - t0, resp.get("retry-after"), resp.body
    finally:
        client.close()


def metric(runtime, name: str, **labels: str) -> float | None:
    registry = make_registry(runtime, process=False)
    return registry.get_sample_value(name, labels)


# -- caps, the queue, shedding ----------------------------------------------------------------


async def test_a_capped_backend_never_sees_more_than_its_cap_and_the_excess_is_shed_in_time():
    work = Concurrency(0.05)
    backend = await HttpBackend("b", work).start()
    port = free_port()
    queue_timeout = 0.3
    snap = snapshot(service("s", [backend], listen=port, max_inflight=2,
                            queue_timeout=queue_timeout))
    async with running(snap) as rt:
        results = await within(asyncio.gather(*(timed_get(port) for _ in range(100))), 10)
        shed = [r for r in results if r[0] == 503]
        served = [r for r in results if r[0] == 200]
        assert work.peak == 2  # the cap was reached and never passed
        assert len(served) + len(shed) == 100
        assert len(served) >= 4  # the queue fed the backend while requests waited
        assert shed, "a burst of 100 on a capacity of 2 must shed"
        for _, elapsed, retry_after, body in shed:
            assert retry_after == "1"
            assert b"at its limit" in body
            assert elapsed <= queue_timeout + 0.1, elapsed
        state = rt.services["s"]
        assert state.shed.get("queue_timeout", 0) == len(shed)
        assert metric(rt, "edgelb_shed_total", service="s", reason="queue_timeout") == len(shed)
        assert metric(rt, "edgelb_backend_max_inflight", service="s",
                      backend=backend.spec.key) == 2
        assert not state.pool.waiters
    await backend.stop()


async def test_a_full_queue_sheds_at_once_and_the_queue_drains_in_order():
    work = Concurrency(0.0)
    work.release = asyncio.Event()
    backend = await HttpBackend("b", work).start()
    port = free_port()
    snap = snapshot(service("s", [backend], listen=port, max_inflight=1, queue_size=2,
                            queue_timeout=5.0))
    async with running(snap) as rt:
        pool = rt.services["s"].pool
        first = asyncio.create_task(timed_get(port, "/1"))
        await backend.wait_requests(1)
        waiting = [asyncio.create_task(timed_get(port, f"/w{i}")) for i in range(2)]
        await eventually(lambda: len(pool.waiters) == 2, what="two requests queued")
        status, elapsed, retry_after, body = await within(timed_get(port, "/over"))
        assert (status, retry_after) == (503, "1")
        assert b"queue is full" in body
        assert elapsed < 1.0  # at once, not after the queue timeout
        work.release.set()
        assert (await within(first))[0] == 200
        assert [(await within(t))[0] for t in waiting] == [200, 200]
        assert [r.target for r in backend.requests] == ["/1", "/w0", "/w1"]
        assert rt.services["s"].shed == {"queue_full": 1}
    await backend.stop()


async def test_a_waiting_request_whose_client_left_is_dropped_from_the_queue():
    work = Concurrency(0.0)
    work.release = asyncio.Event()
    backend = await HttpBackend("b", work).start()
    port = free_port()
    snap = snapshot(service("s", [backend], listen=port, max_inflight=1, queue_timeout=5.0))
    async with running(snap) as rt:
        pool = rt.services["s"].pool
        first = asyncio.create_task(timed_get(port, "/1"))
        await backend.wait_requests(1)
        gone = await Client.open(port)
        await gone.send(b"GET /gone HTTP/1.1\r\nhost: x\r\n\r\n")
        await eventually(lambda: len(pool.waiters) == 1, what="the request queued")
        gone.close()
        await eventually(lambda: not pool.waiters, what="the queue to forget the request")
        work.release.set()
        assert (await within(first))[0] == 200
        assert (await within(timed_get(port, "/after")))[0] == 200
        assert [r.target for r in backend.requests] == ["/1", "/after"]
    await backend.stop()


async def test_caps_scale_with_weight_relative_to_the_mean():
    a = await HttpBackend("a").start()
    b = await HttpBackend("b").start()
    port = free_port()
    svc = service("s", [], listen=port, max_inflight=6)
    svc = dataclasses.replace(svc, backends=(Backend("127.0.0.1", a.port, weight=1.0),
                                             Backend("127.0.0.1", b.port, weight=3.0)))
    async with running(snapshot(svc)) as rt:
        caps = {x.spec.port: x.cap for x in rt.services["s"].pool.backends}
        assert caps == {a.port: 3, b.port: 9}  # 6 x 1/2 and 6 x 3/2
    await a.stop()
    await b.stop()


async def test_no_backend_answers_503_with_retry_after_at_once():
    port = free_port()
    async with running(snapshot(service("s", [], listen=port, max_inflight=2))) as rt:
        status, _, retry_after, _ = await within(timed_get(port))
        assert (status, retry_after) == (503, "1")
        assert rt.services["s"].shed == {"no_backend": 1}


# -- retries ---------------------------------------------------------------------------------


async def test_an_idempotent_request_answered_503_is_retried_on_another_backend():
    bad = await HttpBackend("bad", ok(b"overloaded", status=503)).start()
    good = await HttpBackend("good").start()
    port = free_port()
    snap = snapshot(service("s", [bad, good], listen=port, balance="round-robin"))
    async with running(snap) as rt:
        statuses = [(await within(fetch(port, "GET", f"/{i}"))).status for i in range(6)]
        assert statuses == [200] * 6
        assert len(bad.requests) >= 1  # it was tried, and its 503 was retried
        assert rt.services["s"].retries_total == len(bad.requests)
        assert metric(rt, "edgelb_retries_total", service="s", result="sent") == len(bad.requests)
    await bad.stop()
    await good.stop()


async def test_a_post_is_not_retried_and_the_backends_own_503_reaches_the_client():
    bad = await HttpBackend("bad", ok(b"busy, come back later", status=503)).start()
    good = await HttpBackend("good").start()
    port = free_port()
    snap = snapshot(service("s", [bad, good], listen=port, balance="round-robin"))
    async with running(snap):
        seen = []
        for _ in range(4):
            resp = await within(fetch(port, "POST", "/", body=b"payload"))
            seen.append((resp.status, resp.body))
        assert (503, b"busy, come back later") in seen  # passed on as the backend sent it
        assert len(bad.requests) + len(good.requests) == 4  # each POST went exactly once
    await bad.stop()
    await good.stop()


async def test_retries_zero_turns_retries_of_answers_off():
    bad = await HttpBackend("bad", ok(b"no", status=502)).start()
    good = await HttpBackend("good").start()
    port = free_port()
    snap = snapshot(service("s", [bad, good], listen=port, balance="round-robin", retries=0))
    async with running(snap) as rt:
        statuses = sorted([(await within(fetch(port))).status for _ in range(4)])
        assert statuses == [200, 200, 502, 502]
        assert rt.services["s"].retries_total == 0
    await bad.stop()
    await good.stop()


async def test_the_retry_budget_bounds_retries_in_flight():
    slow_bad = asyncio.Event()

    async def bad_handler(call: Call) -> None:
        await slow_bad.wait()
        await call.respond(503, b"no")

    bad = await HttpBackend("bad", bad_handler).start()
    good = await HttpBackend("good").start()
    port = free_port()
    snap = snapshot(service("s", [bad, good], listen=port, balance="round-robin",
                            retry_budget=RetryBudget(ratio=0.0, min=0)))
    async with running(snap) as rt:
        tasks = [asyncio.create_task(fetch(port, "GET", f"/{i}")) for i in range(4)]
        await bad.wait_requests(2)
        slow_bad.set()
        statuses = sorted([(await within(t)).status for t in tasks])
        assert statuses == [200, 200, 503, 503]  # no budget: the 503s are passed on
        assert rt.services["s"].retries_denied == 2
        assert metric(rt, "edgelb_retries_total", service="s", result="denied") == 2
    await bad.stop()
    await good.stop()


async def test_a_get_reset_by_its_backend_is_retried_and_a_post_is_not():
    async def reset(call: Call) -> None:
        call.reset()

    dead = await HttpBackend("dead", reset).start()
    good = await HttpBackend("good").start()
    port = free_port()
    snap = snapshot(service("s", [dead, good], listen=port, balance="round-robin",
                            outlier=None))
    async with running(snap):
        gets = [(await within(fetch(port, "GET", "/"))).status for _ in range(4)]
        assert gets == [200] * 4
        posts = sorted([(await within(fetch(port, "POST", "/", body=b"x"))).status
                        for _ in range(4)])
        assert posts == [200, 200, 502, 502]
    await dead.stop()
    await good.stop()


# -- passive ejection --------------------------------------------------------------------------


async def test_a_killed_backend_is_ejected_and_clients_see_no_error():
    backends = [await HttpBackend(f"b{i}").start() for i in range(3)]
    port = free_port()
    snap = snapshot(service(
        "s", backends, listen=port, balance="round-robin",
        outlier=Outlier(failures=3, ejection=30.0, max_ejected=0.1),
    ))
    async with running(snap) as rt:
        pool = rt.services["s"].pool
        statuses: list[int] = []

        async def client(n: int) -> None:
            for i in range(n):
                statuses.append((await within(fetch(port, "GET", f"/{i}"))).status)

        await client(6)
        victim = backends[0]
        await victim.stop()
        await asyncio.gather(*(client(20) for _ in range(3)))
        assert statuses == [200] * len(statuses)  # every failure was retried elsewhere
        state = pool.by_key[victim.spec.key]
        assert state.ejected_until > 0
        assert not state.eligible
        assert metric(rt, "edgelb_ejections_total", service="s", backend=victim.spec.key) == 1
        assert metric(rt, "edgelb_backend_ejected", service="s", backend=victim.spec.key) == 1
        # the others were never ejected: at most one of three may be out (10%, at least one)
        assert [b.ejected_until for b in pool.backends if b is not state] == [0.0, 0.0]
    for b in backends[1:]:
        await b.stop()


async def test_at_most_the_allowed_share_of_a_pool_is_ejected_but_always_one():
    backends = [await HttpBackend(f"b{i}").start() for i in range(3)]
    port = free_port()
    snap = snapshot(service(
        "s", backends, listen=port, balance="round-robin", retries=2,
        outlier=Outlier(failures=2, ejection=30.0, max_ejected=0.1),
    ))
    async with running(snap) as rt:
        pool = rt.services["s"].pool
        await backends[0].stop()
        await backends[1].stop()
        dead = [pool.by_key[b.spec.key] for b in backends[:2]]
        for i in range(30):
            await within(fetch(port, "GET", f"/{i}"))
        assert all(b.failures >= 2 for b in dead)  # both failed often enough to be ejected
        assert sorted(bool(b.ejected_until) for b in dead) == [False, True]
        assert pool.ejected == 1
    await backends[2].stop()


async def test_an_ejected_backend_returns_after_its_time_through_slow_start():
    flaky_on = True

    async def flaky(call: Call) -> None:
        await call.respond(502 if flaky_on else 200, b"x")

    a = await HttpBackend("a", flaky).start()
    b = await HttpBackend("b").start()
    port = free_port()
    snap = snapshot(service(
        "s", [a, b], listen=port, balance="round-robin", retries=0, slow_start=30.0,
        outlier=Outlier(failures=2, ejection=0.3, max_ejection=1.0, max_ejected=0.5),
    ))
    async with running(snap) as rt:
        pool = rt.services["s"].pool
        state = pool.by_key[a.spec.key]
        for _ in range(4):
            await within(fetch(port))
        assert state.ejected_until > 0
        flaky_on = False
        await eventually(lambda: not state.ejected_until, timeout=3, what="the ejection to end")
        assert state.ramp_start > 0 and state.weight < state.spec.weight  # slow start
        assert state.eligible
        assert state.ejections == 1
    await a.stop()
    await b.stop()


# -- health: active checks and the source ------------------------------------------------------


def health_switch() -> tuple[dict[str, int], object]:
    state = {"status": 200}

    async def health(call: Call) -> None:
        await call.respond(state["status"], b"health")

    return state, health


async def test_a_backend_failing_its_check_gets_no_new_request_within_one_interval():
    switch, health = health_switch()
    sick = await HttpBackend("sick", by_path({"/healthz": health}, ok())).start()
    fine = await HttpBackend("fine").start()
    port = free_port()
    interval = 0.2
    check = HealthCheck(path="/healthz", interval=interval, timeout=0.5, rise=1, fall=1)
    snap = snapshot(service("s", [sick, fine], listen=port, balance="round-robin",
                            health_check=check, slow_start=0.0))
    async with running(snap) as rt:
        loop = asyncio.get_running_loop()
        state = rt.services["s"].pool.by_key[sick.spec.key]
        switch["status"] = 500
        t0 = loop.time()
        await eventually(lambda: not state.check_ok, timeout=3, what="the check to fail")
        assert loop.time() - t0 <= interval * 1.1 + 0.15
        before = sum(1 for r in sick.requests if r.target != "/healthz")
        for _ in range(10):
            assert (await within(fetch(port))).status == 200
        after = sum(1 for r in sick.requests if r.target != "/healthz")
        assert after == before
        assert metric(rt, "edgelb_backend_healthy", service="s", backend=sick.spec.key) == 0
        switch["status"] = 200
        await eventually(lambda: state.check_ok, timeout=3, what="the check to pass")
        for _ in range(4):
            await within(fetch(port))
        assert sum(1 for r in sick.requests if r.target != "/healthz") > after
    await sick.stop()
    await fine.stop()


async def test_a_recovering_backend_ramps_up():
    switch, health = health_switch()
    a = await HttpBackend("a", by_path({"/healthz": health}, ok())).start()
    b = await HttpBackend("b").start()
    port = free_port()
    check = HealthCheck(path="/healthz", interval=0.1, timeout=0.5, rise=2, fall=1)
    snap = snapshot(service("s", [a, b], listen=port, health_check=check, slow_start=30.0))
    async with running(snap) as rt:
        state = rt.services["s"].pool.by_key[a.spec.key]
        switch["status"] = 503
        await eventually(lambda: not state.check_ok, timeout=3, what="the check to fail")
        switch["status"] = 200
        await eventually(lambda: state.check_ok, timeout=3, what="the check to pass")
        assert state.ramp_start > 0
        assert state.weight < state.spec.weight  # starts at 10% of its weight
    await a.stop()
    await b.stop()


async def test_a_backend_added_to_a_running_pool_waits_for_its_first_passing_check():
    gate = asyncio.Event()

    async def health(call: Call) -> None:
        await gate.wait()
        await call.respond(200, b"ok")

    old = await HttpBackend("old").start()
    new = await HttpBackend("new", by_path({"/healthz": health}, ok())).start()
    port = free_port()
    check = HealthCheck(path="/healthz", interval=0.2, timeout=5.0, rise=2, fall=1)
    svc = service("s", [old], listen=port, health_check=check, balance="round-robin",
                  slow_start=0.0)
    async with running(snapshot(svc)) as rt:
        await rt.apply(snapshot(dataclasses.replace(svc, backends=(old.spec, new.spec))))
        state = rt.services["s"].pool.by_key[new.spec.key]
        assert not state.check_ok and not state.eligible
        for _ in range(4):
            assert (await within(fetch(port))).status == 200
        assert all(r.target == "/healthz" for r in new.requests)
        gate.set()
        await eventually(lambda: state.check_ok, timeout=3, what="the first check to pass")
        for _ in range(4):
            await within(fetch(port))
        assert any(r.target != "/healthz" for r in new.requests)
    await old.stop()
    await new.stop()


async def test_a_backend_the_source_calls_not_ready_gets_no_request():
    a = await HttpBackend("a").start()
    b = await HttpBackend("b").start()
    port = free_port()
    svc = service("s", [a, b], listen=port, balance="round-robin")
    async with running(snapshot(svc)) as rt:
        not_ready = dataclasses.replace(a.spec, ready=False)
        await rt.apply(snapshot(dataclasses.replace(svc, backends=(not_ready, b.spec))))
        served_before = len(a.requests)
        for _ in range(6):
            assert (await within(fetch(port))).status == 200
        assert len(a.requests) == served_before
    await a.stop()
    await b.stop()


async def test_panic_mode_balances_over_all_when_too_few_are_healthy():
    switches = []
    backends = []
    for i in range(4):
        switch, health = health_switch()
        switches.append(switch)
        backends.append(await HttpBackend(f"b{i}", by_path({"/healthz": health}, ok())).start())
    port = free_port()
    check = HealthCheck(path="/healthz", interval=0.1, timeout=0.5, rise=1, fall=1)
    snap = snapshot(service("s", backends, listen=port, balance="round-robin",
                            health_check=check, slow_start=0.0, panic_threshold=0.5))
    async with running(snap) as rt:
        pool = rt.services["s"].pool
        switches[0]["status"] = 500
        switches[1]["status"] = 500
        await eventually(lambda: sum(not b.check_ok for b in pool.backends) == 2, timeout=3,
                         what="two backends down")
        assert not pool.panic  # 2 of 4 healthy: not below 50%
        switches[2]["status"] = 500
        await eventually(lambda: pool.panic, timeout=3, what="panic mode")
        assert metric(rt, "edgelb_service_panic", service="s") == 1
        before = [sum(r.target != "/healthz" for r in b.requests) for b in backends]
        for _ in range(8):
            assert (await within(fetch(port))).status == 200
        after = [sum(r.target != "/healthz" for r in b.requests) for b in backends]
        assert all(x > y for x, y in zip(after, before, strict=True))  # all four got traffic
        for s in switches:
            s["status"] = 200
        await eventually(lambda: not pool.panic, timeout=3, what="panic to end")
    for b in backends:
        await b.stop()


# -- tcp mode ----------------------------------------------------------------------------------


async def test_tcp_connections_over_the_cap_wait_then_are_closed():
    server, bport = await tcp_echo_server()
    port = free_port()
    snap = snapshot(service("t", [bport], listen=port, mode="tcp", max_inflight=1,
                            queue_timeout=0.3, queue_size=1))
    async with running(snap) as rt:
        pool = rt.services["t"].pool
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(b"one")
        assert await within(r1.readexactly(3)) == b"one"
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(b"two")
        await eventually(lambda: len(pool.waiters) == 1, what="the second connection queued")
        r3, w3 = await asyncio.open_connection("127.0.0.1", port)
        assert await within(r3.read()) == b""  # queue full: closed at once
        w1.close()
        assert await within(r2.readexactly(3)) == b"two"  # got the slot when it freed
        r4, w4 = await asyncio.open_connection("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await within(r4.read()) == b""  # waited for queue_timeout, then closed
        assert 0.25 <= loop.time() - t0 <= 0.3 + 0.1
        assert rt.services["t"].shed == {"queue_full": 1, "queue_timeout": 1}
        for w in (w2, w3, w4):
            w.close()
    server.close()


async def test_in_panic_with_caps_the_unhealthy_take_only_what_would_be_shed():
    hold = asyncio.Event()

    async def held(call: Call) -> None:
        await hold.wait()
        await call.respond(200, b"healthy")

    healthy = await HttpBackend("healthy", held).start()
    sick = []
    for i in range(3):
        sick.append(await HttpBackend(f"sick{i}", by_path({"/healthz": ok(status=500)},
                                                          ok())).start())
    port = free_port()
    check = HealthCheck(path="/healthz", interval=0.1, timeout=0.5, rise=1, fall=1)
    snap = snapshot(service("s", [healthy, *sick], listen=port, balance="round-robin",
                            health_check=check, slow_start=0.0, max_inflight=1,
                            queue_timeout=0.3))
    async with running(snap) as rt:
        pool = rt.services["s"].pool
        await eventually(lambda: pool.panic, timeout=3, what="panic mode")
        first = asyncio.create_task(timed_get(port, "/first"))
        await healthy.wait_requests(1)
        status, elapsed, _, body = await within(timed_get(port, "/second"))
        # it waited its queue_timeout for the healthy backend, then went to a sick one
        assert status == 200 and body.startswith(b"sick")
        assert elapsed >= 0.25
        assert pool.panic_routed == 1
        assert rt.services["s"].shed == {}
        hold.set()
        assert (await within(first))[0] == 200
    await healthy.stop()
    for b in sick:
        await b.stop()


class Workers:
    """A backend with `capacity` workers of `seconds` each; more requests queue inside it."""

    def __init__(self, capacity: int, seconds: float) -> None:
        self.sem = asyncio.Semaphore(capacity)
        self.seconds = seconds

    async def __call__(self, call: Call) -> None:
        async with self.sem:
            await asyncio.sleep(self.seconds)  # the backend's service time
        await call.respond(200, b"done")


async def test_an_adaptive_cap_comes_down_toward_the_backends_capacity():
    capacity = 4
    backend = await HttpBackend("b", Workers(capacity, 0.01)).start()
    port = free_port()
    snap = snapshot(service("s", [backend], listen=port, max_inflight=64, adaptive=True,
                            queue_timeout=5.0))
    async with running(snap) as rt:
        state = rt.services["s"].pool.backends[0]
        assert state.static_cap == 64 and state.limiter is not None
        stop = asyncio.Event()

        async def client() -> None:
            conn = await Client.open(port)
            try:
                while not stop.is_set():
                    assert (await within(conn.request("GET", "/"))).status == 200
            finally:
                conn.close()

        clients = [asyncio.create_task(client()) for _ in range(48)]
        caps = []
        try:
            await eventually(lambda: state.cap <= 3 * capacity, timeout=15,
                             what="the adaptive cap to come down")
            for _ in range(40):  # then it stays near the capacity for the next 2 s
                await asyncio.sleep(0.05)  # sampling the cap while the load runs
                caps.append(state.cap)
        finally:
            stop.set()
            await within(asyncio.gather(*clients), 10)
        assert 1 <= min(caps) and max(caps) <= 3 * capacity, caps
        assert metric(rt, "edgelb_backend_max_inflight", service="s",
                      backend=backend.spec.key) == state.cap
    await backend.stop()
