"""A route's mirrors, CORS and per-client limits, from the file config through a running
proxy to real backends (HTTP/1.1 and HTTP/2), and the bounds of their tables."""

from __future__ import annotations

import asyncio

import pytest
from h2kit import H2Client
from httpkit import Client, closed_port, eventually, fetch, free_port, hang, ok, within
from routeskit import config_text, serve

from edgelb.control.runtime import SnapshotError
from edgelb.http import client_limits, mirror
from edgelb.http.client_limits import (
    ADMITTED,
    EXEMPT,
    RATE_LIMITED,
    TOO_MANY_CONNECTIONS,
    ClientLimiter,
)
from edgelb.ops.config import ConfigError, parse_config
from watchers.model import Backend as Spec
from watchers.model import ClientLimits, Filters, Mirror, Route, Service, Snapshot

pytestmark = pytest.mark.asyncio


def metric(runtime, service: str, table: str, key: str) -> int:
    return getattr(runtime.services[service], table).get(key, 0)


# -- mirrors ---------------------------------------------------------------------------------

async def test_mirror_copies_head_and_body_and_drops_its_answer(backend, proxy) -> None:
    web = await backend("web")
    shadow = await backend("shadow", ok(b"the shadow's answer", status=500))
    port, rt = await serve(proxy, {"web": web, "shadow": shadow}, """
  - filters:
      request_headers: {set: {x-env: prod}}
      mirrors: [shadow]
    backends: [web]
""")
    resp = await within(fetch(port, "POST", "/orders?id=7", headers=[("X-Trace", "t1")],
                              body=b"a body of bytes", host="shop.example.com"))
    assert resp.status == 200 and resp.body.startswith(b"web POST")
    await shadow.wait_requests(1)
    copy = shadow.requests[0]
    assert (copy.method, copy.target, copy.body) == ("POST", "/orders?id=7", b"a body of bytes")
    assert copy.get("host") == "shop.example.com"
    assert copy.get("x-trace") == "t1" and copy.get("x-env") == "prod"  # after the filters
    assert copy.get("x-forwarded-for") == "127.0.0.1" and copy.get("connection") == "close"
    chunked = await within(fetch(port, "PUT", "/c", headers=[("Transfer-Encoding", "chunked")],
                                 body=b"5\r\nhello\r\n0\r\n\r\n", length=False))
    assert chunked.status == 200
    await shadow.wait_requests(2)
    assert shadow.requests[1].body == b"hello"
    await eventually(lambda: metric(rt, "shadow", "mirrors", "sent") == 2)
    assert web.requests[0].body == b"a body of bytes"


async def test_mirror_never_delays_or_fails_the_original(backend, proxy) -> None:
    web = await backend("web")
    stuck = await backend("stuck", hang())
    port, rt = await serve(proxy, {"web": web, "stuck": stuck}, """
  - matches: [{path: {prefix: /hang}}]
    filters: {mirrors: [stuck]}
    backends: [web]
  - matches: [{path: {prefix: /down}}]
    filters: {mirrors: [gone]}
    backends: [web]
""", extra_services=f"  - {{name: gone, backends: [127.0.0.1:{closed_port()}]}}\n")
    loop = asyncio.get_running_loop()
    client = await Client.open(port)
    try:
        t0 = loop.time()
        for target in ("/hang/1", "/hang/2", "/down/1", "/down/2"):
            resp = await within(client.request("GET", target))
            assert resp.status == 200
        assert loop.time() - t0 < 2.0  # the stuck mirror answers never; 60 s response timeout
    finally:
        client.close()
    await stuck.wait_requests(2)
    await eventually(lambda: metric(rt, "gone", "mirrors", "failed") == 2)
    assert metric(rt, "stuck", "mirrors", "sent") == 0  # still waiting, and not the original's


