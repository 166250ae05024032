"""What control and the workers say to each other over a channel: frozen, picklable values.

Control -> worker: `Init` (first), then in order `Apply` (a snapshot control's runtime
accepted), `HealthResult` (a verdict of control's health checks), `Drain` (shut down as the
single process does), and `Ask` (metrics and status, answered out of order with `Answer`).
Worker -> control: `Hello` (it runs and has applied what it was sent so far: ready),
`Answer`, `Refused` (it could not apply a snapshot control accepted)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from watchers.model import Address, Snapshot


@dataclass(frozen=True, slots=True)
class Init:
    """What a worker needs before its first snapshot."""

    index: int
    admin: Address  # reserved: never a data port
    telemetry: Any = None  # edgelb.telemetry.settings.TelemetrySettings when active
    shared_load: Any = None  # the shared load table's handle (None: none)
    shared_limits: Any = None  # the shared per-client limits table's handle (None: none)


@dataclass(frozen=True, slots=True)
class Apply:
    """One snapshot, applied by the worker's runtime as control's runtime applied it."""

    snapshot: Snapshot
    reload_files: bool = False
    record_as: str | None = None


@dataclass(frozen=True, slots=True)
class HealthResult:
    """A verdict change of control's health checks (through the worker runtime's health door)."""

    service: str
    key: str
    healthy: bool
    status: Any = None  # the check's last result, for /status.json (a dict)


@dataclass(frozen=True, slots=True)
class Synced:
    """Everything so far was sent: the worker answers `Hello` once it has applied it."""


@dataclass(frozen=True, slots=True)
class Drain:
    """SIGTERM: unready, wait `delay`, stop accepting, drain up to `grace`, exit."""

    delay: float
    grace: float


@dataclass(frozen=True, slots=True)
class Ask:
    """A question answered at once: what = "metrics" | "status"."""

    id: int
    what: str
    arg: Any = None  # metrics: whether per-backend series are wanted


@dataclass(frozen=True, slots=True)
class Answer:
    id: int
    value: Any


@dataclass(frozen=True, slots=True)
class Hello:
    """The worker applied everything up to `Synced`: it serves."""

    index: int
    pid: int


@dataclass(frozen=True, slots=True)
class Refused:
    """The worker's runtime rejected a snapshot control's runtime had accepted (e.g. a bind
    that failed only there): it keeps serving its last good state, and control says so."""

    index: int
    source: str
    errors: tuple[str, ...]
