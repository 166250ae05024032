"""Per-client limits of one route (watchers.model.ClientLimits): a token bucket of requests
per client address (ingress-nginx's limit-rps) and a count of one client's requests in flight
(limit-connections). The address is the one the ACLs use (`ClientProtocol.xff_ip`: after a
PROXY header or trusted forwarding).

Every table is bounded, so clients from many addresses cannot grow memory:

- buckets: at most MAX_BUCKETS addresses per route, least recently seen first out. A client
  pushed out comes back with a full bucket: at the bound a flood from many addresses makes
  the limit more lenient for the addresses it evicts, never the table larger.
- in flight: an address is held only while it has requests in flight, so the table is
  bounded by the requests in flight (the listeners' connection limits, HTTP/2's streams);
  it also stops at MAX_BUCKETS addresses: beyond that a new address is refused
  (`client_connections`) until others finish.
- exempt: SourceFilter's bounded per-address cache.

Pure: the caller gives the clock.

A worker of a group (`workers` > 1) gives each limiter a *group view*
(edgelb/workers/shared_limits.py LimitsView, passed in by the Router, never imported here):
then the in-flight count is the group's and the bucket is the group's, rebuilt at each
decision from what every worker left in the client's cell, so the limits hold for the group
within the bound stated there (W workers deciding at one instant: at most W - 1 over).
Without a view (a single process) the decisions are this module's own, at their old cost.
"""

from __future__ import annotations

import math
from typing import Any

from edgelb.net.acl import SourceFilter
from watchers.model import ClientLimits

MAX_BUCKETS = 16384  # addresses per route in each table
BURST_MULTIPLIER = 5  # burst 0: rps * 5, as ingress-nginx's limit-burst-multiplier

ADMITTED = 0
RATE_LIMITED = 1
TOO_MANY_CONNECTIONS = 2
EXEMPT = 3


class ClientLimiter:
    """The live state of one route's ClientLimits (shared by the rules of that route)."""

    __slots__ = ("buckets", "burst", "connections", "exempt", "group", "ident", "inflight",
                 "limits", "rps")

    def __init__(self, limits: ClientLimits, group: Any = None, name: str = "") -> None:
        """`group`: a worker's view of the group's limits (None: this process alone); `name`
        names the limiter the same in every worker (its route's name)."""
        self.limits = limits
        self.group = group
        self.ident = group.identity(name, limits) if group is not None else b""
        self.rps = limits.rps
        self.burst = float(limits.burst or max(1, math.ceil(limits.rps * BURST_MULTIPLIER)))
        self.connections = limits.connections
        self.exempt = SourceFilter(allow=limits.exempt) if limits.exempt else None
        # address -> [tokens, time of the last refill]; dict order = least recently seen first
        self.buckets: dict[bytes, list[float]] = {}
        self.inflight: dict[bytes, int] = {}

    def admit(self, ip: bytes, now: float) -> int:
        """ADMITTED (a slot taken when `connections` is set: give it back with `release`),
        EXEMPT (nothing taken), RATE_LIMITED or TOO_MANY_CONNECTIONS."""
        exempt = self.exempt
        if exempt is not None and exempt.permits(ip):
            return EXEMPT
        if self.group is not None:
            return self._admit_group(ip, now)
        if self.connections:
            n = self.inflight.get(ip, 0)
            if n >= self.connections or (not n and len(self.inflight) >= MAX_BUCKETS):
                return TOO_MANY_CONNECTIONS
        if self.rps > 0.0 and not self._take(ip, now):
            return RATE_LIMITED
        if self.connections:
            self.inflight[ip] = self.inflight.get(ip, 0) + 1
        return ADMITTED

    def _take(self, ip: bytes, now: float) -> bool:
        buckets = self.buckets
        entry = buckets.pop(ip, None)
        if entry is None:
            if len(buckets) >= MAX_BUCKETS:
                del buckets[next(iter(buckets))]  # the least recently seen address
            entry = [self.burst, now]
        else:
            tokens = entry[0] + (now - entry[1]) * self.rps
            entry[0] = tokens if tokens < self.burst else self.burst
            entry[1] = now
        buckets[ip] = entry  # (re)inserted last: the most recently seen
        if entry[0] >= 1.0:
            entry[0] -= 1.0
            return True
        return False

    def _admit_group(self, ip: bytes, now: float) -> int:
        """`admit` for a worker of a group: the client's cell holds the group's count and
        bucket; this worker's tables keep the address's cell (`buckets`: [tokens, time, cell])
        and its own in flight (so the table bounds hold as without a group)."""
        group = self.group
        buckets = self.buckets
        entry = buckets.pop(ip, None)
        if entry is None:
            if len(buckets) >= MAX_BUCKETS:
                del buckets[next(iter(buckets))]  # the least recently seen address
            entry = [self.burst, now, float(group.cell(self.ident, ip))]
        buckets[ip] = entry
        cell = int(entry[2])
        if self.connections:
            n = self.inflight.get(ip, 0)
            if ((not n and len(self.inflight) >= MAX_BUCKETS)
                    or group.inflight(cell) >= self.connections):
                return TOO_MANY_CONNECTIONS
        if self.rps > 0.0:
            tokens = group.bucket(cell, now, self.rps, self.burst)
            if tokens < 1.0:
                entry[0], entry[1] = tokens, now
                return RATE_LIMITED
            entry[0], entry[1] = tokens - 1.0, now
            group.take(cell, tokens - 1.0, now)  # with no await since `bucket`
        if self.connections:
            self.inflight[ip] = self.inflight.get(ip, 0) + 1
            group.add_inflight(cell, 1)
        return ADMITTED

    def retry_after(self, ip: bytes) -> int:
        """Whole seconds (>= 1) until `ip`'s bucket holds a request again."""
        entry = self.buckets.get(ip)
        if entry is None or self.rps <= 0.0:
            return 1
        return max(1, math.ceil((1.0 - entry[0]) / self.rps))

    def release(self, ip: bytes) -> None:
        """One of `ip`'s admitted requests ended."""
        n = self.inflight.get(ip, 0) - 1
        group = self.group
        if group is not None and n >= 0:  # the group's count: this worker's cell
            entry = self.buckets.get(ip)  # (it holds the cell, unless pushed out meanwhile)
            group.add_inflight(int(entry[2]) if entry is not None
                               else group.cell(self.ident, ip), -1)
        if n > 0:
            self.inflight[ip] = n
        else:
            self.inflight.pop(ip, None)
