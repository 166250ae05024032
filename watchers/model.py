"""The shared vocabulary: immutable values that watchers produce and the runtime applies.

Nothing here is mutated after construction. The runtime keeps the live, mutable state
(counters, in-flight, connection pools) beside these values, keyed by `Backend.key` and
`Service.name`, so a new Snapshot can be diffed against the old one cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port to bind or connect to. IPv6 hosts are stored without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """An active health check of each backend of a service (HAProxy's `check`)."""

    path: str = "/healthz"
    interval: float = 2.0  # between checks of one backend, jittered
    timeout: float = 1.0
    rise: int = 2  # consecutive successes that make a down backend healthy
    fall: int = 3  # consecutive failures that make a healthy backend down
    kind: str = "http"  # http | tcp (connect only) | grpc (grpc.health.v1 Check over HTTP/2)
    method: str = "GET"
    status: tuple[int, int] = (200, 399)  # expected status range, inclusive
    host: str = ""  # Host header of the check; "" = the backend's address
    service: str = ""  # grpc: the service name asked about ("": the server as a whole)


OUTLIER_KINDS = ("connect", "reset", "timeout", "500", "502", "503", "504")


@dataclass(frozen=True, slots=True)
class Outlier:
    """Passive outlier ejection: consecutive failures take a backend out for a while."""

    failures: int = 5  # consecutive failures that eject
    kinds: frozenset[str] = frozenset({"connect", "reset", "timeout", "502", "503", "504"})
    ejection: float = 30.0  # seconds, multiplied by the times this backend was ejected
    max_ejection: float = 300.0
    max_ejected: float = 0.1  # share of a pool that may be out at once (always one)


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Retries in flight may be at most `ratio` of the requests in flight, or `min`."""

    ratio: float = 0.2
    min: int = 3


@dataclass(frozen=True, slots=True)
class Policy:
    """Per-service behaviour. `defaults:` in the config gives the base values."""

    balance: str = "least-loaded"
    connect_timeout: float = 2.0
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    tunnel_timeout: float = 3600.0  # an upgraded (WebSocket) connection silent this long closes
    response_timeout: float = 60.0
    max_inflight: int | None = None  # per-backend cap, scaled by weight / mean weight
    adaptive: bool = False  # the cap follows a gradient controller on observed latency
    queue_timeout: float = 1.0
    queue_size: int = 1024  # requests that may wait while every backend is at its cap
    max_idle: int = 64  # idle keep-alive connections kept per backend
    health_check: HealthCheck | None = None
    slow_start: float = 30.0  # a backend added to a running pool ramps 10% -> 100% over this
    hash_key: str = "source"  # what `balance: hash` hashes: source | header:NAME | cookie:NAME
    sticky: bool = False  # pin a client to its backend with a cookie (marathon-lb's STICKY)
    sticky_cookie: str = "edgelb_server"  # that cookie's name
    zone_aware: bool = False  # keep traffic in the proxy's zone while the zone has room
    zone_threshold: float = 0.8  # in-zone load (in-flight per capacity) above which it spills
    subset: int = 0  # balance over a deterministic subset of this size; -1 = auto; 0 = all
    outlier: Outlier | None = Outlier()  # None: no passive ejection
    panic_threshold: float = 0.5  # below this healthy share, balance over the whole pool
    retries: int = 1  # extra attempts for an idempotent request that failed
    retry_budget: RetryBudget = RetryBudget()
    max_body: int | None = None  # bytes a request body may have (413 beyond); None = no limit
    redirect_to_https: bool = False  # answer plain-HTTP requests with a 308 to https
    hsts: int = 0  # Strict-Transport-Security max-age (seconds) on https responses; 0 = none
    # edgelb.net.acl.SourceFilter / .Credentials / edgelb.net.backend_tls.BackendTLS (frozen,
    # comparable); typed loosely so the shared vocabulary does not import edgelb
    sources: Any = None  # client addresses allowed/denied (403, or a closed connection)
    auth: Any = None  # basic auth users (401 with a challenge)
    backend_tls: Any = None  # speak TLS to the backends
    proxy_protocol: int = 0  # tcp mode: PROXY protocol header version to backends; 0 = none
    backend_protocol: str = "http1"  # http mode: http1 | h2 (TLS, ALPN h2) | h2c (plain h2)


@dataclass(frozen=True, slots=True)
class PathRules:
    """How a listener normalises request paths (edgelb/http/target.py): the listener's, not a
    routed service's, since routing reads the normalised path."""

    merge_slashes: bool = True  # `//a` is `/a`
    encoded_slashes: str = "reject"  # %2F and %5C: reject (400) | keep (passed on encoded)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """The file source's per-listener limits against floods and slow clients."""

    connections: int = 20000  # open client connections per listener
    # open connections per client address, per listener; 0 = no limit (the default: clients
    # behind one NAT or an L4 balancer share an address)
    connections_per_client: int = 0
    headers: int = 100  # header fields in a request head (431 beyond)
    min_body_rate: int = 0  # bytes/s a request body must keep up after 10 s; 0 = no minimum

    def refusal(self, open_connections: int, from_client: int) -> str | None:
        """Why a new connection must be refused ("connections", "per_client"), or None.
        `open_connections`: the listener's before it; `from_client`: its client's with it."""
        if self.connections_per_client and from_client > self.connections_per_client:
            return "per_client"
        if open_connections >= self.connections:
            return "connections"
        return None


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    """This proxy replica: its zone (zone-aware balancing) and its place among the replicas
    (deterministic subsetting). Unset keys come from EDGELB_ZONE, EDGELB_REPLICA and
    EDGELB_REPLICAS (e.g. from a StatefulSet ordinal and the Downward API)."""

    zone: str = ""
    replica: int = 0
    replicas: int = 1


@dataclass(frozen=True, slots=True)
class Backend:
    """One replica of a service. `key` identifies it across snapshots."""

    host: str
    port: int
    weight: float = 1.0
    zone: str = ""
    ready: bool = True
    terminating: bool = False
    # failover order (HAProxy's backup servers, SRV priority): the pool sends work only to the
    # lowest tier that has a usable backend; every backend of a static list is in tier 0
    tier: int = 0

    @property
    def key(self) -> str:
        return str(Address(self.host, self.port))

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A request header or query parameter that must be present with this value: equal
    (headers: names case-insensitive, values exact) or, with `regex`, fully matching it."""

    name: str
    value: str
    regex: bool = False


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """A header modifier (Gateway API's): set replaces every field of the name, add appends
    one, remove drops every field of the name. Names are lower-case."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Redirect:
    """Answer with a redirect instead of forwarding. Empty/zero parts keep the request's:
    scheme, host (without its port), port (0: none unless the request's scheme is kept and it
    named one), path (the whole path) or prefix (replaces the matched path prefix)."""

    scheme: str = ""
    host: str = ""
    port: int = 0
    path: str | None = None
    prefix: str | None = None
    status: int = 302


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Rewrite the request before it is forwarded: the Host, the whole path, or the matched
    path prefix (the query is kept). On a regex route, `$1`..`$9` in `path` are the groups of
    the route's match (nginx's `rewrite`; ingress-nginx's rewrite-target)."""

    host: str = ""
    path: str | None = None
    prefix: str | None = None


@dataclass(frozen=True, slots=True)
class Mirror:
    """Copy requests to another service, fire-and-forget: its answer is dropped and it never
    slows or fails the original (Gateway API's RequestMirror). `percent` of the requests are
    copied (100: all)."""

    service: str
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class Cors:
    """Answer CORS preflights (OPTIONS with Origin and Access-Control-Request-Method) at the
    proxy and add the CORS response headers to the others. Origins: "*", exact origins
    ("https://app.example.com") or one-label wildcards ("https://*.example.com")."""

    allow_origins: tuple[str, ...] = ("*",)
    allow_methods: tuple[str, ...] = ("GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS")
    allow_headers: tuple[str, ...] = ("DNT", "Keep-Alive", "User-Agent", "X-Requested-With",
                                      "If-Modified-Since", "Cache-Control", "Content-Type",
                                      "Range", "Authorization")
    expose_headers: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_age: int = 1728000  # seconds a preflight may be cached (ingress-nginx's default)


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Per-client-address limits of one route (ingress-nginx's limit-rps / limit-connections):
    a token bucket of `rps` per second holding `burst` (0: rps * 5, ingress-nginx's burst
    multiplier) answers 429 with Retry-After when empty; at most `connections` requests of one
    client in flight on the route at once (429 beyond). 0 = no limit. Addresses in `exempt`
    (CIDRs) are not limited."""

    rps: float = 0.0
    burst: int = 0
    connections: int = 0
    exempt: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Filters:
    request_headers: HeaderEdits | None = None
    response_headers: HeaderEdits | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    mirrors: tuple[Mirror, ...] = ()
    cors: Cors | None = None
    limits: ClientLimits | None = None


@dataclass(frozen=True, slots=True)
class WeightedService:
    """One service of a route's traffic split; each keeps its own balancing policy.

    `resolved` false: a reference a source could not resolve (the Gateway API's backendRef to a
    missing Service, or across namespaces without a ReferenceGrant); `service` then only names
    it, no such service exists, and the requests of this share answer 500, as the Gateway API
    requires (they do not vanish from the split)."""

    service: str
    weight: int = 1
    resolved: bool = True


@dataclass(frozen=True, slots=True)
class Route:
    """A host/path rule on the shared entrypoints that leads to a service.

    host: "" (any), "example.com" (exact) or "*.example.com" (one label wildcard).
    path: "/" style prefix, matched element-wise (`/foo` matches `/foo` and `/foo/bar`, not
    `/foobar`), or an exact path when `exact` is true, or a regular expression the whole path
    must match when `regex` is true.

    The rest is the routing power of the Gateway API's HTTPRoute (the file config's
    `routes:`): conditions on headers, query parameters and the method; filters; a weighted
    split over `backends` (empty: `service` alone; else `service` is the first resolved one, or
    "" for a route that only redirects or has no resolved share); a request timeout (None: the
    service's; math.inf: none, the Gateway API's "0s"). `name` says where it came from in
    messages; `order` breaks the ties the precedence leaves (lower first;
    edgelb/http/router.py).
    """

    host: str
    path: str
    service: str
    exact: bool = False
    regex: bool = False
    method: str = ""
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    filters: Filters | None = None
    backends: tuple[WeightedService, ...] = ()
    timeout: float | None = None
    name: str = ""
    order: int = 0
    # a `*.` host covers one or more labels (the Gateway API's hostnames: `*.example.com`
    # matches a.b.example.com) rather than exactly one (Ingress); a longer suffix wins
    any_depth: bool = False

    @property
    def services(self) -> tuple[str, ...]:
        """Every service this route may send to."""
        if self.backends:
            return tuple(b.service for b in self.backends)
        return (self.service,) if self.service else ()


@dataclass(frozen=True, slots=True)
class DnsQuery:
    """Where a service's backends come from in DNS (the file config's `dns:`): the SRV records
    of `srv` (targets, ports, weights, priorities), or the A and AAAA records of `name`, each
    address on `port`. Names are absolute (no search domains)."""

    srv: str = ""
    name: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"SRV {self.srv}" if self.srv else f"A/AAAA {self.name}:{self.port}"


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    mode: str = "http"  # http | tcp
    listen: Address | None = None  # a static port, optional
    backends: tuple[Backend, ...] = ()
    policy: Policy = field(default_factory=Policy)
    tls: tuple[str, str] | None = None  # (cert file, key file): TLS on its static port
    # tcp only: TLS passes through undecrypted; with routes (hosts), the TLS entrypoints send
    # a connection here by the SNI name of its ClientHello
    tls_passthrough: bool = False
    # static port only: read a PROXY header first (edgelb.net.proxy_protocol.AcceptPolicy), or
    # None (off)
    accept_proxy_protocol: Any = None
    path_rules: PathRules = PathRules()  # static port only: see PathRules
    # backends from DNS (watchers/dns fills `backends` from its answers), or None: a list
    dns: DnsQuery | None = None
    # static http port only: HTTP/2 by ALPN with TLS (http2), by prior knowledge without (h2c)
    http2: bool = True
    h2c: bool = False


@dataclass(frozen=True, slots=True)
class Entrypoint:
    """A shared HTTP listener that routes by host and path (the file config's `entrypoints:`)."""

    name: str
    listen: Address
    tls: tuple[str, str] | None = None  # (cert file, key file); ("", "") = watchers' only
    accept_proxy_protocol: Any = None  # edgelb.net.proxy_protocol.AcceptPolicy, None = off
    path_rules: PathRules = field(default_factory=PathRules)
    http2: bool = True  # TLS: ALPN offers h2 before http/1.1
    h2c: bool = False  # plain: a connection that opens with the HTTP/2 preface speaks h2c


@dataclass(frozen=True, slots=True)
class PemPair:
    """A certificate chain (leaf first) and its key, as PEM bytes, and where they came from.

    `origin` names it in logs and reports (`Secret ns/name`, or the files); `files` is the
    (certificate file, key file) it was read from, for a pair the file config names. The
    runtime parses it (edgelb.net.tls) when it plans a snapshot; equal bytes parse once."""

    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)
    origin: str
    files: tuple[str, str] | None = None
    labels: tuple[str, str] = ("the certificate", "the key")  # the parts, in messages


@dataclass(frozen=True, slots=True)
class Certificates:
    """The certificates one source serves.

    `pairs` are served on every TLS entrypoint (picked by SNI name); `hosts` pins host
    patterns to one of them ("" = the default certificate). A pair that does not parse keeps
    the last good one of its origin and is reported (a watcher's object may be broken for a
    while). `files` holds the PEM of the files the snapshot's entrypoints and static ports
    name in their `tls`: one that does not parse rejects the snapshot."""

    pairs: tuple[PemPair, ...] = ()
    hosts: tuple[tuple[str, PemPair], ...] = ()
    files: tuple[PemPair, ...] = ()


@dataclass(frozen=True, slots=True)
class Settings:
    """The process-wide settings only the file config sets. A snapshot that carries them
    (`Snapshot.settings`) replaces them in the step that applies it, and not at all when it is
    rejected; a snapshot without them leaves them as they are.

    instance, limits and tls are edgelb.ops.config.InstanceConfig and LimitsConfig and
    edgelb.net.tls.Options (frozen, comparable; None = their defaults), typed loosely so the
    shared vocabulary does not import edgelb."""

    entrypoints: tuple[Entrypoint, ...] = ()
    defaults: Policy = field(default_factory=Policy)  # the base of every service's policy
    instance: Any = None  # this replica's zone and ordinal
    limits: Any = None  # per-listener limits
    grace: float = 30.0  # seconds a removed listener's connections get to finish
    tls: Any = None  # the `tls:` block: every TLS server context


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the runtime could not use from an accepted snapshot and worked around (a
    certificate that does not parse and keeps its last good one): `origin` is the PemPair's."""

    origin: str
    message: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one source knows, whole. `source` names the watcher that made it.

    `zone`: the proxy's zone as the source found it (the Kubernetes watcher reads its Node's
    `topology.kubernetes.io/zone` label); used when the file config sets none."""

    source: str
    services: tuple[Service, ...] = ()
    routes: tuple[Route, ...] = ()
    certificates: Certificates = Certificates()
    settings: Settings | None = None
    zone: str = ""

    def service(self, name: str) -> Service | None:
        for s in self.services:
            if s.name == name:
                return s
        return None
