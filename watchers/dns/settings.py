"""The resolver settings: the file config's `resolvers:` block, else /etc/resolv.conf."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

RESOLV_CONF = "/etc/resolv.conf"
DNS_PORT = 53


@dataclass(frozen=True, slots=True)
class ResolverSettings:
    """How the DNS source asks and how long it trusts what it was told.

    nameservers: (address, port), asked in order, each try `timeout` seconds, `attempts`
    rounds over all of them (resolv.conf's meaning); an empty tuple means /etc/resolv.conf's.
    An answer is asked again after its TTL clamped to [min_ttl, max_ttl]. After a timeout or
    SERVFAIL the last good backends serve for `hold_stale`; after NXDOMAIN or an empty answer
    for `hold_nxdomain`."""

    nameservers: tuple[tuple[str, int], ...] = ()
    timeout: float = 1.0
    attempts: int = 2
    min_ttl: float = 1.0
    max_ttl: float = 30.0
    hold_stale: float = 3600.0
    hold_nxdomain: float = 30.0

    def clamp(self, ttl: float) -> float:
        return min(max(ttl, self.min_ttl), self.max_ttl)


def parse_resolv_conf(text: str) -> tuple[tuple[tuple[str, int], ...], float | None, int | None]:
    """The nameservers of a resolv.conf, and its `options timeout:N attempts:N` (None when
    unset). Lines it does not understand are skipped; it never raises."""
    servers: list[tuple[str, int]] = []
    timeout: float | None = None
    attempts: int | None = None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            host = words[1].split("%", 1)[0]  # fe80::1%eth0: the zone is not ours to keep
            try:
                ipaddress.ip_address(host)
            except ValueError:
                continue
            servers.append((host, DNS_PORT))
        elif words and words[0] == "options":
            for option in words[1:]:
                key, _, value = option.partition(":")
                if key in ("timeout", "attempts") and value.isdigit() and int(value) > 0:
                    if key == "timeout":
                        timeout = float(min(int(value), 30))
                    else:
                        attempts = min(int(value), 5)
    return tuple(servers[:3]), timeout, attempts  # resolv(5): at most three are used


def system_settings(base: ResolverSettings, path: str = RESOLV_CONF) -> ResolverSettings:
    """`base` with the nameservers (and timeout, attempts) of the system's resolv.conf, or
    127.0.0.1:53 when it names none (glibc's default)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            servers, timeout, attempts = parse_resolv_conf(f.read())
    except OSError:
        servers, timeout, attempts = (), None, None
    return ResolverSettings(
        nameservers=servers or (("127.0.0.1", DNS_PORT),),
        timeout=timeout if timeout is not None else base.timeout,
        attempts=attempts if attempts is not None else base.attempts,
        min_ttl=base.min_ttl, max_ttl=base.max_ttl, hold_stale=base.hold_stale,
        hold_nxdomain=base.hold_nxdomain)
