"""HTTP/2 side by side: h2load against edgelb and HAProxy, in front of the same two nginx
backends over HTTP/1.1 keep-alive. Both speak h2c (HTTP/2 in the clear, so TLS costs do not
hide the HTTP/2 ones) to clients, or with `--tls` HTTP/2 over TLS chosen by ALPN (HAProxy
`alpn h2`, edgelb's TLS port with its default `http2: true`), the same self-signed
certificate on both. Prints requests/s and proxy CPU per request; the ratio of each is what
counts (this machine is shared: absolute numbers are noisy).

    .venv/bin/python bench/h2_bench.py [--tls] [seconds] [rounds]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import free_port, render

HAPROXY = """global
    nbthread 1
defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    http-reuse always
frontend fe
    bind 127.0.0.1:{port} {bind}
    default_backend be
backend be
    balance leastconn
    server a 127.0.0.1:{a}
    server b 127.0.0.1:{b}
"""
EDGELB = """admin: {{listen: 127.0.0.1:{admin}}}
defaults: {{idle_timeout: 300s, header_timeout: 300s}}
services:
  - name: web
    listen: 127.0.0.1:{port}
    {tls}
    backends: [{{address: 127.0.0.1:{a}}}, {{address: 127.0.0.1:{b}}}]
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 10.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


SCHEME = "http"


def h2load(port: int, seconds: int) -> float:
    out = subprocess.run(["h2load", "-c", "8", "-m", "16", "-t", "1", "-D", str(seconds),
                          f"{SCHEME}://127.0.0.1:{port}/"], capture_output=True, text=True,
                         check=True).stdout
    if SCHEME == "https" and "h2" not in re.findall(r"Application protocol: (\S+)", out):
        raise RuntimeError(f"h2load did not negotiate h2:\n{out}")
    done = re.search(r"(\d+) succeeded, (\d+) failed", out)
    if done is None or done.group(2) != "0":
        raise RuntimeError(f"h2load failed:\n{out}")
    return float(re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]


def measure(pid: int, port: int, seconds: int) -> tuple[float, float]:
    h2load(port, 1)  # warm up
    c0 = cpu_seconds(pid)
    t0 = time.monotonic()
    rps = h2load(port, seconds)
    cpu = cpu_seconds(pid) - c0
    n = rps * (time.monotonic() - t0)
    return rps, cpu / n * 1e6


def self_signed(d: Path) -> tuple[Path, Path, Path]:
    """(certificate, key, both in one file for HAProxy) for localhost and 127.0.0.1, made
    with openssl."""
    cert, key, both = d / "c.pem", d / "k.pem", d / "both.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    return cert, key, both


def main() -> None:
    global SCHEME
    args = sys.argv[1:]
    tls = "--tls" in args
    args = [a for a in args if a != "--tls"]
    seconds = int(args[0]) if len(args) > 0 else 5
    rounds = int(args[1]) if len(args) > 1 else 3
    SCHEME = "https" if tls else "http"
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ports = {}
        try:
            for name in ("a", "b"):
                ports[name] = free_port()
                nd = d / name
                (nd / "www").mkdir(parents=True)
                conf = render("backend.nginx.conf", nd / "nginx.conf", user_line="",
                              nofile=4096, dir=nd, worker_connections=1024,
                              port=ports[name], www=nd / "www", name=name)
                procs.append(subprocess.Popen(["nginx", "-c", str(conf), "-g",
                                               "daemon off;"], stderr=subprocess.DEVNULL))
            hp, ep = free_port(), free_port()
            if tls:
                cert, key, both = self_signed(d)
                bind = f"ssl crt {both} alpn h2,http/1.1"
                tls_line = f"tls: {{cert: {cert}, key: {key}}}"
            else:
                bind, tls_line = "proto h2", "h2c: true"
            (d / "h.cfg").write_text(HAPROXY.format(port=hp, bind=bind, **ports))
            (d / "e.yaml").write_text(EDGELB.format(port=ep, admin=free_port(), tls=tls_line,
                                                    **ports))
            haproxy = subprocess.Popen(["haproxy", "-f", str(d / "h.cfg")])
            edgelb = subprocess.Popen([sys.executable, "-m", "edgelb", "run", "-c",
                                       str(d / "e.yaml")], stderr=subprocess.DEVNULL)
            procs += [haproxy, edgelb]
            for p in (*ports.values(), hp, ep):
                wait_port(p)
            rows = []
            for _ in range(rounds):
                e = measure(edgelb.pid, ep, seconds)
                h = measure(haproxy.pid, hp, seconds)
                rows.append((e, h))
                print(f"edgelb {e[0]:8.0f} req/s {e[1]:6.1f} us CPU/req | haproxy {h[0]:8.0f} "
                      f"req/s {h[1]:6.1f} us CPU/req | ratio {e[0] / h[0]:.2f}", flush=True)
            rps = sorted(e[0] / h[0] for e, h in rows)[len(rows) // 2]
            cpu = sorted(h[1] / e[1] for e, h in rows)[len(rows) // 2]
            mode = "TLS, ALPN h2" if tls else "h2c"
            print(f"{mode} median: edgelb/haproxy requests/s {rps:.2f}, CPU per request "
                  f"(haproxy/edgelb) {cpu:.2f}")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)


if __name__ == "__main__":
    main()
