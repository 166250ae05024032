"""The process: load the config, start the runtime, the admin endpoint and the watchers, and
run until SIGTERM/SIGINT (graceful drain). SIGHUP re-reads the config file at once.

Certificate rotation: the file watcher watches, besides the config, every certificate, key and
CA file the config names (the loader reads them through `FileWatcher.read`), and the loaded
Config carries their digests (`Config.tls_files`), so a rewritten, renamed or symlink-swapped
file makes a Config that differs from the one applied and is applied like an edit: within a
poll or two, or at once on SIGHUP. Applying it re-reads the certificate pairs (unchanged ones
are kept as they are); a pair that does not load rejects it whole, so the old certificate
keeps serving and the failure is reported as any rejected config is (log, /status.json,
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

from edgelb import __version__, compiled
from edgelb.control.runtime import EntrypointSpec, Runtime, Settings, SnapshotError
from edgelb.control.tasks import describe, spawn, supervise
from edgelb.net import backend_tls
from edgelb.ops.config import (
    Config,
    ConfigError,
    load_config,
    not_implemented,
    parse_config,
    with_tls_files,
)
from watchers.model import Policy

log = logging.getLogger("edgelb")

FILE_LOOP = "file watcher loop"


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        log.warning("uvloop is not installed; running on the default asyncio loop (slower)")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class App:
    """Everything one `edgelb run` owns; also used by tests to run the whole process in-loop."""

    def __init__(self, config_path: str | Path) -> None:
        self.config_path = Path(config_path)
        self.config: Config | None = None
        self.runtime: Runtime | None = None
        self.admin = None
        self.watcher = None
        self.kubernetes = None  # edgelb.k8s_watcher.KubernetesWatcher when enabled
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
        config = with_tls_files(load_config(self.config_path), _read)
        loop = asyncio.get_running_loop()
        runtime = Runtime(loop=loop, reserved=[config.admin])
        runtime.register_watcher("file")
        self.runtime = runtime
        await self._apply(config)
        if runtime.last_errors.get("file"):
            raise SystemExit(f"edgelb: {runtime.last_errors['file']}")
        runtime.start_sweeper()
        k8s = config.kubernetes
        if k8s is not None and k8s.enabled:
            from edgelb.k8s_watcher import KubernetesWatcher
            from watchers.kubernetes.client import CredentialsError

            self.kubernetes = KubernetesWatcher(
                k8s, runtime, defaults=self._defaults, zone=self._zone
            )
            try:
                await self.kubernetes.start()
            except CredentialsError as e:
                raise SystemExit(f"edgelb: watchers.kubernetes: {e}") from None
        self.admin = AdminServer(runtime, config.admin)
        await self.admin.start()
        origin = str(self.config_path)
        watcher: FileWatcher[Config] = FileWatcher(
            self.config_path,
            # the TLS files are read through the watcher, which watches them from then on
            load=lambda data: with_tls_files(parse_config(data, origin=origin), watcher.read),
            emit=self._on_config,
            on_error=self._on_config_error,
            interval=0.25,
            verify_every=4,  # contents re-checked every second, whatever stat says
        )
        self.watcher = watcher
        self._watcher_task = spawn(
            supervise(FILE_LOOP, self.watcher.run, on_down=self._file_loop_down, logger=log),
            name=FILE_LOOP, held=self._tasks, loop=loop)

    def _defaults(self) -> Policy:
        return self.config.defaults if self.config is not None else Policy()

    def _zone(self) -> str:
        return self.config.instance.zone if self.config is not None else ""

    def _on_config(self, config: Config) -> None:
        self._file_loop_back()
        # (a config equal to the applied one is recognised by _apply, under its lock)
        spawn(self._apply(config), name="apply the config file", held=self._tasks)

    def _file_loop_down(self, exc: BaseException) -> None:
        """The file watcher's loop raised and waits to restart (edgelb.control.tasks.supervise): the
        watcher is down and says why; the applied config keeps serving, /readyz unchanged."""
        assert self.runtime is not None
        self._file_loop_error = f"{FILE_LOOP} failed ({describe(exc)}); restarting it"
        self.runtime.watcher_up["file"] = False
        self.runtime.last_errors["file"] = self._file_loop_error

    def _file_loop_back(self) -> None:
        """The restarted file watcher read the file again (good or bad content): it is up."""
        error, self._file_loop_error = self._file_loop_error, None
        if error is None or self.runtime is None:
            return
        self.runtime.watcher_up["file"] = True
        if self.runtime.last_errors.get("file") == error:
            del self.runtime.last_errors["file"]

    def _on_config_error(self, error: Exception) -> None:
        assert self.runtime is not None
        self._file_loop_back()
        text = "; ".join(error.errors) if isinstance(error, ConfigError) else str(error)
        log.error("config %s rejected, the last good one keeps serving: %s", self.config_path, text)
        self.runtime.record("file", False, text)

    async def _apply(self, config: Config) -> None:
        """Apply a loaded config: everything it sets (routes, listeners, certificates, the
        `tls:` options, instance, limits, shutdown grace) takes effect in one step, or, when
        the runtime rejects it (e.g. a port that cannot be bound, a certificate that does not
        load), nothing does."""
        runtime = self.runtime
        assert runtime is not None
        async with self._apply_lock:  # in the order the configs came
            if config == self.config:
                # e.g. the watcher's first read of what start() applied, or an edit undone
                if runtime.last_errors.get("file"):
                    log.info("config %s and its files are back to what is serving",
                             self.config_path)
                    runtime.record("file", True)
                return
            _warn_not_enforced(config)
            refused = not_implemented(config)
            if refused:
                log.error("config %s refused: %s", self.config_path, "; ".join(refused))
                runtime.record("file", False, "; ".join(refused))
                return
            if self.config is not None and config.admin != self.config.admin:
                log.warning("admin.listen changed to %s; it takes effect on restart", config.admin)
            if self.config is not None and config.kubernetes != self.config.kubernetes:
                log.warning("watchers.kubernetes changed; it takes effect on restart")
            eps = [EntrypointSpec(e.name, e.listen, e.tls, e.accept_proxy_protocol, e.path_rules)
                   for e in config.entrypoints]
            zone = config.instance.zone or (self.kubernetes.node_zone if self.kubernetes else "")
            settings = Settings(instance=dataclasses.replace(config.instance, zone=zone),
                                limits=config.limits, grace=config.shutdown.grace,
                                tls=config.tls)
            try:  # both record the outcome themselves; the certificate files are the file's
                if self.config is None or self.config.entrypoints != config.entrypoints or (
                    self.config.defaults != config.defaults
                ):
                    # entrypoints and services in one step: an edit may move a port between them
                    await runtime.set_entrypoints(eps, config.defaults, config.snapshot,
                                                  settings=settings, reload_files=True)
                else:
                    await runtime.apply(config.snapshot, settings=settings, reload_files=True)
            except SnapshotError:
                return
            changed = _changed_files(self.config, config)
            if changed:
                log.info("TLS files changed: %s", ", ".join(changed))
                backend_tls.files_changed(changed)
            defaults_changed = self.config is not None and self.config.defaults != config.defaults
            self.config = config
            self.generation += 1
            if defaults_changed and self.kubernetes is not None:
                self.kubernetes.refresh()  # the cluster's services take the new defaults
            log.info(
                "config applied: %d services, %d listeners",
                len(runtime.services),
                len(runtime.listeners),
            )
            self.applied.set()

    def reload(self) -> None:
        if self.watcher is not None:
            self.watcher.trigger()

    async def stop(self) -> None:
        """Graceful: unready, wait `shutdown.delay`, stop accepting, drain up to the grace."""
        runtime = self.runtime
        if runtime is None:
            return
        config = self.config
        runtime.draining = True
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
        await runtime.shutdown(config.shutdown.grace if config else 30.0)
        if self.admin is not None:
            await self.admin.stop()
        self.stopped.set()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _changed_files(old: Config | None, new: Config) -> list[str]:
    """The TLS files of `new` whose content differs from what `old` was applied with."""
    before = dict(old.tls_files) if old is not None else {}
    return [path for path, digest in new.tls_files if path in before and before[path] != digest]


def _warn_not_enforced(config: Config) -> None:
    """Say which accepted keys this version does not act on yet, rather than ignore them,
    and what the config accepts but should fix (Config.warnings)."""
    if config.marathon is not None:
        log.warning("watchers.marathon is set, but this version has no Marathon watcher yet")
    for warning in config.warnings:
        log.warning("config: %s", warning)


async def _main(
    config_path: str,
    banner: str | None,
    startup: Callable[[], Awaitable[object]] | None,
) -> int:
    if startup is not None:
        await startup()
    app = App(config_path)
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
) -> int:
    _install_uvloop()
    return asyncio.run(_main(config_path, banner, startup))
