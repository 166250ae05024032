"""The top-level `tls:` block: session tickets and the minimum TLS version, on every server
context edgelb makes, changed in place on reload. Real handshakes on 127.0.0.1; the client is
the blocking `ssl` module in a thread, the one Python client that can offer a saved session."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tlskit
from httpkit import HOST, HttpBackend, eventually, free_port, within

from edgelb.net import tls
from edgelb.ops.app import App
from edgelb.ops.config import ConfigError, parse_config

pytestmark = [pytest.mark.timeout(30)]

NAME = "shop.example.com"
TLS12 = ssl.TLSVersion.TLSv1_2


@pytest.fixture(autouse=True)
def _default_options() -> Iterator[None]:
    """The options are process-wide: every test starts and ends with the defaults."""
    tls.configure(tls.Options())
    yield
    tls.configure(tls.Options())


@dataclass
class Handshake:
    reused: bool
    version: str | None
    session: ssl.SSLSession | None
    body: bytes


@functools.cache
def client(max_version: ssl.TLSVersion | None) -> ssl.SSLContext:
    """One client context per version cap: a session can only be offered by its own context."""
    ctx = tlskit.client_context()
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def _handshake(port: int, session: ssl.SSLSession | None, max_version: ssl.TLSVersion | None
               ) -> Handshake:
    ctx = client(max_version)
    with socket.create_connection((HOST, port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=NAME, session=session) as conn:
        conn.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):  # to the end: TLS 1.3 tickets come after the handshake
            data += chunk
        return Handshake(conn.session_reused, conn.version(), conn.session, data)


async def handshake(port: int, session: ssl.SSLSession | None = None,
                    max_version: ssl.TLSVersion | None = None) -> Handshake:
    """One request on a new TLS connection, offering `session` when given."""
    return await within(asyncio.to_thread(_handshake, port, session, max_version))


async def resumes(port: int, max_version: ssl.TLSVersion | None = None) -> bool:
    """Whether a second connection offering the first one's session resumes it."""
    first = await handshake(port, max_version=max_version)
    assert first.body.endswith(b"ok") or b" 200 " in first.body.split(b"\r\n", 1)[0]
    assert not first.reused
    second = await handshake(port, first.session, max_version)
    return second.reused


# ---------------------------------------------------------------------------------------------
# The config block


def test_defaults_and_values() -> None:
    assert parse_config("services: []\n").tls == tls.Options(True, "1.2")
    cfg = parse_config("services: []\ntls: {session_tickets: false, min_version: \"1.3\"}\n")
    assert cfg.tls == tls.Options(session_tickets=False, min_version="1.3")
    # an unquoted 1.2 is a YAML number; it means the same
    assert parse_config("services: []\ntls: {min_version: 1.3}\n").tls.min_version == "1.3"
    assert parse_config("services: []\ntls:\n").tls == tls.Options()


@pytest.mark.parametrize(("block", "path", "words"), [
    ("{session_ticket: false}", "tls.session_ticket", "did you mean 'session_tickets'?"),
    ("{min_versoin: 1.3}", "tls.min_versoin", "did you mean 'min_version'?"),
    ("{session_tickets: maybe}", "tls.session_tickets", "expected true or false"),
    ("{min_version: \"1.1\"}", "tls.min_version", 'expected "1.2" or "1.3"'),
    ("{min_version: [1.3]}", "tls.min_version", 'expected "1.2" or "1.3"'),
    ("[session_tickets]", "tls", "expected a mapping"),
])
def test_bad_values_name_their_key(block: str, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"services: []\ntls: {block}\n")
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith(f"{path}: ")
    assert words in info.value.errors[0]


def test_configure_refuses_an_unknown_version_and_changes_nothing() -> None:
    ctx = tls.new_server_context()
    with pytest.raises(ValueError, match=r"'1\.1'"):
        tls.configure(tls.Options(min_version="1.1"))
    assert tls.current_options() == tls.Options()
    assert ctx.minimum_version == TLS12


# ---------------------------------------------------------------------------------------------
# Handshakes against a certificate store (no proxy): what the options do


@pytest.fixture
async def store_port() -> tuple[tls.CertificateStore, int]:
    cert_pem, key_pem = tlskit.ca().issue([NAME])
    cert = tls.load_pem(cert_pem, key_pem, "test")
    store = tls.CertificateStore()
    store.set([cert], cert)
    server, port = await tlskit.serve(store.server_context())
    yield store, port
    server.close()


async def test_tickets_on_resume_and_off_do_not_tls13(store_port) -> None:
    store, port = store_port
    assert await resumes(port)  # the default: tickets on
    assert (await handshake(port)).version == "TLSv1.3"
    tls.configure(tls.Options(session_tickets=False))  # the same live context, changed in place
    ctx = store.server_context()
    assert ctx.num_tickets == 0 and ctx.options & ssl.OP_NO_TICKET
    assert not await resumes(port)
    first = await handshake(port)
    assert first.session is not None and not first.session.has_ticket
    tls.configure(tls.Options(session_tickets=True))
    assert await resumes(port)


