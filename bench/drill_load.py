"""Open-loop HTTP load at a fixed arrival rate, for bench/drills.py (uvloop + httptools).

    .venv/bin/python bench/drill_load.py --port 8080 --rate 3200 --phases 10,10,10

Request i is due at start + i / rate whatever happened to the earlier ones (an open loop: a
slow proxy does not slow the offered load down). A due request goes out on an idle keep-alive
connection, else on a new one (up to --conns), else it waits in the generator's backlog for a
connection to come free; a request still in the backlog --timeout after it was due is counted
`unsent` (the generator's shortfall, not the proxy's). Latency runs from the moment the request
was written to the moment its response is complete; `lag` is how late it was written against
its due time. A request with no complete response --timeout after it was written is a client
timeout (its connection is dropped); a connection closed or reset under a request is a
connection error.

Requests belong to the phase in which they were due. `PHASE n` is printed (stdout) when phase n
starts, so a driver can break backends on cue; at the end one `RESULT {json}` line follows with
per phase counts and latency percentiles and the rate actually offered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import httptools

from bench import raise_nofile  # this script's folder is on sys.path when it runs

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
TICK = 0.001  # the pacer wakes at most this often and sends every request due by then
_now = time.perf_counter  # uvloop's loop.time() moves in whole milliseconds


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence; None when it is empty."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def summary_ms(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max in milliseconds of a list of seconds (sorted in place)."""
    values.sort()
    out: dict[str, float | None] = {}
    for p in PERCENTILES:
        v = percentile(values, p)
        out[f"p{p:g}"] = None if v is None else round(v * 1000, 3)
    out["max"] = round(values[-1] * 1000, 3) if values else None
    return out


