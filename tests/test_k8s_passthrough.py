"""Kubernetes: an Ingress annotated `edgelb.io/ssl-passthrough: "true"` becomes tcp passthrough
services routed by SNI name (ingress-nginx's ssl-passthrough), not HTTP routes."""

from __future__ import annotations

import asyncio

import pytest
from httpkit import HOST, free_port
from test_k8s_translate import (
    T1,
    ep,
    ingress,
    ingress_class,
    messages,
    one_problem,
    path,
    rule,
    service,
    slice_,
    tr,
)

from edgelb.control.runtime import EntrypointSpec, Runtime
from watchers.kubernetes.translate import PASSTHROUGH_ANNOTATION
from watchers.model import Address, Backend, Route

ON = {PASSTHROUGH_ANNOTATION: "true"}


def vault() -> list[dict]:
    """A Service `vault` whose port 443 targets the pods' 8443, with two ready endpoints."""
    ports = [{"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"}]
    return [service("vault", ports),
            slice_("vault", "vault-a", ep("10.0.0.1"), ep("10.0.0.2"),
                   ports=[{"name": "https", "port": 8443, "protocol": "TCP"}])]


def test_an_annotated_ingress_becomes_a_passthrough_service_per_host() -> None:
    t = tr(ingress("vault", rule("vault.example.com", path("/", "vault", 443)),
                   rule("*.vault.example.com", path("/", "vault", 443)), annotations=ON),
           *vault())
    assert t.problems == []
    names = ["default/vault:443@*.vault.example.com", "default/vault:443@vault.example.com"]
    assert [s.name for s in t.snapshot.services] == names
    for svc in t.snapshot.services:
        assert (svc.mode, svc.tls_passthrough, svc.listen) == ("tcp", True, None)
        assert svc.backends == (Backend("10.0.0.1", 8443), Backend("10.0.0.2", 8443))
    assert t.snapshot.routes == (
        Route("*.vault.example.com", "/", names[0]), Route("vault.example.com", "/", names[1]))
    assert t.ingresses == [("default", "vault")]  # still ours: its status is written


def test_the_slash_path_is_chosen_else_the_first() -> None:
    others = [service("api"), service("web")]
    t = tr(ingress("a", rule("a.example.com", path("/api", "api"), path("/", "web")),
                   rule("b.example.com", path("/api", "api"), path("/web", "web")),
                   annotations=ON), *others)
    assert t.problems == []
    assert {r.host: r.service for r in t.snapshot.routes} == {
        "a.example.com": "default/web:80@a.example.com",
        "b.example.com": "default/api:80@b.example.com"}
    assert [r.path for r in t.snapshot.routes] == ["/", "/"]  # no /api route: no HTTP at all


def test_without_the_annotation_or_with_false_the_rules_are_http() -> None:
    for ann in (None, {PASSTHROUGH_ANNOTATION: "false"}):
        t = tr(ingress("v", rule("vault.example.com", path("/", "vault", 443)),
                       annotations=ann), *vault())
        assert t.problems == []
        (svc,) = t.snapshot.services
        assert (svc.name, svc.mode, svc.tls_passthrough) == ("default/vault:443", "http", False)


def test_a_bad_value_is_a_problem_and_tls_is_terminated() -> None:
    t = tr(ingress("v", rule("vault.example.com", path("/", "vault", 443)),
                   annotations={PASSTHROUGH_ANNOTATION: "yes"}), *vault())
    assert "is not \"true\" or \"false\"" in one_problem(t, PASSTHROUGH_ANNOTATION).message
    (svc,) = t.snapshot.services
    assert svc.mode == "http"


def test_a_rule_without_host_cannot_be_passed_through() -> None:
    t = tr(ingress("v", rule(None, path("/", "vault", 443)),
                   rule("vault.example.com", path("/", "vault", 443)), annotations=ON),
           *vault())
    assert "has no host; skipped" in one_problem(t, "spec.rules[0]").message
    assert [r.host for r in t.snapshot.routes] == ["vault.example.com"]


def test_the_default_backend_stays_http() -> None:
    t = tr(ingress("v", rule("vault.example.com", path("/", "vault", 443)),
                   default={"service": {"name": "web", "port": {"number": 80}}},
                   annotations=ON), *vault(), service("web"))
    assert t.problems == []
    modes = {s.name: (s.mode, s.tls_passthrough) for s in t.snapshot.services}
    assert modes == {"default/web:80": ("http", False),
                     "default/vault:443@vault.example.com": ("tcp", True)}


def test_the_older_ingress_keeps_a_host() -> None:
    t = tr(ingress("new", rule("vault.example.com", path("/", "web")), annotations=ON,
                   created=T1),
           ingress("old", rule("vault.example.com", path("/", "vault", 443)), annotations=ON),
           *vault(), service("web"))
    msg = one_problem(t, "already passed through").message
    assert "the older Ingress default/old" in msg
    assert messages(t, "Ingress", "new") == [msg]
    assert [s.name for s in t.snapshot.services] == ["default/vault:443@vault.example.com"]


def test_a_missing_service_gives_a_passthrough_service_without_backends() -> None:
    t = tr(ingress("v", rule("vault.example.com", path("/", "gone", 443)), annotations=ON))
    assert "not found" in one_problem(t, "gone").message
    (svc,) = t.snapshot.services
    assert (svc.mode, svc.tls_passthrough, svc.backends) == ("tcp", True, ())


@pytest.mark.uvloop
async def test_the_translation_lands_in_the_sni_table_of_tls_entrypoints() -> None:
    t = tr(ingress_class(), ingress("v", rule("vault.example.com", path("/", "vault", 443)),
                                    rule("shop.example.com", path("/", "web")),
                                    annotations=ON),
           ingress("web", rule("www.example.com", path("/", "web"))), *vault(), service("web"))
    assert t.problems == []
    runtime = Runtime(loop=asyncio.get_running_loop())
    https, http = free_port(), free_port()
    await runtime.set_entrypoints(
        [EntrypointSpec("https", Address(HOST, https), ("", "")),
         EntrypointSpec("http", Address(HOST, http))], runtime.defaults, t.snapshot)
    try:
        table = runtime.listeners[f"{HOST}:{https}"].sni_table
        assert table.lookup("vault.example.com") == "default/vault:443@vault.example.com"
        assert table.lookup("www.example.com") is None  # terminated, routed as HTTP
        assert runtime.router.lookup("www.example.com", "/") == "default/web:80"
        assert runtime.router.lookup("vault.example.com", "/") is None
        assert runtime.services["default/vault:443@vault.example.com"].spec.tls_passthrough
        assert runtime.listeners[f"{HOST}:{http}"].sni_table.lookup("vault.example.com") is None
    finally:
        await runtime.shutdown(0.1)


def test_without_a_tls_entrypoint_only_the_annotated_ingress_is_skipped() -> None:
    """The translator is told whether the proxy can route by SNI; when it cannot, the
    passthrough rules are problems of their own Ingress and everything else is applied."""
    t = tr(ingress("v", rule("vault.example.com", path("/", "vault", 443)), annotations=ON),
           ingress("web", rule("www.example.com", path("/", "web"))), *vault(), service("web"),
           sni_routing=False)
    assert [s.name for s in t.snapshot.services] == ["default/web:80"]
    assert [r.host for r in t.snapshot.routes] == ["www.example.com"]
    [problem] = t.problems
    assert (problem.kind, problem.name) == ("Ingress", "v")
    assert "TLS entrypoint" in problem.message
