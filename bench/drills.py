"""Failure and overload drills: edgelb and HAProxy in turn, in front of the same backends.

    .venv/bin/python bench/drills.py [failure|overload|all]

failure: four capacity-limited backends (bench/drill_backends.py), open-loop load at half their
  capacity (bench/drill_load.py) in three phases: before, during (b1 killed, b2 hangs, b3
  answers 500 to everything) and after (all restored). Per proxy and phase: requests, client
  visible errors, latency.
overload: four backends of known capacity, open-loop load at three times their total capacity;
  the proxy caps each backend at its workers and sheds what waited queue_timeout. Per proxy:
  the highest concurrency each backend saw against its cap, goodput, shed count, the slowest
  shed answer and the proxy's RSS every second.

Prints a markdown report and writes it with the raw figures (JSON) to bench/results/ as
drills-<UTC stamp>.{md,json} and drills-latest.{md,json}. Everything runs on 127.0.0.1; every
process started here leads its own process group and is stopped on exit, Ctrl-C included.
Knobs (environment): see bench/README.md, section "Drills".
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # bench.py: process groups, ports, templates, RSS
from bench import ProcessSet, free_port, render, wait_ready

BENCH_DIR = bench.BENCH_DIR
REPO = bench.REPO
DRILLS = ("failure", "overload")
PROXIES = ("edgelb", "haproxy")

# failure drill: 4 x 8 workers x 5 ms = 6400 req/s of capacity
FAILURE_WORKERS, FAILURE_SERVICE = 8, 0.005
FAILURE_BREAK = {"b1": "kill", "b2": "hang", "b3": "error"}  # during the middle phase
FAILURE_PHASES = ("before", "during", "after")
FAILURE_LIMITS = {"connect_timeout": "250ms", "response_timeout": "500ms",
                  "queue_timeout": "500ms", "check_timeout": "500ms"}
# overload drill: 4 x 4 workers x 10 ms = 1600 req/s of capacity
OVERLOAD_WORKERS, OVERLOAD_SERVICE = 4, 0.010
OVERLOAD_QUEUE_TIMEOUT = 0.200
OVERLOAD_LIMITS = {"connect_timeout": "250ms", "response_timeout": "1s",
                   "queue_timeout": f"{OVERLOAD_QUEUE_TIMEOUT * 1000:.0f}ms"}
SHED_SLACK = 0.100  # the slowest shed answer may exceed queue_timeout by this much
CLIENT_TIMEOUT = 2.0


# ---------------------------------------------------------------- settings


def env_float(name: str, default: float, low: float = 0.0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw.rstrip("s")) if name.endswith("SECONDS") else float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: expected a number") from None
    if value < low:
        raise SystemExit(f"{name}={value:g}: must be at least {low:g}")
    return value


@dataclass
class Settings:
    phase: float  # seconds per failure phase
    overload_seconds: float
    failure_load: float  # share of the total capacity offered in the failure drill
    overload_factor: float  # times the total capacity offered in the overload drill
    warmup: float
    conns: int  # most client connections the load generator opens
    proxies: list[str]
    results: Path
    python: str
    nofile: int

    @classmethod
    def from_env(cls) -> Settings:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        python = os.environ.get("BENCH_EDGELB_PYTHON") or (
            str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists()
            else sys.executable)
        return cls(
            phase=env_float("DRILL_PHASE_SECONDS", 10.0, 1.0),
            overload_seconds=env_float("DRILL_OVERLOAD_SECONDS", 10.0, 1.0),
            failure_load=env_float("DRILL_FAILURE_LOAD", 0.2, 0.01),
            overload_factor=env_float("DRILL_OVERLOAD_FACTOR", 3.0, 0.1),
            warmup=env_float("DRILL_WARMUP_SECONDS", 2.0),
            conns=min(int(env_float("DRILL_CONNS", 6000, 16)), max(16, nofile - 300)),
            proxies=bench.env_list("DRILL_PROXIES", PROXIES, PROXIES),
            results=Path(os.environ.get("BENCH_RESULTS") or BENCH_DIR / "results"),
            python=python,
            nofile=nofile,
        )


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


def read_line(proc: subprocess.Popen[str], prefix: str, timeout: float,
              what: str) -> str:
    """The next stdout line of proc starting with prefix (others are skipped)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(prefix):
                return line.rstrip("\n")
    raise RuntimeError(f"{what} gave no {prefix} line within {timeout:.0f}s "
                       f"(exit status {proc.poll()})")


