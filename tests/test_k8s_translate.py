"""Kubernetes objects -> Snapshot: class selection, Ingress rules and precedence (checked against
the Kubernetes documentation's examples through the real Router), backends from EndpointSlices,
weights, static ports, TLS, and robustness against mangled objects."""

from __future__ import annotations

import copy
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgelb.http.router import Router
from edgelb.ops.config import policy_from_annotations
from watchers.kubernetes.translate import ClusterState, Problem, Translation, translate
from watchers.model import Address, Backend, Policy

NS = "default"
T0 = "2024-01-01T00:00:00Z"
T1 = "2024-01-02T00:00:00Z"
T2 = "2024-01-03T00:00:00Z"

# -- object builders (the JSON the API server sends) ------------------------------------------


def meta(name: str, ns: str | None = NS, annotations: dict | None = None,
         labels: dict | None = None, created: str = T0) -> dict:
    m: dict[str, Any] = {"name": name, "creationTimestamp": created}
    if ns is not None:
        m["namespace"] = ns
    if annotations:
        m["annotations"] = annotations
    if labels:
        m["labels"] = labels
    return m


def backend(svc: str, port: int | str = 80) -> dict:
    p = {"number": port} if isinstance(port, int) else {"name": port}
    return {"service": {"name": svc, "port": p}}


def path(p: str, svc: str, port: int | str = 80, kind: str = "Prefix") -> dict:
    return {"path": p, "pathType": kind, "backend": backend(svc, port)}


def rule(host: str | None, *paths: dict) -> dict:
    r: dict[str, Any] = {"http": {"paths": list(paths)}}
    if host is not None:
        r["host"] = host
    return r


def ingress(name: str, *rules: dict, ns: str = NS, cls: str | None = "edgelb",
            default: dict | None = None, tls: list | None = None,
            annotations: dict | None = None, created: str = T0) -> dict:
    spec: dict[str, Any] = {}
    if cls is not None:
        spec["ingressClassName"] = cls
    if rules:
        spec["rules"] = list(rules)
    if default is not None:
        spec["defaultBackend"] = default
    if tls is not None:
        spec["tls"] = tls
    return {"kind": "Ingress", "apiVersion": "networking.k8s.io/v1",
            "metadata": meta(name, ns, annotations, created=created), "spec": spec}


def ingress_class(name: str = "edgelb", controller: str = "edgelb.io/ingress-controller",
                  default: bool = False) -> dict:
    ann = {"ingressclass.kubernetes.io/is-default-class": "true"} if default else None
    return {"kind": "IngressClass", "metadata": meta(name, None, ann),
            "spec": {"controller": controller}}


def service(name: str, ports: list[dict] | None = None, ns: str = NS,
            annotations: dict | None = None, created: str = T0, **spec: Any) -> dict:
    if ports is None:
        ports = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
    return {"kind": "Service", "metadata": meta(name, ns, annotations, created=created),
            "spec": {"ports": ports, **spec}}


def ep(addr: str, ready: bool | None = None, serving: bool | None = None,
       terminating: bool | None = None, zone: str | None = None, pod: str | None = None,
       hints: list[str] | None = None) -> dict:
    e: dict[str, Any] = {"addresses": [addr], "conditions": {}}
    for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating)):
        if v is not None:
            e["conditions"][k] = v
    if zone is not None:
        e["zone"] = zone
    if pod is not None:
        e["targetRef"] = {"kind": "Pod", "name": pod, "namespace": NS}
    if hints is not None:
        e["hints"] = {"forZones": [{"name": z} for z in hints]}
    return e


def slice_(svc: str, name: str, *endpoints: dict, ports: list[dict] | None = None,
           ns: str = NS, family: str = "IPv4") -> dict:
    if ports is None:
        ports = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    return {"kind": "EndpointSlice", "addressType": family, "ports": ports,
            "endpoints": list(endpoints),
            "metadata": meta(name, ns, labels={"kubernetes.io/service-name": svc})}


def pod(name: str, cpu: list[str | None] = (), annotations: dict | None = None) -> dict:
    containers = [{"name": f"c{i}", "resources": {"requests": {"cpu": c}} if c else {}}
                  for i, c in enumerate(cpu)]
    return {"kind": "Pod", "metadata": meta(name, NS, annotations),
            "spec": {"containers": containers}}


def secret(name: str, type_: str = "kubernetes.io/tls", data: dict | None = None) -> dict:
    if data is None:
        data = {"tls.crt": "Q0VSVA==", "tls.key": "S0VZ"}
    return {"kind": "Secret", "type": type_, "data": data, "metadata": meta(name)}


CACHES = {"Service": "services", "EndpointSlice": "endpointslices", "Ingress": "ingresses",
          "IngressClass": "ingressclasses", "Secret": "secrets", "Pod": "pods"}


def state(*objs: dict) -> ClusterState:
    caches: dict[str, dict] = {v: {} for v in CACHES.values()}
    for o in objs:
        m = o["metadata"]
        caches[CACHES[o["kind"]]][(m.get("namespace", ""), m["name"])] = o
    return ClusterState(**caches)


def tr(*objs: dict, **kw: Any) -> Translation:
    kw.setdefault("read_policy", policy_from_annotations)
    return translate(state(*objs), **kw)


