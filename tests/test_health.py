"""Active health checks (edgelb.control.health) against a tiny HTTP server on loopback.

The server answers each check with a chosen (or scripted) status, can hang, can send only a
status line, and records what it received, so the tests count the checks it saw and await the
checker's on_change events instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest

from edgelb.control.health import TASK_PREFIX, USER_AGENT, HealthChecker, Target, probe
from watchers.model import Address, HealthCheck

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
STEP = 5.0  # seconds any awaited step may take
FAST = 0.05  # check interval of most tests

def within(aw, timeout: float = STEP):
    return asyncio.wait_for(aw, timeout)


@dataclass
class Seen:
    """One request head the server received."""

    line: str
    headers: dict[str, str]
    at: float  # loop time


class CheckServer:
    """A raw HTTP/1.1 server for health checks. `statuses` are answered first, in order, then
    `status`; `mode` is "answer", "hang" (read the request, never answer) or "line" (send only
    a status line, then wait)."""

    def __init__(self, status: int = 200, statuses: list[int] | None = None,
                 mode: str = "answer") -> None:
        self.status = status
        self.statuses = list(statuses or [])
        self.mode = mode
        self.requests: list[Seen] = []
        self.seen: asyncio.Queue[Seen] = asyncio.Queue()
        self.accepted = 0
        self.open = 0
        self.closed: asyncio.Queue[None] = asyncio.Queue()  # one item per connection ended
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str = HOST, port: int = 0) -> CheckServer:
        self.server = await asyncio.start_server(self._handle, host, port)
        self.port = self.server.sockets[0].getsockname()[1]
        self.host = host
        return self

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)

    def stop_listening(self) -> None:
        """Close the listener: later connects are refused."""
        assert self.server is not None
        self.server.close()

    def count(self, path: str | None = None) -> int:
        return sum(1 for r in self.requests if path is None or r.line.split()[1] == path)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for h in lines[1:]:
                if h:
                    name, _, value = h.partition(":")
                    headers[name.strip().lower()] = value.strip()
            seen = Seen(lines[0], headers, asyncio.get_running_loop().time())
            self.requests.append(seen)
            self.seen.put_nowait(seen)
            status = self.statuses.pop(0) if self.statuses else self.status
            if self.mode == "answer":
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
                await writer.drain()
            elif self.mode == "line":
                writer.write(f"HTTP/1.1 {status} X\r\n".encode())
                await reader.read()  # until the checker closes
            else:
                await reader.read()  # hang until the checker closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()
            self.closed.put_nowait(None)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


class Changes:
    """An on_change callback: records (service, key, healthy, checks the server had seen)."""

    def __init__(self, server: CheckServer | None = None,
                 then: Callable[[str, str, bool], None] | None = None) -> None:
        self.server = server
        self.then = then
        self.q: asyncio.Queue[tuple[str, str, bool, int]] = asyncio.Queue()
        self.all: list[tuple[str, str, bool, int]] = []

    def __call__(self, service: str, key: str, healthy: bool) -> None:
        seen = self.server.count() if self.server else -1
        self.all.append((service, key, healthy, seen))
        self.q.put_nowait((service, key, healthy, seen))
        if self.then:
            self.then(service, key, healthy)

    async def next(self) -> tuple[str, str, bool, int]:
        return await within(self.q.get())


def hc(**kw) -> HealthCheck:
    return HealthCheck(**{"interval": FAST, "timeout": 1.0, "path": "/healthz", **kw})


def target(server: CheckServer, assume_healthy: bool = True, **kw) -> Target:
    return Target(server.address, hc(**kw), assume_healthy)


async def servers(*made: CheckServer) -> list[CheckServer]:
    return [await s.start() for s in made]


def checker_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(TASK_PREFIX)]


@contextlib.asynccontextmanager
async def running(changes: Changes, rng: random.Random | None = None):
    checker = HealthChecker(changes, rng or random.Random(1))
    try:
        yield checker
    finally:
        await checker.close()


# -- rise and fall ---------------------------------------------------------------------------


async def test_goes_down_after_exactly_fall_failures() -> None:
    (srv,) = await servers(CheckServer(status=503))
    changes = Changes(srv)
    async with running(changes) as checker:
        checker.sync({("web", "b1"): target(srv, fall=3)})
        assert checker.healthy("web", "b1") is True  # assumed before any check
        assert await changes.next() == ("web", "b1", False, 3)
        st = checker.status("web", "b1")
        assert st["healthy"] is False
        assert st["failures_total"] == st["checks_total"] == 3
        assert st["last_result"].startswith("HTTP 503 in ")
        assert st["last_result"].endswith("ms (expected 200-399)")
        assert isinstance(st["last_check"], float)
    await srv.close()


async def test_rises_after_exactly_rise_successes() -> None:
    srv = await CheckServer(status=503).start()

    def recover(service: str, key: str, healthy: bool) -> None:
        if not healthy:
            srv.status = 200  # every check from now on passes

    changes = Changes(srv, then=recover)
    async with running(changes) as checker:
        checker.sync({("web", "b1"): target(srv, fall=1, rise=3)})
        assert await changes.next() == ("web", "b1", False, 1)
        assert await changes.next() == ("web", "b1", True, 4)
        assert checker.status("web", "b1")["last_result"].startswith("HTTP 200 in ")
        assert changes.q.empty()
    await srv.close()


async def test_new_target_starts_down_and_joins_on_its_first_success() -> None:
    # 503, 503: still down (never passed); 200: up at once despite rise=3 (first success);
    # 503: down (fall=1); then it needs rise=3 successes again.
    srv = await CheckServer(status=200, statuses=[503, 503, 200, 503]).start()
    changes = Changes(srv)
    async with running(changes) as checker:
        checker.sync({("web", "new"): target(srv, assume_healthy=False, fall=1, rise=3)})
        assert checker.healthy("web", "new") is False
        assert await changes.next() == ("web", "new", True, 3)
        assert await changes.next() == ("web", "new", False, 4)
        assert await changes.next() == ("web", "new", True, 7)
    await srv.close()


async def test_new_target_is_checked_at_once_and_a_kept_one_is_spread() -> None:
    srv = await CheckServer().start()
    changes = Changes(srv)
    loop = asyncio.get_running_loop()
    fresh = Target(srv.address, hc(interval=10.0, path="/fresh"), assume_healthy=False)
    kept = Target(srv.address, hc(interval=10.0, path="/kept"), assume_healthy=True)
    async with running(changes) as checker:
        t0 = loop.time()
        checker.sync({("web", "fresh"): fresh, ("web", "kept"): kept})
        assert (await changes.next())[:3] == ("web", "fresh", True)
        assert loop.time() - t0 < 2.0  # not after a 10 s interval
        assert srv.count("/fresh") == 1
    await srv.close()


class UpperRng(random.Random):
    """uniform() always returns its upper bound: the longest spread and jitter."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_first_check_is_spread_and_gaps_are_jittered() -> None:
    srv = await CheckServer().start()
    interval = 0.3
    loop = asyncio.get_running_loop()
    async with running(Changes(srv), rng=UpperRng()) as checker:
        t0 = loop.time()
        checker.sync({("web", "b"): target(srv, interval=interval)})
        first = await within(srv.seen.get())
        second = await within(srv.seen.get())
    margin = 0.02  # timer granularity
    assert first.at - t0 >= interval - margin  # spread: offset uniform(0, interval) -> interval
    assert second.at - first.at >= interval * 1.1 - margin  # jitter factor 1 + 10 %
    assert second.at - first.at < interval * 1.1 + 1.0
    await srv.close()


