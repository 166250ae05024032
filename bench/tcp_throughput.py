"""Bulk TCP throughput through edgelb's tcp mode, compared with a direct connection (and with
HAProxy `mode tcp` + `option splice-auto` when `haproxy` is on PATH). Not a test: run it by hand.

    python bench/tcp_throughput.py --total 1G --conns 4 --rounds 3

A source process sends `total / conns` bytes on each connection and closes; the client reads to
EOF. Each path runs `rounds` times, alternating; the best round of each is reported with its
ratio to the direct path. Every party is its own process, as in a real deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BLOCK = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# -- the source: sends a size asked for in an 8-byte header, then closes --------------------


def serve(port: int) -> None:
    payload = memoryview(os.urandom(BLOCK))
    lsock = socket.create_server(("127.0.0.1", port), backlog=256)

    def one(sock: socket.socket) -> None:
        with sock:
            header = b""
            while len(header) < 8:
                part = sock.recv(8 - len(header))
                if not part:
                    return
                header += part
            left = int.from_bytes(header, "big")
            while left:
                left -= sock.send(payload[: min(left, BLOCK)])

    while True:
        sock, _ = lsock.accept()
        threading.Thread(target=one, args=(sock,), daemon=True).start()


# -- the proxy under test ------------------------------------------------------------------


def proxy(port: int, backend_port: int, splice: bool) -> None:
    import uvloop

    from edgelb.pool import ServiceState
    from edgelb.tcp.listener import TcpListener
    from watchers.model import Address, Backend, Service

    async def main() -> None:
        service = ServiceState(
            Service("bench", mode="tcp", backends=(Backend("127.0.0.1", backend_port),))
        )
        listener = TcpListener(Address("127.0.0.1", port), service, splice=splice)
        await listener.start()
        await asyncio.Event().wait()

    uvloop.run(main())


HAPROXY_CFG = """
global
    maxconn 1000
    tune.bufsize 262144
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    option splice-auto
listen bench
    bind 127.0.0.1:{port}
    server s1 127.0.0.1:{backend}
"""


# -- the client ----------------------------------------------------------------------------


def fetch(port: int, size: int) -> int:
    buf = bytearray(BLOCK)
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(size.to_bytes(8, "big"))
        while True:
            n = sock.recv_into(buf)
            if not n:
                break
            got += n
    return got


def measure(port: int, total: int, conns: int) -> float:
    """Bytes per second for `total` bytes over `conns` parallel connections."""
    each = total // conns
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(fetch(port, each))) for _ in range(conns)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if sum(results) != each * conns:
        raise RuntimeError(f"short transfer on port {port}: {sum(results)} of {each * conns}")
    return each * conns / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total", default="1G", help="bytes per round, e.g. 512M, 1G")
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("--role", choices=["serve", "proxy", "proxy-copy"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "serve":
        serve(args.port)
        return
    if args.role in ("proxy", "proxy-copy"):
        proxy(args.port, args.backend, splice=args.role == "proxy")
        return

    total = parse_size(args.total)
    me = [sys.executable, __file__]
    procs: list[subprocess.Popen[bytes]] = []
    tmp = tempfile.TemporaryDirectory()
    try:
        backend = free_port()
        procs.append(subprocess.Popen([*me, "--role", "serve", "--port", str(backend)]))
        paths: dict[str, int] = {"direct": backend}
        for role, name in (("proxy", "edgelb splice"), ("proxy-copy", "edgelb copy")):
            port = free_port()
            cmd = [*me, "--role", role, "--port", str(port), "--backend", str(backend)]
            procs.append(subprocess.Popen(cmd))
            paths[name] = port
        if not args.no_haproxy and shutil.which("haproxy"):
            port = free_port()
            cfg = Path(tmp.name, "haproxy.cfg")
            cfg.write_text(HAPROXY_CFG.format(port=port, backend=backend))
            procs.append(subprocess.Popen(["haproxy", "-f", str(cfg)]))
            paths["haproxy splice"] = port
        for port in paths.values():
            wait_port(port)
        best: dict[str, float] = dict.fromkeys(paths, 0.0)
        for _ in range(args.rounds):
            for name, port in paths.items():
                best[name] = max(best[name], measure(port, total, args.conns))
        print(
            f"{total / (1 << 20):.0f} MiB per round, {args.conns} connections, "
            f"best of {args.rounds}"
        )
        for name, rate in best.items():
            gib = rate / (1 << 30)
            line = f"  {name:15s} {gib:6.2f} GiB/s  {rate / best['direct']:5.2f}x direct"
            if "haproxy splice" in best and name.startswith("edgelb"):
                line += f"  {rate / best['haproxy splice']:5.2f}x haproxy"
            print(line)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        tmp.cleanup()


if __name__ == "__main__":
    main()