def messages(t: Translation, kind: str | None = None, name: str | None = None) -> list[str]:
    return [p.message for p in t.problems
            if (kind is None or p.kind == kind) and (name is None or p.name == name)]


def one_problem(t: Translation, fragment: str) -> Problem:
    hits = [p for p in t.problems if fragment in p.message]
    assert len(hits) == 1, (fragment, t.problems)
    return hits[0]


def router(t: Translation) -> Router:
    return Router(t.snapshot.routes)


def web_backends() -> list[dict]:
    """A Service `web` with two ready endpoints."""
    return [service("web"), slice_("web", "web-a", ep("10.0.0.1"), ep("10.0.0.2"))]


# -- the Kubernetes documentation's examples, through the Router ------------------------------

# (path rules as (pathType, path), request path, index of the rule that serves it or None)
DOC_EXAMPLES = [
    ([("Prefix", "/")], "/anything/at/all", 0),
    ([("Exact", "/foo")], "/foo", 0),
    ([("Exact", "/foo")], "/bar", None),
    ([("Exact", "/foo")], "/foo/", None),
    ([("Exact", "/foo/")], "/foo", None),
    ([("Prefix", "/foo")], "/foo", 0),
    ([("Prefix", "/foo")], "/foo/", 0),
    ([("Prefix", "/foo/")], "/foo", 0),
    ([("Prefix", "/foo/")], "/foo/", 0),
    ([("Prefix", "/aaa/bb")], "/aaa/bbb", None),
    ([("Prefix", "/aaa/bbb")], "/aaa/bbb", 0),
    ([("Prefix", "/aaa/bbb/")], "/aaa/bbb", 0),
    ([("Prefix", "/aaa/bbb")], "/aaa/bbb/", 0),
    ([("Prefix", "/aaa/bbb")], "/aaa/bbb/ccc", 0),
    ([("Prefix", "/aaa/bbb")], "/aaa/bbbxyz", None),
    ([("Prefix", "/"), ("Prefix", "/aaa")], "/aaa/ccc", 1),
    ([("Prefix", "/"), ("Prefix", "/aaa"), ("Prefix", "/aaa/bbb")], "/aaa/bbb", 2),
    ([("Prefix", "/"), ("Prefix", "/aaa"), ("Prefix", "/aaa/bbb")], "/ccc", 0),
    ([("Prefix", "/aaa")], "/ccc", None),
    ([("Prefix", "/foo"), ("Exact", "/foo")], "/foo", 1),
    ([("ImplementationSpecific", "/aaa/bbb")], "/aaa/bbb/ccc", 0),
    ([("ImplementationSpecific", "/aaa/bbb")], "/aaa/bbbxyz", None),
]


@pytest.mark.parametrize(("rules", "request_path", "want"), DOC_EXAMPLES)
def test_documentation_path_examples(rules: list[tuple[str, str]], request_path: str,
                                     want: int | None) -> None:
    paths = [path(p, f"svc{i}", kind=kind) for i, (kind, p) in enumerate(rules)]
    svcs = [service(f"svc{i}") for i in range(len(rules))]
    t = tr(ingress("ing", rule("foo.bar.com", *paths)), *svcs)
    assert t.problems == []
    got = router(t).lookup("foo.bar.com", request_path)
    assert got == (None if want is None else f"{NS}/svc{want}:80")


@pytest.mark.parametrize(("request_path", "want"), [("/ccc", "default/fallback:80"),
                                                     ("/aaa/x", "default/a:80")])
def test_no_rule_matches_goes_to_the_default_backend(request_path: str, want: str) -> None:
    t = tr(ingress("ing", rule(None, path("/aaa", "a")), default=backend("fallback")),
           service("a"), service("fallback"))
    assert router(t).lookup("any.host", request_path) == want


@pytest.mark.parametrize(
    ("host", "request_host", "hit"),
    [
        ("foo.bar.com", "foo.bar.com", True),
        ("foo.bar.com", "bar.com", False),
        ("*.foo.com", "bar.foo.com", True),
        ("*.foo.com", "baz.bar.foo.com", False),
        ("*.foo.com", "foo.com", False),
        ("*.Foo.com", "BAR.foo.com:8080", True),
        ("", "whatever.example", True),
        (None, "whatever.example", True),
    ],
)
def test_hosts_exact_wildcard_and_any(host: str | None, request_host: str, hit: bool) -> None:
    t = tr(ingress("ing", rule(host, path("/", "web"))), service("web"))
    assert t.problems == []
    assert (router(t).lookup(request_host, "/x") == "default/web:80") is hit


def test_exact_host_beats_wildcard_beats_any_host() -> None:
    t = tr(ingress("ing", rule("a.foo.com", path("/", "exact")),
                   rule("*.foo.com", path("/", "wild")), rule(None, path("/", "anyhost"))),
           service("exact"), service("wild"), service("anyhost"))
    r = router(t)
    assert r.lookup("a.foo.com", "/") == "default/exact:80"
    assert r.lookup("b.foo.com", "/") == "default/wild:80"
    assert r.lookup("b.bar.com", "/") == "default/anyhost:80"


