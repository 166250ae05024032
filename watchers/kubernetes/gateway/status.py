"""Write the Gateway API status the translator computed (the leader does; see leader.py).

Each object is written with a JSON merge patch of its `/status` subresource, and only when what
we own of its status differs from what the reflector's cache shows: a GatewayClass's and a
Gateway's conditions (a Gateway's addresses and listeners too), and our entries of a Route's
`status.parents` (entries of other controllers are kept as they are). A condition keeps its
`lastTransitionTime` while its status stays the same; a changed one is stamped now. Right after
a write the cache still holds the replaced version until the watch brings the new one: that
version with what we just wrote counts as up to date. A Route that no longer names our Gateways
loses our entries. Failures are logged and counted, and retried by the next publish
(`needs_retry`).
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from watchers.kubernetes.gateway.resources import CONTROLLER, KINDS
from watchers.kubernetes.gateway.translate import StatusUpdate
from watchers.kubernetes.leader import MERGE_PATCH, REQUEST_ERRORS, request_json
from watchers.kubernetes.reflector import KubeApiError

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]
ROUTES = ("httproutes", "grpcroutes", "tlsroutes", "tcproutes")


def gateway_addresses(addresses: Iterable[str]) -> list[Obj]:
    """A Gateway's `status.addresses`: IPAddress or Hostname entries, unique, sorted."""
    out = set()
    for a in (str(x).strip() for x in addresses):
        if not a:
            continue
        try:
            ipaddress.ip_address(a)
            out.add(("IPAddress", a))
        except ValueError:
            out.add(("Hostname", a))
    return [{"type": t, "value": v} for t, v in sorted(out)]


def _time(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stamp(conditions: list[Obj], old: Any, now: str) -> list[Obj]:
    """`conditions` with lastTransitionTime: the old one while the status is the same."""
    before = {c.get("type"): c for c in old if isinstance(c, dict)} \
        if isinstance(old, list) else {}
    out = []
    for c in conditions:
        prev = before.get(c["type"])
        same = prev is not None and prev.get("status") == c["status"] and \
            isinstance(prev.get("lastTransitionTime"), str)
        out.append({**c, "lastTransitionTime": prev["lastTransitionTime"] if same and prev
                    else now})
    return out


def _status(obj: Obj) -> Obj:
    got = obj.get("status")
    return got if isinstance(got, dict) else {}


def _rv(obj: Obj | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")


class GatewayStatusWriter:
    """Publishes the statuses of a GatewayTranslation (see the module docstring)."""

    def __init__(self, api: Any, controller: str = CONTROLLER, request_timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.api = api
        self.controller = controller
        self.request_timeout = request_timeout
        self.clock = clock
        self.writes = 0
        self.errors = 0
        self._written: dict[tuple[str, Key], tuple[str, Obj]] = {}  # -> (rv replaced, part)
        self._ours: set[tuple[str, Key]] = set()  # routes that carry our parent entries
        self._failed: set[tuple[str, Key]] = set()

    @property
    def needs_retry(self) -> bool:
        return bool(self._failed)

    async def publish(self, updates: Iterable[StatusUpdate], addresses: Iterable[str],
                      caches: Mapping[str, Mapping[Key, Obj]]) -> int:
        """Write every update whose part of the status differs from the cached object's;
        take our entries off Routes that no longer name our Gateways. Returns the writes."""
        now = _time(self.clock())
        addrs = gateway_addresses(addresses)
        written = 0
        wanted: set[tuple[str, Key]] = set()
        for u in updates:
            obj = caches.get(u.resource, {}).get(u.key)
            if obj is None:
                continue
            wanted.add((u.resource, u.key))
            part = self._desired(u, obj, addrs, now)
            written += await self._write(u.resource, u.key, obj, part)
        for resource, key in sorted(self._ours - wanted):
            obj = caches.get(resource, {}).get(key)
            self._ours.discard((resource, key))
            if obj is not None:
                part = {"parents": self._others(obj)}
                written += await self._write(resource, key, obj, part)
        return written

    # -- internals ----------------------------------------------------------------------------

    def _others(self, obj: Obj) -> list[Obj]:
        parents = (obj.get("status") or {}).get("parents")
        return [copy.deepcopy(p) for p in parents if isinstance(p, dict)
                and p.get("controllerName") != self.controller] \
            if isinstance(parents, list) else []

    def _desired(self, u: StatusUpdate, obj: Obj, addrs: list[Obj], now: str) -> Obj:
        """What we own of `obj`'s status, as it should be."""
        status = _status(obj)
        if u.resource in ROUTES:
            old = {}
            for p in status.get("parents") or []:
                if isinstance(p, dict) and p.get("controllerName") == self.controller:
                    old[repr(p.get("parentRef"))] = p.get("conditions")
            ours = [{**p, "conditions": _stamp(p["conditions"], old.get(repr(p["parentRef"])),
                                               now)} for p in u.status["parents"]]
            self._ours.add((u.resource, u.key))
            return {"parents": self._others(obj) + ours}
        part: Obj = {"conditions": _stamp(u.status["conditions"], status.get("conditions"),
                                          now)}
        if u.resource == "gateways":
            old_listeners = {ln.get("name"): ln.get("conditions")
                             for ln in status.get("listeners") or [] if isinstance(ln, dict)}
            part["addresses"] = addrs
            part["listeners"] = [{**ln, "conditions": _stamp(
                ln["conditions"], old_listeners.get(ln["name"]), now)}
                for ln in u.status["listeners"]]
        return part

    async def _write(self, resource: str, key: Key, obj: Obj, part: Obj) -> int:
        status = _status(obj)
        current = {k: status.get(k) for k in part}
        tag = (resource, key)
        if current == part or self._written.get(tag) == (_rv(obj), part):
            self._failed.discard(tag)
            return 0
        res = KINDS[resource]
        path = f"{res.path(key[0])}/{quote(key[1], safe='')}/status"
        what = f"{res.kind} {key[0] + '/' if key[0] else ''}{key[1]}"
        try:
            await request_json(self.api, "PATCH", path, {"status": part},
                               content_type=MERGE_PATCH, timeout=self.request_timeout,
                               what=f"write the status of {what}")
        except KubeApiError as e:
            if e.code == 404:
                self._failed.discard(tag)
                self._written.pop(tag, None)
                return 0
            return self._failure(tag, what, e)
        except REQUEST_ERRORS as e:
            return self._failure(tag, what, e)
        self._written[tag] = (_rv(obj), part)
        self._failed.discard(tag)
        self.writes += 1
        log.info("kubernetes: wrote the status of %s", what)
        return 1

    def _failure(self, tag: tuple[str, Key], what: str, e: BaseException) -> int:
        self.errors += 1
        self._failed.add(tag)
        detail = str(e) if isinstance(e, KubeApiError) else \
            f"could not write the status of {what}: {str(e) or type(e).__name__}"
        log.warning("kubernetes: %s (retried on the next publish)", detail)
        return 0
