"""Active health checks: one asyncio task per (service, backend) target.

`HealthChecker.sync()` is handed the whole set of targets on every snapshot; it starts, stops
and restarts tasks so that each target is checked every `interval` and its verdict follows
HAProxy's rise/fall counting. Verdict changes (and only changes) are reported through
`on_change(service, backend_key, healthy)` on the loop thread.

Rules worth knowing (the why is in each place below):

- Initial verdict. A target with `assume_healthy=True` (a backend already serving) starts
  healthy and is taken down after `fall` consecutive failures. A target with
  `assume_healthy=False` (a backend new to a running pool) starts down, is checked at once, and
  its first successful check makes it healthy straight away; every later rise needs `rise`
  consecutive successes. This follows Envoy, which marks a new host healthy on its first passing
  check so that scale-ups join quickly. (Envoy only grants this to the very first check; here
  the target keeps the fast path until it has passed once, so a replica still booting when it
  is first checked also joins on its first success.)
- Scheduling. Checks of one target start `interval` apart, each gap scaled by a random factor
  in [0.9, 1.1] so that many targets do not fall into step. A target that starts healthy
  waits a random offset within its first interval before its first check (HAProxy's
  spread-checks), so a big snapshot does not fire every check at the same moment. A target
  that starts down is checked at once. Checks of one target never overlap.
- A change of a target's address or check restarts its task with new counters, keeping its
  verdict (a config edit alone must not flap a backend). If it was down, the restarted target
  gets the fast path of a new one: checked at once, healthy on its first success.
  A change of `assume_healthy` alone changes nothing: it only matters when a target starts.
- Every failure is a failed check with a text, never an exception out of the task.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgelb.control.tasks import log_failure
from watchers.model import Address, HealthCheck

log = logging.getLogger(__name__)

JITTER = 0.1  # each gap between checks is interval * uniform(1 - JITTER, 1 + JITTER)
USER_AGENT = "edgelb-health-check"
STATUS_LINE_LIMIT = 8192  # bytes; a longer status line fails the check
TASK_PREFIX = "edgelb-health:"  # task names are TASK_PREFIX + "service/backend_key"

OnChange = Callable[[str, str, bool], None]
TargetKey = tuple[str, str]  # (service name, backend key)


@dataclass(frozen=True, slots=True)
class Target:
    """What to check for one backend of one service."""

    address: Address
    check: HealthCheck
    assume_healthy: bool = True  # the verdict before any check; see the module docstring
    # a check speaks to the backend as the traffic does: TLS when the service has backend_tls
    # (edgelb.net.backend_tls.BackendTLS), a PROXY protocol header first when it sends one
    tls: Any = None
    proxy_protocol: int = 0


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one check."""

    ok: bool
    text: str  # "HTTP 200 in 3.1 ms", "connect refused", "timeout after 1s", ...


class _Checked:
    """The live state of one target: its verdict, counters and task."""

    __slots__ = (
        "checks_total",
        "failures",
        "failures_total",
        "healthy",
        "key",
        "last_check",
        "last_ok",
        "last_result",
        "proven",
        "successes",
        "target",
        "task",
    )

    def __init__(self, key: TargetKey, target: Target, healthy: bool) -> None:
        self.key = key
        self.target = target
        self.healthy = healthy
        # False until the first success while down: that success makes it healthy at once.
        self.proven = healthy
        self.successes = 0  # consecutive
        self.failures = 0  # consecutive
        self.checks_total = 0
        self.failures_total = 0
        self.last_result = "not checked yet"
        self.last_ok: bool | None = None
        self.last_check: float | None = None  # unix time of the last check's end
        self.task: asyncio.Task[None] | None = None

    def record(self, result: Result) -> bool:
        """Count one check; returns True when the verdict flipped."""
        self.checks_total += 1
        self.last_result = result.text
        self.last_ok = result.ok
        self.last_check = time.time()
        check = self.target.check
        if result.ok:
            self.successes += 1
            self.failures = 0
            if not self.healthy and (not self.proven or self.successes >= check.rise):
                self.healthy = self.proven = True
                return True
        else:
            self.failures_total += 1
            self.failures += 1
            self.successes = 0
            if self.healthy and self.failures >= check.fall:
                self.healthy = False
                return True
        return False