def test_routes_services_and_names() -> None:
    t = tr(ingress("ing", rule("a.com", path("/x/", "web"), path("/y", "web", kind="Exact"))),
           *web_backends())
    assert [(r.host, r.path, r.service, r.exact) for r in t.snapshot.routes] == [
        ("a.com", "/x", "default/web:80", False), ("a.com", "/y", "default/web:80", True)]
    [svc] = t.snapshot.services
    assert (svc.name, svc.mode, svc.listen) == ("default/web:80", "http", None)
    assert [b.key for b in svc.backends] == ["10.0.0.1:8080", "10.0.0.2:8080"]
    assert t.snapshot.source == "kubernetes"
    assert t.ingresses == [(NS, "ing")]


# -- defaultBackend -------------------------------------------------------------------------


def test_default_backend_is_a_catch_all_route() -> None:
    t = tr(ingress("ing", default=backend("web")), *web_backends())
    assert [(r.host, r.path, r.exact) for r in t.snapshot.routes] == [("", "/", False)]
    assert router(t).lookup("x.y", "/deep/path") == "default/web:80"


@pytest.mark.parametrize("other_ingress", [False, True])
def test_a_rule_for_any_host_and_slash_shadows_the_default_backend(other_ingress: bool) -> None:
    catch_all = rule(None, path("/", "web"))
    if other_ingress:
        objs = [ingress("a", default=backend("fallback"), created=T0),
                ingress("b", catch_all, created=T1)]
    else:
        objs = [ingress("a", catch_all, default=backend("fallback"))]
    t = tr(*objs, service("web"), service("fallback"))
    assert [r.service for r in t.snapshot.routes] == ["default/web:80"]
    assert t.problems == []


def test_two_default_backends_the_older_wins() -> None:
    t = tr(ingress("new", default=backend("b"), created=T1),
           ingress("old", default=backend("a"), created=T0), service("a"), service("b"))
    assert [r.service for r in t.snapshot.routes] == ["default/a:80"]
    p = one_problem(t, "already claimed")
    assert (p.kind, p.name) == ("Ingress", "new")
    assert "older Ingress default/old" in p.message


# -- class selection ------------------------------------------------------------------------

LEGACY = "kubernetes.io/ingress.class"


@pytest.mark.parametrize(
    ("class_name", "legacy", "klass", "ours"),
    [
        ("edgelb", None, ingress_class(), True),
        ("edgelb", None, None, True),  # the IngressClass not (yet) seen
        ("edgelb", None, ingress_class(controller="k8s.io/ingress-nginx"), False),
        ("nginx", None, ingress_class(), False),
        ("nginx", "edgelb", ingress_class(), False),  # the field beats the old annotation
        (None, "edgelb", None, True),
        (None, "edgelb", ingress_class(), True),
        (None, "nginx", ingress_class(default=True), False),
        (None, None, ingress_class(default=True), True),
        (None, None, ingress_class(), False),
        (None, None, None, False),
        (None, None, ingress_class(controller="other", default=True), False),
        (None, None, ingress_class("nginx", "k8s.io/ingress-nginx", default=True), False),
        ("", None, ingress_class(default=True), True),  # an empty name is no name
    ],
)
def test_ingress_class_selection(class_name: str | None, legacy: str | None,
                                 klass: dict | None, ours: bool) -> None:
    ann = {LEGACY: legacy} if legacy else None
    objs = [ingress("ing", rule("a.com", path("/", "web")), cls=class_name, annotations=ann),
            service("web")]
    if klass is not None:
        objs.append(klass)
    t = tr(*objs)
    assert (t.ingresses == [(NS, "ing")]) is ours
    assert bool(t.snapshot.routes) is ours
    assert t.problems == []


def test_a_custom_class_and_controller() -> None:
    objs = [ingress("ing", rule("a.com", path("/", "web")), cls="public"), service("web"),
            ingress_class("public", "example.org/lb")]
    assert tr(*objs).ingresses == []
    assert tr(*objs, ingress_class="public", controller="example.org/lb").ingresses == [
        (NS, "ing")]


# -- conflicts between Ingresses ------------------------------------------------------------


def test_same_host_path_type_the_older_ingress_wins() -> None:
    t = tr(ingress("zz", rule("a.com", path("/api", "old")), created=T0),
           ingress("aa", rule("a.com", path("/api/", "new")), created=T1),
           service("old"), service("new"))
    assert [r.service for r in t.snapshot.routes] == ["default/old:80"]
    p = one_problem(t, "already claimed")
    assert (p.kind, p.namespace, p.name) == ("Ingress", NS, "aa")
    assert 'host "a.com" path "/api" (Prefix)' in p.message
    assert t.ingresses == [(NS, "aa"), (NS, "zz")]


def test_equal_age_falls_back_to_namespace_and_name() -> None:
    t = tr(ingress("b", rule("a.com", path("/", "two")), ns="x"),
           ingress("a", rule("a.com", path("/", "one")), ns="x"),
           service("one", ns="x"), service("two", ns="x"))
    assert [r.service for r in t.snapshot.routes] == ["x/one:80"]
    assert one_problem(t, "already claimed").name == "b"


def test_exact_and_prefix_of_one_path_and_other_hosts_do_not_conflict() -> None:
    t = tr(ingress("a", rule("a.com", path("/x", "p"))),
           ingress("b", rule("a.com", path("/x", "e", kind="Exact")),
                   rule("b.com", path("/x", "p"))),
           service("p"), service("e"))
    assert t.problems == []
    assert len(t.snapshot.routes) == 3
    assert router(t).lookup("a.com", "/x") == "default/e:80"


