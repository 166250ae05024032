"""Request mirroring (a route's `filters.mirrors`, Gateway API's RequestMirror): a copy of a
request goes to another service's balancer, fire-and-forget; its answer is read and dropped.

The original never waits for, fails with or is held by its copy: the copy is made from bytes
the proxy already has (the head as the route's filters left it, with the forwarding fields
the original gets, and the body as it streams by)
and sent on a connection of its own, in a task held by the listener, after the original was
handed on. Bounds:

- a body over MIRROR_BODY_MAX bytes is not mirrored (skipped): by its Content-Length at once,
  or, for a chunked body, once that much was seen (what was gathered is dropped);
- at most MIRRORS_IN_FLIGHT copies are on their way at once per listener; beyond, skipped;
- a copy waits for its service's connect_timeout, then response_timeout, and is abandoned;
  copies still on their way when a listener is aborted (the end of its grace) are dropped.

So one exchange holds at most MIRROR_BODY_MAX bytes per copy target. Counted per mirrored-to
service in `ServiceState.mirrors` (edgelb_mirror_requests_total): "sent" (an answer came
back, whatever its status), "failed" (no connection, reset or no answer in time), "skipped"
(body too large, no usable backend, too many in flight, an upgrade, or an HTTP/2 backend:
copies speak HTTP/1.1 only, over TLS when the service's backends want it).
"""

from __future__ import annotations

import asyncio
import random
import ssl
from typing import TYPE_CHECKING, Any

from edgelb.control.tasks import log_failure
from edgelb.http.request import forwarding_lines
from edgelb.net.backend_tls import client_context, server_hostname

if TYPE_CHECKING:
    from edgelb.http.exchange import Exchange
    from edgelb.http.router import Rule
    from edgelb.pool import BackendState, ServiceState

MIRROR_BODY_MAX = 64 * 1024
MIRRORS_IN_FLIGHT = 256

_rng = random.Random()


def count(service: ServiceState, result: str) -> None:
    service.mirrors[result] = service.mirrors.get(result, 0) + 1


def _content_length(lines: list[bytes]) -> int:
    """The request's Content-Length, or -1 (none: chunked or no body)."""
    for ln in lines:
        if ln[:15].lower() == b"content-length:":
            value = ln[15:].strip()
            return int(value) if value.isdigit() else MIRROR_BODY_MAX + 1
    return -1


class MirrorCopy:
    """What an exchange keeps for its copies while its body streams by."""

    __slots__ = ("chunks", "head", "size", "tail", "targets")

    def __init__(self, targets: list[ServiceState], head: bytes, tail: bytes) -> None:
        self.targets = targets
        self.head = head  # the request line and fields, less the framing
        self.tail = tail  # the forwarding fields and the blank line
        self.chunks: list[bytes] = []
        self.size = 0


def start(ex: Exchange, rule: Rule, listener: Any) -> None:
    """Decide the copies of `ex` (its route's mirrors, each at its percent), after the
    route's filters rewrote it. A request without a body (or whose body was already read
    whole) is sent at once; else `ex.mirror` gathers the body (`body`, `complete`)."""
    targets = []
    for m in rule.mirrors:
        if m.percent < 100.0 and _rng.random() * 100.0 >= m.percent:
            continue
        target = listener.services.get(m.service)
        if target is not None:
            targets.append(target)
    if not targets:
        return
    length = _content_length(ex.lines)
    if ex.upgrade or ex.method == b"CONNECT" or length > MIRROR_BODY_MAX:
        for t in targets:
            count(t, "skipped")
        return
    lines = [ln for ln in ex.lines if ln[:15].lower() != b"content-length:"]
    if not ex.has_host:
        lines.append(b"host: %s\r\n" % listener.default_host())
    head = b"".join((ex.method, b" ", ex.url, b" HTTP/1.1\r\n", *lines,
                     b"connection: close\r\n"))
    copy = MirrorCopy(targets, head, forwarding_lines(ex.client, ex))
    if ex.body_buffer:  # read before the request was routed (it waited its turn)
        copy.chunks = list(ex.body_buffer)
        copy.size = ex.buffered
        if copy.size > MIRROR_BODY_MAX:
            for t in targets:
                count(t, "skipped")
            return
    if ex.request_complete or (length < 0 and not ex.chunked):
        send(ex, copy)
    else:
        ex.mirror = copy


def body(ex: Exchange, data: bytes) -> None:
    """More of `ex`'s body went by: kept for its copies, up to MIRROR_BODY_MAX."""
    copy: MirrorCopy = ex.mirror
    copy.size += len(data)
    if copy.size > MIRROR_BODY_MAX:
        ex.mirror = None
        for t in copy.targets:
            count(t, "skipped")
        return
    copy.chunks.append(data)


def complete(ex: Exchange) -> None:
    """`ex`'s body was read whole: its copies go."""
    copy: MirrorCopy = ex.mirror
    ex.mirror = None
    send(ex, copy)


def send(ex: Exchange, copy: MirrorCopy) -> None:
    client = ex.client
    listener = client.listener
    payload = b"".join((copy.head, b"content-length: %d\r\n" % copy.size, copy.tail,
                        *copy.chunks))
    held: set[asyncio.Task[Any]] = listener.connecting
    for target in copy.targets:
        policy = target.policy
        if policy.backend_protocol != "http1" or len(listener.mirroring) >= MIRRORS_IN_FLIGHT:
            count(target, "skipped")
            continue
        pool = target.pool
        backend = pool.pick()
        if backend is None:
            count(target, "skipped")
            continue
        pool.acquire(backend)
        task = client.loop.create_task(_deliver(payload, target, backend))
        listener.mirroring.add(task)
        task.add_done_callback(listener.mirroring.discard)
        held.add(task)
        task.add_done_callback(held.discard)
        task.add_done_callback(log_failure)


class _Sink:
    """Writes the copy, reads its answer and drops it (an asyncio.Protocol)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.answered = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.Transport) -> None:
        transport.write(self.payload)
        self.payload = b""

    def data_received(self, data: bytes) -> None:
        self.answered = True

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


async def _deliver(payload: bytes, target: ServiceState, backend: BackendState) -> None:
    policy = target.policy
    spec = backend.spec
    tls = policy.backend_tls
    extra: dict[str, Any] = {}
    if tls is not None:
        extra = {"ssl": client_context(tls), "server_hostname": server_hostname(tls, spec.host)}
    loop = asyncio.get_running_loop()
    sink = _Sink(payload)
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(policy.connect_timeout):
            transport, _ = await loop.create_connection(lambda: sink, spec.host, spec.port,
                                                        **extra)
        async with asyncio.timeout(policy.response_timeout):
            await sink.done
    except (OSError, TimeoutError, ssl.SSLError):
        pass
    finally:
        if transport is not None:
            transport.close()
        target.pool.release(backend)
        count(target, "sent" if sink.answered else "failed")
