"""The Gateway API translator as a pure function: objects in, routes, services, certificates,
problems and the status to write out."""

from __future__ import annotations

import math
from typing import Any

from gateway_objects import (
    CONTROLLER,
    GROUP,
    backend,
    exact,
    gateway,
    gateway_class,
    grant,
    http_route,
    listener,
    parent,
    prefix,
    rule,
    service,
    slice_for,
    tls_secret,
)

from watchers.kubernetes.gateway.translate import (
    BackendTLSWanted,
    GatewayState,
    GatewayTranslation,
    StatusUpdate,
    translate_gateway,
)
from watchers.kubernetes.gateway.values import duration, intersect, route_hosts
from watchers.kubernetes.translate import ClusterState
from watchers.model import Policy, Route

Obj = dict[str, Any]
_CLUSTER = {"Service": "services", "EndpointSlice": "endpointslices", "Secret": "secrets",
            "Pod": "pods"}
_GATEWAY = {"GatewayClass": "gatewayclasses", "Gateway": "gateways", "HTTPRoute": "httproutes",
            "GRPCRoute": "grpcroutes", "TLSRoute": "tlsroutes", "TCPRoute": "tcproutes",
            "ReferenceGrant": "referencegrants", "BackendTLSPolicy": "backendtlspolicies",
            "ConfigMap": "configmaps", "Namespace": "namespaces"}


def no_policy(annotations: dict[str, str], base: Policy) -> tuple[Policy, list[str]]:
    return base, []


def run(*objs: Obj, sni_routing: bool = True) -> GatewayTranslation:
    cluster: dict[str, dict] = {v: {} for v in _CLUSTER.values()}
    gw: dict[str, dict] = {v: {} for v in _GATEWAY.values()}
    for o in objs:
        m = o["metadata"]
        key = (m.get("namespace", ""), m["name"])
        if o["kind"] in _CLUSTER:
            cluster[_CLUSTER[o["kind"]]][key] = o
        else:
            gw[_GATEWAY[o["kind"]]][key] = o
    return translate_gateway(ClusterState(**cluster), GatewayState(**gw),
                             read_policy=no_policy, sni_routing=sni_routing)


def status(t: GatewayTranslation, resource: str, name: str, ns: str = "default") -> Obj:
    for s in t.statuses:
        if s.resource == resource and s.key == (ns if resource != "gatewayclasses" else "", name):
            return s.status
    raise AssertionError(f"no status for {resource} {ns}/{name}: {t.statuses}")


def conds(entry: Obj) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in entry["conditions"]}


def parent_conds(t: GatewayTranslation, name: str, ns: str = "default",
                 resource: str = "httproutes") -> list[dict[str, tuple[str, str]]]:
    return [conds(p) for p in status(t, resource, name, ns)["parents"]]


def web(ns: str = "default", name: str = "web", addr: str = "10.0.0.1") -> list[Obj]:
    return [service(name, ns), slice_for(name, [addr], 8080, ns)]


BASE = [gateway_class(), gateway("gw", [listener("http")]), *web()]


def routes_of(t: GatewayTranslation) -> list[Route]:
    return [r for r in t.routes]


# -- values ---------------------------------------------------------------------------------------

def test_hostname_intersection() -> None:
    assert intersect("", "a.example.com") == "a.example.com"
    assert intersect("*.example.com", "a.example.com") == "a.example.com"
    assert intersect("a.example.com", "*.example.com") == "a.example.com"
    assert intersect("*.example.com", "*.a.example.com") == "*.a.example.com"
    assert intersect("a.example.com", "b.example.com") is None
    assert intersect("*.example.com", "example.com") is None
    assert route_hosts("*.example.com", ["x.example.com", "other.org"]) == ["x.example.com"]
    assert route_hosts("foo.com", []) == ["foo.com"]


def test_durations() -> None:
    assert duration("10s") == 10.0
    assert duration("1m30s") == 90.0
    assert duration("500ms") == 0.5
    assert duration("1h") == 3600.0
    assert duration("10") is None
    assert duration(5) is None


# -- classes and gateways -------------------------------------------------------------------------

