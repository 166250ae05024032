"""Ingress annotations (ingress-nginx's, and the same names under edgelb.io/) -> routes,
filters and per-Ingress services: the translation, pure (watchers/kubernetes/nginx_annotations.py
through translate()), one test per supported annotation of the README's table, checked through
the real Router where matching matters."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from test_k8s_translate import (
    ep,
    ingress,
    ingress_class,
    messages,
    path,
    rule,
    secret,
    service,
    slice_,
    tr,
)

from edgelb.http.filters import expand_groups
from edgelb.http.router import Router
from watchers.kubernetes import nginx_annotations as na
from watchers.kubernetes.translate import Translation
from watchers.model import (
    ClientLimits,
    Cors,
    HeaderEdits,
    Redirect,
    Rewrite,
    Route,
    ValueMatch,
    WeightedService,
)

N = "nginx.ingress.kubernetes.io/"
HOST = "shop.example.com"
WEB = "default/web:80"


def cluster(*ingresses: dict, extra: tuple[dict, ...] = (), nginx: bool = True) -> Translation:
    objs = [ingress_class(), service("web"), service("canary"),
            slice_("web", "web-1", ep("10.0.0.1")), slice_("canary", "canary-1", ep("10.0.0.2")),
            *extra, *ingresses]
    return tr(*objs, ingress_nginx=nginx)


def web(annotations: dict[str, str] | None = None, name: str = "shop", p: str = "/api",
        svc: str = "web", kind: str = "Prefix", tls: list | None = None,
        created: str = "2024-01-01T00:00:00Z") -> dict:
    return ingress(name, rule(HOST, path(p, svc, kind=kind)), annotations=annotations,
                   tls=tls, created=created)


def nginx(**names: str) -> dict[str, str]:
    """{name_with_underscores: value} -> nginx.ingress.kubernetes.io/ annotations."""
    return {N + k.replace("_", "-"): v for k, v in names.items()}


def routes(t: Translation, host: str = HOST) -> list[Route]:
    return [r for r in t.snapshot.routes if r.host == host]


def the_route(t: Translation) -> Route:
    (r,) = routes(t)
    return r


def svc_of(t: Translation, name: str) -> Any:
    s = t.snapshot.service(name)
    assert s is not None, (name, [s.name for s in t.snapshot.services])
    return s


def pick(t: Translation, target: str, headers: dict[str, str] | None = None,
         host: str = HOST) -> Any:
    lines = [f"{k}: {v}\r\n".encode() for k, v in (headers or {}).items()]
    return Router(t.snapshot.routes).match(host, target, b"GET", lines)


# -- reading the two prefixes --------------------------------------------------------------------
def test_nginx_annotations_are_read_only_when_the_option_is_on() -> None:
    ing = web(nginx(proxy_body_size="1k"))
    off = cluster(ing, nginx=False)
    assert the_route(off).service == WEB
    assert svc_of(off, WEB).policy.max_body is None
    assert any("ingress_nginx_annotations: true" in m for m in messages(off, "Ingress"))
    on = cluster(ing)
    assert the_route(on).service == f"{WEB}~shop"
    assert svc_of(on, f"{WEB}~shop").policy.max_body == 1024


def test_edgelb_io_names_are_always_read_and_win_over_nginx_ones() -> None:
    t = cluster(web({"edgelb.io/proxy-body-size": "2k"}), nginx=False)
    assert svc_of(t, f"{WEB}~shop").policy.max_body == 2048
    both = cluster(web({"edgelb.io/proxy-body-size": "2k", N + "proxy-body-size": "5k"}))
    assert svc_of(both, f"{WEB}~shop").policy.max_body == 2048


@pytest.mark.parametrize("name", ["configuration-snippet", "server-snippet", "auth-snippet",
                                  "stream-snippet", "modsecurity-snippet", "location-snippet"])
def test_snippets_are_refused_naming_the_cve_and_the_ingress_is_still_served(name: str
                                                                            ) -> None:
    t = cluster(web({N + name: "return 200 'pwned';", N + "proxy-body-size": "1k"}))
    (msg,) = [m for m in messages(t, "Ingress", "shop") if name in m]
    assert "CVE-2025-1974" in msg and "served without it" in msg
    r = pick(t, "/api/x")
    assert r is not None and r.service == f"{WEB}~shop"
    assert svc_of(t, f"{WEB}~shop").policy.max_body == 1024  # the rest still applies


def test_unknown_and_unsupported_annotations_are_reported_once_and_never_fatal() -> None:
    t = cluster(web(nginx(proxy_buffering="on", made_up_thing="1")))
    msgs = messages(t, "Ingress", "shop")
    assert sum("proxy-buffering" in m and "not supported" in m for m in msgs) == 1
    assert sum("made-up-thing" in m and "unknown annotation" in m for m in msgs) == 1
    assert the_route(t).service == WEB


def test_a_per_service_key_on_an_ingress_points_at_the_service() -> None:
    t = cluster(web({"edgelb.io/max-inflight": "4"}))
    (msg,) = messages(t, "Ingress", "shop")
    assert "set edgelb.io/max-inflight on the Service" in msg


def test_use_regex_on_one_ingress_makes_the_hosts_prefix_paths_regexes() -> None:
    regex = ingress("a", rule(HOST, path("/api/v[0-9]+", "web")),
                    annotations=nginx(use_regex="true"))
    plain = ingress("b", rule(HOST, path("/static", "canary"), path("/exact", "canary",
                                                                     kind="Exact")))
    other = ingress("c", rule("other.example.com", path("/static", "canary")))
    t = cluster(regex, plain, other)
    by_path = {r.path: r for r in routes(t)}
    assert by_path["(?i:/static).*"].regex and by_path["/exact"].exact
    assert pick(t, "/STATICfoo").service == "default/canary:80"  # nginx's ~* "^/static"
    assert pick(t, "/staticfoo", host="other.example.com") is None  # other hosts keep Prefix


def test_a_value_that_is_not_a_string_is_a_problem() -> None:
    t = cluster(web({N + "limit-rps": 5}))  # type: ignore[dict-item]
    assert any("in quotes" in m for m in messages(t, "Ingress"))
    assert the_route(t).filters is None


# -- paths, rewrites, redirects ------------------------------------------------------------------
def test_use_regex_makes_a_case_insensitive_prefix_regex_route() -> None:
    t = cluster(web(nginx(use_regex="true"), p="/api/v[0-9]+"))
    r = the_route(t)
    assert r.regex and r.path == "(?i:/api/v[0-9]+).*"
    assert pick(t, "/API/V2/items") is not None
    assert pick(t, "/api/vx") is None


def test_a_regex_path_may_hold_a_question_mark_a_plain_one_may_not() -> None:
    t = cluster(web(nginx(use_regex="true"), p="/shop/?(.*)"))
    assert the_route(t).path == "(?i:/shop/?(.*)).*"
    plain = cluster(web(p="/shop/?"))
    assert routes(plain) == []


def test_use_regex_with_an_unsafe_pattern_skips_the_path() -> None:
    t = cluster(web(nginx(use_regex="true"), p="/(a+)+"))
    assert routes(t) == []
    assert any("repeat inside a repeat" in m for m in messages(t, "Ingress"))


def test_rewrite_target_with_capture_groups() -> None:
    t = cluster(web(nginx(use_regex="true", rewrite_target="/$2"), p="/api(/|$)(.*)"))
    r = the_route(t)
    assert r.regex and r.filters is not None
    assert r.filters.rewrite == Rewrite(path="/$2")
    rule_ = pick(t, "/api/users/7")
    assert rule_ is not None and rule_.regex is not None
    assert expand_groups("/$2", rule_.regex.fullmatch("/api/users/7")) == "/users/7"
    assert expand_groups("/$2", rule_.regex.fullmatch("/api")) == "/"
    assert expand_groups("/x$9", rule_.regex.fullmatch("/api")) == "/x"  # no such group


def test_rewrite_target_without_use_regex_replaces_the_whole_path() -> None:
    t = cluster(web(nginx(rewrite_target="/"), p="/old"))
    r = the_route(t)
    assert r.regex  # ingress-nginx: rewrite-target makes the paths regular expressions
    assert r.filters is not None and r.filters.rewrite == Rewrite(path="/")
    assert pick(t, "/old/page") is not None


def test_app_root_redirects_slash_only() -> None:
    t = cluster(web(nginx(app_root="/app"), p="/"))
    root = pick(t, "/")
    assert root is not None and root.route.exact
    assert root.redirect == Redirect(path="/app", status=302)
    other = pick(t, "/x")
    assert other is not None and other.redirect is None and other.service == WEB


def test_ssl_redirect_defaults_on_with_tls_and_can_be_turned_off() -> None:
    tls = [{"hosts": [HOST], "secretName": "cert"}]
    t = cluster(web(tls=tls), extra=(secret("cert"),))
    assert svc_of(t, f"{WEB}~shop").policy.redirect_to_https
    off = cluster(web(nginx(ssl_redirect="false"), tls=tls), extra=(secret("cert"),))
    assert the_route(off).service == WEB
    assert not svc_of(off, WEB).policy.redirect_to_https
    plain = cluster(web())
    assert not svc_of(plain, WEB).policy.redirect_to_https
    no_tls = cluster(web(nginx(ssl_redirect="true")))  # needs TLS, as in ingress-nginx
    assert not svc_of(no_tls, WEB).policy.redirect_to_https
    edgelb_only = cluster(web(tls=tls), extra=(secret("cert"),), nginx=False)
    assert not svc_of(edgelb_only, WEB).policy.redirect_to_https  # no nginx default
    asked = cluster(web({"edgelb.io/ssl-redirect": "true"}, tls=tls), extra=(secret("cert"),),
                    nginx=False)
    assert svc_of(asked, f"{WEB}~shop").policy.redirect_to_https


def test_force_ssl_redirect_without_tls() -> None:
    t = cluster(web(nginx(force_ssl_redirect="true")))
    assert svc_of(t, f"{WEB}~shop").policy.redirect_to_https


@pytest.mark.parametrize("code,want", [(None, 301), ("308", 308), ("302", 301)])
def test_permanent_redirect_and_its_code(code: str | None, want: int) -> None:
    ann = nginx(permanent_redirect="https://new.example.com:8443/landing")
    if code is not None:
        ann[N + "permanent-redirect-code"] = code
    t = cluster(web(ann))
    f = the_route(t).filters
    assert f is not None
    assert f.redirect == Redirect(scheme="https", host="new.example.com", port=8443,
                                  path="/landing", status=want)
    if code == "302":
        assert any("permanent-redirect-code" in m for m in messages(t, "Ingress"))


def test_temporal_redirect() -> None:
    t = cluster(web(nginx(temporal_redirect="http://maintenance.example.com")))
    f = the_route(t).filters
    assert f is not None
    assert f.redirect == Redirect(scheme="http", host="maintenance.example.com", path="/",
                                  status=302)


@pytest.mark.parametrize("code,want", [(None, 302), ("307", 307), ("301", 302)])
def test_temporal_redirect_code(code: str | None, want: int) -> None:
    ann = nginx(temporal_redirect="/maintenance")
    if code is not None:
        ann[N + "temporal-redirect-code"] = code
    f = the_route(cluster(web(ann))).filters
    assert f is not None and f.redirect == Redirect(path="/maintenance", status=want)


def test_ssl_passthrough_under_the_nginx_prefix() -> None:
    t = cluster(web(nginx(ssl_passthrough="true"), p="/"))
    name = f"{WEB}@{HOST}"
    assert the_route(t).service == name
    s = svc_of(t, name)
    assert s.mode == "tcp" and s.tls_passthrough
    off = cluster(web(nginx(ssl_passthrough="true"), p="/"), nginx=False)
    assert the_route(off).service == WEB


def test_a_redirect_that_is_not_a_url_is_a_problem() -> None:
    t = cluster(web(nginx(permanent_redirect="ftp://x")))
    assert the_route(t).filters is None
    assert any("not an http(s) URL" in m for m in messages(t, "Ingress"))


def test_upstream_vhost_rewrites_the_host() -> None:
    f = the_route(cluster(web(nginx(upstream_vhost="internal.svc")))).filters
    assert f is not None and f.rewrite == Rewrite(host="internal.svc")


def test_x_forwarded_prefix_sets_the_header() -> None:
    f = the_route(cluster(web(nginx(x_forwarded_prefix="/api")))).filters
    assert f is not None
    assert f.request_headers == HeaderEdits(set=(("x-forwarded-prefix", "/api"),))


# -- per-service policy, per Ingress -------------------------------------------------------------
@pytest.mark.parametrize("value,want", [("8m", 8 * 1024**2), ("512k", 512 * 1024),
                                        ("1g", 1024**3), ("100", 100), ("0", None)])
def test_proxy_body_size(value: str, want: int | None) -> None:
    t = cluster(web(nginx(proxy_body_size=value)))
    assert svc_of(t, f"{WEB}~shop").policy.max_body == want


def test_proxy_connect_and_read_timeouts() -> None:
    t = cluster(web(nginx(proxy_connect_timeout="7", proxy_read_timeout="120",
                          proxy_send_timeout="30")))
    policy = svc_of(t, f"{WEB}~shop").policy
    assert (policy.connect_timeout, policy.response_timeout) == (7.0, 120.0)
    assert any("proxy-send-timeout" in m and "not supported" in m
               for m in messages(t, "Ingress"))


def test_affinity_cookie_is_sticky() -> None:
    t = cluster(web(nginx(affinity="cookie", session_cookie_name="ROUTE")))
    policy = svc_of(t, f"{WEB}~shop").policy
    assert policy.sticky and policy.sticky_cookie == "ROUTE"
    assert not messages(t, "Ingress")
    t = cluster(web(nginx(affinity="cookie", session_cookie_name="not a name")))
    assert any("session-cookie-name" in m and "cookie name" in m
               for m in messages(t, "Ingress"))


def test_whitelist_and_denylist_source_ranges() -> None:
    t = cluster(web(nginx(whitelist_source_range="10.0.0.0/8, 192.168.1.7",
                          denylist_source_range="10.9.0.0/16")))
    sources = svc_of(t, f"{WEB}~shop").policy.sources
    assert sources.permits("10.1.2.3") and sources.permits("192.168.1.7")
    assert not sources.permits("10.9.1.1") and not sources.permits("127.0.0.1")


def test_allowlist_source_range_is_the_newer_name() -> None:
    t = cluster(web(nginx(allowlist_source_range="192.0.2.0/24")))
    sources = svc_of(t, f"{WEB}~shop").policy.sources
    assert sources.permits("192.0.2.9") and not sources.permits("198.51.100.1")


def test_a_bad_source_range_refuses_everyone() -> None:
    t = cluster(web(nginx(whitelist_source_range="10.0.0.0/8,not-an-ip")))
    sources = svc_of(t, f"{WEB}~shop").policy.sources
    assert not sources.permits("10.1.2.3") and not sources.permits("::1")
    assert any("every client is refused" in m for m in messages(t, "Ingress"))


@pytest.mark.parametrize("value,protocol,tls", [
    ("HTTP", "http1", False), ("HTTPS", "http1", True), ("GRPC", "h2c", False),
    ("GRPCS", "h2", True), ("H2C", "h2c", False), ("grpc", "h2c", False)])
def test_backend_protocol(value: str, protocol: str, tls: bool) -> None:
    t = cluster(web(nginx(backend_protocol=value)))
    name = f"{WEB}~shop" if value != "HTTP" else WEB
    policy = svc_of(t, name).policy
    assert policy.backend_protocol == protocol
    assert (policy.backend_tls is not None) == tls
    if tls:
        assert not policy.backend_tls.verify  # ingress-nginx does not verify by default


def test_backend_protocol_ajp_is_a_problem_and_http_is_used() -> None:
    t = cluster(web(nginx(backend_protocol="AJP")))
    assert svc_of(t, WEB).policy.backend_protocol == "http1"
    assert any("'AJP' is not supported" in m for m in messages(t, "Ingress"))


def test_two_ingresses_to_one_service_get_services_of_their_own() -> None:
    small = ingress("small", rule("a.example.com", path("/", "web")),
                    annotations=nginx(proxy_body_size="1k"))
    big = ingress("big", rule("b.example.com", path("/", "web")),
                  annotations=nginx(proxy_body_size="1m"))
    plain = ingress("plain", rule("c.example.com", path("/", "web")))
    t = cluster(small, big, plain)
    assert pick(t, "/", host="a.example.com").service == f"{WEB}~small"
    assert pick(t, "/", host="b.example.com").service == f"{WEB}~big"
    assert pick(t, "/", host="c.example.com").service == WEB
    assert svc_of(t, f"{WEB}~small").policy.max_body == 1024
    assert svc_of(t, f"{WEB}~big").policy.max_body == 1024**2
    assert svc_of(t, WEB).policy.max_body is None
    assert svc_of(t, f"{WEB}~small").backends == svc_of(t, WEB).backends


def test_the_ingress_policy_goes_over_the_services_own() -> None:
    objs = (service("web", annotations={"edgelb.io/max-inflight": "7"}),)
    t = tr(ingress_class(), *objs, slice_("web", "web-1", ep("10.0.0.1")),
           web(nginx(proxy_body_size="1k")), ingress_nginx=True)
    policy = svc_of(t, f"{WEB}~shop").policy
    assert (policy.max_inflight, policy.max_body) == (7, 1024)


# -- filters -------------------------------------------------------------------------------------
def test_enable_cors_with_its_settings() -> None:
    t = cluster(web(nginx(enable_cors="true",
                          cors_allow_origin="https://app.example.com, https://*.example.org",
                          cors_allow_methods="get, POST", cors_allow_headers="X-Token",
                          cors_expose_headers="X-Total", cors_allow_credentials="false",
                          cors_max_age="600")))
    f = the_route(t).filters
    assert f is not None
    assert f.cors == Cors(allow_origins=("https://app.example.com", "https://*.example.org"),
                          allow_methods=("GET", "POST"), allow_headers=("X-Token",),
                          expose_headers=("X-Total",), allow_credentials=False, max_age=600)


def test_enable_cors_defaults_are_ingress_nginx_ones() -> None:
    f = the_route(cluster(web(nginx(enable_cors="true")))).filters
    assert f is not None and f.cors == Cors(allow_credentials=True)


def test_cors_settings_without_enable_cors_are_reported() -> None:
    t = cluster(web(nginx(cors_allow_origin="*")))
    assert the_route(t).filters is None
    assert any("without enable-cors" in m for m in messages(t, "Ingress"))


def test_limit_rps_burst_multiplier_connections_and_whitelist() -> None:
    t = cluster(web(nginx(limit_rps="10", limit_burst_multiplier="3", limit_connections="4",
                          limit_whitelist="10.0.0.0/8")))
    f = the_route(t).filters
    assert f is not None
    assert f.limits == ClientLimits(rps=10.0, burst=30, connections=4, exempt=("10.0.0.0/8",))


def test_limit_allowlist_is_the_newer_name() -> None:
    f = the_route(cluster(web(nginx(limit_rps="5", limit_allowlist="10.1.0.0/16")))).filters
    assert f is not None and f.limits == ClientLimits(rps=5.0, burst=25, exempt=("10.1.0.0/16",))


def test_limit_rpm_and_the_default_burst() -> None:
    f = the_route(cluster(web(nginx(limit_rpm="120")))).filters
    assert f is not None and f.limits == ClientLimits(rps=2.0, burst=600)


def test_limit_connections_alone() -> None:
    f = the_route(cluster(web(nginx(limit_connections="2")))).filters
    assert f is not None and f.limits == ClientLimits(connections=2)


# -- canary --------------------------------------------------------------------------------------
def canary(**names: str) -> dict:
    return web(nginx(canary="true", **names), name="shop-canary", svc="canary",
               created="2024-01-02T00:00:00Z")


def test_canary_weight_splits_the_main_route() -> None:
    t = cluster(web(), canary(canary_weight="10"))
    (r,) = routes(t)
    assert r.backends == (WeightedService(WEB, 90), WeightedService("default/canary:80", 10))
    rt = Router(t.snapshot.routes)  # one table: its picker keeps its place
    seen = [rt.match(HOST, "/api").pick() for _ in range(100)]
    assert seen.count("default/canary:80") == 10


def test_canary_weight_total() -> None:
    t = cluster(web(), canary(canary_weight="1", canary_weight_total="1000"))
    (r,) = routes(t)
    assert r.backends == (WeightedService(WEB, 999), WeightedService("default/canary:80", 1))


def test_canary_by_header_always_and_never() -> None:
    t = cluster(web(), canary(canary_by_header="X-Canary", canary_weight="50"))
    assert pick(t, "/api", {"X-Canary": "always"}).pick() == "default/canary:80"
    assert {pick(t, "/api", {"X-Canary": "never"}).pick() for _ in range(4)} == {WEB}
    rt = Router(t.snapshot.routes)
    assert {rt.match(HOST, "/api").pick() for _ in range(4)} == {WEB, "default/canary:80"}


def test_canary_by_header_value() -> None:
    t = cluster(web(), canary(canary_by_header="X-Env", canary_by_header_value="beta"))
    assert pick(t, "/api", {"X-Env": "beta"}).pick() == "default/canary:80"
    assert pick(t, "/api", {"X-Env": "always"}).pick() == WEB
    assert pick(t, "/api").pick() == WEB


def test_canary_by_header_pattern() -> None:
    t = cluster(web(), canary(canary_by_header="X-Env", canary_by_header_pattern="beta|rc[0-9]"))
    assert pick(t, "/api", {"X-Env": "rc2"}).pick() == "default/canary:80"
    assert pick(t, "/api", {"X-Env": "prod"}).pick() == WEB


def test_canary_by_cookie_after_the_header() -> None:
    t = cluster(web(), canary(canary_by_cookie="use_canary", canary_by_header="X-Canary"))
    assert pick(t, "/api", {"Cookie": "a=1; use_canary=always"}).pick() == "default/canary:80"
    assert pick(t, "/api", {"Cookie": "use_canary=never"}).pick() == WEB
    assert pick(t, "/api", {"Cookie": "use_canary=always",
                            "X-Canary": "never"}).pick() == WEB
    assert pick(t, "/api", {"Cookie": "xuse_canary=always"}).pick() == WEB


def test_a_canary_without_a_main_ingress_is_a_problem() -> None:
    t = cluster(canary(canary_weight="10"))
    assert routes(t) == []
    assert any("no main Ingress" in m for m in messages(t, "Ingress", "shop-canary"))


def test_a_canary_inherits_the_main_ingress_policy() -> None:
    t = cluster(web(nginx(proxy_body_size="1k", x_forwarded_prefix="/p")),
                canary(canary_weight="10", proxy_body_size="5k"))
    (r,) = routes(t)
    assert r.services == (f"{WEB}~shop", "default/canary:80~shop")
    assert svc_of(t, "default/canary:80~shop").policy.max_body == 1024
    assert r.filters is not None and r.filters.request_headers is not None
    assert any("its own, other than canary-*, are ignored" in m
               for m in messages(t, "Ingress", "shop-canary"))


# -- basic auth ----------------------------------------------------------------------------------
def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()


def auth_secret(data: dict[str, str], name: str = "basic") -> dict:
    return secret(name, "Opaque", {k: b64(v) for k, v in data.items()})


def test_auth_basic_with_an_auth_file_secret_and_realm() -> None:
    t = cluster(web(nginx(auth_type="basic", auth_secret="basic", auth_realm="Shop staff")),
                extra=(auth_secret({"auth": f"# staff\nalice:{HASH}\nbob:{HASH}\n"}),))
    creds = svc_of(t, f"{WEB}~shop").policy.auth
    assert creds.realm == "Shop staff"
    assert set(creds.users) == {"alice", "bob"}
    assert creds.check(f"Basic {b64('alice:s3cret')}") == "alice"
    assert svc_of(t, f"{WEB}~shop").backends  # served


def test_auth_basic_with_an_auth_map_secret() -> None:
    t = cluster(web(nginx(auth_type="basic", auth_secret="default/basic",
                          auth_secret_type="auth-map")),
                extra=(auth_secret({"carol": HASH}),))
    assert svc_of(t, f"{WEB}~shop").policy.auth.users == ("carol",)


@pytest.mark.parametrize("secret_name,objs,fragment", [
    ("missing", (), "not found"),
    ("other/basic", (), "another namespace"),
    ("basic", ({"auth": "alice:plaintext"},), "plain-text"),
    ("basic", ({"nope": "x"},), "no data.auth"),
])
def test_auth_that_cannot_be_set_up_fails_closed(secret_name: str, objs: tuple, fragment: str
                                                 ) -> None:
    extra = tuple(auth_secret(d) for d in objs)
    t = cluster(web(nginx(auth_type="basic", auth_secret=secret_name)), extra=extra)
    assert the_route(t).service == f"{WEB}~shop"
    assert svc_of(t, f"{WEB}~shop").backends == ()  # 503, never open
    msgs = messages(t, "Ingress", "shop")
    assert any(fragment in m for m in msgs), msgs
    assert any("answer 503" in m for m in msgs)


def test_auth_basic_without_a_secret_fails_closed() -> None:
    t = cluster(web(nginx(auth_type="basic")))
    assert svc_of(t, f"{WEB}~shop").backends == ()
    assert any("needs auth-secret" in m for m in messages(t, "Ingress", "shop"))


def test_an_ingress_over_a_service_with_its_own_auth_and_sources() -> None:
    users = f'{{users: ["dave:{HASH}"]}}'
    svc = service("web", annotations={"edgelb.io/auth": users,
                                      "edgelb.io/sources": "[10.0.0.0/8]"})
    t = tr(ingress_class(), svc, slice_("web", "web-1", ep("10.0.0.1")),
           web(nginx(proxy_body_size="1k")), ingress_nginx=True)
    policy = svc_of(t, f"{WEB}~shop").policy
    assert policy.auth.users == ("dave",) and policy.max_body == 1024
    assert policy.sources.permits("10.1.1.1") and not policy.sources.permits("127.0.0.1")


def test_auth_type_digest_fails_closed() -> None:
    t = cluster(web(nginx(auth_type="digest", auth_secret="basic")),
                extra=(auth_secret({"auth": f"alice:{HASH}"}),))
    assert svc_of(t, f"{WEB}~shop").backends == ()


# -- the pure reader on its own ------------------------------------------------------------------
def test_read_is_pure_and_never_raises_on_odd_values() -> None:
    odd: dict[str, Any] = {N + n: v for n, v in (
        ("limit-rps", "-1"), ("canary-weight", "x"), ("proxy-body-size", "1 TB"),
        ("cors-max-age", "1e9"), ("proxy-read-timeout", "0"), ("enable-cors", "yes"),
        ("canary", "true"), ("canary-by-header", "bad header"), ("affinity", "ip"),
        ("x-forwarded-prefix", "\x00"), ("rewrite-target", "no-slash"),
        ("app-root", "/"), ("upstream-vhost", "a b"))}
    one = na.read(odd, True)
    assert one == na.read(odd, True)
    assert len(one.problems) >= 10
    assert one.canary == na.Canary()


def test_the_header_match_of_a_canary_is_an_exact_value_match() -> None:
    main = Route(HOST, "/", WEB)
    out = na.canary_routes(main, "c", na.Canary(header="X-A", header_value="1"), "n")
    assert out[0].headers == (ValueMatch("X-A", "1"),) and out[0].service == "c"
    assert out[-1] == main


def test_the_readme_table_lists_every_annotation_the_reader_knows() -> None:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    table = text[text.index("### Ingress annotations (ingress-nginx)"):]
    table = table[:table.index("\n### ")]
    names = set(re.findall(r"^\| `([a-z0-9-]+)` \|", table, re.M))
    snippets = {n for n in names if n.endswith("-snippet")}
    assert names - snippets == na.SUPPORTED | na.NOT_SUPPORTED
    for n in snippets:
        assert f"| `{n}` | refused (snippet) |" in table
        assert any(n in m for m in na.read({N + n: "x"}, True).problems)
    for n in na.SUPPORTED:
        assert f"| `{n}` | not supported" not in table


def test_every_supported_annotation_is_exercised_in_this_file() -> None:
    source = Path(__file__).read_text()
    untested = [n for n in sorted(na.SUPPORTED)
                if f"{n.replace('-', '_')}=" not in source and f'N + "{n}"' not in source]
    assert untested == []
