"""HTTPS side by side: edgelb and HAProxy terminating TLS in front of the same two nginx backends.

    .venv/bin/python bench/https_bench.py          # ~2.5 minutes on 2 cores

A self-signed EC P-256 certificate is made at run time with the `openssl` command into a private
temp dir; both proxies serve it (HAProxy from one PEM holding certificate and key). Scenarios,
each run for every proxy in turn, round after round (edgelb, haproxy, edgelb, ...):

keepalive: `wrk -t1 -c64 --latency https://...`: handshakes amortised, the cost of TLS records
  on top of the HTTP path;
close: `wrk -t1 -c16 -H "Connection: close" https://...`: one TLS handshake per request, so
  req/s = handshakes/s. wrk resumes its previous session on each reconnect (TLS 1.3 PSK with
  ECDHE: no certificate signature); HAProxy's stats socket is sampled during its runs to show
  the share resumed, and the sanity check records whether each proxy resumes at all.

Prints a markdown report (progress goes to stderr) and writes it with the raw figures to
bench/results/https-<UTC stamp>.{md,json} and https-latest.{md,json}; wrk's output per run goes
to bench/results/raw/. Every process started here leads its own process group and is stopped on
exit, Ctrl-C and SIGTERM included. Knobs: BENCH_DURATION, BENCH_ROUNDS, BENCH_WARMUP,
BENCH_RESULTS, BENCH_EDGELB_PYTHON as for bench.py, and HTTPS_PROXIES (edgelb,haproxy).
Needs wrk, haproxy, nginx and openssl on PATH (bench/run.sh installs the first three).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # bench.py: Lab (backends), ProcessSet, ports, templates, report helpers
from bench import Lab, ProcessSet, Server, Settings, free_port, log, median, render

PROXIES = ("edgelb", "haproxy")
CERT_NAME = "bench"  # the certificate's DNS name (edgelb requires one); 127.0.0.1 is an IP SAN
# (scenario, wrk connections, extra wrk arguments, title)
SCENARIOS = (
    ("keepalive", 64, (), "keep-alive (handshakes amortised)"),
    ("close", 16, ("-H", "Connection: close"), "new handshake per request (Connection: close)"),
)
SANITY_REQUESTS = 20


# ---------------------------------------------------------------- setup


def raise_nofile() -> None:
    """Lift the soft fd limit to the hard one (Lab sizes HAProxy's maxconn from it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def make_certificate(tmp: Path) -> dict[str, Path]:
    """A self-signed EC P-256 certificate for CERT_NAME and 127.0.0.1, valid 2 days.
    Returns the paths: cert, key, and pem (both in one file, for HAProxy)."""
    cert, key, pem = tmp / "tls.crt", tmp / "tls.key", tmp / "tls.pem"
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "2", "-subj", f"/CN={CERT_NAME}",
            "-addext", f"subjectAltName=DNS:{CERT_NAME},IP:127.0.0.1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise SystemExit(f"openssl could not make the test certificate: {out.stderr.strip()}")
    pem.write_text(cert.read_text() + key.read_text())
    key.chmod(0o600)
    pem.chmod(0o600)
    return {"cert": cert, "key": key, "pem": pem}


def client_context(cafile: Path) -> ssl.SSLContext:
    """Verifies the proxies against the run's own certificate (hostname 127.0.0.1)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def https_get(port: int, ctx: ssl.SSLContext, timeout: float = 2.0
              ) -> tuple[int, bytes, dict[str, str], dict[str, Any]]:
    """One GET / on a fresh TLS connection: status, body, headers, and what TLS negotiated."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ctx)
    try:
        conn.request("GET", "/", headers={"Host": CERT_NAME})
        resp = conn.getresponse()
        body = resp.read()
        sock = conn.sock
        tls: dict[str, Any] = {}
        if isinstance(sock, ssl.SSLSocket):
            cipher = sock.cipher()
            tls = {"version": sock.version(), "cipher": cipher[0] if cipher else None,
                   "alpn": sock.selected_alpn_protocol()}
        return resp.status, body, {k.lower(): v for k, v in resp.getheaders()}, tls
    finally:
        conn.close()


def wait_ready_https(procs: ProcessSet, server: Server, ctx: ssl.SSLContext,
                     timeout: float = 20.0) -> None:
    """Until GET / answers 200 over TLS; fail early (with the log) when the process died."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n"
                               f"{procs.log_tail(server.name)}")
        try:
            status = https_get(server.port, ctx, timeout=1.0)[0]
            if status == 200:
                return
            last = f"status {status}"
        except (OSError, ssl.SSLError) as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} not answering https on 127.0.0.1:{server.port} after "
                       f"{timeout:.0f}s (last: {last}):\n{procs.log_tail(server.name)}")


def start_proxy(lab: Lab, proxy: str, certs: dict[str, Path], ctx: ssl.SSLContext) -> Server:
    name = f"{proxy}-https"
    port = free_port()
    a, b = (s.port for s in lab.backends)
    if proxy == "haproxy":
        conf = render("haproxy-https.cfg", lab.tmp / f"{name}.cfg", port=port, backend_a=a,
                      backend_b=b, maxconn=lab.maxconn["http"], pem=certs["pem"],
                      stats_socket=lab.tmp / "haproxy-https.sock")
        proc = lab.procs.start(name, ["haproxy", "-db", "-f", str(conf)])
    else:
        conf = render("edgelb-https.yaml", lab.tmp / f"{name}.yaml", port=port,
                      admin_port=free_port(), backend_a=a, backend_b=b,
                      cert=certs["cert"], key=certs["key"])
        proc = lab.procs.start(
            name, [lab.cfg.python, "-m", "edgelb", "run", "-c", str(conf)], cwd=bench.REPO)
    server = Server(name, port, proc)
    wait_ready_https(lab.procs, server, ctx)
    return server


def sanity(port: int, ctx: ssl.SSLContext) -> dict[str, Any]:
    """SANITY_REQUESTS on fresh TLS connections (certificate verified): all 200 'hello';
    which backends answered and what TLS was negotiated."""
    seen: dict[str, int] = {}
    tls: dict[str, Any] = {}
    for _ in range(SANITY_REQUESTS):
        status, body, headers, tls = https_get(port, ctx)
        if status != 200 or body != b"hello\n":
            raise RuntimeError(f"https sanity check on :{port}: got {status} {body[:80]!r}")
        key = headers.get("x-backend", "?")
        seen[key] = seen.get(key, 0) + 1
    return {"backends": seen, "tls": tls, "resumes": resumes(port, ctx)}


# ---------------------------------------------------------------- measuring


def run_wrk(cfg: Settings, url: str, conns: int, seconds: int, extra: tuple[str, ...],
            raw_name: str | None) -> dict[str, Any]:
    """bench.run_wrk with extra arguments (a header): one wrk run, parsed from wrk_report.lua."""
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "--latency",
            *extra, "-s", str(bench.LUA), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if raw_name:
        (cfg.results / "raw" / f"{raw_name}.txt").write_text(
            f"$ {' '.join(argv)}\n{out.stdout}{out.stderr}")
    m = re.search(r"^BENCHJSON (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-500:]}{out.stderr[-500:]}")
    r: dict[str, Any] = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = sum(v for k, v in r.items() if k.startswith("err_"))
    return r


def haproxy_info(sock_path: Path) -> dict[str, str]:
    """`show info` over HAProxy's stats socket, as a dict (empty when it cannot be read)."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2.0)
            s.connect(str(sock_path))
            s.sendall(b"show info\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
    except OSError:
        return {}
    text = b"".join(chunks).decode(errors="replace")
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


class ReuseSampler:
    """Samples HAProxy's SslFrontendSessionReuse_pct (share of TLS handshakes that resumed a
    session, over the last second) and SslRate once a second while a run lasts."""

    def __init__(self, sock_path: Path, seconds: int) -> None:
        self.sock_path = sock_path
        self.samples: list[tuple[int, int]] = []  # (handshakes/s, reuse %)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(seconds,), daemon=True)

    def _loop(self, seconds: int) -> None:
        self._stop.wait(1.5)  # past wrk's ramp-up
        for _ in range(max(0, seconds - 2)):  # bounded: one sample a second, within the run
            if self._stop.is_set():
                return
            info = haproxy_info(self.sock_path)
            try:
                self.samples.append((int(info["SslRate"]),
                                     int(info["SslFrontendSessionReuse_pct"])))
            except (KeyError, ValueError):
                pass
            self._stop.wait(1.0)

    def __enter__(self) -> ReuseSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def summary(self) -> dict[str, Any]:
        return {"samples": self.samples,
                "reuse_pct_median": median([float(r) for _, r in self.samples])}


def resumes(port: int, ctx: ssl.SSLContext) -> bool | None:
    """Whether a second connection resumes the session (ticket) of a first one, as wrk's
    reconnects try to. None when no session was offered."""
    session = None
    for attempt in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            while tls.recv(65536):  # to the end, so TLS 1.3 tickets have arrived
                pass
            if attempt:
                return tls.session_reused
            session = tls.session
            if session is None:
                return None
    return None


def alternate(cfg: Settings, lab: Lab, servers: dict[str, Server], scenario: str, conns: int,
              extra: tuple[str, ...], notes: list[str]) -> list[dict[str, Any]]:
    """Warm every proxy up, then run them in turn for cfg.rounds rounds (as bench.alternate)."""
    for s in servers.values():
        if cfg.warmup:
            run_wrk(cfg, f"https://127.0.0.1:{s.port}/", conns, cfg.warmup, extra, None)
    rounds = []
    for rnd in range(1, cfg.rounds + 1):
        row: dict[str, Any] = {}
        for p, s in servers.items():
            if s.proc.poll() is not None:
                notes.append(f"{p} died in the https {scenario} scenario: "
                             f"{lab.procs.log_tail(s.name, 3)}")
                continue
            url = f"https://127.0.0.1:{s.port}/"
            raw = f"https-{scenario}-{p}-r{rnd}"
            if p == "haproxy" and scenario == "close":
                with ReuseSampler(lab.tmp / "haproxy-https.sock", cfg.duration) as rs:
                    r = run_wrk(cfg, url, conns, cfg.duration, extra, raw)
                r["haproxy_reuse"] = rs.summary()
            else:
                r = run_wrk(cfg, url, conns, cfg.duration, extra, raw)
            row[p] = r
            log(f"  {scenario} round {rnd} {p}: {r['rps']:.0f} req/s "
                f"p50 {r['p50_us'] / 1000:.2f} ms p99 {r['p99_us'] / 1000:.2f} ms "
                f"errors {r['errors']}")
        rounds.append(row)
    return rounds


def run(cfg: Settings, proxies: list[str], notes: list[str]) -> dict[str, Any]:
    procs = ProcessSet(cfg.tmp)
    lab = Lab(cfg, procs)
    out: dict[str, Any] = {"sanity": {}, "scenarios": {}}
    try:
        certs = make_certificate(cfg.tmp)
        ctx = client_context(certs["cert"])
        lab.start_backends()
        servers: dict[str, Server] = {}
        for p in proxies:
            try:
                servers[p] = start_proxy(lab, p, certs, ctx)
            except Exception as exc:  # reported, not fatal, as in bench.start_all
                text = [x.strip() for x in str(exc).splitlines() if x.strip()]
                notes.append(f"{p} (https): did not start: {text[0] if text else exc}")
                log(f"  {p} (https) unavailable: {exc}")
        for p, s in servers.items():
            out["sanity"][p] = sanity(s.port, ctx)
            log(f"  {p} sanity: {out['sanity'][p]}")
        for scenario, conns, extra, _ in SCENARIOS:
            log(f"HTTPS {scenario}: wrk -t1 -c{conns} -d{cfg.duration}s {' '.join(extra)} "
                f"x {cfg.rounds} rounds")
            out["scenarios"][scenario] = {
                "conns": conns, "extra": list(extra),
                "rounds": alternate(cfg, lab, servers, scenario, conns, extra, notes)}
    finally:
        procs.stop_all()
    return out


# ---------------------------------------------------------------- report


def _ms(us: float | None) -> str:
    return "n/a" if us is None else f"{us / 1000:.2f}"


def report(cfg: Settings, proxies: list[str], info: dict[str, str], res: dict[str, Any],
           notes: list[str]) -> str:
    lines = [
        "# HTTPS: edgelb and HAProxy terminating TLS",
        "",
        f"- date: {info['date']}; nproc: {info['nproc']}; kernel: {info['kernel']}",
        f"- load average (1/5/15 min) at start: {info['load_start']}; at end: {info['load_end']}",
        f"- haproxy: {info['haproxy']}; wrk: {info['wrk']}; openssl: {info['openssl']}",
        f"- python: {info['python']}",
        f"- edgelb: {info['edgelb']}",
        f"- {cfg.duration}s per run, {cfg.rounds} rounds, warm-up {cfg.warmup}s per proxy and "
        "scenario; self-signed EC P-256 certificate; backends: two nginx, one worker each; "
        "all on 127.0.0.1; ratios are to HAProxy in the same run",
    ]
    for p, s in res.get("sanity", {}).items():
        t = s["tls"]
        lines.append(f"- {p} negotiated {t.get('version')} {t.get('cipher')} "
                     f"ALPN {t.get('alpn')}; resumes a session: {s.get('resumes')}; "
                     f"sanity backends {dict(sorted(s['backends'].items()))}")
    lines.append("")
    for scenario, conns, extra, title in SCENARIOS:
        sc = res.get("scenarios", {}).get(scenario)
        if not sc:
            continue
        rounds: list[dict[str, Any]] = sc["rounds"]
        names = [p for p in proxies if any(p in row for row in rounds)]
        med = {p: {k: median([row[p][k] for row in rounds if p in row])
                   for k in ("rps", "p50_us", "p99_us")} for p in names}
        hap = med.get("haproxy", {}).get("rps")
        unit = "handshakes/s = req/s" if scenario == "close" else "req/s"
        header = f' -H "{extra[1]}"' if extra else ""
        lines += [
            f"## HTTPS {title}",
            "",
            f"`wrk -t1 -c{conns} -d{cfg.duration}s{header} --latency https://...`",
            "",
            f"| proxy | {unit} (median) | p50 ms | p99 ms | errors (all rounds) | vs HAProxy |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for p in names:
            m = med[p]
            errs = sum(row[p]["errors"] for row in rounds if p in row)
            lines.append(f"| {p} | {bench.fmt(m['rps'])} | {_ms(m['p50_us'])} | "
                         f"{_ms(m['p99_us'])} | {errs} | {bench.ratio(m['rps'], hap)} |")
        lines += ["", bench._rounds_table(rounds, names, "rps", "req/s"), ""]
        shares = [row["haproxy"]["haproxy_reuse"]["reuse_pct_median"] for row in rounds
                  if "haproxy_reuse" in row.get("haproxy", {})]
        if any(x is not None for x in shares):
            lines += ["Handshakes that resumed a session at HAProxy (SslFrontendSessionReuse_pct "
                      "over its stats socket, median of 1 s samples), per round: "
                      + ", ".join(f"{x:.0f}%" if x is not None else "n/a" for x in shares)
                      + ". wrk keeps each connection's TLS session across its reconnects, so "
                      "these are TLS 1.3 resumptions (PSK with ECDHE: no certificate "
                      "signature), not full handshakes.", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def version_info(cfg: Settings) -> dict[str, str]:
    info = bench.version_info(cfg)
    out = subprocess.run(["openssl", "version"], capture_output=True, text=True, timeout=20,
                         check=False)
    info["openssl"] = out.stdout.strip() or f"exit {out.returncode}"
    return info


# ---------------------------------------------------------------- main


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    raise_nofile()
    missing = [t for t in ("wrk", "haproxy", "nginx", "openssl") if not shutil.which(t)]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: install them (bench/run.sh installs "
                         "haproxy, nginx and wrk; openssl is Debian's openssl package)")
    proxies = bench.env_list("HTTPS_PROXIES", PROXIES, PROXIES)
    tmp = Path(tempfile.mkdtemp(prefix="edgelb-https-bench-"))
    try:
        cfg = dataclasses.replace(Settings.from_env(), tmp=tmp)
        if "BENCH_EDGELB_PYTHON" not in os.environ:
            venv = bench.REPO / ".venv" / "bin" / "python"
            cfg.python = str(venv) if venv.exists() else sys.executable
        (cfg.results / "raw").mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        info = version_info(cfg)
        notes: list[str] = []
        res = run(cfg, proxies, notes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["load_end"] = bench.loadavg()
    text = report(cfg, proxies, info, res, notes) + \
        f"\nTotal bench time: {time.monotonic() - started:.0f}s\n"
    settings = {k: str(v) for k, v in vars(cfg).items() if k != "tmp"}
    bench.save_results(cfg.results, "https-", {"info": info, "settings": settings,
                                               "proxies": proxies, "results": res,
                                               "notes": notes}, text)
    print(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        log(f"https bench: interrupted ({exc or 'SIGINT'}); all started processes stopped")
        sys.exit(130)
