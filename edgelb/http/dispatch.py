"""Where a request goes: route -> gates (sources, redirect, max_body, auth) -> pick a backend
-> queue for a slot or shed -> send; and after a failure, retry elsewhere or answer 502/504.

These are functions of the client connection and its exchange; the proxy's own answers go out
through `ClientProtocol.answer`, the request through `upstream.send_to`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from balancers.retry_budget import IDEMPOTENT, retry_allowed
from balancers.zones import prefer_zone
from edgelb.http.accounting import count_failure, note_error
from edgelb.http.exchange import DONE, QUEUED, ROUTED, WAITING_AUTH
from edgelb.http.request import cookie, header, request_head
from edgelb.http.upstream import send_to
from edgelb.net.acl import AUTH_BUSY, AUTH_CACHED, AUTH_PENDING, AUTH_THROTTLED

if TYPE_CHECKING:
    from collections.abc import Sequence

    from balancers.base import Candidate
    from edgelb.http.client import ClientProtocol
    from edgelb.http.exchange import Exchange
    from edgelb.pool import BackendState, ServiceState

RETRY_AFTER = b"retry-after: 1\r\n"  # on a 503 the proxy sheds itself
_BAD_GATEWAY = "the backend failed before answering"
_GATEWAY_TIMEOUT = "the backend did not answer in time"


def start(client: ClientProtocol, ex: Exchange) -> None:
    """`ex`'s turn on its connection: route it, check the gates, and forward it."""
    listener = client.listener
    service = listener.service
    if service is None:
        service = listener.route(ex)
        if service is None:
            if not ex.response_started:  # (a route's redirect answered it)
                client.answer(ex, 404, "no route for this host and path", None)
            return
    ex.service = service
    ex.state = ROUTED
    service.bytes_in += len(ex.url) + 64 + ex.buffered  # buffered: a pipelined body
    if ex.method == b"CONNECT":
        client.answer(ex, 400, "CONNECT is not supported by a reverse proxy", service)
        return
    if service.special and gates_answered(client, ex, service):
        return
    forward(client, ex, service)


def forward(client: ClientProtocol, ex: Exchange, service: ServiceState) -> None:
    """Send `ex` to a backend of `service`, queue it, or shed it."""
    ex.head = request_head(client, ex)
    pool = service.pool
    if pool.keyed:  # sticky cookie or a hashing policy: a key from the request
        backend = keyed_pick(client, ex, service)
    else:
        backend = pool.pick()
    if backend is None:
        if not pool.at_capacity():
            shed(client, ex, "no_backend")
        elif pool.enqueue(ex, ex.start):
            ex.state = QUEUED
        else:
            shed(client, ex, "queue_full")
        return
    send(ex, service, backend)