class HealthChecker:
    """Runs the active checks of many (service, backend) targets on one event loop.

    `sync()` and `close()` are called on the loop's thread, and `on_change` is called there.
    """

    def __init__(
        self,
        on_change: OnChange,
        rng: random.Random | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._on_change = on_change
        self._rng = rng or random.Random()
        self._loop = loop
        self._targets: dict[TargetKey, _Checked] = {}
        self._closed = False

    # -- the runtime's side ----------------------------------------------------------------

    def sync(self, targets: Mapping[TargetKey, Target]) -> None:
        """Make the checked set equal `targets`. Cheap when nothing changed: unchanged targets
        (same address and check) keep their task, verdict and counters."""
        if self._closed:
            raise RuntimeError("HealthChecker.sync() after close(); make a new HealthChecker")
        for key in [k for k in self._targets if k not in targets]:
            self._stop(self._targets.pop(key))
        for key, target in targets.items():
            old = self._targets.get(key)
            if old is None:
                self._start(key, target, target.assume_healthy)
            elif (old.target.address, old.target.check, old.target.tls,
                  old.target.proxy_protocol) != (target.address, target.check, target.tls,
                                                 target.proxy_protocol):
                self._stop(old)
                self._start(key, target, old.healthy, totals=old)

    async def close(self) -> None:
        """Stop every check and wait until their tasks have ended."""
        self._closed = True
        tasks = [c.task for c in self._targets.values() if c.task is not None]
        for checked in self._targets.values():
            self._stop(checked)
        self._targets.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def healthy(self, service: str, key: str) -> bool | None:
        """The verdict of a target; None when it is not checked."""
        checked = self._targets.get((service, key))
        return None if checked is None else checked.healthy

    def status(self, service: str, key: str) -> dict[str, Any]:
        """The state of a target for /status.json; `healthy` is None when it is not checked."""
        checked = self._targets.get((service, key))
        if checked is None:
            return {"healthy": None, "last_result": "not checked", "checks_total": 0,
                    "failures_total": 0, "last_check": None}
        check = checked.target.check
        return {
            "healthy": checked.healthy,
            "last_result": checked.last_result,
            "last_ok": checked.last_ok,
            "last_check": checked.last_check,
            "checks_total": checked.checks_total,
            "failures_total": checked.failures_total,
            "consecutive_successes": checked.successes,
            "consecutive_failures": checked.failures,
            "kind": check.kind,
            "target": str(checked.target.address),
        }

    def __len__(self) -> int:
        return len(self._targets)

    # -- tasks -----------------------------------------------------------------------------

    def _start(self, key: TargetKey, target: Target, healthy: bool,
               totals: _Checked | None = None) -> None:
        checked = _Checked(key, target, healthy)
        if totals is not None:  # a restart keeps the monotonic counters for /status.json
            checked.checks_total = totals.checks_total
            checked.failures_total = totals.failures_total
            checked.last_result = totals.last_result
            checked.last_ok = totals.last_ok
            checked.last_check = totals.last_check
        loop = self._loop or asyncio.get_running_loop()
        checked.task = loop.create_task(self._run(checked), name=f"{TASK_PREFIX}{key[0]}/{key[1]}")
        checked.task.add_done_callback(log_failure)  # held here; a bug in it is not silent
        self._targets[key] = checked

    @staticmethod
    def _stop(checked: _Checked) -> None:
        if checked.task is not None:
            checked.task.cancel()

    async def _run(self, checked: _Checked) -> None:
        loop = asyncio.get_running_loop()
        check = checked.target.check
        interval = max(check.interval, 0.001)
        # A down target is checked at once so that it can join quickly; a healthy one is
        # spread over its first interval.
        start = loop.time() + (0.0 if not checked.healthy else self._rng.uniform(0, interval))
        while True:
            delay = start - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            start = loop.time()
            target = checked.target
            result = await probe(target.address, check, target.tls, target.proxy_protocol)
            if self._targets.get(checked.key) is not checked:
                return  # stopped while its check ran (by a sync() inside on_change)
            if checked.record(result):
                self._report(checked)
            start += interval * self._rng.uniform(1 - JITTER, 1 + JITTER)

    def _report(self, checked: _Checked) -> None:
        service, key = checked.key
        try:
            self._on_change(service, key, checked.healthy)
        except Exception:
            log.exception("health check on_change(%s, %s, %s) failed", service, key,
                          checked.healthy)


# -- one check -----------------------------------------------------------------------------


async def probe(address: Address, check: HealthCheck, tls: Any = None,
                proxy_protocol: int = 0) -> Result:
    """Run one check of `address`. Never raises (except on cancellation).

    With `tls` (a BackendTLS) the check connects over TLS, verified as the traffic is: a tcp
    check passes on a completed handshake, an http check sends its request inside. With
    `proxy_protocol` a LOCAL header (v2; UNKNOWN in v1) goes first, before any TLS, as the
    backend expects on every connection (HAProxy's check-send-proxy)."""
    if check.kind not in ("http", "tcp", "grpc"):
        return Result(False, f"unknown check kind {check.kind!r} (use http, tcp or grpc)")
    loop = asyncio.get_running_loop()
    began = loop.time()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(check.timeout):
            # an http check offers http/1.1 as the proxied requests do; a tcp one offers nothing
            alpn = {"http": ("http/1.1",), "grpc": ("h2",)}.get(check.kind, ())
            reader, writer = await _connect(address, tls, proxy_protocol, alpn)
            if check.kind == "tcp":
                what = "TLS handshake" if tls is not None else "TCP connect"
                return Result(True, f"{what} in {_ms(loop.time() - began)}")
            if check.kind == "grpc":  # grpc.health.v1 over h2c, or h2 over TLS
                from edgelb.h2.health import grpc_health

                healthy, seen = await grpc_health(
                    reader, writer, check.host or str(address), check.service,
                    "https" if tls is not None else "http")
                return Result(healthy, f"gRPC {seen} in {_ms(loop.time() - began)}")
            writer.write(_request(address, check))
            line = await reader.readuntil(b"\n")
        code = _status_code(line)
        took = _ms(loop.time() - began)
        if code is None:
            return Result(False, f"not an HTTP status line: {line[:60]!r}")
        lo, hi = check.status
        if lo <= code <= hi:
            return Result(True, f"HTTP {code} in {took}")
        return Result(False, f"HTTP {code} in {took} (expected {lo}-{hi})")
    except TimeoutError:
        return Result(False, f"timeout after {check.timeout:g}s")
    except ssl.SSLError as e:
        why = getattr(e, "verify_message", None) or e.reason or e
        return Result(False, f"TLS handshake failed: {why}")
    except ConnectionRefusedError:
        return Result(False, "connect refused")
    except asyncio.IncompleteReadError:
        return Result(False, "connection closed before the status line")
    except asyncio.LimitOverrunError:
        return Result(False, f"status line longer than {STATUS_LINE_LIMIT} bytes")
    except ConnectionResetError:
        return Result(False, "connection reset")
    except OSError as e:
        return Result(False, f"connect error: {e.strerror or e}")
    except Exception as e:  # a check must never kill its loop
        return Result(False, f"check error: {type(e).__name__}: {e}")
    finally:
        if writer is not None:
            # Close without a graceful shutdown: the body (if any) is not wanted.
            writer.transport.abort()


async def _connect(address: Address, tls: Any, proxy_protocol: int, alpn: tuple[str, ...]
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    extra: dict[str, Any] = {}
    if tls is not None:
        from edgelb.net.backend_tls import client_context, server_hostname

        extra = {"ssl": client_context(tls, alpn=alpn),
                 "server_hostname": server_hostname(tls, address.host)}
    if not proxy_protocol:
        return await asyncio.open_connection(address.host, address.port,
                                             limit=STATUS_LINE_LIMIT, **extra)
    # the header must come before the TLS ClientHello: connect, send it, then go on
    from edgelb.net.proxy_protocol import local

    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, sockaddr)
        await loop.sock_sendall(sock, local(proxy_protocol))
        return await asyncio.open_connection(sock=sock, limit=STATUS_LINE_LIMIT, **extra)
    except BaseException:
        sock.close()
        raise


def _request(address: Address, check: HealthCheck) -> bytes:
    host = check.host or str(address)
    return (
        f"{check.method} {check.path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("latin-1")


def _status_code(line: bytes) -> int | None:
    """The code of an `HTTP/1.x NNN reason` line, or None."""
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return None
    code = parts[1]
    if len(code) != 3 or not code.isdigit():
        return None
    return int(code)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"
