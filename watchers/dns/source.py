"""The DNS source: keeps the backends of the services that name `dns:` filled from DNS.

It sits between the file watcher and the runtime. Each file snapshot comes through `apply`:
names it has not seen are resolved first (for at most about one lookup's time; a name that
has not answered by then gives its services no backends yet, with a notice, and the snapshot
applies all the same), every DNS-backed service gets the backends of its name's current answer,
and the snapshot goes on to the runtime. From then on `run` asks each name again at its
answer's TTL (clamped to [min_ttl, max_ttl], jittered 0-10% early) and, when an answer changes
what a service's backends are, applies the file's snapshot again, whole, with the new backends
(through `emit`): the runtime's diff updates only the services whose backends changed, and the
backends they keep keep their state.

Stale but serving: after a timeout, SERVFAIL or a malformed response a name keeps its last good
backends for `hold_stale`; after NXDOMAIN or an empty answer for `hold_nxdomain`; only then
are they removed. Both show in its health (watcher "dns": down while a name is not answering,
per-name details in /status.json) and in the log, once per change.

It never imports edgelb: the runtime's apply and report are handed to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from watchers.dns.records import backends_of
from watchers.dns.resolver import Answer, Failure, NoRecords, Resolver, Result
from watchers.dns.settings import ResolverSettings
from watchers.model import Backend, DnsQuery, Notice, Snapshot
from watchers.source import Emit, Health, Report

log = logging.getLogger("watchers.dns")

NAME = "dns"  # the watcher's name in edgelb_watcher_up and /status.json
JITTER = 0.1  # a refresh comes up to 10% before its TTL runs out

Apply = Callable[[Snapshot], Awaitable[tuple[Notice, ...]]]


class _Name:
    """What the source knows of one DnsQuery."""

    __slots__ = ("answered", "backends", "error", "failures", "last_answer", "next_refresh",
                 "nxdomain_since", "query", "stale_since", "ttl")

    def __init__(self, query: DnsQuery) -> None:
        self.query = query
        self.backends: tuple[Backend, ...] = ()  # what its services get now
        self.answered = False  # some lookup has answered with records
        self.ttl = 0.0  # of the last answer with records, as given
        self.last_answer = 0.0  # unix time of that answer
        self.next_refresh = float("inf")  # loop time of the next lookup
        self.stale_since = 0.0  # unix time since which lookups fail (0: they do not)
        self.nxdomain_since = 0.0  # unix time since which it has no records (0: it has)
        self.error = ""  # why the last lookup gave no records
        self.failures = 0  # lookups in a row without records

    @property
    def troubled(self) -> bool:
        return bool(self.stale_since or self.nxdomain_since) or not self.answered


class DnsSource:
    """See the module doc. `emit`: apply a re-filled file snapshot (the runtime's apply);
    `report`: the runtime's health view; `resolver`: makes a Resolver for settings (tests may
    hand in another); `clock`: unix time, for status and holds."""

    def __init__(
        self,
        emit: Emit,
        report: Report,
        settings: ResolverSettings | None = None,
        resolver: Callable[[ResolverSettings], Any] = Resolver,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.emit = emit
        self.report = report
        self.settings = settings or ResolverSettings(nameservers=(("127.0.0.1", 53),))
        self._make_resolver = resolver
        self.resolver = resolver(self.settings)
        self.rng = rng or random.Random()
        self.clock = clock
        self.names: dict[DnsQuery, _Name] = {}
        self._base: Snapshot | None = None  # the last file snapshot applied
        self._emitted: Snapshot | None = None  # it, filled, as last applied
        self._lock = asyncio.Lock()  # one apply at a time, file or DNS, in order
        self._wake = asyncio.Event()
        self._reporting = False  # it has had names: its health is shown
        self.emit_error = ""  # why the last re-emit was rejected ("" = it was not)

    # -- the file's snapshots ---------------------------------------------------------------------

    async def apply(self, snapshot: Snapshot, apply: Apply,
                    settings: ResolverSettings | None = None) -> tuple[Notice, ...]:
        """Fill `snapshot`'s DNS-backed services and apply it with `apply` (the runtime's, as
        the file watcher uses it); raises as `apply` does when it is rejected."""
        async with self._lock:
            if settings is not None and settings != self.settings:
                self.settings = settings
                self.resolver = self._make_resolver(settings)
            wanted = _queries(snapshot)
            new = [q for q in wanted if q not in self.names]
            for q in new:
                self.names[q] = _Name(q)
            notices: list[Notice] = []
            if new:
                await self._first_lookups([self.names[q] for q in new])
                for q in new:
                    entry = self.names[q]
                    if not entry.answered:
                        notices.append(Notice(f"dns {q}", f"no records yet ({entry.error}); "
                                              "its services have no backends until it answers"))
                        log.warning("dns %s: no records yet (%s); %s get no backends until it "
                                    "answers", q, entry.error, _users(snapshot, q))
            filled = self._fill(snapshot)
            try:
                applied = await apply(filled)
            except BaseException:
                keep = _queries(self._base) if self._base is not None else set()
                for q in new:
                    if q not in keep:
                        del self.names[q]
                raise
            self._base, self._emitted = snapshot, filled
            for q in [q for q in self.names if q not in wanted]:
                del self.names[q]
            self._wake.set()
            self._report()
            return (*applied, *notices)

    async def _first_lookups(self, entries: list[_Name]) -> None:
        """Resolve new names at once, bounded by about one lookup's worst time."""
        s = self.settings
        bound = 2 * s.timeout * max(1, s.attempts) * max(1, len(s.nameservers)) + 0.5
        tasks = {asyncio.ensure_future(self._lookup(e)): e for e in entries}
        _, pending = await asyncio.wait(tasks, timeout=bound)
        for task in pending:
            task.cancel()
            entry = tasks[task]
            entry.error = f"no answer within {bound:g}s"
            entry.next_refresh = 0.0  # the loop asks again at once
        for task in pending:
            try:
                await task
            except asyncio.CancelledError:
                pass

    def _fill(self, snapshot: Snapshot) -> Snapshot:
        services = tuple(
            dataclasses.replace(svc, backends=self.names[svc.dns].backends)
            if svc.dns is not None and svc.dns in self.names else svc
            for svc in snapshot.services)
        return dataclasses.replace(snapshot, services=services)

    # -- following the names ----------------------------------------------------------------------

    async def run(self) -> None:
        """Ask each name again when its refresh is due; re-apply when an answer changed."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            due = [e for e in self.names.values() if e.next_refresh <= now]
            if due:
                changed = await asyncio.gather(*(self._lookup(e) for e in due))
                if any(changed):
                    await self._reemit()
                self._report()
                continue
            self._wake.clear()
            wait = min((e.next_refresh for e in self.names.values()), default=now + 3600.0)
            try:
                async with asyncio.timeout(max(0.0, wait - now)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _reemit(self) -> None:
        async with self._lock:
            if self._base is None:
                return
            filled = self._fill(self._base)
            if filled == self._emitted:
                return
            try:
                await self.emit(filled)
            except Exception as e:  # the runtime rejected it: the last good state serves
                self.emit_error = f"applying new DNS answers failed: {e}"
                log.error("dns: %s", self.emit_error)
                return
            self.emit_error = ""
            self._emitted = filled

    async def _lookup(self, entry: _Name) -> bool:
        """One lookup of `entry`; True when its backends changed."""
        try:
            result: Result = await self.resolver.lookup(entry.query)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a resolver must not raise; should one, it is a failure
            result = Failure("error", f"{type(e).__name__}: {e}")
        if self.names.get(entry.query) is not entry:
            return False  # dropped by an apply meanwhile
        return self._update(entry, result)

    def _update(self, entry: _Name, result: Result) -> bool:
        s = self.settings
        now = asyncio.get_running_loop().time()
        unix = self.clock()
        before = entry.backends
        if isinstance(result, Answer):
            if entry.stale_since or entry.nxdomain_since:
                log.warning("dns %s: answering again (%d records)", entry.query,
                            len(result.targets))
            entry.backends = backends_of(result.targets)
            entry.answered = True
            entry.ttl = result.ttl
            entry.last_answer = unix
            entry.stale_since = entry.nxdomain_since = 0.0
            entry.error = ""
            entry.failures = 0
            entry.next_refresh = now + self._jitter(s.clamp(result.ttl))
        else:
            entry.failures += 1
            if isinstance(result, NoRecords):
                entry.error = "NXDOMAIN" if result.kind == "nxdomain" else "no records"
                entry.stale_since = 0.0
                since = entry.nxdomain_since = entry.nxdomain_since or unix
                hold = s.hold_nxdomain
            else:
                entry.error = f"{result.kind}: {result.detail}" if result.detail else result.kind
                entry.nxdomain_since = 0.0
                since = entry.stale_since = entry.stale_since or unix
                hold = s.hold_stale
            if since == unix and entry.backends:
                log.warning("dns %s: %s; its %d backends keep serving for %gs", entry.query,
                            entry.error, len(entry.backends), hold)
            left = since + hold - unix
            if entry.backends and left <= 0:
                log.warning("dns %s: %s for %gs; its backends are removed", entry.query,
                            entry.error, hold)
                entry.backends = ()
            retry = self._jitter(min(s.min_ttl * 2 ** min(entry.failures - 1, 10), s.max_ttl))
            if entry.backends:
                retry = min(retry, max(left, 0.0) + 0.001)
            entry.next_refresh = now + retry
        return entry.backends != before

    def _jitter(self, seconds: float) -> float:
        return seconds * (1.0 - JITTER * self.rng.random())

    # -- health -----------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Per name: its last answer, TTL, next refresh, stale / NXDOMAIN since (unix times)."""
        now = asyncio.get_running_loop().time()
        unix = self.clock()
        out = []
        for q, e in sorted(self.names.items(), key=lambda i: str(i[0])):
            nxt = e.next_refresh
            out.append({
                "query": str(q),
                "backends": [b.key for b in e.backends],
                "last_answer": e.last_answer or None,
                "ttl": e.ttl if e.answered else None,
                "next_refresh": unix + max(0.0, nxt - now) if nxt != float("inf") else None,
                "stale_since": e.stale_since or None,
                "nxdomain_since": e.nxdomain_since or None,
                "error": e.error or None,
            })
        return out

    def health(self) -> Health:
        troubled = [e for e in self.names.values() if e.troubled]
        errors = [f"{e.query}: {e.error or 'no answer yet'}"
                  + (" (stale, serving the last answer)" if e.stale_since and e.backends else "")
                  for e in troubled]
        if self.emit_error:
            errors.append(self.emit_error)
        last = max((e.last_answer for e in self.names.values()), default=0.0)
        return Health(up=not errors, error="; ".join(errors), last_event=last,
                      problems=len(troubled), details=self.status())

    def _report(self) -> None:
        if not self.names and not self._reporting:
            return
        self._reporting = True
        self.report(NAME, self.health())


def _queries(snapshot: Snapshot) -> set[DnsQuery]:
    return {svc.dns for svc in snapshot.services if svc.dns is not None}


def _users(snapshot: Snapshot, query: DnsQuery) -> str:
    names = [svc.name for svc in snapshot.services if svc.dns == query]
    return "service " + ", ".join(names) if len(names) == 1 else "services " + ", ".join(names)
