"""The `dns:` and `resolvers:` keys of the config file: good values, every bad one named with
its fix, and `edgelb check` (on examples/dns-srv.yaml too)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgelb.ops.config import ConfigError, json_schema, parse_config
from watchers.dns.settings import ResolverSettings
from watchers.model import DnsQuery

REPO = Path(__file__).resolve().parent.parent


def service(dns: str, extra: str = "") -> str:
    return f"services:\n  - name: web\n    listen: 10000\n    dns: {dns}\n{extra}"


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    return e.value.errors


def test_srv_and_name() -> None:
    c = parse_config(service("{srv: _http._tcp.web.service.consul}"))
    svc = c.snapshot.services[0]
    assert svc.dns == DnsQuery(srv="_http._tcp.web.service.consul.") and svc.backends == ()
    c = parse_config(service("{name: web.internal., port: 8080}"))
    assert c.snapshot.services[0].dns == DnsQuery(name="web.internal.", port=8080)
    assert c.resolvers is None  # /etc/resolv.conf's


def test_resolvers() -> None:
    c = parse_config("resolvers: {nameservers: [127.0.0.1:8600, 10.0.0.2, '[::1]:53'], "
                     "timeout: 500ms, attempts: 3, min_ttl: 2s, max_ttl: 1m, hold_stale: 1h, "
                     "hold_nxdomain: 10s}\n" + service("{srv: _a._tcp.b}"))
    assert c.resolvers == ResolverSettings(
        nameservers=(("127.0.0.1", 8600), ("10.0.0.2", 53), ("::1", 53)), timeout=0.5,
        attempts=3, min_ttl=2.0, max_ttl=60.0, hold_stale=3600.0, hold_nxdomain=10.0)


@pytest.mark.parametrize(("text", "where", "says"), [
    (service("{srv: _a._tcp.b}", "    backends: [127.0.0.1:9000]\n"), "services[0].dns",
     "not both"),
    (service("{srv: _a._tcp.b, name: c}"), "services[0].dns", "exactly one of srv"),
    (service("{}"), "services[0].dns", "exactly one of srv"),
    (service("{srv: _a._tcp.b, port: 80}"), "services[0].dns.port", "carry their ports"),
    (service("{name: web.internal}"), "services[0].dns", "port is required"),
    (service("{name: web.internal, port: 0}"), "services[0].dns.port", "out of range"),
    (service("{name: 'web internal', port: 80}"), "services[0].dns.name", "not a DNS name"),
    (service("{srv: _a._tcp.b, ttl: 5}"), "services[0].dns.ttl", "unknown key"),
    (service("_a._tcp.b"), "services[0].dns", "expected a mapping"),
    ("defaults: {dns: {srv: _a._tcp.b}}\n", "defaults.dns", "set it on the service"),
    ("resolvers: {nameservers: []}\n", "resolvers.nameservers", "asks no one"),
    ("resolvers: {nameservers: [dns.example:53]}\n", "resolvers.nameservers[0]",
     "not an IP address"),
    ("resolvers: {min_ttl: 10s, max_ttl: 5s}\n", "resolvers.max_ttl", "below min_ttl"),
    ("resolvers: {timeout: 0s}\n", "resolvers.timeout", "more than 0"),
    ("resolvers: {attempts: 0}\n", "resolvers.attempts", "at least 1"),
    ("resolvers: {hold_stale: forever}\n", "resolvers.hold_stale", "not a duration"),
    ("resolvers: {nameserver: [127.0.0.1]}\n", "resolvers.nameserver", "did you mean"),
])
def test_bad_values_are_named_with_their_fix(text: str, where: str, says: str) -> None:
    found = [e for e in errors(text) if e.startswith(f"{where}:")]
    assert found and says in found[0], errors(text)


def test_the_json_schema_knows_the_keys() -> None:
    schema = json_schema()
    assert "resolvers" in schema["properties"]
    service_schema = schema["properties"]["services"]["anyOf"][1]["items"]
    assert "dns" in service_schema["properties"]


def check(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "edgelb", "check", "-c", str(path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)


def test_check_the_example() -> None:
    r = check(REPO / "examples" / "dns-srv.yaml")
    assert r.returncode == 0, r.stderr
    assert "backends: from DNS, SRV _web._tcp.service.consul." in r.stdout
    assert "resolvers: 127.0.0.1:8600" in r.stdout


def test_check_says_backends_and_dns_are_exclusive(tmp_path: Path) -> None:
    p = tmp_path / "edge.yaml"
    p.write_text(service("{srv: _a._tcp.b}", "    backends: [127.0.0.1:9000]\n"))
    r = check(p)
    assert r.returncode == 1
    assert "services[0].dns: a service takes its backends from dns or from a backends list" \
        in r.stderr
