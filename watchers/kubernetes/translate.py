"""Kubernetes objects -> one edgelb Snapshot: a pure function over raw JSON dicts.

The input is what the reflectors cache (objects as the API server sends them, keyed by
(namespace, name); cluster-scoped objects such as IngressClasses by ("", name)). Nothing here
does I/O or reads a clock, so the same cluster state always gives the same Translation.

A malformed object never raises: it becomes a `Problem` (for logs, a metric and an Event on the
object) and only the part it spoils is skipped. Choices the Kubernetes documentation leaves to
the controller:

- `ImplementationSpecific` paths match as `Prefix`; a path without pathType is read the same.
- An Ingress backend whose Service or port does not exist still claims its host and path and
  leads to a service without backends (clients get a 503, not some other rule's backend).
- Services routed from Ingresses take their policy from the Service's own `edgelb.io/*`
  annotations (bad ones: a problem, and `defaults`); static-port Services with a bad annotation
  are skipped.
- Static-port mode without `edgelb.io/mode`: http when the Service port's appProtocol is plain
  HTTP/1.1 (`http`, or `kubernetes.io/ws`, which the proxy relays as an upgrade); anything else
  (none, `https`, `kubernetes.io/h2c`, `grpc`, ...) is tcp, the safe choice for unknown bytes.
- Endpoints neither ready nor terminating are left out (the runtime drains what they have).
- A dual-stack Service uses the slices of its primary family (`spec.ipFamilies[0]`, else IPv4),
  so no pod is counted twice.
- With `zone` set, topology hints are honoured as kube-proxy does: when every ready endpoint has
  `hints.forZones` and some name our zone, only those ready endpoints are used.
- A `spec.tls` entry without hosts gives the default certificate, under the SNI pattern "".
- `edgelb.io/ssl-passthrough: "true"` on an Ingress (ingress-nginx's ssl-passthrough): each
  rule host becomes a tcp service whose TLS connections the TLS entrypoints relay undecrypted
  by SNI name, to the backend of the rule's `/` path (else its first path); the rule makes no
  HTTP routes. Rules without a host, and the default backend, cannot be passed through (there
  is no name to match): the former are problems, the latter stays an HTTP route.
- Ingress annotations (`edgelb.io/<name>`, and ingress-nginx's under their own prefix with
  `ingress_nginx`) are read by nginx_annotations.py. As in ingress-nginx, use-regex or
  rewrite-target on one Ingress makes the Prefix paths of its hosts regexes on every
  Ingress (case-insensitive, matched at the start of the path). Per-service ones give the
  Ingress services of its own, `namespace/service:port~ingress`, so that they never change
  another Ingress's traffic. A canary Ingress claims no path: it joins the main Ingress's
  route of the same host, path and type (none: a problem). Basic auth that cannot be set up
  (Secret missing, no usable users) fails closed: the Ingress's paths answer 503.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from watchers.kubernetes import nginx_annotations as nginx
from watchers.model import Address, Backend, Policy, Route, Service, Snapshot
from watchers.routing import regex_problem
from watchers.values import as_list, as_map, as_str, is_int, path_prefix, positive, valid_port

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects
Obj = dict[str, Any]
# policy_from_annotations' shape: (annotations, base) -> (policy, errors naming the annotation)
PolicyReader = Callable[[dict[str, str], Policy], tuple[Policy, list[str]]]

SOURCE = "kubernetes"
PREFIX = "edgelb.io/"
PORT_ANNOTATION = "edgelb.io/port"
MODE_ANNOTATION = "edgelb.io/mode"
TARGET_PORT_ANNOTATION = "edgelb.io/target-port"
WEIGHT_ANNOTATION = "edgelb.io/weight"
PASSTHROUGH_ANNOTATION = "edgelb.io/ssl-passthrough"
LEGACY_CLASS_ANNOTATION = "kubernetes.io/ingress.class"
DEFAULT_CLASS_ANNOTATION = "ingressclass.kubernetes.io/is-default-class"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TLS_SECRET_TYPE = "kubernetes.io/tls"
TLS_KEYS = ("tls.crt", "tls.key")
HTTP_APP_PROTOCOLS = frozenset({"http", "kubernetes.io/ws"})
LISTEN_HOST = "0.0.0.0"
PATH_TYPES = ("Exact", "Prefix", "ImplementationSpecific")

_LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
_HOST = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
_BAD_PATH_CHARS = re.compile(r"[\s?#]")
_BAD_REGEX_CHARS = re.compile(r"[\s#]")
_QUANTITY = re.compile(
    r"^\+?([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?"
    r"(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$"
)
_SUFFIX = {
    None: 1.0, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    "P": 1e15, "E": 1e18, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40,
    "Pi": 2.0**50, "Ei": 2.0**60,
}


@dataclass(frozen=True)
class ClusterState:
    """The reflectors' caches. Treat as read-only: translate() never changes them."""

    services: Mapping[Key, Obj] = field(default_factory=dict)
    endpointslices: Mapping[Key, Obj] = field(default_factory=dict)
    ingresses: Mapping[Key, Obj] = field(default_factory=dict)
    ingressclasses: Mapping[Key, Obj] = field(default_factory=dict)
    secrets: Mapping[Key, Obj] = field(default_factory=dict)
    pods: Mapping[Key, Obj] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong with one object; `kind` is the Kubernetes kind the Event goes on."""

    kind: str
    namespace: str
    name: str
    message: str

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}: {self.message}"


@dataclass(frozen=True)
class Translation:
    snapshot: Snapshot
    problems: list[Problem] = field(default_factory=list)
    tls: dict[str, tuple[str, str]] = field(default_factory=dict)  # SNI pattern -> secret
    ingresses: list[Key] = field(default_factory=list)  # ours, whose status the leader writes


def translate(
    state: ClusterState,
    ingress_class: str = "edgelb",
    controller: str = "edgelb.io/ingress-controller",
    defaults: Policy = Policy(),  # noqa: B008 (frozen, shared safely)
    zone: str = "",
    pod_weights: bool = False,
    *,
    read_policy: PolicyReader,
    sni_routing: bool = True,
    ingress_nginx: bool = False,
) -> Translation:
    """The Snapshot (source "kubernetes") for `state`, with every problem found on the way.

    `read_policy` reads `edgelb.io/<key>` annotations into a Policy: the caller passes one
    made from the per-service schema (watchers/schema.py `PolicySchema.from_annotations`, as
    `edgelb.ops.config.policy_from_annotations` is); watchers never import edgelb. `sni_routing`:
    the proxy has a TLS entrypoint to route passthrough hosts by SNI; without one, a
    passthrough Ingress is a problem of its own rather than a snapshot the runtime would
    reject whole. `ingress_nginx`: read `nginx.ingress.kubernetes.io/*` annotations on
    Ingresses as well (`watchers.kubernetes.ingress_nginx_annotations`)."""
    return Translator(state, ingress_class, controller, defaults, zone, pod_weights,
                       read_policy, sni_routing, ingress_nginx).run()


# -- reading raw JSON without trusting it -------------------------------------------------------


def meta(obj: Any) -> Obj:
    return as_map(as_map(obj).get("metadata"))


def _annotations(obj: Any) -> Obj:
    return as_map(meta(obj).get("annotations"))


def age(key: Key, obj: Any) -> tuple[bool, str, str, str]:
    """Sort key: older first (creationTimestamp, RFC 3339 in UTC), then namespace/name; an
    object without a timestamp counts as the newest."""
    ts = as_str(meta(obj).get("creationTimestamp"))
    return (not ts, ts, key[0], key[1])


def keyed(cache: Mapping[Any, Any]) -> list[tuple[Key, Obj]]:
    """The (key, object) pairs with a usable key and an object, sorted by key."""
    out = [(k, v) for k, v in cache.items() if isinstance(v, dict)
           and isinstance(k, tuple) and len(k) == 2 and all(isinstance(p, str) for p in k)]
    return sorted(out, key=lambda kv: kv[0])


def _quantity(value: Any) -> float | None:
    """A Kubernetes quantity ("250m", "1", "0.5", "2k", "1e3m") as a float; None if bad."""
    if is_int(value) or isinstance(value, float):
        f = float(value)
        return f if math.isfinite(f) and f >= 0 else None
    m = _QUANTITY.match(as_str(value).strip())
    if m is None:
        return None
    try:
        f = float(m.group(1)) * 10.0 ** int(m.group(2) or 0) * _SUFFIX[m.group(3)]
    except OverflowError:
        return None
    return f if math.isfinite(f) else None






def _port_text(ports: list[Any]) -> str:
    parts = []
    for p in ports:
        p = as_map(p)
        name = as_str(p.get("name"))
        parts.append(f"{p.get('port')}" + (f" ({name})" if name else ""))
    return ", ".join(parts) or "none"


@dataclass(frozen=True, slots=True)
class _Ref:
    """An Ingress backend as written: Service name and port (number or name)."""

    namespace: str
    service: str
    port: int | str

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.service}:{self.port}"


# -- the translation ----------------------------------------------------------------------------


class Translator:
    def __init__(self, state: ClusterState, ingress_class: str, controller: str,
                 defaults: Policy, zone: str, pod_weights: bool,
                 read_policy: PolicyReader, sni_routing: bool = True,
                 ingress_nginx: bool = False) -> None:
        self.state = state
        self.ingress_nginx = ingress_nginx
        self._readings: dict[Key, nginx.Reading] = {}  # an Ingress's annotations, read once
        # spot -> the indexes of its routes in self.routes, and their Ingresses
        self._mains: dict[tuple[str, str, bool], list[tuple[int, Key]]] = {}
        self._canaries: list[tuple[Key, tuple[str, str, bool], _Ref]] = []
        self._canary_spots: set[tuple[str, str, bool]] = set()
        self._regex_hosts: set[str] = set()  # hosts whose Prefix paths are all regexes
        # (Ingress, id of the base policy) -> (base, policy, usable); the base is held so its
        # id stays its own (a Policy may hold unhashable parts)
        self._ingress_policies: dict[tuple[Key, int], tuple[Policy, Policy, bool]] = {}
        self.sni_routing = sni_routing
        self.ingress_class = ingress_class
        self.controller = controller
        self.defaults = defaults
        self.zone = zone
        self.pod_weights = pod_weights
        self.read_policy = read_policy
        self.problems: list[Problem] = []
        self._seen: set[Problem] = set()
        self.services: dict[str, Service] = {}
        self.routes: list[Route] = []
        self.tls: dict[str, tuple[str, str]] = {}
        self._tls_owner: dict[str, Key] = {}
        self._passthrough_owner: dict[str, Key] = {}  # passed-through host -> its Ingress
        self._policies: dict[Key, tuple[Policy, list[str]]] = {}
        self._weights: dict[Key, float] = {}
        self._slices: dict[Key, list[tuple[Key, Obj]]] = {}
        for key, sl in keyed(state.endpointslices):
            svc = as_map(meta(sl).get("labels")).get(SERVICE_NAME_LABEL)
            if isinstance(svc, str) and svc:
                self._slices.setdefault((key[0], svc), []).append((key, as_map(sl)))

    def problem(self, kind: str, key: Key, message: str) -> None:
        p = Problem(kind, key[0], key[1], message)
        if p not in self._seen:
            self._seen.add(p)
            self.problems.append(p)

    def guarded(self, kind: str, key: Key, fn: Callable[[], None]) -> None:
        """Run one object's step; a bug on odd input spoils that object, not the snapshot."""
        try:
            fn()
        except Exception as e:  # the contract: a Problem, never an exception
            self.problem(kind, key, f"internal error while reading this object "
                                    f"({type(e).__name__}: {e}); it is skipped, please report")

    def run(self) -> Translation:
        ours = self.our_ingresses()
        claims: dict[tuple[str, str, bool], tuple[Key, bool]] = {}
        for key, ing in ours:
            self.guarded("Ingress", key, lambda k=key, i=ing: self.regex_host(k, i))
        for key, ing in ours:
            self.guarded("Ingress", key, lambda k=key, i=ing: self.ingress_rules(k, i, claims))
        for key, ing in ours:
            self.guarded("Ingress", key, lambda k=key, i=ing: self.default_backend(k, i, claims))
        for key, spot, ref in self._canaries:
            self.guarded("Ingress", key, lambda k=key, s=spot, r=ref: self.canary(k, s, r))
        for key, ing in ours:
            self.guarded("Ingress", key, lambda k=key, i=ing: self.app_root(k, i, claims))
        for key, ing in ours:
            self.guarded("Ingress", key, lambda k=key, i=ing: self.ingress_tls(k, i))
        self.static_services()
        snapshot = Snapshot(
            source=SOURCE,
            services=tuple(self.services[n] for n in sorted(self.services)),
            routes=tuple(sorted(self.routes, key=lambda r: (r.host, r.path, r.exact))),
        )
        return Translation(snapshot=snapshot, problems=self.problems, tls=dict(sorted(
            self.tls.items())), ingresses=sorted(k for k, _ in ours))

    # -- class ----------------------------------------------------------------------------------

    def our_ingresses(self) -> list[tuple[Key, Obj]]:
        classes = {k[1]: as_map(v) for k, v in keyed(self.state.ingressclasses)}
        mine = classes.get(self.ingress_class)
        mine_ok = mine is None or as_map(mine.get("spec")).get("controller") == self.controller
        default = (mine is not None and mine_ok
                   and _annotations(mine).get(DEFAULT_CLASS_ANNOTATION) == "true")
        ours = []
        for key, ing in keyed(self.state.ingresses):
            name = as_map(ing.get("spec")).get("ingressClassName")
            if isinstance(name, str) and name:
                hit = name == self.ingress_class and mine_ok
            else:
                legacy = _annotations(ing).get(LEGACY_CLASS_ANNOTATION)
                hit = legacy == self.ingress_class if as_str(legacy) else default
            if hit:
                ours.append((key, ing))
        return sorted(ours, key=lambda kv: age(*kv))

    # -- rules ----------------------------------------------------------------------------------

    def ingress_rules(self, key: Key, ing: Obj,
                      claims: dict[tuple[str, str, bool], tuple[Key, bool]]) -> None:
        spec = ing.get("spec")
        if not isinstance(spec, dict):
            self.problem("Ingress", key, "spec is missing or not a mapping; nothing to route")
            return
        rules = spec.get("rules")
        if rules is not None and not isinstance(rules, list):
            self.problem("Ingress", key, "spec.rules must be a list of rules; ignored")
        if not as_list(rules) and spec.get("defaultBackend") is None:
            self.problem("Ingress", key, "has neither spec.rules nor spec.defaultBackend; "
                                         "nothing to route")
        passthrough = self.passthrough_wanted(key, ing)
        self.read_annotations(key, ing)
        for i, rule in enumerate(as_list(rules)):
            where = f"spec.rules[{i}]"
            if not isinstance(rule, dict):
                self.problem("Ingress", key, f"{where} is not a mapping; skipped")
                continue
            host = self.host(key, rule.get("host"), f"{where}.host")
            if host is None:
                continue
            paths = as_map(rule.get("http")).get("paths")
            if not isinstance(paths, list) or not paths:
                shown = f'host "{host}"' if host else "any host"
                self.problem("Ingress", key, f"{where} ({shown}) has no http paths; skipped "
                                             "(add http.paths with a path and a backend)")
                continue
            if passthrough:
                self.passthrough_rule(key, host, paths, where)
                continue
            for j, item in enumerate(paths):
                self.ingress_path(key, host, item, f"{where}.http.paths[{j}]", claims)

    # -- TLS passthrough --------------------------------------------------------------------------

    def passthrough_wanted(self, key: Key, ing: Obj) -> bool:
        raw = _annotations(ing).get(PASSTHROUGH_ANNOTATION)
        if raw is None and self.ingress_nginx:
            raw = _annotations(ing).get(nginx.NGINX + nginx.PASSTHROUGH)
        if raw is None:
            return False
        value = as_str(raw).strip().lower()
        if value in ("true", "false"):
            return value == "true"
        self.problem("Ingress", key, f'{PASSTHROUGH_ANNOTATION}: {raw!r} is not "true" or '
                                     '"false"; TLS is terminated as without it')
        return False

    def passthrough_rule(self, key: Key, host: str, paths: list[Any], where: str) -> None:
        """One rule of a passthrough Ingress: its host's TLS goes to the backend of its `/`
        path (else its first), undecrypted."""
        if not host:
            self.problem("Ingress", key, f"{where}: {PASSTHROUGH_ANNOTATION} routes TLS by its "
                                         "SNI name, and this rule has no host; skipped")
            return
        if not self.sni_routing:
            self.problem("Ingress", key, f"{where}: {PASSTHROUGH_ANNOTATION} needs a TLS "
                                         "entrypoint on the proxy to route by SNI name (e.g. "
                                         "entrypoints: {https: {listen: 0.0.0.0:8443, tls: {}}}); "
                                         "skipped")
            return
        items = [(j, item) for j, item in enumerate(paths) if isinstance(item, dict)]
        if not items:
            self.problem("Ingress", key, f"{where}: no path with a backend; skipped")
            return
        j, item = next(((j, i) for j, i in items if i.get("path") in (None, "", "/")), items[0])
        ref = self.backend_ref(key, item.get("backend"), f"{where}.http.paths[{j}].backend")
        if ref is None:
            return
        owner = self._passthrough_owner.get(host)
        if owner is not None:
            by = ("an earlier rule of this Ingress" if owner == key
                  else f"the older Ingress {owner[0]}/{owner[1]}")
            self.problem("Ingress", key, f'{where}: host "{host}" is already passed through '
                                         f"by {by}; ignored")
            return
        self._passthrough_owner[host] = key
        name = f"{ref.name}@{host}"
        self.routes.append(Route(host=host, path="/", service=name))
        self.services[name] = self.passthrough_service(ref, key, name)

    def passthrough_service(self, ref: _Ref, ingress: Key, name: str) -> Service:
        svc = self.route_service(ref, ingress)
        return Service(name=name, mode="tcp", backends=svc.backends, policy=svc.policy,
                       tls_passthrough=True)

    def host(self, key: Key, value: Any, where: str) -> str | None:
        if value is None or value == "":
            return ""
        host = as_str(value).lower().rstrip(".")
        if not _HOST.match(host):
            self.problem("Ingress", key, f"{where}: {value!r} is not a host name; write "
                                         "e.g. \"foo.example.com\" or \"*.example.com\"; skipped")
            return None
        return host

    def ingress_path(self, key: Key, host: str, item: Any, where: str,
                     claims: dict[tuple[str, str, bool], tuple[Key, bool]]) -> None:
        if not isinstance(item, dict):
            self.problem("Ingress", key, f"{where} is not a mapping; skipped")
            return
        kind = item.get("pathType")
        if kind is None:
            kind = "ImplementationSpecific"
        if kind not in PATH_TYPES:
            self.problem("Ingress", key, f"{where}.pathType: {kind!r} is not one of "
                                         f"{', '.join(PATH_TYPES)}; skipped")
            return
        path = item.get("path")
        if (path is None or path == "") and kind == "ImplementationSpecific":
            path = "/"
        exact = kind == "Exact"
        reading = self._readings.get(key, nginx.Reading())
        regex = (reading.regex or host in self._regex_hosts) and not exact
        bad = _BAD_REGEX_CHARS if regex else _BAD_PATH_CHARS  # a regex may hold `?`
        if not isinstance(path, str) or not path.startswith("/") or bad.search(path):
            self.problem("Ingress", key, f"{where}.path: {path!r} is not an absolute path "
                                         "(start it with '/', no spaces, '?' or '#'); skipped")
            return
        ref = self.backend_ref(key, item.get("backend"), f"{where}.backend")
        if ref is None:
            return
        written = path
        if not exact:
            path = path_prefix(path)
        if reading.canary is not None:  # joins the main Ingress's route (canary())
            self._canaries.append((key, (host, path, exact), ref))
            return
        route = Route(host=host, path=path, service=self.service_name(ref, key), exact=exact,
                      name=f"Ingress {key[0]}/{key[1]}")
        if regex:
            pattern = nginx.regex_path(written)
            why = regex_problem(pattern)
            if why:
                self.problem("Ingress", key, f"{where}.path: as a regular expression "
                                             f"(use-regex or rewrite-target): {why}; skipped")
                return
            route = replace(route, path=pattern, regex=True)
        if self.claim(key, (host, route.path, exact), claims, rule=True, where=where):
            self._mains.setdefault((host, path, exact), []).append((len(self.routes), key))
            self.add_route(nginx.shape(route, reading), ref, key)

    def default_backend(self, key: Key, ing: Obj,
                        claims: dict[tuple[str, str, bool], tuple[Key, bool]]) -> None:
        spec = as_map(ing.get("spec"))
        if spec.get("defaultBackend") is None:
            return
        if self.read_annotations(key, ing).canary is not None:
            self.problem("Ingress", key, "spec.defaultBackend of a canary Ingress is not used "
                                         "(a canary joins the main Ingress's paths)")
            return
        ref = self.backend_ref(key, spec.get("defaultBackend"), "spec.defaultBackend")
        if ref is None:
            return
        owner = claims.get(("", "/", False))
        if owner is not None and owner[1]:
            return  # a rule covers any host, path "/": the default backend is never reached
        if self.claim(key, ("", "/", False), claims, rule=False, where="spec.defaultBackend"):
            route = Route(host="", path="/", service=self.service_name(ref, key))
            self.add_route(nginx.shape(route, self._readings.get(key, nginx.Reading())), ref,
                           key)

    def claim(self, key: Key, spot: tuple[str, str, bool],
              claims: dict[tuple[str, str, bool], tuple[Key, bool]], rule: bool,
              where: str) -> bool:
        """First come (the Ingresses are visited oldest first) keeps a host+path+type."""
        owner = claims.get(spot)
        if owner is None:
            claims[spot] = (key, rule)
            return True
        host, path, exact = spot
        what = (f'host "{host}"' if host else "any host") + \
            f' path "{path}" ({"Exact" if exact else "Prefix"})'
        by = ("an earlier rule of this Ingress" if owner[0] == key
              else f"the older Ingress {owner[0][0]}/{owner[0][1]}")
        self.problem("Ingress", key, f"{where}: {what} is already claimed by {by}; ignored")
        return False

    def backend_ref(self, key: Key, backend: Any, where: str) -> _Ref | None:
        if not isinstance(backend, dict):
            self.problem("Ingress", key, f"{where} is missing or not a mapping; skipped")
            return None
        if backend.get("resource") is not None:
            self.problem("Ingress", key, f"{where}.resource: resource backends are not "
                                         "supported; use a service backend; skipped")
            return None
        svc = backend.get("service")
        name = as_map(svc).get("name")
        if not isinstance(name, str) or not name:
            self.problem("Ingress", key, f"{where}.service.name is missing; skipped")
            return None
        port = as_map(as_map(svc).get("port"))
        number, pname = port.get("number"), port.get("name")
        if number is not None:
            if not valid_port(number):
                self.problem("Ingress", key, f"{where}.service.port.number: {number!r} is not "
                                             "a port (1-65535); skipped")
                return None
            return _Ref(key[0], name, number)
        if isinstance(pname, str) and pname:
            return _Ref(key[0], name, pname)
        self.problem("Ingress", key, f"{where}.service.port: give a number or a name; skipped")
        return None

    def add_route(self, route: Route, ref: _Ref, ingress: Key) -> None:
        self.routes.append(route)
        if route.service not in self.services:
            self.services[route.service] = self.route_service(ref, ingress, route.service)

    def route_service(self, ref: _Ref, ingress: Key, name: str = "",
                      policy_of: Key | None = None) -> Service:
        """The service `name` (default `ref.name`) of an Ingress backend; one named for its
        Ingress (service_name) has the Ingress's (or `policy_of`'s) per-service annotations
        over the Service's policy."""
        name = name or ref.name
        skey = (ref.namespace, ref.service)
        svc = self.state.services.get(skey)
        if not isinstance(svc, dict):
            self.problem("Ingress", ingress, f"backend Service {ref.namespace}/{ref.service} "
                                             "not found; its paths answer 503 until it exists")
            return Service(name=name, mode="http", policy=self.defaults)
        policy, errs = self.policy(skey, svc)
        if errs:
            policy = self.defaults
        port = self.service_port(ingress, "Ingress", skey, svc, ref.port,
                                 f"backend {ref.namespace}/{ref.service}:{ref.port}")
        backends = () if port is None else self.backends(skey, svc, port)
        policy = self.http_policy(skey, policy)
        if name != ref.name:
            policy, usable = self.ingress_policy(policy_of or ingress, policy)
            if not usable:
                backends = ()  # fails closed: 503
        return Service(name=name, mode="http", backends=backends, policy=policy)

    # -- Ingress annotations (nginx_annotations.py) ----------------------------------------------

    def read_annotations(self, key: Key, ing: Obj) -> nginx.Reading:
        if key not in self._readings:
            ann = _annotations(ing)
            reading = nginx.read(ann, self.ingress_nginx)
            for message in reading.problems:
                self.problem("Ingress", key, message)
            if nginx.ignored_nginx(ann, self.ingress_nginx):
                self.problem("Ingress", key, f"{nginx.NGINX}* annotations are not read; set "
                                             "watchers.kubernetes.ingress_nginx_annotations: "
                                             "true, or write them as edgelb.io/<name>")
            self._readings[key] = reading
        return self._readings[key]

    def regex_host(self, key: Key, ing: Obj) -> None:
        """ingress-nginx's quirk: use-regex or rewrite-target on one Ingress makes every
        Prefix path of its hosts, on any Ingress, a case-insensitive regex (and so their
        precedence is the regexes' own: the longer pattern first)."""
        if not self.read_annotations(key, ing).regex:
            return
        for rule in as_list(as_map(ing.get("spec")).get("rules")):
            host = as_map(rule).get("host")
            if host is None or isinstance(host, str):
                self._regex_hosts.add((host or "").lower().rstrip("."))

    def service_name(self, ref: _Ref, ingress: Key) -> str:
        """`ref.name`, or `ref.name~ingress` when the Ingress sets per-service annotations
        (its own service: another Ingress's traffic to the same port is not changed)."""
        reading = self._readings.get(ingress)
        if reading is None or not (reading.per_ingress or self.https_redirect(ingress)):
            return ref.name
        return f"{ref.name}~{ingress[1]}"

    def https_redirect(self, ingress: Key) -> bool:
        reading = self._readings.get(ingress)
        if reading is None:
            return False
        has_tls = bool(as_list(as_map(as_map(self.state.ingresses.get(ingress)).get("spec")).get(
            "tls")))
        return reading.wants_https_redirect(has_tls, self.ingress_nginx)

    def ingress_policy(self, ingress: Key, base: Policy) -> tuple[Policy, bool]:
        """`base` with the Ingress's per-service annotations, each read on its own (a bad one
        is a problem and left out), and whether the service may be served (False: basic auth
        was asked for and cannot be set up)."""
        cache_key = (ingress, id(base))
        if cache_key in self._ingress_policies:
            _, cached, ok = self._ingress_policies[cache_key]
            return cached, ok
        reading = self._readings.get(ingress, nginx.Reading())
        items = dict(reading.policy)
        if self.https_redirect(ingress):
            items["redirect-to-https"] = ("true", "ssl-redirect")
        usable = True
        if reading.auth is not None:
            users = self.auth_users(ingress, reading.auth)
            usable = users is not None
            if users is not None:
                auth: dict[str, Any] = {"users": users}
                if reading.auth.realm:
                    auth["realm"] = reading.auth.realm
                items["auth"] = (json.dumps(auth), reading.auth.annotation)
        policy = base
        for k, (value, source) in sorted(items.items()):
            read, errs = self.read_policy({PREFIX + k: value}, policy)
            for e in errs:
                self.problem("Ingress", ingress, f"{source}: read as {e}")
            if not errs:
                policy = read
            elif k == "auth":
                usable = False
        if not usable:
            self.problem("Ingress", ingress, "basic auth is asked for and cannot be set up; "
                                             "the Ingress's paths answer 503 until it can")
        self._ingress_policies[cache_key] = (base, policy, usable)
        return policy, usable

    def auth_users(self, ingress: Key, auth: nginx.BasicAuth) -> list[str] | None:
        """The `user:HASH` lines of the Ingress's basic-auth Secret, or None (a problem)."""
        if not auth.secret:
            return None  # the reader said why
        ns, _, name = auth.secret.rpartition("/")
        if ns and ns != ingress[0]:
            self.problem("Ingress", ingress, f"{auth.annotation}: {auth.secret!r} is in "
                                             "another namespace; edgelb reads auth Secrets "
                                             "of the Ingress's own namespace only")
            return None
        users, why = nginx.auth_users(self.state.secrets.get((ingress[0], name)), auth.kind)
        if why is not None:
            self.problem("Ingress", ingress, f"{auth.annotation}: Secret {ingress[0]}/{name} "
                                             f"{why}")
            return None
        return users

    def canary(self, key: Key, spot: tuple[str, str, bool], ref: _Ref) -> None:
        """A canary Ingress's path: the main Ingress's routes of the same spot gain the
        canary's routes (nginx_annotations.canary_routes)."""
        canary = self._readings[key].canary
        if canary is None:
            return
        mains = self._mains.get(spot)
        host, path, exact = spot
        what = (f'host "{host}"' if host else "any host") + \
            f' path "{path}" ({"Exact" if exact else "Prefix"})'
        if not mains:
            self.problem("Ingress", key, f"canary: no main Ingress routes {what}; ignored")
            return
        if spot in self._canary_spots:
            self.problem("Ingress", key, f"canary: {what} already has a canary (ingress-nginx "
                                         "allows one per path); ignored")
            return
        self._canary_spots.add(spot)
        reading = self._readings[key]
        if reading.per_ingress or reading.filters is not None or reading.app_root:
            self.problem("Ingress", key, "a canary Ingress takes the main Ingress's "
                                         "annotations (as in ingress-nginx); its own, other "
                                         "than canary-*, are ignored")
        for i, owner in mains:
            main = self.routes[i]
            name = self.service_name(ref, owner)
            if name not in self.services:
                self.services[name] = self.route_service(ref, key, name, policy_of=owner)
            routes = nginx.canary_routes(main, name, canary, main.name)
            self.routes[i] = routes[-1]
            self.routes.extend(routes[:-1])

    def app_root(self, key: Key, ing: Obj,
                 claims: dict[tuple[str, str, bool], tuple[Key, bool]]) -> None:
        """ingress-nginx's app-root: `/` on each host of the Ingress answers 302 to it."""
        reading = self._readings.get(key)
        if reading is None or reading.app_root is None or reading.canary is not None:
            return
        hosts: list[str] = []
        for i, rule in enumerate(as_list(as_map(ing.get("spec")).get("rules"))):
            host = self.host(key, as_map(rule).get("host"), f"spec.rules[{i}].host")
            if host is not None and host not in hosts:
                hosts.append(host)
        for host in hosts:
            if self.claim(key, (host, "/", True), claims, rule=True, where="app-root"):
                self.routes.append(nginx.app_root_route(host, reading.app_root,
                                                        f"Ingress {key[0]}/{key[1]}"))

    def http_policy(self, skey: Key, policy: Policy) -> Policy:
        """An http service sends no PROXY protocol (X-Forwarded-For and Forwarded carry the
        client's address): an annotation asking for it is reported and left out."""
        if policy.proxy_protocol == self.defaults.proxy_protocol:
            return policy
        self.problem("Service", skey, f"{PREFIX}proxy-protocol applies to tcp mode; ignored "
                                      "for http, where X-Forwarded-For and Forwarded carry the "
                                      "client's address")
        return replace(policy, proxy_protocol=self.defaults.proxy_protocol)

    def service_port(self, who: Key, kind: str, skey: Key, svc: Obj, want: int | str,
                     where: str) -> Obj | None:
        """The Service port by number (`port`) or name; a problem on `who` if none."""
        spec = as_map(svc.get("spec"))
        if spec.get("type") == "ExternalName":
            self.problem(kind, who, f"{where}: ExternalName Services are not supported "
                                    "(edgelb balances over EndpointSlices); no backends")
            return None
        ports = as_list(spec.get("ports"))
        for p in ports:
            p = as_map(p)
            if (p.get("port") == want) if is_int(want) else (p.get("name") == want):
                protocol = p.get("protocol") or "TCP"
                if protocol != "TCP":
                    self.problem(kind, who, f"{where}: port {want} is {protocol!r}; edgelb "
                                            "proxies TCP only; no backends")
                    return None
                return p
        what = f"port {want}" if is_int(want) else f'port named "{want}"'
        self.problem(kind, who, f"{where}: Service {skey[0]}/{skey[1]} has no {what}; "
                                f"its ports: {_port_text(ports)}")
        return None

    # -- backends -------------------------------------------------------------------------------

    def backends(self, skey: Key, svc: Obj, port: Obj) -> tuple[Backend, ...]:
        slices = self._slices.get(skey, [])
        families = {t for _, sl in slices if (t := sl.get("addressType")) in ("IPv4", "IPv6")}
        family = "IPv4"
        if len(families) == 1:
            family = families.pop()
        elif families:
            primary = as_list(as_map(svc.get("spec")).get("ipFamilies"))
            if primary and primary[0] in families:
                family = primary[0]
        port_name = as_str(port.get("name"))
        protocol = port.get("protocol") or "TCP"
        # (address, port) -> (rank, endpoint): 0 ready, 1 serving+terminating, 2 terminating
        found: dict[tuple[str, int], tuple[int, Obj]] = {}
        for slkey, sl in slices:
            if sl.get("addressType") != family:
                continue
            number = None
            for p in as_list(sl.get("ports")):
                p = as_map(p)
                if (as_str(p.get("name")) == port_name
                        and (p.get("protocol") or "TCP") == protocol):
                    number = p.get("port")
                    break
            if number is None:
                continue
            if not valid_port(number):
                self.problem("EndpointSlice", slkey, f"port {port_name or '(unnamed)'}: "
                                                     f"{number!r} is not a port; slice skipped")
                continue
            for i, ep in enumerate(as_list(sl.get("endpoints"))):
                self.endpoint(slkey, f"endpoints[{i}]", ep, family, number, found)
        ready = [(a, ep) for a, (rank, ep) in found.items() if rank == 0]
        ready = self.by_hints(ready)
        fallback = not ready
        out = [self.backend(skey[0], a, ep, True, False) for a, ep in ready]
        for a, (rank, ep) in found.items():
            if rank == 1 and fallback:
                out.append(self.backend(skey[0], a, ep, True, False))
            elif rank in (1, 2):
                out.append(self.backend(skey[0], a, ep, False, True))
        return tuple(sorted(out, key=lambda b: (b.host, b.port)))

    def endpoint(self, slkey: Key, where: str, ep: Any, family: str, number: int,
                 found: dict[tuple[str, int], tuple[int, Obj]]) -> None:
        if not isinstance(ep, dict):
            self.problem("EndpointSlice", slkey, f"{where} is not a mapping; skipped")
            return
        addrs = as_list(ep.get("addresses"))
        addr = addrs[0] if addrs else None
        try:
            ip = ipaddress.ip_address(addr) if isinstance(addr, str) else None
        except ValueError:
            ip = None
        if ip is None or ip.version != (4 if family == "IPv4" else 6):
            self.problem("EndpointSlice", slkey, f"{where}.addresses[0]: {addr!r} is not an "
                                                 f"{family} address; endpoint skipped")
            return
        cond = as_map(ep.get("conditions"))
        ready = self.flag(slkey, where, cond, "ready", True)
        serving = self.flag(slkey, where, cond, "serving", True)
        terminating = self.flag(slkey, where, cond, "terminating", False)
        if ready:
            rank = 0
        elif terminating:
            rank = 1 if serving else 2
        else:
            return  # not ready, not leaving: no traffic; the runtime drains what it has
        spot = (str(ip), number)
        if spot not in found or rank < found[spot][0]:
            found[spot] = (rank, ep)

    def flag(self, slkey: Key, where: str, cond: Obj, name: str, missing: bool) -> bool:
        value = cond.get(name)
        if value is None:
            return missing
        if isinstance(value, bool):
            return value
        self.problem("EndpointSlice", slkey, f"{where}.conditions.{name}: {value!r} is not "
                                             f"true/false; read as {str(missing).lower()}")
        return missing

    def by_hints(self, ready: list[tuple[tuple[str, int], Obj]]
                 ) -> list[tuple[tuple[str, int], Obj]]:
        """kube-proxy's topology hints: used only when every ready endpoint has one and some
        are for our zone; then only those."""
        if not self.zone or not ready:
            return ready
        zones = []
        for _, ep in ready:
            names = {as_str(as_map(z).get("name"))
                     for z in as_list(as_map(ep.get("hints")).get("forZones"))} - {""}
            if not names:
                return ready
            zones.append(names)
        local = [r for r, names in zip(ready, zones, strict=True) if self.zone in names]
        return local or ready

    def backend(self, namespace: str, spot: tuple[str, int], ep: Obj, ready: bool,
                terminating: bool) -> Backend:
        weight = self.weight(namespace, ep.get("targetRef")) if self.pod_weights else 1.0
        return Backend(host=spot[0], port=spot[1], weight=weight, zone=as_str(ep.get("zone")),
                       ready=ready, terminating=terminating)

    def weight(self, namespace: str, ref: Any) -> float:
        """Capacity: the pod's `edgelb.io/weight`, else its CPU request in cores, else 1."""
        ref = as_map(ref)
        name = ref.get("name")
        if ref.get("kind") != "Pod" or not isinstance(name, str) or not name:
            return 1.0
        key = (as_str(ref.get("namespace")) or namespace, name)
        if key not in self._weights:
            self._weights[key] = self.pod_weight(key, self.state.pods.get(key))
        return self._weights[key]

    def pod_weight(self, key: Key, pod: Any) -> float:
        if not isinstance(pod, dict):
            return 1.0
        raw = _annotations(pod).get(WEIGHT_ANNOTATION)
        if raw is not None:
            w = positive(raw)
            if w is not None:
                return w
            self.problem("Pod", key, f"{WEIGHT_ANNOTATION}: {raw!r} is not a positive number; "
                                     "write e.g. \"2\" or \"0.5\"; using the CPU request")
        cpu = 0.0
        for i, c in enumerate(as_list(as_map(pod.get("spec")).get("containers"))):
            raw_cpu = as_map(as_map(as_map(c).get("resources")).get("requests")).get("cpu")
            if raw_cpu is None:
                continue
            q = _quantity(raw_cpu)
            if q is None:
                self.problem("Pod", key, f"spec.containers[{i}].resources.requests.cpu: "
                                         f"{raw_cpu!r} is not a quantity; not counted")
                continue
            cpu += q
        return cpu if cpu > 0 and math.isfinite(cpu) else 1.0

    # -- policy and static ports ----------------------------------------------------------------

    def policy(self, skey: Key, svc: Obj) -> tuple[Policy, list[str]]:
        """The Service's `edgelb.io/*` policy annotations over `defaults` (cached)."""
        if skey not in self._policies:
            strings: dict[str, str] = {}
            errs: list[str] = []
            for name, value in _annotations(svc).items():
                if not isinstance(name, str) or not name.startswith(PREFIX):
                    continue
                if name[len(PREFIX):].replace("_", "-") == "target-port":
                    continue  # read by static_service
                if not isinstance(value, str):
                    errs.append(f"{name}: annotation values are strings; write {value!r} "
                                "in quotes")
                    continue
                strings[name] = value
            policy, more = self.read_policy(strings, self.defaults)
            errs.extend(more)
            for e in errs:
                self.problem("Service", skey, e)
            self._policies[skey] = (self.defaults if errs else policy, errs)
        return self._policies[skey]

    def static_services(self) -> None:
        claimed = [(key, svc) for key, svc in keyed(self.state.services)
                   if PORT_ANNOTATION in _annotations(svc)]
        owners: dict[int, Key] = {}
        for key, svc in sorted(claimed, key=lambda kv: age(*kv)):
            self.guarded("Service", key, lambda k=key, s=svc: self.static_service(k, s, owners))

    def static_service(self, key: Key, svc: Obj, owners: dict[int, Key]) -> None:
        ann = _annotations(svc)
        raw = ann.get(PORT_ANNOTATION)
        text = as_str(raw).strip()
        number = int(text) if text.isascii() and text.isdigit() else None
        if number is None or not 1 <= number <= 65535:
            self.problem("Service", key, f"{PORT_ANNOTATION}: {raw!r} is not a port; write a "
                                         "number 1-65535 in quotes, e.g. \"10001\"; not exposed")
            return
        mode = ann.get(MODE_ANNOTATION)
        if mode is not None and mode not in ("http", "tcp"):
            self.problem("Service", key, f"{MODE_ANNOTATION}: {mode!r} is not a mode; write "
                                         "\"http\" or \"tcp\"; not exposed")
            return
        target = ann.get(TARGET_PORT_ANNOTATION)
        ports = as_list(as_map(svc.get("spec")).get("ports"))
        if target is not None:
            t = as_str(target).strip()
            if not t:
                self.problem("Service", key, f"{TARGET_PORT_ANNOTATION}: {target!r} is not a "
                                             "port name or number; not exposed")
                return
            want: int | str = int(t) if t.isascii() and t.isdigit() else t
            port = self.service_port(key, "Service", key, svc, want, TARGET_PORT_ANNOTATION)
        elif ports and valid_port(as_map(ports[0]).get("port")):
            want = as_map(ports[0])["port"]
            port = self.service_port(key, "Service", key, svc, want, "spec.ports[0]")
        else:
            self.problem("Service", key, "has no spec.ports[0].port to expose; add a port or "
                                         f"set {TARGET_PORT_ANNOTATION}; not exposed")
            return
        if port is None:
            return
        policy, errs = self.policy(key, svc)
        if errs:
            return
        if number in owners:
            o = owners[number]
            self.problem("Service", key, f"{PORT_ANNOTATION}: port {number} is already taken "
                                         f"by the older Service {o[0]}/{o[1]}; not exposed")
            return
        owners[number] = key
        if mode is None:
            proto = as_str(port.get("appProtocol")).lower()
            mode = "http" if proto in HTTP_APP_PROTOCOLS else "tcp"
        name = f"{key[0]}/{key[1]}"
        if mode == "http":
            policy = self.http_policy(key, policy)
        self.services[name] = Service(name=name, mode=mode, listen=Address(LISTEN_HOST, number),
                                      backends=self.backends(key, svc, port), policy=policy)

    # -- TLS ------------------------------------------------------------------------------------

    def ingress_tls(self, key: Key, ing: Obj) -> None:
        tls = as_map(ing.get("spec")).get("tls")
        if tls is not None and not isinstance(tls, list):
            self.problem("Ingress", key, "spec.tls must be a list; ignored")
        for i, entry in enumerate(as_list(tls)):
            where = f"spec.tls[{i}]"
            if not isinstance(entry, dict):
                self.problem("Ingress", key, f"{where} is not a mapping; skipped")
                continue
            secret = entry.get("secretName")
            if not isinstance(secret, str) or not secret:
                self.problem("Ingress", key, f"{where}.secretName is missing; skipped")
                continue
            if not self.tls_secret_ok(key, where, secret):
                continue
            hosts = entry.get("hosts")
            if hosts is not None and not isinstance(hosts, list):
                self.problem("Ingress", key, f"{where}.hosts must be a list; skipped")
                continue
            for j, h in enumerate(hosts or [""]):
                host = self.host(key, h, f"{where}.hosts[{j}]")
                if host is None:
                    continue
                have = self.tls.get(host)
                if have is None:
                    self.tls[host] = (key[0], secret)
                    self._tls_owner[host] = key
                elif have != (key[0], secret):
                    o = self._tls_owner[host]
                    by = ("an earlier entry of this Ingress" if o == key
                          else f"the older Ingress {o[0]}/{o[1]}")
                    shown = f'host "{host}"' if host else "the default certificate"
                    self.problem("Ingress", key, f"{where}: {shown} already uses Secret "
                                                 f"{have[0]}/{have[1]} from {by}; ignored")

    def tls_secret_ok(self, key: Key, where: str, secret: str) -> bool:
        obj = self.state.secrets.get((key[0], secret))
        fix = (f"create it with `kubectl create secret tls {secret} -n {key[0]} "
               "--cert=... --key=...`")
        if not isinstance(obj, dict):
            self.problem("Ingress", key, f"{where}: Secret {key[0]}/{secret} not found; {fix}")
            return False
        if obj.get("type") != TLS_SECRET_TYPE:
            self.problem("Ingress", key, f"{where}: Secret {key[0]}/{secret} has type "
                                         f"{obj.get('type')!r}, not {TLS_SECRET_TYPE}; {fix}")
            return False
        data = as_map(obj.get("data"))
        missing = [k for k in TLS_KEYS if not (isinstance(data.get(k), str) and data.get(k))]
        if missing:
            self.problem("Ingress", key, f"{where}: Secret {key[0]}/{secret} lacks "
                                         f"{' and '.join(missing)}; {fix}")
            return False
        return True
