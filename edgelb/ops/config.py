"""Load and validate the YAML config file (README.md, "Configuration") into frozen values.

Validation collects every problem it finds instead of stopping at the first one. Each error is
one line of the form ``key.path[0].sub: what is wrong; how to fix it`` so `edgelb check` can
print them all at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

import balancers
from edgelb.net.tls import Options as TLSOptions
from edgelb.ops.routes_config import named_in_routes, parse_routes
from edgelb.ops.telemetry_config import TOP_KEYS as TELEMETRY_KEYS
from edgelb.ops.telemetry_config import json_schemas as telemetry_schemas
from edgelb.ops.telemetry_config import parse_telemetry
from edgelb.ops.telemetry_config import summary as telemetry_summary
from edgelb.telemetry.settings import TelemetrySettings
from watchers.dns.settings import ResolverSettings
from watchers.model import (  # InstanceConfig, LimitsConfig: the file source's settings
    Address,
    Backend,
    DnsQuery,
    InstanceConfig,
    LimitsConfig,
    PathRules,
    Policy,
    Route,
    Service,
    Snapshot,
)
from watchers.routing import describe as describe_route
from watchers.routing import explain as explain_conflicts
from watchers.routing import precedence as route_precedence
from watchers.schema import DURATION, KEY_NAMES, SIZE, Checker, Hooks, PolicySchema, strict_object
from watchers.schema import INVALID as _INVALID
from watchers.schema import fmt_seconds as _fmt_seconds
from watchers.schema import join as _join
from watchers.schema import kind as _kind
from watchers.schema import parse_duration as parse_duration
from watchers.schema import parse_size as parse_size
from watchers.values import is_ip

DEFAULT_ADMIN = Address("127.0.0.1", 9090)
ANY_HOST = "0.0.0.0"


@dataclass(frozen=True, slots=True)
class Entrypoint:
    """A shared port on which http services are routed by host and path."""

    name: str
    listen: Address
    tls: tuple[str, str] | None = None  # (cert file, key file), stored as given
    # a PROXY header first on every connection (or from trusted peers): an
    # edgelb.net.proxy_protocol.AcceptPolicy, None = off
    accept_proxy_protocol: Any = None
    path_rules: PathRules = field(default_factory=PathRules)  # merge_slashes, encoded_slashes
    http2: bool = True  # TLS: ALPN offers h2
    h2c: bool = False  # plain: HTTP/2 by prior knowledge


@dataclass(frozen=True, slots=True)
class KubernetesWatcherConfig:
    enabled: bool = False
    kubeconfig: str | None = None
    ingress_class: str = "edgelb"
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    pod_weights: bool = False  # weights from pods (edgelb.io/weight, else the CPU request)
    publish_service: str | None = None  # "ns/name": its load balancer address goes to Ingresses
    publish_address: tuple[str, ...] = ()  # or these IPs / host names
    leader_election: bool = True  # one replica writes Ingress status (a Lease)
    # read nginx.ingress.kubernetes.io/* annotations on Ingresses (edgelb.io/* always are)
    ingress_nginx_annotations: bool = False
    # also serve the Gateway API (GatewayClass controllerName edgelb.io/gateway-controller)
    gateway_api: bool = False


@dataclass(frozen=True, slots=True)
class MarathonWatcherConfig:
    urls: tuple[str, ...] = ()
    group: str = "external"  # marathon-lb's --group; "*" exposes every app
    health: bool = True  # honour Marathon's health check results
    resync: float = 300.0  # seconds between full re-reads while nothing happens
    user: str | None = None  # HTTP basic auth (auth: {user, password | password_file})
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    token_file: str | None = None  # a ready token: `Authorization: token=...`
    dcos_credentials: str | None = None  # a DC/OS service-account JSON file (login)
    ca: str | None = None  # CA file for https Marathon URLs

    def files(self) -> dict[str, str]:
        """The files it names, by key path (`edgelb check` reads them)."""
        named = {"auth.password_file": self.password_file, "token_file": self.token_file,
                 "dcos_credentials": self.dcos_credentials, "ca": self.ca}
        return {f"watchers.marathon.{k}": v for k, v in named.items() if v}


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    delay: float = 0.0  # seconds between "not ready" and closing the listeners
    grace: float = 30.0  # seconds open connections get to finish


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The `metrics:` section: what /metrics exports (edgelb.ops.metrics)."""

    per_backend: bool = True  # false: no series labelled by backend (large clusters)


