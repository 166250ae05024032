"""edgelb as a Gateway API implementation, end to end: the whole process (App) with
`watchers.kubernetes.gateway_api: true`, the official client against the protocol-faithful fake
API server, real backends on 127.0.0.1 standing for the pods, requests through the proxy. The
cases follow the Gateway API conformance suite's core HTTPRoute tests, plus TCPRoute and
TLSRoute passthrough."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tlskit
from gateway_objects import (
    backend,
    exact,
    gateway,
    gateway_class,
    grant,
    http_route,
    listener,
    parent,
    prefix,
    rule,
)
from httpkit import HOST, HttpBackend, eventually, fetch, free_port, tcp_echo_server, within
from k8s_fake import FakeKubeAPI

from edgelb.ops.app import App
from watchers.kubernetes.leader import micro_time

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

Obj = dict[str, Any]


def service(name: str, ns: str = "default", port: int = 80) -> Obj:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"name": "p", "port": port, "protocol": "TCP"}]}}


def endpoints(name: str, port: int, ns: str = "default") -> Obj:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [HOST], "conditions": {"ready": True}}]}


class Cluster:
    def __init__(self, fake: FakeKubeAPI, app: App, http: int, https: int) -> None:
        self.fake, self.app, self.http, self.https = fake, app, http, https
        self.backends: list[HttpBackend] = []

    async def pod(self, name: str, ns: str = "default") -> HttpBackend:
        """A Service `name` (port 80) whose one endpoint is a new backend named `name`."""
        b = await HttpBackend(name).start()
        self.backends.append(b)
        self.fake.put(service(name, ns))
        self.fake.put(endpoints(name, b.port, ns))
        return b

    async def get(self, host: str, path: str = "/", headers: list[tuple[str, str]] | None
                  = None) -> tuple[int, str]:
        r = await within(fetch(self.http, "GET", path, host=host, headers=headers or []))
        return r.status, r.body.decode("latin-1")

    async def until(self, host: str, path: str, want: tuple[int, str] | int,
                    headers: list[tuple[str, str]] | None = None) -> None:
        """Poll through the proxy until a request answers `want` (a translation applied)."""
        got: Any = None

        async def check() -> bool:
            nonlocal got
            got = await self.get(host, path, headers)
            return got == want or got[0] == want

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not await check():
            if loop.time() > deadline:
                raise AssertionError(f"{host}{path}: wanted {want}, got {got}")
            await asyncio.sleep(0.05)

    def status(self, kind: str, name: str, ns: str | None = "default") -> Obj:
        obj = self.fake.get(kind, ns, name)
        assert obj is not None
        return obj.get("status") or {}


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("POD_NAME", "edgelb-0")
    monkeypatch.setenv("POD_NAMESPACE", "edgelb")
    param = getattr(request, "param", {})
    fake = FakeKubeAPI(bookmark_interval=0.2, gateway_api=param.get("crds", True))
    await fake.start()
    if param.get("leader"):  # another replica holds the lease: this one only follows
        fake.put({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                  "metadata": {"name": "edgelb-leader-edgelb", "namespace": "edgelb"},
                  "spec": {"holderIdentity": param["leader"], "leaseDurationSeconds": 3600,
                           "renewTime": micro_time(time.time())}})
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig")
    http, https, admin = free_port(), free_port(), free_port()
    path = tmp_path / "edgelb.yaml"
    path.write_text(
        f"admin: {{listen: {HOST}:{admin}}}\n"
        f"entrypoints: {{http: {{listen: {HOST}:{http}, h2c: true}}, "
        f"https: {{listen: {HOST}:{https}, tls: {{}}}}}}\n"
        "shutdown: {grace: 1s}\n"
        "watchers:\n"
        f"  kubernetes: {{kubeconfig: {kubeconfig}, publish_address: [203.0.113.10], "
        "gateway_api: true}\n")
    app = App(path)
    c = Cluster(fake, app, http, https)
    try:
        await within(app.start(), 10)
        yield c
    finally:
        await app.stop()
        for b in c.backends:
            await b.stop()
        await fake.stop()


def base(fake: FakeKubeAPI, *listeners: Obj) -> None:
    fake.put(gateway_class())
    fake.put(gateway("gw", list(listeners) or [listener("http", hostname="*.example.com",
                                                        allowed="All")]))


async def test_paths_hosts_headers_and_precedence(cluster: Cluster) -> None:
    fake = cluster.fake
    base(fake)
    for name in ("exact", "prefix", "header", "older", "newer"):
        await cluster.pod(name)
    fake.put(http_route("a", [parent("gw")], [
        rule([backend("exact")], [exact("/exact")]),
        rule([backend("prefix")], [prefix("/p")]),
        rule([backend("header")], [{"path": {"type": "PathPrefix", "value": "/"},
                                    "headers": [{"name": "X-Env", "value": "canary"}]}])],
        hostnames=["a.example.com"]))
    fake.put(http_route("old", [parent("gw")], [rule([backend("older")])],
                        ts="2026-01-01T00:00:00Z"))
    fake.put(http_route("new", [parent("gw")], [rule([backend("newer")])],
                        ts="2026-06-01T00:00:00Z"))
    await cluster.until("a.example.com", "/exact", (200, "exact GET /exact"))
    assert await cluster.get("a.example.com", "/exact/more") == (200, "older GET /exact/more")
    assert await cluster.get("a.example.com", "/p/x") == (200, "prefix GET /p/x")
    assert await cluster.get("a.example.com", "/px") == (200, "older GET /px")  # element-wise
    assert await cluster.get("a.example.com", "/", [("X-Env", "canary")]) == (
        200, "header GET /")
    # the listener's *.example.com and a route without hostnames: any name under it
    assert await cluster.get("b.example.com") == (200, "older GET /")  # the older route wins
    # the Gateway API's `*.` covers one or more labels (Ingress's exactly one)
    assert await cluster.get("c.b.example.com") == (200, "older GET /")
    assert (await cluster.get("example.org"))[0] == 404  # outside the listener's hostname


async def test_weighted_backends_and_an_unresolved_share(cluster: Cluster) -> None:
    fake = cluster.fake
    base(fake)
    await cluster.pod("blue")
    await cluster.pod("green")
    fake.put(http_route("split", [parent("gw")], [
        rule([backend("blue", weight=3), backend("green", weight=1)])],
        hostnames=["split.example.com"]))
    await cluster.until("split.example.com", "/", 200)
    seen = [(await cluster.get("split.example.com"))[1].split()[0] for _ in range(40)]
    assert seen.count("blue") == 30 and seen.count("green") == 10
    fake.put(http_route("split", [parent("gw")], [
        rule([backend("blue", weight=1), backend("missing", weight=1)])],
        hostnames=["split.example.com"]))
    await cluster.until("split.example.com", "/", 500)
    codes = [(await cluster.get("split.example.com"))[0] for _ in range(10)]
    assert sorted(codes) == [200] * 5 + [500] * 5
    await fake.wait_for(lambda: any(
        c["type"] == "ResolvedRefs" and c["reason"] == "BackendNotFound"
        for p in cluster.status("HTTPRoute", "split").get("parents", [])
        for c in p["conditions"]), what="ResolvedRefs BackendNotFound")


async def test_request_header_modifier_and_redirect(cluster: Cluster) -> None:
    fake = cluster.fake
    base(fake)
    web = await cluster.pod("web")
    fake.put(http_route("f", [parent("gw")], [
        rule([backend("web")], [prefix("/")], [{"type": "RequestHeaderModifier",
                                                "requestHeaderModifier": {
                                                    "set": [{"name": "X-Set", "value": "s"}],
                                                    "add": [{"name": "X-Add", "value": "a"}],
                                                    "remove": ["X-Gone"]}}]),
        rule(None, [prefix("/old")], [{"type": "RequestRedirect", "requestRedirect": {
            "hostname": "new.example.com", "statusCode": 301}}])],
        hostnames=["f.example.com"]))
    await cluster.until("f.example.com", "/", 200)
    await cluster.get("f.example.com", "/", [("X-Set", "client"), ("X-Gone", "1")])
    req = web.requests[-1]
    assert req.get("x-set") == "s" and req.get("x-add") == "a" and req.get("x-gone") is None
    r = await within(fetch(cluster.http, "GET", "/old/page", host="f.example.com"))
    assert r.status == 301
    assert r.get("location") == "http://new.example.com/old/page"


async def test_https_listener_serves_its_certificate(cluster: Cluster) -> None:
    fake = cluster.fake
    cert, key = tlskit.ca().issue(["secure.example.com"], serial=4242)
    fake.put(tlskit.secret("default", "secure-cert", cert, key))
    base(fake, listener("https", "HTTPS", 443, "secure.example.com", cert="secure-cert"))
    await cluster.pod("web")
    fake.put(http_route("s", [parent("gw")], [rule([backend("web")])]))

    async def served() -> tuple[int, bytes] | None:
        """(the certificate's serial, the response) over TLS with SNI and Host the name."""
        try:
            reader, writer = await asyncio.open_connection(
                HOST, cluster.https, ssl=tlskit.client_context(),
                server_hostname="secure.example.com")
        except (ssl.SSLError, OSError):
            return None
        try:
            serial, _ = tlskit.peer(writer.get_extra_info("ssl_object"))
            writer.write(b"GET / HTTP/1.1\r\nHost: secure.example.com\r\n"
                         b"Connection: close\r\n\r\n")
            return serial, await within(reader.read())
        finally:
            writer.close()

    got = None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while (got is None or got[0] != 4242) and loop.time() < deadline:
        got = await served()
        await asyncio.sleep(0.05)
    assert got is not None and got[0] == 4242
    assert got[1].startswith(b"HTTP/1.1 200") and got[1].endswith(b"web GET /")
    await fake.wait_for(lambda: cluster.status("Gateway", "gw").get("listeners"),
                        what="the Gateway status")
    gw = cluster.status("Gateway", "gw")
    (ln,) = gw["listeners"]
    assert {c["type"]: c["status"] for c in ln["conditions"]} == {
        "Accepted": "True", "Programmed": "True", "ResolvedRefs": "True",
        "Conflicted": "False"}


async def test_cross_namespace_backend_needs_a_reference_grant(cluster: Cluster) -> None:
    fake = cluster.fake
    base(fake)
    await cluster.pod("api", ns="backends")
    fake.put(http_route("x", [parent("gw", "default")], [rule([backend("api", ns="backends")])],
                        hostnames=["x.example.com"], ns="apps"))
    await cluster.until("x.example.com", "/", 500)

    def resolved() -> list[tuple[str, str]]:
        return [(c["status"], c["reason"])
                for p in cluster.status("HTTPRoute", "x", "apps").get("parents", [])
                for c in p["conditions"] if c["type"] == "ResolvedRefs"]

    await fake.wait_for(lambda: resolved() == [("False", "RefNotPermitted")],
                        what="RefNotPermitted")
    fake.put(grant("backends", "HTTPRoute", "apps"))
    await cluster.until("x.example.com", "/", (200, "api GET /"))
    await fake.wait_for(lambda: resolved() == [("True", "ResolvedRefs")], what="ResolvedRefs")


async def test_status_conditions_written_once(cluster: Cluster) -> None:
    fake = cluster.fake
    base(fake)
    await cluster.pod("web")
    fake.put(http_route("r", [parent("gw")], [rule([backend("web")])],
                        hostnames=["r.example.com"]))
    await cluster.until("r.example.com", "/", 200)

    def gateway_ready() -> bool:
        gw = cluster.status("Gateway", "gw")
        listeners = gw.get("listeners") or [{}]
        return listeners[0].get("attachedRoutes") == 1 and bool(cluster.status(
            "HTTPRoute", "r").get("parents"))

    await fake.wait_for(gateway_ready, what="the statuses")
    gc = cluster.status("GatewayClass", "edgelb", None)
    assert [(c["type"], c["status"]) for c in gc["conditions"]] == [("Accepted", "True")]
    gw = cluster.status("Gateway", "gw")
    assert gw["addresses"] == [{"type": "IPAddress", "value": "203.0.113.10"}]
    assert {c["type"]: c["status"] for c in gw["conditions"]} == {"Accepted": "True",
                                                                  "Programmed": "True"}
    (p,) = cluster.status("HTTPRoute", "r")["parents"]
    assert p["controllerName"] == "edgelb.io/gateway-controller"
    assert {c["type"]: (c["status"], c["observedGeneration"]) for c in p["conditions"]} == {
        "Accepted": ("True", 1), "ResolvedRefs": ("True", 1)}
    assert all(c["lastTransitionTime"] for c in p["conditions"])
    writes = len(fake.status_updates)
    await cluster.pod("unrelated")  # another translation: nothing of ours changed
    runtime = cluster.app.runtime
    assert runtime is not None
    await eventually(lambda: "gateway:default/web:80" in runtime.services, timeout=5)
    watcher = cluster.app.kubernetes
    assert watcher is not None
    applies = watcher.applies
    await eventually(lambda: watcher.applies > applies, timeout=5, what="another apply")
    assert len(fake.status_updates) == writes
    # a new generation is observed
    route = fake.get("HTTPRoute", "default", "r")
    assert route is not None
    route["spec"]["rules"][0]["backendRefs"][0]["weight"] = 2
    fake.put(route)
    await fake.wait_for(lambda: all(
        c["observedGeneration"] == 2
        for c in cluster.status("HTTPRoute", "r")["parents"][0]["conditions"]),
        what="observedGeneration 2")


async def test_tcp_route(cluster: Cluster) -> None:
    fake = cluster.fake
    server, port = await tcp_echo_server()
    try:
        listen = free_port()
        base(fake, listener("db", "TCP", listen))
        fake.put(service("db", port=5432))
        fake.put(endpoints("db", port))
        fake.put(http_route("db", [parent("gw", section="db")], [rule([backend("db", 5432)])],
                            kind="TCPRoute"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            try:
                reader, writer = await asyncio.open_connection(HOST, listen)
                break
            except OSError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        writer.write(b"ping\n")
        assert await within(reader.readline()) == b"ping\n"
        writer.close()
    finally:
        server.close()


async def test_tls_route_passthrough(cluster: Cluster) -> None:
    fake = cluster.fake
    cert, key = tlskit.ca().issue(["db.example.com", "a.db.example.com"], serial=777)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "c.pem").write_bytes(cert)
        (Path(d) / "k.pem").write_bytes(key)
        ctx.load_cert_chain(str(Path(d) / "c.pem"), str(Path(d) / "k.pem"))
    server, port = await tlskit.serve(ctx)
    try:
        base(fake, listener("tls", "TLS", 443, "*.example.com", mode="Passthrough"))
        fake.put(service("db", port=443))
        fake.put(endpoints("db", port))
        fake.put(http_route("t", [parent("gw")], [rule([backend("db", 443)])],
                            hostnames=["db.example.com"], kind="TLSRoute"))
        got = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while loop.time() < deadline:
            try:
                got = await tlskit.fetch(cluster.https, "db.example.com")
                break
            except (ssl.SSLError, OSError, TimeoutError):
                await asyncio.sleep(0.05)
        assert got is not None and got.serial == 777  # the backend's own certificate
        # a route without hostnames takes the listener's `*.example.com`, of any depth
        fake.put(http_route("t", [parent("gw")], [rule([backend("db", 443)])], kind="TLSRoute"))
        deadline = loop.time() + 10
        got = None
        while loop.time() < deadline:
            try:
                got = await tlskit.fetch(cluster.https, "a.db.example.com")
                break
            except (ssl.SSLError, OSError, TimeoutError):
                await asyncio.sleep(0.05)
        assert got is not None and got.serial == 777
    finally:
        server.close()


async def test_backend_tls_policy_verifies_the_backend_with_the_configmap_ca(
        cluster: Cluster, tmp_path: Path) -> None:
    fake = cluster.fake
    cert, key = tlskit.ca().issue(["web.internal"], serial=99)
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    server, port = await tlskit.serve(ctx)
    try:
        base(fake)
        fake.put(service("web", port=443))
        fake.put(endpoints("web", port))
        fake.put(http_route("r", [parent("gw")], [rule([backend("web", 443)])],
                            hostnames=["t.example.com"]))
        await cluster.until("t.example.com", "/", 502)  # plain HTTP to a TLS server
        fake.put({"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": "ca", "namespace": "default"},
                  "data": {"ca.crt": tlskit.ca().pem.decode()}})
        fake.put({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "BackendTLSPolicy",
                  "metadata": {"name": "web-tls", "namespace": "default"},
                  "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "web"}],
                           "validation": {"hostname": "web.internal", "caCertificateRefs": [
                               {"group": "", "kind": "ConfigMap", "name": "ca"}]}}})
        await cluster.until("t.example.com", "/", (200, "ok"))
    finally:
        server.close()


