"""Side-by-side benchmarks: edgelb against HAProxy and nginx, all on 127.0.0.1.

Run through bench/run.sh (it installs the tools, raises the fd limit and owns the temp dir).
Scenarios: HTTP keep-alive small responses, TCP bulk 10 MiB downloads, memory per idle
keep-alive client connection, and balancing over backends of unequal capacity (tail latency).
Standard library only, so any Python 3.11 can drive it (the balance scenario's backends run
with the edgelb interpreter, BENCH_EDGELB_PYTHON).
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CONF = BENCH_DIR / "conf"
LUA = BENCH_DIR / "wrk_report.lua"
PROXIES = ("edgelb", "haproxy", "nginx")
TCP_PROXIES = ("edgelb", "haproxy")
BULK_SIZE = 10 * 1024 * 1024
MIB = 1024 * 1024
# The balance scenario: NAME:CAPACITY:SERVICE_SECONDS per backend (c is the degraded host),
# the weights every proxy gets (capacity), the concurrent keep-alive clients, and the rows:
# (row name, proxy, policy). The first row is edgelb's default policy.
BALANCE_SPECS = ("a:8:0.010", "b:2:0.010", "c:8:0.060")
BALANCE_WEIGHTS = {"a": 8, "b": 2, "c": 8}
BALANCE_CONNS = 12
BALANCE_ROWS = (
    ("edgelb", "edgelb", "least-loaded"),
    ("edgelb-rr", "edgelb", "round-robin"),
    ("haproxy-leastconn", "haproxy", "leastconn"),
    ("haproxy-rr", "haproxy", "roundrobin"),
)
# (numerator row, denominator row, metric, comparison, target) as issue 3 states them
BALANCE_TARGETS = (
    ("edgelb", "haproxy-leastconn", "p99_us", "<=", 0.8),
    ("edgelb", "haproxy-rr", "p99_us", "<=", 0.5),
    ("edgelb", "haproxy-leastconn", "rps", ">=", 1.0),
)


# ---------------------------------------------------------------- settings


def parse_seconds(text: str) -> int:
    """'10', '10s', '1m' -> seconds (whole seconds, as wrk takes them)."""
    m = re.fullmatch(r"\s*(\d+)\s*(s|m)?\s*", text)
    if not m:
        raise SystemExit(f"BENCH_DURATION={text!r}: use whole seconds like 10 or 10s, or 1m")
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def env_int(name: str, default: int, low: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: expected a whole number") from None
    if value < low:
        raise SystemExit(f"{name}={value}: must be at least {low}")
    return value


def env_list(name: str, default: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    raw = os.environ.get(name, "").strip()
    items = [x.strip() for x in raw.split(",") if x.strip()] if raw else list(default)
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"{name}: unknown {bad}; choose from {', '.join(allowed)}")
    return items


SCENARIOS = ("http", "tcp", "idle", "balance", "routes")


@dataclass
class Settings:
    duration: int
    rounds: int
    conns: int
    tcp_conns: int
    idle_conns: int
    warmup: int
    proxies: list[str]
    scenarios: list[str]
    tmp: Path
    results: Path
    python: str
    nofile: int

    @classmethod
    def from_env(cls, rounds: int = 3) -> Settings:
        """`rounds`: the default of BENCH_ROUNDS for the calling bench."""
        env = os.environ.get
        return cls(
            duration=parse_seconds(env("BENCH_DURATION") or "10"),
            rounds=env_int("BENCH_ROUNDS", rounds),
            conns=env_int("BENCH_CONNS", 64),
            tcp_conns=env_int("BENCH_TCP_CONNS", 8),
            idle_conns=env_int("BENCH_IDLE_CONNS", 5000),
            warmup=env_int("BENCH_WARMUP", 2, low=0),
            proxies=env_list("BENCH_PROXIES", PROXIES, PROXIES),
            scenarios=env_list("BENCH_SCENARIOS", SCENARIOS, SCENARIOS),
            tmp=Path(env("BENCH_TMP") or "/nonexistent"),
            results=Path(env("BENCH_RESULTS") or BENCH_DIR / "results"),
            python=env("BENCH_EDGELB_PYTHON") or sys.executable,
            nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )


# ---------------------------------------------------------------- processes


class ProcessSet:
    """Children started in their own process groups, listed in a pid file, always stopped."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pid_file = tmp / "pids"
        self.live: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # the child keeps its own copy
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=cwd, start_new_session=True,
        )
        log.close()
        self.live[proc.pid] = proc
        with open(self.pid_file, "a") as f:
            f.write(f"{proc.pid}\n")
        return proc

    def start_piped(self, name: str, argv: list[str],
                    cwd: Path | None = None) -> subprocess.Popen[str]:
        """Like start, with stdin and stdout as text pipes (stderr goes to the log)."""
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            cwd=cwd, start_new_session=True,
        )
        log.close()
        self.live[proc.pid] = proc  # type: ignore[assignment]
        with open(self.pid_file, "a") as f:
            f.write(f"{proc.pid}\n")
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
        self.live.pop(proc.pid, None)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # nginx workers or edgelb children may outlive a leader that exited early
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for proc in list(self.live.values()):
            self.stop(proc, grace=2.0)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.tmp / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


_taken_ports: set[int] = set()


def free_port() -> int:
    """A loopback port that is free now (and not handed out earlier in this run)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _taken_ports:
            _taken_ports.add(port)
            return port
    raise RuntimeError("could not find a free loopback port")


def http_get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, bytes, list[str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": "bench"})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, body, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def wait_ready(procs: ProcessSet, proc: subprocess.Popen[bytes], name: str, port: int,
               timeout: float = 20.0, path: str = "/") -> None:
    """Until GET `path` answers 200 on port; fail early (with the log) when the process died."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{procs.log_tail(name)}")
        try:
            status, _, _ = http_get(port, path, timeout=1.0)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{name} not answering on 127.0.0.1:{port} after {timeout:.0f}s "
                       f"(last: {last}):\n{procs.log_tail(name)}")


