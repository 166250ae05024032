"""The Marathon watcher as the process runs it (a watchers.source.Source).

It follows Marathon as marathon-lb did, minus the reloads and with the holes of marathon-lb
closed:

- Sync: the apps (`GET /v2/apps?embed=apps.tasks`) are read and translated into one Snapshot
  (watchers.marathon.translate) handed to `emit` (the runtime's apply): at once on every
  (re)connect of the event stream, after relevant events, and every `resync` as a safety net.
  Events are debounced: a sync waits for QUIET seconds without a new event, but never more than
  MAX_DELAY after the first one, so a storm of health events applies once or a few times and a
  change is live within about MAX_DELAY plus a read. A translation equal to the last applied
  one is not handed over again.
- The event stream (`GET /v2/events`, SSE) is dead when silent for `silence` seconds (Marathon
  writes keep-alives; 30 s by default): it is dropped and opened again, and the apps re-read.
- Several URLs fail over in order, a non-leader's redirect is followed (watchers.marathon.client).
- When no Marathon answers, nothing is emitted: the last good snapshot keeps serving, the
  watcher is reported down (`edgelb_watcher_up{watcher="marathon"}` 0, the error in
  /status.json) until a Marathon answers again. /readyz waits for the first applied read.
- Isolation: the translation skips apps it cannot use (problems). When the runtime rejects a
  snapshot naming the services at fault (watchers.source.Rejected: a static port that cannot
  be bound or is taken), the apps those services came from are dropped and the rest handed
  over again (at most MAX_ATTEMPTS times); each dropped app is a problem. Problems are logged
  once each, counted (`edgelb_watcher_problems`) and listed in /status.json.

Every loop runs supervised (`Tasks.supervise`): one that raises is logged, the watcher marked
down, and the loop restarted after a backoff; the last good snapshot keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from watchers.marathon.client import AuthError, DcosCredentials, MarathonClient, MarathonError
from watchers.marathon.sse import SseError, SseParser
from watchers.marathon.translate import Options, Translation, notice_problems, translate
from watchers.model import Policy, Snapshot
from watchers.source import Emit, Health, Rejected, Report, Tasks, cancel_and_wait

log = logging.getLogger("edgelb.marathon")

NAME = "marathon"
SILENCE = 30.0  # seconds without a byte on the event stream before it counts as dead
QUIET = 0.25  # seconds without a new event before a sync starts
MAX_DELAY = 1.0  # seconds a sync may be held back by a storm of events
RETRY = (0.2, 5.0)  # reconnect / re-read backoff: first delay, maximum (doubling)
MAX_ATTEMPTS = 5  # snapshots handed over per sync while the runtime names services at fault
MAX_DETAILS = 100  # problem lines kept for /status.json
# Events that may change what the apps translate to (the rest of Marathon's are not asked for)
SYNC_EVENTS = (
    "api_post_event",
    "status_update_event",
    "health_status_changed_event",
    "instance_changed_event",
    "instance_health_changed_event",
    "deployment_success",
    "deployment_failed",
    "deployment_step_success",
    "app_terminated_event",
)
EVENT_TYPES = ("event_stream_attached", *SYNC_EVENTS)


class MarathonWatcher:
    """Follows Marathon and feeds `emit`; `start()` then `stop()`, or `run()`.

    `config`: the `watchers.marathon` block (edgelb.ops.config.MarathonWatcherConfig: urls,
    group, health, resync, user, password, password_file, token_file, dcos_credentials, ca).
    `read_policy(labels, base)`: the per-service keys of an app's labels; `defaults()`: the
    file's `defaults:` as they are now; `tls_entrypoint()`: whether some entrypoint has TLS.
    `client`: a MarathonClient (made from the config when None); `silence`: see SILENCE."""

    name = NAME

    def __init__(
        self,
        config: Any,
        *,
        emit: Emit,
        report: Report,
        read_policy: Callable[[dict[str, str], Policy], tuple[Policy, list[str]]],
        defaults: Callable[[], Policy],
        tasks: Tasks,
        tls_entrypoint: Callable[[], bool] = lambda: True,
        client: MarathonClient | None = None,
        silence: float = SILENCE,
        quiet: float = QUIET,
        max_delay: float = MAX_DELAY,
    ) -> None:
        self.config = config
        self.emit = emit
        self.report = report
        self.read_policy = read_policy
        self.defaults = defaults
        self.tasks = tasks
        self.tls_entrypoint = tls_entrypoint
        self.client = client
        self._own_client = client is None
        self.silence = silence
        self.quiet = quiet
        self.max_delay = max_delay
        self.resync = float(getattr(config, "resync", 300.0))
        # what tests and the status read
        self.applies = 0  # snapshots handed over and applied
        self.reads = 0  # apps read
        self.connects = 0  # event streams opened
        self.events = 0  # relevant events received
        self.translation: Translation | None = None  # the last applied one
        self.dropped: dict[str, str] = {}  # app id -> why the runtime could not take it
        self.problems: tuple[str, ...] = ()
        self.stream_url = ""
        # state
        self._dirty = asyncio.Event()
        self._urgent = False
        self._first_dirty = 0.0
        self._last_dirty = 0.0
        self._stream_error = "the event stream is not connected yet"
        self._read_error = ""
        self._last_event = 0.0
        self._last_report = 0.0
        self._applied: Snapshot | None = None  # the translated snapshot last applied whole
        self._reported: set[str] = set()
        self.down: dict[str, str] = {}  # supervised loop that raised -> its error
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Make the client (credentials read now: AuthError names the file and the fix) and
        start following."""
        if self.client is None:
            self.client = make_client(self.config)
        self._report_health(force=True)
        self._supervise("marathon event stream", self._follow)
        self._supervise("marathon sync loop", self._sync_loop, on_up=self._restarted_sync)

    async def run(self) -> None:
        await self.start()
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        self._stopped.set()
        await cancel_and_wait(self._tasks)
        if self._own_client and self.client is not None:
            await self.client.close()

    def refresh(self) -> None:
        """Sync soon (e.g. the file's `defaults:` changed)."""
        self._want(urgent=True)

    @property
    def up(self) -> bool:
        return not (self._stream_error or self._read_error or self.down)

    # -- supervision -------------------------------------------------------------------------

    def _supervise(self, name: str, factory: Callable[[], Awaitable[None]],
                   on_up: Callable[[], Any] | None = None) -> None:
        self.tasks.spawn(
            self.tasks.supervise(name, factory, on_down=partial(self._loop_down, name),
                                 on_up=on_up or partial(self._loop_back, name), logger=log),
            name, self._tasks)

    def _loop_down(self, name: str, exc: BaseException) -> None:
        self.down[name] = f"{name} failed ({self.tasks.describe(exc)}); restarting it"
        self._report_health(force=True)

    def _loop_back(self, name: str) -> None:
        self.down.pop(name, None)
        self._report_health(force=True)

    def _restarted_sync(self) -> None:
        self._loop_back("marathon sync loop")
        self._want(urgent=True)

    def _report_health(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_report < 1.0:
            return
        self._last_report = now
        error = next(iter(self.down.values()), "") or self._read_error or self._stream_error
        self.report(NAME, Health(up=self.up, error=error, last_event=self._last_event,
                                 problems=len(self.problems),
                                 problem_lines=self.problems[:MAX_DETAILS]))

    def _alive(self) -> None:
        """A sign of life from Marathon (bytes on the stream, an apps read)."""
        self._last_event = time.time()
        self._report_health()

    # -- the event stream ------------------------------------------------------------------

    def _want(self, urgent: bool = False) -> None:
        """Ask for a sync: at once when `urgent`, else debounced (see the module docstring)."""
        now = asyncio.get_running_loop().time()
        if not self._dirty.is_set():
            self._first_dirty = now
        self._last_dirty = now
        self._urgent = self._urgent or urgent
        self._dirty.set()

    async def _follow(self) -> None:
        """Keep an event stream open (failover, reconnect with backoff); every (re)connect
        re-reads the apps."""
        assert self.client is not None
        delay = RETRY[0]
        while True:
            try:
                stream = await self.client.events(EVENT_TYPES)
            except AuthError:
                raise
            except MarathonError as e:
                self._stream_broke(str(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY[1])
                continue
            self.connects += 1
            self.stream_url = stream.url
            log.info("marathon: following the event stream of %s", stream.url)
            self._stream_error = ""
            self._alive()
            self._report_health(force=True)
            self._want(urgent=True)
            opened = asyncio.get_running_loop().time()
            try:
                reason = await self._read_stream(stream)
            finally:
                stream.close()
            self._stream_broke(reason)
            if asyncio.get_running_loop().time() - opened > 2 * self.silence:
                delay = RETRY[0]  # it ran well: this is not a crash loop
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY[1])

    async def _read_stream(self, stream: Any) -> str:
        """Read events until the stream ends, breaks or goes silent; why it stopped."""
        parser = SseParser()
        while True:
            try:
                async with asyncio.timeout(self.silence):
                    data = await stream.read()
            except TimeoutError:
                return (f"the event stream of {stream.url} was silent for "
                        f"{self.silence:g}s; reconnecting")
            except MarathonError as e:
                return str(e)
            if not data:
                return f"the event stream of {stream.url} ended; reconnecting"
            self._alive()
            for item in parser.feed(data):
                if isinstance(item, SseError):
                    return f"the event stream of {stream.url}: {item.message}; reconnecting"
                if item.type in SYNC_EVENTS:
                    self.events += 1
                    self._want()

    def _stream_broke(self, reason: str) -> None:
        if reason != self._stream_error:
            log.warning("marathon: %s", reason)
        self._stream_error = reason
        self._report_health(force=True)

    # -- syncing -------------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RETRY[0]
        while True:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the result
                # and loses a cancel that lands as the event is set (stop() would then wait)
                async with asyncio.timeout(self.resync):
                    await self._dirty.wait()
            except TimeoutError:
                self._want(urgent=True)  # the safety net
            while not self._urgent:
                wake = min(self._last_dirty + self.quiet, self._first_dirty + self.max_delay)
                if wake <= loop.time():
                    break
                await asyncio.sleep(wake - loop.time())
            self._dirty.clear()
            self._urgent = False
            try:
                await self.sync()
            except AuthError:
                raise
            except MarathonError as e:
                if str(e) != self._read_error:
                    log.warning("marathon: %s; the last good snapshot keeps serving", e)
                self._read_error = str(e)
                self._report_health(force=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY[1])
                self._want(urgent=True)
                continue
            delay = RETRY[0]

    async def sync(self) -> None:
        """Read the apps, translate them and hand the snapshot over (the loop calls this)."""
        assert self.client is not None
        apps = await self.client.apps()
        self.reads += 1
        if self._read_error:
            log.warning("marathon: the apps are read again")
        self._read_error = ""
        self._alive()
        options = Options(group=self.config.group, health=getattr(self.config, "health", True),
                          defaults=self.defaults(), tls_entrypoint=self.tls_entrypoint())
        translation = translate(apps, options, read_policy=self.read_policy)
        await self.apply(translation)

    async def apply(self, translation: Translation) -> None:
        """Hand `translation` over; drop the apps of services the runtime names at fault."""
        if (translation.snapshot == self._applied and not self.dropped
                and not translation.snapshot.certificates.pairs):
            self._set_problems(translation, {}, ())
            return  # nothing changed since it was applied whole (certificate files named by
            # SSL_CERT labels are read by the runtime at each apply: those snapshots go again)
        snapshot = translation.snapshot
        dropped: dict[str, str] = {}
        notices: tuple[Any, ...] = ()
        for _attempt in range(MAX_ATTEMPTS):
            try:
                notices = await self.emit(snapshot)
            except Rejected as e:
                apps = {translation.apps.get(s) for s in e.services}
                if not e.services or None in apps:
                    # not one app's fault: recorded and logged by the runtime, the last good
                    # snapshot keeps serving
                    log.error("marathon: the snapshot was rejected: %s", e)
                    self._set_problems(translation, dropped, (), rejected=str(e))
                    return
                for svc in e.services:
                    lines = [line for line in e.errors if svc in line] or e.errors
                    dropped[translation.apps[svc]] = f"service {svc}: {'; '.join(lines)}"
                snapshot = _without(translation, snapshot, set(dropped))
                continue
            break
        else:
            log.error("marathon: gave up after %d rejected snapshots; the last good one keeps "
                      "serving", MAX_ATTEMPTS)
            self._set_problems(translation, dropped, (), rejected="too many rejected apps")
            return
        self.applies += 1
        self.translation = translation
        self._applied = translation.snapshot if not dropped else None
        self._set_problems(translation, dropped, notices)

    def _set_problems(self, translation: Translation, dropped: dict[str, str],
                      notices: tuple[Any, ...], rejected: str = "") -> None:
        self.dropped = dropped
        lines = [str(p) for p in translation.problems]
        lines += [f"app {app}: not exposed, the proxy cannot take it: {why}"
                  for app, why in sorted(dropped.items())]
        for n in notices:  # an SSL_CERT file of an app, else said as the runtime says it
            lines += ([str(p) for p in notice_problems(translation, [n])]
                      or [f"{n.origin}: {n.message}"])
        if rejected:
            lines.append(f"the apps' snapshot was rejected: {rejected}")
        for line in lines:
            if line not in self._reported:
                log.warning("marathon: %s", line)
        self._reported = set(lines)
        self.problems = tuple(lines)
        self._report_health(force=True)


def _without(translation: Translation, snapshot: Snapshot, apps: set[str]) -> Snapshot:
    """`snapshot` without the services (and their routes) that came from `apps`."""
    gone = {name for name, app in translation.apps.items() if app in apps}
    return dataclasses.replace(
        snapshot,
        services=tuple(s for s in snapshot.services if s.name not in gone),
        routes=tuple(r for r in snapshot.routes if r.service not in gone))


def make_client(config: Any) -> MarathonClient:
    """A MarathonClient from the `watchers.marathon` block; the credential files are read
    here (an unreadable one raises AuthError naming its key)."""
    password = getattr(config, "password", None)
    password_file = getattr(config, "password_file", None)
    if password_file:
        password = _read_text(password_file, "watchers.marathon.auth.password_file").strip()
    dcos = None
    dcos_file = getattr(config, "dcos_credentials", None)
    if dcos_file:
        dcos = DcosCredentials.from_json(
            _read_text(dcos_file, "watchers.marathon.dcos_credentials"),
            origin=f"watchers.marathon.dcos_credentials ({dcos_file})")
    token_file = getattr(config, "token_file", None)
    token = partial(_read_text, token_file, "watchers.marathon.token_file") if token_file else None
    return MarathonClient(config.urls, user=getattr(config, "user", None), password=password,
                          token=token, dcos=dcos, ca=getattr(config, "ca", None))


def _read_text(path: str, key: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise AuthError(f"{key}: cannot read {path} ({e}); fix the path or the file's "
                        "permissions") from None