# -- what a check accepts --------------------------------------------------------------------


async def test_status_range_is_inclusive_and_configurable() -> None:
    srv = await CheckServer(status=302).start()
    changes = Changes(srv)
    async with running(changes) as checker:
        checker.sync({
            ("web", "2xx"): target(srv, fall=1, status=(200, 299), path="/a"),
            ("web", "3xx"): target(srv, assume_healthy=False, status=(200, 302), path="/b"),
        })
        got = {(await changes.next())[:3] for _ in range(2)}
        assert got == {("web", "2xx", False), ("web", "3xx", True)}
        assert checker.status("web", "2xx")["last_result"].endswith("(expected 200-299)")
        assert checker.status("web", "3xx")["last_result"].startswith("HTTP 302 in ")
    await srv.close()


async def test_hanging_server_is_a_timeout() -> None:
    srv = await CheckServer(mode="hang").start()
    changes = Changes(srv)
    timeout = 0.3
    loop = asyncio.get_running_loop()
    async with running(changes) as checker:
        checker.sync({("web", "b"): target(srv, fall=1, timeout=timeout)})
        seen = await within(srv.seen.get())
        assert (await changes.next())[:3] == ("web", "b", False)
        took = loop.time() - seen.at
        assert timeout - 0.1 <= took <= timeout + 0.5
        assert checker.status("web", "b")["last_result"] == "timeout after 0.3s"
        await within(srv.closed.get())  # the checker closed the hung connection
    await srv.close()


