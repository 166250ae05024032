"""The Marathon watcher against the fake Marathon over real sockets, with the real runtime:
sync on connect and events, failover, a leader redirect, dropped and silent streams, an event
storm under load, Marathon down, an app whose port cannot be bound, credentials."""

from __future__ import annotations

import asyncio
import socket

import pytest
from httpkit import HOST, closed_port, eventually, fetch, free_port
from marathon_kit import Load, backends, fakes, service_name, tcp_app, watching

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

APP = "/shop/web"


async def test_apps_become_services_and_task_events_move_traffic() -> None:
    a, b = await backends("a", "b")
    port = free_port()
    name = service_name(APP, port)
    async with fakes() as [m]:
        m.put_app(tcp_app(APP, port))
        m.add_task(APP, HOST, a.port)
        async with watching([m.url]) as h:
            await eventually(lambda: h.backends(name) == {a.port}, what="the app's service")
            assert (await fetch(port)).body == b"a"
            assert h.runtime.watcher_synced["marathon"] and h.runtime.watcher_up["marathon"]
            task_b = m.add_task(APP, HOST, b.port)  # a status_update_event
            await eventually(lambda: h.backends(name) == {a.port, b.port}, timeout=2,
                             what="the new task within 2 s")
            m.kill_task(APP, task_b)
            await eventually(lambda: h.backends(name) == {a.port}, timeout=2,
                             what="the killed task gone within 2 s")
            m.remove_app(APP)
            await eventually(lambda: name not in h.services, timeout=2, what="the app gone")
    for x in (a, b):
        await x.stop()


async def test_stop_ends_the_loops_even_when_a_sync_is_asked_for_in_the_same_step() -> None:
    """A cancel that lands as the sync loop's event is set is not lost (asyncio.wait_for on
    Python 3.11 returned the event's result and dropped the cancel: stop() then waited for the
    next resync, 300 s)."""
    (a,) = await backends("a")
    port = free_port()
    async with fakes() as [m]:
        m.put_app(tcp_app(APP, port))
        m.add_task(APP, HOST, a.port)
        async with watching([m.url]) as h:
            await eventually(lambda: h.runtime.watcher_synced["marathon"], what="a sync")
            await eventually(lambda: not h.watcher._dirty.is_set(), what="the loop waiting")
            for _ in range(3):
                await asyncio.sleep(0)  # the sync loop is back in its wait
            h.watcher._want(urgent=True)
            await asyncio.wait_for(h.watcher.stop(), 5)
            assert all(t.done() for t in h.watcher._tasks)
    await a.stop()


async def test_fails_over_to_the_second_url_and_back_in_order() -> None:
    (a,) = await backends("a")
    port = free_port()
    async with fakes(2) as [m1, m2]:
        for m in (m1, m2):
            m.put_app(tcp_app(APP, port))
            m.add_task(APP, HOST, a.port)
        await m1.refuse()
        async with watching([m1.url, m2.url]) as h:
            await eventually(lambda: h.runtime.watcher_synced["marathon"], what="a sync")
            assert h.watcher.stream_url == m2.url and m2.apps_reads >= 1
            assert (await fetch(port)).body == b"a"
            # m2 goes away: the watcher comes back to m1
            await m1.accept()
            await m2.refuse()
            await eventually(lambda: h.watcher.stream_url == m1.url and h.watcher.up,
                             timeout=10, what="failover back to the first URL")
    await a.stop()


async def test_a_non_leader_redirect_is_followed() -> None:
    (a,) = await backends("a")
    port = free_port()
    async with fakes(2) as [follower, leader]:
        leader.put_app(tcp_app(APP, port))
        leader.add_task(APP, HOST, a.port)
        follower.follow(leader.url)  # answers 307 to the leader
        async with watching([follower.url]) as h:
            await eventually(lambda: service_name(APP, port) in h.services, what="the app")
            assert leader.apps_reads >= 1 and leader.stream_opens >= 1
            assert follower.apps_reads == 0  # it redirected, served nothing
            assert h.watcher.stream_url == leader.url
            # the leader's events arrive through the followed stream
            (b,) = await backends("b")
            leader.add_task(APP, HOST, b.port)
            await eventually(lambda: h.backends(service_name(APP, port)) == {a.port, b.port},
                             timeout=2, what="an event on the redirected stream")
            await b.stop()
    await a.stop()


async def test_a_dropped_stream_reconnects_and_reads_the_apps_again() -> None:
    a, b = await backends("a", "b")
    port = free_port()
    name = service_name(APP, port)
    async with fakes() as [m]:
        m.put_app(tcp_app(APP, port))
        m.add_task(APP, HOST, a.port)
        async with watching([m.url]) as h:
            await eventually(lambda: h.backends(name) == {a.port}, what="the app")
            # a change Marathon does not announce (an event lost with the stream)
            m.tasks[APP].append({**m.tasks[APP][0], "id": "shop_web.lost", "ports": [b.port]})
            connects = h.watcher.connects
            m.drop_streams()
            await eventually(lambda: h.watcher.connects > connects, timeout=5,
                             what="a new stream")
            await eventually(lambda: h.backends(name) == {a.port, b.port}, timeout=2,
                             what="the apps re-read on reconnect")
    for x in (a, b):
        await x.stop()


