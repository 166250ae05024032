"""The shutdown drill (issue 6): SIGTERM to a real `edgelb run` process under load.

Steady keep-alive HTTP load, an upgraded (WebSocket-like) tunnel and a raw TCP connection are
open when SIGTERM arrives. The drill checks the whole sequence as a client sees it: /readyz
turns 503 at once; new connections are still accepted for `shutdown.delay`; every request that
started before the stop completes whole; requests made after the listeners closed fail with a
connection error (never a garbled answer); the tunnel and the TCP connection work until the
grace period ends and are closed right after it; the process exits 0 within delay + grace + 1 s.

Times are taken on this side with time.monotonic(); SIGTERM is sent at T, so the proxy's
listeners close at about T + DELAY and its long connections are cut at about
T + DELAY + GRACE (both a little later: the signal takes a moment to arrive).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import pytest
from httpkit import (
    HOST,
    Call,
    Client,
    by_path,
    fetch,
    free_port,
    ok,
    slow,
    upgrade_echo,
    within,
)

pytestmark = pytest.mark.timeout(40)

PYTHON = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DELAY = 0.5  # shutdown.delay: unready, still accepting
GRACE = 2.0  # shutdown.grace: draining, then long connections are closed
SLOW = 0.3  # /slow answers after this
LONG = 1.2  # /long is still in flight when the listeners close, and finishes well before GRACE
MARGIN = 0.15  # timing slack around the listener close (signal delivery, scheduling)

FAST_BODY = bytes(range(256)) * 128  # 32 KiB, checked byte for byte
SLOW_BODY = b"slow:" + b"s" * 4000
LONG_BODY = b"long:" + b"l" * 9000
BODIES = {"/": FAST_BODY, "/slow": SLOW_BODY, "/long": LONG_BODY}

# a failure a client may see once the proxy stops: refused, reset or closed before an answer
CONNECTION_ERRORS = (ConnectionError, asyncio.IncompleteReadError, OSError)


def drill_config(admin: int, web: int, tcp: int, backends: list[int], echo: int) -> str:
    listed = ", ".join(f"{{address: {HOST}:{p}}}" for p in backends)
    return (
        f"admin: {{listen: {HOST}:{admin}}}\n"
        f"shutdown: {{delay: {int(DELAY * 1000)}ms, grace: {int(GRACE * 1000)}ms}}\n"
        "services:\n"
        "  - name: web\n"
        f"    listen: {HOST}:{web}\n"
        "    balance: round-robin\n"
        f"    backends: [{listed}]\n"
        "  - name: db\n"
        "    mode: tcp\n"
        f"    listen: {HOST}:{tcp}\n"
        f"    backends: [{{address: {HOST}:{echo}}}]\n"
    )


# -- the process ----------------------------------------------------------------------------


class Edgelb:
    """`python -m edgelb run -c FILE` as a child; its stderr is read all along (kept for failure
    messages, and so a chatty log can never fill the pipe and stall the process)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.log: list[bytes] = []
        self.running = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, path: str) -> Edgelb:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "edgelb", "run", "-c", path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )
        edgelb = cls(proc)
        try:
            await within(edgelb.running.wait(), 20)
        except BaseException:
            await edgelb.close()  # never leave a process behind a failed start
            raise
        if not any(b"edgelb running with" in line for line in edgelb.log):
            await edgelb.close()
            raise AssertionError(f"edgelb exited before it was running:\n{edgelb.stderr()}")
        return edgelb

    async def _read(self) -> None:
        stream = self.proc.stderr
        assert stream is not None
        while line := await stream.readline():
            self.log.append(line)
            if b"edgelb running with" in line:
                self.running.set()
        if not self.running.is_set():
            self.running.set()  # exited before running: start() fails on the check below

    def stderr(self) -> str:
        return b"".join(self.log[-40:]).decode("utf-8", "replace")

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 2)


# -- the load -------------------------------------------------------------------------------


@dataclass
class Attempt:
    path: str
    start: float
    end: float = 0.0
    outcome: str = ""  # ok | connection | bad (wrong status or body) | garbled | timeout
    detail: str = ""