async def test_only_the_status_line_is_awaited() -> None:
    srv = await CheckServer(mode="line").start()  # no headers, no body: ever
    changes = Changes(srv)
    loop = asyncio.get_running_loop()
    async with running(changes) as checker:
        t0 = loop.time()
        checker.sync({("web", "b"): target(srv, assume_healthy=False, timeout=3.0)})
        assert (await changes.next())[:3] == ("web", "b", True)
        assert loop.time() - t0 < 2.0
        assert checker.status("web", "b")["last_result"].startswith("HTTP 200 in ")
        await within(srv.closed.get())
    await srv.close()


async def test_method_path_and_host_header_as_configured() -> None:
    srv = await CheckServer().start()
    async with running(Changes(srv)) as checker:
        checker.sync({
            ("web", "custom"): target(srv, assume_healthy=False, method="HEAD",
                                      path="/ready?deep=1", host="web.example.com"),
            ("web", "default"): target(srv, assume_healthy=False, path="/plain"),
        })
        reqs = {}
        while len(reqs) < 2:
            s = await within(srv.seen.get())
            reqs[s.line.split()[1]] = s
    custom, default = reqs["/ready?deep=1"], reqs["/plain"]
    assert custom.line == "HEAD /ready?deep=1 HTTP/1.1"
    assert custom.headers == {"host": "web.example.com", "user-agent": USER_AGENT,
                              "connection": "close"}
    assert default.line == "GET /plain HTTP/1.1"
    assert default.headers["host"] == f"127.0.0.1:{srv.port}"
    await srv.close()


async def test_tcp_mode_and_refused_connects() -> None:
    srv = await CheckServer().start()
    changes = Changes(then=lambda s, k, h: srv.stop_listening() if h else None)
    async with running(changes) as checker:
        checker.sync({("db", "b"): target(srv, assume_healthy=False, kind="tcp", fall=2)})
        assert (await changes.next())[:3] == ("db", "b", True)
        # (the listener closed in the callback, before any further check)
        assert (await changes.next())[:3] == ("db", "b", False)
        st = checker.status("db", "b")
        assert st["last_result"] == "connect refused"
        assert st["checks_total"] == 3 and st["failures_total"] == 2
        assert st["kind"] == "tcp"
    assert srv.requests == []  # a TCP check sends nothing


