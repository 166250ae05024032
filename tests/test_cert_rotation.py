"""Certificate rotation through the whole process (App, real sockets), and "a rejected config
changes nothing".

The certificate and key files the config names are watched like the config itself: an atomic
rename, kubelet's `..data` symlink swap, an in-place write and SIGHUP each bring the new pair
to the next handshake, under a stream of HTTPS requests that must not see a single failure; a
bad pair keeps the old one serving and is reported; every loaded certificate's expiry is
exported as `edgelb_tls_certificate_expiry_timestamp_seconds`."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import tlskit
from httpkit import HOST, HttpBackend, eventually, fetch, free_port, service, snapshot, within
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_tls_proxy import https_get as tls_get

from edgelb.control.runtime import Runtime, SnapshotError
from edgelb.net import backend_tls, tls
from edgelb.net.backend_tls import BackendTLS, client_context
from edgelb.ops.app import App
from edgelb.ops.metrics import make_registry
from watchers.model import Address, Certificates, PemPair, Snapshot

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

NAME = "shop.example.com"
EXPIRY = "edgelb_tls_certificate_expiry_timestamp_seconds"
ROTATION_DEADLINE = 2.0  # seconds from a rotation to new handshakes seeing the new certificate


@pytest.fixture(autouse=True)
def _default_tls_options() -> Iterator[None]:
    """The `tls:` options are process-wide: every test starts and ends with the defaults."""
    tls.configure(tls.Options())
    yield
    tls.configure(tls.Options())


def pair(serial: int, key: int = 1, days: int = 30) -> tuple[bytes, bytes]:
    """A certificate for NAME (and its key) with this serial, valid for `days` from now (to
    the second)."""
    not_after = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=days)
    return tlskit.ca().issue([NAME], serial=serial, leaf_key=tlskit.key(key), not_after=not_after)


def replace(path: Path, data: bytes) -> None:
    """Write `data` elsewhere, then rename it over `path` (atomic)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def kubelet_swap(directory: Path, stamp: str, files: dict[str, bytes]) -> None:
    """Update `directory` as kubelet updates a mounted Secret: the files in a new timestamped
    directory, the `..data` link swapped to it atomically (`name -> ..data/name` links stay),
    then the old directory removed."""
    fresh = directory / f"..{stamp}"
    fresh.mkdir()
    for name, data in files.items():
        (fresh / name).write_bytes(data)
    data_link = directory / "..data"
    old = os.readlink(data_link) if data_link.is_symlink() else None
    os.symlink(fresh.name, directory / "..data_tmp")
    os.replace(directory / "..data_tmp", data_link)
    for name in files:
        if not (directory / name).is_symlink():
            os.symlink(f"..data/{name}", directory / name)
    if old is not None:
        shutil.rmtree(directory / old)


async def https_get(port: int, max_version: ssl.TLSVersion | None = None
                    ) -> tuple[int, bytes, int]:
    """(status, body, serial of the certificate served) of one request on a new connection."""
    ctx = tlskit.client_context()
    if max_version is not None:
        ctx.maximum_version = max_version
    return await tls_get(port, NAME, ctx=ctx)


async def serial_of(port: int) -> int:
    status, _, serial = await within(https_get(port))
    assert status == 200
    return serial


@dataclass
class Hit:
    port: int
    started: float  # loop time the connection was opened
    done: float  # loop time the response was complete
    serial: int