async def test_other_controllers_entries_are_kept_and_ours_leave_with_the_route(
        cluster: Cluster) -> None:
    fake = cluster.fake
    base(fake)
    await cluster.pod("web")
    theirs = {"parentRef": {"name": "theirs"}, "controllerName": "example.com/other",
              "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                              "message": "", "observedGeneration": 1,
                              "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    route = http_route("r", [parent("gw"), parent("theirs")], [rule([backend("web")])],
                       hostnames=["r.example.com"])
    route["status"] = {"parents": [theirs]}
    fake.put(route)

    def controllers() -> list[str]:
        return [p["controllerName"] for p in cluster.status("HTTPRoute", "r").get("parents", [])]

    await fake.wait_for(lambda: controllers() == ["example.com/other",
                                                  "edgelb.io/gateway-controller"],
                        what="both controllers' entries")
    assert cluster.status("HTTPRoute", "r")["parents"][0] == theirs
    route = fake.get("HTTPRoute", "default", "r")
    assert route is not None
    route["spec"]["parentRefs"] = [parent("theirs")]
    fake.put(route)
    await fake.wait_for(lambda: controllers() == ["example.com/other"],
                        what="our entry taken off")
    await cluster.until("r.example.com", "/", 404)


async def test_grpc_route_by_service_and_method(cluster: Cluster) -> None:
    from grpckit import GrpcBackend, GrpcClient

    fake = cluster.fake
    base(fake, listener("http", allowed="All"))
    a, b = GrpcBackend("a"), GrpcBackend("b")
    client = GrpcClient(cluster.http)
    try:
        for name, g in (("a", a), ("b", b)):
            fake.put(service(name, port=50051))
            fake.put(endpoints(name, g.port))
        fake.put(http_route("g", [parent("gw")], [
            {"matches": [{"method": {"service": "t.Echo", "method": "Unary"}}],
             "backendRefs": [backend("a", 50051)]},
            {"matches": [{"method": {"service": "t.Echo"}}],
             "backendRefs": [backend("b", 50051)]}], kind="GRPCRoute"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            try:
                got = await client.unary(b"hi", timeout=2)
                break
            except Exception:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        assert got == b"a:hi"
        assert await client.bidi([b"x", b"y"]) == [b"X", b"Y"]
        assert b.calls == ["Bidi"] and a.calls == ["Unary"]
    finally:
        client.close()
        a.stop()
        b.stop()


@pytest.mark.parametrize("cluster", [{"leader": "edgelb-1"}], indirect=True)
async def test_a_follower_serves_but_writes_no_status(cluster: Cluster) -> None:
    fake = cluster.fake
    base(fake)
    await cluster.pod("web")
    fake.put(http_route("r", [parent("gw")], [rule([backend("web")])],
                        hostnames=["r.example.com"]))
    await cluster.until("r.example.com", "/", (200, "web GET /"))
    watcher = cluster.app.kubernetes
    assert watcher is not None
    applies = watcher.applies
    await cluster.pod("more")  # one more translation, still as a follower
    await eventually(lambda: watcher.applies > applies, timeout=5, what="another apply")
    assert fake.status_updates == []
    assert not any(r.method == "PATCH" and r.path.endswith("/status") for r in fake.requests)


@pytest.mark.parametrize("cluster", [{"crds": False}], indirect=True)
async def test_without_the_crds_ingress_keeps_working(cluster: Cluster) -> None:
    fake = cluster.fake
    await cluster.pod("web")
    fake.put({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
              "metadata": {"name": "edgelb"},
              "spec": {"controller": "edgelb.io/ingress-controller"}})
    fake.put({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
              "metadata": {"name": "i", "namespace": "default"},
              "spec": {"ingressClassName": "edgelb", "rules": [{"host": "i.example.com",
                                                                "http": {"paths": [
                  {"path": "/", "pathType": "Prefix", "backend": {
                      "service": {"name": "web", "port": {"number": 80}}}}]}}]}})
    await cluster.until("i.example.com", "/", (200, "web GET /"))
    watcher = cluster.app.kubernetes
    assert watcher is not None and not watcher.gateway_on
    assert watcher._gateway_problem is not None
    assert "install the Gateway API CRDs" in watcher._gateway_problem.message


async def test_every_request_is_granted_by_the_manifests(cluster: Cluster, tmp_path: Path
                                                         ) -> None:
    """What the watcher asks of the API (lists, watches, status patches) is exactly what
    `edgelb manifests` grants with gateway_api on (discovery is every client's)."""
    import yaml
    from test_k8s_e2e import _used

    from edgelb.ops.cli import build_parser
    from edgelb.ops.manifests import options_from_args, render

    fake = cluster.fake
    base(fake)
    await cluster.pod("web")
    fake.put(http_route("r", [parent("gw")], [rule([backend("web")])],
                        hostnames=["r.example.com"]))
    await fake.wait_for(lambda: bool(cluster.status("HTTPRoute", "r").get("parents")),
                        what="the route's status")
    config = tmp_path / "m.yaml"
    config.write_text("admin: {listen: 0.0.0.0:9090}\n"
                      "entrypoints: {http: {listen: 0.0.0.0:8080}}\n"
                      "watchers: {kubernetes: {gateway_api: true}}\n")
    text = render(options_from_args(build_parser().parse_args(
        ["manifests", "--config", str(config)]))).text
    granted = {(g, res, v) for doc in yaml.safe_load_all(text)
               if doc and doc["kind"] in ("ClusterRole", "Role")
               for rule_ in doc["rules"] for g in rule_["apiGroups"]
               for res in rule_["resources"] for v in rule_["verbs"]}
    discovery = "/apis/gateway.networking.k8s.io/v1"
    fake.requests = [r for r in fake.requests if r.path.rstrip("/") != discovery]
    used = _used(fake)
    assert ("gateway.networking.k8s.io", "httproutes/status", "patch") in used
    assert ("gateway.networking.k8s.io", "gateways", "watch") in used
    missing = used - granted
    assert not missing, f"requests the RBAC of `edgelb manifests` does not allow: {missing}"