def test_duplicate_path_inside_one_ingress() -> None:
    t = tr(ingress("a", rule("a.com", path("/x", "one"), path("/x", "two"))),
           service("one"), service("two"))
    assert [r.service for r in t.snapshot.routes] == ["default/one:80"]
    assert "earlier rule of this Ingress" in one_problem(t, "already claimed").message


# -- malformed rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_rule", "fragment"),
    [
        ({"host": "a.com"}, "spec.rules[0] (host \"a.com\") has no http paths"),
        ({"host": "a.com", "http": {"paths": []}}, "has no http paths"),
        ({"host": "a..com", "http": {"paths": [path("/", "web")]}}, "spec.rules[0].host"),
        ({"host": "*.*.a.com", "http": {"paths": [path("/", "web")]}}, "not a host name"),
        ({"host": "a.com", "http": {"paths": [path("/", "web", kind="Regex")]}},
         "pathType: 'Regex' is not one of"),
        ({"host": "a.com", "http": {"paths": [path("x", "web")]}}, "not an absolute path"),
        ({"host": "a.com", "http": {"paths": [{"path": "/", "pathType": "Prefix"}]}},
         "backend is missing"),
        ({"host": "a.com", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {
            "resource": {"kind": "StorageBucket", "name": "b"}}}]}}, "resource backends"),
        ({"host": "a.com", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {
            "service": {"name": "web", "port": {}}}}]}}, "give a number or a name"),
        ({"host": "a.com", "http": {"paths": [path("/", "web", port=0)]}},
         "port.number: 0 is not a port"),
        ("not a rule", "spec.rules[0] is not a mapping"),
    ],
)
def test_bad_rules_are_skipped_with_a_problem(bad_rule: Any, fragment: str) -> None:
    t = tr(ingress("ing", bad_rule, rule("ok.com", path("/", "web"))), service("web"))
    assert [r.host for r in t.snapshot.routes] == ["ok.com"]
    p = one_problem(t, fragment)
    assert (p.kind, p.name) == ("Ingress", "ing")


def test_implementation_specific_without_a_path_matches_everything() -> None:
    t = tr(ingress("ing", rule("a.com", {"pathType": "ImplementationSpecific",
                                         "backend": backend("web")})), service("web"))
    assert t.problems == []
    assert router(t).lookup("a.com", "/any/thing") == "default/web:80"


def test_an_ingress_with_nothing_to_route() -> None:
    t = tr(ingress("ing"))
    assert "neither spec.rules nor spec.defaultBackend" in one_problem(t, "neither").message
    assert t.ingresses == [(NS, "ing")]


# -- ports ----------------------------------------------------------------------------------

TWO_PORTS = [{"name": "http", "port": 80, "targetPort": "web"},
             {"name": "admin", "port": 9000, "targetPort": 9100}]


def test_backend_ports_by_number_and_by_name_resolve_per_slice_port_name() -> None:
    t = tr(ingress("ing", rule("a.com", path("/", "web", 80), path("/admin", "web", "admin"))),
           service("web", TWO_PORTS),
           slice_("web", "web-1", ep("10.0.0.1"),
                  ports=[{"name": "admin", "port": 9100}, {"name": "http", "port": 8080}]))
    assert t.problems == []
    web = t.snapshot.service("default/web:80")
    admin = t.snapshot.service("default/web:admin")
    assert web is not None and admin is not None
    assert [b.key for b in web.backends] == ["10.0.0.1:8080"]
    assert [b.key for b in admin.backends] == ["10.0.0.1:9100"]


def test_an_unnamed_single_port() -> None:
    t = tr(ingress("ing", rule("a.com", path("/", "web", 80))),
           service("web", [{"port": 80, "targetPort": 8080}]),
           slice_("web", "web-1", ep("10.0.0.1"), ports=[{"port": 8080, "protocol": "TCP"}]))
    assert [b.key for b in t.snapshot.services[0].backends] == ["10.0.0.1:8080"]


@pytest.mark.parametrize(
    ("objs", "port", "fragment"),
    [
        ([], 80, "backend Service default/web not found"),
        ([service("web", TWO_PORTS)], 81, "has no port 81; its ports: 80 (http), 9000 (admin)"),
        ([service("web", TWO_PORTS)], "grpc", 'has no port named "grpc"'),
        ([service("web", type="ExternalName", externalName="x.org")], 80,
         "ExternalName Services are not supported"),
        ([service("web", [{"name": "dns", "port": 80, "protocol": "UDP"}])], 80,
         "edgelb proxies TCP only"),
    ],
)
def test_an_unresolvable_backend_keeps_its_route_with_no_backends(
        objs: list[dict], port: int | str, fragment: str) -> None:
    t = tr(ingress("ing", rule("a.com", path("/", "web", port))), *objs,
           slice_("web", "web-1", ep("10.0.0.1")))
    [route] = t.snapshot.routes
    svc = t.snapshot.service(route.service)
    assert svc is not None and svc.backends == ()
    assert one_problem(t, fragment).kind == "Ingress"


# -- backends from EndpointSlices -----------------------------------------------------------


