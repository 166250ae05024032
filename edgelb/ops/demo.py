"""`edgelb demo`: three local HTTP backends of different capacity and speed behind the proxy.

Each demo backend models a service with a fixed number of workers: a request holds a worker for
the backend's service time, and a request that finds every worker busy waits in a FIFO queue.
So a backend answers quickly up to its capacity and slows down beyond it, which is what makes
least-loaded balancing visible. The servers are asyncio Protocols with httptools parsing and
keep-alive, running in the proxy's own event loop. Tests and bench/ reuse them through
`start_demo_backends`, `stop_demo_backends` and `demo_config_yaml`.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import httptools
import yaml


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    capacity: int  # requests served at once; more wait in the backend's queue
    service_time: float  # seconds a request holds a worker


DEFAULT_SPECS: tuple[BackendSpec, ...] = (
    # Speeds close enough that at low load traffic follows capacity (least-loaded treats
    # latencies within ~25% as equal); past a backend's capacity its queue decides.
    BackendSpec("small", capacity=2, service_time=0.011),
    BackendSpec("medium", capacity=4, service_time=0.010),
    BackendSpec("large", capacity=8, service_time=0.009),
)


class _Request(NamedTuple):
    method: bytes
    path: bytes
    keep_alive: bool


_BAD_REQUEST = _Request(b"", b"", False)  # queued in order after a parse error
_REASONS = {200: b"OK", 400: b"Bad Request"}


class DemoBackend:
    """A running demo backend. The counters are plain attributes for tests and benchmarks."""

    def __init__(self, spec: BackendSpec, host: str) -> None:
        if spec.capacity < 1:
            raise ValueError(f"demo backend {spec.name!r}: capacity must be >= 1")
        self.spec = spec
        self.name = spec.name
        self.capacity = spec.capacity
        self.service_time = spec.service_time
        self.host = host
        self.port = 0
        self.busy = 0  # workers holding a request now
        self.max_busy = 0  # the highest `busy` seen
        self.served = 0  # requests that held a worker to the end (/healthz is not counted)
        self._waiting: deque[tuple[_DemoProtocol, _Request]] = deque()
        self._timers: set[asyncio.TimerHandle] = set()
        self._conns: set[_DemoProtocol] = set()
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hello = b""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def queued(self) -> int:
        """Requests waiting for a free worker."""
        return len(self._waiting)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _DemoProtocol(self), self.host, 0, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._hello = f"hello from demo backend {self.name} (port {self.port})\n".encode()

    def close(self) -> None:
        """Stop listening and drop every connection and queued request."""
        if self._server is not None:
            self._server.close()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._waiting.clear()
        for conn in list(self._conns):
            conn.abort()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    # The worker queue. A freed worker takes the oldest waiting request first, before the
    # connection it just answered may submit its next pipelined one.

    def _admit(self, conn: _DemoProtocol, req: _Request) -> None:
        if self.busy < self.capacity:
            self._start(conn, req)
        else:
            self._waiting.append((conn, req))

    def _start(self, conn: _DemoProtocol, req: _Request) -> None:
        assert self._loop is not None
        self.busy += 1
        self.max_busy = max(self.max_busy, self.busy)
        handle: list[asyncio.TimerHandle] = []

        def done() -> None:
            self._timers.discard(handle[0])
            self._done(conn, req)

        handle.append(self._loop.call_later(self.service_time, done))
        self._timers.add(handle[0])

    def _done(self, conn: _DemoProtocol, req: _Request) -> None:
        self.busy -= 1
        self.served += 1
        while self._waiting and self.busy < self.capacity:
            next_conn, next_req = self._waiting.popleft()
            if not next_conn.closed:
                self._start(next_conn, next_req)
        conn.respond(req, 200, self._hello)


class _DemoProtocol(asyncio.Protocol):
    """One client connection: parses requests and answers them one at a time, in order."""

    def __init__(self, backend: DemoBackend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.pending: deque[_Request] = deque()  # pipelined requests not yet started
        self.active = False  # a request of this connection is being served
        self.closed = False
        self.stopped_parsing = False

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.backend._conns.add(self)

    def data_received(self, data: bytes) -> None:
        if self.stopped_parsing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.stopped_parsing = True  # no protocol switch here: answer, then close
        except httptools.HttpParserError:
            self.stopped_parsing = True
            self.pending.append(_BAD_REQUEST)
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pending.clear()
        self.backend._conns.discard(self)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        path = self.url.split(b"?", 1)[0]
        keep_alive = self.parser.should_keep_alive() and not self.parser.should_upgrade()
        self.pending.append(_Request(self.parser.get_method(), path, keep_alive))
        self._next()

    # serving

    def _next(self) -> None:
        if self.active or self.closed or not self.pending:
            return
        req = self.pending.popleft()
        self.active = True
        if req is _BAD_REQUEST:
            self.respond(req, 400, b"bad request\n")
        elif req.path == b"/healthz":
            self.respond(req, 200, b"ok\n")  # health checks never queue behind the workers
        else:
            self.backend._admit(self, req)

    def respond(self, req: _Request, status: int, body: bytes) -> None:
        if self.closed or self.transport is None:
            return
        last = not req.keep_alive or (self.stopped_parsing and not self.pending)
        head = (
            b"HTTP/1.1 %d %s\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"X-Backend: %s\r\n"
            b"Connection: %s\r\n\r\n"
        ) % (
            status,
            _REASONS[status],
            len(body),
            self.backend.name.encode(),
            b"close" if last else b"keep-alive",
        )
        self.transport.write(head if req.method == b"HEAD" else head + body)
        self.active = False
        if last:
            self.closed = True
            self.transport.close()
        else:
            self._next()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


async def start_demo_backends(
    specs: Sequence[BackendSpec] = DEFAULT_SPECS, host: str = "127.0.0.1"
) -> list[DemoBackend]:
    """Start one backend per spec on free ports of `host`, in the running event loop."""
    started: list[DemoBackend] = []
    try:
        for spec in specs:
            backend = DemoBackend(spec, host)
            await backend.start()
            started.append(backend)
    except BaseException:
        await stop_demo_backends(started)
        raise
    return started


async def stop_demo_backends(backends: Sequence[DemoBackend]) -> None:
    for backend in backends:
        backend.close()
    for backend in backends:
        await backend.wait_closed()


def demo_config_yaml(port: int, admin_port: int, backends: Sequence[DemoBackend]) -> str:
    """The config of `edgelb demo`: one least-loaded http service weighted by capacity."""
    config = {
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "services": [
            {
                "name": "demo",
                "listen": f"127.0.0.1:{port}",
                "mode": "http",
                "balance": "least-loaded",
                "health_check": {
                    "path": "/healthz",
                    "interval": "2s",
                    "timeout": "1s",
                    "rise": 2,
                    "fall": 3,
                },
                "backends": [{"address": b.address, "weight": b.capacity} for b in backends],
            }
        ],
    }
    header = ["# Written by `edgelb demo`. Editing this file reloads the proxy in place."]
    header += [
        f"# {b.name}: {b.address}, capacity {b.capacity}, "
        f"{b.service_time * 1000:g} ms per request"
        for b in backends
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False)


def demo_banner(port: int, admin_port: int, config_path: Path | str) -> str:
    proxy = f"http://127.0.0.1:{port}"
    admin = f"http://127.0.0.1:{admin_port}"
    return f"""\
