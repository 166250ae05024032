"""Gateway API objects for tests, as an API server returns them (builders, no I/O)."""

from __future__ import annotations

from typing import Any

GROUP = "gateway.networking.k8s.io"
API = f"{GROUP}/v1"
CONTROLLER = "edgelb.io/gateway-controller"
Obj = dict[str, Any]


def meta(name: str, ns: str | None = "default", ts: str = "2026-11-25T10:00:00Z",
         generation: int = 1, labels: dict[str, str] | None = None) -> Obj:
    m: Obj = {"name": name, "creationTimestamp": ts, "generation": generation}
    if ns is not None:
        m["namespace"] = ns
    if labels:
        m["labels"] = labels
    return m


def gateway_class(name: str = "edgelb", controller: str = CONTROLLER) -> Obj:
    return {"apiVersion": API, "kind": "GatewayClass", "metadata": meta(name, None),
            "spec": {"controllerName": controller}}


def listener(name: str, protocol: str = "HTTP", port: int = 80, hostname: str | None = None,
             allowed: str | None = None, selector: Obj | None = None,
             cert: str | None = None, cert_ns: str | None = None,
             mode: str | None = None, kinds: list[str] | None = None) -> Obj:
    ln: Obj = {"name": name, "protocol": protocol, "port": port}
    if hostname:
        ln["hostname"] = hostname
    if allowed or kinds:
        ar: Obj = {}
        if allowed:
            ar["namespaces"] = {"from": allowed}
            if selector is not None:
                ar["namespaces"]["selector"] = selector
        if kinds:
            ar["kinds"] = [{"group": GROUP, "kind": k} for k in kinds]
        ln["allowedRoutes"] = ar
    if cert or mode:
        tls: Obj = {}
        if mode:
            tls["mode"] = mode
        if cert:
            ref: Obj = {"kind": "Secret", "name": cert}
            if cert_ns:
                ref["namespace"] = cert_ns
            tls["certificateRefs"] = [ref]
        ln["tls"] = tls
    return ln


def gateway(name: str, listeners: list[Obj], ns: str = "default", cls: str = "edgelb") -> Obj:
    return {"apiVersion": API, "kind": "Gateway", "metadata": meta(name, ns),
            "spec": {"gatewayClassName": cls, "listeners": listeners}}


def parent(name: str, ns: str | None = None, section: str | None = None,
           port: int | None = None) -> Obj:
    p: Obj = {"name": name}
    if ns:
        p["namespace"] = ns
    if section:
        p["sectionName"] = section
    if port:
        p["port"] = port
    return p


def backend(name: str, port: int = 80, weight: int | None = None, ns: str | None = None) -> Obj:
    b: Obj = {"name": name, "port": port}
    if weight is not None:
        b["weight"] = weight
    if ns:
        b["namespace"] = ns
    return b


def rule(backends: list[Obj] | None = None, matches: list[Obj] | None = None,
         filters: list[Obj] | None = None, timeout: str | None = None) -> Obj:
    r: Obj = {}
    if backends is not None:
        r["backendRefs"] = backends
    if matches is not None:
        r["matches"] = matches
    if filters is not None:
        r["filters"] = filters
    if timeout:
        r["timeouts"] = {"request": timeout}
    return r


def http_route(name: str, parents: list[Obj], rules: list[Obj], hostnames: list[str] | None =
               None, ns: str = "default", ts: str = "2026-11-25T10:00:00Z",
               kind: str = "HTTPRoute") -> Obj:
    spec: Obj = {"parentRefs": parents, "rules": rules}
    if hostnames:
        spec["hostnames"] = hostnames
    return {"apiVersion": API, "kind": kind, "metadata": meta(name, ns, ts), "spec": spec}


def prefix(path: str) -> Obj:
    return {"path": {"type": "PathPrefix", "value": path}}


def exact(path: str) -> Obj:
    return {"path": {"type": "Exact", "value": path}}


def grant(ns: str, from_kind: str, from_ns: str, to_kind: str = "Service",
          name: str = "allow") -> Obj:
    return {"apiVersion": API, "kind": "ReferenceGrant", "metadata": meta(name, ns),
            "spec": {"from": [{"group": GROUP, "kind": from_kind, "namespace": from_ns}],
                     "to": [{"group": "", "kind": to_kind}]}}


def service(name: str, ns: str = "default", port: int = 80) -> Obj:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(name, ns),
            "spec": {"ports": [{"name": "http", "port": port, "protocol": "TCP"}]}}


def slice_for(svc: str, addresses: list[str], port: int, ns: str = "default",
              name: str | None = None) -> Obj:
    m = meta(name or f"{svc}-slice", ns)
    m["labels"] = {"kubernetes.io/service-name": svc}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": m,
            "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]}


def tls_secret(name: str, ns: str = "default", cert: str = "Y2VydA==",
               key: str = "a2V5") -> Obj:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta(name, ns),
            "type": "kubernetes.io/tls", "data": {"tls.crt": cert, "tls.key": key}}