class Phase:
    """Counters of the requests due in one phase."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name = name
        self.seconds = seconds
        self.due = 0
        self.sent = 0
        self.unsent = 0  # never written: no connection came free in time
        self.status: dict[int, int] = {}
        self.conn_errors: dict[str, int] = {}  # refused / reset / closed / parse
        self.timeouts = 0
        self.lat_ok: list[float] = []  # 2xx, seconds
        self.lat_all: list[float] = []  # every sent request; errors at the time they failed
        self.max_by_status: dict[int, float] = {}
        self.lag: list[float] = []

    def result(self) -> dict[str, Any]:
        ok = sum(n for code, n in self.status.items() if 200 <= code < 300)
        non2xx = sum(n for code, n in self.status.items() if not 200 <= code < 300)
        errors = non2xx + sum(self.conn_errors.values()) + self.timeouts
        return {
            "name": self.name, "seconds": self.seconds, "due": self.due, "sent": self.sent,
            "unsent": self.unsent, "ok": ok, "non2xx": non2xx,
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "conn_errors": dict(sorted(self.conn_errors.items())), "timeouts": self.timeouts,
            "errors": errors, "latency_ok_ms": summary_ms(self.lat_ok),
            "latency_all_ms": summary_ms(self.lat_all),
            "max_ms_by_status": {str(k): round(v * 1000, 3)
                                 for k, v in sorted(self.max_by_status.items())},
            "lag_ms": summary_ms(self.lag),
        }


class _Conn(asyncio.Protocol):
    """One keep-alive client connection carrying at most one request at a time."""

    def __init__(self, gen: LoadGen) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.phase: Phase | None = None  # of the request in flight; None when idle
        self.sent_at = 0.0
        self.status = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.gen._connected(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.gen._failed(self, "parse")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.phase is not None:
            self.gen._failed(self, "reset" if isinstance(exc, ConnectionResetError) else "closed")
        self.gen._lost(self)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self.gen._answered(self, self.status, self.parser.should_keep_alive())

    def send(self, phase: Phase, now: float) -> None:
        assert self.transport is not None
        self.phase = phase
        self.sent_at = now
        self.status = 0
        self.transport.write(self.gen.request)


class LoadGen:
    """The generator; `await run()` returns the per phase results."""

    def __init__(self, host: str, port: int, rate: float, phases: Sequence[float], *,
                 path: str = "/", conns: int = 2000, timeout: float = 2.0,
                 preconnect: int = 32, phase_names: Sequence[str] | None = None,
                 on_phase: Callable[[int, str], None] | None = None) -> None:
        if rate <= 0 or not phases or any(s <= 0 for s in phases):
            raise ValueError("rate and every phase length must be above 0")
        self.host, self.port, self.rate, self.timeout = host, port, rate, timeout
        self.max_conns = max(1, conns)
        self.preconnect = min(preconnect, self.max_conns)
        names = list(phase_names or [f"phase{i + 1}" for i in range(len(phases))])
        self.phases = [Phase(n, s) for n, s in zip(names, phases, strict=True)]
        self.on_phase = on_phase
        self.request = f"GET {path} HTTP/1.1\r\nHost: drill\r\n\r\n".encode()
        self.idle: list[_Conn] = []
        self.busy: set[_Conn] = set()
        self.backlog: deque[tuple[float, Phase]] = deque()  # (due, phase) waiting for a conn
        self.open = 0  # connected or connecting
        self.max_open = 0
        self.opened = 0
        self.connect_failures = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.start = 0.0
        # per second since the start: requests written, 2xx and errors completed
        slots = math.ceil(sum(phases) + timeout) + 2
        self.timeline: dict[str, list[int]] = {k: [0] * slots for k in ("sent", "ok", "err")}
        self._tasks: set[asyncio.Task[None]] = set()

    # connections

    def _open(self) -> None:
        assert self.loop is not None
        self.open += 1
        self.opened += 1
        self.max_open = max(self.max_open, self.open)
        task = self.loop.create_task(self._connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        assert self.loop is not None
        try:
            await asyncio.wait_for(
                self.loop.create_connection(lambda: _Conn(self), self.host, self.port),
                self.timeout)
        except OSError as exc:  # TimeoutError is one
            self.open -= 1
            self.connect_failures += 1
            if self.backlog:  # the request that asked for this connection fails with it
                due, phase = self.backlog.popleft()
                phase.sent += 1
                self._mark("sent")
                self._mark("err")
                kind = "refused" if isinstance(exc, ConnectionRefusedError) else "connect"
                phase.conn_errors[kind] = phase.conn_errors.get(kind, 0) + 1
                phase.lat_all.append(_now() - due)
            self._refill()

    def _connected(self, conn: _Conn) -> None:
        self._next_for(conn)

    def _next_for(self, conn: _Conn) -> None:
        """A connection is free: give it the oldest waiting request, else park it idle."""
        assert self.loop is not None
        if self.backlog:
            due, phase = self.backlog.popleft()
            now = _now()
            phase.lag.append(now - due)
            phase.sent += 1
            self._mark("sent", now)
            self.busy.add(conn)
            conn.send(phase, now)
        else:
            self.idle.append(conn)

    def _lost(self, conn: _Conn) -> None:
        self.open -= 1
        self.busy.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        self._refill()

    # outcomes

    def _answered(self, conn: _Conn, status: int, keep_alive: bool) -> None:
        assert self.loop is not None and conn.phase is not None
        phase, took = conn.phase, _now() - conn.sent_at
        conn.phase = None
        self.busy.discard(conn)
        phase.status[status] = phase.status.get(status, 0) + 1
        self._mark("ok" if 200 <= status < 300 else "err")
        phase.lat_all.append(took)
        if 200 <= status < 300:
            phase.lat_ok.append(took)
        if took > phase.max_by_status.get(status, -1.0):
            phase.max_by_status[status] = took
        if keep_alive:
            self._next_for(conn)
        else:
            conn.closed = True  # connection_lost follows and opens a replacement if needed
            assert conn.transport is not None
            conn.transport.close()

    def _failed(self, conn: _Conn, kind: str) -> None:
        assert self.loop is not None
        if conn.phase is not None:
            phase = conn.phase
            conn.phase = None
            phase.conn_errors[kind] = phase.conn_errors.get(kind, 0) + 1
            phase.lat_all.append(_now() - conn.sent_at)
            self._mark("err")
        self.busy.discard(conn)
        if conn.transport is not None and not conn.closed:
            conn.closed = True
            conn.transport.abort()  # connection_lost follows (and _lost)

    def _refill(self) -> None:
        """Open connections for the requests waiting (connecting = open - busy - idle)."""
        if self.loop is None or self.loop.is_closed():
            return
        while len(self.backlog) > self.open - len(self.busy) - len(self.idle) \
                and self.open < self.max_conns:
            self._open()

    def _mark(self, series: str, now: float | None = None) -> None:
        slot = int((_now() if now is None else now) - self.start)
        counts = self.timeline[series]
        if 0 <= slot < len(counts):
            counts[slot] += 1

    # the schedule

    def _dispatch(self, due: float, phase: Phase) -> None:
        assert self.loop is not None
        phase.due += 1
        while self.idle:
            conn = self.idle.pop()  # the most recently used: the fewest connections stay warm
            if conn.closed:
                continue
            now = _now()
            phase.lag.append(now - due)
            phase.sent += 1
            self._mark("sent", now)
            self.busy.add(conn)
            conn.send(phase, now)
            return
        self.backlog.append((due, phase))
        self._refill()

    async def _sweep(self) -> None:
        """Every 20 ms: time out requests in flight and expire the backlog."""
        assert self.loop is not None
        while True:
            await asyncio.sleep(0.02)
            now = _now()
            for conn in [c for c in self.busy if now - c.sent_at >= self.timeout]:
                phase = conn.phase
                if phase is None:
                    continue
                conn.phase = None
                phase.timeouts += 1
                self._mark("err", now)
                phase.lat_all.append(now - conn.sent_at)
                self._failed(conn, "timeout")
            while self.backlog and now - self.backlog[0][0] >= self.timeout:
                _, phase = self.backlog.popleft()
                phase.unsent += 1

    async def run(self) -> dict[str, Any]:
        self.loop = loop = asyncio.get_running_loop()
        for _ in range(self.preconnect):
            self._open()
        deadline = _now() + 5.0
        while len(self.idle) < self.preconnect and _now() < deadline and \
                self.open == self.preconnect:
            await asyncio.sleep(0.01)
        sweeper = loop.create_task(self._sweep())
        self.start = start = _now()
        try:
            # phase boundaries as request numbers: float sums of seconds would drift
            bounds, t = [], 0.0
            for ph in self.phases:
                t += ph.seconds
                bounds.append(round(t * self.rate))
            total = bounds[-1]
            i, current = 0, -1
            while i < total:
                now = _now()
                due_count = min(total, int((now - start) * self.rate) + 1)
                while i < due_count:
                    due = start + i / self.rate
                    idx = current if current >= 0 else 0
                    while i >= bounds[idx]:
                        idx += 1
                    if idx != current:
                        current = idx
                        if self.on_phase:
                            self.on_phase(idx + 1, self.phases[idx].name)
                    self._dispatch(due, self.phases[idx])
                    i += 1
                delay = start + i / self.rate - _now()
                await asyncio.sleep(max(delay, TICK))
            offered_for = _now() - start
            # let the last requests finish (each is bounded by the timeout)
            end = _now() + self.timeout + 0.2
            while (self.busy or self.backlog) and _now() < end:
                await asyncio.sleep(0.02)
        finally:
            sweeper.cancel()
            for task in list(self._tasks):
                task.cancel()
            for conn in [*self.busy, *self.idle]:
                if conn.transport is not None:
                    conn.transport.abort()
        for _, phase in self.backlog:
            phase.unsent += 1
        self.backlog.clear()
        sent = sum(p.sent for p in self.phases)
        due = sum(p.due for p in self.phases)
        seconds = sum(p.seconds for p in self.phases)
        whole = math.floor(seconds)  # a partial last second would read low
        in_window = sum(self.timeline["sent"][:whole]) if whole else sent
        return {
            "target_rate": self.rate, "seconds": seconds, "due": due, "sent": sent,
            # requests written in the whole seconds of the schedule, per second
            "offered_rate": round(in_window / (whole or seconds), 1),
            "timeline": self.timeline,
            "schedule_seconds": round(offered_for, 3),
            "timeout_s": self.timeout, "max_conns": self.max_conns,
            "connections_opened": self.opened, "max_open": self.max_open,
            "connect_failures": self.connect_failures,
            "cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 2),
            "phases": [p.result() for p in self.phases],
        }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/")
    ap.add_argument("--rate", type=float, required=True, help="requests per second")
    ap.add_argument("--phases", default="10", help="seconds per phase, e.g. 10,10,10")
    ap.add_argument("--names", default="", help="phase names, e.g. before,during,after")
    ap.add_argument("--conns", type=int, default=2000, help="most connections open at once")
    ap.add_argument("--timeout", type=float, default=2.0, help="client timeout, seconds")
    ap.add_argument("--preconnect", type=int, default=32)
    args = ap.parse_args(argv)
    try:
        phases = [float(x) for x in args.phases.split(",")]
    except ValueError:
        ap.error(f"--phases {args.phases!r}: expected seconds separated by commas, e.g. 10,10,10")
    names = [x for x in args.names.split(",") if x] or None
    if names is not None and len(names) != len(phases):
        ap.error(f"--names has {len(names)} names for {len(phases)} phases")
    nofile = raise_nofile()
    conns = min(args.conns, max(16, nofile - 64))

    def on_phase(n: int, name: str) -> None:
        print(f"PHASE {n} {name}", flush=True)

    gen = LoadGen(args.host, args.port, args.rate, phases, path=args.path, conns=conns,
                  timeout=args.timeout, preconnect=args.preconnect, phase_names=names,
                  on_phase=on_phase)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(gen.run())
    else:
        result = uvloop.run(gen.run())
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