async def test_a_silent_stream_is_dead_after_the_silence_timeout() -> None:
    (a,) = await backends("a")
    port = free_port()
    async with fakes() as [m]:
        m.put_app(tcp_app(APP, port))
        m.add_task(APP, HOST, a.port)
        async with watching([m.url], silence=0.6) as h:
            await eventually(lambda: h.runtime.watcher_synced["marathon"], what="a sync")
            # keep-alives every 0.2 s keep a quiet stream alive past the timeout
            connects = h.watcher.connects
            await asyncio.sleep(1.0)
            assert h.watcher.connects == connects
            reads = m.apps_reads
            m.silent = True  # the connection stays, nothing comes
            await eventually(lambda: h.watcher.connects > connects, timeout=5,
                             what="a reconnect after silence")
            await eventually(lambda: m.apps_reads > reads, timeout=2,
                             what="the apps re-read on reconnect")
            m.silent = False
            await eventually(lambda: h.watcher.up, timeout=2, what="the watcher up")
            connects = h.watcher.connects
            await asyncio.sleep(1.0)  # keep-alives again: the stream lives
            assert h.watcher.connects == connects
    await a.stop()


async def test_a_storm_of_150_health_events_applies_a_few_times_with_no_failed_request(
) -> None:
    a, b, c = await backends("a", "b", "c")
    port = free_port()
    name = service_name(APP, port)
    async with fakes() as [m]:
        m.put_app(tcp_app(APP, port, health_checks=True))
        ids = [m.add_task(APP, HOST, x.port, healthy=True) for x in (a, b, c)]
        async with watching([m.url]) as h:
            await eventually(lambda: h.backends(name) == {a.port, b.port, c.port},
                             what="three healthy tasks")
            load = Load(port).start()
            await eventually(lambda: load.ok >= 20, what="the load running")
            reads, applies = h.watcher.reads, h.watcher.applies
            for i in range(150):  # c flaps; it ends unhealthy
                m.set_health(APP, ids[2], alive=i % 2 == 1 and i < 149)
                if i % 30 == 29:
                    await asyncio.sleep(0.05)  # the storm arrives in bursts
            await eventually(lambda: h.backends(name) == {a.port, b.port}, timeout=3,
                             what="the storm's end state")
            await asyncio.sleep(0.6)  # longer than the debounce window: nothing more comes
            await load.stop()
            assert h.watcher.events >= 150
            assert 1 <= h.watcher.reads - reads <= 5, h.watcher.reads - reads
            assert 1 <= h.watcher.applies - applies <= 5, h.watcher.applies - applies
            assert load.failed == [] and load.ok > 20
    for x in (a, b, c):
        await x.stop()


async def test_marathon_entirely_down_keeps_the_last_snapshot_serving() -> None:
    a, b = await backends("a", "b")
    port = free_port()
    name = service_name(APP, port)
    async with fakes(2) as [m1, m2]:
        for m in (m1, m2):
            m.put_app(tcp_app(APP, port))
            m.add_task(APP, HOST, a.port)
        async with watching([m1.url, m2.url]) as h:
            await eventually(lambda: h.backends(name) == {a.port}, what="the app")
            await m1.refuse()
            await m2.refuse()
            await eventually(lambda: not h.runtime.watcher_up["marathon"], timeout=5,
                             what="the watcher reported down")
            await eventually(lambda: "no Marathon answered" in h.runtime.last_errors.get(
                "marathon", ""), timeout=5, what="every URL tried, the error shown")
            for _ in range(5):  # stale but serving
                assert (await fetch(port)).body == b"a"
            assert h.backends(name) == {a.port}
            # what changed meanwhile is applied once a Marathon is back
            m2.add_task(APP, HOST, b.port)
            await m2.accept()
            await eventually(lambda: h.backends(name) == {a.port, b.port}, timeout=10,
                             what="the change once Marathon is back")
            await eventually(lambda: h.runtime.watcher_up["marathon"], timeout=5,
                             what="the watcher up again")
    for x in (a, b):
        await x.stop()


