"""The reconciler: the only place where routing state changes.

Every source hands whole Snapshots to `Runtime.apply`, the one door into the live state. It
runs in four steps:

1. validate: the snapshot merged with the other sources' last good ones must make sense (no
   port or service name used twice, routes to services that exist, ...);
2. plan: a diff against the live state: which services are new, changed, removed or
   unchanged, which listeners to bind or stop, which certificates change (their PEM is parsed
   here, into new objects);
3. bind: the new listeners' ports (the only step that awaits);
4. commit: one synchronous step of the event loop: new services made, changed ones updated in
   place (kept backends keep their counters, latency estimates and idle connections), removed
   ones drained, unchanged ones not touched at all; routing tables swapped, listeners pointed
   at their service state, removed listeners stopped (their open connections finish);
   certificates, TLS options and the file config's process-wide settings installed.

A snapshot that fails any step before the commit is rejected whole and changes nothing; the
last good state keeps serving. No counter is reset by a reload. Each TLS listener owns its
certificate store for its whole life, so a listener that drains after an edit, or is kept under
a renamed entrypoint or service, never reads a store the runtime has stopped maintaining.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import balancers
from edgelb.control.health import HealthChecker, Target
from edgelb.control.tasks import spawn
from edgelb.h2.server import h2_entry
from edgelb.http.listener import HttpListener
from edgelb.http.router import Router
from edgelb.net import tls
from edgelb.net.sni import SniTable
from edgelb.net.tls import (
    ALPN,
    ALPN_HTTP1,
    Certificate,
    CertificateStore,
    TLSConfigError,
    load_files,
)
from edgelb.net.tls import Options as TLSOptions
from edgelb.pool import ServiceState
from watchers.model import (
    Address,
    Entrypoint,
    InstanceConfig,
    LimitsConfig,
    Notice,
    PathRules,
    PemPair,
    Policy,
    Route,
    Service,
    Settings,
    Snapshot,
)
from watchers.source import Health, Rejected

log = logging.getLogger("edgelb.control.runtime")

SWEEP_INTERVAL = 0.25  # how often connection deadlines are checked
FILE = "file"  # the source that holds the process-wide settings when set_entrypoints sets them

EntrypointSpec = Entrypoint  # the name the runtime's callers know it by


class SnapshotError(Rejected):
    """A snapshot that cannot be applied; `.errors` says why, one line per problem, and
    `.services` names the services at fault when every problem is one service's (a port
    already used, a static port that cannot be bound, an unknown mode or balance)."""

    def __init__(self, errors: list[str], services: Iterable[str] = ()) -> None:
        super().__init__(errors, tuple(dict.fromkeys(services)))


def complete(settings: Settings) -> Settings:
    """`settings` with the defaults of what it leaves unset (None)."""
    return dataclasses.replace(
        settings,
        instance=settings.instance if settings.instance is not None else InstanceConfig(),
        limits=settings.limits if settings.limits is not None else LimitsConfig(),
        tls=settings.tls if settings.tls is not None else TLSOptions(),
    )


# A certificate pair from files: (certificate file, key file, ALPN protocols of its context)
PairKey = tuple[str, str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class _Certificates:
    """The certificates a snapshot will install (parsed, not yet serving)."""

    pairs: dict[PairKey, Certificate]  # from files, as the entrypoints and static ports name
    entrypoints: dict[str, Certificate]  # entrypoint name -> its certificate files'
    services: dict[str, Certificate]  # service name -> the certificate of its static port
    # the watchers': source -> (certificates, host pins ("" = default))
    watchers: dict[str, tuple[list[Certificate], dict[str, Certificate]]]
    parsed: dict[PemPair, Certificate]  # the watchers' pairs as parsed (reused if unchanged)
    last_good: dict[str, Certificate]  # origin -> its last pair that parsed
    failed: dict[PemPair, str]  # the watchers' pairs that do not parse, and why


@dataclass(frozen=True, slots=True)
class _Plan:
    """What an apply changes, against the live state (computed before anything changes)."""

    settings: Settings
    instance: InstanceConfig
    services: list[Service]
    routes: list[Route]
    new: list[Service]  # services to make
    changed: list[Service]  # services to update in place
    unchanged: list[str]  # services not touched at all
    removed: list[str]  # services to drain
    router: Router
    sni_table: SniTable
    certs: _Certificates
    wanted: dict[str, tuple[str, str, Address]]  # listener key -> (kind, name, address)
    bind: list[str]  # listener keys to bind: new, or of another kind than the one there
    stop: list[str]  # listener keys no longer wanted


def _listener_kind(listener: Any) -> str:
    if getattr(listener, "ssl", None) is not None:  # entrypoint, http or tcp
        return listener.kind + "-tls"
    return listener.kind


def _passthrough_relay(entrypoint: HttpListener) -> Any:
    """The tcp relay of a TLS entrypoint's passed-through connections (made at first use)."""
    relay = _tcp_listener_class()(
        entrypoint.address,
        ServiceState(Service(name=f"{entrypoint.name}-passthrough", mode="tcp")),
        loop=entrypoint.loop)
    relay.telemetry = entrypoint.telemetry
    return relay


def _tcp_listener_class() -> Any:
    from edgelb.tcp.listener import TcpListener

    return TcpListener