def gates_answered(client: ClientProtocol, ex: Exchange, service: ServiceState) -> bool:
    """sources, redirect_to_https, max_body and auth; True when the proxy answered, or
    when the credentials are being verified off the loop (auth_verdict goes on). Auth
    comes last: a client is never asked for a password over plain http when it is to be
    redirected to https, and a verification is the only step that may wait.

    While a verification is pending the client's reading goes on, as while a backend
    connection opens: a body is buffered up to BUFFER_LIMIT, a pipelined request waits
    its turn (both pause reading), and a client that leaves is seen at once (a paused
    transport would not see it, and its request would reach the backend)."""
    policy = service.policy
    sources = policy.sources
    if sources is not None and not sources.permits(client.xff_ip):
        client.answer(ex, 403, "your address may not use this service", service)
        return True
    if policy.redirect_to_https and client.listener.scheme == b"http":
        host = ex.host.decode("latin-1")
        if host.startswith("["):
            host = host[: host.find("]") + 1]
        else:
            host = host.partition(":")[0]
        if not host:
            client.answer(ex, 400, "a redirect to https needs a Host", service)
            return True
        location = f"https://{host}{ex.url.decode('latin-1')}"
        client.answer(ex, 308, f"use {location}", service,
                      b"location: %s\r\n" % location.encode("latin-1"))
        return True
    limit = policy.max_body
    if limit is not None:
        length = header(ex.lines, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            ex.keep_alive = False  # the body is not read: the connection cannot go on
            client.answer(ex, 413, f"the body is over the {limit} bytes service "
                          f"{service.name} accepts", service)
            return True
    creds = policy.auth
    if creds is not None:
        verdict: int = creds.admit(header(ex.lines, b"authorization"), client.xff_ip,
                                   client.loop, ex.auth_verdict)
        if verdict == AUTH_PENDING:
            ex.state = WAITING_AUTH
            return True
        return auth_refused(client, ex, service, creds, verdict)
    return False


def auth_verdict(client: ClientProtocol, ex: Exchange, verdict: int) -> None:
    """The credentials of the active exchange were verified off the loop: answer the
    refusal, or go on to a backend."""
    service = ex.service
    assert service is not None  # routed before its credentials were checked
    ex.state = ROUTED
    creds = service.policy.auth
    if creds is None or not auth_refused(client, ex, service, creds, verdict):
        forward(client, ex, service)  # (auth removed by a reload meanwhile: let through)


def auth_refused(client: ClientProtocol, ex: Exchange, service: ServiceState, creds: Any,
                 verdict: int) -> bool:
    """Count an auth verdict; answer 401, 429 or 503 (True) or let the request by."""
    service.auth_results[verdict] += 1
    if verdict <= AUTH_CACHED:
        return False
    if verdict == AUTH_THROTTLED:
        client.answer(ex, 429, "too many failed logins from your address; wait and retry",
                      service, b"retry-after: %d\r\n" % creds.retry_after(client.xff_ip))
    elif verdict == AUTH_BUSY:
        client.answer(ex, 503, "too many logins are being checked at once; retry shortly",
                      service, RETRY_AFTER, "auth")
    else:
        client.answer(ex, 401, "this service needs a user name and password", service,
                      creds.challenge_header)
    return True


def dispatch_waiting(client: ClientProtocol, ex: Exchange) -> bool:
    """A queued exchange's turn: send it if a backend is eligible now."""
    service = ex.service
    assert service is not None  # routed before it was queued
    pool = service.pool
    if pool.keyed:
        backend = keyed_pick(client, ex, service)
    else:
        backend = pool.pick()
    if backend is None:
        return False
    ex.wait_until = 0.0
    ex.queued = client.loop.time() - ex.start
    send(ex, service, backend)
    return True


def shed(client: ClientProtocol, ex: Exchange, reason: str) -> None:
    """Answer 503 at once: no backend, the wait queue is full, or the wait timed out;
    in panic mode an unhealthy backend under its cap takes it instead."""
    service = ex.service
    assert service is not None  # only a routed exchange is shed
    pool = service.pool
    if pool.spare:
        backend = pool.pick_spare()
        if backend is not None:
            pool.panic_routed += 1
            if ex.state == QUEUED:
                ex.queued = client.loop.time() - ex.start
                ex.wait_until = 0.0
            send(ex, service, backend)
            return
    service.shed[reason] = service.shed.get(reason, 0) + 1
    ex.wait_until = 0.0
    if reason == "no_backend":
        detail = f"no backend available for service {service.name}"
    elif reason == "queue_full":
        detail = f"every backend of service {service.name} is at its limit and the " \
                 "queue is full"
    else:
        detail = f"every backend of service {service.name} stayed at its limit for " \
                 f"{service.policy.queue_timeout:g}s"
    client.answer(ex, 503, detail, service, RETRY_AFTER)


def keyed_pick(client: ClientProtocol, ex: Exchange,
               service: ServiceState) -> BackendState | None:
    """The pick for a sticky service (its cookie first) or a hashing balancer (the key the
    policy names: the source address, a cookie or a header), zone-aware when configured."""
    pool = service.pool
    pool.sync()  # with a shared view: the group's load, before `eligible` is read
    policy = service.policy
    if policy.sticky:
        sid = cookie(ex.lines, service.sticky_cookie)
        if sid:
            backend = pool.by_sticky.get(sid)
            if backend is not None and backend.eligible:
                return backend
    candidates: Sequence[Candidate] = pool.candidates
    if pool.zone:  # zone-aware: in-zone backends while the zone has room
        candidates = prefer_zone(candidates, pool.zone, pool.zone_threshold)
    key = None
    if pool.balancer_keyed:
        spec = policy.hash_key
        if spec == "source":
            key = client.xff_ip
        elif spec.startswith("cookie:"):
            key = cookie(ex.lines, spec[7:].encode())
        else:
            key = header(ex.lines, spec[7:].encode())
    backend = pool.pick_from(candidates, key)
    if backend is not None and policy.sticky:
        ex.set_cookie = backend.sticky_id
    return backend


def send(ex: Exchange, service: ServiceState, backend: BackendState) -> None:
    """Take a slot on `backend` and hand `ex` to one of its connections."""
    ex.backend = backend
    service.pool.acquire(backend)
    backend.requests += 1
    send_to(ex, service, backend)


def upstream_failed(client: ClientProtocol, ex: Exchange, kind: str, detail: str,
                    safe: bool) -> None:
    """The backend failed before a response reached the client: retry it elsewhere when
    that is safe, else answer 502/504 (or nothing: the client is gone).

    `safe`: nothing of the request can have been processed (connect error, a kept-alive
    connection closed before any answer): retried whatever the method, outside the budget.
    Otherwise only an idempotent request is retried, within the service's retry budget."""
    backend = ex.backend
    service = ex.service
    assert backend is not None and service is not None  # it was sent
    ex.upstream = None
    count_failure(backend, service, kind, 0, ex.start, client.loop.time())
    if ex.state == DONE:
        return  # the client went away while connecting: connection_lost released it
    service.pool.release(backend)
    if client.closed:
        return
    if not ex.body_sent and ex.retries < service.policy.retries:
        other = retry_target(ex, service, backend, kind, safe)
        if other is not None:
            resend(ex, service, other)
            return
    status = 504 if kind == "timeout" else 502
    backend.responses[status] += 1
    ex.upstream_time = client.loop.time() - ex.start - ex.queued
    note_error(backend, service, detail, client.loop.time())
    # the client is told what kind of failure, never the backend's internal address
    client.answer(ex, status, _GATEWAY_TIMEOUT if status == 504 else _BAD_GATEWAY, service)


def retry_target(ex: Exchange, service: ServiceState, failed: BackendState, kind: str,
                 safe: bool) -> BackendState | None:
    """Where `ex` may go again after failing on `failed`, or None (not retried)."""
    if not safe:
        # after a reset or a 502/503 an idempotent request may go again; not after a
        # timeout (the backend may still be working on it) or a malformed answer
        if kind == "timeout" or kind == "bad" or ex.method not in IDEMPOTENT:
            return None
        if not ex.retries:
            budget = service.policy.retry_budget
            pool = service.pool  # this process's requests (its budget is its own)
            active = sum(pool.open_here(b) for b in pool.backends)
            if not retry_allowed(active, service.retrying, budget.ratio, budget.min):
                service.retries_denied += 1
                return None
    other = service.pool.pick_other(failed)
    if other is None and kind == "reset" and safe and failed.eligible:
        other = failed  # a stale kept-alive connection: a fresh one to the same backend
    return other


def resend(ex: Exchange, service: ServiceState, backend: BackendState) -> None:
    """Send `ex` again, to `backend`, holding a share of the retry budget until it ends."""
    if not ex.retries:
        service.retrying += 1  # this exchange holds a share of the budget until it ends
    ex.retries += 1
    service.retries_total += 1
    send(ex, service, backend)