def test_only_our_gateway_class_is_served() -> None:
    t = run(gateway_class("other", "example.com/else"),
            gateway("gw", [listener("http")], cls="other"), *web(),
            http_route("r", [parent("gw")], [rule([backend("web")])]))
    assert t.routes == () and t.statuses == []
    t = run(*BASE, http_route("r", [parent("gw")], [rule([backend("web")])]))
    assert conds(status(t, "gatewayclasses", "edgelb")) == {"Accepted": ("True", "Accepted")}
    gw = status(t, "gateways", "gw")
    assert conds(gw) == {"Accepted": ("True", "Accepted"), "Programmed": ("True", "Programmed")}
    (ln,) = gw["listeners"]
    assert ln["attachedRoutes"] == 1
    assert conds(ln) == {"Accepted": ("True", "Accepted"), "Programmed": ("True", "Programmed"),
                         "ResolvedRefs": ("True", "ResolvedRefs"),
                         "Conflicted": ("False", "NoConflicts")}
    assert {k["kind"] for k in ln["supportedKinds"]} == {"HTTPRoute", "GRPCRoute"}
    (r,) = t.routes
    assert (r.host, r.path, r.service) == ("", "/", "gateway:default/web:80")
    (svc,) = t.services
    assert [b.key for b in svc.backends] == ["10.0.0.1:8080"]
    assert parent_conds(t, "r") == [{"Accepted": ("True", "Accepted"),
                                     "ResolvedRefs": ("True", "ResolvedRefs")}]
    p = status(t, "httproutes", "r")["parents"][0]
    assert p["controllerName"] == CONTROLLER and p["parentRef"] == {"name": "gw"}
    assert all(c["observedGeneration"] == 1 for c in p["conditions"])


def test_listener_problems_in_status() -> None:
    t = run(gateway_class(), gateway("gw", [
        listener("a", "UDP", 53), listener("b", port=0), listener("c"), listener("c"),
        listener("d", "HTTPS", 443, cert="missing"),
        listener("e", "HTTP", 80, kinds=["TCPRoute"])]))
    by = {ln["name"]: conds(ln) for ln in status(t, "gateways", "gw")["listeners"]}
    assert by["a"]["Accepted"] == ("False", "UnsupportedProtocol")
    assert by["b"]["Accepted"] == ("False", "Invalid")
    assert by["c"]["Accepted"] == ("False", "Invalid")  # the second "c"
    assert by["d"]["ResolvedRefs"] == ("False", "InvalidCertificateRef")
    assert by["d"]["Programmed"][0] == "False"
    assert by["e"]["ResolvedRefs"] == ("False", "InvalidRouteKinds")
    gw = conds(status(t, "gateways", "gw"))
    assert gw["Accepted"] == ("True", "ListenersNotValid")
    assert any("UDP" in p.message for p in t.problems)


def test_listener_conflicts() -> None:
    t = run(gateway_class(), gateway("gw", [
        listener("a", hostname="a.example.com"), listener("b", hostname="a.example.com"),
        listener("c", "TCP", 80)]))
    by = {ln["name"]: conds(ln) for ln in status(t, "gateways", "gw")["listeners"]}
    assert by["a"]["Conflicted"] == ("False", "NoConflicts")
    assert by["b"]["Conflicted"] == ("True", "HostnameConflict")
    assert by["c"]["Conflicted"] == ("True", "ProtocolConflict")


def test_https_listener_certificates_and_cross_namespace_grant() -> None:
    objs = [gateway_class(), *web(), tls_secret("local"), tls_secret("shared", "certs"),
            gateway("gw", [listener("a", "HTTPS", 443, "a.example.com", cert="local"),
                           listener("b", "HTTPS", 443, "b.example.com", cert="shared",
                                    cert_ns="certs")])]
    t = run(*objs)
    by = {ln["name"]: conds(ln) for ln in status(t, "gateways", "gw")["listeners"]}
    assert by["b"]["ResolvedRefs"] == ("False", "RefNotPermitted")
    assert t.tls == {"a.example.com": ("default", "local")}
    t = run(*objs, grant("certs", "Gateway", "default", "Secret"))
    assert t.tls == {"a.example.com": ("default", "local"),
                     "b.example.com": ("certs", "shared")}
    t = run(*objs, sni_routing=False)
    by = {ln["name"]: conds(ln) for ln in status(t, "gateways", "gw")["listeners"]}
    assert by["a"]["Programmed"][0] == "False"