@dataclass
class Load:
    """Keep-alive clients looping requests until told to stop; every attempt is recorded."""

    port: int
    attempts: list[Attempt] = field(default_factory=list)
    stopping: bool = False
    tasks: list[asyncio.Task] = field(default_factory=list)

    def start(self, paths: list[str]) -> None:
        self.tasks = [asyncio.ensure_future(self._worker(p)) for p in paths]

    def ok_count(self, path: str | None = None) -> int:
        return sum(1 for a in self.attempts if a.outcome == "ok" and path in (None, a.path))

    async def stop(self) -> None:
        self.stopping = True
        await within(asyncio.gather(*self.tasks), 5)

    async def _worker(self, path: str) -> None:
        client: Client | None = None
        while not self.stopping:
            attempt = Attempt(path, time.monotonic())
            self.attempts.append(attempt)
            try:
                if client is None:
                    client = await within(Client.open(self.port), 3)
                resp = await within(client.request("GET", path), 3)
            except TimeoutError:
                attempt.outcome = "timeout"
            except CONNECTION_ERRORS as e:
                attempt.outcome, attempt.detail = "connection", repr(e)
            except (ValueError, IndexError, asyncio.LimitOverrunError) as e:
                attempt.outcome, attempt.detail = "garbled", repr(e)
            else:
                good = resp.status == 200 and resp.body == BODIES[path]
                attempt.outcome = "ok" if good else "bad"
                attempt.detail = f"{resp.status} {resp.body_size} bytes"
            attempt.end = time.monotonic()
            if attempt.outcome == "ok" and resp.get("connection") == "close":
                # as every HTTP client does: the server ends this connection, use a new one
                # (edgelb says so from the start of the shutdown delay)
                assert client is not None
                client.close()
                client = None
            if attempt.outcome != "ok":
                if client is not None:
                    client.close()
                client = None
                await asyncio.sleep(0.05)  # refused: do not spin
            elif path == "/":
                await asyncio.sleep(0.01)  # keep the 2 cores for the proxy
        if client is not None:
            client.close()


# -- long connections -----------------------------------------------------------------------


@dataclass
class Conversation:
    """A long connection that echoes: a message every 100 ms, each one must come back whole.
    `closed_at` is when the peer closed it (EOF or reset), `broken` any other failure."""

    name: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    echoed: list[float] = field(default_factory=list)  # when each echo came back
    closed_at: float = 0.0
    broken: str = ""

    async def run(self) -> None:
        n = 0
        while True:
            n += 1
            msg = b"%s message %d\n" % (self.name.encode(), n)
            try:
                self.writer.write(msg)
                got = await asyncio.wait_for(self.reader.readexactly(len(msg)), 1.0)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    self.broken = f"echo cut short: {e.partial!r} of {msg!r}"
                self.closed_at = time.monotonic()
                return
            except ConnectionError:
                self.closed_at = time.monotonic()
                return
            except TimeoutError:
                self.broken = f"no echo of message {n} within 1 s"
                return
            if got != msg:
                self.broken = f"echo {got!r} for {msg!r}"
                return
            self.echoed.append(time.monotonic())
            try:  # wait 100 ms, but notice a close at once (nothing else may arrive)
                extra = await asyncio.wait_for(self.reader.read(1), 0.1)
            except TimeoutError:
                continue
            except ConnectionError:
                self.closed_at = time.monotonic()
                return
            if extra:
                self.broken = f"unexpected bytes {extra!r}"
            else:
                self.closed_at = time.monotonic()
            return

    def close(self) -> None:
        self.writer.close()


async def open_websocket(port: int) -> Conversation:
    client = await Client.open(port)
    await client.send(
        b"GET /ws HTTP/1.1\r\nHost: drill.local\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    )
    head = await within(client.read_head())
    assert head.status == 101, head.head
    return Conversation("ws", client.reader, client.writer)


async def echo_server() -> asyncio.AbstractServer:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, HOST, 0)


# -- the drill ------------------------------------------------------------------------------


async def readyz(admin: int) -> int:
    return (await within(fetch(admin, target="/readyz"), 2)).status