class Load:
    """Clients making HTTPS requests back to back, each on a new connection (so each is a new
    handshake): the certificate every one was served, and every failure."""

    def __init__(self, ports: list[int], per_port: int = 2) -> None:
        self.ports = ports
        self.per_port = per_port
        self.hits: list[Hit] = []
        self.failures: list[str] = []
        self._running = True
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._client(port))
                       for port in self.ports for _ in range(self.per_port)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._running = False
        await within(asyncio.gather(*self._tasks))

    async def _client(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        while self._running:
            started = loop.time()
            try:
                status, body, serial = await asyncio.wait_for(https_get(port), 5)
            except Exception as e:  # every failure is the test's business
                self.failures.append(f"port {port}: {e!r}")
                continue
            if status != 200 or not body.startswith(b"web GET /"):
                self.failures.append(f"port {port}: {status} {body[:60]!r}")
                continue
            self.hits.append(Hit(port, started, loop.time(), serial))

    def served(self, serial: int) -> bool:
        """Whether every port has served `serial` at least once."""
        return all(any(h.port == p and h.serial == serial for h in self.hits)
                   for p in self.ports)

    async def switch(self, serial: int, since: float) -> None:
        """Wait (up to ROTATION_DEADLINE after `since`) until every port serves `serial`, then
        check that every handshake begun after that was served it."""
        loop = asyncio.get_running_loop()
        await eventually(lambda: self.served(serial),
                         timeout=max(0.0, since + ROTATION_DEADLINE - loop.time()),
                         what=f"serial {serial} on every port within {ROTATION_DEADLINE}s")
        switched = {p: min(h.done for h in self.hits if h.port == p and h.serial == serial)
                    for p in self.ports}
        count = len(self.hits)
        await eventually(lambda: len(self.hits) >= count + 4 * len(self.ports),
                         what="more requests after the switch")
        late = [h for h in self.hits if h.started > switched[h.port] and h.serial != serial]
        assert not late, f"new handshakes after the switch got the old certificate: {late}"


class Setup:
    """A config with an https entrypoint and a TLS static port sharing one certificate pair
    (`cert`, `key`), the backend `web`, and the admin endpoint."""

    def __init__(self, tmp: Path, backend: HttpBackend) -> None:
        self.tmp = tmp
        self.path = tmp / "edgelb.yaml"
        self.admin, self.https, self.static = free_port(), free_port(), free_port()
        self.backend = backend
        self.cert, self.key = tmp / "tls.crt", tmp / "tls.key"

    def write(self, top: str = "", services: str = "", entrypoint: str = "https",
              grace: str = "1s") -> None:
        """The config file (atomically): `top` adds top-level sections, `services` entries."""
        files = f"{{cert: {self.cert}, key: {self.key}}}"
        replace(self.path, "\n".join([
            f"admin: {{listen: {HOST}:{self.admin}}}",
            f"shutdown: {{grace: {grace}}}",
            top,
            f"entrypoints: {{{entrypoint}: {{listen: {HOST}:{self.https}, tls: {files}}}}}",
            "services:",
            f"  - {{name: web, hosts: [{NAME}],"
            f" backends: [{{address: {HOST}:{self.backend.port}}}]}}",
            f"  - {{name: ui, listen: {HOST}:{self.static}, tls: {files},"
            f" backends: [{{address: {HOST}:{self.backend.port}}}]}}",
            services,
        ]).encode())

    def put(self, cert: bytes, key: bytes) -> None:
        self.cert.write_bytes(cert)
        self.key.write_bytes(key)

    @property
    def ports(self) -> list[int]:
        return [self.https, self.static]


@asynccontextmanager
async def running_app(setup: Setup) -> AsyncIterator[App]:
    app = App(setup.path)
    await within(app.start(), 10)
    try:
        yield app
    finally:
        await within(app.stop(), 10)


async def metrics(admin: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The admin endpoint's /metrics, parsed by prometheus_client: name -> labels -> value."""
    response = await within(fetch(admin, target="/metrics"))
    assert response.status == 200
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def status_json(admin: int) -> dict:
    response = await within(fetch(admin, target="/status.json"))
    assert response.status == 200
    return json.loads(response.body)


def file_error(app: App) -> str | None:
    assert app.runtime is not None
    return app.runtime.last_errors.get("file")


# ---------------------------------------------------------------------------------------------
# Rotation under load


@pytest.mark.parametrize("how", ["rename", "kubelet"])
async def test_rotation_under_load_reaches_new_handshakes_within_2s_and_fails_nothing(
    tmp_path: Path, backend, how: str
) -> None:
    setup = Setup(tmp_path, await backend("web"))
    cert1, key1 = pair(1001, key=1)
    cert2, key2 = pair(1002, key=2)  # a new key too, as a renewal usually brings
    if how == "kubelet":
        secret = tmp_path / "secret"
        secret.mkdir()
        kubelet_swap(secret, "2026_12_07_01_00_00.1", {"tls.crt": cert1, "tls.key": key1})
        setup.cert, setup.key = secret / "tls.crt", secret / "tls.key"
    else:
        setup.put(cert1, key1)
    setup.write()
    async with running_app(setup) as app, Load(setup.ports) as load:
        await eventually(lambda: load.served(1001), what="the first certificate served")
        assert app.runtime is not None
        listeners = dict(app.runtime.listeners)
        loop = asyncio.get_running_loop()
        since = loop.time()
        if how == "kubelet":
            kubelet_swap(secret, "2026_12_07_02_00_00.2", {"tls.crt": cert2, "tls.key": key2})
        else:
            replace(setup.key, key2)
            replace(setup.cert, cert2)
        await load.switch(1002, since)
        assert app.runtime.listeners == listeners  # nothing was rebound
        assert file_error(app) is None
    assert not load.failures, load.failures[:5]
    assert len(load.hits) >= 20


async def test_an_in_place_write_is_applied(tmp_path: Path, backend) -> None:
    setup = Setup(tmp_path, await backend("web"))
    setup.put(*pair(1001))
    setup.write()
    async with running_app(setup):
        assert await serial_of(setup.https) == 1001
        with open(setup.cert, "r+b") as f:  # same inode, rewritten (the key stays the same)
            f.truncate(0)
            f.write(pair(1002)[0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ROTATION_DEADLINE
        while await serial_of(setup.https) != 1002:
            assert loop.time() < deadline, "the rewritten certificate was not served in time"
        assert await serial_of(setup.static) == 1002


async def test_sighup_rereads_the_certificate_files(tmp_path: Path, backend) -> None:
    setup = Setup(tmp_path, await backend("web"))
    setup.put(*pair(1001))
    setup.write()
    async with running_app(setup) as app:
        watcher = app.watcher
        assert watcher is not None
        watcher.interval = 3600  # no more polling: only reload() reads the files now
        polls = watcher.polls
        await eventually(lambda: watcher.polls > polls, what="the poll in progress to end")
        replace(setup.cert, pair(1002)[0])
        generation = app.generation
        app.applied.clear()
        app.reload()  # what SIGHUP does
        await within(app.applied.wait())
        assert app.generation == generation + 1
        assert await serial_of(setup.https) == 1002
        assert await serial_of(setup.static) == 1002


# ---------------------------------------------------------------------------------------------
# A bad pair


async def test_a_bad_pair_keeps_the_old_one_and_is_reported_until_a_good_one_arrives(
    tmp_path: Path, backend
) -> None:
    setup = Setup(tmp_path, await backend("web"))
    setup.put(*pair(1001))
    setup.write()
    async with running_app(setup) as app:
        runtime = app.runtime
        assert runtime is not None
        first = await metrics(setup.admin)
        assert first["edgelb_config_last_reload_successful"] == {(("watcher", "file"),): 1.0}
        applied_at = first["edgelb_config_last_reload_success_timestamp_seconds"][
            (("watcher", "file"),)]
        assert abs(applied_at - time.time()) < 60

        # a certificate that is not PEM
        replace(setup.cert, b"this is not a certificate\n")
        await eventually(lambda: file_error(app) is not None, what="the report")
        error = file_error(app)
        assert str(setup.cert) in error and "not PEM" in error, error
        assert await serial_of(setup.https) == 1001  # the old one serves on
        assert await serial_of(setup.static) == 1001
        m = await metrics(setup.admin)
        assert m["edgelb_config_last_reload_successful"][(("watcher", "file"),)] == 0.0
        # a rejected reload does not move the time of the last success
        assert m["edgelb_config_last_reload_success_timestamp_seconds"][
            (("watcher", "file"),)] == applied_at
        assert m["edgelb_config_reloads_total"][(("result", "error"), ("watcher", "file"))] >= 1
        watchers = {w["name"]: w for w in (await status_json(setup.admin))["watchers"]}
        assert str(setup.cert) in watchers["file"]["last_error"]

        # a certificate with another key than the key file's
        replace(setup.cert, pair(1002, key=2)[0])
        await eventually(lambda: "does not match" in (file_error(app) or ""),
                         what="the mismatch report")
        assert str(setup.key) in file_error(app)
        assert await serial_of(setup.https) == 1001

        # a half-written file (an in-place write that stalls) is reported, then picked up
        errors = runtime.reloads[("file", "error")]
        good = pair(1003)[0]
        with open(setup.cert, "wb") as f:
            f.write(good[: len(good) // 2])
            f.flush()
            await eventually(lambda: runtime.reloads[("file", "error")] > errors,
                             what="the half-written file reported")
            assert await serial_of(setup.https) == 1001
            f.write(good[len(good) // 2:])
        await eventually(lambda: file_error(app) is None, timeout=ROTATION_DEADLINE,
                         what="the completed file applied")
        assert await serial_of(setup.https) == 1003
        assert await serial_of(setup.static) == 1003
        m = await metrics(setup.admin)
        assert m["edgelb_config_last_reload_successful"][(("watcher", "file"),)] == 1.0


async def test_a_file_put_back_as_it_was_clears_the_report(tmp_path: Path, backend) -> None:
    setup = Setup(tmp_path, await backend("web"))
    cert, key = pair(1001)
    setup.put(cert, key)
    setup.write()
    async with running_app(setup) as app:
        generation = app.generation
        replace(setup.cert, b"garbage")
        await eventually(lambda: file_error(app) is not None, what="the report")
        replace(setup.cert, cert)  # what is serving: nothing to apply, nothing wrong
        await eventually(lambda: file_error(app) is None, what="the report cleared")
        assert app.generation == generation
        assert await serial_of(setup.https) == 1001


# ---------------------------------------------------------------------------------------------
# A rejected config changes nothing


async def test_a_rejected_config_changes_no_certificate_option_limit_or_instance(
    tmp_path: Path, backend
) -> None:
    setup = Setup(tmp_path, await backend("web"))
    setup.put(*pair(1001))
    setup.write(top="limits: {connections: 1000}\ninstance: {zone: zone-a}")
    async with running_app(setup) as app:
        runtime = app.runtime
        assert runtime is not None
        before = (runtime.instance, runtime.limits, runtime.grace, tls.current_options())
        stores = dict(runtime.tls_stores), dict(runtime.service_tls)
        served = {name: store.certificates() for name, store in runtime.tls_stores.items()}
        listeners = dict(runtime.listeners)
        settings = runtime.settings
        held = socket.socket()
        held.bind((HOST, 0))
        held.listen()
        try:
            # other certificate files, new options, limits, instance and grace: and a port
            # that cannot be bound
            setup.cert, setup.key = tmp_path / "new.crt", tmp_path / "new.key"
            setup.put(*pair(1002, key=2))
            busy = held.getsockname()[1]
            setup.write(top='tls: {session_tickets: false, min_version: "1.3"}\n'
                            "limits: {connections: 5}\ninstance: {zone: zone-b}",
                        services=f"  - {{name: clash, listen: {HOST}:{busy}, backends: []}}",
                        grace="7s")
            app.reload()
            await eventually(lambda: file_error(app) is not None, what="the rejection")
        finally:
            held.close()
        assert str(busy) in file_error(app)
        assert (runtime.instance, runtime.limits, runtime.grace,
                tls.current_options()) == before
        assert (dict(runtime.tls_stores), dict(runtime.service_tls)) == stores
        assert {name: store.certificates() for name, store in runtime.tls_stores.items()
                } == served
        assert runtime.settings is settings
        # the same listener objects, every one still accepting; the clash port not bound
        assert runtime.listeners == listeners
        assert f"{HOST}:{busy}" not in runtime.listeners
        for listener in runtime.listeners.values():
            assert listener.limits == before[1]
            assert not listener.closing
        assert set(runtime.services) == {"web", "ui"}
        for port in setup.ports:
            assert await serial_of(port) == 1001  # the old certificate
            # TLS 1.2 is still accepted: the rejected min_version 1.3 did not apply
            status, _, _ = await within(https_get(port, max_version=ssl.TLSVersion.TLSv1_2))
            assert status == 200


async def test_a_renamed_entrypoint_keeps_its_listener_and_its_rotations(
    tmp_path: Path, backend
) -> None:
    """The listener is kept across a rename of its entrypoint; the certificates it serves must
    still follow the files (the store it reads stays the one the runtime maintains)."""
    setup = Setup(tmp_path, await backend("web"))
    setup.put(*pair(1001))
    setup.write()
    async with running_app(setup) as app:
        runtime = app.runtime
        assert runtime is not None
        listener = runtime.listeners[f"{HOST}:{setup.https}"]
        app.applied.clear()
        setup.write(entrypoint="secure")
        await within(app.applied.wait())
        assert runtime.listeners[f"{HOST}:{setup.https}"] is listener
        assert set(runtime.tls_stores) == {"secure"}
        replace(setup.cert, pair(1002)[0])
        await eventually(lambda: runtime.tls_stores["secure"].match(NAME).serial == 1002,
                         timeout=ROTATION_DEADLINE, what="the rotation")
        assert await serial_of(setup.https) == 1002


# ---------------------------------------------------------------------------------------------
# The expiry metric


async def test_the_expiry_metric_and_status_name_every_loaded_certificate(
    tmp_path: Path, backend
) -> None:
    setup = Setup(tmp_path, await backend("web"))
    cert, key = pair(1001, days=30)
    setup.put(cert, key)
    other_cert, other_key = tlskit.ca().issue(["db.example.com"], serial=77)
    (tmp_path / "db.crt").write_bytes(other_cert)
    (tmp_path / "db.key").write_bytes(other_key)
    setup.write(services=f"  - {{name: db, mode: tcp, listen: {HOST}:{free_port()}, "
                f"tls: {{cert: {tmp_path}/db.crt, key: {tmp_path}/db.key}}, backends: []}}")
    source = f"{setup.cert} (key {setup.key})"
    async with running_app(setup):
        expiry = tls.load_pem(cert, key, "x").not_after.timestamp()
        samples = (await metrics(setup.admin))[EXPIRY]
        assert samples == {
            (("name", NAME), ("source", source)): expiry,
            (("name", "db.example.com"), ("source", f"{tmp_path}/db.crt (key {tmp_path}/db.key)")):
                tls.load_pem(other_cert, other_key, "x").not_after.timestamp(),
        }
        status = {c["source"]: c for c in (await status_json(setup.admin))["certificates"]}
        assert status[source]["name"] == NAME
        assert status[source]["not_after_timestamp"] == expiry
        assert status[source]["serial"] == format(1001, "x")
        assert status[source]["served_by"] == ["entrypoint https", "service ui"]

        renewed, _ = pair(1002, days=90)
        replace(setup.cert, renewed)
        new_expiry = tls.load_pem(renewed, key, "x").not_after.timestamp()
        assert new_expiry > expiry

        async def renewed_in_metrics() -> None:
            while (await metrics(setup.admin))[EXPIRY][
                    (("name", NAME), ("source", source))] != new_expiry:
                await asyncio.sleep(0.05)

        await within(renewed_in_metrics(), ROTATION_DEADLINE)


async def test_the_expiry_metric_covers_kubernetes_secrets() -> None:
    runtime = Runtime(loop=asyncio.get_running_loop())
    cert_pem, key_pem = tlskit.ca().issue(["api.example.com", "www.example.com"], serial=5)
    cert = tls.load_secret(tlskit.secret("prod", "api-tls", cert_pem, key_pem))
    pem = PemPair(cert_pem, key_pem, "Secret prod/api-tls")
    await runtime.apply(Snapshot("kubernetes", certificates=Certificates(
        pairs=(pem,), hosts=(("api.example.com", pem),))))
    text = generate_latest(make_registry(runtime, process=False)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    [sample] = families[EXPIRY].samples
    assert sample.labels == {"name": "api.example.com", "source": "Secret prod/api-tls"}
    assert sample.value == cert.not_after.timestamp()
    [entry] = runtime.certificate_status()
    assert (entry["name"], entry["source"], entry["served_by"]) == (
        "api.example.com", "Secret prod/api-tls", [])


async def test_a_watchers_pair_that_does_not_parse_keeps_the_last_good_one() -> None:
    """The runtime parses a source's PEM when it plans: a broken Secret keeps its last good
    certificate (a Notice says why), and a snapshot rejected for another reason (a port in
    use) installs none of its new certificates."""
    runtime = Runtime(loop=asyncio.get_running_loop())
    ca = tlskit.ca()
    first = PemPair(*ca.issue(["api.example.com"], serial=7), "Secret prod/api-tls")
    held = socket.socket()
    try:
        assert await runtime.apply(Snapshot("kubernetes", certificates=Certificates(
            pairs=(first,), hosts=(("api.example.com", first),)))) == ()
        [served] = runtime.watcher_certs["kubernetes"][0]
        assert served.serial == 7
        broken = PemPair(b"not a certificate", first.key, "Secret prod/api-tls",
                         labels=("tls.crt", "tls.key"))
        [notice] = await runtime.apply(Snapshot("kubernetes", certificates=Certificates(
            pairs=(broken,), hosts=(("api.example.com", broken),))))
        assert notice.origin == "Secret prod/api-tls" and "tls.crt is not PEM" in notice.message
        assert runtime.watcher_certs["kubernetes"] == ([served], {"api.example.com": served})
        # rejected: a port in use; the new certificate is not installed
        held.bind((HOST, 0))
        held.listen()
        busy = held.getsockname()[1]
        second = PemPair(*ca.issue(["api.example.com"], serial=8), "Secret prod/api-tls")
        bad = Snapshot("kubernetes", services=(dataclasses.replace(
            service("clash", []), listen=Address(HOST, busy)),), certificates=Certificates(
            pairs=(second,), hosts=(("api.example.com", second),)))
        with pytest.raises(SnapshotError, match=str(busy)):
            await runtime.apply(bad)
        assert runtime.watcher_certs["kubernetes"] == ([served], {"api.example.com": served})
        assert runtime.listeners == {} and runtime.services == {}
    finally:
        held.close()
        await runtime.shutdown(0.2)


# ---------------------------------------------------------------------------------------------
# The runtime: who re-reads the files


async def test_another_sources_snapshot_does_not_reread_the_certificate_files(
    tmp_path: Path, backend
) -> None:
    """A certificate file being rewritten must not reject the cluster's snapshot: only the
    file config's applies (reload_files) read the pairs in use again."""
    web = await backend("web")
    cert, key = pair(1001)
    (tmp_path / "s.crt").write_bytes(cert)
    (tmp_path / "s.key").write_bytes(key)
    port = free_port()
    svc = dataclasses.replace(service("ui", [web], listen=port),
                              tls=(str(tmp_path / "s.crt"), str(tmp_path / "s.key")))
    runtime = Runtime(loop=asyncio.get_running_loop())
    try:
        await runtime.apply(snapshot(svc))
        (tmp_path / "s.crt").write_bytes(b"half a certif")
        await runtime.apply(Snapshot("kubernetes", (service("k8s", [web]),)))
        assert set(runtime.services) == {"ui", "k8s"}
        with pytest.raises(SnapshotError, match="not PEM"):
            await runtime.apply(snapshot(svc), reload_files=True)
        assert await serial_of(port) == 1001
    finally:
        await runtime.shutdown(0.2)


def test_backend_tls_contexts_are_rebuilt_when_their_files_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend_tls, "_clock", lambda: 1000.0)  # no periodic re-check
    backend_tls.clear_cache()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(tlskit.ca().pem)
    spec, other = BackendTLS(ca=str(ca)), BackendTLS(verify=False)
    first, unrelated = client_context(spec), client_context(other)
    replace(ca, tlskit.ca().pem + b"\n")
    assert client_context(spec) is first  # not looked at before RECHECK_SECONDS
    assert backend_tls.files_changed([str(ca)]) == 1
    assert client_context(spec) is not first
    assert client_context(other) is unrelated
    backend_tls.clear_cache()


def test_setting_the_same_certificates_again_is_not_a_swap() -> None:
    """Every apply re-installs the certificates in use: unchanged ones must not be swapped."""
    cert_pem, key_pem = pair(1001)
    cert = tls.load_pem(cert_pem, key_pem, "x")
    same_bytes = tls.load_pem(cert_pem, key_pem, "x")
    store = tls.CertificateStore()
    store.set([cert], cert)
    store.set([cert], cert)
    assert store.swaps == 1
    store.set([same_bytes], same_bytes)  # another object: a swap (the runtime reuses objects)
    assert store.swaps == 2
    store.set([same_bytes], same_bytes, hosts={"api.example.com": same_bytes})
    assert store.swaps == 3
    assert store.match("api.example.com") is same_bytes
