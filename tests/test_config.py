"""Config loading and validation: every error names its key path and says how to fix it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import balancers
from edgelb.ops.config import (
    Config,
    ConfigError,
    Entrypoint,
    KubernetesWatcherConfig,
    MarathonWatcherConfig,
    ShutdownConfig,
    check_command,
    config_loader,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
    policy_from_annotations,
    summarize,
)
from watchers.model import Address, Backend, HealthCheck, Policy, Route

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def cfg(text: str) -> Config:
    return parse_config(textwrap.dedent(text))


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text))
    assert info.value.errors, "ConfigError without errors"
    return info.value.errors


def one_error(text: str, path: str) -> str:
    """The single error of `text`, which must start with `path: `."""
    errs = errors(text)
    assert len(errs) == 1, errs
    assert errs[0].startswith(path + ": "), errs
    return errs[0]


def svc(extra: str = "", name: str = "web") -> str:
    """A minimal valid service entry with `extra` lines added."""
    body = f"services:\n  - name: {name}\n    listen: 10000\n"
    for line in textwrap.dedent(extra).strip("\n").splitlines():
        body += f"    {line}\n"
    return body


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5), (3, 3.0),
     (0.5, 0.5), ("0", 0.0), ("10", 10.0), (" 2s ", 2.0), (".5s", 0.5), ("365d", 31536000.0)],
)
def test_duration_accepts(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["-1s", -2, "soon", "2 sec", "1w", "", "s", True, None, [1],
                                 float("nan"), float("inf"), "1e3"])
def test_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_duration_negative_message() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration("-5s")


def test_duration_garbage_message_shows_format() -> None:
    with pytest.raises(ValueError, match="250ms"):
        parse_duration("fast")


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "default", "address"),
    [
        ("127.0.0.1:80", None, Address("127.0.0.1", 80)),
        ("localhost:8080", None, Address("localhost", 8080)),
        ("backend-1.example.com:443", None, Address("backend-1.example.com", 443)),
        ("[::1]:80", None, Address("::1", 80)),
        ("[::]:9000", None, Address("::", 9000)),
        ("0.0.0.0:65535", None, Address("0.0.0.0", 65535)),
        (10000, "0.0.0.0", Address("0.0.0.0", 10000)),
        ("10000", "0.0.0.0", Address("0.0.0.0", 10000)),
        (":10000", "127.0.0.1", Address("127.0.0.1", 10000)),
    ],
)
def test_address_accepts(text: object, default: str | None, address: Address) -> None:
    assert parse_address(text, default) == address


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ("127.0.0.1:0", "out of range"),
        ("127.0.0.1:65536", "out of range"),
        ("127.0.0.1", "no port"),
        ("::1:80", "brackets"),
        ("[::1]", "[::1]:8080"),
        ("[nothost]:80", "not an IPv6"),
        ("300.1.1.1:80", "not an IPv4"),
        ("bad_host:80", "not a valid host"),
        ("host:http", "not a number"),
        (8080, "only a port"),
        (":8080", "no host"),
        (True, "expected host:port"),
        (None, "expected host:port"),
    ],
)
def test_address_rejects(bad: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_address(bad)


@given(st.integers(0, 10**6), st.sampled_from([("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)]))
def test_duration_units_property(n: int, unit: tuple[str, float]) -> None:
    assert parse_duration(f"{n}{unit[0]}") == pytest.approx(n * unit[1])


@given(st.ip_addresses(), st.integers(1, 65535))
def test_address_str_round_trips(ip: object, port: int) -> None:
    a = parse_address(str(Address(str(ip), port)))
    assert a == Address(str(ip), port)


def test_address_str_round_trips_ipv6() -> None:
    assert str(parse_address("[::1]:80")) == "[::1]:80"


# --------------------------------------------------------------------------- whole documents


def test_minimal_config_defaults() -> None:
    c = cfg(svc())
    assert c.admin == Address("127.0.0.1", 9090)
    assert c.entrypoints == ()
    assert c.defaults == Policy()
    assert c.kubernetes is None and c.marathon is None
    assert c.shutdown == ShutdownConfig()
    assert c.snapshot.source == "file"
    (s,) = c.snapshot.services
    assert s.name == "web" and s.mode == "http"
    assert s.listen == Address("0.0.0.0", 10000)
    assert s.backends == ()
    assert c.snapshot.routes == ()


def test_design_example_parses() -> None:
    c = cfg("""
        admin:
          listen: 127.0.0.1:9090
        entrypoints:
          http:  {listen: 0.0.0.0:80}
          https: {listen: 0.0.0.0:443, tls: {cert: tls.crt, key: tls.key}}
        defaults:
          balance: least-loaded
          connect_timeout: 2s
          header_timeout: 10s
          idle_timeout: 60s
          response_timeout: 60s
        services:
          - name: web
            listen: 0.0.0.0:10000
            mode: http
            hosts: [web.example.com]
            paths: [/]
            balance: least-loaded
            max_inflight: 64
            queue_timeout: 1s
            health_check: {path: /healthz, interval: 2s, timeout: 1s, rise: 2, fall: 3}
            backends:
              - {address: 127.0.0.1:9001, weight: 1}
              - {address: 127.0.0.1:9002, weight: 3}
        watchers:
          kubernetes: {enabled: true, kubeconfig: ~/.kube/config, ingress_class: edgelb}
          marathon:   {urls: [http://marathon-1:8080, http://marathon-2:8080], group: external}
    """)
    assert c.entrypoints == (
        Entrypoint("http", Address("0.0.0.0", 80)),
        Entrypoint("https", Address("0.0.0.0", 443), tls=("tls.crt", "tls.key")),
    )
    (s,) = c.snapshot.services
    assert s.policy.max_inflight == 64
    assert s.policy.health_check == HealthCheck("/healthz", 2.0, 1.0, 2, 3)
    assert s.backends == (Backend("127.0.0.1", 9001, 1.0), Backend("127.0.0.1", 9002, 3.0))
    assert c.snapshot.routes == (Route("web.example.com", "/", "web"),)
    assert c.kubernetes == KubernetesWatcherConfig(True, "~/.kube/config", "edgelb", ())
    assert c.marathon == MarathonWatcherConfig(
        ("http://marathon-1:8080", "http://marathon-2:8080"), "external")


def test_empty_document_is_an_error() -> None:
    assert one_error("", "(file)").endswith("e.g. services: [{name: web, listen: 10000, "
                                            "backends: []}]")
    one_error("# only a comment\n", "(file)")


def test_empty_mapping_is_valid() -> None:
    c = cfg("{}")
    assert c.snapshot.services == ()


def test_top_level_must_be_a_mapping() -> None:
    assert "expected a mapping of sections" in one_error("- a\n- b\n", "(top level)")


def test_yaml_syntax_error_reports_line_and_column() -> None:
    err = one_error("services:\n  - name: a\n   listen: 1\n", "line 3, column 4")
    assert "YAML syntax error" in err


def test_yaml_tab_error_has_position() -> None:
    err = errors("services:\n\t- name: a\n")[0]
    assert err.startswith("line 2, column 1")


def test_duplicate_yaml_key_is_reported() -> None:
    err = one_error(svc("name: other"), "line 4, column 5")
    assert "duplicate key 'name'" in err


def test_bytes_input_and_bad_utf8() -> None:
    assert parse_config(svc().encode()).snapshot.services[0].name == "web"
    with pytest.raises(ConfigError, match="UTF-8"):
        parse_config(b"services: \xff\xfe\n")


def test_config_error_str_lists_everything_with_origin() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("bogus: 1\nother: 2\n", origin="edge.yaml")
    text = str(info.value)
    assert text.startswith("edge.yaml: 2 errors")
    assert "bogus: unknown key" in text and "other: unknown key" in text
    assert info.value.origin == "edge.yaml"


def test_config_objects_are_frozen() -> None:
    c = cfg(svc())
    with pytest.raises(AttributeError):
        c.admin = Address("x", 1)  # type: ignore[misc]


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("text", "path", "suggestion"),
    [
        ("servics: []\n", "servics", "'services'"),
        ("admn: {listen: 1}\n", "admn", "'admin'"),
        (svc("balence: round-robin"), "services[0].balence", "'balance'"),
        (svc("max_inflite: 3"), "services[0].max_inflite", "'max_inflight'"),
        (svc("backends: [{adress: 127.0.0.1:1}]"), "services[0].backends[0].adress", "'address'"),
        (svc("health_check: {intervall: 1s}"), "services[0].health_check.intervall",
         "'interval'"),
        ("defaults: {conect_timeout: 1s}\n", "defaults.conect_timeout", "'connect_timeout'"),
        ("admin: {lisen: 127.0.0.1:1}\n", "admin.lisen", "'listen'"),
        ("entrypoints: {http: {listen: 80, tsl: {}}}\n", "entrypoints.http.tsl", "'tls'"),
        ("watchers: {kubernets: {}}\n", "watchers.kubernets", "'kubernetes'"),
        ("watchers: {kubernetes: {ingress_clas: x}}\n", "watchers.kubernetes.ingress_clas",
         "'ingress_class'"),
        ("watchers: {marathon: {urls: [http://m:8080], grup: x}}\n", "watchers.marathon.grup",
         "'group'"),
        ("shutdown: {grase: 1s}\n", "shutdown.grase", "'grace'"),
    ],
)
def test_unknown_key_suggests_nearest(text: str, path: str, suggestion: str) -> None:
    err = one_error(text, path)
    assert f"unknown key; did you mean {suggestion}?" in err


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    err = one_error("zzz: 1\n", "zzz")
    assert ("valid keys: access_log, admin, defaults, entrypoints, instance, limits, metrics, "
            "request_id, resolvers, routes, services, shutdown, tls, tracing, watchers") in err


# --------------------------------------------------------------------------- all errors at once


def test_all_errors_are_collected() -> None:
    errs = errors("""
        defaults: {balance: nope, idle_timeout: -1s}
        services:
          - name: BAD
            listen: 10000
          - name: ok
            listen: 70000
            backends: [{address: nowhere}]
        shutdown: {grace: later}
    """)
    paths = [e.split(": ", 1)[0] for e in errs]
    assert paths == [
        "defaults.balance", "defaults.idle_timeout", "services[0].name", "services[1].listen",
        "services[1].backends[0].address", "shutdown.grace",
    ]


def test_check_continues_after_bad_service_for_port_conflicts() -> None:
    errs = errors("""
        services:
          - {name: Bad, listen: 9090}
    """)
    assert any(e.startswith("services[0].name:") for e in errs)
    assert any(e.startswith("services[0].listen: port 9090 is already used by admin.listen")
               for e in errs)


# --------------------------------------------------------------------------- type errors


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        ("services: {name: web}\n", "services", "expected a list of services, got a mapping"),
        ("services: [web]\n", "services[0]", "expected a mapping"),
        (svc("max_inflight: many"), "services[0].max_inflight",
         "expected an integer >= 1 or null, got string 'many'"),
        (svc("max_inflight: 2.5"), "services[0].max_inflight", "got number 2.5"),
        (svc("max_inflight: true"), "services[0].max_inflight", "got boolean true"),
        (svc("max_idle: x"), "services[0].max_idle", "expected an integer >= 0"),
        (svc("hosts: web.example.com"), "services[0].hosts",
         "expected a list of hosts, got string 'web.example.com'; write it as a list"),
        (svc("paths: /api"), "services[0].paths", "expected a list of paths"),
        (svc("backends: 127.0.0.1:1"), "services[0].backends", "expected a list of backends"),
        (svc("backends: [{address: 127.0.0.1:1, weight: heavy}]"),
         "services[0].backends[0].weight", "expected a number >= 0, got string 'heavy'"),
        (svc("backends: [{address: 127.0.0.1:1, zone: 3}]"), "services[0].backends[0].zone",
         "expected a string, got integer 3"),
        (svc("balance: 3"), "services[0].balance", "expected a policy name, got integer 3"),
        (svc("health_check: 5"), "services[0].health_check", "expected a mapping"),
        (svc("health_check: {rise: x}"), "services[0].health_check.rise",
         "expected an integer >= 1"),
        ("services:\n  - name: 12\n    listen: 1\n", "services[0].name",
         "expected a string, got integer 12"),
        ("admin: 9090\n", "admin", "expected a mapping like {listen: 127.0.0.1:9090}"),
        ("entrypoints: [http]\n", "entrypoints", "expected a mapping"),
        ("watchers: {kubernetes: {enabled: maybe}}\n", "watchers.kubernetes.enabled",
         "expected true or false"),
        ("watchers: {kubernetes: {namespaces: default}}\n", "watchers.kubernetes.namespaces",
         "expected a list of namespace names"),
        ("watchers: {marathon: {urls: http://m:8080}}\n", "watchers.marathon.urls",
         "expected a list of URLs"),
        ("shutdown: 5\n", "shutdown", "expected a mapping"),
    ],
)
def test_type_errors_name_expected_type(text: str, path: str, fragment: str) -> None:
    assert fragment in one_error(text, path)


# --------------------------------------------------------------------------- services


def test_service_name_required() -> None:
    assert "name is required" in one_error("services:\n  - listen: 10000\n", "services[0]")


@pytest.mark.parametrize("name", ["Web", "web app", "wëb", "a/b"])
def test_service_name_charset(name: str) -> None:
    err = one_error(f"services:\n  - name: '{name}'\n    listen: 10000\n", "services[0].name")
    assert "lowercase letters, digits" in err


def test_service_name_with_allowed_punctuation() -> None:
    assert cfg(svc(name="my-app_v2.0")).snapshot.services[0].name == "my-app_v2.0"


def test_service_names_unique() -> None:
    err = one_error("""
        services:
          - {name: web, listen: 10000}
          - {name: web, listen: 10001}
    """, "services[1].name")
    assert "already used by services[0]" in err


def test_mode_must_be_http_or_tcp() -> None:
    assert "expected http or tcp, got string 'udp'" in one_error(svc("mode: udp"),
                                                                 "services[0].mode")


def test_not_exposed() -> None:
    errs = errors("""
        services:
          - {name: a, listen: 10000}
          - {name: b, listen: 10001}
          - {name: c, backends: []}
    """)
    assert errs == ["services[2]: not exposed: service 'c' has no listen, hosts or paths; "
                    "set listen, or hosts/paths for the entrypoints, or name it in a route's "
                    "backends"]


def test_listen_null_is_not_exposed() -> None:
    one_error("services:\n  - {name: a, listen: null}\n", "services[0]")


def test_tcp_service() -> None:
    c = cfg(svc("mode: tcp"))
    assert c.snapshot.services[0].mode == "tcp"
    assert c.snapshot.routes == ()


@pytest.mark.parametrize("key", ["hosts: [a.example.com]", "paths: [/x]"])
def test_tcp_cannot_have_hosts_or_paths(key: str) -> None:
    err = one_error(svc(f"mode: tcp\n{key}"), f"services[0].{key.split(':')[0]}")
    assert "tcp service cannot be routed" in err


def test_listen_bad_address() -> None:
    assert "out of range" in one_error(svc().replace("10000", "0"), "services[0].listen")


def test_listen_ipv6() -> None:
    c = cfg("services:\n  - {name: a, listen: '[::1]:10000'}\n")
    assert c.snapshot.services[0].listen == Address("::1", 10000)


def test_backends_shorthand_weight_zone() -> None:
    c = cfg(svc("""
        backends:
          - 10.0.0.1:80
          - {address: 10.0.0.2:80, weight: 2.5, zone: eu-1a}
          - {address: '[fd00::1]:80', weight: 0}
    """))
    assert c.snapshot.services[0].backends == (
        Backend("10.0.0.1", 80, 1.0, ""),
        Backend("10.0.0.2", 80, 2.5, "eu-1a"),
        Backend("fd00::1", 80, 0.0, ""),
    )


def test_backend_negative_weight() -> None:
    err = one_error(svc("backends: [{address: 10.0.0.1:80, weight: -1}]"),
                    "services[0].backends[0].weight")
    assert "0 or more" in err


def test_misspelt_required_key_is_reported_once() -> None:
    errs = errors(svc("backends: [{adress: 10.0.0.1:80}]"))
    assert errs == ["services[0].backends[0].adress: unknown key; did you mean 'address'?"]


def test_backend_address_required() -> None:
    err = one_error(svc("backends: [{weight: 1}]"), "services[0].backends[0]")
    assert "address is required" in err


def test_backend_address_needs_host() -> None:
    err = one_error(svc("backends: ['9001']"), "services[0].backends[0].address")
    assert "no host" in err
    err = one_error(svc("backends: [9001]"), "services[0].backends[0]")
    assert "expected host:port or a mapping" in err


def test_backend_listed_twice() -> None:
    err = one_error(svc("backends: [10.0.0.1:80, {address: 10.0.0.1:80}]"),
                    "services[0].backends[1].address")
    assert "listed twice (also services[0].backends[0])" in err


def test_backends_may_be_empty_or_null() -> None:
    assert cfg(svc("backends: []")).snapshot.services[0].backends == ()
    assert cfg(svc("backends:")).snapshot.services[0].backends == ()


# --------------------------------------------------------------------------- policy / defaults


def test_service_overrides_defaults() -> None:
    c = cfg("""
        defaults: {balance: round-robin, connect_timeout: 500ms, max_inflight: 10}
        services:
          - {name: a, listen: 10000}
          - {name: b, listen: 10001, connect_timeout: 3s, max_inflight: null}
    """)
    a, b = c.snapshot.services
    assert c.defaults.balance == "round-robin"
    assert a.policy == Policy(balance="round-robin", connect_timeout=0.5, max_inflight=10)
    assert b.policy == Policy(balance="round-robin", connect_timeout=3.0, max_inflight=None)


def test_every_policy_key_in_defaults() -> None:
    c = cfg("""
        defaults:
          balance: round-robin
          connect_timeout: 1s
          header_timeout: 2s
          idle_timeout: 3s
          response_timeout: 4s
          tunnel_timeout: 5m
          max_inflight: 5
          queue_timeout: 0
          max_idle: 0
          health_check: {path: /ping}
    """)
    assert c.defaults == Policy(
        balance="round-robin", connect_timeout=1.0, header_timeout=2.0, idle_timeout=3.0,
        response_timeout=4.0, tunnel_timeout=300.0, max_inflight=5, queue_timeout=0.0, max_idle=0,
        health_check=HealthCheck(path="/ping"),
    )


@pytest.mark.parametrize("key", ["name: x", "listen: 80", "backends: []", "hosts: [a.com]",
                                 "paths: [/]", "mode: tcp"])
def test_service_only_keys_rejected_in_defaults(key: str) -> None:
    name = key.split(":")[0]
    err = one_error(f"defaults:\n  {key}\n", f"defaults.{name}")
    assert "set it on" in err or "under the service" in err or "on the service" in err
    assert "unknown key" not in err


def test_balance_must_be_a_known_policy() -> None:
    err = one_error(svc("balance: least-loded"), "services[0].balance")
    assert "did you mean 'least-loaded'?" in err
    for name in balancers.POLICIES:
        assert name in err


@pytest.mark.parametrize("name", sorted(balancers.POLICIES))
def test_every_registered_policy_is_accepted(name: str) -> None:
    assert cfg(svc(f"balance: {name}")).snapshot.services[0].policy.balance == name


@pytest.mark.parametrize("key", ["connect_timeout", "header_timeout", "idle_timeout",
                                 "response_timeout"])
def test_timeouts_must_be_positive(key: str) -> None:
    assert "more than 0" in one_error(svc(f"{key}: 0s"), f"services[0].{key}")
    assert "negative" in one_error(svc(f"{key}: -1s"), f"services[0].{key}")


def test_queue_timeout_may_be_zero() -> None:
    assert cfg(svc("queue_timeout: 0")).snapshot.services[0].policy.queue_timeout == 0.0


def test_max_inflight_zero_rejected() -> None:
    err = one_error(svc("max_inflight: 0"), "services[0].max_inflight")
    assert "at least 1 (or null for no limit)" in err


def test_max_idle_negative_rejected() -> None:
    assert "at least 0" in one_error(svc("max_idle: -1"), "services[0].max_idle")


def test_health_check_merges_over_defaults() -> None:
    c = cfg("""
        defaults:
          health_check: {path: /healthz, interval: 5s, fall: 4}
        services:
          - {name: a, listen: 10000, health_check: {path: /ping}}
          - {name: b, listen: 10001, health_check: null}
          - {name: c, listen: 10002}
    """)
    a, b, c_ = c.snapshot.services
    assert a.policy.health_check == HealthCheck(path="/ping", interval=5.0, fall=4)
    assert b.policy.health_check is None
    assert c_.policy.health_check == HealthCheck(path="/healthz", interval=5.0, fall=4)


def test_health_check_true_and_empty_mean_defaults() -> None:
    assert cfg(svc("health_check: true")).snapshot.services[0].policy.health_check == \
        HealthCheck()
    assert cfg(svc("health_check: {}")).snapshot.services[0].policy.health_check == \
        HealthCheck()


def test_health_check_errors_each_named() -> None:
    errs = errors(svc("health_check: {path: ping, interval: 0, timeout: x, rise: 0, fall: -1}"))
    paths = [e.split(": ", 1)[0] for e in errs]
    assert paths == [f"services[0].health_check.{k}"
                     for k in ("path", "interval", "timeout", "rise", "fall")]


# --------------------------------------------------------------------------- hosts, paths, routes


def http_routes(text: str) -> tuple[Route, ...]:
    return cfg("entrypoints: {http: {listen: 80}}\n" + text).snapshot.routes


def test_routes_hosts_cross_paths() -> None:
    routes = http_routes("""
services:
  - name: web
    hosts: [a.example.com, b.example.com]
    paths: [/x, /y]
""")
    assert routes == (
        Route("a.example.com", "/x", "web"), Route("a.example.com", "/y", "web"),
        Route("b.example.com", "/x", "web"), Route("b.example.com", "/y", "web"),
    )


def test_routes_paths_default_to_root() -> None:
    routes = http_routes("services:\n  - {name: web, hosts: [a.example.com]}\n")
    assert routes == (Route("a.example.com", "/", "web"),)


def test_routes_hosts_default_to_any() -> None:
    routes = http_routes("services:\n  - {name: web, paths: [/api]}\n")
    assert routes == (Route("", "/api", "web"),)


def test_service_with_listen_only_has_no_routes() -> None:
    assert cfg(svc()).snapshot.routes == ()


def test_service_with_listen_and_routes() -> None:
    c = cfg("entrypoints: {http: {listen: 80}}\n" + svc("hosts: [a.example.com]"))
    assert c.snapshot.services[0].listen == Address("0.0.0.0", 10000)
    assert c.snapshot.routes == (Route("a.example.com", "/", "web"),)


def test_hosts_lowercased_and_wildcard() -> None:
    routes = http_routes("services:\n  - {name: web, hosts: [WWW.Example.COM, '*.apps.io']}\n")
    assert [r.host for r in routes] == ["www.example.com", "*.apps.io"]


@pytest.mark.parametrize(
    ("host", "fragment"),
    [("'*'", "leave hosts out"), ("''", "leave hosts out"), ("a.*.com", "not a host name"),
     ("'*.*.com'", "not a host name"), ("a.com:80", "no scheme, port or path"),
     ("http://a.com", "no scheme, port or path"), ("a.com.", "trailing dot"),
     ("a_b.com", "not a host name"), ("'-a.com'", "not a host name"), ("3", "expected a host")],
)
def test_bad_hosts(host: str, fragment: str) -> None:
    err = one_error("entrypoints: {http: {listen: 80}}\n"
                    f"services:\n  - {{name: web, hosts: [{host}]}}\n", "services[0].hosts[0]")
    assert fragment in err


@pytest.mark.parametrize("path", ["api", "'/a b'", "'/a?x'", "'/a#x'", "3"])
def test_bad_paths(path: str) -> None:
    one_error("entrypoints: {http: {listen: 80}}\n"
              f"services:\n  - {{name: web, paths: [{path}]}}\n", "services[0].paths[0]")


def test_paths_trailing_slash_normalized() -> None:
    routes = http_routes("services:\n  - {name: web, paths: [/api/, /]}\n")
    assert [r.path for r in routes] == ["/api", "/"]


def test_duplicate_route_across_services() -> None:
    err = one_error("""
        entrypoints: {http: {listen: 80}}
        services:
          - {name: a, hosts: [x.com], paths: [/api]}
          - {name: b, hosts: [X.com], paths: [/api/]}
    """, "services[1].hosts[0] and services[1].paths[0]")
    assert "x.com/api is already taken by service 'a' (services[0])" in err


def test_routes_without_entrypoints_point_at_entrypoints() -> None:
    err = one_error("services:\n  - {name: web, hosts: [a.com], backends: []}\n", "entrypoints")
    assert "services[0] (web)" in err and "entrypoints: {http: {listen: 0.0.0.0:80}}" in err


# --------------------------------------------------------------------------- ports


def test_port_conflict_between_services() -> None:
    err = one_error("""
        services:
          - {name: a, listen: 10000}
          - {name: b, listen: 127.0.0.1:10000}
    """, "services[1].listen")
    assert "port 10000 is already used by services[0].listen (a)" in err


def test_port_conflict_with_default_admin() -> None:
    err = one_error(svc().replace("10000", "9090"), "services[0].listen")
    assert "admin.listen (default 127.0.0.1:9090)" in err


def test_port_conflict_entrypoint_and_admin() -> None:
    err = one_error("admin: {listen: 127.0.0.1:80}\nentrypoints: {http: {listen: 80}}\n",
                    "entrypoints.http.listen")
    assert "already used by admin.listen" in err


def test_port_conflict_between_entrypoints() -> None:
    err = one_error("entrypoints:\n  a: {listen: 80}\n  b: {listen: '[::]:80'}\n",
                    "entrypoints.b.listen")
    assert "entrypoints.a.listen" in err


def test_admin_listen_forms() -> None:
    assert cfg("admin: {listen: 9999}").admin == Address("127.0.0.1", 9999)
    assert cfg("admin: {listen: 0.0.0.0:9999}").admin == Address("0.0.0.0", 9999)
    assert cfg("admin: {}").admin == Address("127.0.0.1", 9090)
    assert cfg("admin:").admin == Address("127.0.0.1", 9090)
    assert "out of range" in one_error("admin: {listen: 127.0.0.1:0}\n", "admin.listen")


# --------------------------------------------------------------------------- entrypoints


def test_entrypoint_requires_listen() -> None:
    assert "listen is required" in one_error("entrypoints: {http: {}}\n", "entrypoints.http")


def test_entrypoint_null_spec() -> None:
    one_error("entrypoints: {http: }\n", "entrypoints.http")


def test_entrypoint_name_checked() -> None:
    one_error("entrypoints: {'Bad Name': {listen: 80}}\n", "entrypoints.Bad Name")


def test_entrypoint_tls_requires_cert_and_key() -> None:
    err = one_error("entrypoints: {https: {listen: 443, tls: {cert: a.pem}}}\n",
                    "entrypoints.https.tls")
    assert "key is required" in err


def test_entrypoint_tls_stored() -> None:
    c = cfg("entrypoints: {https: {listen: 443, tls: {cert: c.pem, key: k.pem}}}")
    assert c.entrypoints == (Entrypoint("https", Address("0.0.0.0", 443), ("c.pem", "k.pem")),)


# --------------------------------------------------------------------------- watchers, shutdown


def test_kubernetes_section() -> None:
    c = cfg("watchers: {kubernetes: {namespaces: [default, web], ingress_class: edge}}")
    assert c.kubernetes == KubernetesWatcherConfig(
        enabled=True, kubeconfig=None, ingress_class="edge", namespaces=("default", "web"))
    assert cfg("watchers: {kubernetes: {enabled: false}}").kubernetes == \
        KubernetesWatcherConfig(enabled=False)
    assert cfg("watchers: {kubernetes: }").kubernetes is None


def test_kubernetes_ingress_nginx_annotations_key() -> None:
    assert not cfg("watchers: {kubernetes: {}}").kubernetes.ingress_nginx_annotations
    c = cfg("watchers: {kubernetes: {ingress_nginx_annotations: true}}")
    assert c.kubernetes.ingress_nginx_annotations
    one_error("watchers: {kubernetes: {ingress_nginx_annotations: maybe}}\n",
              "watchers.kubernetes.ingress_nginx_annotations")


def test_kubernetes_bad_namespace() -> None:
    one_error("watchers: {kubernetes: {namespaces: [Default]}}\n",
              "watchers.kubernetes.namespaces[0]")


def test_marathon_section() -> None:
    c = cfg("watchers: {marathon: {urls: ['https://m1:8443/', http://m2:8080]}}")
    assert c.marathon == MarathonWatcherConfig(("https://m1:8443", "http://m2:8080"), "external")


def test_marathon_requires_urls() -> None:
    assert "urls is required" in one_error("watchers: {marathon: {group: x}}\n",
                                           "watchers.marathon")
    assert "at least one" in one_error("watchers: {marathon: {urls: []}}\n",
                                       "watchers.marathon.urls")
    one_error("watchers: {marathon: {urls: [marathon:8080]}}\n", "watchers.marathon.urls[0]")


def test_shutdown_section() -> None:
    assert cfg("shutdown: {delay: 5s, grace: 1m}").shutdown == ShutdownConfig(5.0, 60.0)
    assert cfg("shutdown: {grace: 0}").shutdown == ShutdownConfig(0.0, 0.0)
    assert "negative" in one_error("shutdown: {delay: -1s}\n", "shutdown.delay")


# --------------------------------------------------------------------------- load, summary, check


def test_load_config_reads_file(tmp_path: Path) -> None:
    p = tmp_path / "edge.yaml"
    p.write_text(svc())
    assert load_config(p).snapshot.services[0].name == "web"
    assert load_config(str(p)) == load_config(p)


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_load_config_error_origin_is_path(tmp_path: Path) -> None:
    p = tmp_path / "edge.yaml"
    p.write_text("bogus: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.origin == str(p)


def test_config_loader_for_watchers() -> None:
    load = config_loader("x.yaml")
    assert load(svc().encode()).snapshot.services[0].name == "web"
    with pytest.raises(ConfigError) as info:
        load(b"bogus: 1\n")
    assert info.value.origin == "x.yaml"


def test_summarize_mentions_everything() -> None:
    c = cfg("""
        entrypoints: {http: {listen: 8080}}
        services:
          - name: web
            listen: 10000
            hosts: [a.example.com]
            paths: [/api]
            max_inflight: 8
            backends:
              - {address: 127.0.0.1:9001, weight: 1}
              - {address: 127.0.0.1:9002, weight: 3, zone: z1}
          - {name: db, mode: tcp, listen: 15432, backends: []}
        watchers:
          marathon: {urls: [http://m:8080]}
    """)
    text = summarize(c)
    for fragment in ["admin: 127.0.0.1:9090", "entrypoint http: 0.0.0.0:8080", "services: 2",
                     "web (http)", "listen 0.0.0.0:10000", "a.example.com/api",
                     "max_inflight 8", "127.0.0.1:9001 weight 1 (25%)",
                     "127.0.0.1:9002 weight 3 (75%), zone z1", "db (tcp)", "15432",
                     "backends: none", "marathon: http://m:8080"]:
        assert fragment in text, (fragment, text)


def test_summarize_says_where_tls_ends() -> None:
    c = cfg("""
        entrypoints: {https: {listen: 8443, tls: {}}}
        tls: {session_tickets: false, min_version: "1.3"}
        services:
          - name: vault
            mode: tcp
            tls: passthrough
            hosts: [vault.example.com, "*.db.example.com"]
            backends: [{address: 127.0.0.1:9001}]
          - {name: redis, mode: tcp, listen: 16380, backend_tls: true, backends: []}
    """)
    text = summarize(c)
    for fragment in ["vault (tcp, TLS passed through)",
                     "SNI names vault.example.com, *.db.example.com",
                     "redis (tcp, TLS to backends)",
                     "tls: session tickets off, TLS 1.3 and later"]:
        assert fragment in text, (fragment, text)
    assert "tls:" not in summarize(cfg(svc()))  # the defaults go unmentioned


def test_check_command_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(svc())
    assert check_command(str(good)) == 0
    out, err = capsys.readouterr()
    assert "OK" in out and "web (http)" in out and err == ""
    bad = tmp_path / "bad.yaml"
    bad.write_text("bogus: 1\n")
    assert check_command(str(bad)) == 1
    out, err = capsys.readouterr()
    assert out == "" and "bogus: unknown key" in err


def test_check_warns_that_an_apr1_hash_is_weak(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # htpasswd -nbm carol 'Hello world!' (apr1) beside htpasswd -nbB alice (bcrypt)
    p = tmp_path / "auth.yaml"
    p.write_text(svc("""
        auth:
          realm: shop
          cache_ttl: 1m
          users:
            - "alice:$2y$05$6.VsdPc354AvNACQS3mGdu9ZMT1gVAFO1t2xuK74tapMrxOERzDDe"
            - "carol:$apr1$AaocIc/q$FvHse91XUyk4rVL9m4nyQ0"
    """))
    assert check_command(str(p)) == 0
    out, err = capsys.readouterr()
    assert "OK" in out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{p}: warning: services[0].auth.users[1] (user 'carol'): apr1")
    c = cfg(p.read_text())
    assert len(c.warnings) == 1
    assert cfg(svc()).warnings == ()


def test_run_logs_the_config_warnings(caplog: pytest.LogCaptureFixture) -> None:
    from edgelb.ops.app import _warn_not_enforced  # what App._apply calls on every (re)load

    c = cfg(svc("""
        auth: {users: ["carol:$apr1$AaocIc/q$FvHse91XUyk4rVL9m4nyQ0"]}
    """))
    with caplog.at_level("WARNING", logger="edgelb"):
        _warn_not_enforced(c)
    assert [r.getMessage() for r in caplog.records] == [f"config: {c.warnings[0]}"]
    assert "services[0].auth.users[0] (user 'carol'): apr1" in c.warnings[0]


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "edgelb", "check", "-c", str(path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )


def test_cli_check_ok(tmp_path: Path) -> None:
    p = tmp_path / "edge.yaml"
    p.write_text(svc("backends: [{address: 127.0.0.1:9001, weight: 2}]"))
    r = run_check(p)
    assert r.returncode == 0, r.stderr
    assert "services: 1" in r.stdout and "127.0.0.1:9001 weight 2" in r.stdout


def test_cli_check_lists_every_error(tmp_path: Path) -> None:
    p = tmp_path / "edge.yaml"
    p.write_text(textwrap.dedent("""
        services:
          - name: web
            listen: 10000
            balence: round-robin
            backends: [{address: 127.0.0.1, weight: -1}]
          - name: q
        shutdown: {grace: soon}
    """))
    r = run_check(p)
    assert r.returncode == 1
    assert r.stdout == ""
    expected = [
        "services[0].balence: unknown key; did you mean 'balance'?",
        "services[0].backends[0].address:",
        "services[0].backends[0].weight:",
        "services[1]: not exposed",
        "shutdown.grace:",
    ]
    for fragment in expected:
        assert fragment in r.stderr, r.stderr
    assert "5 errors" in r.stderr


def test_cli_check_yaml_error(tmp_path: Path) -> None:
    p = tmp_path / "edge.yaml"
    p.write_text("services: [\n")
    r = run_check(p)
    assert r.returncode == 1 and "line 2, column 1" in r.stderr


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"http-static.yaml", "tcp.yaml", "virtual-hosts.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_check(path: Path) -> None:
    load_config(path)  # raises with every error listed if invalid
    r = run_check(path)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_instance_section_and_environment(monkeypatch) -> None:
    monkeypatch.setenv("EDGELB_ZONE", "eu-1a")
    monkeypatch.setenv("EDGELB_REPLICA", "2")
    monkeypatch.setenv("EDGELB_REPLICAS", "3")
    c = cfg("admin: {listen: 127.0.0.1:9090}")
    assert (c.instance.zone, c.instance.replica, c.instance.replicas) == ("eu-1a", 2, 3)
    c = cfg("instance: {zone: z, replica: 0, replicas: 1}")
    assert (c.instance.zone, c.instance.replica, c.instance.replicas) == ("z", 0, 1)
    err = one_error("instance: {replica: 3, replicas: 3}\n", "instance.replica")
    assert "0 to replicas - 1" in err


def test_subset_and_zone_keys() -> None:
    base = "services: [{name: a, listen: 127.0.0.1:1000, "
    assert cfg(base + "subset: 12}]").snapshot.services[0].policy.subset == 12
    assert cfg(base + "subset: auto}]").snapshot.services[0].policy.subset == -1
    assert cfg(base + "subset: {size: 5}}]").snapshot.services[0].policy.subset == 5
    policy = cfg(base + "zone_aware: true, zone_threshold: 0.5}]").snapshot.services[0].policy
    assert policy.zone_aware and policy.zone_threshold == 0.5
    one_error(base + "zone_threshold: 0}]\n", "services[0].zone_threshold")


# --------------------------------------------------------------------------- overload keys


def test_overload_keys_parse_into_the_policy() -> None:
    c = cfg(
        textwrap.dedent("""
        defaults:
          max_inflight: 8
          adaptive: true
          queue_size: 16
          queue_timeout: 250ms
          retries: 2
          retry_budget: {ratio: 10%, min: 5}
          panic_threshold: 40%
          outlier: {failures: 3, kinds: [connect, "500"], ejection: 10s, max_ejected: 0.5}
        """)
        + svc("health_check: {type: tcp, interval: 1s, rise: 1}")
    )
    p = c.snapshot.services[0].policy
    assert (p.max_inflight, p.adaptive, p.queue_size, p.queue_timeout) == (8, True, 16, 0.25)
    assert (p.retries, p.retry_budget.ratio, p.retry_budget.min) == (2, 0.1, 5)
    assert p.panic_threshold == 0.4
    assert p.outlier is not None
    assert p.outlier.kinds == frozenset({"connect", "500"})
    assert (p.outlier.failures, p.outlier.ejection, p.outlier.max_ejection) == (3, 10.0, 300.0)
    assert p.outlier.max_ejected == 0.5
    assert p.health_check is not None
    assert (p.health_check.kind, p.health_check.interval, p.health_check.rise) == ("tcp", 1.0, 1)


def test_overload_defaults_follow_the_issue() -> None:
    p = cfg(svc()).snapshot.services[0].policy
    assert p.outlier is not None
    assert p.outlier.kinds == frozenset({"connect", "reset", "timeout", "502", "503", "504"})
    assert (p.outlier.failures, p.outlier.ejection, p.outlier.max_ejection) == (5, 30.0, 300.0)
    assert p.outlier.max_ejected == 0.1
    assert (p.panic_threshold, p.retries, p.queue_size) == (0.5, 1, 1024)
    assert (p.retry_budget.ratio, p.retry_budget.min) == (0.2, 3)
    assert p.adaptive is False


def test_outlier_false_turns_ejection_off_and_merges_over_defaults() -> None:
    c = cfg(
        "defaults:\n  outlier: {failures: 2}\n"
        + svc("outlier: {ejection: 5s}")
        + "  - name: plain\n    listen: 10001\n    outlier: false\n"
    )
    web, off = c.snapshot.services
    assert web.policy.outlier is not None
    assert (web.policy.outlier.failures, web.policy.outlier.ejection) == (2, 5.0)
    assert off.policy.outlier is None


@pytest.mark.parametrize(
    ("extra", "path", "fragment"),
    [
        ("outlier: {kinds: [connect, 418]}", "services[0].outlier.kinds", "unknown failure kind"),
        ("outlier: {kinds: []}", "services[0].outlier.kinds", "at least one"),
        ("outlier: {failures: 0}", "services[0].outlier.failures", "at least 1"),
        ("outlier: {max_ejected: 2}", "services[0].outlier.max_ejected", "share from 0 to 1"),
        ("outlier: {ejection: 1m, max_ejection: 10s}", "services[0].outlier.max_ejection",
         "at least `ejection`"),
        ("outlier: {on: [connect]}", "services[0].outlier.true", "YAML reads a bare"),
        ("retries: 9", "services[0].retries", "at most 5"),
        ("retries: -1", "services[0].retries", "at least 0"),
        ("retry_budget: {ratio: x}", "services[0].retry_budget.ratio", "share from 0 to 1"),
        ("retry_budget: {mim: 3}", "services[0].retry_budget.mim", "did you mean 'min'"),
        ("panic_threshold: 1.5", "services[0].panic_threshold", "share from 0 to 1"),
        ("queue_size: -1", "services[0].queue_size", "at least 0"),
        ("adaptive: maybe", "services[0].adaptive", "true or false"),
        ("health_check: {type: udp}", "services[0].health_check.type", "http, tcp or grpc"),
        ("health_check: {status: 600}", "services[0].health_check.status", "range like"),
        ("health_check: {status: 399-200}", "services[0].health_check.status", "ends below"),
        ("health_check: {method: 'GE T'}", "services[0].health_check.method", "method token"),
    ],
)
def test_overload_key_errors_name_the_key(extra: str, path: str, fragment: str) -> None:
    err = one_error(svc(extra), path)
    assert fragment in err, err


def test_policy_from_annotations_reads_strings_like_the_config_file() -> None:
    policy, errs = policy_from_annotations(
        {"edgelb.io/max-inflight": "64", "edgelb.io/balance": "round-robin",
         "edgelb.io/health-check": "{path: /hz, interval: 2s}", "edgelb.io/port": "10001",
         "other.io/x": "y"},
        Policy(),
    )
    assert errs == []
    assert (policy.max_inflight, policy.balance) == (64, "round-robin")
    assert policy.health_check is not None and policy.health_check.path == "/hz"


def test_policy_from_annotations_names_each_bad_annotation_and_keeps_the_base() -> None:
    base = Policy(max_inflight=3)
    policy, errs = policy_from_annotations(
        {"edgelb.io/max-inflite": "64", "edgelb.io/retries": "9",
         "edgelb.io/health-check": "{type: udp}"},
        base,
    )
    assert policy is base
    assert any(e.startswith("edgelb.io/max-inflite: unknown annotation; did you mean "
                            "edgelb.io/max-inflight?") for e in errs)
    assert any(e.startswith("edgelb.io/retries: at most 5") for e in errs)
    assert any(e.startswith("edgelb.io/health-check (type): expected http, tcp or grpc")
               for e in errs)


def test_passthrough_and_backend_tls_exclude_each_other() -> None:
    err = one_error("""
        services:
          - name: db
            mode: tcp
            listen: 5432
            tls: passthrough
            backend_tls: true
            backends: [{address: 127.0.0.1:5433}]
    """, "services[0].backend_tls")
    assert "passthrough" in err
    err = one_error("""
        defaults: {backend_tls: true}
        services:
          - name: db
            mode: tcp
            listen: 5432
            tls: passthrough
            backends: [{address: 127.0.0.1:5433}]
    """, "services[0].backend_tls")
    assert "backend_tls: null" in err
    c = cfg("""
        defaults: {backend_tls: true}
        services:
          - name: db
            mode: tcp
            listen: 5432
            tls: passthrough
            backend_tls: null
            backends: [{address: 127.0.0.1:5433}]
    """)
    assert c.snapshot.services[0].tls_passthrough
    assert c.snapshot.services[0].policy.backend_tls is None


def test_tls_on_a_tcp_port_and_passthrough_rules() -> None:
    err = one_error("""
        entrypoints: {https: {listen: 18443, tls: {}}}
        services:
          - name: web
            hosts: [a.example.com]
            tls: passthrough
            backends: [{address: 127.0.0.1:5433}]
    """, "services[0].tls")
    assert "mode: tcp" in err
    errs = errors("""
        entrypoints: {https: {listen: 18443, tls: {}}}
        services:
          - name: db
            mode: tcp
            hosts: [a.example.com]
            tls: {cert: c.pem, key: k.pem}
            backends: [{address: 127.0.0.1:5433}]
    """)
    assert any(e.startswith("services[0].tls: ") and "listen port" in e for e in errs), errs
    err = one_error("""
        entrypoints: {https: {listen: 18443, tls: {}}}
        services:
          - name: db
            mode: tcp
            hosts: [a.example.com]
            backends: [{address: 127.0.0.1:5433}]
    """, "services[0].hosts")
    assert "passthrough" in err