# -- attaching routes ---------------------------------------------------------------------------

def test_hostname_intersection_of_listener_and_route() -> None:
    t = run(gateway_class(), *web(), gateway("gw", [
        listener("wild", hostname="*.example.com"), listener("exact", port=8080,
                                                             hostname="foo.org")]),
        http_route("r", [parent("gw")], [rule([backend("web")])],
                   hostnames=["a.example.com", "bar.org"]),
        http_route("none", [parent("gw")], [rule([backend("web")])], hostnames=["x.net"]))
    assert sorted(r.host for r in t.routes) == ["a.example.com"]
    assert parent_conds(t, "none")[0]["Accepted"] == ("False", "NoMatchingListenerHostname")
    t = run(gateway_class(), *web(), gateway("gw", [listener("wild", hostname="*.example.com")]),
            http_route("r", [parent("gw")], [rule([backend("web")])]))
    assert [r.host for r in t.routes] == ["*.example.com"]


def test_invalid_route_hostnames_are_ignored_and_never_widen_the_route() -> None:
    t = run(*BASE, http_route("r", [parent("gw")], [rule([backend("web")])],
                              hostnames=["Bad_Host!", "ok.example.com"]),
            http_route("bad", [parent("gw")], [rule([backend("web")])], hostnames=["a b"]))
    assert [r.host for r in t.routes] == ["ok.example.com"]
    assert parent_conds(t, "bad")[0]["Accepted"] == ("False", "NoMatchingListenerHostname")
    assert any("'Bad_Host!' is not a host name" in p.message for p in t.problems)


def test_what_the_ingresses_hold_stays_theirs() -> None:
    gw = gateway("gw", [listener("tls", "TLS", 443, mode="Passthrough"),
                        listener("db", "TCP", 15432)])
    objs = [gateway_class(), gw, service("pg", port=5432), slice_for("pg", ["10.0.0.7"], 5432),
            http_route("t", [parent("gw", section="tls")], [rule([backend("pg", 5432)])],
                       hostnames=["db.example.com"], kind="TLSRoute"),
            http_route("c", [parent("gw", section="db")], [rule([backend("pg", 5432)])],
                       kind="TCPRoute")]
    cluster: dict[str, dict] = {"services": {}, "endpointslices": {}}
    gwstate: dict[str, dict] = {v: {} for v in _GATEWAY.values()}
    for o in objs:
        m = o["metadata"]
        key = (m.get("namespace", ""), m["name"])
        if o["kind"] in _CLUSTER:
            cluster[_CLUSTER[o["kind"]]][key] = o
        else:
            gwstate[_GATEWAY[o["kind"]]][key] = o
    t = translate_gateway(ClusterState(**cluster), GatewayState(**gwstate),
                          read_policy=no_policy, passthrough_taken=["db.example.com"],
                          ports_taken=[15432])
    assert t.routes == () and t.services == ()
    by = {ln["name"]: conds(ln) for ln in status(t, "gateways", "gw")["listeners"]}
    assert by["db"]["Conflicted"] == ("True", "ProtocolConflict")
    assert any("ssl-passthrough" in p.message for p in t.problems)


