"""A fake Marathon on 127.0.0.1 speaking Marathon's wire protocol, for the tests and for
`edgelb demo --marathon`.

What a client sees, as from Marathon:
- `GET /v2/apps` -> `{"apps": [...]}`; `embed=apps.tasks` adds each app's `tasks`,
  `embed=apps.readiness` its `readinessCheckResults`, `embed=apps.counts` its counts.
- `GET /v2/events` with `Accept: text/event-stream` -> SSE frames `event: <type>` /
  `data: <json>` / blank line, `event_stream_attached` first, then the events as they happen
  (only the `event_type` query values, when some are given), and a keep-alive (a bare CRLF, as
  Marathon's Jetty event source writes) every `keepalive` seconds of quiet.
- 401 without the credentials it was told to require (basic auth, or `Authorization:
  token=...`), a 307 to the leader when it acts as a non-leader.

What a test (or the demo, over HTTP) controls: the apps and their tasks (`put_app`,
`add_task`, `kill_task`, `set_health`, `scale`), which emit the events Marathon would
(`api_post_event`, `status_update_event`, `health_status_changed_event`,
`deployment_success`); `emit` for any other event; `follow(url)` to act as a non-leader;
`drop_streams()` (abrupt close), `silent` (connections kept, nothing sent), `refuse()` /
`accept()` (the port closed and opened again).

The demo's control endpoint, under `/_fake/`: `GET /_fake/` (help), `POST
/_fake/scale?app=/demo/web&instances=N`, `POST /_fake/kill?app=/demo/web` (its newest task),
`POST /_fake/health?app=/demo/web&alive=false` (every task of the app).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

KEEPALIVE = b"\r\n"
_ids = itertools.count(1)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class _Stream:
    """One open event stream."""

    def __init__(self, response: web.StreamResponse, request: web.Request,
                 types: set[str]) -> None:
        self.response = response
        self.request = request
        self.types = types  # empty: every event
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=10000)

    def wants(self, event_type: str) -> bool:
        return not self.types or event_type in self.types


class FakeMarathon:
    """See the module docstring. `start()` binds (port 0 picks one), `stop()` closes."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, keepalive: float = 1.0,
                 user: str | None = None, password: str | None = None,
                 token: str | None = None, name: str = "fake-marathon",
                 ssl: Any = None) -> None:
        self.host = host
        self.ssl = ssl  # an ssl.SSLContext: serve https
        self.port = port
        self.keepalive = keepalive
        self.user = user
        self.password = password
        self.token = token
        self.name = name
        self.apps: dict[str, dict[str, Any]] = {}  # app id -> its definition (no tasks)
        self.tasks: dict[str, list[dict[str, Any]]] = {}  # app id -> its tasks
        self.pools: dict[str, list[tuple[str, int]]] = {}  # app id -> addresses to scale on
        self.leader: str | None = None  # another Marathon's URL: answer 307 to it
        self.silent = False  # keep the streams open but send nothing
        self.apps_reads = 0
        self.stream_opens = 0
        self.events_sent: dict[str, int] = {}
        self.streams: set[_Stream] = set()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> FakeMarathon:
        app = web.Application()
        app.router.add_get("/v2/apps", self._apps)
        app.router.add_get("/v2/events", self._events)
        app.router.add_get("/v2/leader", self._leader)
        app.router.add_get("/_fake/", self._help)
        app.router.add_post("/_fake/scale", self._scale)
        app.router.add_post("/_fake/kill", self._kill)
        app.router.add_post("/_fake/health", self._health)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        await self.accept()
        return self

    async def accept(self) -> None:
        """Listen (again) on the port."""
        assert self._runner is not None and self._runner.server is not None
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._runner.server, self.host, self.port,
                                                reuse_address=True, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        """Close the port (connections are refused) and drop every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.drop_streams()
        if self._runner is not None and self._runner.server is not None:
            await self._runner.server.shutdown(0.1)

    async def stop(self) -> None:
        await self.refuse()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- controls ------------------------------------------------------------------------------

    def follow(self, leader_url: str | None) -> None:
        """Act as a non-leader redirecting to `leader_url` (None: be the leader again)."""
        self.leader = leader_url

    def drop_streams(self) -> None:
        """Close every event stream abruptly (no last chunk)."""
        for stream in list(self.streams):
            transport = stream.request.transport
            if transport is not None:
                transport.abort()
            stream.queue.put_nowait(None)
        self.streams.clear()

    def emit(self, event_type: str, data: dict[str, Any] | None = None) -> None:
        """Send one event to every stream that asked for its type."""
        body = {"eventType": event_type, "timestamp": _now(), **(data or {})}
        frame = f"event: {event_type}\ndata: {json.dumps(body)}\n\n".encode()
        self.events_sent[event_type] = self.events_sent.get(event_type, 0) + 1
        for stream in self.streams:
            if stream.wants(event_type) and not stream.queue.full():
                stream.queue.put_nowait(frame)

    def put_app(self, app: dict[str, Any], tasks: Iterable[dict[str, Any]] = (),
                pool: Iterable[tuple[str, int]] = ()) -> None:
        """Create or replace an app (its tasks kept unless given); `pool`: the addresses
        `scale` may start its tasks on."""
        app = copy.deepcopy(app)
        app.setdefault("instances", 0)
        app.setdefault("cpus", 1.0)
        app.setdefault("mem", 128.0)
        app.setdefault("labels", {})
        app.setdefault("healthChecks", [])
        app["version"] = _now()
        self.apps[app["id"]] = app
        self.tasks.setdefault(app["id"], [])
        if pool:
            self.pools[app["id"]] = list(pool)
        for task in tasks:
            self.tasks[app["id"]].append(task)
        app["instances"] = len(self.tasks[app["id"]]) or app["instances"]
        self.emit("api_post_event", {"clientIp": "127.0.0.1", "uri": f"/v2/apps{app['id']}",
                                     "appDefinition": self._app_json(app, tasks=False)})
        self.emit("deployment_success", {"id": f"deployment-{next(_ids)}"})

    def remove_app(self, app_id: str) -> None:
        for task in list(self.tasks.get(app_id, [])):
            self.kill_task(app_id, task["id"])
        self.apps.pop(app_id, None)
        self.tasks.pop(app_id, None)
        self.emit("app_terminated_event", {"appId": app_id})

    def add_task(self, app_id: str, host: str, port: int, *, healthy: bool | None = None,
                 state: str = "TASK_RUNNING") -> str:
        """Start a task of `app_id` at host:port; with health checks, `healthy` None means no
        result yet. Returns its id."""
        app = self.apps[app_id]
        task_id = f"{app_id.strip('/').replace('/', '_')}.{next(_ids):08d}"
        task: dict[str, Any] = {
            "id": task_id, "appId": app_id, "host": host, "ports": [port],
            "ipAddresses": [{"ipAddress": host, "protocol": "IPv4"}],
            "slaveId": "fake-agent-1", "state": state, "stagedAt": _now(),
            "startedAt": _now(), "version": app["version"],
        }
        if app.get("healthChecks"):
            task["healthCheckResults"] = [] if healthy is None else [self._result(task_id,
                                                                                  healthy)]
        self.tasks[app_id].append(task)
        app["instances"] = len(self.tasks[app_id])
        self._status(task, state)
        return task_id

    def kill_task(self, app_id: str, task_id: str) -> None:
        tasks = self.tasks.get(app_id, [])
        for task in tasks:
            if task["id"] == task_id:
                tasks.remove(task)
                self.apps[app_id]["instances"] = len(tasks)
                self._status(task, "TASK_KILLED")
                return
        raise KeyError(f"no task {task_id} in {app_id}")

    def set_health(self, app_id: str, task_id: str, alive: bool) -> None:
        for task in self.tasks.get(app_id, []):
            if task["id"] == task_id:
                task["healthCheckResults"] = [self._result(task_id, alive)]
                self.emit("health_status_changed_event", {
                    "appId": app_id, "taskId": task_id, "instanceId": task_id,
                    "version": task["version"], "alive": alive})
                return
        raise KeyError(f"no task {task_id} in {app_id}")

    def scale(self, app_id: str, instances: int) -> None:
        """Start tasks on the app's pool addresses (healthy at once), or kill the newest."""
        tasks = self.tasks[app_id]
        while len(tasks) > instances:
            self.kill_task(app_id, tasks[-1]["id"])
        used = {(t["host"], t["ports"][0]) for t in tasks}
        for host, port in self.pools.get(app_id, []):
            if len(tasks) >= instances:
                break
            if (host, port) not in used:
                self.add_task(app_id, host, port, healthy=True)
        self.emit("deployment_success", {"id": f"deployment-{next(_ids)}"})

    # -- wire protocol -------------------------------------------------------------------------

    def _app_json(self, app: dict[str, Any], tasks: bool, readiness: bool = False,
                  counts: bool = False) -> dict[str, Any]:
        out = copy.deepcopy(app)
        running = self.tasks.get(app["id"], [])
        if tasks:
            out["tasks"] = copy.deepcopy(running)
        if readiness:
            out["readinessCheckResults"] = []
        if counts:
            healthy = sum(1 for t in running
                          if any(r.get("alive") for r in t.get("healthCheckResults", [])))
            out.update(tasksStaged=0, tasksRunning=len(running), tasksHealthy=healthy,
                       tasksUnhealthy=0)
        return out

    @staticmethod
    def _result(task_id: str, alive: bool) -> dict[str, Any]:
        return {"alive": alive, "consecutiveFailures": 0 if alive else 1,
                "firstSuccess": _now() if alive else None, "lastFailure": None,
                "lastSuccess": _now() if alive else None, "taskId": task_id,
                "instanceId": task_id}

    def _status(self, task: dict[str, Any], state: str) -> None:
        self.emit("status_update_event", {
            "slaveId": task["slaveId"], "taskId": task["id"], "taskStatus": state,
            "message": "", "appId": task["appId"], "host": task["host"],
            "ipAddresses": task["ipAddresses"], "ports": task["ports"],
            "version": task["version"]})

    def _refused(self, request: web.Request) -> web.StreamResponse | None:
        """401 without the required credentials; 307 to the leader when not one."""
        given = request.headers.get("Authorization", "")
        if self.user is not None:
            expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            if given != f"Basic {expected}":
                return web.json_response({"message": "invalid username or password."},
                                         status=401,
                                         headers={"WWW-Authenticate": 'Basic realm="Mesosphere"'})
        if self.token is not None and given != f"token={self.token}":
            return web.json_response({"message": "Unauthorized"}, status=401,
                                     headers={"WWW-Authenticate": "acsjwt"})
        if self.leader is not None:
            raise web.HTTPTemporaryRedirect(self.leader.rstrip("/") + request.path_qs)
        return None

    async def _apps(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        self.apps_reads += 1
        embed = set(request.query.getall("embed", []))
        apps = [self._app_json(a, tasks="apps.tasks" in embed,
                               readiness="apps.readiness" in embed,
                               counts="apps.counts" in embed) for a in self.apps.values()]
        return web.json_response({"apps": apps})

    async def _leader(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        return refused or web.json_response({"leader": f"{self.host}:{self.port}"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        if "text/event-stream" not in request.headers.get("Accept", ""):
            return web.json_response({"message": "Accept: text/event-stream is required"},
                                     status=406)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        stream = _Stream(response, request, set(request.query.getall("event_type", [])))
        self.streams.add(stream)
        self.stream_opens += 1
        peer = request.remote or ""
        attached = {"remoteAddress": peer}
        if stream.wants("event_stream_attached"):
            body = {"eventType": "event_stream_attached", "timestamp": _now(), **attached}
            stream.queue.put_nowait(
                f"event: event_stream_attached\ndata: {json.dumps(body)}\n\n".encode())
        try:
            while True:
                try:
                    async with asyncio.timeout(self.keepalive):
                        frame = await stream.queue.get()
                except TimeoutError:
                    frame = KEEPALIVE
                if frame is None:
                    break
                if self.silent:
                    continue
                await response.write(frame)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self.streams.discard(stream)
        return response

    # -- the demo's control endpoint -------------------------------------------------------

    async def _help(self, request: web.Request) -> web.StreamResponse:
        lines = [f"{self.name}: a fake Marathon at {self.url}", "apps:"]
        for app_id, tasks in self.tasks.items():
            addrs = ", ".join(f"{t['host']}:{t['ports'][0]}" for t in tasks) or "no tasks"
            lines.append(f"  {app_id}: {len(tasks)} task(s): {addrs}")
        lines += ["controls:",
                  f"  curl -X POST '{self.url}/_fake/scale?app=APP&instances=N'",
                  f"  curl -X POST '{self.url}/_fake/kill?app=APP'",
                  f"  curl -X POST '{self.url}/_fake/health?app=APP&alive=false'"]
        return web.Response(text="\n".join(lines) + "\n")

    def _app_of(self, request: web.Request) -> str:
        app_id = request.query.get("app", "")
        if app_id not in self.apps:
            raise web.HTTPNotFound(text=f"no app {app_id!r}; apps: {', '.join(self.apps)}\n")
        return app_id

    async def _scale(self, request: web.Request) -> web.StreamResponse:
        app_id = self._app_of(request)
        try:
            instances = int(request.query.get("instances", ""))
        except ValueError:
            raise web.HTTPBadRequest(text="instances=N is required\n") from None
        limit = len(self.pools.get(app_id, []))
        if not 0 <= instances <= limit:
            raise web.HTTPBadRequest(text=f"{app_id} scales from 0 to {limit} here\n")
        self.scale(app_id, instances)
        return web.Response(text=f"{app_id}: {len(self.tasks[app_id])} task(s)\n")

    async def _kill(self, request: web.Request) -> web.StreamResponse:
        app_id = self._app_of(request)
        tasks = self.tasks[app_id]
        if not tasks:
            raise web.HTTPConflict(text=f"{app_id} has no task to kill\n")
        self.kill_task(app_id, tasks[-1]["id"])
        return web.Response(text=f"{app_id}: killed one; {len(tasks)} task(s) left\n")

    async def _health(self, request: web.Request) -> web.StreamResponse:
        app_id = self._app_of(request)
        alive = request.query.get("alive", "true").lower() not in ("false", "0", "no")
        if not self.apps[app_id].get("healthChecks"):
            raise web.HTTPConflict(text=f"{app_id} has no health checks\n")
        for task in self.tasks[app_id]:
            self.set_health(app_id, task["id"], alive)
        return web.Response(text=f"{app_id}: every task {'healthy' if alive else 'unhealthy'}\n")


def app_definition(app_id: str, service_port: int | None, *, labels: dict[str, str] | None = None,
                   health_checks: bool = False, cpus: float = 1.0) -> dict[str, Any]:
    """A host-networking app as Marathon 1.5+ shows it (portDefinitions)."""
    app: dict[str, Any] = {
        "id": app_id, "cpus": cpus, "mem": 64.0, "instances": 0,
        "labels": dict(labels or {}),
        "networks": [{"mode": "host"}],
        "portDefinitions": ([{"port": service_port, "protocol": "tcp", "name": "http"}]
                            if service_port is not None else []),
        "healthChecks": ([{"protocol": "MESOS_HTTP", "path": "/healthz", "portIndex": 0,
                           "gracePeriodSeconds": 5, "intervalSeconds": 2, "timeoutSeconds": 1,
                           "maxConsecutiveFailures": 3}] if health_checks else []),
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return app

