"""How connections and requests spread over worker processes: SO_REUSEPORT (each worker binds
its own socket, the kernel hashes each new connection to one) against one listening socket
bound by the parent and inherited by every worker (each worker's uvloop accepts from it).

Each worker is a minimal uvloop HTTP server (a Protocol answering every request head with a
small 200, keep-alive), accepting with `loop.create_server` as edgelb's listeners do. wrk
drives it with few (-c4) and many (-c64) long-lived keep-alive connections; each worker
reports the connections it accepted and the requests it answered. Not a test: a measurement
for ARCHITECTURE.md (`python bench/accept_spread.py`; knobs: --workers, --duration, --rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"


class _Counting(asyncio.Protocol):
    counts = {"connections": 0, "requests": 0}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.tail = b""
        self.counts["connections"] += 1

    def data_received(self, data: bytes) -> None:
        data = self.tail + data
        n = data.count(b"\r\n\r\n")
        self.tail = data[data.rfind(b"\r\n\r\n") + 4:] if n else data[-3:]
        if n:
            self.counts["requests"] += n
            self.transport.write(RESPONSE * n)  # type: ignore[attr-defined]


def worker(fd: int | None, port: int) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if fd is not None:
            sock = socket.socket(fileno=fd)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(1024)
        sock.setblocking(False)
        server = await loop.create_server(_Counting, sock=sock)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        server.close()
        print(json.dumps(_Counting.counts), flush=True)

    uvloop.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(mode: str, workers: int, conns: int, duration: int) -> list[dict[str, int]]:
    port = free_port()
    shared = None
    fds: tuple[int, ...] = ()
    if mode == "shared":
        shared = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        shared.bind(("127.0.0.1", port))
        shared.listen(1024)
        fds = (shared.fileno(),)
    procs = []
    for _ in range(workers):
        args = [sys.executable, __file__, "--worker", "--port", str(port)]
        if shared is not None:
            args += ["--fd", str(shared.fileno())]
        p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, pass_fds=fds)
        procs.append(p)
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{duration}s", f"http://127.0.0.1:{port}/"],
                   check=True, capture_output=True)
    out = []
    for p in procs:
        p.send_signal(signal.SIGTERM)
        assert p.stdout is not None
        out.append(json.loads(p.stdout.readline()))
        p.wait()
    if shared is not None:
        shared.close()
    return out


def spread(counts: list[dict[str, int]], what: str) -> str:
    values = [c[what] for c in counts]
    total = sum(values) or 1
    return "/".join(f"{100 * v / total:.0f}" for v in values)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--fd", type=int)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--duration", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    if args.worker:
        worker(args.fd, args.port)
        return
    print("| mode | wrk -c | round | connections % per worker | requests % per worker |")
    print("|---|---|---|---|---|")
    summary: dict[tuple[str, int], list[float]] = {}
    for conns in (4, 64):
        for mode in ("reuseport", "shared"):
            for r in range(args.rounds):
                counts = run(mode, args.workers, conns, args.duration)
                reqs = [c["requests"] for c in counts]
                summary.setdefault((mode, conns), []).append(max(reqs) / (sum(reqs) or 1))
                print(f"| {mode} | {conns} | {r + 1} | {spread(counts, 'connections')} | "
                      f"{spread(counts, 'requests')} |", flush=True)
                time.sleep(0.2)
    print()
    print("| mode | wrk -c | busiest worker's share of requests, mean (worst) |")
    print("|---|---|---|")
    for (mode, conns), shares in summary.items():
        print(f"| {mode} | {conns} | {100 * sum(shares) / len(shares):.0f}% "
              f"({100 * max(shares):.0f}%) |")


if __name__ == "__main__":
    main()