def test_slices_are_joined_deduplicated_and_filtered() -> None:
    t = tr(ingress("ing", rule("a.com", path("/", "web"))), service("web"),
           slice_("web", "web-a", ep("10.0.0.2"), ep("10.0.0.1")),
           # the same address in a second slice (a move between slices) counts once
           slice_("web", "web-b", ep("10.0.0.2"), ep("10.0.0.3")),
           # a slice whose port number differs (a rollout changing targetPort)
           slice_("web", "web-c", ep("10.0.0.4"), ports=[{"name": "http", "port": 9090}]),
           # ignored: FQDN, a slice without our port name, another Service, another namespace
           slice_("web", "web-d", ep("db.example.org"), family="FQDN"),
           slice_("web", "web-e", ep("10.0.0.5"), ports=[{"name": "metrics", "port": 9000}]),
           slice_("api", "api-a", ep("10.0.0.6")),
           slice_("web", "web-f", ep("10.0.0.7"), ns="other"))
    [svc] = t.snapshot.services
    assert [b.key for b in svc.backends] == [
        "10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080", "10.0.0.4:9090"]
    assert t.problems == []


def test_dual_stack_uses_the_primary_family() -> None:
    objs = [ingress("ing", rule("a.com", path("/", "web"))),
            slice_("web", "web-v4", ep("10.0.0.1")),
            slice_("web", "web-v6", ep("fd00::1"), family="IPv6")]
    v4 = tr(*objs, service("web"))
    assert [b.key for b in v4.snapshot.services[0].backends] == ["10.0.0.1:8080"]
    v6 = tr(*objs, service("web", ipFamilies=["IPv6", "IPv4"]))
    assert [b.key for b in v6.snapshot.services[0].backends] == ["[fd00::1]:8080"]
    only6 = tr(objs[0], objs[2], service("web"))
    assert [b.host for b in only6.snapshot.services[0].backends] == ["fd00::1"]


R, S, T = "ready", "serving", "terminating"


def cond(*flags: str, missing: tuple[str, ...] = ()) -> dict:
    return {k: (k in flags) for k in (R, S, T) if k not in missing}


@pytest.mark.parametrize(
    ("endpoints", "want"),
    [
        # conditions missing: ready (missing = true)
        ([{}], [("10.0.0.1", True, False)]),
        # not ready, not terminating: left out
        ([cond(S, missing=(T,))], []),
        ([cond()], []),
        # ready ones exist: every terminating one drains (serving or not)
        ([cond(R, S), cond(S, T), cond(T)],
         [("10.0.0.1", True, False), ("10.0.0.2", False, True), ("10.0.0.3", False, True)]),
        # none ready: serving+terminating ones are used as ready (kube-proxy's fallback)
        ([cond(S, T), cond(T), cond(T, missing=(S,))],
         [("10.0.0.1", True, False), ("10.0.0.2", False, True), ("10.0.0.3", True, False)]),
        ([cond(T)], [("10.0.0.1", False, True)]),
    ],
)
def test_ready_serving_terminating(endpoints: list[dict],
                                   want: list[tuple[str, bool, bool]]) -> None:
    eps = [{"addresses": [f"10.0.0.{i + 1}"], "conditions": c} for i, c in enumerate(endpoints)]
    t = tr(ingress("ing", rule("a.com", path("/", "web"))), service("web"),
           slice_("web", "web-a", *eps))
    assert [(b.host, b.ready, b.terminating) for b in t.snapshot.services[0].backends] == want


def test_dedupe_keeps_the_best_condition_of_an_address() -> None:
    t = tr(ingress("ing", rule("a.com", path("/", "web"))), service("web"),
           slice_("web", "web-a", ep("10.0.0.1", ready=False, terminating=True)),
           slice_("web", "web-b", ep("10.0.0.1", ready=True), ep("10.0.0.2", ready=True)))
    assert [(b.key, b.ready) for b in t.snapshot.services[0].backends] == [
        ("10.0.0.1:8080", True), ("10.0.0.2:8080", True)]


def test_zones_and_topology_hints() -> None:
    objs = [ingress("ing", rule("a.com", path("/", "web"))), service("web"),
            slice_("web", "web-a", ep("10.0.0.1", zone="a", hints=["a"]),
                   ep("10.0.0.2", zone="b", hints=["b"]), ep("10.0.0.3", zone="b", hints=["a"]))]

    def seen(t: Translation) -> list[tuple[str, str]]:
        return [(b.host, b.zone) for b in t.snapshot.services[0].backends]

    everything = [("10.0.0.1", "a"), ("10.0.0.2", "b"), ("10.0.0.3", "b")]
    assert seen(tr(*objs)) == everything  # no zone of ours: hints ignored
    assert seen(tr(*objs, zone="a")) == [("10.0.0.1", "a"), ("10.0.0.3", "b")]
    assert seen(tr(*objs, zone="c")) == everything  # no hint for our zone: ignored
    partial = [*objs[:2], slice_("web", "web-a", ep("10.0.0.1", zone="a", hints=["a"]),
                                 ep("10.0.0.2", zone="b"))]
    assert seen(tr(*partial, zone="a")) == [("10.0.0.1", "a"), ("10.0.0.2", "b")]