async def test_an_app_whose_port_cannot_be_bound_is_skipped_alone() -> None:
    a, b = await backends("a", "b")
    good, bad = free_port(), free_port()
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind((HOST, bad))
    holder.listen()
    try:
        async with fakes() as [m]:
            m.put_app(tcp_app("/shop/good", good))
            m.add_task("/shop/good", HOST, a.port)
            m.put_app(tcp_app("/shop/bad", bad))
            m.add_task("/shop/bad", HOST, b.port)
            async with watching([m.url]) as h:
                await eventually(lambda: service_name("/shop/good", good) in h.services,
                                 what="the good app")
                assert service_name("/shop/bad", bad) not in h.services
                assert (await fetch(good)).body == b"a"
                assert h.runtime.watcher_synced["marathon"]
                assert list(h.watcher.dropped) == ["/shop/bad"]
                assert any("/shop/bad" in line and str(bad) in line
                           for line in h.watcher.problems), h.watcher.problems
                assert h.runtime.watcher_problems["marathon"] == 1
                # the port is freed: the next sync exposes the app
                holder.close()
                m.add_task("/shop/good", HOST, b.port)
                await eventually(lambda: service_name("/shop/bad", bad) in h.services,
                                 timeout=3, what="the app once its port is free")
                assert h.watcher.problems == ()
    finally:
        holder.close()
        for x in (a, b):
            await x.stop()


async def test_basic_auth_and_a_token(tmp_path) -> None:
    (a,) = await backends("a")
    port = free_port()
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    async with fakes(user="marathon", password="s3cret") as [basic], \
            fakes(token="tok-123") as [bearer]:
        for m in (basic, bearer):
            m.put_app(tcp_app(APP, port))
            m.add_task(APP, HOST, a.port)
        async with watching([basic.url], user="marathon", password_file=str(pw)) as h:
            await eventually(lambda: h.runtime.watcher_synced["marathon"], what="basic auth")
        async with watching([bearer.url], token_file=str(token)) as h:
            await eventually(lambda: h.runtime.watcher_synced["marathon"], what="a token")
        async with watching([basic.url], user="marathon", password="wrong") as h:
            await eventually(lambda: "HTTP 401" in h.runtime.last_errors.get("marathon", ""),
                             what="the refusal reported")
            assert "watchers.marathon.auth" in h.runtime.last_errors["marathon"]
            assert not h.runtime.watcher_synced["marathon"]
    await a.stop()


async def test_an_https_marathon_is_verified_against_the_configured_ca(tmp_path) -> None:
    import ssl

    import tlskit

    (a,) = await backends("a")
    port = free_port()
    cert, key = tlskit.ca().issue(["localhost"], ips=[HOST])
    (tmp_path / "m.crt").write_bytes(cert)
    (tmp_path / "m.key").write_bytes(key)
    (tmp_path / "ca.pem").write_bytes(tlskit.ca().pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "m.crt", tmp_path / "m.key")
    async with fakes(ssl=ctx) as [m]:
        assert m.url.startswith("https://")
        m.put_app(tcp_app(APP, port))
        m.add_task(APP, HOST, a.port)
        # without the CA the certificate is not trusted: nothing is read
        async with watching([m.url]) as h:
            await eventually(lambda: "certificate" in h.runtime.last_errors.get("marathon", ""),
                             what="the TLS error reported")
            assert m.apps_reads == 0 and not h.runtime.watcher_synced["marathon"]
            assert not h.runtime.watcher_up["marathon"]
        async with watching([m.url], ca=str(tmp_path / "ca.pem")) as h:
            await eventually(lambda: service_name(APP, port) in h.services, what="the app")
            assert (await fetch(port)).body == b"a"
    await a.stop()


async def test_nothing_listening_at_any_url_reports_each() -> None:
    urls = [f"http://{HOST}:{closed_port()}", f"http://{HOST}:{closed_port()}"]
    async with watching(urls) as h:
        await eventually(lambda: "no Marathon answered" in h.runtime.last_errors.get(
            "marathon", ""), what="the error")
        error = h.runtime.last_errors["marathon"]
        assert all(u in error for u in urls)
        assert not h.runtime.watcher_up["marathon"]


async def test_dcos_service_account_logs_in_with_an_rs256_jwt(tmp_path) -> None:
    import base64
    import json

    from aiohttp import web
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    logins: list[dict] = []

    def unb64(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    async def login(request: web.Request) -> web.Response:
        body = await request.json()
        header, claims, signature = body["token"].split(".")
        key.public_key().verify(unb64(signature), f"{header}.{claims}".encode(),
                                padding.PKCS1v15(), hashes.SHA256())  # raises if forged
        assert json.loads(unb64(header))["alg"] == "RS256"
        assert json.loads(unb64(claims))["uid"] == body["uid"] == "edgelb"
        logins.append(body)
        return web.json_response({"token": "dcos-token"})

    app = web.Application()
    app.router.add_post("/acs/api/v1/auth/login", login)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port).start()
    creds = tmp_path / "dcos.json"
    creds.write_text(json.dumps({"uid": "edgelb", "private_key": pem, "scheme": "RS256",
                                 "login_endpoint": f"http://{HOST}:{port}/acs/api/v1/auth/login"}))
    try:
        async with fakes(token="dcos-token") as [m]:
            async with watching([m.url], dcos_credentials=str(creds)) as h:
                await eventually(lambda: h.runtime.watcher_synced["marathon"], what="a sync")
                assert len(logins) == 1  # the token is reused for the stream and the reads
    finally:
        await runner.cleanup()