async def test_sigterm_under_load_drains_everything_started_and_exits_in_time(backend, tmp_path):
    long_started = asyncio.Event()

    async def long_handler(call: Call) -> None:
        await call.read_body()
        long_started.set()
        await asyncio.sleep(LONG)
        await call.respond(200, LONG_BODY)

    handler = by_path(
        {"/slow": slow(SLOW, SLOW_BODY), "/long": long_handler, "/ws": upgrade_echo()},
        default=ok(FAST_BODY),
    )
    backends = [await backend(f"b{i}", handler) for i in range(3)]
    echo = await echo_server()
    echo_port = echo.sockets[0].getsockname()[1]
    admin, web, tcp = free_port(), free_port(), free_port()
    path = tmp_path / "edgelb.yaml"
    path.write_text(drill_config(admin, web, tcp, [b.port for b in backends], echo_port))
    try:
        edgelb = await Edgelb.start(str(path))
    except BaseException:
        echo.close()
        raise
    load = Load(web)
    conversations: list[Conversation] = []
    talks: list[asyncio.Task] = []
    try:
        assert await readyz(admin) == 200, edgelb.stderr()

        # steady state: keep-alive load, a tunnel and a TCP connection, all working
        load.start(["/", "/", "/slow", "/slow", "/slow"])
        ws = await open_websocket(web)
        reader, writer = await within(asyncio.open_connection(HOST, tcp))
        conversations = [ws, Conversation("tcp", reader, writer)]
        talks = [asyncio.ensure_future(c.run()) for c in conversations]
        await within(_until(lambda: load.ok_count("/slow") >= 6 and load.ok_count("/") >= 10))
        assert all(len(c.echoed) >= 1 for c in conversations), [c.broken for c in conversations]

        # a request that will still be in flight when the listeners close
        long_client = await Client.open(web)
        long_start = time.monotonic()
        long_request = asyncio.ensure_future(long_client.request("GET", "/long"))
        await within(long_started.wait())

        edgelb.proc.send_signal(signal.SIGTERM)
        t = time.monotonic()

        # /readyz turns 503 at once
        while (code := await readyz(admin)) == 200:
            assert time.monotonic() - t < 0.3, "/readyz still 200 0.3 s after SIGTERM"
        assert code == 503
        unready_after = time.monotonic() - t

        # new connections are still accepted (and served) during the delay
        try:
            probe = await within(fetch(web, target="/"), 2)
        except OSError as e:
            raise AssertionError(
                f"a new connection {time.monotonic() - t:.2f}s after SIGTERM, within the "
                f"{DELAY}s delay, failed: {e!r}"
            ) from None
        probe_done = time.monotonic() - t
        assert probe.status == 200 and probe.body == FAST_BODY
        assert probe_done < DELAY, f"the probe took until {probe_done:.2f}s after SIGTERM"

        try:
            code = await within(edgelb.proc.wait(), DELAY + GRACE + 5)
        except TimeoutError:
            raise AssertionError(
                f"edgelb still runs {DELAY + GRACE + 5:g}s after SIGTERM:\n{edgelb.stderr()}"
            ) from None
        exited_after = time.monotonic() - t
        await within(asyncio.gather(*talks), 3)
        await load.stop()
        try:
            long_resp = await within(long_request, 1)
        except CONNECTION_ERRORS as e:
            raise AssertionError(
                f"GET /long, in flight when the listeners closed, failed: {e!r}"
            ) from None
        long_client.close()
    finally:
        for task in talks:
            task.cancel()
        load.stopping = True
        for task in load.tasks:
            task.cancel()
        for c in conversations:
            c.close()
        await edgelb.close()
        echo.close()

    log = edgelb.stderr()
    assert code == 0, f"edgelb exited with {code}:\n{log}"
    assert exited_after <= DELAY + GRACE + 1.0, f"exited {exited_after:.2f}s after SIGTERM"
    assert unready_after < 0.3

    # the request in flight across the listener close finished whole
    assert long_start < t
    assert long_resp.status == 200 and long_resp.body == LONG_BODY

    # every request that started before SIGTERM (or during the delay) completed successfully
    listeners_closed = t + DELAY
    before = [a for a in load.attempts if a.start < t]
    during = [a for a in load.attempts if t <= a.start < listeners_closed - MARGIN]
    after = [a for a in load.attempts if a.start > listeners_closed + MARGIN]
    in_flight = [a for a in before if a.end > t]
    assert len(in_flight) >= 2, "the drill needs requests in flight at SIGTERM"
    failed = [a for a in before + during if a.outcome != "ok"]
    assert not failed, f"started before the listeners closed, failed: {show(failed, t)}"
    assert during, "no request was made during the delay"

    # after the listeners closed: only connection errors, never a garbled or wrong answer
    assert after, "the load stopped before the listeners closed"
    wrong = [a for a in load.attempts if a.outcome not in ("ok", "connection")]
    assert not wrong, f"neither a success nor a connection error: {show(wrong, t)}"
    served_late = [a for a in after if a.outcome == "ok"]
    assert not served_late, f"served after the listeners closed: {show(served_late, t)}"

    # the tunnel and the TCP connection worked through the grace period, then were closed
    cut = t + DELAY + GRACE
    for c in conversations:
        assert not c.broken, f"{c.name}: {c.broken}"
        assert c.closed_at, f"{c.name} was never closed"
        assert c.closed_at >= cut - 0.1, (
            f"{c.name} closed {c.closed_at - t:.2f}s after SIGTERM, before delay + grace"
        )
        assert c.closed_at <= cut + 0.6, f"{c.name} closed {c.closed_at - t:.2f}s after SIGTERM"
        last = max(c.echoed)
        assert last >= cut - 0.25, f"{c.name}: last echo {last - t:.2f}s after SIGTERM"
        assert len([e for e in c.echoed if e > t]) >= (DELAY + GRACE) / 0.1 * 0.6, (
            f"{c.name}: too few echoes after SIGTERM"
        )


def show(attempts: list[Attempt], t: float) -> str:
    """The first few attempts, timed from SIGTERM, for a failure message."""
    return "; ".join(
        f"GET {a.path} {a.start - t:+.3f}s..{a.end - t:+.3f}s {a.outcome} {a.detail}"
        for a in attempts[:5]
    ) + (f" (and {len(attempts) - 5} more)" if len(attempts) > 5 else "")


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)
