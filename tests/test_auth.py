"""Basic auth on real sockets: htpasswd hashes, verification off the event loop (the loop keeps
serving while a hash is computed), the cache, the failure throttle (429), disconnects and
pipelining while a verification is pending, and the edgelb_auth_total counters."""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any

import pytest
from httpkit import (
    HOST,
    Client,
    build_request,
    eventually,
    free_port,
    running,
    service,
    snapshot,
    within,
)

from edgelb.net import acl
from edgelb.net.acl import Credentials, parse_auth, scrypt_hash
from edgelb.ops.metrics import make_registry

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(30)]  # the production loop

# from `htpasswd -nbB alice 'Hello world!'` and `htpasswd -nbm carol 'Hello world!'`
ALICE_BCRYPT = "alice:$2y$05$6.VsdPc354AvNACQS3mGdu9ZMT1gVAFO1t2xuK74tapMrxOERzDDe"
CAROL_APR1 = "carol:$apr1$AaocIc/q$FvHse91XUyk4rVL9m4nyQ0"
PASSWORD = "Hello world!"


def basic(user: str, password: str) -> tuple[str, str]:
    return ("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())


def creds(users: list[str], **options: Any) -> Credentials:
    c, errors = parse_auth({"realm": "shop", "users": users, **options}, "auth")
    assert errors == [] and c is not None
    return c


def auth_metric(runtime, svc: str, result: str) -> float | None:
    return make_registry(runtime, process=False).get_sample_value(
        "edgelb_auth_total", {"service": svc, "result": result})


async def open_from(port: int, source: str) -> Client:
    """A client connection from another loopback address (a different client IP)."""
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    return Client(reader, writer)


class Gate:
    """Holds every verification in its thread until `release` is set; `entered` is set (on
    the loop) when one has started. Counts the hashes asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loop = asyncio.get_running_loop()
        self.entered = asyncio.Event()
        self.release = threading.Event()
        self.calls = 0
        real = Credentials._verify
        gate = self

        def held(c: Credentials, name: str, password: bytes, pause: Any = None) -> str | None:
            gate.calls += 1
            gate.loop.call_soon_threadsafe(gate.entered.set)
            if not gate.release.wait(10):
                raise TimeoutError("the test never released the verification")
            return real(c, name, password, pause)

        monkeypatch.setattr(Credentials, "_verify", held)


async def test_htpasswd_bcrypt_and_apr1_users_get_through_and_wrong_ones_get_401(backend):
    b = await backend("b")
    port = free_port()
    c = creds([ALICE_BCRYPT, CAROL_APR1])
    async with running(snapshot(service("web", [b], listen=port, auth=c))) as rt:
        client = await Client.open(port)
        cases = [("alice", PASSWORD, 200), ("carol", PASSWORD, 200), ("alice", "wrong", 401),
                 ("carol", "hello world!", 401), ("mallory", PASSWORD, 401)]
        for user, password, status in cases:
            r = await within(client.request("GET", f"/{user}", [basic(user, password)]))
            assert r.status == status, (user, password)
            if status == 401:
                assert 'Basic realm="shop"' in (r.get("www-authenticate") or "")
        r = await within(client.request("GET", "/none"))
        assert r.status == 401
        client.close()
        assert auth_metric(rt, "web", "ok") == 2
        assert auth_metric(rt, "web", "failed") == 3
        assert auth_metric(rt, "web", "missing") == 1
    assert [r.target for r in b.requests] == ["/alice", "/carol"]
    # the Authorization header reaches the backend as it was sent (nothing is stripped)
    assert b.requests[0].get("authorization") == basic("alice", PASSWORD)[1]


async def test_one_hash_per_credentials_however_many_requests_and_connections(
        backend, monkeypatch):
    gate = Gate(monkeypatch)
    b = await backend("b")
    port = free_port()
    c = creds([ALICE_BCRYPT])
    async with running(snapshot(service("web", [b], listen=port, auth=c))) as rt:
        clients = [await Client.open(port) for _ in range(5)]
        # five connections ask at once while the first hash is held: they share it
        for i, client in enumerate(clients):
            await client.send(build_request("GET", f"/c{i}", [basic("alice", PASSWORD)]))
        await within(gate.entered.wait())
        header = basic("alice", PASSWORD)[1].encode()
        await eventually(lambda: len(c.state.waiting.get(header, ())) == 5,
                         what="all five requests wait for the one hash")
        gate.release.set()
        for client in clients:
            assert (await within(client.response())).status == 200
        for client in clients:  # and the cache answers from then on
            r = await within(client.request("GET", "/again", [basic("alice", PASSWORD)]))
            assert r.status == 200
            client.close()
        assert gate.calls == 1 and c.verifications == 1
        assert auth_metric(rt, "web", "ok") == 5  # the five that waited for the hash
        assert auth_metric(rt, "web", "cached") == 5
    assert len(b.requests) == 10


async def test_the_loop_serves_another_service_while_a_hash_is_computed(backend, monkeypatch):
    gate = Gate(monkeypatch)
    b = await backend("b")
    locked, open_port = free_port(), free_port()
    snap = snapshot(service("locked", [b], listen=locked, auth=creds([ALICE_BCRYPT])),
                    service("open", [b], listen=open_port))
    async with running(snap):
        waiting = await Client.open(locked)
        await waiting.send(build_request("GET", "/locked", [basic("alice", PASSWORD)]))
        await within(gate.entered.wait())
        pending = asyncio.ensure_future(waiting.response())
        # the verification is held in its thread; the other service answers meanwhile
        for i in range(3):
            c = await Client.open(open_port)
            assert (await within(c.request("GET", f"/open{i}"))).status == 200
            c.close()
        assert not pending.done() and not gate.release.is_set()
        gate.release.set()
        assert (await within(pending)).status == 200
        waiting.close()
    assert [r.target for r in b.requests] == ["/open0", "/open1", "/open2", "/locked"]


async def test_a_client_gone_during_the_verification_breaks_nothing_and_the_result_is_kept(
        backend, monkeypatch):
    gate = Gate(monkeypatch)
    b = await backend("b")
    port = free_port()
    c = creds([ALICE_BCRYPT])
    async with running(snapshot(service("web", [b], listen=port, auth=c))) as rt:
        gone = await Client.open(port)
        await gone.send(build_request("GET", "/gone", [basic("alice", PASSWORD)]))
        await within(gate.entered.wait())
        gone.close()
        listener = next(iter(rt.listeners.values()))
        await eventually(lambda: not listener.clients, what="the proxy saw the client leave")
        gate.release.set()
        header = basic("alice", PASSWORD)[1].encode()
        await eventually(lambda: c.cached(header) == "alice", what="the verdict was cached")
        assert acl.HASH_POOL.busy == 0
        client = await Client.open(port)
        r = await within(client.request("GET", "/next", [basic("alice", PASSWORD)]))
        assert r.status == 200
        client.close()
        assert gate.calls == 1
        assert auth_metric(rt, "web", "cached") == 1
    assert [r.target for r in b.requests] == ["/next"]


async def test_pipelined_requests_are_answered_in_order_around_a_pending_verification(
        backend, monkeypatch):
    gate = Gate(monkeypatch)
    b = await backend("b")
    port = free_port()
    async with running(snapshot(service("web", [b], listen=port,
                                        auth=creds([ALICE_BCRYPT, CAROL_APR1])))):
        client = await Client.open(port)
        await client.send(
            build_request("GET", "/1", [basic("alice", PASSWORD)])
            + build_request("GET", "/2")  # no credentials: 401 at once, but after /1
            + build_request("POST", "/3", [basic("alice", PASSWORD)], body=b"payload")
            + build_request("GET", "/4", [basic("carol", "wrong")])
            + build_request("GET", "/5", [basic("carol", PASSWORD)]))
        await within(gate.entered.wait())
        gate.release.set()
        statuses = [(await within(client.response())).status for _ in range(5)]
        client.close()
    assert statuses == [200, 401, 200, 401, 200]
    assert [r.target for r in b.requests] == ["/1", "/3", "/5"]
    assert b.requests[1].body == b"payload"
    assert gate.calls == 3  # alice once (then cached), carol's wrong and right passwords


async def test_repeated_failures_from_an_address_get_429_and_others_still_get_in(backend):
    b = await backend("b")
    port = free_port()
    c = creds([f"alice:{scrypt_hash(PASSWORD, n=1024)}"], max_failures=3,
              failure_window="30s")
    async with running(snapshot(service("web", [b], listen=port, auth=c))) as rt:
        attacker = await Client.open(port)
        for i in range(3):
            r = await within(attacker.request("GET", "/", [basic("alice", f"guess{i}")]))
            assert r.status == 401
        for i in range(3):  # wrong or right, no more hashing for this address
            r = await within(attacker.request("GET", "/", [basic("alice", f"more{i}")]))
            assert r.status == 429
            assert 28 <= int(r.get("retry-after") or 0) <= 30
        r = await within(attacker.request("GET", "/", [basic("alice", PASSWORD)]))
        assert r.status == 429
        attacker.close()
        assert c.verifications == 3
        other = await open_from(port, "127.0.0.2")
        r = await within(other.request("GET", "/in", [basic("alice", PASSWORD)]))
        assert r.status == 200
        other.close()
        assert auth_metric(rt, "web", "throttled") == 4
        assert auth_metric(rt, "web", "failed") == 3
        assert auth_metric(rt, "web", "ok") == 1
    assert [r.target for r in b.requests] == ["/in"]


async def test_a_full_hash_pool_answers_503_with_retry_after(backend, monkeypatch):
    gate = Gate(monkeypatch)
    monkeypatch.setattr(acl.HASH_POOL, "limit", 1)
    b = await backend("b")
    port = free_port()
    async with running(snapshot(service("web", [b], listen=port,
                                        auth=creds([ALICE_BCRYPT], max_failures=0)))) as rt:
        first = await Client.open(port)
        await first.send(build_request("GET", "/1", [basic("alice", PASSWORD)]))
        await within(gate.entered.wait())
        second = await Client.open(port)
        r = await within(second.request("GET", "/2", [basic("alice", "other")]))
        assert r.status == 503 and r.get("retry-after") == "1"
        gate.release.set()
        assert (await within(first.response())).status == 200
        first.close()
        second.close()
        assert auth_metric(rt, "web", "busy") == 1


async def test_redirect_to_https_comes_before_asking_for_a_password(backend):
    b = await backend("b")
    port = free_port()
    async with running(snapshot(service("web", [b], listen=port, redirect_to_https=True,
                                        auth=creds([ALICE_BCRYPT])))):
        client = await Client.open(port)
        r = await within(client.request("GET", "/x", host="shop.example"))
        assert r.status == 308 and r.get("location") == "https://shop.example/x"
        client.close()


async def test_a_reload_with_the_same_users_keeps_the_cache_and_the_failure_counts(backend):
    b = await backend("b")
    port = free_port()
    first = creds([ALICE_BCRYPT], max_failures=2)
    async with running(snapshot(service("web", [b], listen=port, auth=first))) as rt:
        client = await Client.open(port)
        assert (await within(client.request("GET", "/", [basic("alice", PASSWORD)]))).status \
            == 200
        for guess in ("a", "b"):
            r = await within(client.request("GET", "/", [basic("alice", guess)]))
            assert r.status == 401
        # a new config: new Credentials objects for the same users (a file reload, a watcher)
        second = creds([ALICE_BCRYPT], max_failures=2, cache_ttl="10m")
        await rt.apply(snapshot(service("web", [b], listen=port, auth=second)))
        assert rt.services["web"].policy.auth is second
        r = await within(client.request("GET", "/", [basic("alice", "c")]))
        assert r.status == 429  # the two failures still count
        other = await open_from(port, "127.0.0.2")
        assert (await within(other.request("GET", "/", [basic("alice", PASSWORD)]))).status \
            == 200
        assert second.verifications == 0  # served from the cache the first one filled
        client.close()
        other.close()