async def test_mirror_percent_and_body_bound(backend, proxy) -> None:
    web, shadow, half = (await backend("web"), await backend("shadow"), await backend("half"))
    port, rt = await serve(proxy, {"web": web, "shadow": shadow, "half": half}, """
  - filters: {mirrors: [{service: shadow}, {service: half, percent: 25}]}
    backends: [web]
""")
    big = b"x" * (mirror.MIRROR_BODY_MAX + 1)
    resp = await within(fetch(port, "POST", "/big", body=big))
    assert resp.status == 200 and web.requests[-1].body_size == len(big)
    assert metric(rt, "shadow", "mirrors", "skipped") == 1
    n = 400
    client = await Client.open(port)
    try:
        for _ in range(n // 50):
            await client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 50)
            for _ in range(50):
                assert (await within(client.response())).status == 200
    finally:
        client.close()
    await shadow.wait_requests(n)
    await eventually(lambda: metric(rt, "shadow", "mirrors", "sent") == n)
    halves = len(half.requests)
    assert 50 <= halves <= 150  # 25 % of 400 = 100; the chance of leaving this is < 1e-6
    assert all(r.target == "/" for r in half.requests)


async def test_mirror_to_a_missing_service_is_refused() -> None:
    text = """
entrypoints: {http: {listen: 127.0.0.1:8080}}
services:
  - {name: web, backends: [127.0.0.1:9000]}
routes:
  - filters: {mirrors: [{service: nope}]}
    backends: [web]
"""
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert "routes[0].filters.mirrors[0].service: no http service named 'nope'" in str(e.value)


async def test_runtime_refuses_a_mirror_of_a_service_it_does_not_have(backend, proxy) -> None:
    web = await backend("web")
    rt = await proxy(None, entrypoints=[("http", free_port())])
    snap = Snapshot(source="test", services=(Service("web", backends=(Spec("127.0.0.1",
                                                                           web.port),)),),
                    routes=(Route("", "/", "web", name="routes[3]",
                                  filters=Filters(mirrors=(Mirror("shadow"),))),))
    with pytest.raises(SnapshotError) as e:
        await rt.apply(snap)
    assert "route routes[3] */: no http service named 'shadow' to mirror" in str(e.value)


# -- CORS ------------------------------------------------------------------------------------

async def test_cors_preflight_answered_by_the_proxy(backend, proxy) -> None:
    web = await backend("web", ok(headers=[("Access-Control-Allow-Origin", "https://evil")]))
    port, _ = await serve(proxy, {"web": web}, """
  - matches: [{path: {prefix: /open}}]
    filters: {cors: true}
    backends: [web]
  - filters:
      cors: {allow_origins: ["https://app.example.com", "https://*.shop.example"],
             allow_credentials: true, expose_headers: [X-Total], max_age: 10m}
    backends: [web]
""")
    pre = [("Origin", "https://app.example.com"), ("Access-Control-Request-Method", "PUT")]
    resp = await within(fetch(port, "OPTIONS", "/api", headers=pre))
    assert resp.status == 204 and resp.body == b""
    assert resp.get("access-control-allow-origin") == "https://app.example.com"
    assert resp.get("access-control-allow-credentials") == "true"
    assert resp.get("access-control-allow-methods") == "GET, PUT, POST, DELETE, PATCH, OPTIONS"
    assert "Authorization" in (resp.get("access-control-allow-headers") or "")
    assert resp.get("access-control-max-age") == "600"
    assert resp.get("vary") == "Origin"
    refused = await within(fetch(port, "OPTIONS", "/api", headers=[
        ("Origin", "https://a.b.shop.example"), ("Access-Control-Request-Method", "PUT")]))
    assert refused.status == 204 and not refused.has("access-control-allow-origin")
    star = await within(fetch(port, "OPTIONS", "/open", headers=pre))
    assert star.get("access-control-allow-origin") == "*"
    assert star.get("access-control-max-age") == "1728000" and not star.has("vary")
    assert web.requests == []  # no preflight reached the backend
    # a plain OPTIONS (no Origin) is the backend's
    assert (await within(fetch(port, "OPTIONS", "/api"))).status == 200


