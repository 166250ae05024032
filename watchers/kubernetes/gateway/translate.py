"""Gateway API objects -> edgelb routes, services and certificates, with the problems found and
the status each object should have: a pure function over the reflectors' raw JSON, in the style
of watchers/kubernetes/translate.py (no I/O, no clock; the same state gives the same result).

What edgelb does with a Gateway of a class whose `controllerName` is `edgelb.io/gateway-controller`
(choices the specification leaves to the implementation are marked *):

- HTTP and HTTPS listeners are served by edgelb's shared entrypoints (the file's
  `entrypoints:`, e.g. `http` and `https`), whatever their `port`*: HTTP on the plain ones,
  HTTPS on the TLS ones, where the listener's certificates are picked by SNI name. Routes go on
  those entrypoints exactly as Ingress routes do, so Ingresses keep working beside Gateways.
  An HTTPS or TLS listener is Programmed only when the proxy has a TLS entrypoint.
- TLS listeners in Passthrough mode take TLSRoutes: each host name is relayed undecrypted by
  SNI from the TLS entrypoints (as the `edgelb.io/ssl-passthrough` Ingress annotation does).
  TLS listeners in Terminate mode are not supported*.
- TCP listeners bind their own `port` (on 0.0.0.0) and relay to the backends of the oldest
  TCPRoute attached to them*; a port taken by an older Gateway's TCP listener is Conflicted.
- HTTPRoute matches, filters, weighted backendRefs and timeouts become Routes (watchers/model);
  GRPCRoute method matches become paths `/service/method` and their backends speak h2c.
  A backendRef that cannot be resolved (no such Service or port, another kind, another
  namespace without a ReferenceGrant) keeps its weight and answers 500 (the specification).
- Ties in precedence go to the oldest route (creationTimestamp, then namespace/name), then the
  rule order within one route (`Route.order`).
- Host wildcards: edgelb's `*.example.com` matches one label*, the Gateway API's one or more.
- BackendTLSPolicy: the Services it targets are reported in `backend_tls` (the CA ConfigMap or
  the system store, and the host name); the watcher turns them into each service's TLS.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from watchers.kubernetes.gateway.resources import CONTROLLER, GROUP
from watchers.kubernetes.gateway.rules import HttpRules, Share
from watchers.kubernetes.gateway.values import port_number, route_hosts, selector_matches
from watchers.kubernetes.translate import (
    LISTEN_HOST,
    ClusterState,
    Key,
    Obj,
    PolicyReader,
    Problem,
    Translator,
    age,
    keyed,
    meta,
)
from watchers.model import Address, Policy, Route, Service
from watchers.values import as_list, as_map, as_str, valid_port

SERVICE_PREFIX = "gateway:"  # names of the services Gateway API routes lead to
PROTOCOLS = ("HTTP", "HTTPS", "TLS", "TCP")
ROUTE_KINDS = {"HTTP": ("HTTPRoute", "GRPCRoute"), "HTTPS": ("HTTPRoute", "GRPCRoute"),
               "TLS": ("TLSRoute",), "TCP": ("TCPRoute",)}
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_FAMILY = {"HTTP": "http", "HTTPS": "tls", "TLS": "tls", "TCP": "tcp"}  # what shares a port


@dataclass(frozen=True)
class GatewayState:
    """The Gateway API reflectors' caches, keyed (namespace, name); read-only."""

    gatewayclasses: Mapping[Key, Obj] = field(default_factory=dict)
    gateways: Mapping[Key, Obj] = field(default_factory=dict)
    httproutes: Mapping[Key, Obj] = field(default_factory=dict)
    grpcroutes: Mapping[Key, Obj] = field(default_factory=dict)
    tlsroutes: Mapping[Key, Obj] = field(default_factory=dict)
    tcproutes: Mapping[Key, Obj] = field(default_factory=dict)
    referencegrants: Mapping[Key, Obj] = field(default_factory=dict)
    backendtlspolicies: Mapping[Key, Obj] = field(default_factory=dict)
    configmaps: Mapping[Key, Obj] = field(default_factory=dict)
    namespaces: Mapping[Key, Obj] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BackendTLSWanted:
    """What a BackendTLSPolicy asks for a Service's backends: the CA of a ConfigMap
    (namespace, name, key) or None for the system store, and the host name (SNI and
    verification). The watcher makes the service's backend TLS of it."""

    policy: Key
    ca: tuple[str, str, str] | None
    hostname: str


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """The status one object should have. Conditions carry no lastTransitionTime (the writer
    keeps the one already there when nothing changed, else stamps now); a Gateway's
    `addresses` are the writer's too. Route status: `parents` holds our entries only."""

    resource: str  # the plural: gatewayclasses, gateways, httproutes, ...
    key: Key
    status: Obj