@dataclass(frozen=True, slots=True)
class Config:
    admin: Address = DEFAULT_ADMIN
    entrypoints: tuple[Entrypoint, ...] = ()
    defaults: Policy = field(default_factory=Policy)
    snapshot: Snapshot = field(default_factory=lambda: Snapshot(source="file"))
    kubernetes: KubernetesWatcherConfig | None = None
    marathon: MarathonWatcherConfig | None = None
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tls: TLSOptions = field(default_factory=TLSOptions)  # every TLS listener (edgelb.net.tls)
    instance: InstanceConfig = field(default_factory=InstanceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # (path, SHA-256 hex or "" when unreadable) of every TLS file it names, set by
    # `with_tls_files`: a rotated certificate makes a different Config (empty from parse_config)
    tls_files: tuple[tuple[str, str], ...] = ()
    # access_log, request_id, tracing (edgelb/ops/telemetry_config.py)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    # accepted but worth fixing (e.g. a weak password hash): `check` prints them, `run` logs
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # the `resolvers:` block (the DNS source's); None: /etc/resolv.conf's nameservers
    resolvers: ResolverSettings | None = None
    # `workers:` data-plane worker processes: a count, or "auto" (usable cores; resolved at
    # start by edgelb.workers.cores). 1: the single process of old
    workers: int | str = 1


class ConfigError(Exception):
    """Every problem found in a config; `errors` holds one line per problem."""

    def __init__(self, errors: list[str], origin: str = "<config>") -> None:
        self.errors = list(errors)
        self.origin = origin
        n = len(self.errors)
        head = f"{origin}: {n} error{'s' if n != 1 else ''}"
        super().__init__(head + "".join(f"\n  {e}" for e in self.errors))


# ---------------------------------------------------------------------------------------------
# Scalars: addresses (durations and sizes are read in watchers/schema.py, and re-exported here).
# They raise ValueError with a message that has no key path; the caller puts the path in front.

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def _valid_hostname(host: str) -> bool:
    if not host or len(host) > 253:
        return False
    return all(_LABEL.match(label) for label in host.split("."))


def _port(value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"port {value!r} is not a number; use 1..65535")
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is out of range; use 1..65535")
    return value


def parse_address(value: Any, default_host: str | None = None) -> Address:
    """`host:port`, `[v6]:port`; a bare port (or `:port`) takes `default_host` when given."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected host:port, got {_kind(value)}")
    if isinstance(value, int):
        if default_host is None:
            raise ValueError(f"{value} is only a port; write host:port, e.g. 127.0.0.1:{value}")
        return Address(default_host, _port(value))
    s = value.strip()
    if s.startswith("["):
        m = re.fullmatch(r"\[([^\]]*)\]:([^:]*)", s)
        if m is None:
            raise ValueError(f"{value!r} is not [ipv6]:port; write it like [::1]:8080")
        host, port_text = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {value!r} is not an IPv6 address") from None
        return Address(host, _port(port_text))
    if s.count(":") > 1:
        raise ValueError(f"{value!r}: put an IPv6 address in brackets, e.g. [::1]:8080")
    if ":" in s:
        host, port_text = s.rsplit(":", 1)
    elif s.isdigit():
        host, port_text = "", s
    else:
        raise ValueError(f"{value!r} has no port; write host:port, e.g. {s}:8080")
    if not host:
        if default_host is None:
            raise ValueError(f"{value!r} has no host; write host:port, e.g. 127.0.0.1:{port_text}")
        host = default_host
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {value!r} is not an IPv4 address") from None
    elif not _valid_hostname(host):
        raise ValueError(f"{host!r} in {value!r} is not a valid host name or IP address")
    return Address(host, _port(port_text))


# ---------------------------------------------------------------------------------------------
# Validation helpers (the checker and the scalar readers live beside the per-service schema,
# watchers/schema.py)


class _Checker(Checker):
    """The schema's checker, plus addresses (listen ports, backends)."""

    def address(self, value: Any, path: str, default_host: str | None) -> Address | None:
        try:
            return parse_address(value, default_host)
        except ValueError as e:
            self.error(path, str(e))
            return None



# ---------------------------------------------------------------------------------------------
# Sections

TOP_KEYS = ("admin", "entrypoints", "defaults", "services", "routes", "watchers", "shutdown",
            "instance", "limits", "tls", "resolvers", "metrics", "workers", *TELEMETRY_KEYS)
POLICY_KEYS = KEY_NAMES  # the per-service keys: watchers/schema.py declares them
PATH_RULE_KEYS = ("merge_slashes", "encoded_slashes")  # a listener's: entrypoint or static port
HTTP2_KEYS = ("http2", "h2c")  # a listener's: HTTP/2 by ALPN (TLS) or prior knowledge (plain)
ENCODED_SLASHES = ("reject", "keep")
SERVICE_KEYS = ("name", "listen", "mode", "hosts", "paths", "backends", "dns", "tls",
                "accept_proxy_protocol", *PATH_RULE_KEYS, *HTTP2_KEYS, *POLICY_KEYS)
BACKEND_KEYS = ("address", "weight", "zone")
MODES = ("http", "tcp")
NOT_IN_DEFAULTS = {
    "name": "a name belongs to one service; set it on each service",
    "listen": "a port can expose only one service; set listen on the service",
    "backends": "backends belong to one service; list them under the service",
    "dns": "dns names one service's backends; set it on the service",
    "hosts": "hosts route to one service; set them on the service",
    "paths": "paths route to one service; set them on the service",
    "mode": "mode is set per service (http unless it says tcp); set it on the service",
}
_NAME = re.compile(r"^[a-z0-9._-]+$")
_NAME_RULE = "use lowercase letters, digits, '.', '_' and '-'"
_K8S_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_GROUP = re.compile(r"^(\*|[A-Za-z0-9_.-]+)$")
MARATHON_KEYS = ("urls", "group", "health", "resync", "auth", "token_file", "dcos_credentials",
                 "ca")


# The parsers of the per-service keys whose values are edgelb's own types, imported on first
# use (edgelb.net.acl imports this module lazily too).


def _parse_sources(value: Any, path: str) -> tuple[Any, list[str]]:
    from edgelb.net.acl import parse_source_filter

    return parse_source_filter(value, path)


def _parse_auth(value: Any, path: str) -> tuple[Any, list[str]]:
    from edgelb.net.acl import parse_auth

    return parse_auth(value, path)


def _parse_backend_tls(value: Any, path: str) -> tuple[Any, list[str]]:
    from edgelb.net.backend_tls import parse_backend_tls

    return parse_backend_tls(value, path)


POLICY = PolicySchema(Hooks(balance=tuple(balancers.POLICIES), sources=_parse_sources,
                            auth=_parse_auth, backend_tls=_parse_backend_tls))


def _defaults(c: _Checker, value: Any) -> Policy:
    m = c.section(value, "defaults", "a mapping", POLICY_KEYS, why=NOT_IN_DEFAULTS)
    if m is None:
        return Policy()
    return dataclasses.replace(Policy(), **POLICY.read(c, m, "defaults", Policy()))


def _admin(c: _Checker, value: Any) -> Address:
    m = c.section(value, "admin", "a mapping like {listen: 127.0.0.1:9090}", ("listen",))
    if m is None or "listen" not in m:
        return DEFAULT_ADMIN
    return c.address(m["listen"], "admin.listen", "127.0.0.1") or DEFAULT_ADMIN


def _entrypoints(c: _Checker, value: Any) -> tuple[Entrypoint, ...]:
    if value is None:
        return ()
    m = c.mapping(value, "entrypoints", "a mapping like {http: {listen: 0.0.0.0:80}}")
    if m is None:
        return ()
    out = []
    for name, spec in m.items():
        path = _join("entrypoints", str(name))
        if not isinstance(name, str) or not _NAME.match(name):
            c.error(path, f"entrypoint name {name!r} is not valid; {_NAME_RULE}")
            continue
        e = c.mapping(spec, path, "a mapping like {listen: 0.0.0.0:80}")
        if e is None:
            continue
        c.keys(e, path, ("listen", "tls", "accept_proxy_protocol", *PATH_RULE_KEYS,
                         *HTTP2_KEYS))
        if "listen" not in e:
            c.missing(path, "listen", "listen is required; e.g. listen: 0.0.0.0:80")
            continue
        listen = c.address(e["listen"], _join(path, "listen"), ANY_HOST)
        tls = None
        if e.get("tls") is not None and e.get("tls") is not False:
            tpath = _join(path, "tls")
            raw = {} if e["tls"] is True else e["tls"]
            t = c.mapping(raw, tpath, "a mapping like {cert: tls.crt, key: tls.key}, or {} "
                          "for certificates from the watchers only")
            if t is not None:
                c.keys(t, tpath, ("cert", "key"))
                if not t:
                    tls = ("", "")  # TLS with the watchers' certificates (Ingress Secrets)
                files = []
                for key in ("cert", "key") if t else ():
                    if key not in t:
                        c.missing(tpath, key, f"{key} is required with "
                                  f"{'key' if key == 'cert' else 'cert'}; give the path of the "
                                  "PEM file")
                    else:
                        files.append(c.string(t[key], _join(tpath, key)))
                if len(files) == 2 and None not in files:
                    tls = (files[0], files[1])
        accept = _accept_proxy(c, e, path)
        rules = _path_rules(c, e, path)
        http2 = _http2(c, e, path)
        if listen is not None and accept is not False and rules is not None and http2:
            out.append(Entrypoint(name=name, listen=listen, tls=tls,
                                  accept_proxy_protocol=accept, path_rules=rules,
                                  http2=http2[0], h2c=http2[1]))
    return tuple(out)


def _http2(c: _Checker, m: dict, path: str) -> tuple[bool, bool] | None:
    """`http2` (default true: ALPN h2 on TLS) and `h2c` (default false: HTTP/2 by prior
    knowledge on a plain listener) of an entrypoint or a static port (None: invalid)."""
    out = [True, False]
    for i, key in enumerate(HTTP2_KEYS):
        if key in m:
            b = c.boolean(m[key], _join(path, key))
            if b is None:
                return None
            out[i] = b
    return out[0], out[1]


def _path_rules(c: _Checker, m: dict, path: str) -> PathRules | None:
    """`merge_slashes` and `encoded_slashes` of an entrypoint or a static port (None: invalid,
    reported)."""
    ok = True
    merge = True
    if "merge_slashes" in m:
        b = c.boolean(m["merge_slashes"], _join(path, "merge_slashes"))
        ok &= b is not None
        merge = bool(b) if b is not None else True
    encoded = "reject"
    if "encoded_slashes" in m:
        value = m["encoded_slashes"]
        if value not in ENCODED_SLASHES:
            c.error(_join(path, "encoded_slashes"), f"expected reject (answer 400, the default) "
                    f"or keep (pass %2F and %5C on encoded), got {value!r}")
            ok = False
        else:
            encoded = value
    return PathRules(merge_slashes=merge, encoded_slashes=encoded) if ok else None


def _accept_proxy(c: _Checker, m: dict, path: str) -> Any:
    """`accept_proxy_protocol` of an entrypoint or a service: an AcceptPolicy, None (off) or
    False (invalid, reported)."""
    from edgelb.net.proxy_protocol import parse_accept

    policy, errors = parse_accept(m.get("accept_proxy_protocol"),
                                  _join(path, "accept_proxy_protocol"))
    if errors:
        c.errors.extend(errors)
        return False
    return policy


def _host(c: _Checker, value: Any, path: str) -> str | None:
    if not isinstance(value, str):
        c.error(path, f"expected a host name, got {_kind(value)}")
        return None
    host = value.strip().lower()
    if host in ("", "*"):
        c.error(path, "an empty or '*' host is not a host; leave hosts out to match any host")
        return None
    if ":" in host or "/" in host:
        c.error(path, f"{value!r}: a host has no scheme, port or path; e.g. web.example.com")
        return None
    if host.endswith("."):
        c.error(path, f"{value!r}: drop the trailing dot")
        return None
    name = host[2:] if host.startswith("*.") else host
    if "*" in name or not _valid_hostname(name):
        c.error(path, f"{value!r} is not a host name; use web.example.com or *.example.com "
                "(a wildcard covers exactly one leading label)")
        return None
    return host


def _path(c: _Checker, value: Any, path: str) -> str | None:
    if not isinstance(value, str):
        c.error(path, f"expected a path prefix like /api, got {_kind(value)}")
        return None
    if not value.startswith("/") or re.search(r"[\s?#]", value):
        c.error(path, f"{value!r} is not a path prefix; start with '/', no spaces, '?' or '#' "
                "(e.g. /api)")
        return None
    # Prefixes match element-wise, so "/api/" and "/api" mean the same thing.
    return value.rstrip("/") or "/"


def _backends(c: _Checker, value: Any, path: str) -> tuple[Backend, ...] | None:
    items = c.list(value, path, "backends", "[{address: 127.0.0.1:9001, weight: 1}]")
    if items is None:
        return None
    out: list[Backend] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        bpath = _join(path, i)
        if isinstance(item, str):
            item = {"address": item}
        b = c.mapping(item, bpath, "host:port or a mapping like "
                      "{address: 127.0.0.1:9001, weight: 1}")
        if b is None:
            continue
        c.keys(b, bpath, BACKEND_KEYS)
        if "address" not in b:
            c.missing(bpath, "address", "address is required; e.g. address: 127.0.0.1:9001")
            continue
        addr = c.address(b["address"], _join(bpath, "address"), None)
        weight: float | None = 1.0
        if "weight" in b:
            w = b["weight"]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                c.error(_join(bpath, "weight"), f"expected a number >= 0, got {_kind(w)}")
                weight = None
            elif w < 0:
                c.error(_join(bpath, "weight"), f"must be 0 or more (0 drains it), got {w}")
                weight = None
            else:
                weight = float(w)
        zone: str | None = ""
        if "zone" in b:
            zone = b["zone"] if isinstance(b["zone"], str) else None
            if zone is None:
                c.error(_join(bpath, "zone"), f"expected a string, got {_kind(b['zone'])}")
        if addr is None or weight is None or zone is None:
            continue
        key = str(addr)
        if key in seen:
            c.error(_join(bpath, "address"),
                    f"{key} is listed twice (also {_join(path, seen[key])}); raise its weight "
                    "instead")
            continue
        seen[key] = i
        out.append(Backend(host=addr.host, port=addr.port, weight=weight, zone=zone))
    return tuple(out)


DNS_KEYS = ("srv", "name", "port")
RESOLVER_KEYS = ("nameservers", "timeout", "attempts", "min_ttl", "max_ttl", "hold_stale",
                 "hold_nxdomain")
_DNS_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_DNS_EXAMPLE = "{srv: _http._tcp.web.service.consul} or {name: web.internal, port: 8080}"


def _dns_name(c: _Checker, value: Any, path: str) -> str | None:
    """An absolute DNS name (a trailing dot is optional): labels of letters, digits, '-', '_'."""
    name = c.string(value, path)
    if name is None:
        return None
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    if len(name) > 254 or not all(_DNS_LABEL.match(label) for label in labels):
        c.error(path, f"{name!r} is not a DNS name; write it like _http._tcp.web.service.consul "
                "or web.internal (letters, digits, '-' and '_', labels joined by '.')")
        return None
    return name.rstrip(".") + "."


def _dns(c: _Checker, value: Any, path: str) -> DnsQuery | None:
    m = c.mapping(value, path, f"a mapping like {_DNS_EXAMPLE}")
    if m is None:
        return None
    c.keys(m, path, DNS_KEYS)
    if ("srv" in m) == ("name" in m):
        c.error(path, f"give exactly one of srv (SRV records: targets and ports) or name (A and "
                f"AAAA records, with port); e.g. {_DNS_EXAMPLE}")
        return None
    if "srv" in m:
        if "port" in m:
            c.error(_join(path, "port"), "SRV records carry their ports; drop port, or use "
                    "name: for A/AAAA records")
            return None
        srv = _dns_name(c, m["srv"], _join(path, "srv"))
        return DnsQuery(srv=srv) if srv is not None else None
    name = _dns_name(c, m["name"], _join(path, "name"))
    if "port" not in m:
        c.missing(path, "port", f"port is required with name (A/AAAA records carry no port); "
                  f"e.g. {{name: {m['name']}, port: 8080}}")
        return None
    try:
        port = _port(m["port"])
    except ValueError as e:
        c.error(_join(path, "port"), str(e))
        return None
    return DnsQuery(name=name, port=port) if name is not None else None



def _resolvers(c: _Checker, value: Any) -> ResolverSettings | None:
    m = c.section(value, "resolvers", "a mapping like {nameservers: [127.0.0.1:8600], "
                  "timeout: 1s}", RESOLVER_KEYS)
    if m is None:
        return None
    fields: dict[str, Any] = {}
    if m.get("nameservers") is not None:
        npath = _join("resolvers", "nameservers")
        items = c.list(m["nameservers"], npath, "nameservers", "[127.0.0.1:8600, 10.0.0.2]")
        servers = []
        for i, item in enumerate(items or []):
            if isinstance(item, str) and is_ip(item.strip()):
                servers.append((item.strip(), 53))  # a bare address: port 53
                continue
            addr = c.address(item, _join(npath, i), None)
            if addr is None:
                continue
            if not is_ip(addr.host):
                c.error(_join(npath, i), f"{addr.host!r} is not an IP address; a nameserver "
                        "is given by its address (e.g. 127.0.0.1:8600)")
                continue
            servers.append((addr.host, addr.port))
        if items is not None and not items:
            c.error(npath, "an empty list asks no one; list at least one, or drop the key to "
                    "use /etc/resolv.conf's")
        fields["nameservers"] = tuple(servers)
    for key in ("timeout", "min_ttl", "max_ttl", "hold_stale", "hold_nxdomain"):
        if key in m:
            d = c.duration(m[key], _join("resolvers", key), positive=key in ("timeout",
                                                                             "min_ttl"))
            if d is not None:
                fields[key] = d
    if "attempts" in m:
        n = c.integer(m["attempts"], _join("resolvers", "attempts"), 1)
        if n is not _INVALID:
            fields["attempts"] = n
    settings = ResolverSettings(**fields)
    if settings.min_ttl > settings.max_ttl:
        c.error(_join("resolvers", "max_ttl"), f"max_ttl ({_fmt_seconds(settings.max_ttl)}) is "
                f"below min_ttl ({_fmt_seconds(settings.min_ttl)}); raise max_ttl or lower "
                "min_ttl")
    return settings


@dataclass
class _ServiceDraft:
    """One service as parsed, plus what the cross-checks need (where it came from, its routes).

    `service` is None when the entry has errors; its listen and routes still take part in the
    port and route checks so that every conflict is reported in one pass.
    """

    path: str
    label: str  # the name as written (for messages), may be ""
    listen: Address | None
    routes: list[tuple[Route, str]]  # (route, key path of the host/path that made it)
    routed: bool
    service: Service | None


def _service(c: _Checker, value: Any, path: str, defaults: Policy,
             in_routes: frozenset[str] = frozenset()) -> _ServiceDraft | None:
    m = c.mapping(value, path, "a mapping like {name: web, listen: 0.0.0.0:10000, backends: []}")
    if m is None:
        return None
    c.keys(m, path, SERVICE_KEYS)
    ok = True
    name = None
    if "name" not in m:
        c.missing(path, "name", "name is required; e.g. name: web")
        ok = False
    else:
        name = c.string(m["name"], _join(path, "name"), _NAME, _NAME_RULE)
        ok &= name is not None
    label = m["name"] if isinstance(m.get("name"), str) else ""
    mode = "http"
    if "mode" in m:
        mode = m["mode"]
        if mode not in MODES:
            c.error(_join(path, "mode"), f"expected http or tcp, got {_kind(mode)}")
            ok = False
    listen = None
    if m.get("listen") is not None:
        listen = c.address(m["listen"], _join(path, "listen"), ANY_HOST)
        ok &= listen is not None
    tls = None
    passthrough = False
    if m.get("tls") is not None:
        tpath = _join(path, "tls")
        if m["tls"] == "passthrough":
            passthrough = True
            if mode != "tcp":
                c.error(tpath, "passthrough needs mode: tcp (the bytes are relayed undecrypted); "
                        "set mode: tcp, or give {cert, key} to terminate TLS here")
                ok = False
            elif m.get("paths"):
                c.error(_join(path, "paths"), "a passthrough service is routed by SNI name "
                        "only; use hosts, not paths")
                ok = False
        else:
            t = c.mapping(m["tls"], tpath, "a mapping like {cert: tls.crt, key: tls.key}, "
                          "or passthrough (mode: tcp)")
            if t is None:
                ok = False
            else:
                c.keys(t, tpath, ("cert", "key"))
                files = [c.string(t[k], _join(tpath, k)) if k in t else None
                         for k in ("cert", "key")]
                for k in ("cert", "key"):
                    if k not in t:
                        c.missing(tpath, k, f"{k} is required; give the path of the PEM file")
                if None in files:
                    ok = False
                elif m.get("listen") is None:
                    c.error(tpath, "TLS on a service needs a listen port (routed hosts are "
                            "served by a TLS entrypoint; give it the certificate)")
                    ok = False
                else:
                    tls = (files[0], files[1])
    hosts: list[tuple[str, str]] = []
    paths: list[tuple[str, str]] = []
    routed = False
    for key, parse, store, example in (
        ("hosts", _host, hosts, "[web.example.com]"),
        ("paths", _path, paths, "[/api]"),
    ):
        if m.get(key) is None:
            continue
        kpath = _join(path, key)
        items = c.list(m[key], kpath, key, example)
        if items is None:
            ok = False
            continue
        if mode == "tcp" and items and not (passthrough and key == "hosts"):
            c.error(kpath, "a tcp service cannot be routed by host or path; expose it with "
                    "listen, set tls: passthrough to route TLS by SNI name (hosts), or set "
                    "mode: http")
            ok = False
            continue
        routed = routed or bool(items)
        for i, item in enumerate(items):
            parsed = parse(c, item, _join(kpath, i))
            if parsed is None:
                ok = False
            else:
                store.append((parsed, _join(kpath, i)))
    if m.get("listen") is None and not m.get("hosts") and not m.get("paths") \
            and label not in in_routes:
        who = f"service {label!r}" if label else "the service"
        c.error(path, f"not exposed: {who} has no listen, hosts or paths; set listen, or "
                "hosts/paths for the entrypoints, or name it in a route's backends")
        ok = False
    policy_fields = POLICY.read(c, m, path, defaults)
    ok &= len(policy_fields) == sum(1 for k in POLICY_KEYS if k in m)
    backends: tuple[Backend, ...] | None = ()
    if m.get("backends") is not None:
        backends = _backends(c, m["backends"], _join(path, "backends"))
    dns = None
    if m.get("dns") is not None:
        dns = _dns(c, m["dns"], _join(path, "dns"))
        ok &= dns is not None
        if m.get("backends"):
            c.error(_join(path, "dns"), "a service takes its backends from dns or from a "
                    "backends list, not both; drop one of them")
            ok = False
    routes: list[tuple[Route, str]] = []
    if hosts or paths:
        for host, hpath in hosts or [("", "")]:
            for prefix, ppath in paths or [("/", "")]:
                where = " and ".join(p for p in (hpath, ppath) if p)
                routes.append((Route(host=host, path=prefix, service=label), where))
    if mode == "http" and policy_fields.get("proxy_protocol"):
        c.error(_join(path, "proxy_protocol"), "the PROXY protocol is for mode: tcp; an http "
                "service tells its backends the client's address in X-Forwarded-For and "
                "Forwarded already (drop proxy_protocol, or set mode: tcp)")
        ok = False
    if passthrough and policy_fields.get("backend_tls", defaults.backend_tls) is not None:
        c.error(_join(path, "backend_tls"), "a passthrough service relays the client's own TLS "
                "undecrypted; it cannot also speak TLS to its backends (set backend_tls: null "
                "here, or drop tls: passthrough)")
        ok = False
    accept = _accept_proxy(c, m, path)
    ok &= accept is not False
    if accept is not None and accept is not False and m.get("listen") is None:
        c.error(_join(path, "accept_proxy_protocol"), "only a service with listen (a static "
                "port) reads PROXY headers itself; for routed hosts set accept_proxy_protocol "
                "on the entrypoint")
        ok = False
    rules = _path_rules(c, m, path)
    ok &= rules is not None
    http2 = _http2(c, m, path)
    ok &= http2 is not None
    for key in (*PATH_RULE_KEYS, *HTTP2_KEYS):
        if key in m and m.get("listen") is None:
            c.error(_join(path, key), f"{key} is a listener's: it applies on a service's own "
                    f"listen port; for routed hosts set {key} on the entrypoint, whose paths "
                    "are normalised before routing")
            ok = False
    svc = None
    if ok and backends is not None and name is not None:
        policy = dataclasses.replace(defaults, **policy_fields)
        svc = Service(name=name, mode=mode, listen=listen, backends=backends, policy=policy,
                      tls=tls, tls_passthrough=passthrough, accept_proxy_protocol=accept,
                      path_rules=rules or PathRules(), dns=dns,
                      http2=(http2 or (True, False))[0], h2c=(http2 or (True, False))[1])
    return _ServiceDraft(path=path, label=label, listen=listen, routes=routes, routed=routed,
                         service=svc)


def _services(c: _Checker, value: Any, defaults: Policy,
              in_routes: frozenset[str] = frozenset()) -> list[_ServiceDraft]:
    if value is None:
        return []
    items = c.list(value, "services", "services", "[{name: web, listen: 0.0.0.0:10000}]")
    if items is None:
        return []
    drafts: list[_ServiceDraft] = []
    names: dict[str, str] = {}
    for i, item in enumerate(items):
        path = _join("services", i)
        draft = _service(c, item, path, defaults, in_routes)
        if draft is None:
            continue
        drafts.append(draft)
        if not draft.label:
            continue
        if draft.label in names:
            c.error(_join(path, "name"), f"service name {draft.label!r} is already used by "
                    f"{names[draft.label]}; names must be unique")
        else:
            names[draft.label] = path
    return drafts


def _kubernetes(c: _Checker, value: Any) -> KubernetesWatcherConfig | None:
    path = "watchers.kubernetes"
    m = c.section(value, path, "a mapping like {enabled: true, ingress_class: edgelb}",
                  ("enabled", "kubeconfig", "ingress_class", "namespaces", "pod_weights",
                   "publish_service", "publish_address", "leader_election",
                   "ingress_nginx_annotations", "gateway_api"))
    if m is None:
        return None
    # A section that is present is on unless it says `enabled: false`.
    fields: dict[str, Any] = {"enabled": True}
    if "enabled" in m:
        fields["enabled"] = c.boolean(m["enabled"], _join(path, "enabled"))
    if m.get("kubeconfig") is not None:
        fields["kubeconfig"] = c.string(m["kubeconfig"], _join(path, "kubeconfig"))
    if "ingress_class" in m:
        fields["ingress_class"] = c.string(
            m["ingress_class"], _join(path, "ingress_class"), _K8S_NAME,
            "an IngressClass name is a lowercase DNS label, e.g. edgelb")
    if m.get("namespaces") is not None:
        npath = _join(path, "namespaces")
        items = c.list(m["namespaces"], npath, "namespace names", "[default, web]")
        ns = []
        for i, item in enumerate(items or []):
            ns.append(c.string(item, _join(npath, i), _K8S_NAME,
                               "a namespace is a lowercase DNS label, e.g. default"))
        fields["namespaces"] = None if items is None or None in ns else tuple(ns)
    for key in ("pod_weights", "leader_election", "ingress_nginx_annotations", "gateway_api"):
        if key in m:
            fields[key] = c.boolean(m[key], _join(path, key))
    if m.get("publish_service") is not None:
        fields["publish_service"] = c.string(
            m["publish_service"], _join(path, "publish_service"),
            re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"),
            "write it as namespace/name, e.g. edgelb/edgelb")
    if m.get("publish_address") is not None:
        apath = _join(path, "publish_address")
        raw = m["publish_address"]
        items = [raw] if isinstance(raw, str) else c.list(raw, apath, "addresses",
                                                          "[203.0.113.10, lb.example.com]")
        addrs = []
        for i, item in enumerate(items or []):
            addrs.append(c.string(item, _join(apath, i), re.compile(r"^[A-Za-z0-9.:-]+$"),
                                  "an IP address or a host name"))
        fields["publish_address"] = None if items is None or None in addrs else tuple(addrs)
    if None in fields.values():
        return None
    return KubernetesWatcherConfig(**fields)


def _marathon(c: _Checker, value: Any) -> MarathonWatcherConfig | None:
    path = "watchers.marathon"
    m = c.section(value, path, "a mapping like {urls: [http://marathon:8080], group: external}",
                  MARATHON_KEYS)
    if m is None:
        return None
    ok = True
    fields: dict[str, Any] = {}
    urls: list[str] = []
    upath = _join(path, "urls")
    if m.get("urls") is None:
        c.missing(path, "urls", "urls is required; list the Marathon URLs, e.g. [http://marathon:8080]")
        ok = False
    else:
        items = c.list(m["urls"], upath, "URLs", "[http://marathon-1:8080]")
        if items is None:
            ok = False
        elif not items:
            c.error(upath, "must list at least one URL, e.g. [http://marathon:8080]")
            ok = False
        for i, item in enumerate(items or []):
            parts = urlsplit(item) if isinstance(item, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
                c.error(_join(upath, i), f"expected an http(s) URL like http://marathon:8080, "
                        f"got {_kind(item)}")
                ok = False
            else:
                urls.append(item.rstrip("/"))
    if "group" in m:
        g = c.string(m["group"], _join(path, "group"), _GROUP,
                     "a marathon-lb group is one name (letters, digits, '_', '-', '.') or *")
        ok &= g is not None
        fields["group"] = g
    if "health" in m:
        h = c.boolean(m["health"], _join(path, "health"))
        ok &= h is not None
        fields["health"] = h
    if "resync" in m:
        r = c.duration(m["resync"], _join(path, "resync"), positive=True)
        ok &= r is not None
        fields["resync"] = r
    for key in ("token_file", "dcos_credentials", "ca"):
        if m.get(key) is not None:
            f = c.string(m[key], _join(path, key))
            ok &= f is not None
            fields[key] = f
    if m.get("auth") is not None:
        auth = _marathon_auth(c, m["auth"], _join(path, "auth"))
        ok &= auth is not None
        fields.update(auth or {})
    given = [k for k in ("auth", "token_file", "dcos_credentials") if m.get(k) is not None]
    if len(given) > 1:
        c.error(_join(path, given[1]), f"{given[1]} and {given[0]} are both set; Marathon takes "
                "one kind of credentials: keep one")
        ok = False
    if fields.get("ca") and not any(u.startswith("https:") for u in urls):
        c.warnings.append(f"{path}.ca: no URL is https, so the CA is not used")
    return MarathonWatcherConfig(urls=tuple(urls), **fields) if ok else None


def _marathon_auth(c: _Checker, value: Any, path: str) -> dict[str, str] | None:
    """`{user: U, password: P}` or `{user: U, password_file: FILE}` (marathon-lb's
    --auth-credentials user:password)."""
    m = c.section(value, path, "a mapping like {user: marathon, password_file: /run/secrets/pw}",
                  ("user", "password", "password_file"))
    if m is None:
        return None
    out: dict[str, str] = {}
    if m.get("user") is None:
        c.missing(path, "user", "user is required; e.g. {user: marathon, password_file: FILE}")
        return None
    user = c.string(m["user"], _join(path, "user"))
    if user is None:
        return None
    if ":" in user:
        c.error(_join(path, "user"), "a basic-auth user name cannot hold ':'; put the password "
                "in password or password_file")
        return None
    out["user"] = user
    has = [k for k in ("password", "password_file") if m.get(k) is not None]
    if len(has) != 1:
        c.error(path, "give exactly one of password and password_file (a file keeps the "
                "secret out of the config)")
        return None
    secret = c.string(m[has[0]], _join(path, has[0]))
    if secret is None:
        return None
    out[has[0]] = secret
    return out


def _watchers(c: _Checker, value: Any) -> tuple[KubernetesWatcherConfig | None,
                                                MarathonWatcherConfig | None]:
    m = c.section(value, "watchers", "a mapping with kubernetes and/or marathon",
                  ("kubernetes", "marathon"))
    if m is None:
        return None, None
    return _kubernetes(c, m.get("kubernetes")), _marathon(c, m.get("marathon"))


def _shutdown(c: _Checker, value: Any) -> ShutdownConfig:
    m = c.section(value, "shutdown", "a mapping like {delay: 5s, grace: 30s}", ("delay", "grace"))
    if m is None:
        return ShutdownConfig()
    fields = {}
    for key in ("delay", "grace"):
        if key in m:
            d = c.duration(m[key], _join("shutdown", key))
            if d is not None:
                fields[key] = d
    return ShutdownConfig(**fields)


def _limits(c: _Checker, value: Any) -> LimitsConfig:
    keys = ("connections", "connections_per_client", "headers", "min_body_rate")
    m = c.section(value, "limits", "a mapping like {connections: 20000, headers: 100}", keys)
    if m is None:
        return LimitsConfig()
    fields: dict[str, Any] = {}
    for key in keys[:3]:
        if key in m:
            n = c.integer(m[key], _join("limits", key), 0 if key == "connections_per_client" else 1)
            if n is not _INVALID:
                fields[key] = n
    if "min_body_rate" in m:
        try:
            fields["min_body_rate"] = parse_size(m["min_body_rate"])
        except ValueError as e:
            c.error("limits.min_body_rate", f"{e} (bytes per second, e.g. 1KiB; 0 = none)")
    return LimitsConfig(**fields)


TLS_KEYS = ("session_tickets", "min_version")
_TLS_VERSIONS = {"1.2": "1.2", "1.3": "1.3", 1.2: "1.2", 1.3: "1.3",
                 "tlsv1.2": "1.2", "tlsv1.3": "1.3"}


def _tls_options(c: _Checker, value: Any) -> TLSOptions:
    """The top-level `tls:` block: options of every TLS listener (not certificates)."""
    m = c.section(value, "tls", 'a mapping like {session_tickets: true, min_version: "1.2"}',
                  TLS_KEYS)
    if m is None:
        return TLSOptions()
    fields: dict[str, Any] = {}
    if "session_tickets" in m:
        on = c.boolean(m["session_tickets"], "tls.session_tickets")
        if on is not None:
            fields["session_tickets"] = on
    if "min_version" in m:
        raw = m["min_version"]
        # a plain YAML 1.2 is a number: accepted as the string it looks like
        key = raw.lower() if isinstance(raw, str) else raw if isinstance(raw, float) else None
        version = _TLS_VERSIONS.get(key) if key is not None else None
        if version is None:
            c.error("tls.min_version", f'expected "1.2" or "1.3", got {_kind(raw)} (TLS 1.0 and '
                    "1.1 are deprecated by RFC 8996 and not offered)")
        else:
            fields["min_version"] = version
    return TLSOptions(**fields)


def _metrics(c: _Checker, value: Any) -> MetricsConfig:
    """The `metrics:` section: {per_backend: false} drops the series labelled by backend."""
    m = c.section(value, "metrics", "a mapping like {per_backend: false}", ("per_backend",))
    if m is None or "per_backend" not in m:
        return MetricsConfig()
    on = c.boolean(m["per_backend"], "metrics.per_backend")
    return MetricsConfig(per_backend=on) if on is not None else MetricsConfig()


MAX_WORKERS = 256


def _workers(c: _Checker, value: Any) -> int | str:
    """`workers: N | auto`: data-plane worker processes (default 1: one process)."""
    if value is None:
        return 1
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        c.error("workers", f"expected a count from 1 to {MAX_WORKERS} or \"auto\", got "
                f"{value!r}; e.g. workers: 4, or workers: auto (one per usable core)")
        return 1
    return value


def _env_int(c: _Checker, name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        c.error(f"${name}", f"expected a whole number, got {raw!r}")
        return default


def _instance(c: _Checker, value: Any) -> InstanceConfig:
    path = "instance"
    m: dict = {}
    if value is not None:
        m = c.mapping(value, path, "a mapping like {zone: eu-west-1a, replica: 0, replicas: 3}")
        if m is None:
            return InstanceConfig()
        c.keys(m, path, ("zone", "replica", "replicas"))
    zone = os.environ.get("EDGELB_ZONE", "")
    if "zone" in m:
        zone = c.string(m["zone"], _join(path, "zone")) or ""
    replica = _env_int(c, "EDGELB_REPLICA", 0)
    if "replica" in m:
        n = c.integer(m["replica"], _join(path, "replica"), 0)
        replica = n if isinstance(n, int) else 0
    replicas = _env_int(c, "EDGELB_REPLICAS", 1)
    if "replicas" in m:
        n = c.integer(m["replicas"], _join(path, "replicas"), 1)
        replicas = n if isinstance(n, int) else 1
    if not 0 <= replica < max(1, replicas):
        c.error(_join(path, "replica"),
                f"must be from 0 to replicas - 1 ({replicas - 1}), got {replica}")
        return InstanceConfig(zone=zone)
    return InstanceConfig(zone=zone, replica=replica, replicas=max(1, replicas))


def _check_ports(c: _Checker, admin: Address, admin_set: bool,
                 entrypoints: tuple[Entrypoint, ...], drafts: list[_ServiceDraft]) -> None:
    used: dict[int, str] = {}
    owners: list[tuple[int, str]] = [
        (admin.port, "admin.listen" if admin_set else f"admin.listen (default {admin})")
    ]
    owners += [(e.listen.port, f"entrypoints.{e.name}.listen") for e in entrypoints]
    owners += [(d.listen.port, f"{d.path}.listen ({d.label})")
               for d in drafts if d.listen is not None]
    for port, owner in owners:
        if port in used:
            where = owner.split(" ")[0]
            c.error(where, f"port {port} is already used by {used[port]}; every listener "
                    "needs its own port")
        else:
            used[port] = owner


def _check_routes(c: _Checker, entrypoints: tuple[Entrypoint, ...],
                  drafts: list[_ServiceDraft]) -> list[Route]:
    routed = [d for d in drafts if d.routed]
    if routed and not entrypoints:
        names = ", ".join(f"{d.path} ({d.label})" for d in routed)
        c.error("entrypoints", f"none defined, but {names} route by hosts/paths; add e.g. "
                "entrypoints: {http: {listen: 0.0.0.0:80}}, or expose them with listen")
    elif not any(e.tls is not None for e in entrypoints):
        for d in routed:
            if d.service is not None and d.service.tls_passthrough:
                c.error(_join(d.path, "tls"), f"{d.label!r} passes TLS through by SNI name on "
                        "TLS entrypoints, and no entrypoint has tls; add tls to one")
    taken: dict[tuple[str, str], tuple[str, str]] = {}
    routes: list[Route] = []
    for d in routed:
        for route, where in d.routes:
            key = (route.host, route.path)
            if key in taken:
                other, other_path = taken[key]
                shown = f"{route.host}{route.path}" if route.host else f"{route.path} (any host)"
                c.error(where or d.path, f"route {shown} is already taken by service "
                        f"{other!r} ({other_path}); each host+path leads to one service")
                continue
            taken[key] = (d.label, d.path)
            routes.append(route)
    return routes


def _file_routes(c: _Checker, value: Any, entrypoints: tuple[Entrypoint, ...],
                 drafts: list[_ServiceDraft], service_routes: list[Route]) -> list[Route]:
    """The `routes:` list (edgelb/ops/routes_config.py), and its precedence conflicts with
    itself and with the services' hosts/paths."""
    http = {d.label for d in drafts if d.service is not None and d.service.mode == "http"}
    routes = parse_routes(c, value, _host, _path, http)
    if routes and not entrypoints:
        c.error("routes", "routes are served on entrypoints, and none is defined; add e.g. "
                "entrypoints: {http: {listen: 0.0.0.0:80}}")
    labelled = [dataclasses.replace(r, name=f"service {r.service} (hosts/paths)", order=-1)
                for r in service_routes]
    for problem in explain_conflicts([*labelled, *routes]):
        c.error("routes", problem)
    return routes


# ---------------------------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that records duplicate keys instead of silently keeping the last one."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = self.construct_scalar(key_node)
                if key in seen and key != "<<":
                    mark = key_node.start_mark
                    self.duplicates.append(
                        f"line {mark.line + 1}, column {mark.column + 1}: duplicate key "
                        f"{key!r}; each key may appear once in a mapping")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> tuple[Any, list[str]]:
    loader = _Loader(text)
    try:
        return loader.get_single_data(), loader.duplicates
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "yaml"
        problem = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise ConfigError([f"{where}: YAML syntax error: {problem}; check the indentation "
                           "and quoting around this spot"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"yaml: {e}"]) from None
    finally:
        loader.dispose()


def parse_config(text: str | bytes, origin: str = "<config>") -> Config:
    """Parse and validate a whole config document; raises ConfigError listing every problem."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError([f"(file): not UTF-8 text at byte {e.start}; save the file as "
                               "UTF-8"], origin) from None
    try:
        doc, duplicates = _load_yaml(text)
    except ConfigError as e:
        raise ConfigError(e.errors, origin) from None
    if doc is None:
        raise ConfigError(["(file): the config is empty; add at least a services: section, "
                           "e.g. services: [{name: web, listen: 10000, backends: []}]"], origin)
    c = _Checker()
    c.errors.extend(duplicates)
    top = c.mapping(doc, "", "a mapping of sections (admin, entrypoints, defaults, services, "
                    "watchers, shutdown)")
    if top is None:
        raise ConfigError(c.errors, origin)
    c.keys(top, "", TOP_KEYS)
    admin = _admin(c, top.get("admin"))
    admin_set = isinstance(top.get("admin"), dict) and "listen" in top["admin"]
    entrypoints = _entrypoints(c, top.get("entrypoints"))
    defaults = _defaults(c, top.get("defaults"))
    drafts = _services(c, top.get("services"), defaults, named_in_routes(top.get("routes")))
    kubernetes, marathon = _watchers(c, top.get("watchers"))
    shutdown = _shutdown(c, top.get("shutdown"))
    limits = _limits(c, top.get("limits"))
    tls_options = _tls_options(c, top.get("tls"))
    instance = _instance(c, top.get("instance"))
    resolvers = _resolvers(c, top.get("resolvers"))
    telemetry = parse_telemetry(c, top)
    metrics = _metrics(c, top.get("metrics"))
    workers = _workers(c, top.get("workers"))
    _check_ports(c, admin, admin_set, entrypoints, drafts)
    routes = _check_routes(c, entrypoints, drafts)
    routes += _file_routes(c, top.get("routes"), entrypoints, drafts, routes)
    if c.errors:
        raise ConfigError(c.errors, origin)
    snapshot = Snapshot(
        source="file",
        services=tuple(d.service for d in drafts if d.service is not None),
        routes=tuple(routes),
    )
    return Config(admin=admin, entrypoints=entrypoints, defaults=defaults, snapshot=snapshot,
                  kubernetes=kubernetes, marathon=marathon, shutdown=shutdown,
                  instance=instance, limits=limits, tls=tls_options, telemetry=telemetry,
                  metrics=metrics, warnings=tuple(c.warnings), resolvers=resolvers,
                  workers=workers)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse the file at `path`; unreadable files raise ConfigError too."""
    origin = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([f"(file): cannot read {origin}: {e.strerror or e}; check the path "
                           "and its permissions"], origin) from None
    return parse_config(data, origin=origin)


def config_loader(origin: str) -> Callable[[bytes], Config]:
    """A loader for watchers.file.FileWatcher: bytes of the file -> Config."""

    def load(data: bytes) -> Config:
        return parse_config(data, origin=origin)

    return load


# ---------------------------------------------------------------------------------------------
# Summary and `edgelb check`


def _fmt_accept(policy: Any) -> str:
    if policy is None:
        return ""
    if policy.trusted is None:
        return ", PROXY header required"
    return f", PROXY header from {', '.join(policy.cidrs)}"


def _fmt_paths(rules: PathRules) -> str:
    """The path rules that differ from the safe defaults (edgelb/http/target.py)."""
    out = ""
    if rules.encoded_slashes == "keep":
        out += ", %2F and %5C passed on encoded"
    if not rules.merge_slashes:
        out += ", // kept"
    return out


def _fmt_precedence(routes: tuple[Route, ...]) -> list[str]:
    """The `routes:` in the order they are tried, per host (watchers/routing.py)."""
    rich = [r for r in routes if r.name]
    if not rich:
        return []
    out = [f"routes: {len(rich)} (tried in this order per host; exact hosts, then wildcards, "
           "then any host)"]
    by_host: dict[str, list[Route]] = {}
    for r in routes:
        by_host.setdefault(r.host, []).append(r)
    for host in sorted(by_host, key=lambda h: (not h, h.startswith("*."), h)):
        if not any(r.name for r in by_host[host]):
            continue
        out.append(f"  {host or '(any host)'}")
        for r in sorted(by_host[host], key=route_precedence):
            split = ", ".join(f"{b.service} {b.weight}" for b in r.backends) or r.service
            if r.filters is not None and r.filters.redirect is not None:
                split = f"redirect {r.filters.redirect.status}"
            out.append(f"    {describe_route(r)} -> {split}  [{r.name or 'hosts/paths'}]")
            filters = _fmt_filters(r)
            if filters:
                out.append(f"      {filters}")
    return out


def _fmt_filters(route: Route) -> str:
    """What a route does besides choosing a service, in a few words."""
    f = route.filters
    parts = []
    if f is not None:
        for what, edits in (("request", f.request_headers), ("response", f.response_headers)):
            if edits is not None:
                n = len(edits.set) + len(edits.add) + len(edits.remove)
                parts.append(f"{what} headers: {n} edit{'s' if n != 1 else ''}")
        if f.rewrite is not None:
            rw = f.rewrite
            to = (f"path {rw.path}" if rw.path is not None
                  else f"prefix -> {rw.prefix}" if rw.prefix is not None else "")
            parts.append("rewrite " + " ".join(x for x in (to, f"host {rw.host}"
                                                            if rw.host else "") if x))
        for m in f.mirrors:
            parts.append(f"mirror {m.percent:g}% to {m.service}")
        if f.cors is not None:
            parts.append(f"CORS for {', '.join(f.cors.allow_origins)}")
        if f.limits is not None:
            lim = f.limits
            if lim.rps:
                parts.append(f"{lim.rps:g} req/s per client (burst {lim.burst or lim.rps * 5:g})")
            if lim.connections:
                parts.append(f"{lim.connections} requests in flight per client")
    if route.timeout:
        parts.append(f"timeout {route.timeout:g}s")
    return "; ".join(parts)


def summarize(config: Config) -> str:
    """A human summary: listeners, services with their exposure, policy and backends."""
    lines = [f"admin: {config.admin}"]
    if not config.metrics.per_backend:
        lines[0] += " (metrics: per-backend series off)"
    for e in config.entrypoints:
        mark = " (tls)" if e.tls else ""
        lines.append(f"entrypoint {e.name}: {e.listen}{mark}{_fmt_accept(e.accept_proxy_protocol)}"
                     f"{_fmt_paths(e.path_rules)}")
    services = config.snapshot.services
    lines.append(f"services: {len(services)}")
    for s in services:
        ends: list[str] = []
        if s.tls_passthrough:
            ends.append("TLS passed through")
        elif s.tls is not None:
            ends.append("TLS terminated")
        if s.policy.backend_tls is not None:
            ends.append("TLS to backends")
        lines.append(f"  {s.name} ({', '.join([s.mode, *ends])})")
        if s.listen is not None:
            lines.append(f"    listen {s.listen}{_fmt_accept(s.accept_proxy_protocol)}"
                         f"{_fmt_paths(s.path_rules)}")
        routes = [r for r in config.snapshot.routes if r.service == s.name and not r.name]
        if routes and s.tls_passthrough:
            lines.append(f"    SNI names {', '.join(r.host for r in routes)} "
                         "(on the TLS entrypoints)")
        elif routes:
            shown = ", ".join(f"{r.host}{r.path}" if r.host else f"{r.path} (any host)"
                              for r in routes)
            lines.append(f"    routes {shown}")
        lines.append(f"    {POLICY.summary(s.policy, s.mode)}")
        if s.dns is not None:
            lines.append(f"    backends: from DNS, {s.dns}")
        elif not s.backends:
            lines.append("    backends: none (requests get 503 until some are added)")
        else:
            total = sum(b.weight for b in s.backends) or 1.0
            lines.append(f"    backends: {len(s.backends)}")
            for b in s.backends:
                zone = f", zone {b.zone}" if b.zone else ""
                share = 100.0 * b.weight / total
                lines.append(f"      {b.key} weight {b.weight:g} ({share:.0f}%){zone}")
    lines.extend(_fmt_precedence(config.snapshot.routes))
    k = config.kubernetes
    if k is not None:
        state = "enabled" if k.enabled else "disabled"
        ns = ", ".join(k.namespaces) if k.namespaces else "all namespaces"
        nginx = ", ingress-nginx annotations read" if k.ingress_nginx_annotations else ""
        lines.append(f"watcher kubernetes: {state}, ingress class {k.ingress_class}, {ns}"
                     f"{nginx}")
    m = config.marathon
    if m is not None:
        creds = ("basic auth as " + m.user if m.user else "a token file" if m.token_file
                 else "DC/OS service account" if m.dcos_credentials else "no credentials")
        lines.append(f"watcher marathon: {', '.join(m.urls)} (group {m.group}, health "
                     f"results {'honoured' if m.health else 'ignored'}, resync every "
                     f"{_fmt_seconds(m.resync)}, {creds}{', CA ' + m.ca if m.ca else ''})")
    if config.tls != TLSOptions():
        t = config.tls
        lines.append(f"tls: session tickets {'on' if t.session_tickets else 'off'}, "
                     f"TLS {t.min_version} and later")
    if config.resolvers is not None or any(s.dns for s in services):
        lines.append(f"resolvers: {_fmt_resolvers(config.resolvers)}")
    lines.extend(telemetry_summary(config.telemetry))
    sd = config.shutdown
    lines.append(f"shutdown: delay {_fmt_seconds(sd.delay)}, grace {_fmt_seconds(sd.grace)}")
    if config.workers != 1:
        what = ("one per usable core" if config.workers == "auto"
                else f"{config.workers} processes")
        lines.append(f"workers: {config.workers} ({what}, and a control process)")
    return "\n".join(lines)


def _fmt_resolvers(r: ResolverSettings | None) -> str:
    if r is None:
        return "/etc/resolv.conf"
    servers = ", ".join(str(Address(h, p)) for h, p in r.nameservers) or "/etc/resolv.conf"
    return (f"{servers}; timeout {_fmt_seconds(r.timeout)} x {r.attempts}, TTL within "
            f"[{_fmt_seconds(r.min_ttl)}, {_fmt_seconds(r.max_ttl)}], stale held "
            f"{_fmt_seconds(r.hold_stale)}, NXDOMAIN held {_fmt_seconds(r.hold_nxdomain)}")


def _tls_file_errors(config: Config) -> list[str]:
    """The TLS certificate files of the entrypoints, loaded as `run` would load them."""
    from edgelb.net.tls import TLSConfigError, load_files

    errors = []
    for e in config.entrypoints:
        if e.tls is not None and e.tls[0]:
            try:
                load_files(*e.tls)
            except TLSConfigError as err:
                errors.append(f"entrypoints.{e.name}.tls: {err}")
    for svc in config.snapshot.services:
        if svc.tls is not None:
            try:
                load_files(*svc.tls)
            except TLSConfigError as err:
                errors.append(f"services ({svc.name}).tls: {err}")
    return errors


def _marathon_file_errors(config: Config) -> list[str]:
    """The files `watchers.marathon` names, read as `run` reads them."""
    if config.marathon is None:
        return []
    errors = []
    for key, path in config.marathon.files().items():
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            errors.append(f"{key}: cannot read {path} ({e.strerror or e}); fix the path or "
                          "its permissions")
    return errors


def tls_file_paths(config: Config) -> list[str]:
    """Every certificate, key and CA file the config names: the entrypoints' and static ports'
    `tls` pairs, and the `backend_tls` files of the defaults and of each service."""
    paths: list[str] = []
    for e in config.entrypoints:
        if e.tls is not None:
            paths.extend(e.tls)
    policies = [config.defaults]
    for svc in config.snapshot.services:
        if svc.tls is not None:
            paths.extend(svc.tls)
        policies.append(svc.policy)
    for policy in policies:
        spec = policy.backend_tls
        if spec is not None:
            paths.extend(p for p in (spec.ca, spec.cert, spec.key) if p)
    return list(dict.fromkeys(p for p in paths if p))


def with_tls_files(config: Config, read: Callable[[str], bytes]) -> Config:
    """`config` with the digest of each of its TLS files, read with `read` (e.g. a file
    watcher's, which then watches them); a file that cannot be read gets "" (applying the config
    reports why)."""
    digests = []
    for path in tls_file_paths(config):
        try:
            digests.append((path, hashlib.sha256(read(path)).hexdigest()))
        except OSError:
            digests.append((path, ""))
    return dataclasses.replace(config, tls_files=tuple(digests))


def check_command(path: str) -> int:
    """`edgelb check -c FILE`: 0 and a summary when valid, else 1 and every error on stderr."""
    try:
        config = load_config(path)
        refused = _tls_file_errors(config) + _marathon_file_errors(config)
        if refused:
            raise ConfigError(refused, path)
    except ConfigError as e:
        n = len(e.errors)
        print(f"{path}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
        for err in e.errors:
            print(f"  {err}", file=sys.stderr)
        return 1
    print(f"{path}: OK")
    for warning in config.warnings:
        print(f"{path}: warning: {warning}", file=sys.stderr)
    print(summarize(config))
    return 0


# ---------------------------------------------------------------------------------------------
# `edgelb schema`: the JSON Schema of the config file (editor completion), and the README table
# of the per-service keys. The per-service part comes from watchers/schema.py; the sections
# around it follow the key lists above (a test keeps them equal).

def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [{"type": "null"}, schema]}


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the whole config file."""
    address = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535},
                         {"type": "string"}], "description": "host:port, [v6]:port or a port"}
    name = {"type": "string", "pattern": _NAME.pattern}
    strings = {"type": "array", "items": {"type": "string"}}
    accept = {"anyOf": [{"type": ["boolean", "null"]}, {**strings, "minItems": 1}],
              "description": "read a PROXY header first: true (every peer), false, or the "
              "CIDRs of the balancers that send one"}
    cert_key = strict_object({"cert": {"type": "string"}, "key": {"type": "string"}})
    paths_rules = {"merge_slashes": {"type": "boolean"},
                   "encoded_slashes": {"enum": list(ENCODED_SLASHES)},
                   "http2": {"type": "boolean", "description": "TLS: offer h2 by ALPN"},
                   "h2c": {"type": "boolean", "description": "plain: HTTP/2 by prior knowledge"}}
    policy = POLICY.json_properties()
    entrypoint = strict_object({
        "listen": address,
        "tls": {"anyOf": [{"type": ["boolean", "null"]}, cert_key]},
        "accept_proxy_protocol": accept, **paths_rules}, required=["listen"])
    backend = {"anyOf": [{"type": "string"}, strict_object({
        "address": address,
        "weight": {"type": "number", "minimum": 0},
        "zone": {"type": "string"}}, required=["address"])]}
    service = strict_object({
        "name": name,
        "listen": _nullable(address),
        "mode": {"enum": list(MODES)},
        "hosts": _nullable(strings),
        "paths": _nullable(strings),
        "backends": _nullable({"type": "array", "items": backend}),
        "dns": _nullable({"anyOf": [
            strict_object({"srv": {"type": "string"}}, required=["srv"]),
            strict_object({"name": {"type": "string"}, "port": address["anyOf"][0]},
                          required=["name", "port"])],
            "description": "backends from DNS: SRV records, or A/AAAA records on a port"}),
        "tls": {"anyOf": [{"type": "null"}, {"const": "passthrough"},
                          {**cert_key, "required": ["cert", "key"]}]},
        "accept_proxy_protocol": accept, **paths_rules, **policy}, required=["name"])
    kubernetes = strict_object({
        "enabled": {"type": "boolean"}, "kubeconfig": {"type": ["string", "null"]},
        "ingress_class": {"type": "string"}, "namespaces": _nullable(strings),
        "pod_weights": {"type": "boolean"}, "publish_service": {"type": ["string", "null"]},
        "publish_address": {"anyOf": [{"type": ["string", "null"]}, strings]},
        "leader_election": {"type": "boolean"},
        "ingress_nginx_annotations": {"type": "boolean"}, "gateway_api": {"type": "boolean"}})
    marathon = strict_object({
        "urls": {**strings, "minItems": 1}, "group": {"type": "string"},
        "health": {"type": "boolean"}, "resync": DURATION,
        "auth": strict_object({"user": {"type": "string"}, "password": {"type": "string"},
                               "password_file": {"type": "string"}}, required=["user"]),
        "token_file": {"type": "string"}, "dcos_credentials": {"type": "string"},
        "ca": {"type": "string"}}, required=["urls"])
    duration = DURATION
    sections = {
        "admin": strict_object({"listen": address}),
        "entrypoints": {"type": "object", "propertyNames": name,
                        "additionalProperties": entrypoint},
        "defaults": strict_object(policy),
        "services": {"type": "array", "items": service},
        "routes": {"type": "array", "items": _route_schema(strings)},
        "watchers": strict_object({"kubernetes": _nullable(kubernetes),
                                   "marathon": _nullable(marathon)}),
        "shutdown": strict_object({"delay": duration, "grace": duration}),
        "instance": strict_object({"zone": {"type": "string"},
                                   "replica": {"type": "integer", "minimum": 0},
                                   "replicas": {"type": "integer", "minimum": 1}}),
        "limits": strict_object({
            "connections": {"type": "integer", "minimum": 1},
            "connections_per_client": {"type": "integer", "minimum": 0},
            "headers": {"type": "integer", "minimum": 1},
            "min_body_rate": SIZE}),
        "resolvers": strict_object({
            "nameservers": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "timeout": duration, "attempts": {"type": "integer", "minimum": 1},
            "min_ttl": duration, "max_ttl": duration, "hold_stale": duration,
            "hold_nxdomain": duration}),
        "tls": strict_object({
            "session_tickets": {"type": "boolean"},
            "min_version": {"anyOf": [{"enum": [1.2, 1.3]}, {
                "type": "string", "pattern": "^([Tt][Ll][Ss][Vv])?1\\.[23]$"}]}}),
        **telemetry_schemas(strict_object),
        "metrics": strict_object({"per_backend": {"type": "boolean"}}),
        "workers": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_WORKERS},
                              {"const": "auto"}]},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "edgelb config",
        "description": "The YAML config file of edgelb (edgelb run -c FILE)",
        **strict_object({key: _nullable(sections[key]) for key in TOP_KEYS}),
    }


def _route_schema(strings: dict[str, Any]) -> dict[str, Any]:
    """One item of `routes:` (edgelb/ops/routes_config.py)."""
    text = {"type": ["string", "number"]}
    values = {"anyOf": [{"type": "object", "additionalProperties": text},
                        {"type": "array", "items": strict_object(
                            {"name": {"type": "string"}, "value": text,
                             "regex": {"type": "string"}}, required=["name"])}]}
    edits = strict_object({"set": {"type": "object", "additionalProperties": text},
                           "add": {"type": "object", "additionalProperties": text},
                           "remove": strings})
    path = {"type": "string", "pattern": "^/"}
    match = strict_object({
        "path": strict_object({"exact": path, "prefix": path, "regex": path}),
        "headers": values, "query": values, "method": {"type": "string"}})
    return strict_object({
        "hosts": _nullable(strings),
        "matches": {"type": "array", "items": match},
        "filters": strict_object({
            "request_headers": edits, "response_headers": edits,
            "redirect": strict_object({
                "scheme": {"enum": ["http", "https"]}, "host": {"type": "string"},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "path": path, "prefix": path, "status": {"enum": [301, 302, 303, 307, 308]}}),
            "rewrite": strict_object({"host": {"type": "string"}, "path": path,
                                      "prefix": path})}),
        "backends": {"type": "array", "items": {"anyOf": [{"type": "string"}, strict_object(
            {"service": {"type": "string"}, "weight": {"type": "integer", "minimum": 0}},
            required=["service"])]}},
        "timeout": DURATION})


def schema_command(markdown: bool = False) -> int:
    """`edgelb schema [--markdown]`: the JSON Schema of the config file, or the README table of
    the per-service keys."""
    if markdown:
        sys.stdout.write(POLICY.markdown())
    else:
        print(json.dumps(json_schema(), indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# Per-service keys from string annotations (Kubernetes `edgelb.io/<key>`, Marathon labels)


def policy_from_annotations(
    annotations: dict[str, str], base: Policy, prefix: str = "edgelb.io/"
) -> tuple[Policy, list[str]]:
    """The per-service keys set as annotations `<prefix><key>` over `base`, validated exactly
    as in the config file (watchers/schema.py `PolicySchema.from_annotations`); the reader
    edgelb hands to the Kubernetes watcher."""
    return POLICY.from_annotations(annotations, base, prefix)
