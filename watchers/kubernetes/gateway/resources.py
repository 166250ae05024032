"""The Gateway API kinds edgelb reads (standard channel, gateway.networking.k8s.io/v1 as of
Gateway API v1.6: TLSRoute is v1 since v1.5, TCPRoute since v1.6, BackendTLSPolicy since v1.4),
and the discovery call that says which of them the cluster serves."""

from __future__ import annotations

from typing import Any

from watchers.kubernetes.leader import request_json
from watchers.kubernetes.reflector import KubeApiError, Resource

GROUP = "gateway.networking.k8s.io"
VERSION = "v1"
CONTROLLER = "edgelb.io/gateway-controller"

GATEWAYCLASSES = Resource(GROUP, VERSION, "gatewayclasses", "GatewayClass", namespaced=False)
GATEWAYS = Resource(GROUP, VERSION, "gateways", "Gateway")
HTTPROUTES = Resource(GROUP, VERSION, "httproutes", "HTTPRoute")
GRPCROUTES = Resource(GROUP, VERSION, "grpcroutes", "GRPCRoute")
TLSROUTES = Resource(GROUP, VERSION, "tlsroutes", "TLSRoute")
TCPROUTES = Resource(GROUP, VERSION, "tcproutes", "TCPRoute")
REFERENCEGRANTS = Resource(GROUP, VERSION, "referencegrants", "ReferenceGrant")
BACKENDTLSPOLICIES = Resource(GROUP, VERSION, "backendtlspolicies", "BackendTLSPolicy")
# the core kinds only the Gateway API needs: namespaces (allowedRoutes selectors), configmaps
# (BackendTLSPolicy's CA certificates)
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")

# cache name (GatewayState's field) -> resource
KINDS: dict[str, Resource] = {
    "gatewayclasses": GATEWAYCLASSES, "gateways": GATEWAYS, "httproutes": HTTPROUTES,
    "grpcroutes": GRPCROUTES, "tlsroutes": TLSROUTES, "tcproutes": TCPROUTES,
    "referencegrants": REFERENCEGRANTS, "backendtlspolicies": BACKENDTLSPOLICIES,
}
REQUIRED = ("gatewayclasses", "gateways", "httproutes")  # the GATEWAY-HTTP profile's kinds
BY_KIND = {r.kind: r for r in KINDS.values()}


async def served_kinds(api: Any, timeout: float = 10.0) -> set[str]:
    """The plurals of gateway.networking.k8s.io/v1 the cluster serves (API discovery); empty
    when the group version is not installed (404). Other failures raise."""
    try:
        doc = await request_json(api, "GET", f"/apis/{GROUP}/{VERSION}", timeout=timeout,
                                 what=f"discover {GROUP}/{VERSION}")
    except KubeApiError as e:
        if e.code == 404:
            return set()
        raise
    found = set()
    for r in doc.get("resources") or []:
        name = r.get("name") if isinstance(r, dict) else None
        if isinstance(name, str) and "/" not in name:
            found.add(name)
    return found