def test_allowed_routes_namespaces_and_section_name() -> None:
    ns_obj = {"apiVersion": "v1", "kind": "Namespace",
              "metadata": {"name": "team", "labels": {"expose": "yes"}}}
    gw = gateway("gw", [listener("same"), listener("all", port=81, allowed="All"),
                        listener("sel", port=82, allowed="Selector",
                                 selector={"matchLabels": {"expose": "yes"}})])
    base = [gateway_class(), gw, *web("team"), *web("other")]
    route_team = http_route("r", [parent("gw", "default", "same")], [rule([backend("web")])],
                            ns="team")
    t = run(*base, route_team)
    assert parent_conds(t, "r", "team")[0]["Accepted"] == ("False", "NotAllowedByListeners")
    assert t.routes == ()
    t = run(*base, http_route("r", [parent("gw", "default", "all")], [rule([backend("web")])],
                              ns="team"))
    assert [r.service for r in t.routes] == ["gateway:team/web:80"]
    t = run(*base, ns_obj, http_route("r", [parent("gw", "default")], [rule([backend("web")])],
                                      ns="team"),
            http_route("o", [parent("gw", "default", "sel")], [rule([backend("web")])],
                       ns="other"))
    counts = {ln["name"]: ln["attachedRoutes"] for ln in status(t, "gateways", "gw")["listeners"]}
    assert counts == {"same": 0, "all": 1, "sel": 1}
    assert parent_conds(t, "o", "other")[0]["Accepted"][0] == "False"
    t = run(*base, http_route("r", [parent("gw", "default", "nope")], [rule([backend("web")])],
                              ns="team"))
    assert parent_conds(t, "r", "team")[0]["Accepted"] == ("False", "NoMatchingParent")


def test_parent_of_another_controller_gets_no_status_from_us() -> None:
    t = run(*BASE, http_route("r", [parent("elsewhere")], [rule([backend("web")])]))
    assert not [s for s in t.statuses if s.resource == "httproutes"]


# -- HTTPRoute rules ------------------------------------------------------------------------------

def test_matches_become_routes_with_precedence_order() -> None:
    t = run(*BASE, http_route("old", [parent("gw")], [
        rule([backend("web")], [exact("/exact"), prefix("/p/"),
                                {"path": {"type": "RegularExpression", "value": "/r/[0-9]+"},
                                 "headers": [{"name": "X-Env", "value": "canary"}],
                                 "queryParams": [{"name": "v", "value": "2",
                                                  "type": "RegularExpression"}],
                                 "method": "POST"}]),
        rule([backend("web")])], ts="2026-01-01T00:00:00Z"),
        http_route("new", [parent("gw")], [rule([backend("web")])]))
    by = {(r.name, r.path): r for r in t.routes}
    e = by[("HTTPRoute default/old rule 0", "/exact")]
    assert e.exact and not e.regex
    assert by[("HTTPRoute default/old rule 0", "/p")].exact is False
    rx = by[("HTTPRoute default/old rule 0", "/r/[0-9]+")]
    assert rx.regex and rx.method == "POST"
    assert [(h.name, h.value, h.regex) for h in rx.headers] == [("x-env", "canary", False)]
    assert [(q.name, q.value, q.regex) for q in rx.query] == [("v", "2", True)]
    old1 = by[("HTTPRoute default/old rule 1", "/")]
    new0 = by[("HTTPRoute default/new rule 0", "/")]
    assert e.order < old1.order < new0.order  # rule order, then the older route


def test_bad_regex_is_a_problem_not_a_route() -> None:
    t = run(*BASE, http_route("r", [parent("gw")], [rule([backend("web")], [
        {"path": {"type": "RegularExpression", "value": "/(a+)+$"}}])]))
    assert t.routes == ()
    assert any("repeat inside a repeat" in p.message for p in t.problems)


def test_weighted_backends_and_unresolved_shares() -> None:
    t = run(*BASE, *web(name="canary", addr="10.0.0.2"), *web("other", "far"),
            http_route("r", [parent("gw")], [rule([
                backend("web", weight=90), backend("canary", weight=10),
                backend("missing", weight=5), backend("far", ns="other", weight=5)])]))
    (r,) = t.routes
    assert r.service == "gateway:default/web:80"
    assert [(b.service, b.weight, b.resolved) for b in r.backends] == [
        ("gateway:default/web:80", 90, True), ("gateway:default/canary:80", 10, True),
        ("default/missing:80", 5, False), ("other/far:80", 5, False)]
    resolved = parent_conds(t, "r")[0]["ResolvedRefs"]
    assert resolved == ("False", "BackendNotFound")
    t = run(*BASE, *web("other", "far"), grant("other", "HTTPRoute", "default"),
            http_route("r", [parent("gw")], [rule([backend("far", ns="other")])]))
    assert t.routes[0].service == "gateway:other/far:80"
    assert parent_conds(t, "r")[0]["ResolvedRefs"] == ("True", "ResolvedRefs")
    t = run(*BASE, *web("other", "far"),
            http_route("r", [parent("gw")], [rule([backend("far", ns="other")])]))
    (r,) = t.routes
    assert r.service == "" and [b.resolved for b in r.backends] == [False]
    assert parent_conds(t, "r")[0]["ResolvedRefs"] == ("False", "RefNotPermitted")