# -- weights --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("the_pod", "weight", "fragment"),
    [
        (pod("p", ["250m", "0.5"]), 0.75, None),
        (pod("p", ["2", None]), 2.0, None),
        (pod("p", [None]), 1.0, None),
        (pod("p", ["500m"], {"edgelb.io/weight": "3"}), 3.0, None),
        (pod("p", ["500m"], {"edgelb.io/weight": "0.5"}), 0.5, None),
        (pod("p", ["500m"], {"edgelb.io/weight": "-1"}), 0.5, "edgelb.io/weight: '-1' is not"),
        (pod("p", [], {"edgelb.io/weight": "lots"}), 1.0, "is not a positive number"),
        (pod("p", ["a lot"]), 1.0, "requests.cpu: 'a lot' is not a quantity"),
        (None, 1.0, None),  # the pod not in the cache
    ],
)
def test_weights_from_pod_annotation_then_cpu_then_one(the_pod: dict | None, weight: float,
                                                      fragment: str | None) -> None:
    objs = [ingress("ing", rule("a.com", path("/", "web"))), service("web"),
            slice_("web", "web-a", ep("10.0.0.1", pod="p"))]
    if the_pod is not None:
        objs.append(the_pod)
    t = tr(*objs, pod_weights=True)
    assert t.snapshot.services[0].backends[0].weight == pytest.approx(weight)
    if fragment is None:
        assert t.problems == []
    else:
        assert one_problem(t, fragment).kind == "Pod"
    assert tr(*objs).snapshot.services[0].backends[0].weight == 1.0  # pod_weights off


# -- static ports ---------------------------------------------------------------------------


def static(name: str = "db", port: str | None = "10001", created: str = T0,
           ports: list[dict] | None = None, **ann: str) -> dict:
    annotations = {f"edgelb.io/{k.replace('_', '-')}": v for k, v in ann.items()}
    if port is not None:
        annotations["edgelb.io/port"] = port
    if ports is None:
        ports = [{"name": "pg", "port": 5432}, {"name": "http", "port": 80,
                                                "appProtocol": "http"}]
    return service(name, ports, annotations=annotations, created=created)


DB_SLICE = slice_("db", "db-a", ep("10.0.1.1"),
                  ports=[{"name": "pg", "port": 5432}, {"name": "http", "port": 8080}])


def test_static_port_service() -> None:
    t = tr(static(balance="round-robin", max_inflight="64"), DB_SLICE)
    assert t.problems == []
    [svc] = t.snapshot.services
    assert (svc.name, svc.mode, svc.listen) == ("default/db", "tcp", Address("0.0.0.0", 10001))
    assert [b.key for b in svc.backends] == ["10.0.1.1:5432"]
    assert (svc.policy.balance, svc.policy.max_inflight) == ("round-robin", 64)
    assert t.snapshot.routes == ()


def test_static_port_policy_builds_on_the_defaults() -> None:
    t = tr(static(balance="round-robin"), DB_SLICE, defaults=Policy(max_inflight=7))
    assert t.snapshot.services[0].policy.max_inflight == 7


@pytest.mark.parametrize(
    ("ann", "mode", "port"),
    [
        ({}, "tcp", 5432),
        ({"target_port": "http"}, "http", 8080),  # appProtocol http
        ({"target_port": "80"}, "http", 8080),
        ({"target_port": "http", "mode": "tcp"}, "tcp", 8080),
        ({"mode": "http"}, "http", 5432),
    ],
)
def test_static_port_target_port_and_mode(ann: dict, mode: str, port: int) -> None:
    t = tr(static(**ann), DB_SLICE)
    assert t.problems == []
    [svc] = t.snapshot.services
    assert (svc.mode, svc.backends[0].port) == (mode, port)


@pytest.mark.parametrize(
    ("app_protocol", "mode"),
    [("http", "http"), ("HTTP", "http"), ("kubernetes.io/ws", "http"),
     ("kubernetes.io/h2c", "tcp"), ("https", "tcp"), (None, "tcp")],
)
def test_static_port_default_mode_follows_app_protocol(app_protocol: str | None,
                                                       mode: str) -> None:
    p: dict[str, Any] = {"name": "pg", "port": 5432}
    if app_protocol:
        p["appProtocol"] = app_protocol
    assert tr(static(ports=[p]), DB_SLICE).snapshot.services[0].mode == mode


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"port": "abc"}, "edgelb.io/port: 'abc' is not a port"),
        ({"port": "70000"}, "edgelb.io/port: '70000' is not a port"),
        ({"port": "0"}, "edgelb.io/port: '0' is not a port"),
        ({"port": ""}, "edgelb.io/port: '' is not a port"),
        ({"mode": "udp"}, "edgelb.io/mode: 'udp' is not a mode"),
        ({"target_port": "grpc"},
         'edgelb.io/target-port: Service default/bad has no port named "grpc"'),
        ({"target_port": "81"}, "edgelb.io/target-port: Service default/bad has no port 81"),
        ({"balance": "fastest"}, "edgelb.io/balance"),
        ({"max_inflite": "3"}, "edgelb.io/max-inflite: unknown annotation; did you mean"),
        ({"ports": []}, "has no spec.ports[0].port"),
    ],
)
def test_static_port_errors_name_the_annotation_and_skip_that_service_alone(
        kw: dict, fragment: str) -> None:
    t = tr(static("bad", **kw), static("good", port="10002"), DB_SLICE)
    assert [s.name for s in t.snapshot.services] == ["default/good"]
    p = one_problem(t, fragment)
    assert (p.kind, p.namespace, p.name) == ("Service", NS, "bad")