edgelb demo: service "demo" on {proxy}/ balances least-loaded over three demo backends
(small: 2 at a time, 11 ms; medium: 4, 10 ms; large: 8, 9 ms; weights = capacities).

Try:
  curl -i {proxy}/
  seq 400 | xargs -P 16 -I{{}} curl -s {proxy}/ | sort | uniq -c
  curl -s {admin}/metrics | grep '^edgelb_requests_total'
  curl -s {admin}/status.json
  open {admin}/status in a browser (live per-backend load)

Config: {config_path} (edit it: the proxy reloads in place). Ctrl-C stops.
"""


def main(port: int = 8080, admin_port: int = 9090) -> int:
    """Run the demo until interrupted; returns the process exit code."""
    from edgelb.ops.app import run_forever  # imported here: the demo backends do not need it

    with tempfile.TemporaryDirectory(prefix="edgelb-demo-") as tmp:
        config_path = Path(tmp) / "edgelb-demo.yaml"

        async def startup() -> None:
            # Runs inside run_forever's event loop, before it loads the config.
            backends = await start_demo_backends(DEFAULT_SPECS)
            config_path.write_text(demo_config_yaml(port, admin_port, backends))
            for b in backends:
                print(
                    f"demo backend {b.name}: http://{b.address}/ "
                    f"(capacity {b.capacity}, {b.service_time * 1000:g} ms per request)",
                    file=sys.stdout,
                    flush=True,
                )

        return run_forever(
            str(config_path),
            banner=demo_banner(port, admin_port, config_path),
            startup=startup,
        )


# -- `edgelb demo --marathon`: the same backends as the tasks of apps on a fake Marathon ----

MARATHON_PORT = 8180  # the fake Marathon's API (examples/marathon.yaml points at it)
WEB_APP, API_APP = "/demo/web", "/demo/api"
WEB_SERVICE_PORT, API_SERVICE_PORT = 10000, 10001  # the apps' service ports (marathon-lb's)
MARATHON_SPECS: tuple[BackendSpec, ...] = (
    *DEFAULT_SPECS,
    BackendSpec("api-1", capacity=4, service_time=0.005),
    BackendSpec("api-2", capacity=4, service_time=0.005),
)


async def start_demo_marathon(marathon_port: int = MARATHON_PORT) -> tuple[Any, list[DemoBackend]]:
    """Demo backends and a fake Marathon (edgelb.ops.fake_marathon) on 127.0.0.1 whose apps'
    tasks they are: /demo/web (VHOST web.localhost, service port 10000, health checks, two of
    three tasks running) and /demo/api (tcp on 10001, one of two). Stop both when done."""
    from edgelb.ops.fake_marathon import FakeMarathon, app_definition

    backends = await start_demo_backends(MARATHON_SPECS)
    fake = FakeMarathon(port=marathon_port, name="edgelb demo's fake Marathon")
    try:
        await fake.start()
    except BaseException:
        await stop_demo_backends(backends)
        raise
    web = [b for b in backends if not b.name.startswith("api")]
    api = [b for b in backends if b.name.startswith("api")]
    fake.put_app(app_definition(WEB_APP, WEB_SERVICE_PORT, health_checks=True, cpus=1.0, labels={
        "HAPROXY_GROUP": "external", "HAPROXY_0_VHOST": "web.localhost",
        "HAPROXY_0_BIND_ADDR": "127.0.0.1"}), pool=[("127.0.0.1", b.port) for b in web])
    fake.put_app(app_definition(API_APP, API_SERVICE_PORT, cpus=0.5, labels={
        "HAPROXY_GROUP": "external", "HAPROXY_0_BIND_ADDR": "127.0.0.1"}),
        pool=[("127.0.0.1", b.port) for b in api])
    fake.scale(WEB_APP, 2)
    fake.scale(API_APP, 1)
    return fake, backends


def marathon_config_yaml(port: int, admin_port: int, marathon_url: str) -> str:
    """The config of `edgelb demo --marathon`: an entrypoint and the Marathon watcher."""
    config = {
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "entrypoints": {"http": {"listen": f"127.0.0.1:{port}"}},
        "defaults": {"balance": "least-loaded", "slow_start": "10s"},
        "watchers": {"marathon": {"urls": [marathon_url], "group": "external",
                                  "resync": "300s"}},
    }
    header = "# Written by `edgelb demo --marathon`: the proxy follows the fake Marathon.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def marathon_banner(port: int, admin_port: int, marathon_url: str) -> str:
    admin = f"http://127.0.0.1:{admin_port}"
    return f"""\