async def test_tls12_session_ids_still_resume_without_tickets(store_port) -> None:
    """What README says: `session_tickets: false` stops tickets; a TLS 1.2 client can still
    resume by session ID from OpenSSL's internal cache (Python offers no switch for it), so
    only `min_version: "1.3"` with tickets off means no resumption at all."""
    _, port = store_port
    first = await handshake(port, max_version=TLS12)
    assert first.version == "TLSv1.2" and first.session is not None
    assert first.session.has_ticket  # tickets on: TLS 1.2 resumes with a ticket
    assert (await handshake(port, first.session, TLS12)).reused
    tls.configure(tls.Options(session_tickets=False))
    first = await handshake(port, max_version=TLS12)
    assert first.session is not None and not first.session.has_ticket
    assert (await handshake(port, first.session, TLS12)).reused  # by session ID


async def test_min_version_13_refuses_a_tls12_only_client(store_port) -> None:
    _, port = store_port
    assert (await handshake(port, max_version=TLS12)).version == "TLSv1.2"
    tls.configure(tls.Options(min_version="1.3"))
    with pytest.raises(ssl.SSLError):
        await handshake(port, max_version=TLS12)
    assert (await handshake(port)).version == "TLSv1.3"


async def test_contexts_made_later_carry_the_options() -> None:
    tls.configure(tls.Options(session_tickets=False, min_version="1.3"))
    cert_pem, key_pem = tlskit.ca().issue([NAME])
    cert = tls.load_pem(cert_pem, key_pem, "test")
    store = tls.CertificateStore()
    for ctx in (store.server_context(), cert.context):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.num_tickets == 0 and ctx.options & ssl.OP_NO_TICKET
        assert ctx.options & ssl.OP_NO_COMPRESSION  # the hardening stays


# ---------------------------------------------------------------------------------------------
# Through the whole process: an https entrypoint and a TLS static port, reloaded


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Setup:
    def __init__(self, tmp: Path, backend: HttpBackend) -> None:
        cert, key = tlskit.ca().issue([NAME])
        (tmp / "tls.crt").write_bytes(cert)
        (tmp / "tls.key").write_bytes(key)
        self.tmp = tmp
        self.path = tmp / "edgelb.yaml"
        self.admin, self.https, self.static = free_port(), free_port(), free_port()
        self.backend = backend

    def write(self, tls_block: str) -> None:
        pair = f"{{cert: {self.tmp}/tls.crt, key: {self.tmp}/tls.key}}"
        write(self.path, "\n".join([
            f"admin: {{listen: {HOST}:{self.admin}}}",
            "shutdown: {grace: 1s}",
            f"entrypoints: {{https: {{listen: {HOST}:{self.https}, tls: {pair}}}}}",
            "services:",
            f"  - {{name: web, hosts: [{NAME}],"
            f" backends: [{{address: {HOST}:{self.backend.port}}}]}}",
            f"  - {{name: ui, listen: {HOST}:{self.static}, tls: {pair},"
            f" backends: [{{address: {HOST}:{self.backend.port}}}]}}",
            tls_block,
        ]) + "\n")


@pytest.mark.uvloop
async def test_reload_flips_the_options_and_a_bad_value_keeps_the_last_good(
    tmp_path: Path, backend
) -> None:
    setup = Setup(tmp_path, await backend("web"))
    setup.write("tls: {session_tickets: true}")
    app = App(setup.path)
    await within(app.start(), 10)
    runtime = app.runtime
    assert runtime is not None
    try:
        for port in (setup.https, setup.static):
            assert await resumes(port)
            assert b"web GET /" in (await handshake(port)).body
        before = await handshake(setup.https)  # a session to offer after the reload

        app.applied.clear()
        setup.write('tls: {session_tickets: false, min_version: "1.3"}')
        app.reload()
        await within(app.applied.wait())
        for port in (setup.https, setup.static):
            assert not await resumes(port)
            with pytest.raises(ssl.SSLError):
                await handshake(port, max_version=TLS12)
        # a ticket issued before the change is not honoured either
        assert not (await handshake(setup.https, before.session)).reused

        generation = app.generation
        setup.write("tls: {session_tickets: sometimes}")
        app.reload()
        await eventually(lambda: "file" in runtime.last_errors, what="the rejection")
        error = runtime.last_errors["file"]
        assert "tls.session_tickets" in error and "expected true or false" in error
        assert app.generation == generation
        assert tls.current_options() == tls.Options(False, "1.3")  # the last good one
        assert not await resumes(setup.https)

        app.applied.clear()
        setup.write("")  # the block removed: back to the defaults
        app.reload()
        await within(app.applied.wait())
        assert "file" not in runtime.last_errors
        assert await resumes(setup.https)
        assert (await handshake(setup.static, max_version=TLS12)).version == "TLSv1.2"
    finally:
        await within(app.stop(), 10)
