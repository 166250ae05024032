"""How many cores this process may use: `workers: auto`.

In a container the CPU quota is the limit, not the host's cores: cgroup v2 `cpu.max`
("max 100000" or "200000 100000"), else cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`
(-1: none), rounded up; else the CPUs the process may run on (`sched_getaffinity`). The
reads are injected so the arithmetic is tested without a cgroup."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

CGROUP_V2 = "/sys/fs/cgroup/cpu.max"
CGROUP_V1 = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read(256)
    except OSError:
        return None


def quota_cores(read: Callable[[str], str | None] = _read) -> int | None:
    """The cgroup CPU quota in cores (rounded up), None when there is none or it is unreadable."""
    text = read(CGROUP_V2)
    if text is not None:
        parts = text.split()
        if len(parts) == 2 and parts[0] != "max":
            return _ratio(parts[0], parts[1])
        return None
    quota, period = read(CGROUP_V1[0]), read(CGROUP_V1[1])
    if quota is None or period is None:
        return None
    return _ratio(quota.strip(), period.strip())


def _ratio(quota: str, period: str) -> int | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:  # v1: -1 means no quota
        return None
    return max(1, math.ceil(q / p))


def usable_cores(read: Callable[[str], str | None] = _read,
                 affinity: Callable[[], int] | None = None) -> int:
    """The cores `workers: auto` runs on: the quota, else the CPUs in the affinity mask
    (the smaller of the two when both are known)."""
    allowed = affinity() if affinity is not None else len(os.sched_getaffinity(0))
    quota = quota_cores(read)
    return max(1, min(allowed, quota) if quota is not None else allowed)


def resolve(workers: int | str) -> int:
    """`workers:` as a count ("auto": usable_cores())."""
    return usable_cores() if workers == "auto" else int(workers)
