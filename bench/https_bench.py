"""HTTPS side by side: edgelb and HAProxy terminating TLS in front of the same two nginx backends.

    .venv/bin/python bench/https_bench.py          # ~3 minutes on 2 cores (8 s runs)

A self-signed EC P-256 certificate is made at run time with the `openssl` command into a private
temp dir; both proxies serve it (HAProxy from one PEM holding certificate and key). Scenarios,
each run for every proxy in turn, round after round (edgelb, haproxy, edgelb, ...):

keepalive: `wrk -t1 -c64 --latency https://...`: handshakes amortised, the cost of TLS records
  on top of the HTTP path;
resumed: `wrk -t1 -c16 -H "Connection: close" https://...`: one TLS handshake per request, so
  req/s = handshakes/s. wrk resumes its previous session on each reconnect (TLS 1.3 PSK with
  ECDHE: no certificate signature);
full: the same load against a second instance of each proxy that cannot resume: edgelb with
  `tls: {session_tickets: false}`, HAProxy with `no-tls-tickets` on the bind and
  `tune.ssl.cachesize 0`. Every handshake is a full one (ECDHE and an ECDSA signature).

The sanity check offers each proxy a saved session (the `ssl` module, as wrk's reconnects do) and
records whether it resumed: it must in the first two scenarios and must not in the last; a
mismatch is printed in the report's notes. HAProxy's stats socket is sampled during its
handshake runs to show the share resumed (100% and 0% expected).

Prints a markdown report (progress goes to stderr) and writes it with the raw figures to
bench/results/https-<UTC stamp>.{md,json} and https-latest.{md,json}; wrk's output per run goes
to bench/results/raw/. Every process started here leads its own process group and is stopped on
exit, Ctrl-C and SIGTERM included. Knobs: BENCH_DURATION (default 8 s here), BENCH_ROUNDS,
BENCH_WARMUP, BENCH_RESULTS, BENCH_EDGELB_PYTHON as for bench.py, HTTPS_PROXIES
(edgelb,haproxy) and HTTPS_SCENARIOS (keepalive,resumed,full).
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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # bench.py: Lab (backends), ProcessSet, ports, templates, report helpers
from bench import Lab, ProcessSet, Server, Settings, free_port, log, median, render

PROXIES = ("edgelb", "haproxy")
CERT_NAME = "bench"  # the certificate's DNS name (edgelb requires one); 127.0.0.1 is an IP SAN
DEFAULT_DURATION = 8  # seconds per run when BENCH_DURATION is unset: ~3 minutes in all
CLOSE = ("-H", "Connection: close")


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    conns: int  # wrk connections
    extra: tuple[str, ...]  # extra wrk arguments
    profile: str  # which proxy instances: "resume" (defaults) or "full" (no resumption)
    title: str
    short: str  # column heading of the summary


SCENARIOS = (
    Scenario("keepalive", 64, (), "resume", "keep-alive (handshakes amortised)",
             "keep-alive"),
    Scenario("resumed", 16, CLOSE, "resume",
             "resumed handshake per request (Connection: close, tickets on)", "resumed"),
    Scenario("full", 16, CLOSE, "full",
             "full handshake per request (Connection: close, no resumption)", "full"),
)
PROFILES = ("resume", "full")
SANITY_REQUESTS = 20


# ---------------------------------------------------------------- setup


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


def _no_resumption(conf: Path, proxy: str) -> None:
    """Turn the rendered config of `proxy` into its no-resumption variant (the "full" profile):
    edgelb gets the top-level `tls: {session_tickets: false}`; HAProxy `no-tls-tickets` on the
    bind and `tune.ssl.cachesize 0` (no session cache, so no stateful TLS 1.3 tickets either)."""
    text = conf.read_text()
    if proxy == "edgelb":
        text += "tls: {session_tickets: false}\n"
    else:
        text, binds = re.subn(r"^(\s*bind .* ssl crt .*)$", r"\1 no-tls-tickets", text, flags=re.M)
        text, globs = re.subn(r"^global$", "global\n    tune.ssl.cachesize 0", text, flags=re.M)
        if (binds, globs) != (1, 1):
            raise RuntimeError(f"{conf.name}: expected one `bind ... ssl crt` line and one "
                               "`global` section to add no-tls-tickets and tune.ssl.cachesize")
    conf.write_text(text)


def start_proxy(lab: Lab, proxy: str, profile: str, certs: dict[str, Path],
                ctx: ssl.SSLContext) -> Server:
    name = f"{proxy}-https" if profile == "resume" else f"{proxy}-https-{profile}"
    port = free_port()
    a, b = (s.port for s in lab.backends)
    if proxy == "haproxy":
        conf = render("haproxy-https.cfg", lab.tmp / f"{name}.cfg", port=port, backend_a=a,
                      backend_b=b, maxconn=lab.maxconn["http"], pem=certs["pem"],
                      stats_socket=stats_socket(lab, name))
        if profile == "full":
            _no_resumption(conf, proxy)
        proc = lab.procs.start(name, ["haproxy", "-db", "-f", str(conf)])
    else:
        conf = render("edgelb-https.yaml", lab.tmp / f"{name}.yaml", port=port,
                      admin_port=free_port(), backend_a=a, backend_b=b,
                      cert=certs["cert"], key=certs["key"])
        if profile == "full":
            _no_resumption(conf, proxy)
        proc = lab.procs.start(
            name, [lab.cfg.python, "-m", "edgelb", "run", "-c", str(conf)], cwd=bench.REPO)
    server = Server(name, port, proc)
    wait_ready_https(lab.procs, server, ctx)
    return server


def stats_socket(lab: Lab, name: str) -> Path:
    return lab.tmp / f"{name}.sock"


def sanity(port: int, ctx: ssl.SSLContext) -> dict[str, Any]:
    """SANITY_REQUESTS on fresh TLS connections (certificate verified): all 200 'hello';
    which backends answered, what TLS was negotiated, and whether a saved session resumes."""
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


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of process `pid` (all its threads) so far; None once it is gone.
    Per request, this is the proxy's own cost, whatever else shares the cores."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15)


class OtherLoad:
    """CPU the machine spent on processes this bench did not start, over a span: user + nice +
    system time of /proc/stat minus that of our own processes (the proxies' and backends'
    sessions, wrk, this script). Interrupt time is left out on both sides. A share of a core
    well above zero says something else competed with the run (its req/s is then low);
    `top()` names the foreign processes still alive at the end that used the most."""

    def __init__(self, sessions: Iterable[int]) -> None:
        self.sessions = set(sessions)
        self.start = time.monotonic()
        self.total0 = self._total()
        self.procs0 = self._procs()
        self.ours0 = self._ours(self.procs0)
        self.procs1: dict[int, tuple[str, int, float]] = {}

    @staticmethod
    def _total() -> float:
        user, nice, system = (int(x) for x in Path("/proc/stat").read_text().split()[1:4])
        return (user + nice + system) / _TICK

    @staticmethod
    def _procs() -> dict[int, tuple[str, int, float]]:
        """pid -> (name, session id, CPU seconds) of every process now."""
        out = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                head, tail = Path(entry.path, "stat").read_text().rsplit(")", 1)
            except (OSError, ValueError):
                continue
            fields = tail.split()
            out[int(entry.name)] = (head.split("(", 1)[-1], int(fields[3]),  # field 6: session
                                    (int(fields[11]) + int(fields[12])) / _TICK)
        return out

    def _ours(self, procs: dict[int, tuple[str, int, float]]) -> float:
        used = sum(cpu for _, sid, cpu in procs.values() if sid in self.sessions)
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once reaped
        return used + own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def cores(self) -> float:
        """Average number of cores busy with other work since the start (>= 0)."""
        total = self._total()
        self.procs1 = self._procs()
        other = (total - self.total0) - (self._ours(self.procs1) - self.ours0)
        return max(0.0, other / max(1e-3, time.monotonic() - self.start))

    def top(self, n: int = 3) -> list[str]:
        """The foreign processes that used the most CPU in the span, as "name pid: seconds"."""
        used = []
        for pid, (name, sid, cpu) in self.procs1.items():
            if sid in self.sessions or pid == os.getpid():
                continue
            before = self.procs0.get(pid)
            delta = cpu - (before[2] if before else 0.0)  # kworkers rename themselves
            if delta >= 0.05:
                used.append((delta, f"{name} {pid}: {delta:.1f}s"))
        return [text for _, text in sorted(used, reverse=True)[:n]]


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


def resumes(port: int, ctx: ssl.SSLContext, tries: int = 3) -> bool | None:
    """Whether a new connection resumes the session of the one before, as wrk's reconnects try
    to (`tries` pairs: True if any resumed). None when no session was offered."""
    reused = False
    for _ in range(tries):
        session = None
        for attempt in range(2):
            with socket.create_connection(("127.0.0.1", port), timeout=2.0) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                while tls.recv(65536):  # to the end, so TLS 1.3 tickets have arrived
                    pass
                if attempt:
                    reused = reused or tls.session_reused
                session = tls.session
                if session is None:
                    return None
    return reused


def alternate(cfg: Settings, lab: Lab, servers: dict[str, Server], sc: Scenario,
              notes: list[str]) -> list[dict[str, Any]]:
    """Warm every proxy up, then run them in turn for cfg.rounds rounds (as bench.alternate)."""
    for s in servers.values():
        if cfg.warmup:
            run_wrk(cfg, f"https://127.0.0.1:{s.port}/", sc.conns, cfg.warmup, sc.extra, None)
    rounds = []
    for rnd in range(1, cfg.rounds + 1):
        row: dict[str, Any] = {}
        for p, s in servers.items():
            if s.proc.poll() is not None:
                notes.append(f"{p} died in the https {sc.name} scenario: "
                             f"{lab.procs.log_tail(s.name, 3)}")
                continue
            url = f"https://127.0.0.1:{s.port}/"
            raw = f"https-{sc.name}-{p}-r{rnd}"
            cpu0 = cpu_seconds(s.proc.pid)
            other = OtherLoad(lab.procs.live)
            if p == "haproxy" and sc.extra == CLOSE:
                with ReuseSampler(stats_socket(lab, s.name), cfg.duration) as rs:
                    r = run_wrk(cfg, url, sc.conns, cfg.duration, sc.extra, raw)
                r["haproxy_reuse"] = rs.summary()
            else:
                r = run_wrk(cfg, url, sc.conns, cfg.duration, sc.extra, raw)
            cpu1 = cpu_seconds(s.proc.pid)
            r["cpu_s"] = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
            r["cpu_us"] = (r["cpu_s"] / r["requests"] * 1e6
                           if r["cpu_s"] is not None and r["requests"] else None)
            r["other_cores"] = other.cores()
            r["other_top"] = other.top()
            row[p] = r
            log(f"  {sc.name} round {rnd} {p}: {r['rps']:.0f} req/s "
                f"p50 {r['p50_us'] / 1000:.2f} ms p99 {r['p99_us'] / 1000:.2f} ms "
                f"errors {r['errors']} CPU {bench.fmt(r['cpu_us'], '.1f')} us/req, "
                f"other work {r['other_cores']:.2f} cores {r['other_top']}")
        rounds.append(row)
    return rounds


def check_resumption(out: dict[str, Any], notes: list[str]) -> None:
    """The profiles must do what they claim: every proxy resumes with "resume", none with
    "full". A mismatch goes to the notes (the figures of that scenario then mean something
    else than their title says)."""
    for profile, sanity_of in out["sanity"].items():
        want = profile == "resume"
        for p, s in sanity_of.items():
            if s.get("resumes") is not want:
                notes.append(f"SANITY: {p} with the {profile!r} profile resumes a session: "
                             f"{s.get('resumes')} (expected {want})")


def run(cfg: Settings, proxies: list[str], scenarios: list[Scenario],
        notes: list[str]) -> dict[str, Any]:
    procs = ProcessSet(cfg.tmp)
    lab = Lab(cfg, procs)
    out: dict[str, Any] = {"sanity": {}, "scenarios": {}}
    try:
        certs = make_certificate(cfg.tmp)
        ctx = client_context(certs["cert"])
        lab.start_backends()
        servers: dict[str, dict[str, Server]] = {}
        for profile in PROFILES:
            if not any(sc.profile == profile for sc in scenarios):
                continue
            servers[profile] = {}
            for p in proxies:
                try:
                    servers[profile][p] = start_proxy(lab, p, profile, certs, ctx)
                except Exception as exc:  # reported, not fatal, as in bench.start_all
                    text = [x.strip() for x in str(exc).splitlines() if x.strip()]
                    notes.append(f"{p} (https, {profile}): did not start: "
                                 f"{text[0] if text else exc}")
                    log(f"  {p} (https, {profile}) unavailable: {exc}")
            out["sanity"][profile] = {}
            for p, s in servers[profile].items():
                out["sanity"][profile][p] = sanity(s.port, ctx)
                log(f"  {p} ({profile}) sanity: {out['sanity'][profile][p]}")
        check_resumption(out, notes)
        for sc in scenarios:
            log(f"HTTPS {sc.name}: wrk -t1 -c{sc.conns} -d{cfg.duration}s {' '.join(sc.extra)} "
                f"x {cfg.rounds} rounds")
            out["scenarios"][sc.name] = {
                "conns": sc.conns, "extra": list(sc.extra), "profile": sc.profile,
                "rounds": alternate(cfg, lab, servers[sc.profile], sc, notes)}
    finally:
        procs.stop_all()
    return out


# ---------------------------------------------------------------- report


def _ms(us: float | None) -> str:
    return "n/a" if us is None else f"{us / 1000:.2f}"


def _medians(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    return {p: {k: median([row[p][k] for row in rounds if p in row and row[p].get(k) is not None])
                for k in ("rps", "p50_us", "p99_us", "cpu_us")} for p in names}


def _per_round(rounds: list[dict[str, Any]], p: str, q: str) -> str:
    """p/q req/s of each round where both ran, e.g. "0.78, 0.73, 0.74"."""
    return ", ".join(f"{row[p]['rps'] / row[q]['rps']:.2f}" for row in rounds
                     if p in row and q in row and row[q]["rps"])


def side_by_side(proxies: list[str], res: dict[str, Any]) -> list[str]:
    """One table: each proxy's median req/s per scenario, edgelb/HAProxy, and full/resumed."""
    ran = [sc for sc in SCENARIOS if sc.name in res.get("scenarios", {})]
    if not ran:
        return []
    rounds = {sc.name: res["scenarios"][sc.name]["rounds"] for sc in ran}
    names = [p for p in proxies if any(p in row for r in rounds.values() for row in r)]
    med = {sc.name: _medians(rounds[sc.name], names) for sc in ran}
    lines = ["## Side by side (median req/s)", "",
             "| proxy | " + " | ".join(sc.short for sc in ran) + " |",
             "|---|" + "---:|" * len(ran)]
    for p in names:
        cells = [bench.fmt(med[sc.name].get(p, {}).get("rps")) for sc in ran]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    if "edgelb" in names and "haproxy" in names:
        cells = []
        for sc in ran:
            m = med[sc.name]
            edgelb, haproxy = (m.get(p, {}).get("rps") for p in ("edgelb", "haproxy"))
            per = _per_round(rounds[sc.name], "edgelb", "haproxy")
            cells.append(f"**{bench.ratio(edgelb, haproxy)}** ({per})")
        lines.append("| edgelb / HAProxy (per round) | " + " | ".join(cells) + " |")
    lines += ["", "The proxy's own CPU per request (user + system, from /proc, median of the "
              "rounds): it depends far less than req/s on what else runs on the cores.", "",
              "| proxy | " + " | ".join(f"{sc.short} CPU us/req" for sc in ran) + " |",
              "|---|" + "---:|" * len(ran)]
    for p in names:
        cells = [bench.fmt(med[sc.name].get(p, {}).get("cpu_us"), ".1f") for sc in ran]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    if "edgelb" in names and "haproxy" in names:
        cells = [bench.ratio(med[sc.name].get("edgelb", {}).get("cpu_us"),
                             med[sc.name].get("haproxy", {}).get("cpu_us")) for sc in ran]
        lines.append("| edgelb / HAProxy | " + " | ".join(cells) + " |")
    lines.append("")
    if "resumed" in med and "full" in med:
        for p in names:
            full, resumed = (med[k].get(p, {}) for k in ("full", "resumed"))
            rate = bench.ratio(full.get("rps"), resumed.get("rps"))
            cpu = bench.ratio(full.get("cpu_us"), resumed.get("cpu_us"))
            lines.append(f"- {p}: full handshakes at {rate} the rate of resumed ones, {cpu} "
                         "their CPU per request")
        lines.append("")
    return lines


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
        "- profiles: `resume` = each proxy's defaults (tickets on); `full` = edgelb "
        "`tls: {session_tickets: false}`, HAProxy `no-tls-tickets` + `tune.ssl.cachesize 0`",
    ]
    for profile, sanity_of in res.get("sanity", {}).items():
        for p, s in sanity_of.items():
            t = s["tls"]
            lines.append(f"- {p} ({profile}) negotiated {t.get('version')} {t.get('cipher')} "
                         f"ALPN {t.get('alpn')}; a saved session resumed: {s.get('resumes')}; "
                         f"sanity backends {dict(sorted(s['backends'].items()))}")
    others = [row[p]["other_cores"] for sc in res.get("scenarios", {}).values()
              for row in sc["rounds"] for p in row if row[p].get("other_cores") is not None]
    if others:
        lines.append(f"- other work on the machine during the runs: {median(others):.2f} cores "
                     f"(median), {max(others):.2f} at most (of {info['nproc']}); see each "
                     "scenario")
    lines.append("")
    lines += side_by_side(proxies, res)
    for scd in SCENARIOS:
        sc = res.get("scenarios", {}).get(scd.name)
        if not sc:
            continue
        rounds: list[dict[str, Any]] = sc["rounds"]
        names = [p for p in proxies if any(p in row for row in rounds)]
        med = _medians(rounds, names)
        hap = med.get("haproxy", {}).get("rps")
        unit = "handshakes/s = req/s" if scd.extra == CLOSE else "req/s"
        header = f' -H "{scd.extra[1]}"' if scd.extra else ""
        lines += [
            f"## HTTPS {scd.title}",
            "",
            f"`wrk -t1 -c{scd.conns} -d{cfg.duration}s{header} --latency https://...` "
            f"({scd.profile} profile)",
            "",
            f"| proxy | {unit} (median) | p50 ms | p99 ms | CPU us/req | errors (all rounds) "
            "| vs HAProxy |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for p in names:
            m = med[p]
            errs = sum(row[p]["errors"] for row in rounds if p in row)
            lines.append(f"| {p} | {bench.fmt(m['rps'])} | {_ms(m['p50_us'])} | "
                         f"{_ms(m['p99_us'])} | {bench.fmt(m['cpu_us'], '.1f')} | {errs} | "
                         f"{bench.ratio(m['rps'], hap)} |")
        lines += ["", bench._rounds_table(rounds, names, "rps", "req/s"), ""]
        other = "; ".join(
            f"{p} " + ", ".join(bench.fmt(row[p].get("other_cores"), ".2f") for row in rounds
                                if p in row) for p in names)
        seen = sorted({t.split(" ", 1)[0] for row in rounds for p in names if p in row
                       if (row[p].get("other_cores") or 0) >= 0.1
                       for t in row[p].get("other_top", [])})
        busiest = f" Busiest of them: {', '.join(seen)}." if seen else ""
        lines += [f"Cores busy with other work during each run (processes this bench did not "
                  f"start), per round: {other}.{busiest}", ""]
        shares = [row["haproxy"]["haproxy_reuse"]["reuse_pct_median"] for row in rounds
                  if "haproxy_reuse" in row.get("haproxy", {})]
        if any(x is not None for x in shares):
            what = ("wrk keeps each connection's TLS session across its reconnects, so these "
                    "are TLS 1.3 resumptions (PSK with ECDHE: no certificate signature)"
                    if scd.profile == "resume" else
                    "wrk offers its session as before; 0% means every handshake was a full one")
            lines += ["Handshakes that resumed a session at HAProxy (SslFrontendSessionReuse_pct "
                      "over its stats socket, median of 1 s samples), per round: "
                      + ", ".join(f"{x:.0f}%" if x is not None else "n/a" for x in shares)
                      + f". {what}.", ""]
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


def main() -> int:
    bench.stop_on_signals(signal.SIGTERM, signal.SIGINT)
    bench.raise_nofile()
    missing = [t for t in ("wrk", "haproxy", "nginx", "openssl") if not shutil.which(t)]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: install them (bench/run.sh installs "
                         "haproxy, nginx and wrk; openssl is Debian's openssl package)")
    proxies = bench.env_list("HTTPS_PROXIES", PROXIES, PROXIES)
    names = tuple(sc.name for sc in SCENARIOS)
    wanted = bench.env_list("HTTPS_SCENARIOS", names, names)
    scenarios = [sc for sc in SCENARIOS if sc.name in wanted]
    tmp = Path(tempfile.mkdtemp(prefix="edgelb-https-bench-"))
    try:
        cfg = dataclasses.replace(Settings.from_env(), tmp=tmp)
        if not os.environ.get("BENCH_DURATION"):
            cfg.duration = DEFAULT_DURATION
        if "BENCH_EDGELB_PYTHON" not in os.environ:
            venv = bench.REPO / ".venv" / "bin" / "python"
            cfg.python = str(venv) if venv.exists() else sys.executable
        (cfg.results / "raw").mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        info = version_info(cfg)
        notes: list[str] = []
        res = run(cfg, proxies, scenarios, notes)
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