@dataclass(frozen=True)
class GatewayTranslation:
    services: tuple[Service, ...] = ()
    routes: tuple[Route, ...] = ()
    tls: dict[str, Key] = field(default_factory=dict)  # SNI pattern -> Secret
    problems: list[Problem] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)
    # service name -> the TLS its backends are spoken to with (a BackendTLSPolicy)
    backend_tls: dict[str, BackendTLSWanted] = field(default_factory=dict)


def translate_gateway(
    cluster: ClusterState,
    state: GatewayState,
    *,
    read_policy: PolicyReader,
    defaults: Policy = Policy(),  # noqa: B008 (frozen, shared safely)
    zone: str = "",
    pod_weights: bool = False,
    sni_routing: bool = True,
    tls_taken: Mapping[str, Any] | None = None,
    passthrough_taken: Iterable[str] = (),
    ports_taken: Iterable[int] = (),
    controller: str = CONTROLLER,
) -> GatewayTranslation:
    """Everything the Gateway API objects of `state` ask of edgelb (see the module docstring).

    `cluster` gives the Services, EndpointSlices, Secrets and Pods; `sni_routing`: the proxy
    has a TLS entrypoint. What the Ingresses already hold stays theirs (a Gateway asking for it
    is reported, so that the runtime never rejects the whole snapshot over it): `tls_taken`,
    the SNI patterns whose certificate they set; `passthrough_taken`, the host names they pass
    through; `ports_taken`, the static ports of their Services."""
    g = _Gateways(cluster, state, read_policy, defaults, zone, pod_weights, sni_routing,
                  dict(tls_taken or {}), controller)
    g.passthrough.update((h, ("", "")) for h in passthrough_taken)
    g.tcp_ports.update((p, ("", "")) for p in ports_taken)
    return g.run()


def _cond(kind: str, ok: bool, reason: str, message: str, generation: int) -> Obj:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason,
            "message": message, "observedGeneration": generation}


def _generation(obj: Obj) -> int:
    g = meta(obj).get("generation")
    return g if isinstance(g, int) and not isinstance(g, bool) else 0


@dataclass
class _Listener:
    gateway: Key
    name: str
    port: int
    protocol: str
    hostname: str
    kinds: tuple[str, ...]
    allowed: Obj  # spec.allowedRoutes.namespaces
    generation: int
    accepted: tuple[bool, str, str] = (True, "Accepted", "the listener is accepted")
    programmed: tuple[bool, str, str] = (True, "Programmed", "the listener is served")
    resolved: tuple[bool, str, str] = (True, "ResolvedRefs", "every reference is resolved")
    conflicted: tuple[bool, str, str] = (False, "NoConflicts", "no conflicts")
    attached: int = 0
    tcp_route: Key | None = None

    @property
    def usable(self) -> bool:
        return self.accepted[0] and not self.conflicted[0]