def render(template: str, dest: Path, **values: object) -> Path:
    text = string.Template((CONF / template).read_text()).substitute(
        {k: str(v) for k, v in values.items()})
    dest.write_text(text)
    return dest


# ---------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    admin_port: int | None = None


class CapacityBackends:
    """bench/capacity_backends.py: one process, one port per backend, served counters."""

    def __init__(self, procs: ProcessSet, python: str, specs: tuple[str, ...]) -> None:
        self.procs = procs
        self.proc = procs.start_piped(
            "capacity-backends", [python, str(BENCH_DIR / "capacity_backends.py"), *specs],
            cwd=REPO)
        try:
            line = _read_line(self.proc, "PORTS", 20)
        except RuntimeError as exc:
            raise RuntimeError(f"capacity backends did not start: {exc}\n"
                               f"{procs.log_tail('capacity-backends')}") from None
        self.ports = {k: int(v) for k, v in (x.split("=") for x in line.split()[1:])}

    def served(self) -> dict[str, int]:
        """Requests each backend has served so far."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        line = _read_line(self.proc, "STATS", 10)
        return {k: int(v) for k, v in (x.split("=") for x in line.split()[1:])}

    def stop(self) -> None:
        self.procs.stop(self.proc)


class Lab:
    """Owns the temp dir layout, the backends and the proxies under test."""

    def __init__(self, cfg: Settings, procs: ProcessSet) -> None:
        self.cfg = cfg
        self.procs = procs
        self.tmp = cfg.tmp
        self.root = os.geteuid() == 0
        # HAProxy refuses to start when 2 fds per maxconn (+ splice pipes) exceed the limit
        self.maxconn = {"http": max(1000, min(20000, (cfg.nofile - 300) // 2)), "tcp": 1000}
        self.backends: list[Server] = []
        self.www = self.tmp / "www"

    def _nginx_common(self, d: Path) -> dict[str, object]:
        d.mkdir(parents=True, exist_ok=True)
        return {
            "dir": d,
            "user_line": "user root;" if self.root else "",
            "nofile": self.cfg.nofile,
            "worker_connections": max(1024, self.cfg.nofile - 100),
        }

    def _start_nginx(self, name: str, conf: Path, d: Path, port: int) -> Server:
        proc = self.procs.start(name, ["nginx", "-p", str(d), "-e", str(d / "error.log"),
                                       "-c", str(conf), "-g", "daemon off;"])
        wait_ready(self.procs, proc, name, port)
        return Server(name, port, proc)

    def start_backends(self) -> None:
        self.www.mkdir(exist_ok=True)
        block = os.urandom(MIB)
        with open(self.www / "10m.bin", "wb") as f:
            for _ in range(BULK_SIZE // MIB):
                f.write(block)
        for letter in ("a", "b"):
            d = self.tmp / f"backend-{letter}"
            port = free_port()
            conf = render("backend.nginx.conf", d.parent / f"backend-{letter}.conf",
                          **self._nginx_common(d), port=port, www=self.www, name=letter)
            self.backends.append(self._start_nginx(f"backend-{letter}", conf, d, port))

    def start_proxy(self, proxy: str, mode: str, tag: str) -> Server:
        """Start one proxy ('edgelb'|'haproxy'|'nginx') in mode 'http' or 'tcp'."""
        name = f"{proxy}-{mode}-{tag}"
        port = free_port()
        a, b = (s.port for s in self.backends)
        d = self.tmp / name
        if proxy == "haproxy":
            conf = render(f"haproxy-{mode}.cfg", self.tmp / f"{name}.cfg", port=port,
                          backend_a=a, backend_b=b, maxconn=self.maxconn[mode])
            proc = self.procs.start(name, ["haproxy", "-db", "-f", str(conf)])
        elif proxy == "nginx":
            if mode != "http":
                raise ValueError("nginx is only benchmarked as an HTTP proxy")
            conf = render("nginx-proxy.conf", self.tmp / f"{name}.conf",
                          **self._nginx_common(d), port=port, backend_a=a, backend_b=b)
            return self._start_nginx(name, conf, d, port)
        else:
            conf = render(f"edgelb-{mode}.yaml", self.tmp / f"{name}.yaml", port=port,
                          admin_port=free_port(), backend_a=a, backend_b=b)
            access = os.environ.get("BENCH_ACCESS_LOG", "")  # json|combined: log every request
            if access:
                with conf.open("a") as f:
                    log = self.tmp / f"{name}.access.log"
                    f.write(f"access_log: {{format: {access}, path: {log}}}\n")
            proc = self.procs.start(
                name, [self.cfg.python, "-m", "edgelb", "run", "-c", str(conf)], cwd=REPO)
        wait_ready(self.procs, proc, name, port)
        return Server(name, port, proc)

    def start_balance_proxy(self, row: str, proxy: str, policy: str,
                            backends: dict[str, int]) -> Server:
        """One proxy of the balance scenario in front of the capacity backends a, b, c."""
        name = f"{row}-balance"
        port = free_port()
        ports = {f"backend_{k}": v for k, v in backends.items()}
        admin_port = None
        if proxy == "haproxy":
            conf = render("haproxy-balance.cfg", self.tmp / f"{name}.cfg", port=port,
                          balance=policy, **ports)
            proc = self.procs.start(name, ["haproxy", "-db", "-f", str(conf)])
        else:
            admin_port = free_port()
            conf = render("edgelb-balance.yaml", self.tmp / f"{name}.yaml", port=port,
                          admin_port=admin_port, policy=policy, **ports)
            proc = self.procs.start(
                name, [self.cfg.python, "-m", "edgelb", "run", "-c", str(conf)], cwd=REPO)
        wait_ready(self.procs, proc, name, port)
        return Server(name, port, proc, admin_port)


# ---------------------------------------------------------------- measuring


def run_wrk(cfg: Settings, url: str, conns: int, seconds: int,
            raw_name: str | None, headers: tuple[str, ...] = ()) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "--latency",
            *(x for h in headers for x in ("-H", h)), "-s", str(LUA), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if raw_name:
        (cfg.results / "raw" / f"{raw_name}.txt").write_text(
            f"$ {' '.join(argv)}\n{out.stdout}{out.stderr}")
    m = re.search(r"^BENCHJSON (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-500:]}{out.stderr[-500:]}")
    r = json.loads(m.group(1))
    secs = r["duration_us"] / 1e6
    r["rps"] = r["requests"] / secs
    r["mib_s"] = r["bytes"] / secs / MIB
    r["errors"] = sum(r[k] for k in r if k.startswith("err_"))
    return r


def tree_pids(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def memory_kib(pid: int) -> dict[str, int]:
    """Summed VmRSS and Pss (KiB) over the process and its descendants."""
    rss = pss = 0
    for p in tree_pids(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        rss += int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        pss += int(re.search(r"^Pss:\s+(\d+)", rollup, re.M).group(1))  # type: ignore[union-attr]
    return {"rss_kib": rss, "pss_kib": pss}


def sanity(port: int, n: int = 20) -> dict[str, Any]:
    """n requests on fresh connections: all must be 200 'hello'; which backends answered."""
    seen: dict[str, int] = {}
    for _ in range(n):
        status, body, headers = http_get(port)
        if status != 200 or body != b"hello\n":
            raise RuntimeError(f"sanity check on :{port}: got {status} {body[:80]!r}")
        key = headers.get("x-backend", "?")
        seen[key] = seen.get(key, 0) + 1
    return seen


def idle_memory(cfg: Settings, server: Server, count: int) -> dict[str, Any]:
    sanity(server.port)
    time.sleep(0.5)
    before = memory_kib(server.proc.pid)
    opener = subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "idle_conns.py"), "--port", str(server.port),
         "--count", str(count), "--hold", "180"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        ready = _read_line(opener, "READY", 150)
        opened, failed = (int(x) for x in ready.split()[1:3])
        time.sleep(1.0)
        after = memory_kib(server.proc.pid)
        time.sleep(1.0)
        assert opener.stdin is not None
        opener.stdin.write("check\n")
        opener.stdin.flush()
        alive = int(_read_line(opener, "ALIVE", 30).split()[1])
        opener.wait(30)
    finally:
        if opener.poll() is None:
            os.killpg(opener.pid, signal.SIGKILL)
            opener.wait()
    err = opener.stderr.read().strip() if opener.stderr else ""
    res: dict[str, Any] = {"requested": count, "opened": opened, "failed": failed, "alive": alive,
                           "before": before, "after": after, "opener_stderr": err[-300:]}
    if opened:
        res["kib_per_conn_rss"] = (after["rss_kib"] - before["rss_kib"]) / opened
        res["kib_per_conn_pss"] = (after["pss_kib"] - before["pss_kib"]) / opened
    return res


def balance_sanity(port: int, n: int = 30) -> dict[str, int]:
    """n requests on fresh connections through a balance proxy: all must be answered by a
    capacity backend; counts per backend (X-Backend)."""
    seen: dict[str, int] = {}
    for _ in range(n):
        status, body, headers = http_get(port)
        if status != 200 or not body.startswith(b"hello from demo backend"):
            raise RuntimeError(f"sanity check on :{port}: got {status} {body[:80]!r}")
        key = headers.get("x-backend", "?")
        seen[key] = seen.get(key, 0) + 1
    return seen


def _read_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if sel.select(left):
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(prefix):
                return line
    err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
    raise RuntimeError(f"connection opener gave no {prefix} line within {timeout:.0f}s {err}")


# ---------------------------------------------------------------- scenarios


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def start_all(lab: Lab, names: list[str], mode: str, tag: str,
              notes: list[str]) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    for p in names:
        try:
            servers[p] = lab.start_proxy(p, mode, tag)
        except Exception as exc:  # a proxy that does not start is reported, not fatal
            text = [x.strip() for x in str(exc).splitlines() if x.strip()]
            why = text[0] if len(text) < 2 else f"{text[0]} ... {text[-1]}"
            notes.append(f"{p} ({mode}): did not start: {why}")
            log(f"  {p} ({mode}) unavailable: {exc}")
    return servers


def scenario_http(cfg: Settings, lab: Lab, notes: list[str]) -> dict[str, Any]:
    log(f"HTTP keep-alive: wrk -t1 -c{cfg.conns} -d{cfg.duration}s x {cfg.rounds} rounds")
    servers = start_all(lab, cfg.proxies, "http", "a", notes)
    out: dict[str, Any] = {"sanity": {}, "rounds": [], "direct": None}
    try:
        for p, s in servers.items():
            out["sanity"][p] = sanity(s.port)
        out["direct"], out["rounds"] = alternate(
            cfg, lab, servers, "/", cfg.conns, "http", notes,
            lambda r: f"{r['rps']:.0f} req/s p50 {r['p50_us'] / 1000:.2f} ms "
            f"p99 {r['p99_us'] / 1000:.2f} ms errors {r['errors']}",
        )
    finally:
        for s in servers.values():
            lab.procs.stop(s.proc)
    return out


def alternate(
    cfg: Settings,
    lab: Lab,
    servers: dict[str, Any],
    path: str,
    conns: int,
    kind: str,
    notes: list[str],
    describe: Callable[[dict[str, Any]], str],
    direct: bool = True,
    served: Callable[[], dict[str, int]] | None = None,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """wrk straight to one backend once (unless not `direct`), then every proxy in turn for
    `cfg.rounds` rounds. With `served` (requests served per backend so far), each run's
    result gets `backend_requests`: how many requests each backend served during it."""
    direct_res = None
    if direct:
        direct_url = f"http://127.0.0.1:{lab.backends[0].port}{path}"
        if cfg.warmup:
            run_wrk(cfg, direct_url, conns, cfg.warmup, None)
        direct_res = run_wrk(cfg, direct_url, conns, cfg.duration, f"{kind}-direct")
        log(f"  direct (one backend worker): {describe(direct_res)}")
    for s in servers.values():
        if cfg.warmup:
            run_wrk(cfg, f"http://127.0.0.1:{s.port}{path}", conns, cfg.warmup, None)
    rounds = []
    for rnd in range(1, cfg.rounds + 1):
        row: dict[str, Any] = {}
        for p, s in servers.items():
            if s.proc.poll() is not None:
                notes.append(f"{p} died in the {kind} scenario: {lab.procs.log_tail(s.name, 3)}")
                continue
            before = served() if served else {}
            r = run_wrk(cfg, f"http://127.0.0.1:{s.port}{path}", conns, cfg.duration,
                        f"{kind}-{p}-r{rnd}")
            if served:
                time.sleep(0.2)  # let requests still queued in a backend finish
                r["backend_requests"] = {k: v - before.get(k, 0) for k, v in served().items()}
            row[p] = r
            log(f"  round {rnd} {p}: {describe(r)}")
        rounds.append(row)
    return direct_res, rounds


def scenario_tcp(cfg: Settings, lab: Lab, notes: list[str]) -> dict[str, Any]:
    names = [p for p in cfg.proxies if p in TCP_PROXIES]
    log(f"TCP bulk: 10 MiB responses, wrk -t1 -c{cfg.tcp_conns} -d{cfg.duration}s x {cfg.rounds}")
    servers = start_all(lab, names, "tcp", "a", notes)
    out: dict[str, Any] = {"rounds": [], "direct": None}
    path = "/10m.bin"
    try:
        for p, s in servers.items():
            status, body, _ = http_get(s.port, path, timeout=10)
            if status != 200 or len(body) != BULK_SIZE:
                raise RuntimeError(f"{p} tcp: bad bulk response {status} {len(body)} bytes")
        out["direct"], out["rounds"] = alternate(
            cfg, lab, servers, path, cfg.tcp_conns, "tcp", notes,
            lambda r: f"{r['mib_s']:.0f} MiB/s errors {r['errors']}",
        )
    finally:
        for s in servers.values():
            lab.procs.stop(s.proc)
    return out


def scenario_idle(cfg: Settings, lab: Lab, notes: list[str]) -> dict[str, Any]:
    count = min(cfg.idle_conns, max(100, cfg.nofile - 500))
    log(f"Idle keep-alive memory: {count} connections per proxy (fd limit {cfg.nofile})")
    out: dict[str, Any] = {"count": count, "proxies": {}}
    for p in cfg.proxies:
        servers = start_all(lab, [p], "http", "idle", notes)
        if p not in servers:
            continue
        try:
            r = idle_memory(cfg, servers[p], count)
            out["proxies"][p] = r
            per = r.get("kib_per_conn_rss")
            log(f"  {p}: opened {r['opened']} alive {r['alive']} "
                f"{'n/a' if per is None else f'{per:.2f}'} KiB/conn (RSS)")
        except Exception as exc:
            notes.append(f"{p} (idle memory): {exc}")
            log(f"  {p}: idle memory failed: {exc}")
        finally:
            lab.procs.stop(servers[p].proc)
    return out


def balance_rows(cfg: Settings) -> list[tuple[str, str, str]]:
    return [r for r in BALANCE_ROWS if r[1] in cfg.proxies]


def scenario_balance(cfg: Settings, lab: Lab, notes: list[str]) -> dict[str, Any]:
    rows = balance_rows(cfg)
    log(f"Balance: backends {' '.join(BALANCE_SPECS)}, weights {BALANCE_WEIGHTS}, "
        f"wrk -t1 -c{BALANCE_CONNS} -d{cfg.duration}s x {cfg.rounds} rounds")
    out: dict[str, Any] = {"specs": list(BALANCE_SPECS), "weights": BALANCE_WEIGHTS,
                           "conns": BALANCE_CONNS, "policies": {r[0]: f"{r[1]} {r[2]}"
                                                                for r in rows},
                           "sanity": {}, "rounds": []}
    try:
        backends = CapacityBackends(lab.procs, cfg.python, BALANCE_SPECS)
    except Exception as exc:
        notes.append(f"balance: {str(exc).splitlines()[0]}")
        log(f"  balance: {exc}")
        return out
    servers: dict[str, Server] = {}
    try:
        for row, proxy, policy in rows:
            try:
                servers[row] = lab.start_balance_proxy(row, proxy, policy, backends.ports)
            except Exception as exc:  # reported, not fatal, as in start_all
                text = [x.strip() for x in str(exc).splitlines() if x.strip()]
                why = text[0] if text else str(exc)
                notes.append(f"{row} (balance, {policy}): did not start: {why}")
                log(f"  {row} (balance) unavailable: {exc}")
        for row, s in servers.items():
            out["sanity"][row] = balance_sanity(s.port)
        _, out["rounds"] = alternate(
            cfg, lab, servers, "/", BALANCE_CONNS, "balance", notes,
            lambda r: f"{r['rps']:.0f} req/s p50 {r['p50_us'] / 1000:.1f} ms "
            f"p99 {r['p99_us'] / 1000:.1f} ms p99.9 {r['p999_us'] / 1000:.1f} ms "
            f"errors {r['errors']} served {r.get('backend_requests')}",
            direct=False, served=backends.served,
        )
    finally:
        for s in servers.values():
            lab.procs.stop(s.proc)
        backends.stop()
    return out


# ---------------------------------------------------------------- report


# The routes scenario: ROUTE_HOSTS hosts x ROUTE_VARIANTS header-matched rules and a catch-all;
# the measured requests go to a host in the middle and match its last rule.
ROUTE_HOSTS = 50
ROUTE_VARIANTS = 4
ROUTE_REQUEST = ("Host: h25.bench.test", "X-Variant: v3")


def routes_edgelb_config(port: int, admin_port: int, a: int, b: int) -> str:
    services = "".join(
        f"  - {{name: svc{k}, balance: least-loaded, backends: [{{address: 127.0.0.1:{a}}}, "
        f"{{address: 127.0.0.1:{b}}}]}}\n" for k in range(ROUTE_VARIANTS))
    routes = "".join(
        f"  - {{hosts: [h{h}.bench.test], matches: [{{headers: {{x-variant: v{k}}}}}], "
        f"backends: [svc{k}]}}\n"
        for h in range(ROUTE_HOSTS) for k in range(ROUTE_VARIANTS))
    return (f"# edgelb: {ROUTE_HOSTS * ROUTE_VARIANTS} header-matched routes and a catch-all\n"
            f"admin: {{listen: 127.0.0.1:{admin_port}}}\n"
            "defaults: {connect_timeout: 2s, header_timeout: 300s, idle_timeout: 300s, "
            "response_timeout: 60s}\n"
            f"entrypoints: {{web: {{listen: 127.0.0.1:{port}}}}}\n"
            f"services:\n{services}routes:\n{routes}  - {{backends: [svc0]}}\n")


def routes_haproxy_config(port: int, a: int, b: int, maxconn: int) -> str:
    """The same routes as HAProxy ACLs: one use_backend per rule, tried in order."""
    rules = "".join(
        f"    use_backend be_svc{k} if {{ hdr(host) -i h{h}.bench.test }} "
        f"{{ hdr(x-variant) v{k} }}\n"
        for h in range(ROUTE_HOSTS) for k in range(ROUTE_VARIANTS))
    backends = "".join(
        f"backend be_svc{k}\n    balance leastconn\n    server a 127.0.0.1:{a}\n"
        f"    server b 127.0.0.1:{b}\n\n" for k in range(ROUTE_VARIANTS))
    return (f"global\n    nbthread 1\n    maxconn {maxconn}\n\n"
            f"defaults\n    mode http\n    maxconn {maxconn}\n    option http-keep-alive\n"
            "    http-reuse always\n    timeout connect 2s\n    timeout client 300s\n"
            "    timeout server 300s\n    timeout http-request 300s\n"
            "    timeout http-keep-alive 300s\n\n"
            f"frontend fe_web\n    bind 127.0.0.1:{port}\n{rules}    default_backend be_svc0\n\n"
            f"{backends}")


def start_routes_proxy(lab: Lab, proxy: str) -> Server:
    name = f"{proxy}-routes"
    port = free_port()
    a, b = (s.port for s in lab.backends)
    if proxy == "haproxy":
        conf = lab.tmp / f"{name}.cfg"
        conf.write_text(routes_haproxy_config(port, a, b, lab.maxconn["http"]))
        proc = lab.procs.start(name, ["haproxy", "-db", "-f", str(conf)])
    else:
        conf = lab.tmp / f"{name}.yaml"
        conf.write_text(routes_edgelb_config(port, free_port(), a, b))
        proc = lab.procs.start(
            name, [lab.cfg.python, "-m", "edgelb", "run", "-c", str(conf)], cwd=REPO)
    wait_ready(lab.procs, proc, name, port)
    return Server(name, port, proc)


def routed_ok(port: int) -> bool:
    """The measured request reaches a backend through the routes (200, not a 404)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(("GET / HTTP/1.1\r\n" + "\r\n".join(ROUTE_REQUEST)
                   + "\r\nConnection: close\r\n\r\n").encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.startswith(b"HTTP/1.1 200")


def scenario_routes(cfg: Settings, lab: Lab, notes: list[str]) -> dict[str, Any]:
    """The HTTP ratio to HAProxy with the plain config and with 200 header-matched routes
    (HAProxy: the equivalent acl + use_backend rules), then bench/route_lookup.py."""
    names = [p for p in cfg.proxies if p in ("edgelb", "haproxy")]
    log(f"Routes: plain vs {ROUTE_HOSTS * ROUTE_VARIANTS} header-matched routes, wrk -t1 "
        f"-c{cfg.conns} -d{cfg.duration}s x {cfg.rounds} rounds")
    servers: dict[str, Server] = {}
    out: dict[str, Any] = {"rounds": [], "lookup": None}
    try:
        for p in names:
            for kind in ("plain", "routes"):
                try:
                    servers[f"{p}-{kind}"] = (lab.start_proxy(p, "http", "routes-plain")
                                              if kind == "plain" else start_routes_proxy(lab, p))
                except Exception as exc:
                    notes.append(f"{p} ({kind} routes): did not start: {exc}")
        for key, s in servers.items():
            if not routed_ok(s.port):
                notes.append(f"{key}: the measured request was not answered 200")
        for s in servers.values():
            if cfg.warmup:
                run_wrk(cfg, f"http://127.0.0.1:{s.port}/", cfg.conns, cfg.warmup, None,
                        ROUTE_REQUEST)
        for rnd in range(1, cfg.rounds + 1):
            row: dict[str, Any] = {}
            for key, s in servers.items():
                r = run_wrk(cfg, f"http://127.0.0.1:{s.port}/", cfg.conns, cfg.duration,
                            f"routes-{key}-r{rnd}", ROUTE_REQUEST)
                row[key] = r
                log(f"  round {rnd} {key}: {r['rps']:.0f} req/s errors {r['errors']}")
            out["rounds"].append(row)
    finally:
        for s in servers.values():
            lab.procs.stop(s.proc)
    micro = subprocess.run([cfg.python, str(BENCH_DIR / "route_lookup.py")], cwd=REPO,
                           capture_output=True, text=True, timeout=600, check=False)
    m = re.search(r"^BENCHJSON (\{.*\})$", micro.stdout, re.M)
    if m:
        out["lookup"] = json.loads(m.group(1))
        log("  route lookup ns by other hosts: " + str(out["lookup"]))
    else:
        notes.append(f"route_lookup.py failed: {micro.stderr[-300:]}")
    return out


def _routes_section(cfg: Settings, r: dict[str, Any]) -> list[str]:
    keys = [k for k in ("edgelb-plain", "haproxy-plain", "edgelb-routes", "haproxy-routes")
            if any(k in row for row in r["rounds"])]
    med = {k: median([row[k]["rps"] for row in r["rounds"] if k in row]) for k in keys}
    lines = [
        f"## Routes: {ROUTE_HOSTS} hosts x {ROUTE_VARIANTS} header-matched rules and a "
        f"catch-all (wrk -t1 -c{cfg.conns} -d{cfg.duration}s)",
        "",
        "The requests name a host in the middle (h25) and match its last rule "
        "(`X-Variant: v3`); HAProxy has the same rules as `use_backend ... if { hdr(host) } "
        "{ hdr(x-variant) }`, tried in order.",
        "",
        "| config | edgelb req/s | HAProxy req/s | edgelb vs HAProxy |",
        "|---|---:|---:|---:|",
    ]
    for kind in ("plain", "routes"):
        e, h = med.get(f"edgelb-{kind}"), med.get(f"haproxy-{kind}")
        lines.append(f"| {kind} | {fmt(e)} | {fmt(h)} | {ratio(e, h)} |")
    lines += ["", _rounds_table(r["rounds"], keys, "rps", "req/s"), ""]
    if r.get("lookup"):
        lines += ["Route lookup (bench/route_lookup.py, `Router.match` of a request matching "
                  "its host's 4th header rule), ns per lookup by the number of other hosts "
                  "(4 rules each): " + ", ".join(f"{k}: {v:.0f}" for k, v in
                                                 r["lookup"].items()), ""]
    return lines


def version_info(cfg: Settings) -> dict[str, str]:
    def first_line(argv: list[str], cwd: Path | None = None) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=cwd)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable ({exc})"
        text = (out.stdout + out.stderr).strip()
        return text.splitlines()[0] if text else f"exit {out.returncode}"

    rev = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", ".",
                            ":(exclude)bench"], capture_output=True, text=True, check=False
                           ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": str(os.cpu_count()),
        "kernel": os.uname().release,
        "load_start": loadavg(),
        "haproxy": first_line(["haproxy", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "python": first_line([cfg.python, "-VV"]),
        "edgelb": first_line([cfg.python, "-m", "edgelb", "--version"], cwd=REPO)
        + f" (git {rev}{', uncommitted changes' if dirty else ''}; "
        + first_line([cfg.python, "-c", "from edgelb.compiled import describe; print(describe())"],
                     cwd=REPO) + ")",
    }


def save_results(results: Path, prefix: str, payload: dict[str, Any], text: str) -> None:
    """`<prefix><UTC stamp>.{json,md}` and `<prefix>latest.{json,md}` in `results`."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    data = json.dumps(payload, indent=1)
    for stem in (f"{prefix}{stamp}", f"{prefix}latest"):
        (results / f"{stem}.json").write_text(data)
        (results / f"{stem}.md").write_text(text)


def loadavg() -> str:
    """1, 5 and 15 minute load averages: above nproc, other work competed with the run."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "n/a" if v is None else format(v, spec)


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}x"