class Runtime:
    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        reserved: Iterable[Address] = (),
        rng: random.Random | None = None,
        settings: Settings | None = None,
    ) -> None:
        """`settings`: the process-wide settings until a source's snapshot brings some."""
        self.loop = loop or asyncio.get_event_loop()
        self.rng = rng or random.Random()
        self.services: dict[str, ServiceState] = {}
        self.listeners: dict[str, Any] = {}  # str(address) -> HttpListener | TcpListener
        self.routes: tuple[Route, ...] = ()
        self.router = Router()
        self.snapshots: dict[str, Snapshot] = {}
        self.settings = complete(settings or Settings())  # the file config's, as applied
        self.instance: InstanceConfig = self.settings.instance  # with the zone sources found
        self.reserved = {str(a) for a in reserved}  # e.g. the admin listener
        # read by the admin endpoint
        self.reloads: dict[tuple[str, str], int] = {}
        self.watcher_up: dict[str, bool] = {}
        self.watcher_synced: dict[str, bool] = {}
        self.last_errors: dict[str, str] = {}
        self.watcher_last_event: dict[str, float] = {}  # unix time of a source's last event
        self.watcher_problems: dict[str, int] = {}  # objects a source skipped or flagged
        self.watcher_details: dict[str, Any] = {}  # what a source follows (Health.details)
        self.watcher_problem_lines: dict[str, tuple[str, ...]] = {}  # Health.problem_lines
        self._reported_errors: dict[str, str] = {}  # each source's own error, as it reported
        self.draining = False
        self.started_at = time.time()
        self.local_responses: dict[int, int] = {}
        self.local_counts: dict[int, int] = {}  # the same by method (edgelb.http.accounting)
        # access log, request IDs, tracing (edgelb.telemetry.hub.Telemetry; None: off), given
        # to every listener made from now on (set before the first apply)
        self.telemetry: Any = None
        self.upstreams: set[Any] = set()
        # a worker's view of the group's load (edgelb.workers.shared_load.WorkerView; None: a
        # single process), given to every pool
        self.shared_load: Any = None
        # a worker's view of the group's per-client limits
        # (edgelb.workers.shared_limits.LimitsView; None: a single process), given to every
        # router it builds
        self.shared_limits: Any = None
        self._lock = asyncio.Lock()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closers: set[asyncio.Task] = set()
        self.health = HealthChecker(self._on_health, rng=self.rng, loop=self.loop)
        # TLS: every TLS listener has its own certificate store (`listener_stores`, by listener
        # key); `tls_stores` (entrypoints) and `service_tls` (static ports) name them. The
        # certificates come from files (per entrypoint, per static port: `_pairs`) and from
        # watchers (by source: certificates, host pins, default)
        self.tls_stores: dict[str, CertificateStore] = {}
        self.file_certs: dict[str, Certificate] = {}
        self.service_tls: dict[str, CertificateStore] = {}  # static ports with TLS, by service
        self.watcher_certs: dict[str, tuple[list[Certificate], dict[str, Certificate]]] = {}
        self.listener_stores: dict[str, CertificateStore] = {}
        self._pairs: dict[PairKey, Certificate] = {}  # the certificates from files in use
        self._parsed: dict[PemPair, Certificate] = {}  # the watchers' pairs in use, parsed
        self._failed: dict[PemPair, str] = {}  # the watchers' pairs that do not parse, why
        self._last_good: dict[str, Certificate] = {}  # a watcher pair's origin -> last good
        self.last_reload_ok: dict[str, bool] = {}  # whether each source's last snapshot applied
        self.last_reload_success: dict[str, float] = {}  # unix time of each one's last success
        # a worker of a group (edgelb.workers): a new listener listens at bind but accepts
        # only once the commit gave it its state, for its port may already be served by the
        # other workers (connections wait in its backlog meanwhile)
        self.serve_after_commit = False

    def use_shared_load(self, view: Any) -> None:
        """A worker of a group: from now on every pool reads the group's in-flight and latency
        estimates from `view` (edgelb.workers.shared_load.WorkerView), so least-loaded picks,
        `max_inflight` and the queue hold for the group (within the bound stated there)."""
        self.shared_load = view
        for state in self.services.values():
            state.pool.use_shared(view)

    def use_shared_limits(self, view: Any) -> None:
        """A worker of a group: every router built from now on gives its routes' per-client
        limiters `view` (edgelb.workers.shared_limits.LimitsView), so `filters.limits` hold
        for the group (within the bound stated there). Call before the first snapshot."""
        self.shared_limits = view

    # -- the file config's settings, as applied (read-only: only `apply` changes them) --------

    @property
    def entrypoints(self) -> tuple[Entrypoint, ...]:
        return self.settings.entrypoints

    @property
    def defaults(self) -> Policy:
        return self.settings.defaults

    @property
    def limits(self) -> LimitsConfig:
        limits: LimitsConfig = self.settings.limits
        return limits

    @property
    def grace(self) -> float:
        return self.settings.grace

    # -- watcher bookkeeping ------------------------------------------------------------

    def register_watcher(self, name: str) -> None:
        self.watcher_up.setdefault(name, False)
        self.watcher_synced.setdefault(name, False)

    def record(self, watcher: str, ok: bool, error: str | None = None) -> None:
        key = (watcher, "ok" if ok else "error")
        self.reloads[key] = self.reloads.get(key, 0) + 1
        self.last_reload_ok[watcher] = ok
        if ok:
            self.last_reload_success[watcher] = time.time()
            self.watcher_up[watcher] = True
            self.watcher_synced[watcher] = True
            self.last_errors.pop(watcher, None)
        else:
            self.last_errors[watcher] = error or "unknown error"

    def report(self, source: str, health: Health) -> None:
        """A source's own account of its health (watchers.source.Report).

        Down is shown at once; up only once the source has had a snapshot applied (before
        that /readyz and edgelb_watcher_up wait for its first sync). Its error is shown until
        it reports another or none; a rejected snapshot's error stays until one applies."""
        self.watcher_synced.setdefault(source, False)
        if not health.up:
            self.watcher_up[source] = False
        elif self.watcher_synced[source]:
            self.watcher_up[source] = True
        else:
            self.watcher_up.setdefault(source, False)
        before = self._reported_errors.pop(source, "")
        if health.error:
            self._reported_errors[source] = health.error
            if health.error != before or source not in self.last_errors:
                self.last_errors[source] = health.error
        elif before and self.last_errors.get(source) == before:
            del self.last_errors[source]
        if health.last_event > self.watcher_last_event.get(source, 0.0):
            self.watcher_last_event[source] = health.last_event
        if health.problems is not None:
            self.watcher_problems[source] = health.problems
            self.watcher_problem_lines[source] = health.problem_lines
        if health.details is not None:
            self.watcher_details[source] = health.details

    # -- applying ------------------------------------------------------------------------

    async def set_entrypoints(
        self,
        entrypoints: Iterable[Entrypoint],
        defaults: Policy,
        snapshot: Snapshot | None = None,
    ) -> None:
        """Apply new entrypoints and defaults (the rest of the settings as they are), with
        `snapshot` when given (recorded as `apply` does), else with the file source's last
        good snapshot (not recorded). A shorthand for `apply` with `Snapshot.settings`."""
        async with self._lock:
            held = snapshot or self.snapshots.get(FILE) or Snapshot(FILE)
            base = held.settings if held.settings is not None else self.settings
            settings = dataclasses.replace(base, entrypoints=tuple(entrypoints),
                                           defaults=defaults)
            await self._apply(dataclasses.replace(held, settings=settings),
                              record=snapshot is not None)

    async def apply(self, snapshot: Snapshot, *, reload_files: bool = False,
                    record_as: str | None = None) -> tuple[Notice, ...]:
        """Apply one source's snapshot, or raise SnapshotError and keep the last good state.

        Returns what was worked around (a watcher's certificate that does not parse: its last
        good one serves). `reload_files`: for a certificate file the snapshot carries no PEM
        of (`Certificates.files`), read it again even if a pair from it is in use (the file
        config's applies do); without it such a pair is kept as loaded. `record_as`: the
        watcher whose outcome this is, when not the snapshot's source (the DNS source applies
        the file's snapshot again with new answers)."""
        async with self._lock:
            return await self._apply(snapshot, record=True, reload_files=reload_files,
                                     record_as=record_as)

    async def _apply(self, snapshot: Snapshot, *, record: bool, reload_files: bool = False,
                     record_as: str | None = None) -> tuple[Notice, ...]:
        snapshots = dict(self.snapshots)
        snapshots[snapshot.source] = snapshot
        settings = complete(snapshot.settings) if snapshot.settings is not None else self.settings
        try:
            plan = self._plan(snapshots, settings, reload_files)
            fresh, fresh_stores = await self._bind(plan)
        except SnapshotError as e:
            if record:
                self.record(record_as or snapshot.source, False, str(e))
            log.error("rejected the %s snapshot, the last good one keeps serving: %s",
                      record_as or snapshot.source, e)
            raise
        self._commit(plan, snapshots, fresh, fresh_stores)
        if self.serve_after_commit:
            await self._serve(fresh)
        if record:
            self.record(record_as or snapshot.source, True)
        return _notices(snapshot, plan.certs.failed)

    def _validate(self, snapshots: dict[str, Snapshot], settings: Settings
                  ) -> tuple[list[Service], list[Route]]:
        errors: list[str] = []
        at_fault: list[str] = []  # the services some error is about
        general = False  # some error is not one service's
        services: list[Service] = []
        routes: list[Route] = []
        owner: dict[str, str] = {}
        ports: dict[str, str] = {k: "the admin endpoint" for k in self.reserved}
        if settings.tls.min_version not in tls.MIN_VERSIONS:
            errors.append(f"tls.min_version: {settings.tls.min_version!r} is not one of "
                          f"{', '.join(tls.MIN_VERSIONS)}")
            general = True
        for ep in settings.entrypoints:
            key = str(ep.listen)
            if key in ports:
                errors.append(f"entrypoint {ep.name}: {key} is already used by {ports[key]}")
                general = True
            ports[key] = f"entrypoint {ep.name}"
        for source, snap in snapshots.items():
            for svc in snap.services:
                where = f"{source}: service {svc.name}"
                if svc.name in owner:
                    errors.append(f"{where}: the name is already used by {owner[svc.name]}")
                    general = True  # the name is two services': dropping it drops both
                    continue
                owner[svc.name] = where
                if svc.mode not in ("http", "tcp"):
                    errors.append(f"{where}: mode must be http or tcp, not {svc.mode!r}")
                    at_fault.append(svc.name)
                if svc.policy.balance not in balancers.POLICIES:
                    errors.append(
                        f"{where}: unknown balance {svc.policy.balance!r}; "
                        f"known: {', '.join(sorted(balancers.POLICIES))}"
                    )
                    at_fault.append(svc.name)
                if svc.listen is not None:
                    key = str(svc.listen)
                    if key in ports:
                        errors.append(f"{where}: port {key} is already used by {ports[key]}")
                        at_fault.append(svc.name)  # the later one: the first keeps its port
                    ports[key] = where
                services.append(svc)
            routes.extend(snap.routes)
        names = {s.name: s for s in services}
        passthrough: dict[str, str] = {}  # SNI host -> service
        for r in routes:
            where = f"route {r.name + ' ' if r.name else ''}{r.host or '*'}{r.path}"
            for share in r.backends:
                if share.service == r.service or not share.resolved:
                    continue  # checked below; an unresolved share answers 500
                other = names.get(share.service)
                if other is None or other.mode != "http":
                    errors.append(f"{where}: no http service named {share.service!r} for its "
                                  "split")
            for m in r.filters.mirrors if r.filters is not None else ():
                other = names.get(m.service)
                if other is None or other.mode != "http":
                    errors.append(f"{where}: no http service named {m.service!r} to mirror "
                                  "requests to; add it or drop the mirror")
            if not r.service and r.filters is not None and r.filters.redirect is not None:
                continue  # answers a redirect itself
            if not r.service and r.backends:
                continue  # its first share is unresolved: the router answers it with 500
            target = names.get(r.service)
            if target is None:
                errors.append(f"{where}: no service named {r.service!r}")
            elif target.tls_passthrough and target.mode == "tcp":
                where = f"service {r.service}: tls: passthrough"
                if not r.host:
                    errors.append(f"{where}: routed by SNI name, so it needs hosts; add hosts")
                elif r.path != "/" or r.exact:
                    errors.append(f"{where}: routed by SNI name only; drop the path {r.path}")
                elif passthrough.setdefault(r.host.lower(), r.service) != r.service:
                    errors.append(f"{where}: host {r.host} is already passed through to "
                                  f"service {passthrough[r.host.lower()]}; give it one service")
            elif target.mode != "http":
                errors.append(f"route {r.host or '*'}{r.path}: service {r.service} is not http")
        if routes and not settings.entrypoints:
            errors.append("host/path routes need an entrypoint; add one under `entrypoints:`")
        elif passthrough and not any(ep.tls is not None for ep in settings.entrypoints):
            hosts = ", ".join(sorted(passthrough))
            errors.append(f"TLS passthrough hosts ({hosts}) are routed by the SNI name on TLS "
                          "entrypoints, and none has tls; add tls to an entrypoint")
        if errors:
            # the route problems below are not one service's either
            general = general or len(errors) > len(at_fault)
            raise SnapshotError(errors, () if general else at_fault)
        return services, routes

    def _plan(self, snapshots: dict[str, Snapshot], settings: Settings, reload_files: bool
              ) -> _Plan:
        """Validate, and diff against the live state; nothing changes here."""
        services, routes = self._validate(snapshots, settings)
        instance: InstanceConfig = settings.instance
        if not instance.zone:  # the zone a source found (the Kubernetes Node's label)
            zone = next((s.zone for s in snapshots.values() if s.zone), "")
            if zone:
                instance = dataclasses.replace(instance, zone=zone)
        router, sni_table = _split_routes(routes, {s.name: s for s in services}, self.router,
                                          self.shared_limits)
        certs = self._load_certificates(services, settings, snapshots, reload_files)
        new: list[Service] = []
        changed: list[Service] = []
        unchanged: list[str] = []
        for svc in services:
            state = self.services.get(svc.name)
            if state is None:
                new.append(svc)
            elif state.spec != svc or (instance != self.instance and _reads_instance(svc)):
                changed.append(svc)
            else:
                unchanged.append(svc.name)
        kept = {s.name for s in services}
        removed = [name for name in self.services if name not in kept]
        # What should listen where: key -> (kind, service or entrypoint name, address)
        wanted: dict[str, tuple[str, str, Address]] = {}
        for ep in settings.entrypoints:
            kind = "entrypoint-tls" if ep.tls is not None else "entrypoint"
            wanted[str(ep.listen)] = (kind, ep.name, ep.listen)
        for svc in services:
            if svc.listen is not None:
                kind = svc.mode + "-tls" if svc.tls is not None else svc.mode
                wanted[str(svc.listen)] = (kind, svc.name, svc.listen)
        bind = [key for key, (kind, _, _) in wanted.items()
                if key not in self.listeners or _listener_kind(self.listeners[key]) != kind]
        stop = [key for key in self.listeners if key not in wanted]
        return _Plan(settings, instance, services, routes, new, changed, unchanged, removed,
                     router, sni_table, certs, wanted, bind, stop)

    async def _serve(self, fresh: dict[str, Any]) -> None:
        for key, listener in fresh.items():
            try:
                await listener.serve()
            except OSError:
                log.exception("listener %s could not start accepting", key)

    async def _bind(self, plan: _Plan) -> tuple[dict[str, Any], dict[str, CertificateStore]]:
        """Bind what is new (the only await). A listener whose kind changes is stopped first,
        to free its port; a new TLS listener gets a new store, filled before it accepts. A
        port that cannot be bound undoes this step and rejects the snapshot."""
        settings = plan.settings
        accepts = _accepts(settings, plan.services)
        fresh: dict[str, Any] = {}
        fresh_stores: dict[str, CertificateStore] = {}
        replaced: list[Any] = []
        for key in plan.bind:
            kind, name, addr = plan.wanted[key]
            old = self.listeners.get(key)
            if old is not None:
                old.stop_accepting()
                replaced.append(old)
            store = self._new_store(kind, name, plan.certs) if kind.endswith("-tls") else None
            listener = self._make_listener(kind, name, addr, store)
            listener.set_accept_proxy(accepts.get(_owner(kind, name)))
            listener.set_limits(settings.limits)
            if kind == "entrypoint-tls":
                listener.sni_table = plan.sni_table  # start() serves or peeks accordingly
            try:
                await listener.start(serve=not self.serve_after_commit)
            except OSError as e:
                for lst in fresh.values():
                    lst.abort()
                for lst in replaced:  # give the old ones back their ports if we can
                    await _restart(lst)
                owner = () if kind.startswith("entrypoint") else (name,)
                raise SnapshotError([str(e)], owner) from e
            fresh[key] = listener
            if store is not None:
                fresh_stores[key] = store
        return fresh, fresh_stores

    def _commit(self, plan: _Plan, snapshots: dict[str, Snapshot], fresh: dict[str, Any],
                fresh_stores: dict[str, CertificateStore]) -> None:
        """The whole change, in one synchronous step of the loop."""
        self._settle(plan.settings, plan.instance)
        states = self.services
        known = {(name, key) for name, st in states.items() for key in st.pool.by_key}
        now = self.loop.time()
        for svc in plan.changed:
            states[svc.name].update(svc, now, self.instance)
        for name in plan.removed:
            state = states.pop(name)
            state.pool.update((), state.policy.balance)  # everything drains
        for svc in plan.new:
            state = states[svc.name] = ServiceState(svc, self.rng, self.instance)
            state.pool.use_shared(self.shared_load)
        if list(states) != [s.name for s in plan.services]:  # keep the snapshots' order
            order = {s.name: i for i, s in enumerate(plan.services)}
            ordered = sorted(states.items(), key=lambda item: order[item[0]])
            states.clear()
            states.update(ordered)
        self.routes = tuple(plan.routes)
        self.router = plan.router
        for key in plan.stop:
            self.listeners[key].stop_accepting()
        for key in [*plan.stop, *(k for k in fresh if k in self.listeners)]:
            self._close_later(self.listeners.pop(key))  # its store goes with it
            self.listener_stores.pop(key, None)
        self.listeners.update(fresh)
        self.listener_stores.update(fresh_stores)
        self._install_certificates(plan.certs, plan.services)
        self._point_listeners(plan)
        self.snapshots = snapshots
        self._sync_health(known)

    def _point_listeners(self, plan: _Plan) -> None:
        """Every listener to its service state (or the router), limits and path rules."""
        accepts = _accepts(plan.settings, plan.services)
        path_rules = {("entrypoint", ep.name): ep.path_rules for ep in self.entrypoints}
        path_rules.update((("service", s.name), s.path_rules) for s in plan.services)
        http2 = {("entrypoint", ep.name): (ep.http2, ep.h2c) for ep in self.entrypoints}
        http2.update((("service", s.name), (s.http2, s.h2c)) for s in plan.services)
        states = self.services
        for key, (kind, name, _addr) in plan.wanted.items():
            listener = self.listeners[key]
            listener.set_accept_proxy(accepts.get(_owner(kind, name)))
            if kind.startswith("entrypoint"):
                listener.router = self.router
                listener.services = states
                listener.defaults = self.defaults
                if kind == "entrypoint-tls":
                    listener.set_passthrough(plan.sni_table)
            else:
                listener.service = states[name]
            listener.set_limits(self.limits)
            set_path_rules = getattr(listener, "set_path_rules", None)  # http listeners
            if set_path_rules is not None:
                set_path_rules(path_rules.get(_owner(kind, name), PathRules()))
            if hasattr(listener, "h2"):  # http listeners: HTTP/2 by ALPN or prior knowledge
                on, h2c = http2.get(_owner(kind, name), (True, False))
                listener.h2 = h2_entry(listener.ssl is not None, on, h2c)
                store = self.listener_stores.get(key)
                if store is not None:  # watchers' certificates: offered with this list
                    store.alpn = None if on else ALPN_HTTP1
            refresh = getattr(listener, "refresh", None)
            if refresh is not None:
                refresh()

    def _settle(self, settings: Settings, instance: InstanceConfig) -> None:
        """Make the process-wide settings current (in the commit step)."""
        self.settings = settings
        self.instance = instance
        tls.configure(settings.tls)  # live contexts change in place: the next handshake

    # -- TLS certificates ------------------------------------------------------------------

    def _load_certificates(self, services: list[Service], settings: Settings,
                           snapshots: dict[str, Snapshot], reload_files: bool
                           ) -> _Certificates:
        """Parse the certificates a snapshot brings, before anything changes.

        The pairs the entrypoints and static ports name (from the PEM their source read,
        `Certificates.files`, else from the files): one that does not load rejects the
        snapshot, naming it and the problem. The watchers' pairs: one that does not parse
        keeps the last good one of its origin and becomes a Notice. A pair whose bytes are
        the ones in use is not parsed again (see `apply` for `reload_files`)."""
        errors: list[str] = []
        pairs: dict[PairKey, Certificate] = {}
        failed: dict[PairKey, str] = {}
        pems = {p.files: p for snap in snapshots.values() for p in snap.certificates.files
                if p.files is not None}

        def load(cert_file: str, key_file: str, alpn: tuple[str, ...], where: str
                 ) -> Certificate | None:
            key = (cert_file, key_file, alpn)
            if key not in pairs and key not in failed:
                cert = self._pairs.get(key)
                pem = pems.get((cert_file, key_file))
                try:
                    if pem is not None:
                        cert = tls.load_file_pem(cert_file, key_file, pem.cert, pem.key, alpn,
                                                 reuse=cert)
                    elif cert is None or reload_files:
                        cert = load_files(cert_file, key_file, alpn, reuse=cert)
                    pairs[key] = cert
                except TLSConfigError as e:
                    failed[key] = str(e)
            if key in failed:
                errors.append(f"{where}: {failed[key]}")
                return None
            return pairs[key]

        entrypoints: dict[str, Certificate] = {}
        for ep in settings.entrypoints:
            if ep.tls is not None and ep.tls[0]:  # ("", ""): certificates from watchers only
                cert = load(ep.tls[0], ep.tls[1], ALPN if ep.http2 else ALPN_HTTP1,
                            f"entrypoints.{ep.name}.tls")
                if cert is not None:
                    entrypoints[ep.name] = cert
        by_service: dict[str, Certificate] = {}
        for svc in services:
            if svc.tls is None or svc.listen is None:
                continue
            # tcp: no ALPN (the relayed protocol, e.g. h2 or a database's, is not ours)
            alpn = (ALPN if svc.http2 else ALPN_HTTP1) if svc.mode == "http" else ()
            cert = load(svc.tls[0], svc.tls[1], alpn, f"service {svc.name}: tls")
            if cert is not None:
                by_service[svc.name] = cert
        if errors:
            raise SnapshotError(errors)
        return self._load_watcher_certificates(snapshots, pairs, entrypoints, by_service)

    def _load_watcher_certificates(self, snapshots: dict[str, Snapshot],
                                   pairs: dict[PairKey, Certificate],
                                   entrypoints: dict[str, Certificate],
                                   by_service: dict[str, Certificate]) -> _Certificates:
        parsed: dict[PemPair, Certificate] = {}
        last_good = dict(self._last_good)
        failed: dict[PemPair, str] = {}
        read: dict[PemPair, PemPair | str] = {}  # file-based pairs: their files, read once

        def parse(pem: PemPair) -> Certificate | None:
            if pem.files is not None and not pem.cert and not pem.key:
                # a watcher that names a file on this host (Marathon's HAPROXY_n_SSL_CERT):
                # read on every apply, parsed again only when its bytes change
                if pem not in read:
                    read[pem] = _read_pair_files(pem)
                found = read[pem]
                if isinstance(found, str):
                    if pem not in failed:
                        log.warning("%s; its last good certificate, if any, serves", found)
                    failed[pem] = found
                    return last_good.get(pem.origin)
                cert = parse(found)
                if found in failed:
                    failed[pem] = failed[found]
                return cert
            cert = parsed.get(pem) or self._parsed.get(pem)
            if cert is None and pem not in failed:
                error = self._failed.get(pem)  # not parsed again while its bytes are the same
                if error is None:
                    try:
                        cert = tls.load_pem(pem.cert, pem.key, pem.origin,
                                            cert_label=pem.labels[0], key_label=pem.labels[1])
                    except TLSConfigError as e:
                        error = str(e)
                        log.warning("%s; its last good certificate, if any, serves", error)
                if error is not None:
                    failed[pem] = error
            if cert is None:
                return last_good.get(pem.origin)  # the last good one, if any
            parsed[pem] = last_good[pem.origin] = cert
            return cert

        watchers: dict[str, tuple[list[Certificate], dict[str, Certificate]]] = {}
        for source, snap in snapshots.items():
            held = snap.certificates
            if not (held.pairs or held.hosts):
                continue
            certs: list[Certificate] = []
            for pem in held.pairs:
                cert = parse(pem)
                if cert is not None and cert not in certs:
                    certs.append(cert)
            hosts: dict[str, Certificate] = {}
            for pattern, pem in held.hosts:
                cert = parse(pem)
                if cert is not None:
                    hosts[pattern] = cert
            watchers[source] = (certs, hosts)
        origins = {pem.origin for snap in snapshots.values()
                   for pem in (*snap.certificates.pairs, *(p for _, p in snap.certificates.hosts))}
        last_good = {origin: cert for origin, cert in last_good.items() if origin in origins}
        return _Certificates(pairs, entrypoints, by_service, watchers, parsed, last_good,
                             failed)

    def _new_store(self, kind: str, name: str, certs: _Certificates) -> CertificateStore:
        """The store of a new TLS listener, already holding what it will serve."""
        store = CertificateStore()
        if kind == "entrypoint-tls":
            _set_entrypoint_store(store, certs.entrypoints.get(name), certs.watchers)
        else:
            cert = certs.services[name]
            store.set([cert], cert)
        return store

    def _install_certificates(self, certs: _Certificates, services: list[Service]) -> None:
        """Point the by-name views at the listeners' stores and give each store its
        certificates (the next handshake sees them; established connections keep theirs)."""
        self._pairs = certs.pairs
        self._parsed = certs.parsed
        self._failed = certs.failed
        self._last_good = certs.last_good
        self.file_certs = certs.entrypoints
        self.watcher_certs = certs.watchers
        self.tls_stores = {ep.name: self.listener_stores[str(ep.listen)]
                           for ep in self.entrypoints if ep.tls is not None}
        self.service_tls = {}
        for svc in services:
            cert = certs.services.get(svc.name)
            if cert is not None and svc.listen is not None:
                store = self.listener_stores[str(svc.listen)]
                store.set([cert], cert)
                self.service_tls[svc.name] = store
        for name, store in self.tls_stores.items():
            _set_entrypoint_store(store, self.file_certs.get(name), self.watcher_certs)

    def certificate_status(self) -> list[dict[str, Any]]:
        """Every certificate loaded (from files and from watchers) once, with the stores that
        serve it: /status.json's `certificates` and the expiry metric's samples. `name` is its
        first DNS name; (name, source) identifies it, and a pair loaded twice (an http and a
        tcp port, which differ only in ALPN) is one entry."""
        served: dict[tuple[str, str], tuple[Certificate, list[str]]] = {}

        def add(cert: Certificate, where: str | None) -> None:
            key = (cert.names[0], cert.source)
            held = served.get(key)
            if held is None or cert.not_after < held[0].not_after:  # the earlier expiry counts
                held = (cert, held[1] if held is not None else [])
                served[key] = held
            if where is not None and where not in held[1]:
                held[1].append(where)

        for name, store in sorted(self.tls_stores.items()):
            for cert in store.certificates():
                add(cert, f"entrypoint {name}")
        for name, store in sorted(self.service_tls.items()):
            for cert in store.certificates():
                add(cert, f"service {name}")
        for source_certs, source_hosts in self.watcher_certs.values():
            for cert in [*source_certs, *source_hosts.values()]:
                add(cert, None)  # loaded, and served wherever a TLS entrypoint is
        out = []
        for (name, _source), (cert, where) in sorted(served.items()):
            info = cert.info()
            info["name"] = name
            info["not_after_timestamp"] = cert.not_after.timestamp()
            info["served_by"] = where
            out.append(info)
        return out

    # -- active health checks --------------------------------------------------------------

    def _sync_health(self, known: set[tuple[str, str]]) -> None:
        """Hand the health checker every backend of every service that asks for checks.

        A backend that joins a service already running (a scale-up) is not sent traffic
        until its first check passes; the backends a service starts with are assumed healthy
        until checks say otherwise, so a restart of the proxy serves at once."""
        targets: dict[tuple[str, str], Target] = {}
        running = {service for service, _ in known}  # services that existed before
        for name, state in self.services.items():
            check = state.policy.health_check
            pool = state.pool
            changed = False
            for b in pool.backends:
                if check is None:
                    if not b.check_ok:
                        b.check_ok = True  # checks were turned off
                        changed = True
                    continue
                key = (name, b.key)
                fresh = key not in known and name in running
                if fresh and self.health.healthy(name, b.key) is None:
                    b.check_ok = False
                    changed = True
                targets[key] = Target(b.spec.address, check, assume_healthy=not fresh,
                                      tls=state.policy.backend_tls,
                                      proxy_protocol=state.policy.proxy_protocol)
            if changed:
                pool.refresh()
        if not self.draining:  # once shutting down, the checker closes
            self.health.sync(targets)

    def health_changed(self, service: str, key: str, healthy: bool, announce: bool = True
                       ) -> None:
        """The health door: a verdict change of the active checks, from this runtime's
        HealthChecker, or relayed from the control process's (edgelb.workers: not logged
        again there, `announce=False`)."""
        self._on_health(service, key, healthy, announce)

    def _on_health(self, service: str, key: str, healthy: bool, announce: bool = True) -> None:
        state = self.services.get(service)
        backend = state.pool.by_key.get(key) if state is not None else None
        if backend is None:
            return
        if not announce:
            pass
        elif healthy:
            log.warning("service %s: backend %s passes its health check", service, key)
        else:
            log.warning("service %s: backend %s fails its health check (%s)", service, key,
                        self.health.status(service, key).get("last_result", "?"))
        state.pool.set_check(backend, healthy, self.loop.time(), state.policy.slow_start)  # type: ignore[union-attr]

    def _make_listener(self, kind: str, name: str, addr: Address,
                       store: CertificateStore | None = None) -> Any:
        """A new listener; `store` is its certificate store when `kind` is a TLS one."""
        listener = self._new_listener(kind, name, addr, store)
        listener.telemetry = self.telemetry
        return listener

    def _new_listener(self, kind: str, name: str, addr: Address,
                      store: CertificateStore | None) -> Any:
        if kind in ("tcp", "tcp-tls"):
            return _tcp_listener_class()(
                addr,
                self._placeholder(name),
                loop=self.loop,
                ssl=store.server_context() if store is not None else None,
            )
        if kind.startswith("entrypoint"):
            listener = HttpListener(
                addr,
                name=name,
                defaults=self.defaults,
                upstreams=self.upstreams,
                local_responses=self.local_responses,
                local_counts=self.local_counts,
                loop=self.loop,
                ssl=store.server_context() if store is not None else None,
            )
            if store is not None:  # TLS passthrough relays through a tcp listener of its own
                listener.make_relay = _passthrough_relay
            return listener
        return HttpListener(
            addr,
            service=self._placeholder(name),
            upstreams=self.upstreams,
            local_responses=self.local_responses,
            local_counts=self.local_counts,
            loop=self.loop,
            ssl=store.server_context() if store is not None else None,
        )

    def _placeholder(self, name: str) -> ServiceState:
        """The service state a new listener starts with (replaced in the apply step)."""
        return self.services.get(name) or ServiceState(Service(name=name))

    def _close_later(self, listener: Any) -> None:
        name = f"close listener {getattr(listener, 'address', '')}"
        spawn(listener.wait_closed(self.grace), name=name, held=self._closers, loop=self.loop)

    # -- deadlines -----------------------------------------------------------------------

    def start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        """Deadlines (timeouts) and ejection/slow-start ticks; always scheduled again, so that
        one failing expiry cannot end timeouts for good."""
        try:
            self._sweep_once(self.loop.time())
        except Exception:
            log.exception("internal error in the deadline sweeper; it goes on")
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep_once(self, now: float) -> None:
        for listener in list(self.listeners.values()):
            clients = getattr(listener, "clients", None)
            if clients:
                for c in [c for c in clients if c.deadline and c.deadline <= now]:
                    c.expire(now)
            relay = getattr(listener, "relay", None)  # a TLS entrypoint's passthrough
            if relay is not None and relay.clients:
                for c in [c for c in relay.clients if c.deadline and c.deadline <= now]:
                    c.expire(now)
        for u in [u for u in self.upstreams if u.deadline and u.deadline <= now]:
            u.expire(now)
        for state in self.services.values():
            pool = state.pool
            if pool.ejected:
                pool.sweep(now, state.policy.slow_start)
            if pool.ramping:
                pool.ramp(now, state.policy.slow_start)

    # -- shutdown ------------------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """Stop accepting everywhere, let open requests finish up to `grace`, then close."""
        self.draining = True
        listeners = list(self.listeners.values())
        for listener in listeners:
            listener.stop_accepting()
        await asyncio.gather(*(lst.wait_closed(grace) for lst in listeners))
        for state in self.services.values():
            for b in state.pool.all_backends():
                for conn in b.idle:
                    conn.close()
                b.idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await self.health.close()
        for task in list(self._closers):
            task.cancel()