def test_bad_policy_annotations_of_a_routed_service_fall_back_to_defaults() -> None:
    t = tr(ingress("ing", rule("a.com", path("/", "web"))),
           service("web", annotations={"edgelb.io/balance": "fastest"}),
           defaults=Policy(max_inflight=5))
    [svc] = t.snapshot.services
    assert svc.policy == Policy(max_inflight=5)
    assert one_problem(t, "edgelb.io/balance").kind == "Service"


def test_routed_service_takes_its_policy_annotations() -> None:
    t = tr(ingress("ing", rule("a.com", path("/", "web"))),
           service("web", annotations={"edgelb.io/max-inflight": "9", "edgelb.io/port": "1"}))
    routed = t.snapshot.service("default/web:80")
    assert routed is not None and routed.policy.max_inflight == 9
    static_one = t.snapshot.service("default/web")
    assert static_one is not None and static_one.listen == Address("0.0.0.0", 1)


def test_two_services_on_one_port_the_older_wins() -> None:
    t = tr(static("newer", created=T2), static("older", created=T1), DB_SLICE)
    [svc] = t.snapshot.services
    assert svc.name == "default/older"
    p = one_problem(t, "already taken")
    assert p.name == "newer" and "older Service default/older" in p.message


def test_a_broken_service_does_not_hold_its_port() -> None:
    t = tr(static("broken", created=T0, mode="udp"), static("fine", created=T1), DB_SLICE)
    assert [s.name for s in t.snapshot.services] == ["default/fine"]
    assert [p.name for p in t.problems] == ["broken"]


# -- TLS ------------------------------------------------------------------------------------


def tls_ingress(name: str, *entries: dict, created: str = T0) -> dict:
    return ingress(name, rule("a.com", path("/", "web")), tls=list(entries), created=created)


def test_tls_hosts_map_to_their_secret() -> None:
    t = tr(tls_ingress("ing", {"hosts": ["a.com", "*.b.com"], "secretName": "cert"}),
           service("web"), secret("cert"))
    assert t.tls == {"*.b.com": (NS, "cert"), "a.com": (NS, "cert")}
    assert t.problems == []


def test_tls_without_hosts_is_the_default_certificate() -> None:
    t = tr(tls_ingress("ing", {"secretName": "cert"}), service("web"), secret("cert"))
    assert t.tls == {"": (NS, "cert")}


@pytest.mark.parametrize(
    ("objs", "fragment"),
    [
        ([], "Secret default/cert not found"),
        ([secret("cert", "Opaque")], "has type 'Opaque', not kubernetes.io/tls"),
        ([secret("cert", data={"tls.crt": "Q0VSVA=="})], "lacks tls.key"),
        ([secret("cert", data={})], "lacks tls.crt and tls.key"),
    ],
)
def test_tls_secret_problems(objs: list[dict], fragment: str) -> None:
    t = tr(tls_ingress("ing", {"hosts": ["a.com"], "secretName": "cert"}), service("web"),
           *objs)
    assert t.tls == {}
    p = one_problem(t, fragment)
    assert p.kind == "Ingress" and "kubectl create secret tls cert" in p.message
    assert router(t).lookup("a.com", "/") == "default/web:80"  # routing is unaffected


def test_tls_secret_in_another_namespace_is_not_used() -> None:
    other = secret("cert")
    other["metadata"]["namespace"] = "other"
    t = tr(tls_ingress("ing", {"hosts": ["a.com"], "secretName": "cert"}), service("web"),
           other)
    assert t.tls == {}
    one_problem(t, "not found")


def test_tls_same_host_two_secrets_the_older_ingress_wins() -> None:
    t = tr(tls_ingress("new", {"hosts": ["a.com"], "secretName": "two"}, created=T1),
           tls_ingress("old", {"hosts": ["a.com"], "secretName": "one"}, created=T0),
           service("web"), secret("one"), secret("two"))
    assert t.tls == {"a.com": (NS, "one")}
    p = one_problem(t, "already uses Secret default/one")
    assert p.name == "new" and "from the older Ingress default/old" in p.message
    same = tr(tls_ingress("ing", {"hosts": ["a.com"], "secretName": "one"},
                          {"hosts": ["a.com", "c.com"], "secretName": "two"}),
              service("web"), secret("one"), secret("two"))
    assert same.tls == {"a.com": (NS, "one"), "c.com": (NS, "two")}
    assert "earlier entry of this Ingress" in one_problem(same, "already uses").message


def test_tls_entry_without_secret_name() -> None:
    t = tr(tls_ingress("ing", {"hosts": ["a.com"]}), service("web"))
    one_problem(t, "spec.tls[0].secretName is missing")


def test_tls_of_other_classes_is_ignored() -> None:
    ing = tls_ingress("ing", {"hosts": ["a.com"], "secretName": "nope"})
    ing["spec"]["ingressClassName"] = "nginx"
    t = tr(ing, service("web"))
    assert (t.tls, t.problems, t.ingresses) == ({}, [], [])


# -- determinism, layering, the default policy reader ---------------------------------------