def summarize(cfg: Settings, info: dict[str, str], res: dict[str, Any],
              notes: list[str]) -> str:
    lines = [
        "# edgelb side-by-side benchmarks",
        "",
        f"- date: {info['date']}; nproc: {info['nproc']}; kernel: {info['kernel']}",
        f"- load average (1/5/15 min) at start: {info['load_start']}; at end: {info['load_end']} "
        "(other work on the machine makes absolute numbers lower; ratios suffer less)",
        f"- haproxy: {info['haproxy']}",
        f"- nginx: {info['nginx']}; wrk: {info['wrk']}",
        f"- python: {info['python']}",
        f"- edgelb: {info['edgelb']}",
        f"- settings: duration {cfg.duration}s per run, {cfg.rounds} rounds, "
        f"{cfg.conns} HTTP connections, {cfg.tcp_conns} TCP connections, fd limit {cfg.nofile}",
        "- all on 127.0.0.1; backends of the http, tcp and idle scenarios: two nginx "
        "instances, one worker each (the balance scenario has its own); ratios are to HAProxy "
        "in the same run (absolute numbers are noisy on a shared machine)",
        "",
    ]
    if "http" in res:
        h = res["http"]
        names = [p for p in cfg.proxies if any(p in row for row in h["rounds"])]
        med = {p: {k: median([row[p][k] for row in h["rounds"] if p in row])
                   for k in ("rps", "p50_us", "p99_us")} for p in names}
        errs = {p: sum(row[p]["errors"] for row in h["rounds"] if p in row) for p in names}
        hap = med.get("haproxy", {}).get("rps")
        lines += [
            f"## HTTP keep-alive, small responses (wrk -t1 -c{cfg.conns} -d{cfg.duration}s)",
            "",
            "| path | req/s (median) | p50 ms | p99 ms | errors (all rounds) | vs HAProxy |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for p in names:
            m = med[p]
            lines.append(f"| {p} | {fmt(m['rps'])} | {fmt(m['p50_us'] / 1000, '.2f')} | "
                         f"{fmt(m['p99_us'] / 1000, '.2f')} | {errs[p]} | {ratio(m['rps'], hap)} |")
        d = h.get("direct")
        if d:
            lines.append(f"| direct to one backend (ceiling) | {fmt(d['rps'])} | "
                         f"{fmt(d['p50_us'] / 1000, '.2f')} | {fmt(d['p99_us'] / 1000, '.2f')} | "
                         f"{d['errors']} | {ratio(d['rps'], hap)} |")
        lines += ["", _rounds_table(h["rounds"], names, "rps", "req/s"), ""]
        paired = _paired_ratios(h["rounds"], names, "rps")
        if paired:
            lines += [paired, ""]
        if h.get("sanity"):
            seen = "; ".join(f"{p}: {dict(sorted(v.items()))}" for p, v in h["sanity"].items())
            lines += [f"Backends answering 20 sanity requests on fresh connections: {seen}", ""]
    if "tcp" in res:
        t = res["tcp"]
        names = [p for p in cfg.proxies if any(p in row for row in t["rounds"])]
        med_t = {p: median([row[p]["mib_s"] for row in t["rounds"] if p in row]) for p in names}
        hap = med_t.get("haproxy")
        lines += [
            f"## TCP bulk, 10 MiB responses (wrk -t1 -c{cfg.tcp_conns} -d{cfg.duration}s)",
            "",
            "HAProxy: mode tcp, option splice-auto, tune.bufsize 262144. "
            "MiB/s = wrk bytes received / duration.",
            "",
            "| path | MiB/s (median) | errors | vs HAProxy |",
            "|---|---:|---:|---:|",
        ]
        for p in names:
            e = sum(row[p]["errors"] for row in t["rounds"] if p in row)
            lines.append(f"| {p} tcp | {fmt(med_t[p])} | {e} | {ratio(med_t[p], hap)} |")
        d = t.get("direct")
        if d:
            lines.append(f"| direct to one backend | {fmt(d['mib_s'])} | {d['errors']} | "
                         f"{ratio(d['mib_s'], hap)} |")
        lines += ["", _rounds_table(t["rounds"], names, "mib_s", "MiB/s"), ""]
    if "idle" in res:
        i = res["idle"]
        lines += [
            f"## Memory per idle keep-alive client connection ({i['count']} connections)",
            "",
            "One request on each connection, then held idle; VmRSS of the proxy process tree "
            "before and after (Pss is in latest.json: it moves with other processes that share "
            "the same libraries, so it is not used here).",
            "",
            "| proxy | opened | still open | RSS before KiB | RSS after KiB | KiB/conn "
            "| vs HAProxy |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        hap = i["proxies"].get("haproxy", {}).get("kib_per_conn_rss")
        for p, r in i["proxies"].items():
            per = r.get("kib_per_conn_rss")
            lines.append(
                f"| {p} | {r['opened']} | {r['alive']} | {r['before']['rss_kib']} | "
                f"{r['after']['rss_kib']} | {fmt(per, '.2f')} | {ratio(per, hap)} |")
        lines.append("")
    if "balance" in res:
        lines += _balance_section(cfg, res["balance"])
    if "routes" in res:
        lines += _routes_section(cfg, res["routes"])
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _ms(us: float | None, spec: str = ".1f") -> str:
    return "n/a" if us is None else format(us / 1000, spec)


def _balance_section(cfg: Settings, b: dict[str, Any]) -> list[str]:
    rounds: list[dict[str, Any]] = b["rounds"]
    names = [r[0] for r in BALANCE_ROWS if any(r[0] in row for row in rounds)]
    keys = ("rps", "p50_us", "p99_us", "p999_us")
    med = {p: {k: median([row[p][k] for row in rounds if p in row]) for k in keys}
           for p in names}
    lines = [
        f"## Balancing over unequal backends (wrk -t1 -c{b['conns']} -d{cfg.duration}s)",
        "",
        "Three backends (bench/capacity_backends.py, edgelb's demo backends): a serves 8 "
        "requests at once in 10 ms each, b 2 at once in 10 ms, c 8 at once in 60 ms (degraded); "
        "beyond capacity, requests queue inside the backend. Every proxy weights them 8/2/8. "
        "Medians over rounds; \"served\" is the share of requests each backend served, summed "
        "over rounds.",
        "",
        "| proxy | policy | req/s | p50 ms | p99 ms | p99.9 ms | errors | served a/b/c |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for p in names:
        m = med[p]
        errs = sum(row[p]["errors"] for row in rounds if p in row)
        total: dict[str, int] = {}
        for row in rounds:
            for k, v in row.get(p, {}).get("backend_requests", {}).items():
                total[k] = total.get(k, 0) + v
        n = sum(total.values())
        share = "/".join(f"{100 * total[k] / n:.0f}%" for k in sorted(total)) if n else "n/a"
        lines.append(f"| {p} | {b['policies'].get(p, '?')} | {fmt(m['rps'])} | "
                     f"{_ms(m['p50_us'])} | {_ms(m['p99_us'])} | {_ms(m['p999_us'])} | "
                     f"{errs} | {share} |")
    lines += ["", "Targets of issue 3 (ratios of the medians; per round in the table below):",
              "", "| ratio | value | target | met |", "|---|---:|---:|---|"]
    label = {"p99_us": "p99", "rps": "req/s"}
    for num, den, key, op, target in BALANCE_TARGETS:
        a, d = med.get(num, {}).get(key), med.get(den, {}).get(key)
        value = a / d if a and d else None
        met = "n/a" if value is None else (
            "yes" if (value <= target if op == "<=" else value >= target) else "no")
        lines.append(f"| {num} {label[key]} / {den} {label[key]} | {fmt(value, '.2f')} | "
                     f"{op} {target:g} | {met} |")
    head = ["round", *(f"{p} p99 ms" for p in names)]
    pairs = [(n, d, k) for n, d, k, _, _ in BALANCE_TARGETS if n in names and d in names]
    head += [f"{n} {label[k]} / {d}" for n, d, k in pairs]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for i, row in enumerate(rounds, 1):
        cells = [str(i)] + [_ms(row[p]["p99_us"]) if p in row else "n/a" for p in names]
        cells += [ratio(row.get(n, {}).get(k), row.get(d, {}).get(k)) for n, d, k in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if b.get("sanity"):
        seen = "; ".join(f"{p}: {dict(sorted(v.items()))}" for p, v in b["sanity"].items())
        lines += [f"Backends answering 30 sanity requests on fresh connections: {seen}", ""]
    return lines


def _rounds_table(rounds: list[dict[str, Any]], names: list[str], key: str, unit: str) -> str:
    if not names:
        return "(no proxy ran)"
    others = [p for p in names if p != "haproxy"]
    head = ["round", *(f"{p} {unit}" for p in names)]
    if "haproxy" in names:
        head += [f"{p}/haproxy" for p in others]
    rows = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for n, row in enumerate(rounds, 1):
        cells = [str(n)] + [fmt(row[p][key]) if p in row else "n/a" for p in names]
        if "haproxy" in names:
            h = row.get("haproxy", {}).get(key)
            cells += [ratio(row.get(p, {}).get(key), h) for p in others]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _paired_ratios(rounds: list[dict], names: list[str], key: str) -> str:
    """The per-round ratios to HAProxy, summarised: each round pairs runs made seconds apart,
    so their median is steadier than the ratio of medians when the machine drifts."""
    parts = []
    for p in names:
        if p == "haproxy":
            continue
        rs = [row[p][key] / row["haproxy"][key] for row in rounds
              if p in row and "haproxy" in row and row["haproxy"][key]]
        if rs:
            parts.append(f"{p} median {statistics.median(rs):.2f}x "
                         f"(min {min(rs):.2f}x, max {max(rs):.2f}x)")
    if not parts:
        return ""
    return "Per-round ratios to HAProxy: " + "; ".join(parts) + "."


# ---------------------------------------------------------------- main


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_tools(cfg: Settings) -> None:
    missing = [t for t in ("wrk", "haproxy", "nginx") if not shutil.which(t)]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run bench/run.sh, which installs them")
    if not cfg.tmp.is_dir():
        raise SystemExit("BENCH_TMP must name a scratch directory; run bench/run.sh")


def run(cfg: Settings, scenarios: dict[str, Callable[[Settings, Lab, list[str]], Any]]
        ) -> tuple[dict[str, Any], list[str]]:
    procs = ProcessSet(cfg.tmp)
    lab = Lab(cfg, procs)
    res: dict[str, Any] = {}
    notes: list[str] = []
    try:
        if set(cfg.scenarios) - {"balance"}:  # the balance scenario brings its own backends
            lab.start_backends()
        for name in cfg.scenarios:
            res[name] = scenarios[name](cfg, lab, notes)
    finally:
        procs.stop_all()
    return res, notes


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def backends_main(argv: list[str], doc: str | None, parse_spec: Callable[[str], Any],
                  serve: Callable[[list[Any]], Any]) -> int:
    """The command line of a backend script: one spec (with a `name`) per argument, then
    `serve(specs)` until a signal, on uvloop when it is installed."""
    if not argv or argv[0] in ("-h", "--help"):
        print(doc, file=sys.stderr)
        return 2
    specs = [parse_spec(a) for a in argv]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SystemExit(f"backend names must differ, got {names}")
    try:
        import uvloop
    except ImportError:
        import asyncio

        asyncio.run(serve(specs))
    else:
        uvloop.run(serve(specs))
    return 0


def stop_on_signals(*signums: int) -> None:
    """Turn these signals into KeyboardInterrupt, so `finally` blocks stop every child."""
    for signum in signums:
        signal.signal(signum, _on_signal)


def raise_nofile() -> int:
    """Lift the soft open-file limit to the hard one (children inherit it: load generators
    and HAProxy, whose maxconn is sized from it); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def main() -> int:
    stop_on_signals(signal.SIGTERM)
    # 5 rounds: on a shared 2-core machine one round of the HTTP scenario can land anywhere
    # between 0.7x and 1.0x of the next; the median of 5 moves much less than that of 3
    cfg = Settings.from_env(rounds=5)
    check_tools(cfg)
    (cfg.results / "raw").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    info = version_info(cfg)
    res, notes = run(cfg, {"http": scenario_http, "tcp": scenario_tcp, "idle": scenario_idle,
                           "balance": scenario_balance, "routes": scenario_routes})
    info["load_end"] = loadavg()
    summary = summarize(cfg, info, res, notes)
    summary += f"\nTotal bench time: {time.monotonic() - started:.0f}s\n"
    save_results(cfg.results, "", {"info": info, "settings": {
        k: str(v) for k, v in cfg.__dict__.items()}, "results": res, "notes": notes}, summary)
    print(summary)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        log(f"bench: interrupted ({exc or 'SIGINT'}); all started processes stopped")
        sys.exit(130)
