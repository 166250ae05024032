"""Pure-Python cost of one proxied request, without sockets: the data path's protocols are
driven with fake transports, so the figure (microseconds per request) is free of syscall and
scheduling noise. Use it before and after a change on the hot path.

    .venv/bin/python bench/micro_http.py [requests] [routes] [workers] [limits]

With `routes` (a number; -1: none), the request crosses an entrypoint's router instead of a
static port: that many host/path routes of other hosts, and the request's own host with a
prefix. With `workers` (> 1), the pool reads a shared load table of that many workers
(edgelb/workers/shared_load.py), as worker 0 of a group does. With `limits` 1 (and routes
>= 0), the request's route has per-client limits (`filters.limits`: a rate and a count in
flight, never reached), read from the group's shared limits table
(edgelb/workers/shared_limits.py) when `workers` > 1.
"""

from __future__ import annotations

import asyncio
import sys
import time

from edgelb.http.client import ClientProtocol
from edgelb.http.listener import HttpListener
from edgelb.http.router import Router
from edgelb.http.upstream import UpstreamProtocol
from edgelb.pool import ServiceState
from edgelb.workers.shared_limits import SharedLimits
from edgelb.workers.shared_load import SharedLoad
from watchers.model import Address, Backend, ClientLimits, Filters, Route, Service

REQUEST = (
    b"GET /index.html?x=1 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: wrk\r\n"
    b"Accept: */*\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 19:28:03 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 6\r\nConnection: keep-alive\r\n\r\nhello\n"
)


class FakeTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, parts) -> None:
        self.out.append(b"".join(parts))

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 50000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("closed")

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


def main(n: int, routes: int = -1, workers: int = 1, limits: int = 0) -> None:
    loop = asyncio.new_event_loop()
    service = ServiceState(
        Service("web", backends=(Backend("127.0.0.1", 1), Backend("127.0.0.1", 2)))
    )
    shared = None
    if workers > 1:
        shared = SharedLoad.create(workers, 64)
        shared.assign(b.key for b in service.pool.backends)
        service.pool.use_shared(SharedLoad.attach(shared.handle(), 0))
    if routes < 0:
        listener = HttpListener(Address("127.0.0.1", 8080), service=service, loop=loop)
    else:
        listener = HttpListener(Address("127.0.0.1", 8080), loop=loop)
        table = [Route(f"h{i}.example.com", "/", "web") for i in range(routes)]
        filters = Filters(limits=ClientLimits(rps=1e9, connections=1 << 20)) if limits else None
        table.append(Route("www.example.com", "/", "web", name="routes[0]", filters=filters))
        if limits and workers > 1:
            limits_table = SharedLimits.create(workers)
            view = SharedLimits.attach(limits_table.handle(), 0)
            listener.router = Router(table, group=view)
        else:
            listener.router = Router(table)
        listener.services = {"web": service}
    client = ClientProtocol(listener)
    ct = FakeTransport()
    client.connection_made(ct)
    ups = []
    for b in service.pool.backends:
        up = UpstreamProtocol(b, service, listener)
        up.connection_made(FakeTransport())
        up.park()
        ups.append(up)
    by_backend = {id(u.backend): u for u in ups}
    for round_ in range(2):
        t0 = time.perf_counter()
        for _ in range(n):
            client.data_received(REQUEST)
            up = by_backend[id(client.active.backend)]
            up.data_received(RESPONSE)
        dt = time.perf_counter() - t0
        ct.out.clear()
        for u in ups:
            u.transport.out.clear()
        if round_:
            print(f"{dt / n * 1e6:.2f} us per request (python only, {n} requests)")
    assert sum(b.requests for b in service.pool.backends) == 2 * n
    if shared is not None:
        assert all(shared.total(b.slot) == 0 for b in service.pool.backends)
        shared.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000,
         int(sys.argv[2]) if len(sys.argv) > 2 else -1,
         int(sys.argv[3]) if len(sys.argv) > 3 else 1,
         int(sys.argv[4]) if len(sys.argv) > 4 else 0)