class _Gateways(HttpRules):
    def __init__(self, cluster: ClusterState, state: GatewayState, read_policy: PolicyReader,
                 defaults: Policy, zone: str, pod_weights: bool, sni_routing: bool,
                 tls_taken: dict[str, Any], controller: str) -> None:
        self.cluster = cluster
        self.state = state
        self.defaults = defaults
        self.sni_routing = sni_routing
        self.controller = controller
        # the Ingress translator's readers of Services and EndpointSlices, shared
        self.k8s = Translator(cluster, "", "", defaults, zone, pod_weights, read_policy,
                               sni_routing)
        self.problems: list[Problem] = []
        self._seen: set[Problem] = set()
        self.services: dict[str, Service] = {}
        self.routes: list[Route] = []
        self.tls: dict[str, Key] = {}
        self.tls_taken = tls_taken
        self.statuses: list[StatusUpdate] = []
        self.listeners: dict[Key, list[_Listener]] = {}
        self.passthrough: dict[str, Key] = {}  # host -> the TLSRoute that has it
        self.tcp_ports: dict[int, Key] = {}  # port -> the Gateway whose TCP listener has it
        self.backend_tls: dict[str, BackendTLSWanted] = {}
        self._policies = self.backend_tls_policies()

    # -- problems -------------------------------------------------------------------------------

    def problem(self, kind: str, key: Key, message: str) -> None:
        p = Problem(kind, key[0], key[1], message)
        if p not in self._seen:
            self._seen.add(p)
            self.problems.append(p)

    def guarded(self, kind: str, key: Key, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # the contract: a Problem, never an exception
            self.problem(kind, key, f"internal error while reading this object "
                                    f"({type(e).__name__}: {e}); it is skipped, please report")

    # -- the whole ------------------------------------------------------------------------------

    def run(self) -> GatewayTranslation:
        classes = self.our_classes()
        gateways = [(k, g) for k, g in keyed(self.state.gateways)
                    if as_str(as_map(g.get("spec")).get("gatewayClassName")) in classes]
        for key, gw in sorted(gateways, key=lambda kv: age(*kv)):
            self.guarded("Gateway", key, partial(self.gateway, key, gw))
        routes: list[tuple[str, Key, Obj]] = []
        for kind, cache in (("HTTPRoute", self.state.httproutes),
                            ("GRPCRoute", self.state.grpcroutes),
                            ("TLSRoute", self.state.tlsroutes),
                            ("TCPRoute", self.state.tcproutes)):
            routes.extend((kind, k, o) for k, o in keyed(cache))
        routes.sort(key=lambda r: age(r[1], r[2]))
        for rank, (kind, key, obj) in enumerate(routes):
            self.guarded(kind, key, partial(self.route, kind, key, obj, rank))
        for key, gw in gateways:
            self.statuses.append(self.gateway_status(key, gw))
        self.problems.extend(p for p in self.k8s.problems if p not in self._seen)
        return GatewayTranslation(
            services=tuple(self.services[n] for n in sorted(self.services)),
            routes=tuple(self.routes), tls=dict(sorted(self.tls.items())),
            problems=self.problems, statuses=self.statuses,
            backend_tls=dict(sorted(self.backend_tls.items())))

    def our_classes(self) -> set[str]:
        ours = set()
        for key, gc in keyed(self.state.gatewayclasses):
            if as_map(gc.get("spec")).get("controllerName") != self.controller:
                continue
            ours.add(key[1])
            gen = _generation(gc)
            self.statuses.append(StatusUpdate("gatewayclasses", key, {"conditions": [
                _cond("Accepted", True, "Accepted",
                      f"handled by {self.controller}", gen)]}))
        return ours

    # -- Gateways and listeners -----------------------------------------------------------------

    def gateway(self, key: Key, gw: Obj) -> None:
        spec = as_map(gw.get("spec"))
        gen = _generation(gw)
        out: list[_Listener] = []
        seen: dict[str, int] = {}
        for i, raw in enumerate(as_list(spec.get("listeners"))):
            item = as_map(raw)
            name = as_str(item.get("name")) or f"listeners[{i}]"
            port = item.get("port")
            protocol = as_str(item.get("protocol"))
            hostname = as_str(item.get("hostname")).lower().rstrip(".")
            allowed = as_map(item.get("allowedRoutes"))
            ln = _Listener(key, name, port_number(port), protocol, hostname,
                           ROUTE_KINDS.get(protocol, ()), as_map(allowed.get("namespaces")), gen)
            out.append(ln)
            if name in seen:
                ln.accepted = (False, "Invalid", f"the name {name} is used twice")
            elif protocol not in PROTOCOLS:
                ln.accepted = (False, "UnsupportedProtocol",
                               f"protocol {protocol!r} is not supported; use one of "
                               f"{', '.join(PROTOCOLS)}")
            elif not ln.port:
                ln.accepted = (False, "Invalid", f"port {port!r} is not a port (1-65535)")
            elif hostname and not _HOST.match(hostname):
                ln.accepted = (False, "Invalid", f"hostname {hostname!r} is not a host name")
            seen[name] = i
            if not ln.accepted[0]:
                self.problem("Gateway", key, f"listener {name}: {ln.accepted[2]}")
                ln.programmed = (False, "Invalid", ln.accepted[2])
                continue
            self.allowed_kinds(key, ln, allowed.get("kinds"))
            self.listener_tls(key, ln, as_map(item.get("tls")))
        self.conflicts(key, out)
        self.listeners[key] = out

    def allowed_kinds(self, key: Key, ln: _Listener, kinds: Any) -> None:
        if kinds is None:
            return
        wanted = []
        bad = []
        for k in as_list(kinds):
            k = as_map(k)
            group = k.get("group", GROUP)
            kind = as_str(k.get("kind"))
            if group == GROUP and kind in ln.kinds:
                wanted.append(kind)
            else:
                bad.append(f"{group or 'core'}/{kind}")
        if bad:
            ln.resolved = (False, "InvalidRouteKinds",
                           f"route kinds {', '.join(bad)} cannot attach to a {ln.protocol} "
                           "listener")
            self.problem("Gateway", key, f"listener {ln.name}: {ln.resolved[2]}")
        ln.kinds = tuple(wanted)

    def listener_tls(self, key: Key, ln: _Listener, tls: Obj) -> None:
        mode = as_str(tls.get("mode")) or "Terminate"
        if ln.protocol in ("HTTPS", "TLS") and not self.sni_routing:
            ln.programmed = (False, "Invalid", "the proxy has no TLS entrypoint to serve it "
                                               "(add tls to an entrypoint)")
        if ln.protocol == "TLS" and mode != "Passthrough":
            ln.accepted = (False, "UnsupportedValue", "TLS listeners support tls.mode "
                                                      "Passthrough only")
        elif ln.protocol == "HTTPS" and mode != "Terminate":
            ln.accepted = (False, "UnsupportedValue", "HTTPS listeners terminate TLS "
                                                      "(tls.mode Terminate)")
        if not ln.accepted[0]:
            ln.programmed = (False, "Invalid", ln.accepted[2])
            self.problem("Gateway", key, f"listener {ln.name}: {ln.accepted[2]}")
            return
        if ln.protocol != "HTTPS":
            return
        refs = as_list(tls.get("certificateRefs"))
        if not refs:
            ln.resolved = (False, "InvalidCertificateRef", "an HTTPS listener needs "
                                                           "tls.certificateRefs")
        for ref in refs[:1]:  # one certificate per name: the first
            ln.resolved = self.certificate(key, ln, as_map(ref))
        if not ln.resolved[0]:
            ln.programmed = (False, "Invalid", ln.resolved[2])
            self.problem("Gateway", key, f"listener {ln.name}: {ln.resolved[2]}")

    def certificate(self, key: Key, ln: _Listener, ref: Obj) -> tuple[bool, str, str]:
        group, kind = as_str(ref.get("group")), as_str(ref.get("kind")) or "Secret"
        name = as_str(ref.get("name"))
        ns = as_str(ref.get("namespace")) or key[0]
        if group or kind != "Secret":
            return (False, "InvalidCertificateRef", f"certificateRefs name a {kind}; only "
                                                    "core Secrets are supported")
        if ns != key[0] and not self.granted("Gateway", key[0], "", "Secret", ns, name):
            return (False, "RefNotPermitted", f"Secret {ns}/{name} is in another namespace "
                                              "and no ReferenceGrant there allows it")
        secret = self.cluster.secrets.get((ns, name))
        data = as_map(as_map(secret).get("data"))
        if (not isinstance(secret, dict) or secret.get("type") != "kubernetes.io/tls"
                or not all(as_str(data.get(k)) for k in ("tls.crt", "tls.key"))):
            return (False, "InvalidCertificateRef", f"Secret {ns}/{name} is missing or not a "
                                                    "kubernetes.io/tls Secret with tls.crt and "
                                                    "tls.key")
        pattern = ln.hostname
        have = self.tls.get(pattern) or self.tls_taken.get(pattern)
        if have is not None and tuple(have) != (ns, name):
            self.problem("Gateway", key, f"listener {ln.name}: host "
                                         f"{pattern or '(default)'} already has the certificate "
                                         f"of Secret {have[0]}/{have[1]}; it keeps it")
        else:
            self.tls[pattern] = (ns, name)
        return (True, "ResolvedRefs", "the certificate is resolved")

    def conflicts(self, key: Key, listeners: list[_Listener]) -> None:
        """Listeners sharing a port: another protocol family, or the same host name."""
        by_port: dict[int, list[_Listener]] = {}
        for ln in listeners:
            if ln.accepted[0]:
                by_port.setdefault(ln.port, []).append(ln)
        for ln_list in by_port.values():
            for i, ln in enumerate(ln_list):
                for other in ln_list[:i]:
                    if _FAMILY[ln.protocol] != _FAMILY[other.protocol]:
                        ln.conflicted = (True, "ProtocolConflict",
                                         f"port {ln.port} is used by listener {other.name} "
                                         f"with protocol {other.protocol}")
                    elif ln.hostname == other.hostname:
                        ln.conflicted = (True, "HostnameConflict",
                                         f"listener {other.name} has the same port and host "
                                         "name")
        for ln in listeners:
            if ln.protocol == "TCP" and ln.usable:
                owner = self.tcp_ports.setdefault(ln.port, key)
                if owner != key:
                    by = (f"the older Gateway {owner[0]}/{owner[1]}" if owner[1]
                          else "a Service annotated edgelb.io/port")
                    ln.conflicted = (True, "ProtocolConflict", f"port {ln.port} is bound by {by}")
            if ln.conflicted[0]:
                ln.programmed = (False, "Invalid", ln.conflicted[2])
                self.problem("Gateway", key, f"listener {ln.name}: {ln.conflicted[2]}")

    def gateway_status(self, key: Key, gw: Obj) -> StatusUpdate:
        gen = _generation(gw)
        listeners = self.listeners.get(key, [])
        entries = []
        for ln in listeners:
            kinds = [{"group": GROUP, "kind": k} for k in ln.kinds]
            entries.append({"name": ln.name, "supportedKinds": kinds,
                            "attachedRoutes": ln.attached, "conditions": [
                                _cond("Accepted", *ln.accepted, gen),
                                _cond("Programmed", *ln.programmed, gen),
                                _cond("ResolvedRefs", *ln.resolved, gen),
                                _cond("Conflicted", *ln.conflicted, gen)]})
        spec = as_map(gw.get("spec"))
        valid = [ln for ln in listeners if ln.usable]
        if as_list(spec.get("addresses")):
            accepted = (False, "UnsupportedAddress", "spec.addresses cannot be chosen: edgelb "
                                                     "publishes the addresses it is reached at")
        elif len(valid) == len(listeners):
            accepted = (True, "Accepted", "the Gateway is accepted")
        else:
            accepted = (bool(valid), "ListenersNotValid", "some listeners are not valid; see "
                                                          "status.listeners")
        programmed = any(ln.programmed[0] for ln in listeners) and accepted[0]
        return StatusUpdate("gateways", key, {
            "conditions": [_cond("Accepted", *accepted, gen),
                           _cond("Programmed", programmed,
                                 "Programmed" if programmed else "Invalid",
                                 "served by edgelb's entrypoints" if programmed
                                 else "no listener can be served", gen)],
            "listeners": entries})

    # -- references -----------------------------------------------------------------------------

    def granted(self, from_kind: str, from_ns: str, to_group: str, to_kind: str, to_ns: str,
                to_name: str) -> bool:
        """A ReferenceGrant in `to_ns` lets objects of `from_kind` in `from_ns` refer to it."""
        for (ns, _), grant in keyed(self.state.referencegrants):
            if ns != to_ns:
                continue
            spec = as_map(grant.get("spec"))
            froms = any(as_str(f.get("group")) == GROUP and f.get("kind") == from_kind
                        and f.get("namespace") == from_ns
                        for f in map(as_map, as_list(spec.get("from"))))
            tos = any(as_str(t.get("group")) == to_group and t.get("kind") == to_kind
                      and as_str(t.get("name")) in ("", to_name)
                      for t in map(as_map, as_list(spec.get("to"))))
            if froms and tos:
                return True
        return False

    def namespace_allowed(self, ln: _Listener, route_ns: str) -> bool:
        origin = as_str(ln.allowed.get("from")) or "Same"
        if origin == "All":
            return True
        if origin == "Same":
            return route_ns == ln.gateway[0]
        if origin == "Selector":
            ns = as_map(self.state.namespaces.get(("", route_ns)))
            labels = as_map(meta(ns).get("labels"))
            labels = {**labels, "kubernetes.io/metadata.name": route_ns}
            return selector_matches(ln.allowed.get("selector"), labels)
        return False

    # -- routes: attaching ------------------------------------------------------------------------

    def route(self, kind: str, key: Key, obj: Obj, rank: int) -> None:
        spec = as_map(obj.get("spec"))
        gen = _generation(obj)
        hostnames: list[str] | None = None  # None: any
        if kind != "TCPRoute" and as_list(spec.get("hostnames")):
            hostnames = []  # none valid: the route matches no listener
            for h in as_list(spec.get("hostnames")):
                host = as_str(h).lower().rstrip(".")
                if _HOST.match(host):
                    hostnames.append(host)
                else:
                    self.problem(kind, key, f"spec.hostnames: {h!r} is not a host name; "
                                            "ignored")
        parents: list[tuple[Obj, list[tuple[_Listener, list[str]]] | None, tuple[str, str]]] = []
        for ref in as_list(spec.get("parentRefs")):
            ref = as_map(ref)
            if as_str(ref.get("group") or GROUP) != GROUP or as_str(ref.get("kind") or "Gateway") \
                    != "Gateway":
                continue
            gw = (as_str(ref.get("namespace")) or key[0], as_str(ref.get("name")))
            if gw not in self.listeners:
                continue  # not one of ours: its controller writes this parent's status
            parents.append(self.attach(kind, key, ref, gw, hostnames))
        if not parents:
            return
        attached = [(ln, hosts) for _, found, _ in parents for ln, hosts in (found or [])]
        resolved: tuple[bool, str, str] = (True, "ResolvedRefs", "every reference is resolved")
        if attached:
            resolved = self.program(kind, key, obj, rank, attached)
        status_parents = []
        for ref, found, (reason, message) in parents:
            ok = bool(found)
            conds = [_cond("Accepted", ok, reason, message, gen),
                     _cond("ResolvedRefs", *resolved, gen)]
            status_parents.append({"parentRef": ref, "controllerName": self.controller,
                                   "conditions": conds})
            if not ok:
                self.problem(kind, key, f"parent Gateway {ref.get('name')}: {message}")
        self.statuses.append(StatusUpdate(kind.lower() + "s", key, {"parents": status_parents}))

    def attach(self, kind: str, key: Key, ref: Obj, gw: Key, hostnames: list[str] | None
               ) -> tuple[Obj, list[tuple[_Listener, list[str]]] | None, tuple[str, str]]:
        """The listeners of `gw` that take this route, with its hosts on each."""
        section = ref.get("sectionName")
        port = ref.get("port")
        candidates = [ln for ln in self.listeners[gw]
                      if (section is None or ln.name == section)
                      and (port is None or ln.port == port)]
        if not candidates:
            return ref, None, ("NoMatchingParent", "no listener of the Gateway has this "
                                                   "sectionName/port")
        allowed = [ln for ln in candidates if ln.usable and kind in ln.kinds
                   and self.namespace_allowed(ln, key[0])]
        if not allowed:
            return ref, None, ("NotAllowedByListeners", f"no listener allows a {kind} from "
                                                        f"namespace {key[0]}")
        found = []
        for ln in allowed:
            if kind == "TCPRoute":
                hosts = [""]
            elif hostnames is None:
                hosts = [ln.hostname]
            else:
                hosts = route_hosts(ln.hostname, hostnames) if hostnames else []
            if hosts:
                found.append((ln, hosts))
        if not found:
            return ref, None, ("NoMatchingListenerHostname", "no listener host name matches "
                                                             "the route's hostnames")
        if kind == "TCPRoute":
            free = [(ln, h) for ln, h in found if ln.tcp_route in (None, key)]
            if not free:
                return ref, None, ("NotAllowedByListeners", "the TCP listener already relays "
                                                            "an older TCPRoute")
            for ln, _ in free:
                ln.tcp_route = key
            found = free
        for ln, _ in found:
            ln.attached += 1
        return ref, found, ("Accepted", "the route is accepted")

    def program(self, kind: str, key: Key, obj: Obj, rank: int,
                attached: list[tuple[_Listener, list[str]]]) -> tuple[bool, str, str]:
        """Routes and services for an attached route; its ResolvedRefs condition."""
        spec = as_map(obj.get("spec"))
        rules = as_list(spec.get("rules"))
        failures: list[Share] = []
        if kind in ("HTTPRoute", "GRPCRoute"):
            hosts = list(dict.fromkeys(h for _, hs in attached for h in hs))
            for i, rule in enumerate(rules):
                failures += self.http_rule(kind, key, as_map(rule), i, hosts, rank)
        elif kind == "TLSRoute":
            hosts = list(dict.fromkeys(h for _, hs in attached for h in hs))
            failures += self.tls_route(key, rules, hosts)
        else:
            failures += self.tcp_route(key, rules, [ln for ln, _ in attached])
        if failures:
            first = failures[0]
            return (False, first.reason, first.message)
        return (True, "ResolvedRefs", "every reference is resolved")

    # -- backends -------------------------------------------------------------------------------

    def share(self, kind: str, key: Key, ref: Obj, mode: str = "http",
              protocol: str = "http1") -> Share:
        """One backendRef: its service (made here), or why it is unresolved."""
        group, bkind = as_str(ref.get("group")), as_str(ref.get("kind")) or "Service"
        name = as_str(ref.get("name"))
        ns = as_str(ref.get("namespace")) or key[0]
        port = ref.get("port")
        weight = ref.get("weight", 1)
        weight = weight if isinstance(weight, int) and not isinstance(weight, bool) \
            and weight >= 0 else 1
        label = f"{ns}/{name}:{port}"
        if group or bkind != "Service":
            return Share(label, weight, "InvalidKind", f"backendRef {group or 'core'}/{bkind} "
                                                        f"{name}: only Services are supported")
        if ns != key[0] and not self.granted(kind, key[0], "", "Service", ns, name):
            return Share(label, weight, "RefNotPermitted",
                          f"Service {ns}/{name} is in another namespace and no ReferenceGrant "
                          "there allows it")
        svc = self.cluster.services.get((ns, name))
        if not isinstance(svc, dict):
            return Share(label, weight, "BackendNotFound", f"Service {ns}/{name} not found")
        if not valid_port(port):
            return Share(label, weight, "UnsupportedValue", f"backendRef to Service {ns}/{name} "
                                                             "needs a port")
        skey = (ns, name)
        sport = self.k8s.service_port(key, kind, skey, svc, port_number(port),
                                      f"backendRef {label}")
        if sport is None:
            return Share(label, weight, "BackendNotFound", f"Service {ns}/{name} has no port "
                                                            f"{port}")
        policy, errs = self.k8s.policy(skey, svc)
        if errs:
            policy = self.defaults
        if mode == "http":
            policy = self.k8s.http_policy(skey, policy)
        suffix = "" if protocol == "http1" else f"+{protocol}"
        sname = f"{SERVICE_PREFIX}{ns}/{name}:{port}{suffix}"
        if protocol != "http1":
            policy = replace(policy, backend_protocol=protocol)
        backends = self.k8s.backends(skey, svc, sport)
        if mode != "http":  # the caller makes the tcp service
            return Share(sname, weight, backends=backends, policy=policy)
        tls = self._policies.get((ns, name))
        if tls is not None:
            self.backend_tls[sname] = tls
        if sname not in self.services:
            self.services[sname] = Service(name=sname, mode=mode, policy=policy,
                                           backends=backends)
        return Share(sname, weight, backends=backends, policy=policy)

    def backend_tls_policies(self) -> dict[Key, BackendTLSWanted]:
        """Service -> (CA ConfigMap (namespace, name, key) or None: system store, host)."""
        out: dict[Key, BackendTLSWanted] = {}
        for key, pol in sorted(keyed(self.state.backendtlspolicies),
                               key=lambda kv: age(*kv)):
            spec = as_map(pol.get("spec"))
            val = as_map(spec.get("validation"))
            host = as_str(val.get("hostname")).lower()
            if not host:
                self.problem("BackendTLSPolicy", key, "validation.hostname is required")
                continue
            refs = as_list(val.get("caCertificateRefs"))
            ca: tuple[str, str, str] | None = None
            if refs:
                ref = as_map(refs[0])
                if as_str(ref.get("group")) or ref.get("kind") != "ConfigMap":
                    self.problem("BackendTLSPolicy", key, "caCertificateRefs: only core "
                                                          "ConfigMaps are supported")
                    continue
                cm = self.state.configmaps.get((key[0], as_str(ref.get("name"))))
                if not as_str(as_map(as_map(cm).get("data")).get("ca.crt")):
                    self.problem("BackendTLSPolicy", key, f"ConfigMap {key[0]}/"
                                                          f"{ref.get('name')} has no ca.crt")
                    continue
                ca = (key[0], as_str(ref.get("name")), "ca.crt")
            elif val.get("wellKnownCACertificates") != "System":
                self.problem("BackendTLSPolicy", key, "give validation.caCertificateRefs or "
                                                      "wellKnownCACertificates: System")
                continue
            for t in as_list(spec.get("targetRefs")):
                t = as_map(t)
                if not as_str(t.get("group")) and t.get("kind") == "Service":
                    out.setdefault((key[0], as_str(t.get("name"))),
                                   BackendTLSWanted(key, ca, host))
        return out

    # -- TLSRoute and TCPRoute ------------------------------------------------------------------

    def tls_route(self, key: Key, rules: list[Any], hosts: list[str]) -> list[Share]:
        refs = [as_map(r) for rule in rules[:1] for r in as_list(as_map(rule).get("backendRefs"))]
        if not refs:
            self.problem("TLSRoute", key, "spec.rules[0] has no backendRefs; nothing to relay")
            return []
        share = self.share("TLSRoute", key, refs[0], mode="tcp")
        if share.reason:
            self.problem("TLSRoute", key, f"{share.message}; its hosts are not relayed")
            return [share]
        for host in hosts:
            if not host:
                self.problem("TLSRoute", key, "passthrough routes by SNI name; give the route "
                                              "or the listener a hostname")
                continue
            owner = self.passthrough.setdefault(host, key)
            if owner != key:
                by = (f"the older TLSRoute {owner[0]}/{owner[1]}" if owner[1]
                      else "an Ingress annotated edgelb.io/ssl-passthrough")
                self.problem("TLSRoute", key, f"host {host} is already relayed by {by}; "
                                              "ignored")
                continue
            name = f"{share.service}@{host}"
            self.services[name] = Service(name=name, mode="tcp", backends=share.backends,
                                          policy=share.policy or self.defaults,
                                          tls_passthrough=True)
            self.routes.append(Route(host=host, path="/", service=name, any_depth=True))
        return []

    def tcp_route(self, key: Key, rules: list[Any], listeners: list[_Listener]) -> list[Share]:
        refs = [as_map(r) for rule in rules[:1] for r in as_list(as_map(rule).get("backendRefs"))]
        shares = [self.share("TCPRoute", key, r, mode="tcp") for r in refs]
        good = [s for s in shares if not s.reason and s.weight > 0]
        backends = tuple(b for s in good for b in s.backends)
        policy = (good[0].policy if good else None) or self.defaults
        for ln in listeners:
            name = f"{SERVICE_PREFIX}{ln.gateway[0]}/{ln.gateway[1]}/{ln.name}"
            self.services[name] = Service(name=name, mode="tcp", policy=policy,
                                          listen=Address(LISTEN_HOST, ln.port),
                                          backends=tuple(dict.fromkeys(backends)))
        for s in shares:
            if s.reason:
                self.problem("TCPRoute", key, s.message)
        return [s for s in shares if s.reason]
