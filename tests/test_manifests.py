"""`edgelb manifests`: the rendered YAML is valid Kubernetes, least-privilege, and agrees with
the config it carries (ports, probes, shutdown timings, ingress class, namespaces)."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes.client import ApiClient

from edgelb import __version__
from edgelb.ops import manifests as m
from edgelb.ops.cli import main as cli_main
from edgelb.ops.config import parse_config

pytestmark = pytest.mark.timeout(30)

CLUSTER_WIDE_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "IngressClass",
                      "GatewayClass"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgelb manifests")
    m.add_arguments(parser)
    return parser.parse_args(argv)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = m.command(parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


def render(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    code, out, err = run(argv, capsys)
    assert code == 0, err
    docs = list(yaml.safe_load_all(out))
    assert None not in docs, "an empty document in the output"
    return docs


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} documents"
    return found[0]


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (w,) = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    return w


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = workload(docs)["spec"]["template"]["spec"]["containers"]
    return c


def write(tmp_path: Path, text: str, name: str = "edgelb.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def rbac_rules(docs: list[dict[str, Any]]) -> set[tuple[str, str, str, str, str]]:
    """(kind, namespace, apiGroup, resource, verb) for every rule of every role."""
    out = set()
    for d in docs:
        if d["kind"] not in ("ClusterRole", "Role"):
            continue
        ns = d["metadata"].get("namespace", "")
        for rule in d["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no wildcards/extras
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.add((d["kind"], ns, group, resource, verb))
    return out


def expand(kind: str, ns: str, group: str, resources_: str, verbs: str) -> set[tuple]:
    return {(kind, ns, group, r, v) for r in resources_.split() for v in verbs.split()}


WATCH = "list watch"

# The exact grants: what the code does (tests/test_k8s_e2e.py checks every request the watcher
# makes against these rules). A verb or resource added or removed anywhere fails these tests.
CLUSTER_WIDE_RBAC = (
    expand("ClusterRole", "", "", "services secrets pods nodes", WATCH)
    | expand("ClusterRole", "", "discovery.k8s.io", "endpointslices", WATCH)
    | expand("ClusterRole", "", "networking.k8s.io", "ingressclasses", WATCH)
    | expand("ClusterRole", "", "networking.k8s.io", "ingresses", "get list watch")
    | expand("ClusterRole", "", "networking.k8s.io", "ingresses/status", "update")
    | expand("ClusterRole", "", "", "events", "create patch")
)


def leases(ns: str) -> set[tuple]:
    return expand("Role", ns, "coordination.k8s.io", "leases", "get create update")


def namespaced_rbac(ns: str) -> set[tuple]:
    return (
        expand("Role", ns, "", "services secrets pods", WATCH)
        | expand("Role", ns, "discovery.k8s.io", "endpointslices", WATCH)
        | expand("Role", ns, "networking.k8s.io", "ingresses", "get list watch")
        | expand("Role", ns, "networking.k8s.io", "ingresses/status", "update")
        | expand("Role", ns, "", "events", "create patch")
    )


# ---------------------------------------------------------------------------------------------
# Defaults


def test_defaults_render_every_object_in_apply_order(capsys: pytest.CaptureFixture[str]) -> None:
    docs = render([], capsys)
    assert [d["kind"] for d in docs] == [
        "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
        "RoleBinding", "IngressClass", "ConfigMap", "Service", "Deployment",
        "PodDisruptionBudget",
    ]
    for d in docs:
        if d["kind"] in CLUSTER_WIDE_KINDS:
            assert "namespace" not in d["metadata"], d["kind"]
        else:
            assert d["metadata"]["namespace"] == "edgelb", d["kind"]
    assert one(docs, "Namespace")["metadata"]["name"] == "edgelb"
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert container(docs)["image"] == f"edgelb:{__version__}"
    assert container(docs)["args"] == ["run", "-c", "/etc/edgelb/edgelb.yaml"]
    ingress_class = one(docs, "IngressClass")
    assert ingress_class["metadata"]["name"] == "edgelb"
    assert ingress_class["spec"] == {"controller": "edgelb.io/ingress-controller"}
    service = one(docs, "Service")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("http", 80, "http"), ("https", 443, "https")]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1


def apply_order_problems(docs: list[dict[str, Any]]) -> list[str]:
    """What `kubectl apply` of the stream in order would trip over: an object applied before
    the namespace it lives in, a binding before its role, a pod spec before what it mounts."""
    seen: set[tuple[str, str, str]] = set()
    problems = []
    created_ns = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}

    def need(kind: str, ns: str, name: str, who: str) -> None:
        if (kind, ns, name) not in seen:
            problems.append(f"{who} comes before {kind} {ns}/{name}")

    for d in docs:
        meta = d["metadata"]
        ns = meta.get("namespace", "")
        who = f"{d['kind']} {ns}/{meta['name']}"
        if ns and ns in created_ns:
            need("Namespace", "", ns, who)
        if d["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            ref = d["roleRef"]
            need(ref["kind"], ns if ref["kind"] == "Role" else "", ref["name"], who)
            for s in d["subjects"]:
                need("ServiceAccount", s["namespace"], s["name"], who)
        if d["kind"] in ("Deployment", "DaemonSet"):
            pod = d["spec"]["template"]["spec"]
            need("ServiceAccount", ns, pod["serviceAccountName"], who)
            for v in pod["volumes"]:
                if "configMap" in v:
                    need("ConfigMap", ns, v["configMap"]["name"], who)
            for kind in ("ClusterRoleBinding", "RoleBinding", "IngressClass"):
                if not any(k == kind for k, _, _ in seen):
                    problems.append(f"{who} comes before any {kind}")
        seen.add((d["kind"], ns, meta["name"]))
    return problems


@pytest.mark.parametrize("argv", [
    [],
    ["--kind", "daemonset"],
    ["--watch-namespaces", "web,api", "--namespace", "proxy"],
    ["--namespace", "default"],
])
def test_the_stream_applies_in_order(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    docs = render(argv, capsys)
    assert apply_order_problems(docs) == []
    # and the check itself notices a wrong order
    assert apply_order_problems(list(reversed(docs)))


def test_the_default_config_is_embedded_and_valid(capsys: pytest.CaptureFixture[str]) -> None:
    docs = render([], capsys)
    configmap = one(docs, "ConfigMap")
    assert list(configmap["data"]) == ["edgelb.yaml"]
    config = parse_config(configmap["data"]["edgelb.yaml"])
    assert str(config.admin) == "0.0.0.0:9090"
    assert [(e.name, str(e.listen)) for e in config.entrypoints] == [
        ("http", "0.0.0.0:8080"), ("https", "0.0.0.0:8443")]
    assert config.kubernetes is not None and config.kubernetes.enabled
    assert config.kubernetes.ingress_class == "edgelb"
    assert config.kubernetes.namespaces == ()
    assert (config.shutdown.delay, config.shutdown.grace) == (5.0, 30.0)
    volumes = workload(docs)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": configmap["metadata"]["name"]}} in volumes
    mounts = container(docs)["volumeMounts"]
    assert {"name": "config", "mountPath": "/etc/edgelb", "readOnly": True} in mounts


def test_default_output_is_deterministic_and_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    code, first, err = run([], capsys)
    assert code == 0 and err == ""
    assert run([], capsys)[1] == first
    assert first.startswith(f"# edgelb {__version__}")


# ---------------------------------------------------------------------------------------------
# Valid Kubernetes: every field a real API field of the right type


api = ApiClient()


def model_problems(doc: dict[str, Any]) -> str | None:
    """Deserialize into the official client's model and back: an unknown (misspelled) field is
    dropped and a missing required one raises, so any difference is a problem."""
    version = doc["apiVersion"].rsplit("/", 1)[-1]
    model = f"{version.capitalize()}{doc['kind']}"
    try:
        obj = api._ApiClient__deserialize(doc, model)  # type: ignore[attr-defined]
    except (ValueError, TypeError) as e:
        return f"{model}: {e}"
    back = api.sanitize_for_serialization(obj)
    return None if back == doc else f"{model}: fields lost in the round trip"


ALL_OPTIONS = [
    "--namespace", "proxy", "--kind", "deployment", "--replicas", "3",
    "--image", "registry.example.com/edgelb:1.2.3", "--ingress-class", "public",
    "--service-type", "NodePort", "--ports", "10000,10001", "--watch-namespaces", "web,api",
]


@pytest.mark.parametrize("argv", [
    [],
    ALL_OPTIONS,
    ["--kind", "daemonset", "--service-type", "ClusterIP"],
    ["--watch-namespaces", "web", "--ports", "993,10000", "--namespace", "kube-system"],
])
def test_every_document_is_a_valid_kubernetes_object(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    for doc in render(argv, capsys):
        assert model_problems(doc) is None, doc


def test_the_model_check_notices_a_misspelled_field(capsys: pytest.CaptureFixture[str]) -> None:
    deployment = one(render([], capsys), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    assert model_problems(deployment) is not None


# ---------------------------------------------------------------------------------------------
# RBAC


def test_cluster_wide_rbac_is_exactly_the_listed_grants(
    capsys: pytest.CaptureFixture[str],
) -> None:
    docs = render([], capsys)
    assert rbac_rules(docs) == CLUSTER_WIDE_RBAC | leases("edgelb")
    assert not any(r[3] == "endpoints" for r in rbac_rules(docs))
    binding = one(docs, "ClusterRoleBinding")
    role = one(docs, "ClusterRole")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "edgelb", "namespace": "edgelb"}]
    role_binding = one(docs, "RoleBinding")
    assert role_binding["roleRef"]["name"] == one(docs, "Role")["metadata"]["name"]
    assert role_binding["subjects"] == binding["subjects"]
    assert workload(docs)["spec"]["template"]["spec"]["serviceAccountName"] == "edgelb"


def test_namespaced_rbac_grants_only_the_watched_namespaces(
    capsys: pytest.CaptureFixture[str],
) -> None:
    docs = render(["--watch-namespaces", "web,api", "--namespace", "proxy"], capsys)
    assert rbac_rules(docs) == (
        expand("ClusterRole", "", "", "nodes", WATCH)
        | expand("ClusterRole", "", "networking.k8s.io", "ingressclasses", WATCH)
        | namespaced_rbac("web") | namespaced_rbac("api") | leases("proxy")
    )
    sa = {"kind": "ServiceAccount", "name": "edgelb", "namespace": "proxy"}
    bindings = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert sorted((d["kind"], d["metadata"].get("namespace", "")) for d in bindings) == [
        ("ClusterRoleBinding", ""), ("RoleBinding", "api"), ("RoleBinding", "proxy"),
        ("RoleBinding", "web")]
    for b in bindings:
        assert b["subjects"] == [sa]
        ns = b["metadata"].get("namespace", "")
        role_kind = "Role" if ns else "ClusterRole"
        assert any(d["kind"] == role_kind and d["metadata"]["name"] == b["roleRef"]["name"]
                   and d["metadata"].get("namespace", "") == ns for d in docs), b
    # the proxy watches exactly what the RBAC covers
    config = parse_config(one(docs, "ConfigMap")["data"]["edgelb.yaml"])
    assert config.kubernetes is not None
    assert config.kubernetes.namespaces == ("web", "api")


GATEWAY_KINDS = ("gateways httproutes grpcroutes tlsroutes tcproutes referencegrants "
                 "backendtlspolicies")
GATEWAY_STATUS = ("gateways/status httproutes/status grpcroutes/status tlsroutes/status "
                  "tcproutes/status")
GATEWAY_GROUP = "gateway.networking.k8s.io"


def test_gateway_api_rbac_grows_by_exactly_the_verbs_it_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    config = write(tmp_path, """
        admin: {listen: "0.0.0.0:9100"}
        entrypoints: {http: {listen: "0.0.0.0:8080"}}
        watchers: {kubernetes: {enabled: true, gateway_api: true}}
    """)
    docs = render(["--config", config], capsys)
    assert rbac_rules(docs) == CLUSTER_WIDE_RBAC | leases("edgelb") | (
        expand("ClusterRole", "", GATEWAY_GROUP, f"gatewayclasses {GATEWAY_KINDS}", WATCH)
        | expand("ClusterRole", "", GATEWAY_GROUP, f"gatewayclasses/status {GATEWAY_STATUS}",
                 "patch")
        | expand("ClusterRole", "", "", "namespaces configmaps", WATCH))
    config = write(tmp_path, """
        admin: {listen: "0.0.0.0:9100"}
        entrypoints: {http: {listen: "0.0.0.0:8080"}}
        watchers: {kubernetes: {enabled: true, gateway_api: true, namespaces: [web]}}
    """)
    docs = render(["--config", config], capsys)
    assert rbac_rules(docs) == (
        expand("ClusterRole", "", "", "nodes namespaces", WATCH)
        | expand("ClusterRole", "", "networking.k8s.io", "ingressclasses", WATCH)
        | expand("ClusterRole", "", GATEWAY_GROUP, "gatewayclasses", WATCH)
        | expand("ClusterRole", "", GATEWAY_GROUP, "gatewayclasses/status", "patch")
        | namespaced_rbac("web") | leases("edgelb")
        | expand("Role", "web", GATEWAY_GROUP, GATEWAY_KINDS, WATCH)
        | expand("Role", "web", GATEWAY_GROUP, GATEWAY_STATUS, "patch")
        | expand("Role", "web", "", "configmaps", WATCH))


def test_a_gateway_class_of_our_controller_comes_with_gateway_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from watchers.kubernetes.gateway.resources import CONTROLLER as GATEWAY_CONTROLLER

    assert not [d for d in render([], capsys) if d["kind"] == "GatewayClass"]
    config = write(tmp_path, """
        admin: {listen: "0.0.0.0:9100"}
        entrypoints: {http: {listen: "0.0.0.0:8080"}}
        watchers: {kubernetes: {enabled: true, gateway_api: true, ingress_class: public}}
    """)
    docs = render(["--config", config], capsys)
    gc = one(docs, "GatewayClass")
    assert gc["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert gc["metadata"]["name"] == "public"
    assert gc["spec"] == {"controllerName": GATEWAY_CONTROLLER}
    kinds = [d["kind"] for d in docs]
    assert kinds.index("ClusterRole") < kinds.index("GatewayClass") < kinds.index("Deployment")


def test_cluster_scoped_names_do_not_collide_between_installs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    a = render(["--namespace", "team-a", "--ingress-class", "a"], capsys)
    b = render(["--namespace", "team-b", "--ingress-class", "b"], capsys)
    for kind in CLUSTER_WIDE_KINDS:
        assert {d["metadata"]["name"] for d in a if d["kind"] == kind}.isdisjoint(
            d["metadata"]["name"] for d in b if d["kind"] == kind), kind


# ---------------------------------------------------------------------------------------------
# The pod


def test_probes_and_metrics_use_the_admin_port_which_is_not_published(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = write(tmp_path, """
        admin: {listen: "0.0.0.0:9100"}
        entrypoints: {http: {listen: "0.0.0.0:8080"}}
        watchers: {kubernetes: {enabled: true}}
    """)
    for argv, admin_port in (([], 9090), (["--config", config], 9100)):
        docs = render(argv, capsys)
        c = container(docs)
        ports = {p["name"]: p for p in c["ports"]}
        assert ports["admin"]["containerPort"] == admin_port
        assert "hostPort" not in ports["admin"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        annotations = workload(docs)["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true",
                               "prometheus.io/port": str(admin_port),
                               "prometheus.io/path": "/metrics"}
        service_ports = one(docs, "Service")["spec"]["ports"]
        assert all(p["port"] != admin_port and p["targetPort"] != "admin"
                   for p in service_ports)


def test_pod_is_hardened_and_sized(capsys: pytest.CaptureFixture[str]) -> None:
    docs = render([], capsys)
    pod = workload(docs)["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "sysctls" not in pod["securityContext"]  # 8080/8443/9090 need no privilege
    assert not pod.get("hostNetwork")
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "128Mi"},
                              "limits": {"memory": "512Mi"}}
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                   "NODE_NAME": "spec.nodeName"}
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == \
        workload(docs)["spec"]["selector"]["matchLabels"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod["affinity"][
        "podAntiAffinity"]
    selector = workload(docs)["spec"]["selector"]["matchLabels"]
    labels = workload(docs)["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert one(docs, "Service")["spec"]["selector"] == selector
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector


@pytest.mark.parametrize(("shutdown", "sleep", "period"), [
    (None, "5", 45),                         # the default config: 5s + 5s + 30s + 5s
    ("{delay: 2500ms, grace: 1m}", "2.5", 70),  # ceil(2.5 + 2.5 + 60) + 5
    ("{delay: 10s, grace: 20s}", "10", 45),
    ("{delay: 0s, grace: 30s}", None, 35),
    ("{grace: 12s}", None, 17),               # the config's own default delay is 0
])
def test_prestop_and_termination_grace_follow_the_shutdown_config(
    shutdown: str | None, sleep: str | None, period: int,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    argv = []
    if shutdown is not None:
        argv = ["--config", write(tmp_path, f"""
            admin: {{listen: "0.0.0.0:9090"}}
            entrypoints: {{http: {{listen: "0.0.0.0:8080"}}}}
            watchers: {{kubernetes: {{}}}}
            shutdown: {shutdown}
        """)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    docs = list(yaml.safe_load_all(out))
    pod = workload(docs)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == period
    lifecycle = container(docs).get("lifecycle")
    if sleep is None:
        assert lifecycle is None
        assert "shutdown.delay is 0" in err
    else:
        assert lifecycle == {"preStop": {"exec": {"command": ["sleep", sleep]}}}
        assert err == ""


def test_termination_grace_covers_prestop_and_the_whole_drain() -> None:
    for delay, grace in ((0, 0), (5, 30), (0.2, 0.3), (7.5, 61)):
        period = m.termination_grace(delay, grace)
        # preStop sleeps `delay`; after SIGTERM edgelb is unready for `delay`, then drains
        assert period >= delay + delay + grace + m.KILL_MARGIN
        assert period == math.ceil(2 * delay + grace) + m.KILL_MARGIN


# ---------------------------------------------------------------------------------------------
# Options


def test_every_option_is_honoured(capsys: pytest.CaptureFixture[str]) -> None:
    docs = render(ALL_OPTIONS, capsys)
    for d in docs:
        if d["kind"] not in CLUSTER_WIDE_KINDS | {"Role", "RoleBinding"}:
            assert d["metadata"]["namespace"] == "proxy", d["kind"]
    assert one(docs, "Namespace")["metadata"]["name"] == "proxy"
    assert one(docs, "Deployment")["spec"]["replicas"] == 3
    assert container(docs)["image"] == "registry.example.com/edgelb:1.2.3"
    assert one(docs, "IngressClass")["metadata"]["name"] == "public"
    service = one(docs, "Service")
    assert service["spec"]["type"] == "NodePort"
    assert "externalTrafficPolicy" not in service["spec"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        (80, "http"), (443, "https"), (10000, "static-10000"), (10001, "static-10001")]
    container_ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    assert container_ports == {"admin": 9090, "http": 8080, "https": 8443,
                               "static-10000": 10000, "static-10001": 10001}
    config = parse_config(one(docs, "ConfigMap")["data"]["edgelb.yaml"])
    assert config.kubernetes is not None
    assert config.kubernetes.ingress_class == "public"
    assert config.kubernetes.namespaces == ("web", "api")
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] == "Role"} == {
        "web", "api", "proxy"}


def test_cluster_ip_service(capsys: pytest.CaptureFixture[str]) -> None:
    service = one(render(["--service-type", "ClusterIP"], capsys), "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert "externalTrafficPolicy" not in service["spec"]


def test_system_namespace_is_not_rendered(capsys: pytest.CaptureFixture[str]) -> None:
    docs = render(["--namespace", "default"], capsys)
    assert not [d for d in docs if d["kind"] == "Namespace"]
    assert one(docs, "Deployment")["metadata"]["namespace"] == "default"


def test_daemonset_variant(capsys: pytest.CaptureFixture[str]) -> None:
    docs = render(["--kind", "daemonset", "--ports", "10000"], capsys)
    kinds = [d["kind"] for d in docs]
    assert "DaemonSet" in kinds and "Deployment" not in kinds
    # drains skip daemonset pods; a PodDisruptionBudget cannot govern them
    assert "PodDisruptionBudget" not in kinds
    ds = one(docs, "DaemonSet")
    assert "replicas" not in ds["spec"]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": 1}
    pod = ds["spec"]["template"]["spec"]
    assert not pod.get("hostNetwork")  # host ports instead: the admin port stays off the node
    assert "dnsPolicy" not in pod
    assert "affinity" not in pod
    ports = {p["name"]: (p["containerPort"], p.get("hostPort")) for p in container(docs)["ports"]}
    assert ports == {"admin": (9090, None), "http": (8080, 80), "https": (8443, 443),
                     "static-10000": (10000, 10000)}
    assert container(docs)["readinessProbe"]["httpGet"]["port"] == "admin"


def test_config_file_drives_ports_and_is_embedded_verbatim(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = textwrap.dedent("""\
        # a comment that must survive
        admin:
          listen: 0.0.0.0:9100
        entrypoints:
          web: {listen: 0.0.0.0:80}
          my_tls.v2: {listen: "[::]:8443"}
          a_rather_long_name: {listen: 0.0.0.0:8081}
        services:
          - name: db
            listen: 0.0.0.0:5432
            mode: tcp
            backends: [10.0.0.1:5432]
        watchers:
          kubernetes: {ingress_class: internal, namespaces: [web]}
        shutdown: {delay: 1s, grace: 10s}
    """)
    path = write(tmp_path, text)
    docs = render(["--config", path, "--ports", "5432,10000"], capsys)
    embedded = one(docs, "ConfigMap")["data"]["edgelb.yaml"]
    assert embedded == text
    assert parse_config(embedded) == parse_config(text)
    assert one(docs, "IngressClass")["metadata"]["name"] == "internal"
    assert rbac_rules(docs) >= namespaced_rbac("web")
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    # entrypoint names become port names (15 of a-z, 0-9, '-'), else ep-<port>
    assert ports == {"admin": 9100, "web": 80, "my-tls-v2": 8443, "ep-8081": 8081,
                     "static-5432": 5432, "static-10000": 10000}
    service_ports = {p["name"]: p["port"] for p in one(docs, "Service")["spec"]["ports"]}
    assert service_ports == {"web": 80, "my-tls-v2": 8443, "ep-8081": 8081,
                             "static-5432": 5432, "static-10000": 10000}
    # port 80 inside the pod: a non-root process may bind it only with this safe sysctl
    sysctls = workload(docs)["spec"]["template"]["spec"]["securityContext"]["sysctls"]
    assert sysctls == [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_any_text_survives_the_configmap_quoting(text: str) -> None:
    for rendered in (m._block(text, 2), m._quote(text)):
        assert yaml.safe_load(f"data:\n  k: {rendered}\n") == {"data": {"k": text}}


def test_windows_line_endings_and_trailing_blank_lines_are_normalised(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "crlf.yaml"
    path.write_bytes(b'admin: {listen: "0.0.0.0:9090"}\r\nwatchers: {kubernetes: {}}\r\n\r\n\r\n')
    embedded = one(render(["--config", str(path)], capsys), "ConfigMap")["data"]["edgelb.yaml"]
    assert embedded == 'admin: {listen: "0.0.0.0:9090"}\nwatchers: {kubernetes: {}}\n'


# ---------------------------------------------------------------------------------------------
# Errors: exit 1, nothing on stdout, every problem on stderr naming the file and the key


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code, out, err = run(argv, capsys)
    assert code == 1
    assert out == ""
    return err


def test_a_bad_config_names_the_file_and_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write(tmp_path, """
        admin: {listen: "0.0.0.0:9090"}
        shutdown: {delay: soon}
        watchers: {kubernetes: {ingres_class: edgelb}}
    """)
    err = fails(["--config", path], capsys)
    assert err.startswith(f"{path}: 2 errors\n")
    assert "shutdown.delay: 'soon' is not a duration" in err
    assert "watchers.kubernetes.ingres_class: unknown key; did you mean 'ingress_class'?" in err


def test_an_unreadable_config_names_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "nope.yaml")
    err = fails(["--config", missing], capsys)
    assert f"cannot read {missing}" in err


@pytest.mark.parametrize(("config", "key"), [
    ("entrypoints: {http: {listen: '0.0.0.0:8080'}}", "admin.listen (default 127.0.0.1:9090)"),
    ("admin: {listen: '127.0.0.1:9090'}", "admin.listen: 127.0.0.1:9090 is not reachable"),
    ("admin: {listen: '0.0.0.0:9090'}\nentrypoints: {http: {listen: '127.0.0.1:80'}}",
     "entrypoints.http.listen: 127.0.0.1:80"),
    ("admin: {listen: '0.0.0.0:9090'}\nservices: [{name: db, listen: 'localhost:5432', "
     "mode: tcp, backends: []}]", "services[0].listen (db)"),
    ("admin: {listen: '0.0.0.0:9090'}\nentrypoints: {http: {listen: '0.0.0.0:8080'}, "
     "web: {listen: '0.0.0.0:80'}}", "entrypoints.web.listen: public port 80"),
    ("admin: {listen: '0.0.0.0:9090'}\nwatchers: {kubernetes: {ingress_class: other}}",
     "watchers.kubernetes.ingress_class: is 'other' but --ingress-class is 'edgelb'"),
    ("admin: {listen: '0.0.0.0:9090'}\nwatchers: {kubernetes: {namespaces: [a]}}",
     "watchers.kubernetes.namespaces: is [a] but --watch-namespaces is b"),
])
def test_a_config_a_pod_cannot_serve_is_refused_by_key(
    config: str, key: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write(tmp_path, config + "\n")
    argv = ["--config", path]
    if "ingress_class" in config:
        argv += ["--ingress-class", "edgelb"]
    if "namespaces" in config:
        argv += ["--watch-namespaces", "b"]
    err = fails(argv, capsys)
    assert err.startswith(f"{path}: 1 error\n"), err
    assert key in err, err


def test_option_conflicts_are_errors(capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(["--kind", "daemonset", "--replicas", "3"], capsys)
    assert "--replicas: a daemonset runs one pod per node" in err
    err = fails(["--ports", "9090"], capsys)
    assert "--ports: 9090 is the admin port" in err
    err = fails(["--ports", "8080,10000"], capsys)
    assert "--ports: 8080 is already the port of entrypoints.http.listen" in err
    err = fails(["--ports", "80"], capsys)
    assert "--ports: public port 80 is also that of entrypoints.http.listen" in err


@pytest.mark.parametrize("argv", [
    ["--ports", "10000,abc"], ["--ports", "70000"], ["--namespace", "Bad_NS"],
    ["--watch-namespaces", ","], ["--replicas", "0"], ["--kind", "statefulset"],
    ["--service-type", "ExternalName"], ["--ingress-class", "UPPER"],
])
def test_malformed_options_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_a_config_without_the_kubernetes_watcher_warns(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write(tmp_path, """
        admin: {listen: "0.0.0.0:9090"}
        services: [{name: web, listen: "0.0.0.0:10000", backends: [10.0.0.1:80]}]
        shutdown: {delay: 3s}
    """)
    code, out, err = run(["--config", path], capsys)
    assert code == 0
    assert "does not enable watchers.kubernetes" in err
    docs = list(yaml.safe_load_all(out))
    assert one(docs, "IngressClass")["metadata"]["name"] == "edgelb"


# ---------------------------------------------------------------------------------------------
# Packaging: the templates are found the way the status page's template is


def test_templates_ship_in_the_templates_package() -> None:
    root = resources.files(m.TEMPLATE_PACKAGE).joinpath(m.TEMPLATE_DIR)
    names = {p.name for p in root.iterdir() if p.name.endswith(".yaml.j2")}
    assert names == {*m.TEMPLATES, m.CONFIG_TEMPLATE}


# ---------------------------------------------------------------------------------------------
# Schema validation: kubernetes-validate --strict (offline schemas of current Kubernetes)

README_COMBINATIONS = [
    [],
    ["--config", "{config}", "--ports", "10000,10001"],
    ["--kind", "daemonset", "--service-type", "ClusterIP"],
    ["--watch-namespaces", "web,api"],
    ["--kind", "daemonset", "--watch-namespaces", "web", "--service-type", "NodePort",
     "--namespace", "default", "--ingress-class", "public",
     "--image", "registry.example.com/edgelb:1.2.3"],
    ["--replicas", "3", "--service-type", "NodePort", "--ports", "10000"],
]


@pytest.mark.parametrize("argv", README_COMBINATIONS, ids=lambda a: " ".join(a) or "defaults")
def test_output_passes_kubernetes_validate_strict(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    assert tool.exists(), "kubernetes-validate is in the test extra; run `make test`"
    config = tmp_path / "edgelb.yaml"
    config.write_text(
        "admin: {listen: 0.0.0.0:9090}\n"
        "entrypoints: {http: {listen: 0.0.0.0:8080}}\n"
        "watchers: {kubernetes: {enabled: true}}\n"
        "shutdown: {delay: 5s, grace: 20s}\n"
    )
    args = [a.format(config=config) for a in argv]
    assert cli_main(["manifests", *args]) == 0
    out = tmp_path / "out.yaml"
    out.write_text(capsys.readouterr().out)
    proc = subprocess.run([str(tool), "--strict", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checked = proc.stdout.count(" passed for resource ")
    assert checked == len([d for d in yaml.safe_load_all(out.read_text()) if d])


# ---------------------------------------------------------------------------------------------
# --service-monitor: a ServiceMonitor (Prometheus Operator CRD) and the headless Service over
# the admin port it selects. The CRD is not in the Kubernetes schemas nor the client's models:
# it is checked against the fields of monitoring.coreos.com/v1 it uses (a strict subset of the
# CRD's schema: any other field, a wrong type or a missing required one fails).

_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?)$"}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "additionalProperties": False,
                     "required": ["name", "namespace"],
                     "properties": {"name": {"type": "string", "pattern": m._DNS_LABEL.pattern},
                                    "namespace": {"type": "string"}, "labels": _STRINGS}},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": _STRINGS}},
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"any": {"type": "boolean"},
                                                     "matchNames": {"type": "array",
                                                                    "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"port": {"type": "string"},
                                   "path": {"type": "string", "pattern": "^/"},
                                   "scheme": {"enum": ["http", "https"]},
                                   "interval": _DURATION, "scrapeTimeout": _DURATION}}},
            },
        },
    },
}

SERVICE_MONITOR_COMBINATIONS = [
    ["--service-monitor"],
    ["--service-monitor", "--kind", "daemonset", "--namespace", "proxy", "--config", "{config}"],
    ["--service-monitor-labels", "release=kube-prometheus-stack,team=edge"],
]


def _service_monitor_docs(argv: list[str], tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    config = write(tmp_path, """
        admin: {listen: "0.0.0.0:9100"}
        entrypoints: {http: {listen: "0.0.0.0:8080"}}
        watchers: {kubernetes: {enabled: true}}
        shutdown: {delay: 5s}
    """)
    return render([a.format(config=config) for a in argv], capsys)


@pytest.mark.parametrize("argv", SERVICE_MONITOR_COMBINATIONS, ids=" ".join)
def test_service_monitor_scrapes_the_admin_port_of_every_pod(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import jsonschema

    docs = _service_monitor_docs(argv, tmp_path, capsys)
    monitor = one(docs, "ServiceMonitor")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    assert docs[-1] is monitor  # last: whatever else fails to apply, it is not in the way
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    public, metrics = services["edgelb"], services["edgelb-metrics"]
    ns = workload(docs)["metadata"]["namespace"]
    assert monitor["metadata"]["namespace"] == metrics["metadata"]["namespace"] == ns
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [ns]}
    # the monitor selects the metrics Service, and only it
    wanted = monitor["spec"]["selector"]["matchLabels"]
    selected = [name for name, s in services.items()
                if wanted.items() <= s["metadata"]["labels"].items()]
    assert selected == ["edgelb-metrics"]
    # which selects the proxy's pods, on their admin port: the one the probes use
    pod_labels = workload(docs)["spec"]["template"]["metadata"]["labels"]
    assert metrics["spec"]["selector"].items() <= pod_labels.items()
    assert metrics["spec"]["clusterIP"] == "None" and metrics["spec"]["type"] == "ClusterIP"
    admin = next(p for p in container(docs)["ports"] if p["name"] == "admin")
    assert metrics["spec"]["ports"] == [{"name": "admin", "port": admin["containerPort"],
                                         "targetPort": "admin", "protocol": "TCP"}]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "admin", "path": "/metrics"}
    assert monitor["spec"]["jobLabel"] in metrics["metadata"]["labels"]
    # the admin port is still never published
    assert all(p["targetPort"] != "admin" for p in public["spec"]["ports"])
    assert model_problems(metrics) is None
    assert apply_order_problems(docs) == []


def test_service_monitor_labels_and_their_errors(capsys: pytest.CaptureFixture[str]) -> None:
    docs = render(["--service-monitor-labels", "release=kps,example.com/team=edge"], capsys)
    labels = one(docs, "ServiceMonitor")["metadata"]["labels"]
    assert labels["release"] == "kps" and labels["example.com/team"] == "edge"
    assert "ServiceMonitor" not in [d["kind"] for d in render([], capsys)]
    for bad in ("release", "re lease=x", "release=a b", "=x", ","):
        with pytest.raises(SystemExit):
            parse_args(["--service-monitor-labels", bad])
        assert "--service-monitor-labels" in capsys.readouterr().err


def test_the_service_monitor_schema_check_notices_a_misspelled_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import jsonschema

    monitor = one(render(["--service-monitor"], capsys), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)


@pytest.mark.parametrize("argv", SERVICE_MONITOR_COMBINATIONS[:2], ids=" ".join)
def test_service_monitor_output_passes_kubernetes_validate_strict(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every built-in kind passes; the ServiceMonitor, a CRD, is the one document it has no
    schema for (the test above checks it)."""
    tool = Path(sys.executable).parent / "kubernetes-validate"
    docs = _service_monitor_docs(argv, tmp_path, capsys)
    out = tmp_path / "out.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run([str(tool), "--strict", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" passed for resource ") == len(docs) - 1
    assert "service/edgelb-metrics" in proc.stdout
