"""Auth drill (issue 4): wrong passwords sent as fast as they can go to one service must not
stall another service of the same edgelb.

    .venv/bin/python bench/drill_auth.py                 # ~3 minutes on 2 cores
    .venv/bin/python bench/drill_auth.py attack --port P [--conns 16] [--seconds 12]

One edgelb process, two services in front of one fast backend (bench/drill_backends.py):
`locked` asks for basic auth (user alice, hashed with the scheme under test), `open` does not.
bench/drill_load.py offers `open` a steady open-loop load (DRILL_AUTH_RATE req/s) in four
phases: warmup, unloaded, ramp, loaded. When the ramp begins, the attacker (this script's
`attack` command, its own process) opens 16 keep-alive connections to `locked` and sends, on
each, request after request with a new wrong password every time (so no cache can answer),
as fast as answers come back, until the loaded phase is over. Per run: the p99 latency of
`open` unloaded and loaded and whether p99_loaded <= 2 x p99_unloaded + 10 ms (issue 4's
target); what the attacker got (401, 429, 503) and at what rate; how many hashes edgelb
computed (edgelb_auth_total); edgelb's CPU in the loaded phase.

Runs: each scheme (DRILL_AUTH_SCHEMES: scrypt, sha512-crypt, bcrypt) with the failure
throttle on (the default, max_failures 10 per 10 s: the attacker is one address) and off
(max_failures 0: every guess is hashed, the case of an attacker with many addresses).

Prints a markdown report (progress on stderr) and writes it with the raw figures to
bench/results/drill-auth-<UTC stamp>.{md,json} and drill-auth-latest.{md,json}. Everything
listens on 127.0.0.1; every process started here leads its own process group and is stopped
on exit, Ctrl-C included; every loop is bounded in time.

Knobs (environment): DRILL_AUTH_SECONDS (10: unloaded and loaded phases), DRILL_AUTH_RATE
(300 req/s to `open`), DRILL_AUTH_SCHEMES (scrypt,sha512-crypt,bcrypt), DRILL_AUTH_THROTTLE
(on,off), DRILL_WARMUP_SECONDS (2), BENCH_RESULTS, BENCH_EDGELB_PYTHON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # bench.py: process groups, ports, templates
from bench import ProcessSet, free_port, render, wait_ready

BENCH_DIR = bench.BENCH_DIR
REPO = bench.REPO
SCHEMES = ("scrypt", "sha512-crypt", "bcrypt")
THROTTLE = ("on", "off")
ATTACK_CONNS = 16
RAMP_SECONDS = 2.0  # the attacker starts here; not measured
CLIENT_TIMEOUT = 2.0
MAX_ATTACK_REQUESTS = 10_000_000  # a bound on the attacker's loop besides its time
PASSWORD = "drill-password"
# How each scheme's hash is made (by the edgelb interpreter): the expensive defaults.
HASH_CODE = {
    "scrypt": "from edgelb.net.acl import scrypt_hash; print(scrypt_hash(PW))",  # N=16384 r=8 p=1
    "sha512-crypt":
        "from edgelb.net.acl import sha_crypt; print(sha_crypt(PW, '$6$drillsaltdrill'))",
    "bcrypt": "import bcrypt; print(bcrypt.hashpw(PW.encode(), bcrypt.gensalt(10)).decode())",
}
SCHEME_NOTE = {
    "scrypt": "N=16384 r=8 p=1 (hashlib, releases the GIL)",
    "sha512-crypt": "5000 rounds (pure Python: holds the GIL, in 1000-round slices)",
    "bcrypt": "cost 10 (bcrypt package, releases the GIL)",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the attacker


class _Attack(asyncio.Protocol):
    """One keep-alive connection sending wrong passwords back to back."""

    def __init__(self, gen: Attacker, n: int) -> None:
        import httptools

        self.gen, self.n = gen, n
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.status = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        gen = self.gen
        if not gen.running() or self.transport is None or self.transport.is_closing():
            return
        gen.sent += 1
        gen.in_flight += 1
        token = base64.b64encode(f"alice:wrong-{self.n}-{gen.sent}".encode()).decode()
        self.busy = True
        self.transport.write(f"GET / HTTP/1.1\r\nHost: drill\r\nAuthorization: Basic {token}"
                             "\r\n\r\n".encode())

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.gen.count_error("parse")
            self.transport.close()  # type: ignore[union-attr]

    def on_status(self, _: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self.busy = False
        self.gen.in_flight -= 1
        self.gen.count_status(self.status)
        if self.parser.should_keep_alive():
            self.send()
        else:
            self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy:
            self.busy = False
            self.gen.in_flight -= 1
            self.gen.count_error("reset" if isinstance(exc, ConnectionResetError) else "closed")
        self.transport = None
        self.gen.reconnect(self.n)


class Attacker:
    """`conns` connections to 127.0.0.1:port, each a closed loop of wrong passwords."""

    def __init__(self, port: int, conns: int, seconds: float,
                 grace: float = CLIENT_TIMEOUT) -> None:
        self.port, self.conns, self.seconds, self.grace = port, conns, seconds, grace
        self.sent = 0
        self.in_flight = 0
        self.status: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.deadline = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None

    def running(self) -> bool:
        return time.monotonic() < self.deadline and self.sent < MAX_ATTACK_REQUESTS

    def count_status(self, status: int) -> None:
        self.status[status] = self.status.get(status, 0) + 1

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def reconnect(self, n: int) -> None:
        if self.running() and self.loop is not None:
            self.loop.create_task(self._connect(n))

    async def _connect(self, n: int) -> None:
        assert self.loop is not None
        try:
            await self.loop.create_connection(lambda: _Attack(self, n), "127.0.0.1", self.port)
        except OSError:
            self.count_error("connect")
            await asyncio.sleep(0.05)
            self.reconnect(n)

    async def run(self) -> dict[str, Any]:
        self.loop = asyncio.get_running_loop()
        started = time.monotonic()
        self.deadline = started + self.seconds
        for n in range(self.conns):
            await self._connect(n)
        await asyncio.sleep(max(0.0, self.deadline - time.monotonic()))
        until = time.monotonic() + self.grace  # answers still due come in (bounded)
        while self.in_flight > 0 and time.monotonic() < until:
            await asyncio.sleep(0.01)
        answered = sum(self.status.values())
        return {"conns": self.conns, "seconds": self.seconds, "sent": self.sent,
                "answered": answered, "unanswered": self.in_flight,
                "rate": round(answered / self.seconds, 1),
                "status": {str(k): v for k, v in sorted(self.status.items())},
                "errors": dict(sorted(self.errors.items()))}


def attack_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="drill_auth.py attack",
                                 description="wrong passwords, as fast as answers come")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--conns", type=int, default=ATTACK_CONNS)
    ap.add_argument("--seconds", type=float, default=12.0)
    args = ap.parse_args(argv)
    gen = Attacker(args.port, args.conns, args.seconds)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(gen.run())
    else:
        result = uvloop.run(gen.run())
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------- the driver


@dataclass
class Settings:
    seconds: float
    rate: float
    schemes: list[str]
    throttle: list[str]
    warmup: float
    results: Path
    python: str
    conns: int = 200  # drills.run_load: most connections of the load generator

    @classmethod
    def from_env(cls) -> Settings:
        from drills import env_float

        python = os.environ.get("BENCH_EDGELB_PYTHON") or (
            str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists()
            else sys.executable)
        return cls(
            seconds=env_float("DRILL_AUTH_SECONDS", 10.0, 1.0),
            rate=env_float("DRILL_AUTH_RATE", 300.0, 1.0),
            schemes=bench.env_list("DRILL_AUTH_SCHEMES", SCHEMES, SCHEMES),
            throttle=bench.env_list("DRILL_AUTH_THROTTLE", THROTTLE, THROTTLE),
            warmup=env_float("DRILL_WARMUP_SECONDS", 2.0),
            results=Path(os.environ.get("BENCH_RESULTS") or BENCH_DIR / "results"),
            python=python,
        )


def make_hash(python: str, scheme: str) -> tuple[str, float]:
    """(stored hash of PASSWORD, seconds one verification takes) with the edgelb interpreter."""
    out = subprocess.run([python, "-c", HASH_CODE[scheme].replace("PW", repr(PASSWORD))],
                         capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    stored = out.stdout.strip()
    timing = subprocess.run(
        [python, "-c", "import base64, sys, time\nfrom edgelb.net.acl import Credentials\n"
         "c = Credentials('r', ['alice:' + sys.argv[1]], cache_ttl=0)\n"
         "h = b'Basic ' + base64.b64encode(b'alice:wrong')\nt = time.perf_counter()\n"
         "for _ in range(5): c.check(h)\nprint((time.perf_counter() - t) / 5)", stored],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    return stored, float(timing.stdout.strip())


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def auth_counts(admin_port: int) -> dict[str, float]:
    """edgelb_auth_total{service="locked"} by result, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith('edgelb_auth_total{') and 'service="locked"' in line:
            result = line.split('result="', 1)[1].split('"', 1)[0]
            out[result] = float(line.rsplit(" ", 1)[1])
    return out


