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
"""

from __future__ import annotations

import math

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

    __slots__ = ("buckets", "burst", "connections", "exempt", "inflight", "limits", "rps")

    def __init__(self, limits: ClientLimits) -> None:
        self.limits = limits
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

    def retry_after(self, ip: bytes) -> int:
        """Whole seconds (>= 1) until `ip`'s bucket holds a request again."""
        entry = self.buckets.get(ip)
        if entry is None or self.rps <= 0.0:
            return 1
        return max(1, math.ceil((1.0 - entry[0]) / self.rps))

    def release(self, ip: bytes) -> None:
        """One of `ip`'s admitted requests ended."""
        n = self.inflight.get(ip, 0) - 1
        if n > 0:
            self.inflight[ip] = n
        else:
            self.inflight.pop(ip, None)