edgelb demo --marathon: a fake Marathon at {marathon_url} runs two apps whose tasks are local
demo backends; edgelb follows its event stream and swaps the pools in place (no reload).
  /demo/web  VHOST web.localhost (routed on :{port}) and its service port {WEB_SERVICE_PORT}
  /demo/api  tcp on its service port {API_SERVICE_PORT}

Try:
  curl -H 'Host: web.localhost' http://127.0.0.1:{port}/
  curl http://127.0.0.1:{API_SERVICE_PORT}/
  curl {marathon_url}/_fake/                                  (the apps and their tasks)
  curl -X POST '{marathon_url}/_fake/scale?app={WEB_APP}&instances=3'   (scale up: 1 to 3)
  curl -X POST '{marathon_url}/_fake/kill?app={WEB_APP}'                (kill the newest task)
  curl -X POST '{marathon_url}/_fake/health?app={WEB_APP}&alive=false'  (fail its health checks)
  curl -s {marathon_url}/v2/apps?embed=apps.tasks                (what edgelb reads)
  curl -s {admin}/status.json   or open {admin}/status (the pools move within a second)

Ctrl-C stops.
"""


def main_marathon(port: int = 8080, admin_port: int = 9090,
                  marathon_port: int = MARATHON_PORT) -> int:
    """`edgelb demo --marathon` until interrupted."""
    from edgelb.ops.app import run_forever

    with tempfile.TemporaryDirectory(prefix="edgelb-demo-") as tmp:
        config_path = Path(tmp) / "edgelb-demo-marathon.yaml"
        url = f"http://127.0.0.1:{marathon_port}"
        held: list[Any] = []  # the fake and the backends live as long as the loop

        async def startup() -> None:
            fake, backends = await start_demo_marathon(marathon_port)
            held.extend([fake, backends])
            config_path.write_text(marathon_config_yaml(port, admin_port, fake.url))

        return run_forever(str(config_path), banner=marathon_banner(port, admin_port, url),
                           startup=startup)


async def _serve_fake_marathon(port: int) -> None:
    fake, _backends = await start_demo_marathon(port)
    print(f"fake Marathon on {fake.url} (apps {WEB_APP}, {API_APP}); "
          f"controls: curl {fake.url}/_fake/ ; Ctrl-C stops", flush=True)
    await asyncio.Event().wait()


def fake_marathon_main(argv: list[str] | None = None) -> int:
    """`python -m edgelb.ops.demo [--marathon-port 8180]`: the demo's fake Marathon and its
    backends alone (examples/marathon.yaml points at it)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m edgelb.ops.demo",
                                description="the fake Marathon of `edgelb demo --marathon`")
    p.add_argument("--marathon-port", type=int, default=MARATHON_PORT)
    args = p.parse_args(argv)
    try:
        asyncio.run(_serve_fake_marathon(args.marathon_port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(fake_marathon_main())