class Backends:
    """bench/drill_backends.py in its own process, driven over stdin."""

    def __init__(self, procs: ProcessSet, python: str, name: str, specs: list[str]) -> None:
        self.procs, self.name = procs, name
        self.proc = procs.start_piped(name, [python, str(BENCH_DIR / "drill_backends.py"),
                                             *specs], cwd=REPO)
        try:
            line = read_line(self.proc, "PORTS", 20, "drill backends")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{procs.log_tail(name)}") from None
        self.ports = {k: int(v) for k, v in (x.split("=") for x in line.split()[1:])}

    def command(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = read_line(self.proc, "", 15, "drill backends")
        if answer.startswith("ERR"):
            raise RuntimeError(f"drill backends: {line!r}: {answer}")
        return answer

    def stats(self, reset: bool = False) -> dict[str, dict[str, Any]]:
        answer = self.command("stats reset" if reset else "stats")
        return json.loads(answer.split(" ", 1)[1])

    def set_mode(self, name: str, mode: str) -> None:
        self.command(f"set {name} {mode}")

    def all_ok(self) -> None:
        for name in self.ports:
            self.set_mode(name, "ok")

    def stop(self) -> None:
        self.procs.stop(self.proc)


@dataclass
class Proxy:
    name: str
    port: int
    proc: subprocess.Popen[bytes]


def start_proxy(cfg: Settings, procs: ProcessSet, tmp: Path, proxy: str, drill: str,
                ports: dict[str, int], values: dict[str, object], notes: list[str]
                ) -> Proxy | None:
    """Render conf/<proxy>-drill-<drill>.* and start it; None (with a note) when it cannot."""
    name = f"{proxy}-{drill}"
    port = free_port()
    if proxy == "haproxy":
        if not shutil.which("haproxy"):
            notes.append("haproxy is not installed: `apt-get install haproxy` (bench/run.sh "
                         "installs it) to run the drills against it")
            return None
        servers = "\n".join(f"    server {b} 127.0.0.1:{p}" for b, p in ports.items())
        maxconn = max(1000, min(20000, (cfg.nofile - 300) // 2))
        conf = render(f"haproxy-drill-{drill}.cfg", tmp / f"{name}.cfg", port=port,
                      maxconn=maxconn, servers=servers, **values)
        argv = ["haproxy", "-db", "-f", str(conf)]
    else:
        backends = "\n".join(f"      - {{address: 127.0.0.1:{p}, weight: 1}}"
                             for p in ports.values())
        conf = render(f"edgelb-drill-{drill}.yaml", tmp / f"{name}.yaml", port=port,
                      admin_port=free_port(), backends=backends, **values)
        try:
            check = subprocess.run([cfg.python, "-m", "edgelb", "check", "-c", str(conf)],
                                   capture_output=True, text=True, cwd=REPO, timeout=60)
            rc, text = check.returncode, check.stderr or check.stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            rc, text = 1, f"`edgelb check` did not run: {exc}"
        if rc != 0:
            why = " ".join(text.split())[:600]
            msg = f"edgelb does not accept the drill config yet: {why}"
            log(f"  {msg}")
            notes.append(f"{drill}: {msg}")
            return None
        argv = [cfg.python, "-m", "edgelb", "run", "-c", str(conf)]
    proc = procs.start(name, argv, cwd=REPO)
    try:
        wait_ready(procs, proc, name, port)
    except RuntimeError as exc:
        procs.stop(proc)
        text = [x.strip() for x in str(exc).splitlines() if x.strip()]
        why = " ... ".join(text[:1] + text[-2:]) if len(text) > 3 else " ".join(text)
        log(f"  {proxy} did not start: {why}")
        notes.append(f"{drill}: {proxy} did not start: {why}")
        return None
    return Proxy(name, port, proc)


def run_load(cfg: Settings, procs: ProcessSet, name: str, port: int, rate: float,
             phases: list[float], names: list[str],
             on_phase: Callable[[int], None] | None = None,
             tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run drill_load.py to completion; on_phase(n) on each `PHASE n`, tick() every second."""
    argv = [cfg.python, str(BENCH_DIR / "drill_load.py"), "--port", str(port),
            "--rate", f"{rate:g}", "--phases", ",".join(f"{p:g}" for p in phases),
            "--names", ",".join(names), "--timeout", f"{CLIENT_TIMEOUT:g}",
            "--conns", str(cfg.conns)]
    proc = procs.start_piped(name, argv, cwd=REPO)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + sum(phases) + CLIENT_TIMEOUT + 30
        next_tick = time.monotonic()
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if tick and time.monotonic() >= next_tick:
                    tick()
                    next_tick += 1.0
                wait = max(0.0, min(next_tick - time.monotonic(), 1.0)) if tick else 1.0
                if not sel.select(wait):
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith("PHASE ") and on_phase:
                    on_phase(int(line.split()[1]))
                elif line.startswith("RESULT "):
                    return json.loads(line[7:])
        raise RuntimeError(f"load generator gave no result (exit status {proc.poll()}):\n"
                           f"{procs.log_tail(name)}")
    finally:
        procs.stop(proc)


# ---------------------------------------------------------------- the drills


def specs(prefix: str, workers: int, service: float) -> list[str]:
    return [f"{prefix}{i}:{workers}:{service:g}" for i in range(1, 5)]


def drill_failure(cfg: Settings, procs: ProcessSet, tmp: Path,
                  notes: list[str]) -> dict[str, Any]:
    capacity = 4 * FAILURE_WORKERS / FAILURE_SERVICE
    rate = capacity * cfg.failure_load
    out: dict[str, Any] = {
        "backends": specs("b", FAILURE_WORKERS, FAILURE_SERVICE), "capacity_rps": capacity,
        "rate": rate, "phase_seconds": cfg.phase, "break": FAILURE_BREAK,
        "limits": FAILURE_LIMITS, "client_timeout_s": CLIENT_TIMEOUT, "proxies": {},
    }
    log(f"Failure drill: 4 backends x {FAILURE_WORKERS} workers x "
        f"{FAILURE_SERVICE * 1000:g} ms ({capacity:.0f} req/s), {rate:.0f} req/s offered, "
        f"phases {cfg.phase:g}s each; during: {FAILURE_BREAK}")
    backends = Backends(procs, cfg.python, "failure-backends",
                        specs("b", FAILURE_WORKERS, FAILURE_SERVICE))
    try:
        for proxy in cfg.proxies:
            backends.all_ok()
            backends.stats(reset=True)
            values = {"max_inflight": FAILURE_WORKERS, **FAILURE_LIMITS}
            p = start_proxy(cfg, procs, tmp, proxy, "failure", backends.ports, values, notes)
            if p is None:
                continue
            try:
                out["proxies"][proxy] = failure_run(cfg, procs, backends, p, rate)
            except RuntimeError as exc:  # reported; the other proxy still runs
                notes.append(f"failure: {proxy}: {' '.join(str(exc).split())[:600]}")
                log(f"  {proxy}: {exc}")
            finally:
                procs.stop(p.proc)
                backends.all_ok()
    finally:
        backends.stop()
    return out


def failure_run(cfg: Settings, procs: ProcessSet, backends: Backends, p: Proxy,
                rate: float) -> dict[str, Any]:
    if cfg.warmup:
        run_load(cfg, procs, f"{p.name}-warmup", p.port, rate, [cfg.warmup], ["warmup"])
    backends.stats(reset=True)
    per_phase: list[dict[str, Any]] = []
    switched: dict[str, float] = {}
    started = time.monotonic()

    def on_phase(n: int) -> None:
        if n == 1:
            return
        per_phase.append(backends.stats(reset=True))  # the phase that just ended
        modes = FAILURE_BREAK if n == 2 else dict.fromkeys(FAILURE_BREAK, "ok")
        for name, mode in modes.items():
            backends.set_mode(name, mode)
        switched[FAILURE_PHASES[n - 1]] = round(time.monotonic() - started, 3)
        log(f"  {p.name}: phase {FAILURE_PHASES[n - 1]}: {modes}")

    res = run_load(cfg, procs, f"{p.name}-load", p.port, rate, [cfg.phase] * 3,
                   list(FAILURE_PHASES), on_phase=on_phase)
    per_phase.append(backends.stats(reset=True))
    for ph, stats in zip(res["phases"], per_phase, strict=False):
        ph["backends"] = stats
    res["switched_at_s"] = switched
    for ph in res["phases"]:
        lat = ph["latency_all_ms"]
        log(f"  {p.name} {ph['name']}: {ph['sent']} requests, {ph['errors']} errors "
            f"(non-2xx {ph['non2xx']}, conn {sum(ph['conn_errors'].values())}, "
            f"timeouts {ph['timeouts']}), p50 {lat['p50']} ms p99 {lat['p99']} ms")
    return res


def drill_overload(cfg: Settings, procs: ProcessSet, tmp: Path,
                   notes: list[str]) -> dict[str, Any]:
    capacity = 4 * OVERLOAD_WORKERS / OVERLOAD_SERVICE
    rate = capacity * cfg.overload_factor
    out: dict[str, Any] = {
        "backends": specs("o", OVERLOAD_WORKERS, OVERLOAD_SERVICE), "capacity_rps": capacity,
        "rate": rate, "seconds": cfg.overload_seconds, "cap": OVERLOAD_WORKERS,
        "queue_timeout_s": OVERLOAD_QUEUE_TIMEOUT, "limits": OVERLOAD_LIMITS,
        "client_timeout_s": CLIENT_TIMEOUT, "proxies": {},
    }
    log(f"Overload drill: 4 backends x {OVERLOAD_WORKERS} workers x "
        f"{OVERLOAD_SERVICE * 1000:g} ms ({capacity:.0f} req/s), {rate:.0f} req/s offered for "
        f"{cfg.overload_seconds:g}s, cap {OVERLOAD_WORKERS}, queue_timeout "
        f"{OVERLOAD_LIMITS['queue_timeout']}")
    backends = Backends(procs, cfg.python, "overload-backends",
                        specs("o", OVERLOAD_WORKERS, OVERLOAD_SERVICE))
    try:
        for proxy in cfg.proxies:
            backends.stats(reset=True)
            values = {"max_inflight": OVERLOAD_WORKERS, **OVERLOAD_LIMITS}
            p = start_proxy(cfg, procs, tmp, proxy, "overload", backends.ports, values, notes)
            if p is None:
                continue
            try:
                out["proxies"][proxy] = overload_run(cfg, procs, backends, p, rate, capacity)
            except RuntimeError as exc:
                notes.append(f"overload: {proxy}: {' '.join(str(exc).split())[:600]}")
                log(f"  {proxy}: {exc}")
            finally:
                procs.stop(p.proc)
    finally:
        backends.stop()
    return out


def overload_run(cfg: Settings, procs: ProcessSet, backends: Backends, p: Proxy,
                 rate: float, capacity: float) -> dict[str, Any]:
    if cfg.warmup:  # at capacity: connections and pools warm, nothing shed yet
        run_load(cfg, procs, f"{p.name}-warmup", p.port, capacity, [cfg.warmup], ["warmup"])
    time.sleep(0.5)
    backends.stats(reset=True)  # the concurrency maximum counts from here
    rss: list[int] = []
    started = time.monotonic()

    def tick() -> None:
        rss.append(bench.memory_kib(p.proc.pid)["rss_kib"])

    res = run_load(cfg, procs, f"{p.name}-load", p.port, rate, [cfg.overload_seconds],
                   ["overload"], tick=tick)
    elapsed = time.monotonic() - started
    time.sleep(0.3)  # requests still in a backend finish
    stats = backends.stats(reset=True)
    ph = res["phases"][0]
    whole = int(cfg.overload_seconds) or 1
    # 2xx completed inside the load window: a backlog served after it is not goodput
    goodput = sum(res["timeline"]["ok"][:whole]) / whole
    shed = ph["status"].get("503", 0)
    slowest = ph["max_ms_by_status"].get("503")
    res.update({
        "backends": stats,
        "max_concurrency": {n: s["max_concurrency"] for n, s in stats.items()},
        "goodput_rps": round(goodput, 1),
        "shed": shed, "slowest_shed_ms": slowest,
        "shed_within_bound": None if slowest is None else
        slowest <= (OVERLOAD_QUEUE_TIMEOUT + SHED_SLACK) * 1000,
        "rss_kib": rss, "load_wall_s": round(elapsed, 2),
    })
    log(f"  {p.name}: offered {res['offered_rate']:.0f} req/s (target {rate:.0f}), goodput "
        f"{res['goodput_rps']:.0f} req/s, shed {shed} (slowest {slowest} ms), other errors "
        f"{ph['errors'] - shed}, max concurrency {res['max_concurrency']}, RSS KiB {rss}")
    return res


# ---------------------------------------------------------------- report


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _errors(ph: dict[str, Any]) -> str:
    conn = sum(ph["conn_errors"].values())
    return f"{ph['errors']} ({ph['non2xx']} / {conn} / {ph['timeouts']})"


def report(cfg: Settings, info: dict[str, str], res: dict[str, Any],
           notes: list[str]) -> str:
    lines = [
        "# edgelb drills: failure and overload, side by side with HAProxy",
        "",
        f"- date: {info['date']}; nproc: {info['nproc']}; load average at start "
        f"{info['load_start']}, at end {info.get('load_end', '?')}",
        f"- haproxy: {info['haproxy']}",
        f"- edgelb: {info['edgelb']}; python: {info['python']}",
        f"- client: bench/drill_load.py, open loop, client timeout {CLIENT_TIMEOUT:g}s, up to "
        f"{cfg.conns} connections; backends: bench/drill_backends.py (one uvloop process)",
        "",
    ]
    if "failure" in res:
        lines += _failure_section(cfg, res["failure"])
    if "overload" in res:
        lines += _overload_section(cfg, res["overload"])
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _failure_section(cfg: Settings, f: dict[str, Any]) -> list[str]:
    lines = [
        "## Failure drill",
        "",
        f"Four backends, {FAILURE_WORKERS} workers x {FAILURE_SERVICE * 1000:g} ms each "
        f"({f['capacity_rps']:.0f} req/s in all), {f['rate']:.0f} req/s offered "
        f"({cfg.failure_load:.0%} of capacity) in three {f['phase_seconds']:g} s phases. "
        "During: b1 killed (listener closed, connections reset), b2 hangs (reads, never "
        "answers, /healthz included), b3 answers 500 to everything; b4 alone is healthy, so "
        "the offered load is twice what is left. After: all restored. Errors = non-2xx + "
        "connection errors + client timeouts; latency over every request sent (an error "
        "counts at the time it failed).",
        "",
        "| proxy | phase | sent | 2xx | errors (non-2xx / conn / timeout) | error % | "
        "p50 ms | p99 ms | p99 2xx ms | max ms | offered req/s |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for proxy, r in f["proxies"].items():
        for ph in r["phases"]:
            lat, ok = ph["latency_all_ms"], ph["latency_ok_ms"]
            pct = 100 * ph["errors"] / ph["sent"] if ph["sent"] else 0.0
            lines.append(
                f"| {proxy} | {ph['name']} | {ph['sent']} | {ph['ok']} | {_errors(ph)} | "
                f"{pct:.1f} | {_ms(lat['p50'])} | {_ms(lat['p99'])} | {_ms(ok['p99'])} | "
                f"{_ms(lat['max'])} | {ph['sent'] / ph['seconds']:.0f} |")
    lines += ["", "Per second over the three phases (2xx answers / errors completed in that "
              "second):", ""]
    for proxy, r in f["proxies"].items():
        n = int(3 * f["phase_seconds"])
        pairs = zip(r["timeline"]["ok"][:n], r["timeline"]["err"][:n], strict=True)
        lines.append(f"- {proxy}: " + " ".join(f"{a}/{b}" for a, b in pairs))
    lines += ["", "Status codes and backends per phase (served 200 / answered 500 / held by "
              "the hang / health checks answered):", ""]
    for proxy, r in f["proxies"].items():
        for ph in r["phases"]:
            bk = ph.get("backends", {})
            per = ", ".join(f"{n} {s['ok']}/{s['errors']}/{s['held']}/{s['health']}"
                            for n, s in bk.items())
            codes = ", ".join(f"{k}: {v}" for k, v in ph["status"].items())
            conn = ", ".join(f"{k}: {v}" for k, v in ph["conn_errors"].items()) or "none"
            lines.append(f"- {proxy} {ph['name']}: status {{{codes}}}; connection errors "
                         f"{conn}; unsent {ph['unsent']}; backends {per}")
    lines.append("")
    return lines


def _overload_section(cfg: Settings, o: dict[str, Any]) -> list[str]:
    bound = (OVERLOAD_QUEUE_TIMEOUT + SHED_SLACK) * 1000
    lines = [
        "## Overload drill",
        "",
        f"Four backends, {OVERLOAD_WORKERS} workers x {OVERLOAD_SERVICE * 1000:g} ms each "
        f"({o['capacity_rps']:.0f} req/s in all), {o['rate']:.0f} req/s offered "
        f"({cfg.overload_factor:g}x) for {o['seconds']:g} s; per-backend cap "
        f"{o['cap']} (edgelb max_inflight, HAProxy maxconn), queue timeout "
        f"{o['queue_timeout_s'] * 1000:.0f} ms. Max concurrency: the most requests a backend "
        "held at once (queued + in service). Shed: 503 answers; the slowest must come within "
        f"{bound:.0f} ms of the request.",
        "",
        "| proxy | offered req/s | goodput 2xx/s | vs capacity | max concurrency b1..b4 "
        "(cap) | shed (503) | slowest shed ms | within bound | other errors | p99 2xx ms | "
        "RSS KiB start / 2 s / end |",
        "|---|---:|---:|---:|---|---:|---:|---|---:|---:|---|",
    ]
    for proxy, r in o["proxies"].items():
        ph = r["phases"][0]
        mc = "/".join(str(v) for v in r["max_concurrency"].values())
        rss = r["rss_kib"]
        rss_s = f"{rss[0]} / {rss[min(2, len(rss) - 1)]} / {rss[-1]}" if rss else "n/a"
        within = {None: "n/a", True: "yes", False: "no"}[r["shed_within_bound"]]
        lines.append(
            f"| {proxy} | {r['offered_rate']:.0f} | {r['goodput_rps']:.0f} | "
            f"{r['goodput_rps'] / o['capacity_rps']:.0%} | {mc} ({o['cap']}) | {r['shed']} | "
            f"{_ms(r['slowest_shed_ms'])} | {within} | {ph['errors'] - r['shed']} | "
            f"{_ms(ph['latency_ok_ms']['p99'])} | {rss_s} |")
    lines += ["", "Load generator and RSS detail:", ""]
    for proxy, r in o["proxies"].items():
        ph = r["phases"][0]
        lag = ph["lag_ms"]
        codes = ", ".join(f"{k}: {v}" for k, v in ph["status"].items())
        lines.append(
            f"- {proxy}: sent {ph['sent']} of {ph['due']} due ({r['offered_rate']:.0f} req/s "
            f"of {r['target_rate']:.0f}), unsent {ph['unsent']}, send lag p99 "
            f"{_ms(lag['p99'])} ms max {_ms(lag['max'])} ms, connections opened "
            f"{r['connections_opened']} (at most {r['max_open']} open), generator CPU "
            f"{r.get('cpu_s', 'n/a')} s; status {{{codes}}}; "
            f"connection errors {ph['conn_errors'] or 'none'}, timeouts {ph['timeouts']}; "
            f"RSS KiB each second {r['rss_kib']}")
    lines.append("")
    return lines


# ---------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    which = argv[0] if argv else "all"
    if which in ("-h", "--help") or which not in (*DRILLS, "all") or len(argv) > 1:
        print(__doc__, file=sys.stderr)
        return 0 if which in ("-h", "--help") else 2
    bench.stop_on_signals(signal.SIGTERM, signal.SIGINT)  # SIGINT too: a background job ignores it
    bench.raise_nofile()
    cfg = Settings.from_env()
    drills = list(DRILLS) if which == "all" else [which]
    cfg.results.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="edgelb-drills-"))
    procs = ProcessSet(tmp)
    started = time.monotonic()
    info = bench.version_info(cfg)  # type: ignore[arg-type]  # uses .python only
    res: dict[str, Any] = {}
    notes: list[str] = []
    try:
        for d in drills:
            fn = drill_failure if d == "failure" else drill_overload
            res[d] = fn(cfg, procs, tmp, notes)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    info["load_end"] = bench.loadavg()
    text = report(cfg, info, res, notes) + \
        f"\nTotal drill time: {time.monotonic() - started:.0f}s\n"
    bench.save_results(cfg.results, "drills-", {
        "info": info, "settings": {k: str(v) for k, v in vars(cfg).items()},
        "results": res, "notes": notes}, text)
    print(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt as exc:
        log(f"drills: interrupted ({exc or 'SIGINT'}); all started processes stopped")
        sys.exit(130)