class Blackhole:
    """A listener whose accept queue is full: a connect to it hangs (the SYN is dropped)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((HOST, 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(3):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect((HOST, self.port))
            self.fillers.append(c)

    def close(self) -> None:
        for c in self.fillers:
            c.close()
        self.sock.close()


async def test_a_hanging_connect_is_a_timeout() -> None:
    hole = Blackhole()
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await within(probe(Address(HOST, hole.port), hc(kind="tcp", timeout=0.2)))
        assert (result.ok, result.text) == (False, "timeout after 0.2s")
        assert 0.15 <= loop.time() - t0 <= 1.0
    finally:
        hole.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_backend() -> None:
    srv = await CheckServer().start(host="::1")
    changes = Changes(srv)
    async with running(changes) as checker:
        checker.sync({
            ("web", "h"): Target(Address("::1", srv.port), hc(), assume_healthy=False),
            ("web", "t"): Target(Address("::1", srv.port), hc(kind="tcp"), assume_healthy=False),
        })
        got = {(await changes.next())[:3] for _ in range(2)}
        assert got == {("web", "h", True), ("web", "t", True)}
    assert srv.requests[0].headers["host"] == f"[::1]:{srv.port}"
    await srv.close()


async def test_probe_failure_texts() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH\r\n")
        await writer.drain()
        writer.close()

    async def hangup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    texts = []
    for handler in (garbage, hangup):
        server = await asyncio.start_server(handler, HOST, 0)
        addr = Address(HOST, server.sockets[0].getsockname()[1])
        texts.append(await within(probe(addr, hc())))
        server.close()
    refused = await within(probe(addr, hc()))  # the last listener is closed
    assert [r.ok for r in (*texts, refused)] == [False] * 3
    assert texts[0].text == "not an HTTP status line: b'SSH-2.0-OpenSSH\\r\\n'"
    assert texts[1].text == "connection closed before the status line"
    assert refused.text == "connect refused"


async def test_unknown_kind_is_a_failed_check() -> None:
    srv = await CheckServer().start()
    result = await within(probe(srv.address, hc(kind="udp")))
    assert not result.ok
    assert result.text == "unknown check kind 'udp' (use http, tcp or grpc)"
    await srv.close()


# -- sync ------------------------------------------------------------------------------------


async def test_sync_keeps_unchanged_targets_running() -> None:
    srv = await CheckServer(status=503).start()
    changes = Changes(srv)
    spec = target(srv, fall=3)
    async with running(changes) as checker:
        checker.sync({("web", "b"): spec})
        (task,) = checker_tasks()
        await within(srv.seen.get())  # one failure counted
        for i in range(200):  # equal but new values, and assume_healthy flipping: no restart
            again = Target(Address(HOST, srv.port), hc(fall=3), assume_healthy=i % 2 == 0)
            checker.sync({("web", "b"): again})
        assert checker_tasks() == [task]
        assert checker.healthy("web", "b") is True
        # The counters went on: down after exactly 3 checks in all.
        assert await changes.next() == ("web", "b", False, 3)
    await srv.close()


async def test_sync_restarts_a_changed_target_keeping_its_verdict() -> None:
    srv = await CheckServer().start()
    changes = Changes(srv)
    async with running(changes) as checker:
        checker.sync({("web", "b"): target(srv, path="/old")})
        await within(srv.seen.get())
        (old_task,) = checker_tasks()
        checker.sync({("web", "b"): target(srv, path="/new")})
        await within(asyncio.gather(old_task, return_exceptions=True))
        assert old_task.cancelled()
        (new_task,) = checker_tasks()
        assert new_task is not old_task
        while (await within(srv.seen.get())).line.split()[1] != "/new":
            pass
        assert checker.healthy("web", "b") is True
        assert changes.all == []  # no flap from a config edit
        assert checker.status("web", "b")["checks_total"] >= 2  # totals kept
    await srv.close()


async def test_restarted_down_target_rejoins_on_first_success() -> None:
    srv = await CheckServer(status=503).start()
    changes = Changes(srv)
    async with running(changes) as checker:
        checker.sync({("web", "b"): target(srv, fall=1, rise=5, path="/broken")})
        assert (await changes.next())[:3] == ("web", "b", False)
        srv.status = 200
        fixed = target(srv, fall=1, rise=5, path="/fixed", interval=10.0)
        checker.sync({("web", "b"): fixed})
        assert (await changes.next())[:3] == ("web", "b", True)  # at once, on one success
        assert srv.count("/fixed") == 1
    await srv.close()


async def test_sync_stops_removed_targets() -> None:
    srv = await CheckServer().start()
    changes = Changes(srv)
    async with running(changes) as checker:
        checker.sync({("web", "gone"): target(srv, path="/gone"),
                      ("web", "kept"): target(srv, path="/kept")})
        while srv.count("/gone") < 1:
            await within(srv.seen.get())
        gone = [t for t in checker_tasks() if t.get_name().endswith("/gone")]
        checker.sync({("web", "kept"): target(srv, path="/kept")})
        await within(asyncio.gather(*gone, return_exceptions=True))
        assert checker.healthy("web", "gone") is None
        assert checker.status("web", "gone")["healthy"] is None
        assert len(checker) == 1
        before = srv.count("/gone")
        kept_before = srv.count("/kept")
        while srv.count("/kept") < kept_before + 5:  # several intervals pass
            await within(srv.seen.get())
        assert srv.count("/gone") == before
    await srv.close()


# -- robustness and shutdown ------------------------------------------------------------------


async def test_a_failing_on_change_does_not_stop_the_checks() -> None:
    srv = await CheckServer(status=503).start()

    def boom(service: str, key: str, healthy: bool) -> None:
        raise RuntimeError("callback bug")

    async with running(boom) as checker:
        checker.sync({("web", "b"): target(srv, fall=1)})
        while srv.count() < 4:
            await within(srv.seen.get())
        assert checker.healthy("web", "b") is False
    await srv.close()


async def test_close_ends_every_task_and_socket() -> None:
    hang = await CheckServer(mode="hang").start()
    ok = await CheckServer().start()
    checker = HealthChecker(Changes(), random.Random(3))
    checker.sync({
        ("web", "hang"): target(hang, assume_healthy=False, timeout=10.0),
        ("web", "ok"): target(ok, assume_healthy=False),
        ("web", "later"): target(ok, interval=60.0, path="/later"),  # still in its spread wait
    })
    await within(hang.seen.get())  # a check is in flight
    await within(ok.seen.get())
    assert len(checker_tasks()) == 3
    await within(checker.close())
    assert checker_tasks() == []
    await within(hang.closed.get())  # the in-flight check's socket was closed
    assert checker.healthy("web", "ok") is None
    with pytest.raises(RuntimeError, match="after close"):
        checker.sync({("web", "ok"): target(ok)})
    await hang.close()
    await ok.close()


def test_target_is_frozen_and_hashable() -> None:
    t = Target(Address(HOST, 1), HealthCheck())
    assert t.assume_healthy is True
    assert hash(t) == hash(replace(t))
    with pytest.raises(AttributeError):
        t.assume_healthy = False  # type: ignore[misc]


@pytest.mark.uvloop
class TestOnUvloop:
    """The socket-level cases again on uvloop, the proxy's loop in production."""

    @pytest.fixture(autouse=True)
    async def _on_uvloop(self) -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")

    async def test_fall(self) -> None:
        await test_goes_down_after_exactly_fall_failures()

    async def test_timeout(self) -> None:
        await test_hanging_server_is_a_timeout()

    async def test_tcp_and_refused(self) -> None:
        await test_tcp_mode_and_refused_connects()

    async def test_connect_timeout(self) -> None:
        await test_a_hanging_connect_is_a_timeout()

    async def test_close(self) -> None:
        await test_close_ends_every_task_and_socket()

    async def test_ipv6(self) -> None:
        if not _ipv6_loopback():
            pytest.skip("no IPv6 loopback on this machine")
        await test_ipv6_backend()