def test_filters() -> None:
    t = run(*BASE, *web(name="shadow", addr="10.0.0.3"), http_route("r", [parent("gw")], [
        rule([backend("web")], [prefix("/a")], [
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                "set": [{"name": "X-Set", "value": "1"}], "add": [{"name": "X-Add",
                                                                  "value": "2"}],
                "remove": ["X-Gone"]}},
            {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                "add": [{"name": "X-Resp", "value": "3"}]}},
            {"type": "URLRewrite", "urlRewrite": {"hostname": "internal", "path": {
                "type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}}},
            {"type": "RequestMirror", "requestMirror": {"backendRef": backend("shadow"),
                                                        "percent": 50}},
            {"type": "CORS", "cors": {"allowOrigins": ["https://app.example.com"]}}],
            timeout="2s"),
        rule(None, [prefix("/old")], [{"type": "RequestRedirect", "requestRedirect": {
            "scheme": "https", "statusCode": 301, "path": {"type": "ReplaceFullPath",
                                                           "replaceFullPath": "/new"}}}])]))
    by = {r.path: r for r in t.routes}
    f = by["/a"].filters
    assert f is not None and f.request_headers is not None and f.response_headers is not None
    assert f.request_headers.set == (("x-set", "1"),)
    assert f.request_headers.add == (("x-add", "2"),)
    assert f.request_headers.remove == ("x-gone",)
    assert f.response_headers.add == (("x-resp", "3"),)
    assert f.rewrite is not None and (f.rewrite.host, f.rewrite.prefix) == ("internal", "/b")
    assert [(m.service, m.percent) for m in f.mirrors] == [("gateway:default/shadow:80", 50.0)]
    assert f.cors is not None and f.cors.allow_origins == ("https://app.example.com",)
    assert by["/a"].timeout == 2.0
    red = by["/old"]
    assert red.service == "" and red.filters is not None and red.filters.redirect is not None
    assert (red.filters.redirect.scheme, red.filters.redirect.status,
            red.filters.redirect.path) == ("https", 301, "/new")
    assert "gateway:default/shadow:80" in {s.name for s in t.services}


def test_unsupported_filter_skips_the_rule() -> None:
    t = run(*BASE, http_route("r", [parent("gw")], [rule([backend("web")], None, [
        {"type": "ExtensionRef", "extensionRef": {"group": "x", "kind": "Y", "name": "z"}}])]))
    assert t.routes == ()
    assert any("ExtensionRef" in p.message for p in t.problems)


def test_rule_without_backends_answers_500() -> None:
    t = run(*BASE, http_route("r", [parent("gw")], [rule([])]))
    (r,) = t.routes
    assert r.service == "" and len(r.backends) == 1 and not r.backends[0].resolved


# -- GRPCRoute, TLSRoute, TCPRoute, BackendTLSPolicy ----------------------------------------------

def test_grpc_route() -> None:
    t = run(*BASE, http_route("g", [parent("gw")], [
        {"matches": [{"method": {"service": "shop.Cart", "method": "Add"}},
                     {"method": {"service": "shop.Orders"}}],
         "backendRefs": [backend("web")]}], kind="GRPCRoute"))
    by = {r.path: r for r in t.routes}
    assert by["/shop.Cart/Add"].exact and by["/shop.Cart/Add"].method == "POST"
    assert not by["/shop.Orders"].exact
    (svc,) = t.services
    assert svc.name == "gateway:default/web:80+h2c"
    assert svc.policy.backend_protocol == "h2c"
    assert parent_conds(t, "g", resource="grpcroutes")[0]["Accepted"] == ("True", "Accepted")


