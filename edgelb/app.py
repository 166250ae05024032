"""The process: load the config, start the runtime, the admin endpoint and the watchers, and
run until SIGTERM/SIGINT (graceful drain). SIGHUP re-reads the config file at once."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from edgelb import __version__, compiled, tls
from edgelb.config import Config, ConfigError, load_config, not_implemented, parse_config
from edgelb.runtime import EntrypointSpec, Runtime, SnapshotError
from watchers.model import Policy

log = logging.getLogger("edgelb")


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
        self._apply_lock = asyncio.Lock()
        self.stopped = asyncio.Event()
        self.applied = asyncio.Event()  # set after every successful apply (tests await it)
        self.generation = 0

    async def start(self) -> None:
        from edgelb.admin import AdminServer
        from watchers.file import FileWatcher

        config = load_config(self.config_path)  # ConfigError propagates: nothing starts
        loop = asyncio.get_running_loop()
        runtime = Runtime(loop=loop, reserved=[config.admin])
        runtime.grace = config.shutdown.grace
        runtime.instance = config.instance
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
        self.watcher = FileWatcher(
            self.config_path,
            load=lambda data: parse_config(data, origin=str(self.config_path)),
            emit=self._on_config,
            on_error=self._on_config_error,
            interval=0.25,
        )
        self._watcher_task = loop.create_task(self.watcher.run())

    def _defaults(self) -> Policy:
        return self.config.defaults if self.config is not None else Policy()

    def _zone(self) -> str:
        return self.config.instance.zone if self.config is not None else ""

    def _on_config(self, config: Config) -> None:
        if config == self.config:
            return  # e.g. the watcher's first read of the file start() already applied
        asyncio.get_running_loop().create_task(self._apply(config))

    def _on_config_error(self, error: Exception) -> None:
        assert self.runtime is not None
        text = "; ".join(error.errors) if isinstance(error, ConfigError) else str(error)
        log.error("config %s rejected, the last good one keeps serving: %s", self.config_path, text)
        self.runtime.record("file", False, text)

    async def _apply(self, config: Config) -> None:
        runtime = self.runtime
        assert runtime is not None
        _warn_not_enforced(config)
        zone = config.instance.zone or (self.kubernetes.node_zone if self.kubernetes else "")
        runtime.instance = dataclasses.replace(config.instance, zone=zone)
        runtime.limits = config.limits
        refused = not_implemented(config)
        if refused:
            log.error("config %s refused: %s", self.config_path, "; ".join(refused))
            runtime.record("file", False, "; ".join(refused))
            return
        async with self._apply_lock:
            if self.config is not None and config.admin != self.config.admin:
                log.warning("admin.listen changed to %s; it takes effect on restart", config.admin)
            if self.config is not None and config.kubernetes != self.config.kubernetes:
                log.warning("watchers.kubernetes changed; it takes effect on restart")
            eps = [EntrypointSpec(e.name, e.listen, e.tls, e.accept_proxy_protocol)
                   for e in config.entrypoints]
            # `tls:` before the listeners: contexts made in this step carry it from the start;
            # live ones change in place (the next handshake sees it); undone if the step fails
            previous_tls = tls.current_options()
            tls.configure(config.tls)
            try:  # both record the outcome themselves
                if self.config is None or self.config.entrypoints != config.entrypoints or (
                    self.config.defaults != config.defaults
                ):
                    # entrypoints and services in one step: an edit may move a port between them
                    await runtime.set_entrypoints(eps, config.defaults, config.snapshot)
                else:
                    await runtime.apply(config.snapshot)
            except SnapshotError:
                tls.configure(previous_tls)
                return
            runtime.grace = config.shutdown.grace
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
        if self.kubernetes is not None:
            await self.kubernetes.stop()
        await runtime.shutdown(config.shutdown.grace if config else 30.0)
        if self.admin is not None:
            await self.admin.stop()
        self.stopped.set()


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
