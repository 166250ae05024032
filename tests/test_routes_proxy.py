"""The `routes:` of the file config through a running proxy, with real sockets: matches and
their precedence, header filters both ways, redirects, rewrites, the per-route timeout and
the weighted split."""

from __future__ import annotations

import asyncio
import math

import pytest
from httpkit import Client, fetch, free_port, hang, ok, service, slow, snapshot, within
from routeskit import serve_config

from watchers.model import Route

pytestmark = pytest.mark.asyncio


async def names(port: int, cases: list[tuple[str, str, list[tuple[str, str]], str]]
                ) -> list[str]:
    out = []
    for method, target, headers, host in cases:
        resp = await within(fetch(port, method, target, headers=headers, host=host))
        out.append(resp.body.decode().split(" ")[0] if resp.status == 200 else str(resp.status))
    return out


async def test_matches_follow_the_gateway_api_precedence(backend, proxy) -> None:
    bs = {n: await backend(n) for n in ("base", "exact", "regex", "hdr", "hdr2", "query",
                                        "post", "other")}
    port = await serve_config(proxy, bs, """
  - hosts: [shop.example.com]
    backends: [base]
  - hosts: [shop.example.com]
    matches: [{path: {exact: /api/users/42}}]
    backends: [exact]
  - hosts: [shop.example.com]
    matches: [{path: {regex: "/api/users/[0-9]+"}}]
    backends: [regex]
  - hosts: [shop.example.com]
    matches: [{path: {prefix: /api}, headers: {x-canary: "on"}}]
    backends: [hdr]
  - hosts: [shop.example.com]
    matches: [{path: {prefix: /api}, headers: [{name: x-canary, value: "on"},
                                                {name: x-user, regex: "[a-f0-9]{4}"}]}]
    backends: [hdr2]
  - hosts: [shop.example.com]
    matches: [{path: {prefix: /api}, query: {debug: "1"}}]
    backends: [query]
  - hosts: [shop.example.com]
    matches: [{path: {prefix: /api}, method: POST}]
    backends: [post]
  - hosts: [other.example.com]
    matches: [{path: {prefix: /api}, headers: {x-canary: "on"}}]
    backends: [other]
""")
    h = "shop.example.com"
    got = await names(port, [
        ("GET", "/", [], h),
        ("GET", "/api/users/42", [("X-Canary", "on")], h),  # exact beats everything
        ("GET", "/api/users/7", [("X-Canary", "on")], h),  # a regex beats a prefix
        ("GET", "/api/users/7x", [("X-Canary", "on")], h),  # the whole path must match
        ("GET", "/api/x", [("X-Canary", "on"), ("X-User", "beef")], h),  # most headers
        ("GET", "/api/x", [("X-Canary", "on"), ("X-User", "zzzz")], h),
        ("GET", "/api/x", [("X-Canary", "off")], h),
        ("GET", "/api/x?debug=1", [], h),
        ("POST", "/api/x?debug=1", [("X-Canary", "on")], h),  # method before headers
        ("GET", "/api/x", [("X-Canary", "on")], "other.example.com"),
        ("GET", "/api/x", [], "other.example.com"),
    ])
    assert got == ["base", "exact", "regex", "hdr", "hdr2", "hdr", "base", "query", "post",
                   "other", "404"]


async def test_request_and_response_header_filters(backend, proxy) -> None:
    web = await backend("web", ok(headers=[("X-Powered-By", "php"), ("Cache-Control", "max"),
                                           ("X-Keep", "1")]))
    port = await serve_config(proxy, {"web": web}, """
  - filters:
      request_headers: {set: {x-env: prod}, add: {x-tag: a}, remove: [x-secret]}
      response_headers: {set: {cache-control: no-store}, add: {x-served: edgelb},
                         remove: [x-powered-by]}
    backends: [web]
""")
    client = await Client.open(port)
    try:
        for _ in range(3):  # the second and third go by the relay's cached heads
            resp = await within(client.request("GET", "/x", headers=[
                ("X-Env", "dev"), ("X-Tag", "z"), ("X-Secret", "s"), ("X-Other", "o")]))
            assert resp.status == 200
            assert resp.all("cache-control") == ["no-store"]
            assert resp.get("x-served") == "edgelb"
            assert not resp.has("x-powered-by")
            assert resp.get("x-keep") == "1"
    finally:
        client.close()
    req = web.requests[-1]
    assert req.all("x-env") == ["prod"]
    assert req.all("x-tag") == ["z", "a"]
    assert not req.has("x-secret")
    assert req.get("x-other") == "o"


