"""A Marathon translation applied through the real runtime: HAPROXY_n_SSL_CERT served by SNI on
a TLS entrypoint, HAPROXY_n_AUTH enforced, and a certificate file that is missing or bad
reported for its app alone while the rest of the snapshot serves."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import tlskit
from httpkit import HOST, Client, HttpBackend, free_port, ok

from edgelb.control.runtime import EntrypointSpec, Runtime
from edgelb.net.acl import sha_crypt
from edgelb.ops.config import policy_from_annotations
from watchers.marathon.translate import Options, Translation, notice_problems, translate
from watchers.model import Address

HASH = sha_crypt("s3cret", "$5$rounds=1000$saltsalt")


def web_app(app_id: str, backend: HttpBackend, service_port: int, **labels: str) -> dict:
    return {"id": app_id, "cpus": 1, "portDefinitions": [{"port": service_port}],
            "labels": {"HAPROXY_GROUP": "external", **labels},
            "tasks": [{"id": f"{app_id}.1", "host": HOST, "ports": [backend.port],
                       "state": "TASK_RUNNING"}]}


def tr(*apps: dict) -> Translation:
    return translate(list(apps), Options(), read_policy=policy_from_annotations)


async def get(port: int, host: str, auth: str | None = None) -> int:
    headers = []
    if auth is not None:
        headers.append(("Authorization", "Basic " + base64.b64encode(auth.encode()).decode()))
    client = await Client.open(port)
    try:
        return (await client.request("GET", "/", headers=headers, host=host)).status
    finally:
        client.close()


async def served_serial(port: int, name: str) -> int:
    """The serial of the certificate a TLS handshake with SNI `name` is given (verified
    against the test CA for that name)."""
    _, writer = await asyncio.wait_for(asyncio.open_connection(
        HOST, port, ssl=tlskit.client_context(), server_hostname=name), 5)
    try:
        serial, names = tlskit.peer(writer.get_extra_info("ssl_object"))
        assert name in names
        return serial
    finally:
        writer.close()


async def test_ssl_cert_is_served_by_sni_and_auth_is_enforced(backend, tmp_path: Path) -> None:
    shop = await backend("shop", ok(b"shop"))
    blog = await backend("blog", ok(b"blog"))
    cert, key = tlskit.ca().issue(["shop.example"], serial=4242)
    pem = tmp_path / "shop.pem"
    pem.write_bytes(cert + key)  # marathon-lb's crt: certificate and key in one file
    t = tr(web_app("/shop", shop, free_port(), HAPROXY_0_VHOST="shop.example",
                   HAPROXY_0_SSL_CERT=str(pem), HAPROXY_0_AUTH=f"shop:alice:{HASH}"),
           web_app("/blog", blog, free_port(), HAPROXY_0_VHOST="blog.example"))
    assert t.problems == ()
    runtime = Runtime(loop=asyncio.get_running_loop())
    https, http = free_port(), free_port()
    await runtime.set_entrypoints(
        [EntrypointSpec("https", Address(HOST, https), ("", "")),
         EntrypointSpec("http", Address(HOST, http))], runtime.defaults)
    try:
        assert await runtime.apply(t.snapshot) == ()
        assert await served_serial(https, "shop.example") == 4242
        assert await get(http, "shop.example") == 401
        assert await get(http, "shop.example", "alice:wrong") == 401
        assert await get(http, "shop.example", "alice:s3cret") == 200
        assert await get(http, "blog.example") == 200  # no auth there
        # a rewritten file is read on the next apply (the watcher re-translates on events)
        renewed, renewed_key = tlskit.ca().issue(["shop.example"], serial=4343)
        pem.write_bytes(renewed + renewed_key)
        assert await runtime.apply(t.snapshot) == ()
        assert await served_serial(https, "shop.example") == 4343
    finally:
        await runtime.shutdown(0.1)


async def test_a_missing_or_bad_certificate_file_is_a_problem_of_its_app_only(
        backend, tmp_path: Path) -> None:
    shop = await backend("shop", ok(b"shop"))
    blog = await backend("blog", ok(b"blog"))
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"not a certificate")
    t = tr(web_app("/shop", shop, free_port(), HAPROXY_0_VHOST="shop.example",
                   HAPROXY_0_SSL_CERT=str(tmp_path / "missing.pem")),
           web_app("/blog", blog, free_port(), HAPROXY_0_VHOST="blog.example",
                   HAPROXY_0_SSL_CERT=str(bad)),
           web_app("/fifo", blog, free_port(), HAPROXY_0_VHOST="fifo.example",
                   HAPROXY_0_SSL_CERT="/dev/zero"))
    runtime = Runtime(loop=asyncio.get_running_loop())
    http = free_port()
    await runtime.set_entrypoints(
        [EntrypointSpec("https", Address(HOST, free_port()), ("", "")),
         EntrypointSpec("http", Address(HOST, http))], runtime.defaults)
    try:
        notices = await asyncio.wait_for(runtime.apply(t.snapshot), 5)  # applied, not rejected
        problems = {p.app: p.message for p in notice_problems(t, notices)}
        assert set(problems) == {"/shop", "/blog", "/fifo"}
        assert "cannot read the certificate file" in problems["/shop"]
        assert "is not PEM" in problems["/blog"]
        assert "not a regular file" in problems["/fifo"]
        assert await get(http, "shop.example") == 200  # the apps themselves serve
        assert await get(http, "blog.example") == 200
        assert set(runtime.services) == {s.name for s in t.snapshot.services}
    finally:
        await runtime.shutdown(0.1)
