"""Capacity-limited HTTP backends for the "balance" benchmark scenario.

    .venv/bin/python bench/capacity_backends.py a:8:0.010 b:2:0.010 c:8:0.060

Each argument is NAME:CAPACITY:SERVICE_SECONDS. The backends are edgelb's demo backends
(`edgelb.ops.demo`): CAPACITY requests are served at once, each holding a worker for
SERVICE_SECONDS; more wait in a FIFO queue inside the backend. All of them run in one uvloop
event loop on 127.0.0.1, which costs little CPU at a thousand requests a second.

Prints one line, `PORTS a=41001 b=41002 c=41003`, once every backend listens, then serves
until SIGTERM or SIGINT. Each line `stats` read on stdin is answered with
`STATS a=<served> b=<served> c=<served>`: requests each backend has served so far (health
checks excluded), so the benchmark can tell how a proxy shared the load.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from bench import backends_main  # this script's folder is on sys.path when it runs
from edgelb.ops.demo import BackendSpec, DemoBackend, start_demo_backends, stop_demo_backends


def parse_spec(text: str) -> BackendSpec:
    """'a:8:0.010' -> BackendSpec('a', 8, 0.010); errors name the argument and the format."""
    parts = text.split(":")
    try:
        if len(parts) != 3 or not parts[0]:
            raise ValueError
        spec = BackendSpec(parts[0], int(parts[1]), float(parts[2]))
    except ValueError:
        raise SystemExit(f"{text!r}: expected NAME:CAPACITY:SERVICE_SECONDS, e.g. a:8:0.010"
                         ) from None
    if spec.capacity < 1 or spec.service_time < 0:
        raise SystemExit(f"{text!r}: capacity must be >= 1 and the service time >= 0")
    return spec


def _stats_line(backends: list[DemoBackend]) -> str:
    return "STATS " + " ".join(f"{b.name}={b.served}" for b in backends)


def _answer_stats(backends: list[DemoBackend]) -> None:
    """Blocking stdin reader (a daemon thread): reading ints across threads is safe here."""
    for line in sys.stdin:
        if line.strip() == "stats":
            print(_stats_line(backends), flush=True)
    # stdin closed: keep serving until killed


async def serve(specs: list[BackendSpec]) -> None:
    backends = await start_demo_backends(specs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("PORTS " + " ".join(f"{b.name}={b.port}" for b in backends), flush=True)
    threading.Thread(target=_answer_stats, args=(backends,), daemon=True).start()
    try:
        await stop.wait()
    finally:
        await stop_demo_backends(backends)


def main(argv: list[str]) -> int:
    return backends_main(argv, __doc__, parse_spec, serve)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
