"""Write `status.loadBalancer.ingress` of our Ingresses (the leader does; see leader.py).

An Ingress is written only when its status differs from the addresses we publish, judged on the
reflector's cache. Right after a write that cache still holds the version we replaced until the
watch brings the new one: that version with the status we just wrote counts as up to date, so a
publish in between writes nothing. A stale resourceVersion (409) is re-read and retried once;
other failures are logged, counted and retried by the next publish (`needs_retry` tells the
caller one is due).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from watchers.kubernetes.leader import REQUEST_ERRORS, request_json
from watchers.kubernetes.reflector import INGRESSES, KubeApiError
from watchers.values import is_ip

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)
Entry = tuple[str, str]  # ("ip" | "hostname", value)



def lb_entries(addresses: Iterable[str]) -> list[Obj]:
    """`status.loadBalancer.ingress` for `addresses`: `{"ip": a}` when `a` parses as an IP,
    else `{"hostname": a}`; blanks and repeats dropped, sorted so the result is stable."""
    entries = {("ip" if is_ip(a) else "hostname", a)
               for a in (str(x).strip() for x in addresses) if a}
    return [{field: value} for field, value in sorted(entries)]


def _entries_of(obj: Obj | None) -> list[Entry]:
    """The (field, value) pairs of an Ingress's current load-balancer status, sorted."""
    status = (obj or {}).get("status")
    lb = status.get("loadBalancer") if isinstance(status, dict) else None
    items = lb.get("ingress") if isinstance(lb, dict) else None
    out = set()
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            for field in ("ip", "hostname"):
                if item.get(field):
                    out.add((field, str(item[field])))
    return sorted(out)


def _pairs(entries: list[Obj]) -> list[Entry]:
    return sorted((field, value) for e in entries for field, value in e.items())


def _rv(obj: Obj | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")


def addresses_from_service(service: Obj | None) -> list[str]:
    """The addresses a published Service is reached at: its `status.loadBalancer.ingress`
    (ip, else hostname), else its `spec.externalIPs`, else []."""
    if not isinstance(service, dict):
        return []
    found = [value for field, value in _entries_of(service)]
    if not found:
        spec = service.get("spec")
        ips = spec.get("externalIPs") if isinstance(spec, dict) else None
        found = [str(a) for a in ips if isinstance(a, str) and a] if isinstance(ips, list) else []
    return list(dict.fromkeys(found))


class StatusWriter:
    """Publishes the load-balancer addresses into Ingress status (see the module docstring)."""

    def __init__(self, api: Any, request_timeout: float = 10.0) -> None:
        self.api = api
        self.request_timeout = request_timeout
        self.writes = 0
        self.errors = 0
        self._published: set[Key] = set()  # Ingresses we publish to (clear() may empty them)
        # key -> (the resourceVersion our write replaced, the status written)
        self._written: dict[Key, tuple[str, list[Entry]]] = {}
        self._failed: set[Key] = set()

    @property
    def published(self) -> frozenset[Key]:
        """The Ingresses whose status is ours: the caller clears those that left our class."""
        return frozenset(self._published)

    @property
    def needs_retry(self) -> bool:
        """A write failed (not a conflict that a re-read settled): publish again later."""
        return bool(self._failed)

    async def publish(self, ingresses: Iterable[Key], addresses: Sequence[str],
                      current: Mapping[Key, Obj]) -> int:
        """Set the status of each listed Ingress to `addresses` where `current` (the reflector's
        cache) shows another; returns how many were written. API and network failures are
        logged and counted, not raised."""
        entries = lb_entries(addresses)
        written = 0
        for key in dict.fromkeys(ingresses):
            obj = current.get(key)
            if obj is None:
                continue  # not in the cache (yet): the next publish sees it
            self._published.add(key)
            written += await self._set(key, obj, entries) == "written"
        return written

    async def clear(self, ingresses: Iterable[Key], current: Mapping[Key, Obj]) -> int:
        """Empty the status (`ingress: []`) of the listed Ingresses that we published to, e.g.
        those that left our class; others are left alone. Returns how many were written."""
        written = 0
        for key in dict.fromkeys(ingresses):
            if key not in self._published:
                continue
            obj = current.get(key)
            result = "gone" if obj is None else await self._set(key, obj, [])
            if result != "failed":
                self._published.discard(key)
                self._written.pop(key, None)
            written += result == "written"
        return written

    # -- internals ----------------------------------------------------------------------------

    def _path(self, key: Key) -> str:
        return f"{INGRESSES.path(key[0])}/{quote(key[1], safe='')}/status"

    async def _set(self, key: Key, obj: Obj, entries: list[Obj]) -> str:
        """Make one Ingress's status `entries`: "same", "written", "gone" or "failed"."""
        want = _pairs(entries)
        what = f"Ingress {key[0]}/{key[1]}"
        if _entries_of(obj) == want or self._written.get(key) == (_rv(obj), want):
            self._failed.discard(key)
            return "same"
        try:
            for attempt in (1, 2):
                body = copy.deepcopy(obj)
                status = body.get("status")
                if not isinstance(status, dict):
                    status = body["status"] = {}
                lb = status.get("loadBalancer")
                if not isinstance(lb, dict):
                    lb = status["loadBalancer"] = {}
                lb["ingress"] = copy.deepcopy(entries)
                try:
                    await request_json(self.api, "PUT", self._path(key), body,
                                       timeout=self.request_timeout,
                                       what=f"write the status of {what}")
                    break
                except KubeApiError as e:
                    if e.code == 404:
                        return self._gone(key)
                    if e.code != 409 or attempt == 2:
                        raise
                # Our copy was stale: read the Ingress again and decide again.
                try:
                    fresh = await request_json(self.api, "GET", self._path(key)[:-len("/status")],
                                               timeout=self.request_timeout,
                                               what=f"read {what}")
                except KubeApiError as e:
                    if e.code == 404:
                        return self._gone(key)
                    raise
                if _entries_of(fresh) == want:
                    self._failed.discard(key)
                    return "same"
                obj = fresh
        except REQUEST_ERRORS as e:
            self.errors += 1
            self._failed.add(key)
            # A KubeApiError names the request; a network error needs `what`.
            detail = str(e) if isinstance(e, KubeApiError) else \
                f"could not write the status of {what}: {str(e) or type(e).__name__}"
            log.warning("kubernetes: %s (retried on the next publish)", detail)
            return "failed"
        self._written[key] = (_rv(obj), want)
        self._failed.discard(key)
        self.writes += 1
        log.info("kubernetes: %s status.loadBalancer.ingress = %s", what,
                 [v for _, v in want] or "[]")
        return "written"

    def _gone(self, key: Key) -> str:
        self._failed.discard(key)
        self._written.pop(key, None)
        self._published.discard(key)
        return "gone"
