"""The drills' load generator and backends (bench/drill_*.py), straight to a backend, no proxy.

The counts on the two sides of the socket must agree, and each backend mode must show up at
the client as the error a proxy would have to deal with.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from drill_backends import DrillBackend, DrillSpec, parse_spec  # noqa: E402
from drill_load import LoadGen, percentile  # noqa: E402

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(20)]


async def settle(backend: DrillBackend) -> None:
    """Until the backend holds no request (closed connections are seen a moment later)."""
    for _ in range(100):
        if backend.concurrency == 0 and backend.busy == 0:
            return
        await asyncio.sleep(0.01)


def test_percentile_and_spec_parsing() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 50) is None
    assert parse_spec("b1:8:0.005") == DrillSpec("b1", 8, 0.005)
    with pytest.raises(SystemExit, match="NAME:WORKERS:SERVICE_SECONDS"):
        parse_spec("b1:8")


async def test_over_capacity_every_request_counted_on_both_sides() -> None:
    # 4 workers x 10 ms = 400 req/s; 600 req/s for 0.5 s builds a queue in the backend
    backend = DrillBackend(DrillSpec("x", 4, 0.010))
    await backend.start()
    try:
        gen = LoadGen("127.0.0.1", backend.port, 600, [0.5], timeout=2.0, preconnect=8)
        res = await gen.run()
        await settle(backend)
    finally:
        await backend.close()
    ph = res["phases"][0]
    assert res["due"] == ph["due"] == 300
    assert ph["sent"] == ph["ok"] == 300
    assert ph["errors"] == ph["unsent"] == ph["timeouts"] == 0
    assert backend.requests == backend.ok == 300
    assert backend.concurrency == 0
    # the queue: more requests held at once than workers, each waited its turn
    assert 4 < backend.max_concurrency <= 300
    assert ph["latency_ok_ms"]["p50"] >= 10.0
    assert ph["latency_ok_ms"]["max"] > 50.0
    assert res["offered_rate"] == 600.0
    assert res["connections_opened"] == res["max_open"] >= backend.max_concurrency


async def test_modes_show_at_the_client_as_500_reset_and_timeout() -> None:
    backend = DrillBackend(DrillSpec("x", 8, 0.005))
    await backend.start()
    port = backend.port
    modes = {1: "ok", 2: "error", 3: "kill", 4: "hang"}
    switches: list[asyncio.Task[None]] = []
    done = []

    def on_phase(n: int, name: str) -> None:
        switches.append(asyncio.get_running_loop().create_task(backend.set_mode(modes[n])))

    gen = LoadGen("127.0.0.1", port, 200, [0.4] * 4, timeout=0.3, preconnect=4,
                  phase_names=list(modes.values()), on_phase=on_phase)
    try:
        res = await gen.run()
        await asyncio.gather(*switches)
        held_in_hang = backend.held
        await backend.set_mode("ok")  # resets the held connections: nothing is left held
        await settle(backend)
        done.append(backend.concurrency)
        assert backend.port == port  # the port came back after the kill
    finally:
        await backend.close()
    ok, err, kill, hang = res["phases"]
    for ph in res["phases"]:
        assert ph["due"] == ph["sent"] + ph["unsent"] == 80
    # the switch runs just after the phase's first request went out, hence the slack of 2
    assert ok["ok"] >= 78 and ok["errors"] <= 2
    assert err["status"].get("500", 0) >= 78
    assert sum(kill["conn_errors"].values()) >= 78
    assert hang["timeouts"] >= 78
    # both sides agree
    total = res["phases"]
    assert sum(p["ok"] for p in total) == backend.ok
    assert sum(p["status"].get("500", 0) for p in total) == backend.errors
    assert sum(p["timeouts"] for p in total) == held_in_hang
    assert backend.requests == backend.ok + held_in_hang  # error mode does not count these
    assert done == [0]
    # nothing answered in the kill phase came from the backend: every failure was refused or
    # reset, never a late 200
    assert kill["ok"] <= 2 and set(kill["conn_errors"]) <= {"refused", "reset", "closed"}


async def test_the_auth_attacker_sends_back_to_back_and_counts_what_came_back() -> None:
    """bench/drill_auth.py's attacker against a server answering 401 (every 7th with
    `connection: close`): both sides count the same requests, every password differs."""
    from drill_auth import Attacker

    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                seen.append(head.split(b"Authorization: Basic ", 1)[1].split(b"\r\n", 1)[0])
                close = len(seen) % 7 == 0
                writer.write(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n"
                             + (b"connection: close\r\n" if close else b"") + b"\r\n")
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        res = await Attacker(port, 4, 0.4, grace=2.0).run()
    finally:
        server.close()
        await server.wait_closed()
    assert res["sent"] == res["answered"] == len(seen) > 20
    assert res["unanswered"] == 0 and res["errors"] == {}
    assert res["status"] == {"401": len(seen)}
    assert len(set(seen)) == len(seen)  # a new password every time: no cache can answer