def _split_routes(routes: Iterable[Route], services: dict[str, Service],
                  previous: Router | None = None, limits_group: Any = None
                  ) -> tuple[Router, SniTable]:
    """The HTTP router and the TLS entrypoints' SNI table. Routes to passthrough services go
    to the table only. A host that is both passed through and routed as https is passed
    through on TLS entrypoints (as ingress-nginx does); its https routes serve plain-HTTP
    entrypoints, and requests that reach a TLS entrypoint with another SNI name. An exact
    https host takes precedence over a passthrough wildcard (exact names first, as routing)."""
    http: list[Route] = []
    exact: dict[str, str] = {}
    wildcard: dict[str, str] = {}
    deep: dict[str, str] = {}
    terminated: set[str] = set()
    for r in routes:
        svc = services.get(r.service)
        if svc is not None and svc.tls_passthrough and svc.mode == "tcp":
            host = r.host.lower().rstrip(".")
            if host.startswith("*.") and r.any_depth:
                deep[host[1:]] = r.service
            elif host.startswith("*."):
                wildcard[host[1:]] = r.service
            else:
                exact[host] = r.service
        else:
            http.append(r)
            if r.host and not r.host.startswith("*."):
                terminated.add(r.host.lower().rstrip("."))
    if wildcard or deep:
        for host in terminated:
            exact.setdefault(host, "")
    # `previous`: its routes' per-client limiters and split pickers carry on; `limits_group`:
    # a worker's view of the group's per-client limits (Runtime.use_shared_limits)
    return Router(http, previous, limits_group), SniTable(exact, wildcard, deep)