async def test_redirects(backend, proxy) -> None:
    web = await backend("web")
    port = await serve_config(proxy, {"web": web}, """
  - matches: [{path: {exact: /old}}]
    filters: {redirect: {path: /new, status: 301}}
  - matches: [{path: {prefix: /docs}}]
    filters: {redirect: {scheme: https, host: docs.example.com, prefix: /v2}}
  - matches: [{path: {prefix: /port}}]
    filters: {redirect: {port: 8443, status: 308}}
  - backends: [web]
""")
    cases = [
        ("/old?a=1", "shop.example.com:8080", 301, "http://shop.example.com:8080/new?a=1"),
        ("/docs/x/y?q", "shop.example.com:8080", 302, "https://docs.example.com/v2/x/y?q"),
        ("/docs", "shop.example.com", 302, "https://docs.example.com/v2"),
        ("/port/a", "shop.example.com", 308, "http://shop.example.com:8443/port/a"),
    ]
    for target, host, status, location in cases:
        resp = await within(fetch(port, "GET", target, host=host))
        assert (resp.status, resp.get("location")) == (status, location)
    assert web.requests == []


async def test_rewrites(backend, proxy) -> None:
    web = await backend("web")
    port = await serve_config(proxy, {"web": web}, """
  - matches: [{path: {prefix: /api}}]
    filters: {rewrite: {host: api.internal, prefix: /v2}}
    backends: [web]
  - matches: [{path: {prefix: /strip}}]
    filters: {rewrite: {prefix: /}}
    backends: [web]
  - matches: [{path: {exact: /health}}]
    filters: {rewrite: {path: /internal/healthz}}
    backends: [web]
""")
    cases = [("/api/users?id=3", "/v2/users?id=3", "api.internal"),
             ("/api", "/v2", "api.internal"),
             ("/strip/a/b", "/a/b", "shop.example.com"),
             ("/strip", "/", "shop.example.com"),
             ("/health?x", "/internal/healthz?x", "shop.example.com")]
    for target, seen, host in cases:
        resp = await within(fetch(port, "GET", target, host="shop.example.com"))
        assert resp.status == 200
        req = web.requests[-1]
        assert (req.target, req.get("host")) == (seen, host)
        assert req.get("x-forwarded-host") == "shop.example.com"  # the client's, still


async def test_route_timeout_is_the_routes_not_the_services(backend, proxy) -> None:
    slow = await backend("slow", hang())
    port = await serve_config(proxy, {"slow": slow}, """
  - matches: [{path: {prefix: /quick}}]
    timeout: 300ms
    backends: [slow]
""")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    resp = await within(fetch(port, "GET", "/quick"))
    assert resp.status == 504
    assert loop.time() - t0 < 3.0  # the service's response timeout is 60 s


async def test_an_infinite_route_timeout_outlasts_the_services(backend, proxy) -> None:
    """math.inf (the Gateway API's `timeouts.request: 0s`): no timeout, whatever the
    service's response_timeout says."""
    web = await backend("web", slow(0.6, b"late"))
    port = free_port()
    snap = snapshot(service("web", [web], response_timeout=0.2), routes=[
        Route("", "/none", "web", timeout=math.inf, name="none"),
        Route("", "/service", "web", name="service")])
    await proxy(snap, entrypoints=[("http", port)])
    resp = await within(fetch(port, "GET", "/none"))
    assert (resp.status, resp.body) == (200, b"late")
    assert (await within(fetch(port, "GET", "/service"))).status == 504


async def test_weighted_split_lands_within_two_percent(backend, proxy) -> None:
    bs = {"web": await backend("web"), "canary": await backend("canary")}
    port = await serve_config(proxy, bs, """
  - backends: [{service: web, weight: 90}, {service: canary, weight: 10}]
""")
    total, conns = 10_000, 8
    request = b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n"

    async def drive(n: int) -> None:
        client = await Client.open(port)
        try:
            for _ in range(n // 50):  # 50 pipelined at a time
                await client.send(request * 50)
                for _ in range(50):
                    assert (await client.response()).status == 200
        finally:
            client.close()

    await asyncio.wait_for(asyncio.gather(*(drive(total // conns) for _ in range(conns))), 60)
    web, canary = len(bs["web"].requests), len(bs["canary"].requests)
    assert web + canary == total
    assert abs(canary / total - 0.10) <= 0.02
    assert abs(web / total - 0.90) <= 0.02
