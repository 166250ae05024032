"""The process: load the config, start the runtime, the admin endpoint and the watchers, and
run until SIGTERM/SIGINT (graceful drain). SIGHUP re-reads the config file at once.

The file config is one source like the others: each loaded config becomes one Snapshot (its
services and routes, the PEM of the certificate files it names, and its process-wide settings:
entrypoints, defaults, instance, limits, grace, TLS options) handed to `Runtime.apply`, the only
writer of live state. The watchers are wired here: each gets its `emit` (the runtime's apply)
and its `report` (the runtime's health view), and whatever else it needs from edgelb (the
Kubernetes one: the annotations reader, the defaults, the configured zone).

Certificate rotation: the file watcher watches, besides the config, every certificate, key and
CA file the config names (the loader reads them through `FileWatcher.read`, and keeps the bytes
of the certificate pairs for the snapshot), and the loaded Config carries their digests
(`Config.tls_files`), so a rewritten, renamed or symlink-swapped file makes a Config that
differs from the one applied and is applied like an edit: within a poll or two, or at once on
SIGHUP. Applying it parses the changed pairs (unchanged ones are kept as they are); a pair
that does not load rejects it whole, so the old certificate keeps serving and the failure is
reported as any rejected config is (log, /status.json,
`edgelb_config_reloads_total{watcher="file",result="error"}`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelb import __version__, compiled
from edgelb.control.runtime import Runtime, SnapshotError
from edgelb.control.tasks import describe, spawn, supervise
from edgelb.net import backend_tls
from edgelb.ops.config import (
    Config,
    ConfigError,
    load_config,
    parse_config,
    policy_from_annotations,
    with_tls_files,
)
from watchers.dns.settings import ResolverSettings, system_settings
from watchers.model import Certificates, Entrypoint, Notice, PemPair, Policy, Settings, Snapshot
from watchers.source import Health, Tasks

if TYPE_CHECKING:
    from watchers.dns.source import DnsSource

log = logging.getLogger("edgelb")

FILE_LOOP = "file watcher loop"
DNS_LOOP = "dns watcher loop"

# A loaded config and the PEM of the certificate pairs it names, as read with it
Loaded = tuple[Config, tuple[PemPair, ...]]


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        log.warning("uvloop is not installed; running on the default asyncio loop (slower)")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class App:
    """Everything one `edgelb run` owns; also used by tests to run the whole process in-loop."""

    def __init__(self, config_path: str | Path, workers: int | str | None = None,
                 log_args: tuple[str, ...] = ()) -> None:
        """`workers`: --workers (None: the config's `workers:`); `log_args`: the command
        line's logging options, handed to worker processes."""
        self.config_path = Path(config_path)
        self.workers_option = workers
        self.log_args = log_args
        self.group: Any = None  # edgelb.workers.control.WorkerGroup when workers > 1
        self.config: Config | None = None
        self.pems: tuple[PemPair, ...] = ()  # the certificate pairs of the applied config
        self.runtime: Runtime | None = None
        self.admin = None
        self.watcher = None
        self.kubernetes = None  # watchers.kubernetes.watcher.KubernetesWatcher when enabled
        self.marathon = None  # watchers.marathon.watcher.MarathonWatcher when configured
        self.dns: DnsSource | None = None  # fills the file's DNS-backed services (start)
        self._dns_task: asyncio.Task | None = None
        self.telemetry = None  # edgelb.telemetry.hub.Telemetry: access log, request IDs, tracing
        self._watcher_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # every background task of ours, until it ends
        self._file_loop_error: str | None = None  # the file watcher's loop raised: restarting
        self._apply_lock = asyncio.Lock()
        self.stopped = asyncio.Event()
        self.applied = asyncio.Event()  # set after every successful apply (tests await it)
        self.generation = 0

    async def start(self) -> None:
        from edgelb.ops.admin import AdminServer
        from watchers.file import FileWatcher

        # ConfigError propagates: nothing starts
        loaded = _load(load_config(self.config_path), _read)
        config = loaded[0]
        loop = asyncio.get_running_loop()
        workers = self._worker_count(config)
        runtime = (Runtime(loop=loop, reserved=[config.admin]) if workers == 1
                   else self._control_runtime(workers, config, loop))
        runtime.register_watcher("file")
        self.runtime = runtime
        self._start_dns(runtime, loop)
        if config.telemetry.active and self.group is None:  # before the first listener
            from edgelb.telemetry.hub import Telemetry

            self.telemetry = runtime.telemetry = Telemetry(config.telemetry, __version__)
            self.telemetry.start()
        await self._apply(loaded)
        if runtime.last_errors.get("file"):
            raise SystemExit(f"edgelb: {runtime.last_errors['file']}")
        runtime.start_sweeper()
        if self.group is not None:
            await self.group.start()
        k8s = config.kubernetes
        if k8s is not None and k8s.enabled:
            from watchers.kubernetes.client import CredentialsError
            from watchers.kubernetes.watcher import KubernetesWatcher

            self.kubernetes = KubernetesWatcher(
                k8s, emit=runtime.apply, report=runtime.report,
                read_policy=policy_from_annotations, defaults=self._defaults,
                zone=self._zone, sni_routing=self._sni_routing,
                tasks=Tasks(spawn, supervise, describe),
            )
            try:
                await self.kubernetes.start()
            except CredentialsError as e:
                raise SystemExit(f"edgelb: watchers.kubernetes: {e}") from None
        if config.marathon is not None:
            await self._start_marathon(config)
        self.admin = AdminServer(runtime, config.admin, per_backend=self._per_backend_metrics,
                                 group=self.group)
        await self.admin.start()
        origin = str(self.config_path)
        watcher: FileWatcher[Loaded] = FileWatcher(
            self.config_path,
            # the TLS files are read through the watcher, which watches them from then on
            load=lambda data: _load(parse_config(data, origin=origin), watcher.read),
            emit=self._on_config,
            on_error=self._on_config_error,
            interval=0.25,
            verify_every=4,  # contents re-checked every second, whatever stat says
        )
        self.watcher = watcher
        self._watcher_task = spawn(
            supervise(FILE_LOOP, self.watcher.run, on_down=self._file_loop_down, logger=log),
            name=FILE_LOOP, held=self._tasks, loop=loop)

    def _worker_count(self, config: Config) -> int:
        from edgelb.workers.cores import resolve

        chosen = self.workers_option if self.workers_option is not None else config.workers
        return resolve(chosen)

    def _control_runtime(self, workers: int, config: Config, loop: asyncio.AbstractEventLoop
                         ) -> Runtime:
        """workers > 1: this process is control (edgelb.workers.control): its runtime holds
        the ports and runs the checks; the worker group serves."""
        from edgelb.workers.control import ControlRuntime, WorkerGroup
        from edgelb.workers.load import limits_table, table
        from edgelb.workers.messages import Init

        telemetry = config.telemetry if config.telemetry.active else None
        admin = config.admin
        shared = table(workers)  # made before any worker starts
        handle = shared.handle() if shared is not None else None
        limits = limits_table(workers)  # the routes' per-client limits, for the group
        limits_handle = limits.handle()
        runtime = ControlRuntime(on_apply=lambda m: self.group.send_all(m),
                                 on_health=lambda m: self.group.send_all(m),
                                 assign=shared.assign if shared is not None else None,
                                 loop=loop, reserved=[admin])
        self.group = WorkerGroup(
            workers, runtime,
            init=lambda index: Init(index, admin, telemetry, handle, limits_handle),
            per_backend=self._per_backend_metrics, log_args=self.log_args, shared=shared,
            limits=limits)
        return runtime

    async def _start_marathon(self, config: Config) -> None:
        """The Marathon watcher: /readyz waits for its first applied read of the apps."""
        from watchers.marathon.client import AuthError
        from watchers.marathon.watcher import MarathonWatcher

        runtime = self.runtime
        assert runtime is not None
        runtime.register_watcher("marathon")
        self.marathon = MarathonWatcher(
            config.marathon, emit=runtime.apply, report=runtime.report,
            read_policy=policy_from_annotations, defaults=self._defaults,
            tls_entrypoint=self._sni_routing, tasks=Tasks(spawn, supervise, describe),
        )
        try:
            await self.marathon.start()
        except AuthError as e:
            raise SystemExit(f"edgelb: {e}") from None

    def _defaults(self) -> Policy:
        return self.config.defaults if self.config is not None else Policy()

    def _per_backend_metrics(self) -> bool:
        """The applied config's metrics.per_backend (a reload changes it at the next scrape)."""
        return self.config.metrics.per_backend if self.config is not None else True

    def _zone(self) -> str:
        return self.config.instance.zone if self.config is not None else ""

    def _sni_routing(self) -> bool:
        """Whether some entrypoint terminates TLS (passthrough hosts are routed by SNI)."""
        return self.config is not None and any(ep.tls is not None
                                               for ep in self.config.entrypoints)

    def _on_config(self, loaded: Loaded) -> None:
        self._file_loop_back()
        # (a config equal to the applied one is recognised by _apply, under its lock)
        spawn(self._apply(loaded), name="apply the config file", held=self._tasks)

    def _file_loop_down(self, exc: BaseException) -> None:
        """The file watcher's loop raised and waits to restart (edgelb.control.tasks.supervise): the
        watcher is down and says why; the applied config keeps serving, /readyz unchanged."""
        assert self.runtime is not None
        self._file_loop_error = f"{FILE_LOOP} failed ({describe(exc)}); restarting it"
        self.runtime.report("file", Health(up=False, error=self._file_loop_error))

    def _file_loop_back(self) -> None:
        """The restarted file watcher read the file again (good or bad content): it is up."""
        error, self._file_loop_error = self._file_loop_error, None
        if error is None or self.runtime is None:
            return
        self.runtime.report("file", Health(up=True))

    def _on_config_error(self, error: Exception) -> None:
        assert self.runtime is not None
        self._file_loop_back()
        text = "; ".join(error.errors) if isinstance(error, ConfigError) else str(error)
        log.error("config %s rejected, the last good one keeps serving: %s", self.config_path, text)
        self.runtime.record("file", False, text)

    async def _apply(self, loaded: Loaded) -> None:
        """Apply a loaded config: everything it sets (routes, listeners, certificates, the
        `tls:` options, instance, limits, shutdown grace) takes effect in one step, or, when
        the runtime rejects it (e.g. a port that cannot be bound, a certificate that does not
        load), nothing does."""
        runtime = self.runtime
        assert runtime is not None
        config, pems = loaded
        async with self._apply_lock:  # in the order the configs came
            if config == self.config and pems == self.pems:
                # e.g. the watcher's first read of what start() applied, or an edit undone
                if runtime.last_errors.get("file"):
                    log.info("config %s and its files are back to what is serving",
                             self.config_path)
                    runtime.record("file", True)
                return
            _warn_not_enforced(config)
            if self.config is not None and config.admin != self.config.admin:
                log.warning("admin.listen changed to %s; it takes effect on restart", config.admin)
            if self.config is not None and config.kubernetes != self.config.kubernetes:
                log.warning("watchers.kubernetes changed; it takes effect on restart")
            if self.config is not None and config.marathon != self.config.marathon:
                log.warning("watchers.marathon changed; it takes effect on restart")
            if self.config is not None and config.workers != self.config.workers:
                log.warning("workers changed; it takes effect on restart")
            if self.config is not None and config.telemetry != self.config.telemetry:
                log.warning("access_log, request_id or tracing changed; it takes effect on "
                            "restart (SIGUSR1 reopens the access log file)")
            try:  # the runtime records the outcome; the certificate files are the file's
                await self._apply_file(file_snapshot(config, pems), config)
            except SnapshotError:
                return
            changed = _changed_files(self.config, config)
            if changed:
                log.info("TLS files changed: %s", ", ".join(changed))
                backend_tls.files_changed(changed)
            defaults_changed = self.config is not None and self.config.defaults != config.defaults
            self.config = config
            self.pems = pems
            self.generation += 1
            if defaults_changed and self.kubernetes is not None:
                self.kubernetes.refresh()  # the cluster's services take the new defaults
            if defaults_changed and self.marathon is not None:
                self.marathon.refresh()  # so do the apps
            log.info(
                "config applied: %d services, %d listeners",
                len(runtime.services),
                len(runtime.listeners),
            )
            self.applied.set()

    # -- the DNS source: between the file watcher and the runtime ------------------------------

    def _start_dns(self, runtime: Runtime, loop: asyncio.AbstractEventLoop) -> None:
        """The DNS source gets each file snapshot before the runtime (`_apply_file`), and
        applies it again through `emit` when an answer changes (recorded as watcher "dns");
        its loop runs supervised, as the file watcher's does."""
        from watchers.dns.source import DnsSource

        async def emit(snapshot: Snapshot) -> tuple[Notice, ...]:
            return await runtime.apply(snapshot, record_as="dns")

        self.dns = DnsSource(emit=emit, report=runtime.report)

        def down(exc: BaseException) -> None:
            runtime.report("dns", Health(up=False, error=f"{DNS_LOOP} failed ({describe(exc)}); "
                                         "restarting it"))

        self._dns_task = spawn(supervise(DNS_LOOP, self.dns.run, on_down=down, logger=log),
                               name=DNS_LOOP, held=self._tasks, loop=loop)

    async def _apply_file(self, snapshot: Snapshot, config: Config) -> tuple[Notice, ...]:
        """Apply the file's snapshot with its DNS-backed services' backends filled in."""
        runtime = self.runtime
        assert runtime is not None and self.dns is not None

        async def apply(filled: Snapshot) -> tuple[Notice, ...]:
            notices = await runtime.apply(filled, reload_files=True)
            if any(s.dns for s in filled.services) and not runtime.watcher_synced.get("dns"):
                runtime.record("dns", True)  # its first answers (or none yet) are applied
            return notices

        return await self.dns.apply(snapshot, apply, _resolver_settings(config))

    def reload(self) -> None:
        if self.watcher is not None:
            self.watcher.trigger()

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate's postrotate): the access log file is opened again."""
        if self.telemetry is not None:
            self.telemetry.reopen()
        if self.group is not None:
            self.group.signal_all(signal.SIGUSR1)

    async def stop(self) -> None:
        """Graceful: unready, wait `shutdown.delay`, stop accepting, drain up to the grace."""
        runtime = self.runtime
        if runtime is None:
            return
        config = self.config
        runtime.draining = True
        drained = None
        if self.group is not None:  # the workers drain as this process would
            drained = spawn(self.group.drain(config.shutdown.delay if config else 0.0,
                                             config.shutdown.grace if config else 30.0),
                            name="drain the workers", held=self._tasks)
        for listener in runtime.listeners.values():
            soft = getattr(listener, "soft_drain", None)
            if soft is not None:
                soft()  # keep-alive clients are told to reconnect (elsewhere) from now on
        if config is not None and config.shutdown.delay > 0:
            await asyncio.sleep(config.shutdown.delay)
        if self.watcher is not None:
            self.watcher.stop()
        if self._watcher_task is not None:
            self._watcher_task.cancel()
            await asyncio.gather(self._watcher_task, return_exceptions=True)
        if self.kubernetes is not None:
            await self.kubernetes.stop()
        if self.marathon is not None:
            await self.marathon.stop()
        if self._dns_task is not None:
            self._dns_task.cancel()
            await asyncio.gather(self._dns_task, return_exceptions=True)
        if drained is not None:
            await asyncio.gather(drained, return_exceptions=True)
        await runtime.shutdown(config.shutdown.grace if config else 30.0)
        if self.admin is not None:
            await self.admin.stop()
        if self.telemetry is not None:
            # the last records and spans written (a stuck sink is left behind after 2 s)
            await asyncio.get_running_loop().run_in_executor(None, self.telemetry.stop)
        self.stopped.set()


def _resolver_settings(config: Config) -> ResolverSettings:
    """The `resolvers:` block, with /etc/resolv.conf's nameservers when it names none."""
    settings = config.resolvers or ResolverSettings()
    if settings.nameservers:
        return settings
    return system_settings(settings)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _load(config: Config, read: Callable[[str], bytes]) -> Loaded:
    """`config` with its TLS files' digests, and the PEM of the certificate pairs it names
    (those that could be read; the runtime reports the others), all read once with `read`."""
    held: dict[str, bytes] = {}

    def reading(path: str) -> bytes:
        data = held[path] = read(path)
        return data

    config = with_tls_files(config, reading)
    pairs = [ep.tls for ep in config.entrypoints if ep.tls is not None and ep.tls[0]]
    pairs += [svc.tls for svc in config.snapshot.services
              if svc.tls is not None and svc.listen is not None]
    pems: dict[tuple[str, str], PemPair] = {}
    for cert_file, key_file in pairs:
        if cert_file in held and key_file in held and (cert_file, key_file) not in pems:
            pems[(cert_file, key_file)] = PemPair(
                held[cert_file], held[key_file], origin=_pair_name(cert_file, key_file),
                files=(cert_file, key_file))
    return config, tuple(pems.values())


def _pair_name(cert_file: str, key_file: str) -> str:
    return cert_file if cert_file == key_file else f"{cert_file} (key {key_file})"


def file_snapshot(config: Config, pems: tuple[PemPair, ...] = ()) -> Snapshot:
    """The file config as one source's snapshot: its services and routes, the PEM of its
    certificate pairs, and the process-wide settings only it sets."""
    settings = Settings(
        entrypoints=tuple(Entrypoint(e.name, e.listen, e.tls, e.accept_proxy_protocol,
                                     e.path_rules, e.http2, e.h2c)
                          for e in config.entrypoints),
        defaults=config.defaults, instance=config.instance, limits=config.limits,
        grace=config.shutdown.grace, tls=config.tls,
    )
    return dataclasses.replace(config.snapshot, certificates=Certificates(files=pems),
                               settings=settings)


def _changed_files(old: Config | None, new: Config) -> list[str]:
    """The TLS files of `new` whose content differs from what `old` was applied with."""
    before = dict(old.tls_files) if old is not None else {}
    return [path for path, digest in new.tls_files if path in before and before[path] != digest]


def _warn_not_enforced(config: Config) -> None:
    """Say which accepted keys this version does not act on yet, rather than ignore them,
    and what the config accepts but should fix (Config.warnings)."""
    for warning in config.warnings:
        log.warning("config: %s", warning)


async def _main(
    config_path: str,
    banner: str | None,
    startup: Callable[[], Awaitable[object]] | None,
    workers: int | str | None = None,
    log_args: tuple[str, ...] = (),
) -> int:
    if startup is not None:
        await startup()
    app = App(config_path, workers, log_args)
    try:
        await app.start()
    except ConfigError as e:
        for line in e.errors:
            print(f"edgelb: {config_path}: {line}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"edgelb: {e}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app.reload)
    loop.add_signal_handler(signal.SIGUSR1, app.reopen_logs)
    if banner:
        print(banner, flush=True)
    log.info("edgelb running with %s (version %s, %s)", config_path, __version__,
             compiled.describe())
    await stop.wait()
    log.info("shutting down: draining open connections")
    await app.stop()
    return 0


def run_forever(
    config_path: str,
    banner: str | None = None,
    startup: Callable[[], Awaitable[object]] | None = None,
    workers: int | str | None = None,
    log_args: tuple[str, ...] = (),
) -> int:
    """`workers`: --workers (None: the config's); `log_args`: handed to worker processes."""
    _install_uvloop()
    return asyncio.run(_main(config_path, banner, startup, workers, log_args))