async def test_cors_headers_on_responses(backend, proxy) -> None:
    web = await backend("web", ok(headers=[("Access-Control-Allow-Origin", "https://evil"),
                                           ("Vary", "Accept-Encoding")]))
    port, _ = await serve(proxy, {"web": web}, """
  - filters:
      cors: {allow_origins: ["https://*.shop.example"], expose_headers: [X-Total]}
    backends: [web]
""")
    client = await Client.open(port)
    try:
        for _ in range(2):  # the second by the relay's cached head
            resp = await within(client.request("GET", "/", headers=[
                ("Origin", "https://eu.shop.example")]))
            assert resp.status == 200
            assert resp.all("access-control-allow-origin") == ["https://eu.shop.example"]
            assert resp.get("access-control-expose-headers") == "X-Total"
            assert not resp.has("access-control-allow-credentials")
            assert sorted(resp.all("vary")) == ["Accept-Encoding", "Origin"]
        other = await within(client.request("GET", "/", headers=[
            ("Origin", "https://shop.example")]))
        assert not other.has("access-control-allow-origin")
        assert "Origin" in other.all("vary")
    finally:
        client.close()


# -- per-client limits -----------------------------------------------------------------------

async def test_rate_limit_answers_429_with_retry_after(backend, proxy) -> None:
    web = await backend("web")
    routes = """
  - matches: [{path: {prefix: /api}}]
    filters: {limits: {rps: 0.5, burst: 3}}
    backends: [web]
  - matches: [{path: {prefix: /inside}}]
    filters: {limits: {rps: 0.5, burst: 1, exempt: [127.0.0.0/8]}}
    backends: [web]
  - backends: [web]
"""
    port, rt = await serve(proxy, {"web": web}, routes)
    client = await Client.open(port)
    try:
        got = [(await within(client.request("GET", "/api/x"))) for _ in range(5)]
        assert [r.status for r in got] == [200, 200, 200, 429, 429]
        assert got[3].get("retry-after") == "2"  # a token every 2 s, whole seconds
        for _ in range(5):  # other routes have their own limits, or none
            assert (await within(client.request("GET", "/other"))).status == 200
            assert (await within(client.request("GET", "/inside"))).status == 200
    finally:
        client.close()
    assert metric(rt, "web", "shed", "rate_limit") == 2
    assert len(web.requests) == 13
    # a reload that keeps the route's limits keeps its buckets; a changed limit starts afresh
    for rps, status in ((0.5, 429), (0.25, 200)):
        text = config_text(port, {"web": web}, routes.replace("rps: 0.5, burst: 3",
                                                              f"rps: {rps}, burst: 3"))
        await rt.apply(parse_config(text).snapshot)
        assert (await within(fetch(port, "GET", "/api/y"))).status == status


async def test_cors_headers_on_a_429(backend, proxy) -> None:
    web = await backend("web")
    port, _ = await serve(proxy, {"web": web}, """
  - filters: {cors: {allow_origins: ["https://app.example.com"]}, limits: {rps: 1, burst: 1}}
    backends: [web]
""")
    origin = [("Origin", "https://app.example.com")]
    assert (await within(fetch(port, "GET", "/", headers=origin))).status == 200
    resp = await within(fetch(port, "GET", "/", headers=origin))
    assert resp.status == 429
    assert resp.get("access-control-allow-origin") == "https://app.example.com"