async def _restart(listener: Any) -> None:
    try:
        listener.closing = False
        await listener.start()
    except OSError:
        log.exception("could not re-open %s after a failed reload", listener.address)


def _set_entrypoint_store(store: CertificateStore, default: Certificate | None,
                          watchers: dict[str, tuple[list[Certificate], dict[str, Certificate]]]
                          ) -> None:
    """What a TLS entrypoint serves: its files' certificate (the default) and every
    watcher's (a no-op when that is what the store holds)."""
    certs: list[Certificate] = []
    hosts: dict[str, Certificate] = {}
    for source_certs, source_hosts in watchers.values():
        certs.extend(source_certs)
        for pattern, cert in source_hosts.items():
            if pattern:
                hosts.setdefault(pattern, cert)
            elif default is None:
                default = cert
    if default is not None:
        certs.insert(0, default)
    store.set(certs, default, hosts=hosts)


MAX_PEM_FILE = 1 << 20  # a certificate file a watcher names is read up to this size


def _read_pair_files(pem: PemPair) -> PemPair | str:
    """A file-based watcher pair (`files` set, no bytes) with its files' bytes, or why not.
    Only regular files, opened without blocking (a label naming a FIFO or /dev/zero must not
    hang or flood the proxy), at most MAX_PEM_FILE bytes each."""
    assert pem.files is not None
    data: list[bytes] = []
    for what, path in zip(("certificate", "key"), pem.files, strict=True):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, ValueError) as e:
            return f"{pem.origin}: cannot read the {what} file {path}: " \
                   f"{getattr(e, 'strerror', None) or e}"
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return f"{pem.origin}: the {what} file {path} is not a regular file"
            blob = f.read(MAX_PEM_FILE + 1)
        if len(blob) > MAX_PEM_FILE:
            return f"{pem.origin}: the {what} file {path} is over {MAX_PEM_FILE} bytes; " \
                   "is it a PEM file?"
        data.append(blob)
    return dataclasses.replace(pem, cert=data[0], key=data[1])


def _notices(snapshot: Snapshot, failed: dict[PemPair, str]) -> tuple[Notice, ...]:
    """The pairs of `snapshot` that do not parse (each once)."""
    held = snapshot.certificates
    pems = dict.fromkeys([*held.pairs, *(pem for _, pem in held.hosts)])
    return tuple(Notice(pem.origin, failed[pem]) for pem in pems if pem in failed)


def _owner(kind: str, name: str) -> tuple[str, str]:
    """A listener's owner: ("entrypoint", name) or ("service", name)."""
    return ("entrypoint" if kind.startswith("entrypoint") else "service", name)


def _accepts(settings: Settings, services: Iterable[Service]) -> dict[tuple[str, str], Any]:
    """accept_proxy_protocol of each listener's owner."""
    accepts = {("entrypoint", ep.name): ep.accept_proxy_protocol for ep in settings.entrypoints}
    accepts.update((("service", s.name), s.accept_proxy_protocol) for s in services)
    return accepts


def _reads_instance(svc: Service) -> bool:
    """Whether a service's pool depends on the proxy's zone or ordinal."""
    return svc.policy.zone_aware or bool(svc.policy.subset)
