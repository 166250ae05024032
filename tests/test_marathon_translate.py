"""Marathon apps -> Snapshot: every marathon-lb label edgelb reads (good and bad values), the
networking modes in Marathon 1.4 and 1.5+ JSON, task states, health results, groups, service
names, conflicts between apps, and robustness against any JSON in place of the apps."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgelb.net.acl import parse_auth, parse_source_filter, sha_crypt
from edgelb.ops.config import policy_from_annotations
from watchers.marathon.labels import parse_bool
from watchers.marathon.translate import (
    Options,
    Problem,
    Translation,
    certificate_origin,
    notice_problems,
    service_name,
    translate,
)
from watchers.model import Address, Backend, Notice, Policy, Route

HASH = sha_crypt("s3cret", "$5$rounds=1000$saltsalt")
G = {"HAPROXY_GROUP": "external"}

# -- app builders (the JSON of GET /v2/apps?embed=apps.tasks) ---------------------------------


def task(i: int, *, ports: tuple[int, ...] | None = None, state: str | None = "TASK_RUNNING",
         alive: list[bool] | None = None, ip: str | None = None, **extra: Any) -> dict:
    t: dict[str, Any] = {"id": f"web.t{i}", "host": f"10.0.0.{i}",
                         "ports": list(ports if ports is not None else (31000 + i,))}
    if state is not None:
        t["state"] = state
    if alive is not None:
        t["healthCheckResults"] = [{"alive": a, "consecutiveFailures": 0} for a in alive]
    t["ipAddresses"] = [{"ipAddress": ip or f"9.0.0.{i}", "protocol": "IPv4"}]
    t.update(extra)
    return t


def app(app_id: str = "/shop/web", labels: dict | None = None, *, ports: tuple = (10000,),
        tasks: list | None = None, net: str = "host", old: bool = False, **extra: Any) -> dict:
    """An app in one of six networking shapes: host, bridge or container networking, each in
    the Marathon 1.5+ (`networks`, `container.portMappings`) or 1.4 (`old`) JSON."""
    a: dict[str, Any] = {"id": app_id, "labels": dict(G if labels is None else labels),
                         "instances": 1, "cpus": 1,
                         "tasks": tasks if tasks is not None else [task(1), task(2)]}
    mappings = [{"containerPort": 8080 + n, "hostPort": 0, "servicePort": p, "protocol": "tcp"}
                for n, p in enumerate(ports)]
    if net == "host":
        if old:
            a["ports"] = list(ports)
        else:
            a["portDefinitions"] = [{"port": p, "protocol": "tcp"} for p in ports]
    elif net == "bridge":
        if old:
            a["container"] = {"type": "DOCKER", "docker": {"network": "BRIDGE",
                                                           "portMappings": mappings}}
        else:
            a["container"] = {"type": "DOCKER", "portMappings": mappings}
            a["networks"] = [{"mode": "container/bridge"}]
    elif net == "container":
        if old:  # IP-per-task, Marathon 1.4: ipAddress.discovery, no service ports
            a["ipAddress"] = {"networkName": "dcos", "discovery": {"ports": [
                {"number": 8080 + n, "name": f"p{n}", "protocol": "tcp"}
                for n in range(len(ports))]}}
            a["container"] = {"type": "DOCKER", "docker": {"network": "USER"}}
        else:
            a["container"] = {"type": "DOCKER", "portMappings": mappings}
            a["networks"] = [{"mode": "container", "name": "dcos"}]
    a.update(extra)
    return a


def tr(*apps: Any, **kw: Any) -> Translation:
    return translate(list(apps), Options(**kw), read_policy=policy_from_annotations)


def only(t: Translation):
    assert len(t.snapshot.services) == 1, (t.snapshot.services, t.problems)
    return t.snapshot.services[0]


def messages(t: Translation, app_id: str = "/shop/web") -> list[str]:
    return [p.message for p in t.problems if p.app == app_id]


def skipped(t: Translation, app_id: str = "/shop/web") -> bool:
    return app_id not in t.apps.values()


def with_labels(**labels: str) -> dict:
    return {**G, **labels}


# -- the minimal case and service names -------------------------------------------------------


def test_host_networking_minimal_case_is_a_tcp_service_on_the_service_port() -> None:
    t = tr(app())
    svc = only(t)
    assert svc.name == "shop_web_10000"
    assert (svc.mode, svc.listen) == ("tcp", Address("0.0.0.0", 10000))
    assert svc.backends == (Backend("10.0.0.1", 31001, 1.0), Backend("10.0.0.2", 31002, 1.0))
    assert t.snapshot.routes == () and t.problems == ()
    assert t.snapshot.source == "marathon"
    assert dict(t.apps) == {"shop_web_10000": "/shop/web"} and t.exposed == 1


@pytest.mark.parametrize(("app_id", "port", "index", "name"), [
    ("/shop/web", 10000, 0, "shop_web_10000"),
    ("/web", 10001, 1, "web_10001"),
    ("/a/b/c", None, 0, "a_b_c_p0"),
    ("/a/b/c", None, 2, "a_b_c_p2"),
])
def test_service_names_follow_marathon_lb_backends(app_id, port, index, name) -> None:
    assert service_name(app_id, port, index) == name


def test_port_and_bind_addr_labels_choose_the_listen_address() -> None:
    svc = only(tr(app(labels=with_labels(HAPROXY_0_PORT="8080", HAPROXY_0_BIND_ADDR="10.1.2.3"))))
    assert svc.listen == Address("10.1.2.3", 8080)
    assert svc.name == "shop_web_10000"  # named after the service port still
    svc = only(tr(app(labels=with_labels(HAPROXY_0_BIND_ADDR="::"))))
    assert svc.listen == Address("::", 10000)


def test_every_port_index_is_its_own_service() -> None:
    t = tr(app(ports=(10000, 10001), tasks=[task(1, ports=(31000, 31001))],
               labels=with_labels(HAPROXY_1_MODE="http")))
    a, b = t.snapshot.services
    assert (a.name, a.mode, a.backends[0].port) == ("shop_web_10000", "tcp", 31000)
    assert (b.name, b.mode, b.backends[0].port) == ("shop_web_10001", "http", 31001)


# -- networking modes, old and new JSON ---------------------------------------------------------


@pytest.mark.parametrize(("net", "old", "host", "port", "name"), [
    ("host", False, "10.0.0.1", 31001, "shop_web_10000"),
    ("host", True, "10.0.0.1", 31001, "shop_web_10000"),
    ("bridge", False, "10.0.0.1", 31001, "shop_web_10000"),
    ("bridge", True, "10.0.0.1", 31001, "shop_web_10000"),
    ("container", False, "9.0.0.1", 8080, "shop_web_10000"),
    ("container", True, "9.0.0.1", 8080, "shop_web_p0"),
])
def test_addresses_by_networking_mode(net, old, host, port, name) -> None:
    labels = with_labels(HAPROXY_0_VHOST="web.example.com")
    t = tr(app(net=net, old=old, labels=labels, tasks=[task(1)]))
    svc = only(t)
    assert svc.name == name
    assert [(b.host, b.port) for b in svc.backends] == [(host, port)]
    assert t.snapshot.routes == (Route("web.example.com", "/", name),)
    # an old IP-per-task app has no service port: routed only, nothing bound
    assert (svc.listen is None) == (net == "container" and old)


def test_old_ip_per_task_app_without_vhost_or_port_is_left_out_and_told_why() -> None:
    t = tr(app(net="container", old=True))
    assert t.snapshot.services == ()
    [msg] = messages(t)
    assert "no service port" in msg and "HAPROXY_0_PORT" in msg


def test_ip_per_task_app_with_a_port_label_is_bound_there() -> None:
    svc = only(tr(app(net="container", old=True, labels=with_labels(HAPROXY_0_PORT="9000"))))
    assert svc.listen == Address("0.0.0.0", 9000) and svc.backends[0].port == 8080


@pytest.mark.parametrize(("field", "expected"), [
    ({"portMappings": [{"containerPort": 80, "servicePort": 10005}]}, 10005),
    ({"portMappings": [{"containerPort": 80, "servicePort": 0}],
      "portDefinitions": [{"port": 10006}]}, 10006),
])
def test_service_port_comes_from_port_mappings_then_port_definitions(field, expected) -> None:
    a = app(net="bridge", ports=(1,))
    a["container"]["portMappings"] = field["portMappings"]
    if "portDefinitions" in field:
        a["portDefinitions"] = field["portDefinitions"]
    assert only(tr(a)).listen == Address("0.0.0.0", expected)


def test_docker_user_network_with_port_mappings_is_ip_per_task() -> None:
    a = app(net="bridge", old=True)
    a["container"]["docker"]["network"] = "USER"
    svc = only(tr(a, health=False))
    assert [(b.host, b.port) for b in svc.backends] == [("9.0.0.1", 8080), ("9.0.0.2", 8080)]


def test_tasks_without_an_address_are_skipped_and_only_all_missing_is_a_problem() -> None:
    t = tr(app(tasks=[task(1), task(2, ports=())]))
    assert [b.port for b in only(t).backends] == [31001] and t.problems == ()
    t = tr(app(tasks=[task(1, ports=()), task(2, host="")]))
    assert only(t).backends == ()
    assert any("none of its 2 running task(s)" in m for m in messages(t))


# -- task states and health ---------------------------------------------------------------------


@pytest.mark.parametrize(("state", "ready", "terminating"), [
    ("TASK_RUNNING", True, False),
    (None, True, False),  # old Marathons send no state
    ("TASK_KILLING", False, True),  # drained: no new request, in-flight ones finish
    ("TASK_STAGING", None, None),
    ("TASK_STARTING", None, None),
    ("TASK_FAILED", None, None),
    ("TASK_KILLED", None, None),
    ("TASK_LOST", None, None),
    ("TASK_UNREACHABLE", None, None),
])
def test_task_states(state, ready, terminating) -> None:
    backends = only(tr(app(tasks=[task(1, state=state)]))).backends
    if ready is None:
        assert backends == ()
    else:
        [b] = backends
        assert (b.ready, b.terminating) == (ready, terminating)


CHECKS = [{"protocol": "HTTP", "path": "/health", "portIndex": 0}]


@pytest.mark.parametrize(("checks", "alive", "health", "routed"), [
    ([], None, True, True),  # no health checks: running is enough
    (CHECKS, [True], True, True),
    (CHECKS, [False, True], True, True),  # some result alive
    (CHECKS, [False], True, False),
    (CHECKS, [], True, False),  # an empty list: not yet healthy
    (CHECKS, None, True, False),  # no results yet
    (CHECKS, [False], False, True),  # health: false ignores the results
    (CHECKS, None, False, True),
])
def test_health_results(checks, alive, health, routed) -> None:
    t = tr(app(tasks=[task(1, alive=alive)], healthChecks=checks), health=health)
    assert bool(only(t).backends) == routed


def test_a_task_not_yet_ready_in_a_deployment_waits() -> None:
    results = [{"taskId": "web.t1", "ready": False}, {"taskId": "web.t2", "ready": True}]
    t = tr(app(readinessCheckResults=results))
    assert [b.host for b in only(t).backends] == ["10.0.0.2"]


# -- groups -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("labels", "group", "exposed"), [
    ({"HAPROXY_GROUP": "external"}, "external", True),
    ({"HAPROXY_GROUP": "internal"}, "external", False),
    ({"HAPROXY_GROUP": "internal, external"}, "external", True),  # a comma list
    ({"HAPROXY_GROUP": "internal,"}, "external", False),
    ({"HAPROXY_GROUP": "*"}, "external", True),  # the app's * matches every proxy
    ({"HAPROXY_GROUP": "internal"}, "*", True),  # the proxy's * matches every app
    ({}, "*", True),  # ...labelled or not, as marathon-lb --group '*'
    ({}, "external", False),  # no group label: not exposed, not a problem
    ({"HAPROXY_GROUP": "a"}, "b,a", True),  # several groups on the proxy
    ({"HAPROXY_GROUP": "internal", "HAPROXY_0_GROUP": "external"}, "external", True),
    ({"HAPROXY_GROUP": "external", "HAPROXY_0_GROUP": "internal"}, "external", False),
    ({"HAPROXY_0_GROUP": "external"}, "external", True),
])
def test_group_matching(labels, group, exposed) -> None:
    t = tr(app(labels=labels), group=group)
    assert bool(t.snapshot.services) == exposed
    assert t.problems == ()


def test_per_port_group_exposes_only_that_port() -> None:
    labels = {"HAPROXY_GROUP": "internal", "HAPROXY_1_GROUP": "external"}
    t = tr(app(labels=labels, ports=(10000, 10001), tasks=[task(1, ports=(1, 2))]))
    assert [s.name for s in t.snapshot.services] == ["shop_web_10001"]


@pytest.mark.parametrize(("value", "exposed", "problem"), [
    ("false", False, False), ("False", False, False), ("true", True, False),
    ("0", False, False), ("maybe", False, True),
])
def test_enabled_label(value, exposed, problem) -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_ENABLED=value)))
    assert bool(t.snapshot.services) == exposed
    assert bool(messages(t)) == problem


# -- modes, vhosts and paths ------------------------------------------------------------------


def test_vhost_routes_on_the_entrypoints_and_binds_the_service_port_too() -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_VHOST="Web.Example.com, api.example.com")))
    svc = only(t)
    assert (svc.mode, svc.listen) == ("http", Address("0.0.0.0", 10000))
    assert t.snapshot.routes == (Route("api.example.com", "/", "shop_web_10000"),
                                 Route("web.example.com", "/", "shop_web_10000"))


def test_path_label_is_a_prefix_under_the_vhost() -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_VHOST="web.example.com", HAPROXY_0_PATH="/api")))
    assert t.snapshot.routes == (Route("web.example.com", "/api", "shop_web_10000"),)


@pytest.mark.parametrize(("labels", "mode", "error"), [
    ({"HAPROXY_0_MODE": "http"}, "http", None),
    ({"HAPROXY_0_MODE": "TCP"}, "tcp", None),
    ({"HAPROXY_0_MODE": "udp"}, None, "HAPROXY_0_MODE: 'udp' is not a mode"),
    ({"HAPROXY_0_MODE": "tcp", "HAPROXY_0_VHOST": "a.example"}, None, "which needs http"),
    ({"HAPROXY_0_VHOST": "not a host"}, None, "HAPROXY_0_VHOST: 'not a host' is not a host"),
    ({"HAPROXY_0_VHOST": " , "}, None, "HAPROXY_0_VHOST: is empty"),
    ({"HAPROXY_0_PATH": "/api"}, None, "HAPROXY_0_PATH: a path is routed under a host"),
    ({"HAPROXY_0_VHOST": "a.example", "HAPROXY_0_PATH": "api"}, None, "not a path prefix"),
    ({"HAPROXY_0_PORT": "70000"}, None, "HAPROXY_0_PORT: '70000' is not a port"),
    ({"HAPROXY_0_PORT": "http"}, None, "HAPROXY_0_PORT: 'http' is not a port"),
    ({"HAPROXY_0_BIND_ADDR": "localhost"}, None, "HAPROXY_0_BIND_ADDR: 'localhost' is not"),
    ({"HAPROXY_0_BACKEND_WEIGHT": "heavy"}, None, "HAPROXY_0_BACKEND_WEIGHT: 'heavy'"),
])
def test_exposure_labels_good_and_bad(labels, mode, error) -> None:
    t = tr(app(labels=with_labels(**labels)))
    if error is None:
        assert only(t).mode == mode and t.problems == ()
    else:
        assert skipped(t)
        [msg] = messages(t)
        assert error in msg and msg.endswith("the app is not exposed"), msg


# -- policy labels ------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "balance", "hash_key", "note"), [
    ("roundrobin", "round-robin", "source", None),
    ("static-rr", "round-robin", "source", None),
    ("leastconn", "least-connections", "source", None),
    ("source", "hash", "source", None),
    ("hdr(X-User)", "hash", "header:X-User", None),
    ("uri", "least-loaded", "source", "'uri' algorithm has no edgelb equivalent"),
    ("url_param userid", "least-loaded", "source", "'url_param' algorithm"),
])
def test_balance_label(value, balance, hash_key, note) -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_BALANCE=value)))
    policy = only(t).policy
    assert (policy.balance, policy.hash_key) == (balance, hash_key)
    assert [note in m for m in messages(t)] == ([True] if note else [])


def test_balance_label_that_is_no_algorithm_skips_the_app() -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_BALANCE="fastest")))
    assert skipped(t) and "'fastest' is not a balance algorithm" in messages(t)[0]


@pytest.mark.parametrize(("labels", "field", "value"), [
    ({"HAPROXY_0_STICKY": "true"}, "sticky", True),
    ({"HAPROXY_0_STICKY": "false"}, "sticky", False),
    ({"HAPROXY_0_REDIRECT_TO_HTTPS": "true"}, "redirect_to_https", True),
    ({"HAPROXY_0_REDIRECT_TO_HTTPS": "false"}, "redirect_to_https", False),
    ({"HAPROXY_0_USE_HSTS": "true"}, "hsts", 15768000),  # marathon-lb's max-age, six months
    ({"HAPROXY_0_USE_HSTS": "false"}, "hsts", 0),
])
def test_http_policy_labels(labels, field, value) -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_VHOST="a.example", **labels)))
    assert getattr(only(t).policy, field) == value and t.problems == ()


@pytest.mark.parametrize("name", ["STICKY", "REDIRECT_TO_HTTPS", "USE_HSTS"])
def test_http_policy_labels_take_true_or_false(name) -> None:
    t = tr(app(labels=with_labels(**{f"HAPROXY_0_{name}": "sometimes"})))
    assert skipped(t) and f"HAPROXY_0_{name}: 'sometimes' is not true or false" in messages(t)[0]


@pytest.mark.parametrize("name", ["STICKY", "REDIRECT_TO_HTTPS", "USE_HSTS"])
def test_http_policy_labels_on_a_tcp_port_are_ignored_and_told(name) -> None:
    t = tr(app(labels=with_labels(**{f"HAPROXY_0_{name}": "true"})))
    assert only(t).policy == Policy()
    assert "applies to http mode" in messages(t)[0]


def test_redirect_without_a_tls_entrypoint_is_ignored_and_told() -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_VHOST="a.example", HAPROXY_0_REDIRECT_TO_HTTPS="1")),
           tls_entrypoint=False)
    assert only(t).policy.redirect_to_https is False
    assert "no TLS entrypoint" in messages(t)[0]


def test_auth_label_builds_the_config_files_credentials() -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_VHOST="a.example",
                                  HAPROXY_0_AUTH=f"shop:alice:{HASH}")))
    expected, errs = parse_auth({"realm": "shop", "users": [f"alice:{HASH}"]}, "auth")
    assert not errs and only(t).policy.auth == expected
    assert t.problems == ()


def test_auth_label_takes_several_users() -> None:
    other = sha_crypt("other", "$5$rounds=1000$pepper")
    for value in (f"shop:alice:{HASH},shop:bob:{other}", f"shop:alice:{HASH}, bob:{other}"):
        t = tr(app(labels=with_labels(HAPROXY_0_VHOST="a.example", HAPROXY_0_AUTH=value)))
        auth = only(t).policy.auth
        assert (auth.realm, sorted(auth.users)) == ("shop", ["alice", "bob"])


@pytest.mark.parametrize(("value", "error"), [
    ("alice:" + HASH, "not realm:user:HASH"),
    (f"shop:alice:{HASH},other:bob:{HASH}", "one realm per port"),
    ("shop:alice:plaintext", "HAPROXY_0_AUTH"),
    ("", "is empty"),
])
def test_bad_auth_label_skips_the_app(value, error) -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_VHOST="a.example", HAPROXY_0_AUTH=value)))
    assert skipped(t)
    assert any(error in m for m in messages(t)), messages(t)
    assert all("plaintext" not in m for m in messages(t))  # a password is never repeated


def test_network_allowed_acl_is_the_sources_policy() -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_BACKEND_NETWORK_ALLOWED_ACL="10.0.0.0/8 192.168.1.1")))
    expected, _ = parse_source_filter("10.0.0.0/8 192.168.1.1", "sources")
    assert only(t).policy.sources == expected
    t = tr(app(labels=with_labels(HAPROXY_0_BACKEND_NETWORK_ALLOWED_ACL="10.0.0.0/8 nowhere")))
    assert skipped(t)
    assert messages(t)[0].startswith("HAPROXY_0_BACKEND_NETWORK_ALLOWED_ACL")


HTTP_OPTIONS = ("  option forwardfor\n"
                "  http-request add-header X-Forwarded-Proto https if { ssl_fc }\n"
                "  timeout server 30s\n"
                "  timeout http-request 5000\n"
                "  timeout client 2m\n")


def test_timeouts_in_option_templates_map_to_the_policy() -> None:
    labels = with_labels(HAPROXY_0_VHOST="a.example", HAPROXY_0_BACKEND_HTTP_OPTIONS=HTTP_OPTIONS,
                         HAPROXY_0_BACKEND_SERVER_OPTIONS="timeout connect 500ms\\n"
                                                          "timeout queue 2s")
    t = tr(app(labels=labels))
    p = only(t).policy
    assert (p.response_timeout, p.header_timeout, p.idle_timeout) == (30.0, 5.0, 120.0)
    assert (p.connect_timeout, p.queue_timeout) == (0.5, 2.0)
    assert t.problems == ()  # forwardfor and X-Forwarded-Proto: edgelb does them already


@pytest.mark.parametrize(("line", "field", "seconds"), [
    ("timeout tunnel 1h", "tunnel_timeout", 3600.0),
    ("timeout http-keep-alive 15s", "idle_timeout", 15.0),
    ("timeout connect 1500", "connect_timeout", 1.5),  # no unit: milliseconds
    ("timeout connect 250000us", "connect_timeout", 0.25),
    ("timeout server 1d", "response_timeout", 86400.0),
])
def test_haproxy_time_units(line, field, seconds) -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_BACKEND_TCP_OPTIONS=line)))
    assert getattr(only(t).policy, field) == pytest.approx(seconds)


def test_other_option_lines_are_reported_and_the_app_stays() -> None:
    labels = with_labels(HAPROXY_0_BACKEND_TCP_OPTIONS="timeout connect 1s\n  option tcplog\n"
                                                       "  timeout check 5s")
    t = tr(app(labels=labels))
    assert only(t).policy.connect_timeout == 1.0
    assert len(messages(t)) == 2
    assert all("unsupported (only plain `timeout" in m for m in messages(t))


def test_http_options_are_not_read_on_a_tcp_port_as_in_marathon_lb() -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_BACKEND_HTTP_OPTIONS="timeout server 5s")))
    assert only(t).policy.response_timeout == Policy().response_timeout


@pytest.mark.parametrize("value", ["timeout server soon", "timeout connect 0"])
def test_a_bad_timeout_skips_the_app(value) -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_BACKEND_SERVER_OPTIONS=value)))
    assert skipped(t)
    [msg] = messages(t)
    assert msg.startswith("HAPROXY_0_BACKEND_SERVER_OPTIONS"), msg


@pytest.mark.parametrize("name", ["HTTP_BACKEND_PROXYPASS_PATH", "HTTP_BACKEND_REVPROXY_PATH"])
def test_path_rewrites_are_not_supported_and_the_app_is_left_out(name) -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_VHOST="a.example", **{f"HAPROXY_0_{name}": "/x"})))
    assert skipped(t)
    assert "does not rewrite paths" in messages(t)[0]


@pytest.mark.parametrize("name", [
    "HAPROXY_0_FRONTEND_HEAD", "HAPROXY_0_BACKEND_HEAD", "HAPROXY_0_FRONTEND_BACKEND_GLUE",
    "HAPROXY_0_HTTP_FRONTEND_ACL", "HAPROXY_0_BIND_OPTIONS", "HAPROXY_0_BACKEND_STICKY_OPTIONS",
    "HAPROXY_0_HTTP_BACKEND_REDIR", "HAPROXY_HTTP_FRONTEND_HEAD",
])
def test_raw_templates_are_reported_and_the_app_stays(name) -> None:
    t = tr(app(labels=with_labels(**{name: "  acl x hdr(host) -i y\n"})))
    assert only(t).name == "shop_web_10000"
    [msg] = messages(t)
    assert msg.startswith(f"{name}: unsupported")


def test_a_label_for_a_port_the_app_does_not_have_is_reported() -> None:
    t = tr(app(labels=with_labels(HAPROXY_3_VHOST="a.example")))
    assert only(t) and "HAPROXY_3_VHOST: the app has 1 port(s); ignored" in messages(t)


# -- edgelb's own keys and capacity -------------------------------------------------------------


def test_edgelb_labels_are_the_per_service_keys() -> None:
    labels = with_labels(EDGELB_0_MAX_INFLIGHT="32", EDGELB_0_SLOW_START="10s",
                         EDGELB_0_HEALTH_CHECK="{path: /ping, interval: 1s}",
                         EDGELB_0_BALANCE="peak-ewma", HAPROXY_0_BALANCE="roundrobin")
    p = only(tr(app(labels=labels))).policy
    assert (p.max_inflight, p.slow_start, p.balance) == (32, 10.0, "peak-ewma")
    assert (p.health_check.path, p.health_check.interval) == ("/ping", 1.0)


def test_options_defaults_are_the_base() -> None:
    base = Policy(max_inflight=8, connect_timeout=1.0)
    p = only(tr(app(labels=with_labels(EDGELB_0_CONNECT_TIMEOUT="3s")), defaults=base)).policy
    assert (p.max_inflight, p.connect_timeout) == (8, 3.0)


@pytest.mark.parametrize(("labels", "error"), [
    ({"EDGELB_0_MAX_INFLIGHT": "lots"}, "EDGELB_0_MAX_INFLIGHT: "),
    ({"EDGELB_0_SLOW_START": "-1s"}, "EDGELB_0_SLOW_START: "),
    ({"EDGELB_0_HEALTH_CHECK": "{path: /x, rise: 0}"}, "EDGELB_0_HEALTH_CHECK (rise)"),
    ({"EDGELB_0_MAX_INFLIGT": "3"}, "did you mean EDGELB_0_MAX_INFLIGHT?"),
    ({"EDGELB_0_WEIGHT": "0"}, "EDGELB_0_WEIGHT: '0' is not a positive number"),
    ({"EDGELB_0_PORT": "80"}, "set HAPROXY_0_PORT instead"),
    ({"EDGELB_MAX_INFLIGHT": "3"}, "edgelb's labels are per port"),
    ({"EDGELB_4_MAX_INFLIGHT": "3"}, "no index 4"),
])
def test_a_bad_edgelb_label_is_named_and_skips_the_app(labels, error) -> None:
    t = tr(app(labels=with_labels(**labels)))
    assert skipped(t)
    assert any(error in m for m in messages(t)), messages(t)


@pytest.mark.parametrize(("cpus", "labels", "weight"), [
    (0.5, {}, 0.5),
    (2, {}, 2.0),
    (0, {}, 1.0),
    (None, {}, 1.0),
    ("many", {}, 1.0),
    (0.5, {"EDGELB_0_WEIGHT": "3"}, 3.0),
])
def test_capacity_weight_is_cpus_unless_the_weight_label_is_set(cpus, labels, weight) -> None:
    a = app(labels=with_labels(**labels))
    a["cpus"] = cpus
    assert {b.weight for b in only(tr(a)).backends} == {weight}


def test_proxy_protocol_on_an_http_port_is_ignored_and_told() -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_VHOST="a.example", EDGELB_0_PROXY_PROTOCOL="2")))
    assert only(t).policy.proxy_protocol == 0
    assert "applies to tcp mode" in messages(t)[0]


# -- conflicts between apps ---------------------------------------------------------------------


def test_same_host_and_path_goes_to_the_higher_backend_weight() -> None:
    low = app("/a", with_labels(HAPROXY_0_VHOST="shop.example", HAPROXY_0_BACKEND_WEIGHT="1"))
    high = app("/b", with_labels(HAPROXY_0_VHOST="shop.example", HAPROXY_0_BACKEND_WEIGHT="5"),
               ports=(10001,))
    t = tr(low, high)
    assert t.snapshot.routes == (Route("shop.example", "/", "b_10001"),)
    [msg] = messages(t, "/a")
    assert "routed to app /b" in msg and "(5 > 1)" in msg
    # the loser keeps its own service port, as in marathon-lb
    assert {s.name for s in t.snapshot.services} == {"a_10000", "b_10001"}


def test_equal_weights_on_one_host_and_path_go_to_the_first_app_id() -> None:
    apps = [app(f"/app{i}", with_labels(HAPROXY_0_VHOST="shop.example", HAPROXY_0_PATH="/x/"),
                ports=(10000 + i,)) for i in (3, 1, 2)]
    t = tr(*apps)
    assert t.snapshot.routes == (Route("shop.example", "/x/", "app1_10001"),)
    assert {p.app for p in t.problems} == {"/app2", "/app3"}


def test_different_paths_on_one_host_are_no_conflict() -> None:
    t = tr(app("/a", with_labels(HAPROXY_0_VHOST="shop.example")),
           app("/b", with_labels(HAPROXY_0_VHOST="shop.example", HAPROXY_0_PATH="/api"),
               ports=(10001,)))
    assert len(t.snapshot.routes) == 2 and t.problems == ()


def test_two_apps_on_one_static_port_skip_the_later_app_id() -> None:
    t = tr(app("/b", with_labels(HAPROXY_0_PORT="8080")),
           app("/a", with_labels(HAPROXY_0_PORT="8080"), ports=(10001,)))
    assert [s.name for s in t.snapshot.services] == ["a_10001"]
    [problem] = t.problems
    assert problem.app == "/b" and "port 8080 is already bound by app /a" in problem.message


def test_one_port_on_two_specific_addresses_is_no_clash() -> None:
    t = tr(app("/a", with_labels(HAPROXY_0_PORT="80", HAPROXY_0_BIND_ADDR="10.0.0.1")),
           app("/b", with_labels(HAPROXY_0_PORT="80", HAPROXY_0_BIND_ADDR="10.0.0.2"),
               ports=(10001,)))
    assert len(t.snapshot.services) == 2 and t.problems == ()


def test_an_app_with_a_bad_label_is_skipped_beside_good_ones() -> None:
    good = [app(f"/good{i}", with_labels(HAPROXY_0_VHOST=f"g{i}.example"), ports=(10000 + i,))
            for i in range(3)]
    bad = app("/bad", with_labels(HAPROXY_0_VHOST="b.example", HAPROXY_0_MODE="udp"),
              ports=(10009,))
    t = tr(good[0], bad, *good[1:])
    assert [s.name for s in t.snapshot.services] == ["good0_10000", "good1_10001", "good2_10002"]
    assert [r.host for r in t.snapshot.routes] == ["g0.example", "g1.example", "g2.example"]
    assert [p.app for p in t.problems] == ["/bad"] and t.exposed == 3


def test_the_order_of_the_apps_does_not_matter() -> None:
    apps = [app(f"/app{i}", with_labels(HAPROXY_0_VHOST="shop.example",
                                        HAPROXY_0_BACKEND_WEIGHT=str(i % 3)), ports=(10000 + i,))
            for i in range(8)]
    first = tr(*apps)
    for seed in range(5):
        shuffled = copy.deepcopy(apps)
        random.Random(seed).shuffle(shuffled)
        again = tr(*shuffled)
        assert again.snapshot == first.snapshot
        assert sorted(again.problems, key=str) == sorted(first.problems, key=str)


# -- certificates -------------------------------------------------------------------------------


def test_ssl_cert_is_a_file_based_pair_pinned_to_the_vhosts() -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_VHOST="a.example,b.example",
                                  HAPROXY_0_SSL_CERT="/etc/ssl/shop.pem")))
    certs = t.snapshot.certificates
    [pem] = certs.pairs
    assert (pem.cert, pem.key, pem.files) == (b"", b"", ("/etc/ssl/shop.pem",) * 2)
    assert pem.origin == certificate_origin("/etc/ssl/shop.pem", "/shop/web")
    assert certs.hosts == (("a.example", pem), ("b.example", pem))
    assert certs.files == ()  # not the file config's files: a bad one must not reject all
    notices = [Notice(pem.origin, f"{pem.origin}: cannot read the certificate file"),
               Notice("Secret x/y", "unrelated")]
    [problem] = notice_problems(t, notices)
    assert problem.app == "/shop/web" and "cannot read" in problem.message


def test_ssl_cert_without_vhost_is_served_by_its_own_names() -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_SSL_CERT="/etc/ssl/a.pem")))
    assert len(t.snapshot.certificates.pairs) == 1 and t.snapshot.certificates.hosts == ()


def test_a_host_pinned_by_two_apps_keeps_the_first() -> None:
    t = tr(app("/a", with_labels(HAPROXY_0_VHOST="x.example", HAPROXY_0_SSL_CERT="/a.pem")),
           app("/b", with_labels(HAPROXY_0_VHOST="x.example", HAPROXY_0_PATH="/b",
                                 HAPROXY_0_SSL_CERT="/b.pem"), ports=(10001,)))
    [(host, pem)] = t.snapshot.certificates.hosts
    assert (host, pem.files[0]) == ("x.example", "/a.pem")
    assert "host x.example already has /a.pem from app /a" in messages(t, "/b")[0]


@pytest.mark.parametrize(("value", "tls", "error"), [
    ("certs/a.pem", True, "not an absolute file path"),
    ("", True, "not an absolute file path"),
    ("/a.pem", False, "no TLS entrypoint"),
])
def test_ssl_cert_problems(value, tls, error) -> None:
    t = tr(app(labels=with_labels(HAPROXY_0_VHOST="a.example", HAPROXY_0_SSL_CERT=value)),
           tls_entrypoint=tls)
    assert error in messages(t)[0] and t.snapshot.certificates.pairs == ()


# -- HAPROXY_DEPLOYMENT_* (zdd blue/green) -----------------------------------------------------


def colour(app_id: str, started: str, service_port: int, first: int, count: int,
           **labels: str) -> dict:
    """An app as marathon-lb's zdd deploys it: both colours bind HAPROXY_0_PORT 10000, the new
    one has the alternate service port."""
    return app(app_id, with_labels(HAPROXY_DEPLOYMENT_GROUP="nginx", HAPROXY_0_PORT="10000",
                                   HAPROXY_DEPLOYMENT_STARTED_AT=started, **labels),
               ports=(service_port,), tasks=[task(i) for i in range(first, first + count)],
               instances=count)


def test_a_deployment_group_is_one_service_with_the_tasks_of_both_colours() -> None:
    blue = colour("/nginx-blue", "2024-01-01T00:00:00Z", 10000, 1, 2,
                  HAPROXY_0_VHOST="nginx.example")
    green = colour("/nginx-green", "2024-01-02T00:00:00Z", 10001, 5, 2,
                   HAPROXY_DEPLOYMENT_NEW_INSTANCES="2", HAPROXY_DEPLOYMENT_TARGET_INSTANCES="2",
                   HAPROXY_0_VHOST="other.example")
    t = tr(green, blue)
    svc = only(t)
    assert (svc.name, svc.listen) == ("nginx_10000", Address("0.0.0.0", 10000))
    assert t.snapshot.routes == (Route("nginx.example", "/", "nginx_10000"),)  # the old's labels
    # two new tasks healthy, target 2: both old ones drain (no new request, in-flight finish)
    assert [(b.host, b.ready, b.terminating) for b in svc.backends] == [
        ("10.0.0.1", False, True), ("10.0.0.2", False, True),
        ("10.0.0.5", True, False), ("10.0.0.6", True, False)]
    assert t.problems == () and dict(t.apps) == {"nginx_10000": "/nginx-blue"}


def test_a_deployment_drains_as_many_old_tasks_as_new_ones_are_healthy() -> None:
    blue = colour("/nginx-blue", "2024-01-01T00:00:00Z", 10000, 1, 3)
    green = colour("/nginx-green", "2024-01-02T00:00:00Z", 10001, 5, 2,
                   HAPROXY_DEPLOYMENT_NEW_INSTANCES="3", HAPROXY_DEPLOYMENT_TARGET_INSTANCES="3")
    green["healthChecks"] = CHECKS
    green["tasks"][0]["healthCheckResults"] = [{"alive": True}]
    svc = only(tr(blue, green))
    assert [(b.host, b.ready) for b in svc.backends] == [
        ("10.0.0.1", False), ("10.0.0.2", True), ("10.0.0.3", True), ("10.0.0.5", True)]


def test_one_app_of_a_deployment_group_is_named_after_the_group() -> None:
    t = tr(colour("/nginx-green", "2024-01-02T00:00:00Z", 10001, 5, 1))
    assert (only(t).name, only(t).listen.port) == ("nginx_10001", 10000)


def test_deployment_group_problems() -> None:
    apps = [colour(f"/nginx-{c}", f"2024-01-0{i + 1}T00:00:00Z", 10000 + i, 1 + 3 * i, 1)
            for i, c in enumerate(("blue", "green", "red"))]
    t = tr(*apps)
    assert [b.host for b in only(t).backends] == ["10.0.0.1", "10.0.0.7"]
    assert "a third app in the group" in messages(t, "/nginx-green")[0]
    bad = colour("/x", "", 10009, 1, 1)
    bad["labels"]["HAPROXY_DEPLOYMENT_GROUP"] = "not an id"
    assert "HAPROXY_DEPLOYMENT_GROUP: 'not an id'" in messages(tr(bad), "/x")[0]


# -- malformed input ----------------------------------------------------------------------------


@pytest.mark.parametrize("apps", [None, {}, "apps", 3, {"apps": []}])
def test_apps_that_are_not_a_list(apps) -> None:
    t = translate(apps, Options(), read_policy=policy_from_annotations)
    assert t.snapshot.services == () and len(t.problems) == 1


@pytest.mark.parametrize(("mangle", "fragment"), [
    (lambda a: a.update(id=None), "not an app with an id"),
    (lambda a: a.update(id="/bad id"), "is not a Marathon app id"),
    (lambda a: a.update(labels=["HAPROXY_GROUP"]), None),
    (lambda a: a["labels"].update(HAPROXY_0_PORT=80), "label values are strings"),
    (lambda a: a.update(portDefinitions={"port": 1}), "portDefinitions is not a list"),
    (lambda a: a.update(networks=[{"mode": "overlay"}]), "networks[0].mode 'overlay'"),
    (lambda a: a.update(container={"docker": {"network": 7}}), "container.docker.network 7"),
    (lambda a: a.update(tasks={"t": 1}), None),
    (lambda a: a.update(tasks=[None, "t", 3, {"ports": "x"}]), None),
    (lambda a: a.update(portDefinitions=[{"port": "10000"}]), "no service port"),
    (lambda a: a["tasks"][0].update(ports=[True]), None),
    (lambda a: a["tasks"][0].update(host=["h"]), None),
    (lambda a: a.update(healthChecks="yes"), None),
])
def test_malformed_apps_become_problems_beside_a_good_app(mangle, fragment) -> None:
    bad = app("/bad", ports=(10001,))
    mangle(bad)
    t = tr(app("/good"), bad)
    assert "good_10000" in t.apps
    text = " ".join(str(p) for p in t.problems)
    if fragment is not None:
        assert fragment in text, text


def test_an_app_id_twice_keeps_the_first() -> None:
    t = tr(app("/a"), app("a", ports=(10001,)))
    assert [s.name for s in t.snapshot.services] == ["a_10000"]
    assert "appears twice" in str(t.problems[0])


def test_problem_text_names_the_app() -> None:
    assert str(Problem("/shop/web", "HAPROXY_0_PORT: x")) == "app /shop/web: HAPROXY_0_PORT: x"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(["TASK_RUNNING", "/a", "external", "*", "host",
                                              "container/bridge", "container", "BRIDGE", "USER",
                                              "HAPROXY_GROUP", "a.example", "http", "tcp"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from([
        "id", "labels", "tasks", "ports", "portDefinitions", "portMappings", "container",
        "docker", "network", "networks", "mode", "ipAddress", "discovery", "number", "port",
        "servicePort", "containerPort", "host", "state", "healthChecks", "healthCheckResults",
        "alive", "ipAddresses", "cpus", "HAPROXY_GROUP", "HAPROXY_0_VHOST", "HAPROXY_0_PORT",
        "HAPROXY_0_MODE", "HAPROXY_0_AUTH", "EDGELB_0_WEIGHT", "readinessCheckResults",
        "taskId", "ready", "x"]), children, max_size=6),
    max_leaves=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON)
def test_any_json_in_place_of_the_apps_gives_a_translation(apps) -> None:
    for candidate in (apps, [apps], [app(), apps]):
        t = translate(candidate, Options(group="*"), read_policy=policy_from_annotations)
        assert isinstance(t, Translation)
        assert all(isinstance(p, Problem) for p in t.problems)
        names = [s.name for s in t.snapshot.services]
        assert len(names) == len(set(names))
        assert set(t.apps) == set(names)
        json.dumps([str(p) for p in t.problems])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([
    "HAPROXY_GROUP", "HAPROXY_0_GROUP", "HAPROXY_0_VHOST", "HAPROXY_0_PORT", "HAPROXY_0_MODE",
    "HAPROXY_0_PATH", "HAPROXY_0_BALANCE", "HAPROXY_0_AUTH", "HAPROXY_0_SSL_CERT",
    "HAPROXY_0_BACKEND_WEIGHT", "HAPROXY_0_BACKEND_HTTP_OPTIONS", "HAPROXY_0_ENABLED",
    "HAPROXY_0_BIND_ADDR", "EDGELB_0_MAX_INFLIGHT", "EDGELB_0_WEIGHT", "HAPROXY_0_STICKY",
    "HAPROXY_0_BACKEND_NETWORK_ALLOWED_ACL", "HAPROXY_0_USE_HSTS"]), st.text(max_size=20)))
def test_any_label_values_give_a_service_or_a_problem(labels) -> None:
    t = translate([app(labels={"HAPROXY_GROUP": "external", **labels})], Options(group="*"),
                  read_policy=policy_from_annotations)
    if parse_bool(labels.get("HAPROXY_0_ENABLED", "")) is False:
        assert not t.snapshot.services and not t.problems  # turned off, as asked: nothing
    else:
        assert t.snapshot.services or t.problems