# -- the config keys ---------------------------------------------------------------------------


def marathon_cfg(body: str):
    from edgelb.ops.config import parse_config

    return parse_config("watchers:\n  marathon:\n" + "".join(
        f"    {line}\n" for line in body.strip().splitlines())).marathon


def marathon_errors(body: str) -> list[str]:
    from edgelb.ops.config import ConfigError

    with pytest.raises(ConfigError) as info:
        marathon_cfg(body)
    return info.value.errors


def test_config_keys() -> None:
    c = marathon_cfg("""
urls: [https://m1:8443, http://m2:8080/]
group: "*"
health: false
resync: 1m
auth: {user: marathon, password_file: /run/secrets/pw}
ca: /etc/ssl/ca.pem
""")
    assert c.urls == ("https://m1:8443", "http://m2:8080")
    assert (c.group, c.health, c.resync) == ("*", False, 60.0)
    assert (c.user, c.password, c.password_file) == ("marathon", None, "/run/secrets/pw")
    assert c.ca == "/etc/ssl/ca.pem"
    d = marathon_cfg("urls: [http://m:8080]")
    assert (d.group, d.health, d.resync, d.user, d.token_file) == (
        "external", True, 300.0, None, None)
    assert marathon_cfg("urls: [http://m]\ntoken_file: /t").token_file == "/t"
    assert marathon_cfg("urls: [http://m]\ndcos_credentials: /d.json").dcos_credentials == \
        "/d.json"
    assert marathon_cfg("urls: [http://m]\nauth: {user: u, password: p}").password == "p"


@pytest.mark.parametrize(("body", "path", "words"), [
    ("urls: [http://m]\nresync: 0s", "watchers.marathon.resync", "more than 0"),
    ("urls: [http://m]\nresync: soon", "watchers.marathon.resync", ""),
    ("urls: [http://m]\nhealth: yes please", "watchers.marathon.health", "true or false"),
    ("urls: [http://m]\ngroup: 'a b'", "watchers.marathon.group", "one name"),
    ("urls: [http://m]\nauth: {password: p}", "watchers.marathon.auth", "user is required"),
    ("urls: [http://m]\nauth: {user: u}", "watchers.marathon.auth", "exactly one"),
    ("urls: [http://m]\nauth: {user: u, password: p, password_file: f}",
     "watchers.marathon.auth", "exactly one"),
    ("urls: [http://m]\nauth: {user: 'a:b', password: p}", "watchers.marathon.auth.user", ":"),
    ("urls: [http://m]\nauth: {user: u, pasword: p}", "watchers.marathon.auth.pasword",
     "did you mean"),
    ("urls: [http://m]\nauth: {user: u, password: p}\ntoken_file: /t",
     "watchers.marathon.token_file", "keep one"),
    ("urls: [http://m]\ntoken_file: /t\ndcos_credentials: /d",
     "watchers.marathon.dcos_credentials", "keep one"),
    ("urls: [http://m]\nca: 3", "watchers.marathon.ca", "expected a string"),
    ("urls: [http://m]\nsilence: 5s", "watchers.marathon.silence", "unknown key"),
])
def test_config_errors_name_the_key_and_the_fix(body: str, path: str, words: str) -> None:
    errors = marathon_errors(body)
    assert any(e.startswith(path + ":") and words in e for e in errors), errors


def test_check_reads_the_credential_files(tmp_path) -> None:
    import subprocess
    import sys

    path = tmp_path / "edgelb.yaml"
    path.write_text(f"watchers:\n  marathon:\n    urls: [http://m:8080]\n"
                    f"    token_file: {tmp_path / 'missing'}\n")
    r = subprocess.run([sys.executable, "-m", "edgelb", "check", "-c", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "watchers.marathon.token_file: cannot read" in r.stderr
    (tmp_path / "missing").write_text("t\n")
    r = subprocess.run([sys.executable, "-m", "edgelb", "check", "-c", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "a token file" in r.stdout


def test_the_json_schema_takes_the_marathon_keys() -> None:
    import jsonschema
    import yaml

    from edgelb.ops.config import json_schema

    doc = yaml.safe_load("watchers: {marathon: {urls: [http://m], group: x, health: true, "
                         "resync: 30s, auth: {user: u, password_file: f}, ca: c}}")
    jsonschema.validate(doc, json_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"watchers": {"marathon": {"urls": ["http://m"], "x": 1}}},
                            json_schema())