def a_cluster() -> list[dict]:
    return [
        ingress_class(default=True),
        ingress("site", rule("a.com", path("/", "web"), path("/api", "api", "http")),
                rule("*.b.com", path("/x", "web", kind="Exact")), default=backend("web"),
                tls=[{"hosts": ["a.com"], "secretName": "cert"}], created=T1),
        ingress("legacy", rule(None, path("/old", "api", "http")), cls=None, created=T0),
        service("web", annotations={"edgelb.io/balance": "round-robin"}),
        service("api", [{"name": "http", "port": 8000}]),
        static("db", max_inflight="4", target_port="pg"),
        slice_("web", "web-a", ep("10.0.0.1", zone="a", pod="w1"), ep("10.0.0.2", zone="b")),
        slice_("api", "api-a", ep("10.0.0.3", pod="a1"), ep("10.0.0.4", ready=False,
                                                            terminating=True)),
        DB_SLICE,
        pod("w1", ["250m"]), pod("a1", [], {"edgelb.io/weight": "2"}),
        secret("cert"),
    ]


def test_output_is_deterministic_whatever_the_cache_order() -> None:
    objs = a_cluster()
    first = tr(*objs, pod_weights=True, zone="a")
    assert first.problems == []
    assert len(first.snapshot.routes) == 5
    rng = random.Random(7)
    for _ in range(5):
        shuffled = objs[:]
        rng.shuffle(shuffled)
        assert tr(*shuffled, pod_weights=True, zone="a") == first
    api = first.snapshot.service("default/api:http")
    assert api is not None and api.backends == (
        Backend("10.0.0.3", 8080, weight=2.0),
        Backend("10.0.0.4", 8080, ready=False, terminating=True))


def test_the_policy_reader_is_the_callers() -> None:
    """No default reader: translate would have to import edgelb to find one."""
    with pytest.raises(TypeError):
        translate(state(*a_cluster()))  # type: ignore[call-arg]
    t = translate(state(*a_cluster()), read_policy=policy_from_annotations)
    svc = t.snapshot.service("default/web:80")
    assert svc is not None and svc.policy.balance == "round-robin"


def test_importing_the_translator_does_not_import_edgelb() -> None:
    code = ("import sys, watchers.kubernetes.translate; "
            "bad = [m for m in sys.modules if m == 'edgelb' or m.startswith('edgelb.')]; "
            "assert not bad, bad")
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


# -- robustness: mangled objects never raise ------------------------------------------------

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 70000), st.floats(allow_nan=True),
    st.text(max_size=6), st.sampled_from(["", "/", "*.", "TCP", "IPv4", "IPv6", "true", "1e999",
                                          "250m", "Exact", "Prefix", "edgelb", "http", "99999"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                         max_size=2),
)


def mangle(obj: Any, data: st.DataObject) -> None:
    """Walk a random path down `obj` and drop or replace what is there."""
    node = obj
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return
        k = data.draw(st.sampled_from(keys))
        child = node[k]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        if isinstance(node, dict) and data.draw(st.booleans()):
            del node[k]
        else:
            node[k] = data.draw(JUNK)
        return


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_translate_never_raises_on_mangled_objects(data: st.DataObject) -> None:
    objs = copy.deepcopy(a_cluster())
    caches: dict[str, dict] = {v: {} for v in CACHES.values()}
    for o in objs:  # keyed as the reflector keyed them, before the damage
        caches[CACHES[o["kind"]]][(o["metadata"].get("namespace", ""), o["metadata"]["name"])] = o
    for _ in range(data.draw(st.integers(1, 8))):
        mangle(data.draw(st.sampled_from(objs)), data)
    if data.draw(st.integers(0, 9)) == 0:  # a whole object replaced
        cache = caches[data.draw(st.sampled_from(sorted(caches)))]
        if cache:
            cache[data.draw(st.sampled_from(sorted(cache)))] = data.draw(JUNK)
    t = translate(ClusterState(**caches), read_policy=policy_from_annotations,
                  pod_weights=data.draw(st.booleans()), zone=data.draw(st.sampled_from(["", "a"])))
    assert not [p for p in t.problems if "internal error" in p.message], t.problems
    names = {s.name for s in t.snapshot.services}
    assert all(r.service in names for r in t.snapshot.routes)
    for s in t.snapshot.services:
        for b in s.backends:
            assert 1 <= b.port <= 65535 and b.weight > 0


def test_proxy_protocol_annotation_reaches_tcp_and_is_reported_on_http() -> None:
    ann = {"edgelb.io/proxy-protocol": "2", "edgelb.io/port": "15432",
           "edgelb.io/mode": "tcp", "edgelb.io/max-inflight": "7"}
    t = tr(service("db", annotations=ann), DB_SLICE)
    [svc] = t.snapshot.services
    assert (svc.mode, svc.policy.proxy_protocol) == ("tcp", 2)
    assert t.problems == []
    # routed by an Ingress (http): the rest of the policy applies, the PROXY header does not
    t = tr(ingress("ing", rule("a.com", path("/", "web"))),
           service("web", annotations={"edgelb.io/proxy-protocol": "1",
                                       "edgelb.io/max-inflight": "9"}))
    [svc] = t.snapshot.services
    assert svc.policy.proxy_protocol == 0 and svc.policy.max_inflight == 9
    p = one_problem(t, "proxy-protocol")
    assert (p.kind, p.name) == ("Service", "web") and "tcp mode" in p.message