async def test_client_connections_limit_on_http1_and_h2(backend, proxy) -> None:
    slow = await backend("slow", hang())
    web = await backend("web")
    port, rt = await serve(proxy, {"slow": slow, "web": web}, """
  - matches: [{path: {prefix: /slow}}]
    filters: {limits: {connections: 2}}
    backends: [slow]
  - filters: {limits: {connections: 1}}
    backends: [web]
""", entrypoint="h2c: true")
    # HTTP/1.1: two held requests, the third at once refused
    held = [await Client.open(port) for _ in range(2)]
    try:
        for c in held:
            await c.send(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        await slow.wait_requests(2)
        resp = await within(fetch(port, "GET", "/slow/3"))
        assert (resp.status, resp.get("retry-after")) == (429, "1")
    finally:
        for c in held:
            c.close()
    # the slots come back when those requests end
    await eventually(lambda: metric(rt, "slow", "shed", "client_connections") == 1)
    # HTTP/2: streams of one connection count as the client's requests; ended ones give back
    h2 = await H2Client().connect(port)
    try:
        for _ in range(3):
            r = await h2.get("/")
            assert r.status == 200
        sid1 = h2.request("/slow/a")
        sid2 = h2.request("/slow/b")
        await slow.wait_requests(4)
        r3 = await h2.get("/slow/c")
        assert r3.status == 429 and r3.headers.get(b"retry-after") == b"1"
        h2.conn.reset_stream(sid1)
        h2.flush()
        await eventually(lambda: rt.services["slow"].pool.backends[0].inflight < 2)
        sid4 = h2.request("/slow/d")
        await slow.wait_requests(5)
        assert h2.responses[sid4].status == 0 and h2.responses[sid2].status == 0  # held
    finally:
        await h2.close()
    assert metric(rt, "slow", "shed", "client_connections") == 2


async def test_rate_limit_on_h2(backend, proxy) -> None:
    web = await backend("web")
    port, rt = await serve(proxy, {"web": web}, """
  - filters: {limits: {rps: 1, burst: 2}}
    backends: [web]
""", entrypoint="h2c: true")
    h2 = await H2Client().connect(port)
    try:
        statuses = [(await h2.get("/")).status for _ in range(3)]
    finally:
        await h2.close()
    assert statuses == [200, 200, 429]
    assert metric(rt, "web", "shed", "rate_limit") == 1


async def test_limiter_tables_are_bounded(monkeypatch) -> None:
    monkeypatch.setattr(client_limits, "MAX_BUCKETS", 100)
    lim = ClientLimiter(ClientLimits(rps=1.0, burst=1, connections=1, exempt=("10.0.0.0/8",)))
    for i in range(1000):  # a flood from many addresses
        ip = b"192.0.%d.%d" % (i // 256, i % 256)
        assert lim.admit(ip, 0.0) == ADMITTED
        lim.release(ip)
    assert len(lim.buckets) == 100 and not lim.inflight
    # the most recently seen are kept: the last address is still empty
    assert lim.admit(b"192.0.3.231", 0.5) == RATE_LIMITED
    assert lim.retry_after(b"192.0.3.231") == 1
    held = [b"198.51.%d.%d" % (i // 256, i % 256) for i in range(100)]
    for ip in held:
        assert lim.admit(ip, 10.0) == ADMITTED  # each holds its one request
    assert lim.admit(held[0], 20.0) == TOO_MANY_CONNECTIONS
    assert lim.admit(b"203.0.113.1", 20.0) == TOO_MANY_CONNECTIONS  # the table is full
    assert len(lim.inflight) == 100
    assert lim.admit(b"10.1.2.3", 20.0) == EXEMPT


async def test_filter_config_errors_name_the_key() -> None:
    base = """
entrypoints: {http: {listen: 127.0.0.1:8080}}
services:
  - {name: web, backends: [127.0.0.1:9000]}
routes:
  - backends: [web]
    filters: """
    cases = {
        "{cors: {allow_origins: ['app.example.com']}}":
            "routes[0].filters.cors.allow_origins[0]: 'app.example.com' is not an origin",
        "{cors: {allow_credentials: maybe}}":
            "routes[0].filters.cors.allow_credentials: expected true or false",
        "{limits: {rps: -1}}": "routes[0].filters.limits.rps: -1: requests per second",
        "{limits: {burst: 3}}": "routes[0].filters.limits.burst: a burst needs rps",
        "{limits: {connections: 2, exempt: [nonsense]}}": "routes[0].filters.limits.exempt[0]",
        "{mirrors: [{service: web, percent: 0}]}": "routes[0].filters.mirrors[0].percent",
        "{limits: {rps: 1, speed: 2}}": "routes[0].filters.limits.speed",
    }
    for filters, expected in cases.items():
        with pytest.raises(ConfigError) as e:
            parse_config(base + filters + "\n")
        assert expected in str(e.value), (filters, str(e.value))