def one_run(cfg: Settings, procs: ProcessSet, tmp: Path, backend_port: int, scheme: str,
            stored: str, throttle: str) -> dict[str, Any]:
    from drills import read_line, run_load

    name = f"edgelb-{scheme}-throttle-{throttle}"
    ports = {"admin_port": free_port(), "locked_port": free_port(), "open_port": free_port()}
    conf = render("edgelb-drill-auth.yaml", tmp / f"{name}.yaml", backend_port=backend_port,
                  hash=stored, max_failures=10 if throttle == "on" else 0, **ports)
    proxy = procs.start(name, [cfg.python, "-m", "edgelb", "run", "-c", str(conf)], cwd=REPO)
    attacker: list[subprocess.Popen[str]] = []
    cpu: dict[str, float] = {}
    try:
        wait_ready(procs, proxy, name, ports["open_port"])
        phases = [cfg.warmup, cfg.seconds, RAMP_SECONDS, cfg.seconds] if cfg.warmup else \
            [cfg.seconds, RAMP_SECONDS, cfg.seconds]
        names = (["warmup"] if cfg.warmup else []) + ["unloaded", "ramp", "loaded"]

        def on_phase(n: int) -> None:
            phase = names[n - 1]
            cpu[phase] = cpu_seconds(proxy.pid)
            if phase == "ramp":
                attacker.append(procs.start_piped(
                    f"{name}-attack",
                    [cfg.python, str(Path(__file__).resolve()), "attack",
                     "--port", str(ports["locked_port"]), "--conns", str(ATTACK_CONNS),
                     "--seconds", f"{RAMP_SECONDS + cfg.seconds + 0.5:g}"], cwd=REPO))
                log(f"  {name}: attacker started ({ATTACK_CONNS} connections)")

        res = run_load(cfg, procs, f"{name}-load", ports["open_port"],  # type: ignore[arg-type]
                       cfg.rate, phases, names, on_phase=on_phase)
        cpu["end"] = cpu_seconds(proxy.pid)
        attack: dict[str, Any] = {}
        if attacker:
            line = read_line(attacker[0], "RESULT ", RAMP_SECONDS + cfg.seconds + 15,
                             "the attacker")
            attack = json.loads(line[7:])
        counts = auth_counts(ports["admin_port"])
    finally:
        for p in attacker:
            procs.stop(p)
        procs.stop(proxy)
    by_name = {ph["name"]: ph for ph in res["phases"]}
    unloaded, loaded = by_name["unloaded"], by_name["loaded"]
    p99_u = unloaded["latency_ok_ms"]["p99"]
    p99_l = loaded["latency_ok_ms"]["p99"]
    bound = None if p99_u is None else 2 * p99_u + 10
    out = {
        "scheme": scheme, "throttle": throttle, "unloaded": unloaded, "loaded": loaded,
        "p99_unloaded_ms": p99_u, "p99_loaded_ms": p99_l, "bound_ms": bound,
        "met": None if bound is None or p99_l is None else p99_l <= bound,
        "attack": attack, "auth_total": counts,
        "proxy_cpu_loaded": round((cpu["end"] - cpu["loaded"]) / cfg.seconds, 2)
        if "loaded" in cpu else None,
        "proxy_cpu_unloaded": round((cpu["ramp"] - cpu["unloaded"]) / cfg.seconds, 2)
        if "ramp" in cpu and "unloaded" in cpu else None,
        "offered_rate": res.get("offered_rate"),
    }
    log(f"  {name}: p99 open unloaded {p99_u} ms, loaded {p99_l} ms (bound {bound}), "
        f"attacker {attack.get('rate')} req/s {attack.get('status')}, hashes "
        f"{counts.get('failed', 0) + counts.get('ok', 0):.0f}")
    return out


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def report(cfg: Settings, info: dict[str, str], runs: list[dict[str, Any]],
           hashes: dict[str, float], notes: list[str]) -> str:
    lines = [
        "# edgelb auth drill: wrong passwords on one service, latency of another",
        "",
        f"- date: {info['date']}; nproc: {info['nproc']}; load average at start "
        f"{info['load_start']}, at end {info.get('load_end', '?')}",
        f"- edgelb: {info['edgelb']}; python: {info['python']}",
        f"- `open`: bench/drill_load.py, open loop, {cfg.rate:g} req/s, phases "
        f"{cfg.warmup:g} s warmup, {cfg.seconds:g} s unloaded, {RAMP_SECONDS:g} s ramp (attack "
        f"starts), {cfg.seconds:g} s loaded; `locked`: {ATTACK_CONNS} keep-alive connections "
        "from 127.0.0.1, a new wrong password on every request, closed loop (as fast as "
        "answers come); one backend (drill_backends.py, 64 workers, no service time)",
        "- target (issue 4): p99 of `open` loaded <= 2 x p99 unloaded + 10 ms",
        "",
        "| scheme | throttle | one hash ms | p99 unloaded ms | p99 loaded ms | bound ms | met "
        "| p50 loaded ms | open errors | attacker req/s | attacker answers | hashes computed "
        "| edgelb CPU loaded |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in runs:
        a = r["attack"]
        answers = ", ".join(f"{k}: {v}" for k, v in a.get("status", {}).items()) or "none"
        if a.get("errors"):
            answers += "; errors " + ", ".join(f"{k}: {v}" for k, v in a["errors"].items())
        hashed = r["auth_total"].get("failed", 0.0) + r["auth_total"].get("ok", 0.0)
        met = {None: "n/a", True: "yes", False: "**no**"}[r["met"]]
        lines.append(
            f"| {r['scheme']} | {r['throttle']} | {hashes[r['scheme']] * 1000:.1f} | "
            f"{_ms(r['p99_unloaded_ms'])} | {_ms(r['p99_loaded_ms'])} | {_ms(r['bound_ms'])} | "
            f"{met} | {_ms(r['loaded']['latency_ok_ms']['p50'])} | {r['loaded']['errors']} | "
            f"{a.get('rate', 'n/a')} | {answers} | {hashed:.0f} | "
            f"{r['proxy_cpu_loaded']} |")
    lines += [
        "",
        "Schemes: " + "; ".join(f"{s}: {SCHEME_NOTE[s]}" for s in cfg.schemes) + ". "
        "Hashes computed: edgelb_auth_total{result=\"failed\"} of `locked` (every password "
        "differs, so each 401 cost one hash; 429 and 503 answers cost none). edgelb CPU: "
        "user + system seconds of the edgelb process per second of the loaded phase (1.0 = "
        "one core).",
        "",
    ]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "attack":
        return attack_main(argv[1:])
    if argv:
        print(__doc__, file=sys.stderr)
        return 0 if argv[0] in ("-h", "--help") else 2
    bench.stop_on_signals(signal.SIGTERM, signal.SIGINT)
    bench.raise_nofile()
    cfg = Settings.from_env()
    cfg.results.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="edgelb-drill-auth-"))
    procs = ProcessSet(tmp)
    started = time.monotonic()
    info = bench.version_info(cfg)  # type: ignore[arg-type]  # uses .python only
    runs: list[dict[str, Any]] = []
    notes: list[str] = []
    hashes: dict[str, float] = {}
    try:
        from drills import Backends

        backends = Backends(procs, cfg.python, "auth-backend", ["b:64:0"])
        for scheme in cfg.schemes:
            stored, seconds = make_hash(cfg.python, scheme)
            hashes[scheme] = seconds
            log(f"{scheme}: one verification takes {seconds * 1000:.1f} ms")
            for throttle in cfg.throttle:
                try:
                    runs.append(one_run(cfg, procs, tmp, backends.ports["b"], scheme, stored,
                                        throttle))
                except RuntimeError as exc:
                    notes.append(f"{scheme}, throttle {throttle}: "
                                 f"{' '.join(str(exc).split())[:600]}")
                    log(f"  {scheme} throttle {throttle}: {exc}")
        backends.stop()
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    info["load_end"] = bench.loadavg()
    text = report(cfg, info, runs, hashes, notes) + \
        f"\nTotal drill time: {time.monotonic() - started:.0f}s\n"
    bench.save_results(cfg.results, "drill-auth-", {
        "info": info, "settings": {k: str(v) for k, v in vars(cfg).items()},
        "hash_seconds": hashes, "runs": runs, "notes": notes}, text)
    print(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt as exc:
        log(f"drill_auth: interrupted ({exc or 'SIGINT'}); all started processes stopped")
        sys.exit(130)
