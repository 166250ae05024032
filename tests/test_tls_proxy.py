"""TLS termination through the whole process: an https entrypoint with certificate files, and
certificates from Kubernetes Secrets named by Ingress `tls`, selected by SNI and rotated in
place under a stream of handshakes."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
import tlskit
from httpkit import HOST, HttpBackend, eventually, free_port, within
from k8s_fake import FakeKubeAPI
from test_k8s_e2e import endpoint_slice, ingress, ingress_class, service

from edgelb.ops.app import App

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]


async def https_get(port: int, host: str, path: str = "/", ctx: ssl.SSLContext | None = None
                    ) -> tuple[int, bytes, int]:
    """(status, body, serial of the certificate served) for one request over TLS with SNI, on
    a new connection (`ctx`: the client's TLS settings, by default tlskit's)."""
    reader, writer = await asyncio.open_connection(
        HOST, port, ssl=ctx or tlskit.client_context(), server_hostname=host)
    try:
        ssl_obj = writer.get_extra_info("ssl_object")
        serial = int(ssl_obj.getpeercert()["serialNumber"], 16)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
        while chunk := await reader.read(65536):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body, serial
    finally:
        writer.close()


async def test_an_https_entrypoint_with_certificate_files(tmp_path: Path) -> None:
    backend = await HttpBackend("web").start()
    cert, key = tlskit.ca().issue(["shop.example.com", "*.example.org"], serial=1001)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    https = free_port()
    path = tmp_path / "edgelb.yaml"
    path.write_text(
        f"admin: {{listen: {HOST}:{free_port()}}}\n"
        f"entrypoints: {{https: {{listen: {HOST}:{https}, tls: {{cert: {tmp_path}/tls.crt, "
        f"key: {tmp_path}/tls.key}}}}}}\n"
        "services:\n"
        "  - name: web\n"
        "    hosts: [shop.example.com, a.example.org]\n"
        f"    backends: [{{address: {HOST}:{backend.port}}}]\n"
    )
    app = App(path)
    await within(app.start(), 10)
    try:
        status, body, serial = await within(https_get(https, "shop.example.com", "/x"))
        assert (status, body, serial) == (200, b"web GET /x", 1001)
        assert backend.requests[-1].get("x-forwarded-proto") == "https"
        assert (await within(https_get(https, "a.example.org")))[0] == 200  # wildcard SAN
        with pytest.raises(ssl.SSLCertVerificationError):  # the certificate does not cover it
            await within(https_get(https, "b.a.example.org"))
    finally:
        await app.stop()
        await backend.stop()


def tls_ingress(host: str, svc: str, secret: str) -> dict[str, Any]:
    obj = ingress(host, svc)
    obj["spec"]["tls"] = [{"hosts": [host], "secretName": secret}]
    return obj


def k8s_https_config(tmp_path: Path, fake: FakeKubeAPI, https: int) -> Path:
    """A config file: an https entrypoint with the watchers' certificates only, and the
    Kubernetes watcher on `fake`."""
    path = tmp_path / "edgelb.yaml"
    path.write_text(
        f"admin: {{listen: {HOST}:{free_port()}}}\n"
        f"entrypoints: {{https: {{listen: {HOST}:{https}, tls: {{}}}}}}\n"
        f"watchers: {{kubernetes: {{kubeconfig: {fake.kubeconfig(tmp_path / 'kc')}}}}}\n"
    )
    return path


async def test_ingress_tls_from_secrets_by_sni_rotated_without_a_failed_handshake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    fake = FakeKubeAPI(bookmark_interval=0.2)
    await fake.start()
    shop = await HttpBackend("shop").start()
    blog = await HttpBackend("blog").start()
    https = free_port()
    path = k8s_https_config(tmp_path, fake, https)
    ca = tlskit.ca()
    fake.put(ingress_class())
    for name, backend in (("shop", shop), ("blog", blog)):
        cert, key = ca.issue([f"{name}.example.com"], serial=2000 + len(name))
        fake.put(tlskit.secret("shop", f"{name}-tls", cert, key))
        fake.put(service(name))
        fake.put(endpoint_slice(name, f"{name}-1", backend))
        obj = tls_ingress(f"{name}.example.com", name, f"{name}-tls")
        obj["metadata"]["name"] = name
        fake.put(obj)
    app = App(path)
    await within(app.start(), 10)
    try:
        runtime = app.runtime
        assert runtime is not None
        await eventually(lambda: len(runtime.tls_stores["https"].certificates()) == 2,
                         timeout=10, what="both certificates")
        s1, b1, serial1 = await within(https_get(https, "shop.example.com"))
        s2, b2, serial2 = await within(https_get(https, "blog.example.com"))
        assert (s1, b1, serial1) == (200, b"shop GET /", 2004)
        assert (s2, b2, serial2) == (200, b"blog GET /", 2004)
        # rotation: a new certificate in the Secret while handshakes go on
        failures: list[str] = []
        serials: list[int] = []
        stop = asyncio.Event()

        async def handshakes() -> None:
            while not stop.is_set():
                try:
                    status, _, serial = await within(https_get(https, "shop.example.com"))
                    assert status == 200
                    serials.append(serial)
                except Exception as e:
                    failures.append(repr(e))

        tasks = [asyncio.create_task(handshakes()) for _ in range(3)]
        await eventually(lambda: len(serials) >= 10, timeout=10, what="handshakes before")
        cert, key = ca.issue(["shop.example.com"], serial=3001)
        fake.put(tlskit.secret("shop", "shop-tls", cert, key))
        await eventually(lambda: 3001 in serials[-3:], timeout=10, what="the new certificate")
        count = len(serials)
        await eventually(lambda: len(serials) >= count + 10, timeout=10, what="handshakes after")
        stop.set()
        await within(asyncio.gather(*tasks), 10)
        assert failures == []
        assert serials[-1] == 3001 and 2004 in serials
        # a broken Secret keeps the last good certificate and is reported
        bad = tlskit.secret("shop", "shop-tls", b"not a pem", key)
        fake.put(bad)
        await eventually(lambda: any("shop-tls" in str(p) for p in
                                     (app.kubernetes.translation.problems if app.kubernetes
                                      and app.kubernetes.translation else [])) or
                         runtime.watcher_problems.get("kubernetes", 0) > 0,
                         timeout=10, what="the bad Secret reported")
        assert (await within(https_get(https, "shop.example.com")))[2] == 3001
    finally:
        await app.stop()
        await fake.stop()
        await shop.stop()
        await blog.stop()


async def test_tls_on_a_static_port(tmp_path: Path) -> None:
    backend = await HttpBackend("db-ui").start()
    cert, key = tlskit.ca().issue(["admin.example.com"], serial=4242)
    (tmp_path / "s.crt").write_bytes(cert)
    (tmp_path / "s.key").write_bytes(key)
    port = free_port()
    path = tmp_path / "edgelb.yaml"
    path.write_text(
        f"admin: {{listen: {HOST}:{free_port()}}}\n"
        "services:\n"
        f"  - {{name: ui, listen: {HOST}:{port}, tls: {{cert: {tmp_path}/s.crt, "
        f"key: {tmp_path}/s.key}}, backends: [{{address: {HOST}:{backend.port}}}]}}\n"
    )
    app = App(path)
    await within(app.start(), 10)
    try:
        status, body, serial = await within(https_get(port, "admin.example.com", "/q"))
        assert (status, body, serial) == (200, b"db-ui GET /q", 4242)
        assert backend.requests[-1].get("x-forwarded-proto") == "https"
    finally:
        await app.stop()
        await backend.stop()


async def test_a_rejected_cluster_snapshot_does_not_swap_its_certificates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Secret rotated in the same change as a static port that cannot be bound: the runtime
    rejects the snapshot, and the rotated certificate is not served either (one snapshot, one
    outcome); once the port is free the whole change lands."""
    import socket

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    fake = FakeKubeAPI(bookmark_interval=0.2)
    await fake.start()
    shop = await HttpBackend("shop").start()
    https = free_port()
    path = k8s_https_config(tmp_path, fake, https)
    ca = tlskit.ca()
    fake.put(ingress_class())
    cert, key = ca.issue(["shop.example.com"], serial=5001)
    fake.put(tlskit.secret("shop", "shop-tls", cert, key))
    fake.put(service("shop"))
    fake.put(endpoint_slice("shop", "shop-1", shop))
    fake.put(tls_ingress("shop.example.com", "shop", "shop-tls"))
    held = socket.socket()
    held.bind((HOST, 0))
    held.listen()
    busy = held.getsockname()[1]
    app = App(path)
    await within(app.start(), 10)
    try:
        runtime = app.runtime
        assert runtime is not None
        await eventually(lambda: len(runtime.tls_stores["https"].certificates()) == 1,
                         timeout=10, what="the certificate")
        assert (await within(https_get(https, "shop.example.com")))[2] == 5001
        cert, key = ca.issue(["shop.example.com"], serial=5002)
        fake.put(tlskit.secret("shop", "shop-tls", cert, key))
        fake.put(service("static", {"edgelb.io/port": str(busy)}))
        fake.put(endpoint_slice("static", "static-1", shop))
        await eventually(lambda: "kubernetes" in runtime.last_errors, timeout=10,
                         what="the snapshot rejected")
        assert str(busy) in runtime.last_errors["kubernetes"]
        assert (await within(https_get(https, "shop.example.com")))[2] == 5001
        held.close()  # the port is free: a resync applies the whole change
        fake.put(service("static", {"edgelb.io/port": str(busy), "edgelb.io/balance":
                                    "round-robin"}))
        await eventually(lambda: "kubernetes" not in runtime.last_errors, timeout=10,
                         what="the change applied")
        assert (await within(https_get(https, "shop.example.com")))[2] == 5002
    finally:
        held.close()
        await app.stop()
        await fake.stop()
        await shop.stop()
