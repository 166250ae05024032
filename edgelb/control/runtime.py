"""The reconciler: the only place where routing state changes.

Watchers hand whole Snapshots to `Runtime.apply`. The runtime merges them with the other
sources' last good snapshots, validates the result, binds whatever new ports it needs (the
only step that awaits), and then applies everything in one synchronous step of the event
loop: services updated in place (kept backends keep their counters and connections, removed
ones drain), routing tables swapped, listeners pointed at their new service state, removed
listeners stopped (their open connections finish). A snapshot that fails is rejected whole;
the last good state keeps serving.

Rejected means unchanged: certificates are loaded (from their files) before the first port is
bound, into new objects; they, the file config's process-wide `Settings` (instance, limits,
grace, TLS options) and the certificate stores of running listeners change only in that final
step. Each TLS listener owns its certificate store for its whole life, so a listener that
drains after an edit, or is kept under a renamed entrypoint or service, never reads a store
the runtime has stopped maintaining.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import balancers
from edgelb.control.health import HealthChecker, Target
from edgelb.control.tasks import spawn
from edgelb.http.listener import HttpListener
from edgelb.http.router import Router
from edgelb.net import tls
from edgelb.net.sni import SniTable
from edgelb.net.tls import ALPN, Certificate, CertificateStore, TLSConfigError, load_files
from edgelb.net.tls import Options as TLSOptions
from edgelb.ops.config import InstanceConfig, LimitsConfig
from edgelb.pool import ServiceState
from watchers.model import Address, PathRules, Policy, Route, Service, Snapshot

log = logging.getLogger("edgelb.control.runtime")

SWEEP_INTERVAL = 0.25  # how often connection deadlines are checked


class SnapshotError(Exception):
    """A snapshot that cannot be applied; `.errors` says why, one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Settings:
    """The file config's process-wide settings, applied with its snapshot: they take effect in
    the step that applies it, and not at all when it is rejected."""

    instance: InstanceConfig = field(default_factory=InstanceConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    grace: float = 30.0  # seconds a removed listener's connections get to finish
    tls: TLSOptions = field(default_factory=TLSOptions)  # the `tls:` block: every TLS context


# A certificate pair from files: (certificate file, key file, ALPN protocols of its context)
PairKey = tuple[str, str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class _Certificates:
    """The certificates from files a reconcile will install (loaded, not yet serving)."""

    pairs: dict[PairKey, Certificate]
    entrypoints: dict[str, Certificate]  # entrypoint name -> its certificate files'
    services: dict[str, Certificate]  # service name -> the certificate of its static port


@dataclass(frozen=True, slots=True)
class EntrypointSpec:
    name: str
    listen: Address
    tls: tuple[str, str] | None = None  # (cert file, key file); ("", "") = watchers' only
    accept_proxy_protocol: Any = None  # edgelb.net.proxy_protocol.AcceptPolicy, None = off
    path_rules: PathRules = field(default_factory=PathRules)


def _listener_kind(listener: Any) -> str:
    if getattr(listener, "ssl", None) is not None:  # entrypoint, http or tcp
        return listener.kind + "-tls"
    return listener.kind


def _passthrough_relay(entrypoint: HttpListener) -> Any:
    """The tcp relay of a TLS entrypoint's passed-through connections (made at first use)."""
    return _tcp_listener_class()(
        entrypoint.address,
        ServiceState(Service(name=f"{entrypoint.name}-passthrough", mode="tcp")),
        loop=entrypoint.loop)


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
    ) -> None:
        self.loop = loop or asyncio.get_event_loop()
        self.rng = rng or random.Random()
        self.services: dict[str, ServiceState] = {}
        self.listeners: dict[str, Any] = {}  # str(address) -> HttpListener | TcpListener
        self.routes: tuple[Route, ...] = ()
        self.router = Router()
        self.snapshots: dict[str, Snapshot] = {}
        self.entrypoints: tuple[EntrypointSpec, ...] = ()
        self.defaults = Policy()
        self.reserved = {str(a) for a in reserved}  # e.g. the admin listener
        # read by the admin endpoint
        self.reloads: dict[tuple[str, str], int] = {}
        self.watcher_up: dict[str, bool] = {}
        self.watcher_synced: dict[str, bool] = {}
        self.last_errors: dict[str, str] = {}
        self.watcher_last_event: dict[str, float] = {}  # unix time of a source's last event
        self.watcher_problems: dict[str, int] = {}  # objects a source skipped or flagged
        self.draining = False
        self.started_at = time.time()
        self.local_responses: dict[int, int] = {}
        self.upstreams: set[Any] = set()
        self._lock = asyncio.Lock()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closers: set[asyncio.Task] = set()
        self.grace = 30.0
        self.instance = InstanceConfig()  # this replica's zone and ordinal (set by the app)
        self.limits = LimitsConfig()  # per-listener limits (set by the app)
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
        self.last_reload_ok: dict[str, bool] = {}  # whether each source's last snapshot applied
        self.last_reload_success: dict[str, float] = {}  # unix time of each one's last success

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

    # -- applying ------------------------------------------------------------------------

    async def set_entrypoints(
        self,
        entrypoints: Iterable[EntrypointSpec],
        defaults: Policy,
        snapshot: Snapshot | None = None,
        *,
        settings: Settings | None = None,
        reload_files: bool = False,
    ) -> None:
        """Change the shared entrypoints and the defaults used on them; then re-apply.

        With `snapshot`, that source's new snapshot lands in the same step, and the outcome is
        recorded for it as `apply` does: an edit that drops an entrypoint together with its
        routes, or moves a port between a service and an entrypoint, is valid only as a whole.
        `settings` and `reload_files`: as for `apply`.
        """
        async with self._lock:
            old = (self.entrypoints, self.defaults)
            self.entrypoints = tuple(entrypoints)
            self.defaults = defaults
            snapshots = dict(self.snapshots)
            if snapshot is not None:
                snapshots[snapshot.source] = snapshot
            try:
                await self._reconcile(snapshots, settings, reload_files)
            except SnapshotError as e:
                self.entrypoints, self.defaults = old
                if snapshot is not None:
                    self.record(snapshot.source, False, str(e))
                    log.error("rejected the %s snapshot, the last good one keeps serving: %s",
                              snapshot.source, e)
                raise
            if snapshot is not None:
                self.record(snapshot.source, True)

    async def apply(self, snapshot: Snapshot, *, settings: Settings | None = None,
                    reload_files: bool = False) -> None:
        """Apply one source's snapshot, or raise SnapshotError and keep the last good state.

        `settings` (the file config's) take effect with the snapshot, only if it applies.
        `reload_files`: read every certificate file again (the file config's source does, as
        it owns them); without it a pair already in use is kept as loaded, so another source's
        snapshot never fails because a certificate file is being rewritten at that moment.
        A pair not yet in use is always read."""
        async with self._lock:
            snapshots = dict(self.snapshots)
            snapshots[snapshot.source] = snapshot
            try:
                await self._reconcile(snapshots, settings, reload_files)
            except SnapshotError as e:
                self.record(snapshot.source, False, str(e))
                log.error("rejected the %s snapshot, the last good one keeps serving: %s",
                          snapshot.source, e)
                raise
            self.record(snapshot.source, True)

    def _validate(self, snapshots: dict[str, Snapshot]) -> tuple[list[Service], list[Route]]:
        errors: list[str] = []
        services: list[Service] = []
        routes: list[Route] = []
        owner: dict[str, str] = {}
        ports: dict[str, str] = {k: "the admin endpoint" for k in self.reserved}
        for ep in self.entrypoints:
            key = str(ep.listen)
            if key in ports:
                errors.append(f"entrypoint {ep.name}: {key} is already used by {ports[key]}")
            ports[key] = f"entrypoint {ep.name}"
        for source, snap in snapshots.items():
            for svc in snap.services:
                where = f"{source}: service {svc.name}"
                if svc.name in owner:
                    errors.append(f"{where}: the name is already used by {owner[svc.name]}")
                    continue
                owner[svc.name] = where
                if svc.mode not in ("http", "tcp"):
                    errors.append(f"{where}: mode must be http or tcp, not {svc.mode!r}")
                if svc.policy.balance not in balancers.POLICIES:
                    errors.append(
                        f"{where}: unknown balance {svc.policy.balance!r}; "
                        f"known: {', '.join(sorted(balancers.POLICIES))}"
                    )
                if svc.listen is not None:
                    key = str(svc.listen)
                    if key in ports:
                        errors.append(f"{where}: port {key} is already used by {ports[key]}")
                    ports[key] = where
                services.append(svc)
            routes.extend(snap.routes)
        names = {s.name: s for s in services}
        passthrough: dict[str, str] = {}  # SNI host -> service
        for r in routes:
            target = names.get(r.service)
            if target is None:
                errors.append(f"route {r.host or '*'}{r.path}: no service named {r.service!r}")
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
        if routes and not self.entrypoints:
            errors.append("host/path routes need an entrypoint; add one under `entrypoints:`")
        elif passthrough and not any(ep.tls is not None for ep in self.entrypoints):
            hosts = ", ".join(sorted(passthrough))
            errors.append(f"TLS passthrough hosts ({hosts}) are routed by the SNI name on TLS "
                          "entrypoints, and none has tls; add tls to an entrypoint")
        if errors:
            raise SnapshotError(errors)
        return services, routes

    async def _reconcile(self, snapshots: dict[str, Snapshot], settings: Settings | None,
                         reload_files: bool) -> None:
        services, routes = self._validate(snapshots)
        if settings is not None and settings.tls.min_version not in tls.MIN_VERSIONS:
            raise SnapshotError([f"tls.min_version: {settings.tls.min_version!r} is not one "
                                 f"of {', '.join(tls.MIN_VERSIONS)}"])
        router, sni_table = _split_routes(routes, {s.name: s for s in services})
        certs = self._load_certificates(services, reload_files)
        limits = settings.limits if settings is not None else self.limits
        # What should listen where: key -> (kind, service or entrypoint name, address)
        wanted: dict[str, tuple[str, str, Address]] = {}
        for ep in self.entrypoints:
            kind = "entrypoint-tls" if ep.tls is not None else "entrypoint"
            wanted[str(ep.listen)] = (kind, ep.name, ep.listen)
        for svc in services:
            if svc.listen is not None:
                kind = svc.mode + "-tls" if svc.tls is not None else svc.mode
                wanted[str(svc.listen)] = (kind, svc.name, svc.listen)

        # accept_proxy_protocol of each listener, set before a new one starts accepting
        accepts = {("entrypoint", ep.name): ep.accept_proxy_protocol for ep in self.entrypoints}
        accepts.update((("service", s.name), s.accept_proxy_protocol) for s in services)
        path_rules = {("entrypoint", ep.name): ep.path_rules for ep in self.entrypoints}
        path_rules.update((("service", s.name), s.path_rules) for s in services)

        # Bind what is new. A listener whose kind changes is stopped first, to free its port.
        # A new TLS listener gets a new store, filled before it accepts.
        fresh: dict[str, Any] = {}
        fresh_stores: dict[str, CertificateStore] = {}
        replaced: list[Any] = []
        for key, (kind, name, addr) in wanted.items():
            old = self.listeners.get(key)
            if old is not None and _listener_kind(old) == kind:
                continue
            if old is not None:
                old.stop_accepting()
                replaced.append(old)
            store = self._new_store(kind, name, certs) if kind.endswith("-tls") else None
            listener = self._make_listener(kind, name, addr, store)
            listener.set_accept_proxy(accepts.get(
                ("entrypoint" if kind.startswith("entrypoint") else "service", name)))
            listener.set_limits(limits)
            if kind == "entrypoint-tls":
                listener.sni_table = sni_table  # start() serves or peeks accordingly
            try:
                await listener.start()
            except OSError as e:
                for lst in fresh.values():
                    lst.abort()
                for lst in replaced:  # give the old ones back their ports if we can
                    await _restart(lst)
                raise SnapshotError([str(e)]) from e
            fresh[key] = listener
            if store is not None:
                fresh_stores[key] = store

        # From here on, nothing awaits: the whole change lands in one step of the loop.
        if settings is not None:
            self._settle(settings)
        states = self.services
        known = {(name, key) for name, st in states.items() for key in st.pool.by_key}
        by_name: dict[str, ServiceState] = {}
        for svc in services:
            state = states.get(svc.name)
            if state is None:
                state = ServiceState(svc, self.rng, self.instance)
            else:
                state.update(svc, self.loop.time(), self.instance)
            by_name[svc.name] = state
        for name, state in states.items():
            if name not in by_name:
                state.pool.update((), state.policy.balance)  # everything drains
        states.clear()
        states.update(by_name)
        self.routes = tuple(routes)
        self.router = router
        for key, listener in list(self.listeners.items()):
            if key not in wanted or key in fresh:
                if key not in fresh:
                    listener.stop_accepting()
                self._close_later(listener)  # its store goes with it
                del self.listeners[key]
                self.listener_stores.pop(key, None)
        self.listeners.update(fresh)
        self.listener_stores.update(fresh_stores)
        self._install_certificates(certs, services)
        for key, (kind, name, _addr) in wanted.items():
            listener = self.listeners[key]
            listener.set_accept_proxy(accepts.get(
                ("entrypoint" if kind.startswith("entrypoint") else "service", name)))
            if kind.startswith("entrypoint"):
                listener.router = self.router
                listener.services = states
                listener.defaults = self.defaults
                if kind == "entrypoint-tls":
                    listener.set_passthrough(sni_table)
            else:
                listener.service = states[name]
            listener.set_limits(self.limits)
            set_path_rules = getattr(listener, "set_path_rules", None)  # http listeners
            if set_path_rules is not None:
                set_path_rules(path_rules.get(
                    ("entrypoint" if kind.startswith("entrypoint") else "service", name),
                    PathRules()))
            refresh = getattr(listener, "refresh", None)
            if refresh is not None:
                refresh()
        self.snapshots = snapshots
        self._sync_health(known)

    def _settle(self, settings: Settings) -> None:
        """Make the file config's process-wide settings current (in the apply step)."""
        self.instance = settings.instance
        self.limits = settings.limits
        self.grace = settings.grace
        tls.configure(settings.tls)  # live contexts change in place: the next handshake

    # -- TLS certificates ------------------------------------------------------------------

    def _load_certificates(self, services: list[Service], reload_files: bool) -> _Certificates:
        """Load the certificate files of the TLS entrypoints and static ports, before anything
        changes: a pair that does not load rejects the change, naming it and the problem. A
        pair in use is kept as it is unless `reload_files`, and then too if its files still
        hold the same bytes (see `apply`)."""
        errors: list[str] = []
        pairs: dict[PairKey, Certificate] = {}
        failed: dict[PairKey, str] = {}

        def load(cert_file: str, key_file: str, alpn: tuple[str, ...], where: str
                 ) -> Certificate | None:
            key = (cert_file, key_file, alpn)
            if key not in pairs and key not in failed:
                cert = self._pairs.get(key)
                try:
                    if cert is None or reload_files:
                        cert = load_files(cert_file, key_file, alpn, reuse=cert)
                    pairs[key] = cert
                except TLSConfigError as e:
                    failed[key] = str(e)
            if key in failed:
                errors.append(f"{where}: {failed[key]}")
                return None
            return pairs[key]

        entrypoints: dict[str, Certificate] = {}
        for ep in self.entrypoints:
            if ep.tls is not None and ep.tls[0]:  # ("", ""): certificates from watchers only
                cert = load(ep.tls[0], ep.tls[1], ALPN, f"entrypoints.{ep.name}.tls")
                if cert is not None:
                    entrypoints[ep.name] = cert
        by_service: dict[str, Certificate] = {}
        for svc in services:
            if svc.tls is None or svc.listen is None:
                continue
            # tcp: no ALPN (the relayed protocol, e.g. h2 or a database's, is not ours)
            alpn = ALPN if svc.mode == "http" else ()
            cert = load(svc.tls[0], svc.tls[1], alpn, f"service {svc.name}: tls")
            if cert is not None:
                by_service[svc.name] = cert
        if errors:
            raise SnapshotError(errors)
        return _Certificates(pairs, entrypoints, by_service)

    def _new_store(self, kind: str, name: str, certs: _Certificates) -> CertificateStore:
        """The store of a new TLS listener, already holding what it will serve."""
        store = CertificateStore()
        if kind == "entrypoint-tls":
            self._set_entrypoint_store(store, certs.entrypoints.get(name))
        else:
            cert = certs.services[name]
            store.set([cert], cert)
        return store

    def _install_certificates(self, certs: _Certificates, services: list[Service]) -> None:
        """Point the by-name views at the listeners' stores and give each store its
        certificates (the next handshake sees them; established connections keep theirs)."""
        self._pairs = certs.pairs
        self.file_certs = certs.entrypoints
        self.tls_stores = {ep.name: self.listener_stores[str(ep.listen)]
                           for ep in self.entrypoints if ep.tls is not None}
        self.service_tls = {}
        for svc in services:
            cert = certs.services.get(svc.name)
            if cert is not None and svc.listen is not None:
                store = self.listener_stores[str(svc.listen)]
                store.set([cert], cert)
                self.service_tls[svc.name] = store
        self._refresh_stores()

    def set_certificates(self, source: str, certs: list[Certificate],
                         hosts: dict[str, Certificate]) -> None:
        """A watcher's certificates (e.g. Ingress TLS Secrets): served on every TLS
        entrypoint from the next handshake on; `hosts` pins host patterns ("" = default)."""
        self.watcher_certs[source] = (list(certs), dict(hosts))
        self._refresh_stores()

    def _refresh_stores(self) -> None:
        for name, store in self.tls_stores.items():
            self._set_entrypoint_store(store, self.file_certs.get(name))

    def _set_entrypoint_store(self, store: CertificateStore, default: Certificate | None
                              ) -> None:
        """What a TLS entrypoint serves: its files' certificate (the default) and every
        watcher's (a no-op when that is what the store holds)."""
        certs: list[Certificate] = []
        hosts: dict[str, Certificate] = {}
        for source_certs, source_hosts in self.watcher_certs.values():
            certs.extend(source_certs)
            for pattern, cert in source_hosts.items():
                if pattern:
                    hosts.setdefault(pattern, cert)
                elif default is None:
                    default = cert
        if default is not None:
            certs.insert(0, default)
        store.set(certs, default, hosts=hosts)

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

    def _on_health(self, service: str, key: str, healthy: bool) -> None:
        state = self.services.get(service)
        backend = state.pool.by_key.get(key) if state is not None else None
        if backend is None:
            return
        if healthy:
            log.warning("service %s: backend %s passes its health check", service, key)
        else:
            log.warning("service %s: backend %s fails its health check (%s)", service, key,
                        self.health.status(service, key).get("last_result", "?"))
        state.pool.set_check(backend, healthy, self.loop.time(), state.policy.slow_start)  # type: ignore[union-attr]

    def _make_listener(self, kind: str, name: str, addr: Address,
                       store: CertificateStore | None = None) -> Any:
        """A new listener; `store` is its certificate store when `kind` is a TLS one."""
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


def _split_routes(routes: Iterable[Route], services: dict[str, Service]
                  ) -> tuple[Router, SniTable]:
    """The HTTP router and the TLS entrypoints' SNI table. Routes to passthrough services go
    to the table only. A host that is both passed through and routed as https is passed
    through on TLS entrypoints (as ingress-nginx does); its https routes serve plain-HTTP
    entrypoints, and requests that reach a TLS entrypoint with another SNI name. An exact
    https host takes precedence over a passthrough wildcard (exact names first, as routing)."""
    http: list[Route] = []
    exact: dict[str, str] = {}
    wildcard: dict[str, str] = {}
    terminated: set[str] = set()
    for r in routes:
        svc = services.get(r.service)
        if svc is not None and svc.tls_passthrough and svc.mode == "tcp":
            host = r.host.lower().rstrip(".")
            if host.startswith("*."):
                wildcard[host[1:]] = r.service
            else:
                exact[host] = r.service
        else:
            http.append(r)
            if r.host and not r.host.startswith("*."):
                terminated.add(r.host.lower().rstrip("."))
    if wildcard:
        for host in terminated:
            exact.setdefault(host, "")
    return Router(http), SniTable(exact, wildcard)


async def _restart(listener: Any) -> None:
    try:
        listener.closing = False
        await listener.start()
    except OSError:
        log.exception("could not re-open %s after a failed reload", listener.address)
