"""Leader election on a coordination.k8s.io/v1 Lease, so that one replica writes Ingress status.

A follower reads the Lease every `retry_every` seconds and takes it when it is missing (create),
released (no holder) or expired (its `renewTime` + `leaseDurationSeconds` has passed), with a
replace carrying the resourceVersion it read: of two replicas racing, the API server lets one
write win and answers the other 409. The leader renews every `renew_every` seconds. If renewing
keeps failing for `renew_deadline` (two thirds of the lease), it steps down on its own, a third
of the lease before any other replica may take over, so two leaders never overlap (give or take
the clock skew between nodes, which that third absorbs). Every request is bounded by what is
left of that deadline, so a hung API server cannot hold a stale leader.

`request_json` (one JSON request through the official client) is shared by status.py and
events.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp

from watchers.kubernetes.reflector import KubeApiError

log = logging.getLogger(__name__)

Obj = dict[str, Any]

LEASES_API = "/apis/coordination.k8s.io/v1"
MERGE_PATCH = "application/merge-patch+json"
# What a failed request raises: an API answer, or no answer at all.
REQUEST_ERRORS = (KubeApiError, aiohttp.ClientError, TimeoutError, OSError)


async def request_json(api: Any, method: str, path: str, body: Obj | None = None, *,
                       content_type: str = "application/json", timeout: float = 10.0,
                       what: str = "") -> Obj:
    """One request through the official ApiClient (host, TLS, token); the answer as a dict.

    A non-2xx answer raises KubeApiError (from the server's Status when there is one); no answer
    within `timeout` seconds raises TimeoutError."""
    method, url, headers, data, post = await api.param_serialize(
        method=method, resource_path=path, body=body, auth_settings=["BearerToken"],
        header_params={"Accept": "application/json", "Content-Type": content_type})
    rest = await api.call_api(method, url, headers, data, post,
                              _request_timeout=aiohttp.ClientTimeout(total=timeout))
    resp: aiohttp.ClientResponse = rest.response
    try:
        raw = await resp.read()
    finally:
        resp.release()
    try:
        doc: Any = json.loads(raw) if raw else {}
    except ValueError:
        doc = None
    if 200 <= resp.status < 300:
        if not isinstance(doc, dict):
            raise KubeApiError(resp.status, "BadResponse", "the answer is not a JSON object",
                               what or f"{method} {path}")
        return doc
    if not isinstance(doc, dict) or doc.get("kind") != "Status":
        doc = {"code": resp.status, "reason": resp.reason or "",
               "message": "unexpected answer (not a Status object)"}
    raise KubeApiError.from_status(doc, resp.status, what or f"{method} {path}")


def micro_time(ts: float) -> str:
    """A Kubernetes MicroTime: RFC 3339, UTC, microseconds (2026-11-25T22:40:00.123456Z)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: Any) -> float | None:
    """Seconds since the epoch of an RFC 3339 time (Time or MicroTime), None if it is not one."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _reraise_cancel() -> None:
    """Raise CancelledError if this task was cancelled and a library turned that into another
    error (a lost cancellation would keep a replica renewing after shutdown)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _rv(obj: Obj | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")


def _spec(obj: Obj | None) -> Obj:
    spec = (obj or {}).get("spec")
    return spec if isinstance(spec, dict) else {}


class LeaderElector:
    """One replica's side of the election on Lease `namespace/name` (see the module docstring).

    `on_change(True|False)` is called when this replica becomes or stops being the leader.
    `clock` is the wall clock stamped into the Lease and compared with other holders' stamps."""

    def __init__(
        self,
        api: Any,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: float = 15,
        renew_every: float = 5,
        retry_every: float = 2,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.time,
        request_timeout: float = 10.0,
    ) -> None:
        for what, value in (("namespace", namespace), ("name", name), ("identity", identity)):
            if not value:
                raise ValueError(f"leader election needs a non-empty Lease {what}")
        if lease_seconds <= 0 or renew_every <= 0 or retry_every <= 0 or request_timeout <= 0:
            raise ValueError("leader election needs lease_seconds, renew_every, retry_every and "
                             "request_timeout above 0, got "
                             f"{lease_seconds}, {renew_every}, {retry_every}, {request_timeout}")
        self.renew_deadline = lease_seconds * 2 / 3
        if renew_every >= self.renew_deadline:
            raise ValueError(f"renew_every ({renew_every}s) must be shorter than two thirds of "
                             f"lease_seconds ({lease_seconds}s): lower it or lengthen the lease")
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_every = renew_every
        self.retry_every = retry_every
        self.on_change = on_change
        self.clock = clock
        self.request_timeout = request_timeout

        self.holder = ""  # the holder seen last ("" when none)
        self.errors = 0
        self.acquired = 0  # times this replica became the leader
        self.last_renew = 0.0  # clock() stamped into the last successful acquire or renewal
        self._leader = False
        self._lease: Obj | None = None  # the Lease as last written by us as its holder
        self._renewed_at = 0.0  # loop time when that write was sent
        self._seen: tuple[str, float] = ("", 0.0)  # (resourceVersion, loop time first seen)
        self._stopping = False

    @property
    def is_leader(self) -> bool:
        return self._leader

    @property
    def path(self) -> str:
        return (f"{LEASES_API}/namespaces/{quote(self.namespace, safe='')}/leases/"
                f"{quote(self.name, safe='')}")

    def __str__(self) -> str:
        return f"lease {self.namespace}/{self.name} ({self.identity})"

    # -- public -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Take part in the election until cancelled (or `release()`); raises nothing else.

        Cancelled while leading: `is_leader` turns False (nothing renews the Lease any more),
        but the Lease stays ours until it expires or `release()` clears it."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                _reraise_cancel()
                try:
                    if self._leader:
                        await self._lead(loop)
                    elif not await self.try_acquire():
                        await asyncio.sleep(self.retry_every)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.errors += 1
                    log.exception("%s: unexpected error in the election", self)
                    await asyncio.sleep(self.retry_every)
        finally:
            self._set_leader(False)

    async def try_acquire(self) -> bool:
        """One attempt to become (or stay) the holder; True when this replica leads now."""
        if self._stopping:
            return False
        loop = asyncio.get_running_loop()
        try:
            lease = await self._get()
            now = self.clock()
            sent_at = loop.time()
            if lease is None:
                written = await self._call("POST", self._collection(), self._new_lease(now),
                                           "create")
            else:
                spec = _spec(lease)
                holder = str(spec.get("holderIdentity") or "")
                self.holder = holder
                if holder and holder != self.identity and not self._expired(lease, now, loop):
                    return False
                written = await self._call("PUT", self.path, self._taken(lease, holder, now),
                                           "take over")
        except KubeApiError as e:
            if e.code == 409:
                log.info("%s: another replica acquired the lease first", self)
            else:
                self._failed("could not acquire", e)
            return False
        except REQUEST_ERRORS as e:
            self._failed("could not acquire", e)
            return False
        self._lease, self._renewed_at, self.last_renew = written, sent_at, now
        self.holder = self.identity
        self._set_leader(True)
        return True

    async def release(self) -> bool:
        """Clear the holder so another replica takes over at once (on shutdown); stops `run()`.

        Only a Lease this replica still holds is cleared. Returns whether it was."""
        self._stopping = True
        lease, self._lease = self._lease, None
        self._set_leader(False)
        if lease is None:
            return False
        try:
            for attempt in (1, 2):
                body = copy.deepcopy(lease)
                spec = body.setdefault("spec", {})
                spec.pop("holderIdentity", None)
                spec["leaseDurationSeconds"] = 1
                spec["renewTime"] = micro_time(self.clock())
                try:
                    await self._call("PUT", self.path, body, "release")
                    log.info("%s: released the lease", self)
                    return True
                except KubeApiError as e:
                    if e.code != 409 or attempt == 2:
                        raise
                current = await self._get()  # changed since our last write: still ours?
                if current is None or _spec(current).get("holderIdentity") != self.identity:
                    return False
                lease = current
        except REQUEST_ERRORS as e:
            self._failed("could not release", e)
        return False

    # -- internals ----------------------------------------------------------------------------

    def _collection(self) -> str:
        return f"{LEASES_API}/namespaces/{quote(self.namespace, safe='')}/leases"

    async def _call(self, method: str, path: str, body: Obj | None, what: str,
                    timeout: float | None = None) -> Obj:
        return await request_json(self.api, method, path, body,
                                  timeout=timeout or self.request_timeout,
                                  what=f"{what} {self}")

    async def _get(self, timeout: float | None = None) -> Obj | None:
        try:
            return await self._call("GET", self.path, None, "read", timeout)
        except KubeApiError as e:
            if e.code == 404:
                return None
            raise

    def _duration(self) -> int:
        return max(1, math.ceil(self.lease_seconds))  # the API field is whole seconds

    def _new_lease(self, now: float) -> Obj:
        stamp = micro_time(now)
        return {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self._duration(),
                     "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0},
        }

    def _taken(self, lease: Obj, holder: str, now: float) -> Obj:
        """The replace that makes us the holder of `lease` (its resourceVersion kept)."""
        body = copy.deepcopy(lease)
        spec = body.get("spec")
        if not isinstance(spec, dict):
            spec = body["spec"] = {}
        stamp = micro_time(now)
        if holder != self.identity:
            transitions = spec.get("leaseTransitions")
            spec["leaseTransitions"] = (transitions if isinstance(transitions, int) else 0) + 1
            spec["acquireTime"] = stamp
        spec.setdefault("acquireTime", stamp)
        spec.setdefault("leaseTransitions", 0)
        spec["holderIdentity"] = self.identity
        spec["leaseDurationSeconds"] = self._duration()
        spec["renewTime"] = stamp
        return body

    def _expired(self, lease: Obj, now: float, loop: asyncio.AbstractEventLoop) -> bool:
        spec = _spec(lease)
        duration = spec.get("leaseDurationSeconds")
        if not isinstance(duration, int | float) or isinstance(duration, bool) or duration <= 0:
            duration = self.lease_seconds
        renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
        if renewed is not None:
            return renewed + duration <= now
        # No time to judge by: count from when this version of the Lease was first seen here.
        rv = _rv(lease)
        if self._seen[0] != rv:
            self._seen = (rv, loop.time())
        return loop.time() - self._seen[1] >= duration

    async def _lead(self, loop: asyncio.AbstractEventLoop) -> None:
        """Renew until a renewal is refused or the renew deadline passes; then step down."""
        while not self._stopping:
            await asyncio.sleep(max(0.0, self._renewed_at + self.renew_every - loop.time()))
            deadline = self._renewed_at + self.renew_deadline
            while True:
                if self._stopping:
                    return
                left = deadline - loop.time()
                if left <= 0:
                    log.warning("%s: no renewal for %.1fs; stepping down before the lease "
                                "can pass to another replica", self, self.renew_deadline)
                    self._step_down(keep_lease=True)  # release() may still clear it
                    return
                sent_at, now = loop.time(), self.clock()
                try:
                    async with asyncio.timeout(left):  # unlike wait_for, never eats a cancel
                        kept = await self._renew(now, min(left, self.request_timeout))
                except REQUEST_ERRORS as e:
                    _reraise_cancel()
                    self._failed("could not renew", e)
                    await asyncio.sleep(min(self.retry_every, max(0.0, deadline - loop.time())))
                    continue
                if not kept:
                    log.warning("%s: the lease is now held by %r; stepping down", self,
                                self.holder or "nobody")
                    self._step_down()
                    return
                self._renewed_at, self.last_renew = sent_at, now
                break

    async def _renew(self, now: float, timeout: float) -> bool:
        """Stamp renewTime; False when the Lease is no longer ours (taken, cleared or gone)."""
        lease = self._lease
        for attempt in (1, 2):
            if lease is None:
                return False
            body = self._taken(lease, self.identity, now)
            try:
                self._lease = await self._call("PUT", self.path, body, "renew", timeout)
                return True
            except KubeApiError as e:
                if e.code == 404:
                    self.holder = ""
                    return False
                if e.code != 409 or attempt == 2:
                    raise
            lease = await self._get(timeout)  # someone changed it: is it still ours?
            self.holder = str(_spec(lease).get("holderIdentity") or "")
            if self.holder != self.identity:
                return False
        return False

    def _step_down(self, keep_lease: bool = False) -> None:
        if not keep_lease:
            self._lease = None
        self._set_leader(False)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        if isinstance(exc, KubeApiError):  # it names the request and the Lease
            log.warning("kubernetes: %s", exc)
            return
        detail = "no answer in time" if isinstance(exc, TimeoutError) else \
            str(exc) or type(exc).__name__
        log.warning("kubernetes: %s: %s: %s", self, what, detail)

    def _set_leader(self, leader: bool) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        if leader:
            self.acquired += 1
        log.info("%s: %s", self, "became the leader" if leader else "is no longer the leader")
        if self.on_change is None:
            return
        try:
            self.on_change(leader)
        except Exception:
            log.exception("%s: on_change(%s) failed", self, leader)
