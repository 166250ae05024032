"""Warning Events (core/v1) on the objects whose configuration edgelb cannot use.

`kubectl describe ingress x` then shows why an Ingress gets no traffic. Best effort: a failure
is logged and counted, never raised. The same (object, reason, message) reported again updates
the Event already posted (count and lastTimestamp, as kubectl shows "x3 over 5m") instead of
posting another, and at most once per `rate_limit` seconds: the translation repeats its problems
on every rebuild, which may be many times a second.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from watchers.kubernetes.leader import MERGE_PATCH, REQUEST_ERRORS, request_json
from watchers.kubernetes.reflector import KubeApiError

log = logging.getLogger(__name__)

Obj = dict[str, Any]
MAX_MESSAGE = 1024  # longer messages are cut (the API caps event notes at 1 KiB too)
MAX_NAME = 200  # of the involved object's name in the Event's name (names stop at 253)


def rfc3339(ts: float) -> str:
    """A Kubernetes Time: RFC 3339 in UTC, whole seconds."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Posted:
    namespace: str
    name: str = ""  # the Event's name; "" until a create succeeded
    count: int = 0
    last: float = 0.0  # clock() of the last attempt, successful or not


class EventRecorder:
    """Posts Warning Events (see the module docstring). `host` is this replica (the pod name);
    `clock` is the wall clock, used for the timestamps and the rate limit."""

    def __init__(
        self,
        api: Any,
        component: str = "edgelb-ingress-controller",
        host: str = "",
        *,
        rate_limit: float = 60.0,
        max_keys: int = 1024,
        request_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.api = api
        self.component = component
        self.host = host
        self.rate_limit = rate_limit
        self.max_keys = max_keys
        self.request_timeout = request_timeout
        self.clock = clock
        self.posted = 0  # Events created
        self.updated = 0  # Events patched
        self.suppressed = 0  # reports dropped by the rate limit
        self.errors = 0
        self._seen: OrderedDict[tuple[str, ...], _Posted] = OrderedDict()  # oldest first
        self._seq = itertools.count()

    async def warn(self, kind: str, api_version: str, namespace: str, name: str, uid: str,
                   reason: str, message: str) -> None:
        """Report a Warning on object `kind` `namespace/name` (namespace "" when it is
        cluster-scoped; its Event then goes to "default"). Never raises an API error."""
        message = message[:MAX_MESSAGE]
        key = (kind, namespace, name, uid, reason, message)
        now = self.clock()
        entry = self._seen.get(key)
        if entry is not None and now - entry.last < self.rate_limit:
            self.suppressed += 1
            return
        if entry is None:
            entry = self._seen[key] = _Posted(namespace or "default")
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
        self._seen.move_to_end(key)
        entry.last = now  # also when the request fails: a broken API is not hammered
        what = f"the {reason} Event on {kind} {namespace + '/' if namespace else ''}{name}"
        try:
            if entry.name and await self._bump(entry, now, what):
                return
            created = await request_json(
                self.api, "POST", self._collection(entry.namespace),
                self._event(kind, api_version, namespace, name, uid, reason, message, now),
                timeout=self.request_timeout, what=f"post {what}")
        except REQUEST_ERRORS as e:
            self.errors += 1
            # A KubeApiError names the request; a network error needs `what`.
            detail = str(e) if isinstance(e, KubeApiError) else \
                f"could not post {what}: {str(e) or type(e).__name__}"
            log.warning("kubernetes: %s (best effort: not retried for %gs)", detail,
                        self.rate_limit)
            return
        entry.name = str((created.get("metadata") or {}).get("name") or "")
        entry.count = 1
        self.posted += 1

    # -- internals ----------------------------------------------------------------------------

    def _collection(self, namespace: str) -> str:
        return f"/api/v1/namespaces/{quote(namespace, safe='')}/events"

    async def _bump(self, entry: _Posted, now: float, what: str) -> bool:
        """Count one more occurrence on the Event posted before; False if it expired (gone)."""
        try:
            await request_json(
                self.api, "PATCH", f"{self._collection(entry.namespace)}/"
                f"{quote(entry.name, safe='')}",
                {"count": entry.count + 1, "lastTimestamp": rfc3339(now)},
                content_type=MERGE_PATCH, timeout=self.request_timeout, what=f"update {what}")
        except KubeApiError as e:
            if e.code != 404:
                raise
            entry.name, entry.count = "", 0  # Events expire (an hour by default): post anew
            return False
        entry.count += 1
        self.updated += 1
        return True

    def _event(self, kind: str, api_version: str, namespace: str, name: str, uid: str,
               reason: str, message: str, now: float) -> Obj:
        involved: Obj = {"kind": kind, "apiVersion": api_version, "name": name}
        if namespace:
            involved["namespace"] = namespace
        if uid:
            involved["uid"] = uid
        source: Obj = {"component": self.component}
        if self.host:
            source["host"] = self.host
        stamp = rfc3339(now)
        unique = time.time_ns() + next(self._seq)  # as Kubernetes names them: <object>.<hex>
        return {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{name[:MAX_NAME]}.{unique:x}",
                         "namespace": namespace or "default"},
            "involvedObject": involved,
            "reason": reason, "message": message, "type": "Warning",
            "source": source,
            "reportingComponent": self.component, "reportingInstance": self.host,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