def test_tls_passthrough_route() -> None:
    gw = gateway("gw", [listener("tls", "TLS", 443, "*.example.com", mode="Passthrough")])
    route = http_route("t", [parent("gw")], [rule([backend("web", 8443)])],
                       hostnames=["db.example.com"], kind="TLSRoute")
    t = run(gateway_class(), gw, service("web", port=8443), slice_for("web", ["10.0.0.9"], 8443),
            route)
    (r,) = t.routes
    assert (r.host, r.path) == ("db.example.com", "/")
    svc = next(s for s in t.services if s.name == r.service)
    assert svc.mode == "tcp" and svc.tls_passthrough
    assert [b.key for b in svc.backends] == ["10.0.0.9:8443"]
    t = run(gateway_class(), gateway("gw", [listener("tls", "TLS", 443, "a.example.com")]))
    (ln,) = status(t, "gateways", "gw")["listeners"]
    assert conds(ln)["Accepted"] == ("False", "UnsupportedValue")  # Terminate is not supported


def test_tcp_route_binds_the_listener_port() -> None:
    gw = gateway("gw", [listener("db", "TCP", 15432)])
    t = run(gateway_class(), gw, service("pg", port=5432), slice_for("pg", ["10.0.0.7"], 5432),
            http_route("t", [parent("gw", section="db")], [rule([backend("pg", 5432)])],
                       kind="TCPRoute"),
            http_route("late", [parent("gw")], [rule([backend("pg", 5432)])],
                       kind="TCPRoute", ts="2026-12-01T00:00:00Z"))
    (svc,) = t.services
    assert svc.mode == "tcp" and svc.listen is not None and svc.listen.port == 15432
    assert [b.key for b in svc.backends] == ["10.0.0.7:5432"]
    assert parent_conds(t, "late", resource="tcproutes")[0]["Accepted"][0] == "False"
    (ln,) = status(t, "gateways", "gw")["listeners"]
    assert ln["attachedRoutes"] == 1


def test_backend_tls_policy_reported_per_service() -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ca",
                                                                "namespace": "default"},
          "data": {"ca.crt": "-----BEGIN CERTIFICATE-----"}}
    pol = {"apiVersion": f"{GROUP}/v1", "kind": "BackendTLSPolicy",
           "metadata": {"name": "p", "namespace": "default"},
           "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "web"}],
                    "validation": {"hostname": "web.internal", "caCertificateRefs": [
                        {"group": "", "kind": "ConfigMap", "name": "ca"}]}}}
    t = run(*BASE, cm, pol, http_route("r", [parent("gw")], [rule([backend("web")])]))
    assert t.backend_tls == {"gateway:default/web:80": BackendTLSWanted(
        ("default", "p"), ("default", "ca", "ca.crt"), "web.internal")}


def test_garbage_never_raises() -> None:
    t = run(gateway_class(), {"apiVersion": "x", "kind": "Gateway", "metadata": {
        "name": "gw", "namespace": "default"}, "spec": {"gatewayClassName": "edgelb",
                                                       "listeners": [None, 3, {"port": "x"}]}},
        {"kind": "HTTPRoute", "metadata": {"name": "r", "namespace": "default"},
         "spec": {"parentRefs": [{"name": "gw"}, "x"], "rules": [None, {"matches": [None]},
                                                                  {"backendRefs": [1]}]}})
    assert isinstance(t.statuses[0], StatusUpdate)
    assert t.problems


def test_a_zero_request_timeout_disables_it() -> None:
    """The spec: a zero duration disables the timeout (not "the service's")."""
    t = run(*BASE, http_route("r", [parent("gw")], [
        rule([backend("web")], [prefix("/none")], timeout="0s"),
        rule([backend("web")], [prefix("/own")], timeout="1m30s"),
        rule([backend("web")], [prefix("/default")])]))
    by = {r.path: r.timeout for r in t.routes}
    assert by == {"/none": math.inf, "/own": 90.0, "/default": None}
