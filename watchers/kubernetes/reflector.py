"""List + watch one Kubernetes resource into a cache of raw JSON objects.

The loop per scope (one namespace, or the whole cluster):

    list -> replace that scope's cache entries, remember the list's resourceVersion
    watch from it (bookmarks on) -> apply ADDED / MODIFIED / DELETED, remember each version seen
    the server ends the watch      -> watch again from the last version seen (no list)
    410 Gone / Expired             -> list again from scratch
    error, or a silent connection  -> jittered exponential backoff, then watch again

Requests go through the official client's ApiClient (`param_serialize` + `call_api`), which
supplies the host, TLS and the bearer token (refreshed by its hooks); responses are read raw so
objects stay plain dicts and a watch is read as it streams. `kubernetes.aio.watch.Watch` is not
used: it turns a 410 into an exception after one retry of its own, has no read timeout and hides
the resume version we need to count and test.

A reflector never empties its cache on failure: the last state stays (stale but serving).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name); namespace is "" for cluster-scoped kinds

MAX_LINE = 16 * 1024 * 1024  # one watch event; etcd caps objects at about 1.5 MiB
_sleep = asyncio.sleep  # the backoff wait (tests wrap it to observe the delays)


@dataclass(frozen=True)
class Resource:
    """A kind served by the API: where to list and watch it."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str = "") -> str:
        """The collection URL path: namespaced when `namespace` is set and the kind is."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace and self.namespaced:
            return f"{base}/namespaces/{quote(namespace, safe='')}/{self.plural}"
        return f"{base}/{self.plural}"

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


SERVICES = Resource("", "v1", "services", "Service")
SECRETS = Resource("", "v1", "secrets", "Secret")
PODS = Resource("", "v1", "pods", "Pod")
NODES = Resource("", "v1", "nodes", "Node", namespaced=False)
ENDPOINTSLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
INGRESSES = Resource("networking.k8s.io", "v1", "ingresses", "Ingress")
INGRESSCLASSES = Resource("networking.k8s.io", "v1", "ingressclasses", "IngressClass",
                          namespaced=False)


class KubeApiError(Exception):
    """The API server answered with a failure `Status` (HTTP error or watch ERROR event)."""

    def __init__(self, code: int, reason: str, message: str, what: str = "") -> None:
        super().__init__(f"{what}: {code} {reason}: {message}" if what else
                         f"{code} {reason}: {message}")
        self.code, self.reason, self.message = code, reason, message

    @property
    def gone(self) -> bool:
        """The requested resourceVersion is no longer available: list again."""
        return self.code == 410 or self.reason in ("Expired", "Gone")

    @classmethod
    def from_status(cls, status: Any, http_code: int = 0, what: str = "") -> KubeApiError:
        if not isinstance(status, dict):
            return cls(http_code, "", str(status)[:200], what)
        return cls(int(status.get("code") or http_code), str(status.get("reason") or ""),
                   str(status.get("message") or ""), what)


def _timeout(read_timeout: float) -> aiohttp.ClientTimeout:
    # No total: a watch lasts minutes. sock_read bounds every wait for bytes (the response head
    # and each piece of the body), which is how a silently dead connection gets noticed.
    return aiohttp.ClientTimeout(total=None, sock_connect=read_timeout, sock_read=read_timeout)


async def _get(api: Any, path: str, query: Sequence[tuple[str, str]],
               read_timeout: float) -> aiohttp.ClientResponse:
    """GET through the official client (host, TLS, auth); the raw aiohttp response."""
    method, url, headers, body, post = await api.param_serialize(
        method="GET", resource_path=path, query_params=list(query),
        header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
    rest = await api.call_api(method, url, headers, body, post,
                              _request_timeout=_timeout(read_timeout), _preload_content=False)
    return rest.response


async def _raise_for_status(resp: aiohttp.ClientResponse, what: str) -> None:
    if resp.status == 200:
        return
    try:
        raw = await resp.read()
        status: Any = json.loads(raw) if raw else {}
    except (ValueError, aiohttp.ClientError):
        status = {}
    finally:
        resp.release()
    if not isinstance(status, dict) or status.get("kind") != "Status":
        status = {"code": resp.status, "reason": resp.reason or "",
                  "message": "unexpected answer (not a Status object)"}
    raise KubeApiError.from_status(status, resp.status, what)


def _selectors(label_selector: str, field_selector: str) -> list[tuple[str, str]]:
    query = []
    if label_selector:
        query.append(("labelSelector", label_selector))
    if field_selector:
        query.append(("fieldSelector", field_selector))
    return query


async def list_objects(api: Any, resource: Resource, namespace: str = "",
                       label_selector: str = "", field_selector: str = "",
                       read_timeout: float = 60.0) -> tuple[list[Obj], str]:
    """One list call: (items with kind/apiVersion filled in, the list's resourceVersion)."""
    what = f"list {resource} in {namespace or 'all namespaces'}"
    resp = await _get(api, resource.path(namespace), _selectors(label_selector, field_selector),
                      read_timeout)
    await _raise_for_status(resp, what)
    try:
        doc = json.loads(await resp.read())
    except ValueError as e:
        raise KubeApiError(resp.status, "BadResponse", f"the list is not JSON: {e}", what) from e
    finally:
        resp.release()
    if not isinstance(doc, dict) or not isinstance(doc.get("items", []), list):
        raise KubeApiError(resp.status, "BadResponse", "the list has no items array", what)
    items = [i for i in doc.get("items") or [] if isinstance(i, dict)]
    for item in items:  # list items carry no TypeMeta; watch events do: make the cache uniform
        item.setdefault("kind", resource.kind)
        item.setdefault("apiVersion", resource.api_version)
    return items, str((doc.get("metadata") or {}).get("resourceVersion") or "")


async def open_watch(api: Any, resource: Resource, namespace: str, resource_version: str,
                     label_selector: str = "", field_selector: str = "",
                     timeout_seconds: int = 300, read_timeout: float = 60.0,
                     bookmarks: bool = True) -> aiohttp.ClientResponse:
    """Start a watch from `resource_version`; the caller reads it with `watch_batches`."""
    query = [("watch", "true"), ("resourceVersion", resource_version),
             ("timeoutSeconds", str(int(timeout_seconds)))]
    if bookmarks:
        query.append(("allowWatchBookmarks", "true"))
    query += _selectors(label_selector, field_selector)
    resp = await _get(api, resource.path(namespace), query, read_timeout)
    await _raise_for_status(resp, f"watch {resource} in {namespace or 'all namespaces'}")
    return resp


async def watch_batches(resp: aiohttp.ClientResponse) -> AsyncIterator[list[Obj]]:
    """The events of a watch response, grouped by what arrived together; ends with the stream.

    Raises the client's timeout error when the server stays silent past the read timeout."""
    buf = b""
    while True:
        chunk = await resp.content.readany()
        if not chunk:
            if buf.strip():
                raise KubeApiError(resp.status, "BadResponse", "the watch ended mid-event")
            return
        buf += chunk
        if b"\n" not in chunk:
            if len(buf) > MAX_LINE:
                raise KubeApiError(resp.status, "BadResponse",
                                   f"a watch event is over {MAX_LINE} bytes")
            continue
        *lines, buf = buf.split(b"\n")
        batch = []
        for line in lines:
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except ValueError as e:
                raise KubeApiError(resp.status, "BadResponse",
                                   f"a watch line is not JSON: {e}") from e
            if isinstance(ev, dict):  # the official client also skips what is not an event
                batch.append(ev)
        if batch:
            yield batch


def _key(obj: Obj) -> Key | None:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        return None
    return str(meta.get("namespace") or ""), str(meta["name"])


def _version(obj: Any) -> str:
    if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
        return str(obj["metadata"].get("resourceVersion") or "")
    return ""


class _Relist(Exception):
    """The watch version expired: list again."""


class Reflector:
    """Keep `cache` equal to the server's objects of `resource` (see the module docstring).

    `namespaces` empty (or a cluster-scoped kind): one cluster-wide list+watch. Otherwise one
    list+watch per namespace, all into the one `cache`. `on_change()` is called after each
    applied batch (a list, or the watch events that arrived together)."""

    def __init__(
        self,
        api: Any,
        resource: Resource,
        on_change: Callable[[], None],
        namespaces: tuple[str, ...] = (),
        label_selector: str = "",
        field_selector: str = "",
        read_timeout: float = 60.0,
        watch_timeout: int = 300,
        rng: random.Random | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        if read_timeout <= 0:
            raise ValueError(f"read_timeout must be more than 0 seconds, got {read_timeout}")
        if watch_timeout < 1:
            raise ValueError(f"watch_timeout must be at least 1 second, got {watch_timeout}")
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("backoff needs 0 < backoff_initial <= backoff_max, got "
                             f"{backoff_initial} and {backoff_max}")
        self.api = api
        self.resource = resource
        self.on_change = on_change
        scopes = tuple(dict.fromkeys(n for n in namespaces if n))
        self.scopes: tuple[str, ...] = scopes if scopes and resource.namespaced else ("",)
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.read_timeout = read_timeout
        self.watch_timeout = watch_timeout
        self.rng = rng or random.Random()
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max

        self.cache: dict[Key, Obj] = {}
        self.synced = asyncio.Event()  # every scope listed once
        self.last_event = 0.0  # loop time of the last watch event (bookmarks included)
        self.errors = 0
        self.relists = 0  # lists after a scope's first, i.e. after a 410
        self.versions: dict[str, str] = {}  # scope -> resourceVersion a watch resumes from
        self._up: dict[str, bool] = dict.fromkeys(self.scopes, False)
        self._progress: dict[str, bool] = dict.fromkeys(self.scopes, False)
        self._listed: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._done = asyncio.Event()

    # -- public -----------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Every scope's watch is connected."""
        return all(self._up.values())

    async def run(self) -> None:
        """List and watch until stopped or cancelled.

        Errors of the API server are retried inside. Should a scope's loop itself fail (a bug),
        the other scopes are stopped and `run()` raises that exception, so that its owner
        notices and can run it again (a new run lists again; the cache is kept meanwhile)."""
        if self._stopping:
            return
        self._done.clear()
        self._tasks = [asyncio.create_task(self._follow(ns), name=f"reflector {self._what(ns)}")
                       for ns in self.scopes]
        try:
            done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
            errors = [e for t in done if not t.cancelled() and (e := t.exception()) is not None]
            if errors:
                await self._cancel_tasks()
                raise errors[0]
        except asyncio.CancelledError:
            await self._cancel_tasks()
            raise
        finally:
            for ns in self.scopes:
                self._up[ns] = False
            self._done.set()

    async def stop(self) -> None:
        """Stop watching; `run()` returns. The cache is kept."""
        self._stopping = True
        await self._cancel_tasks()
        if self._tasks:
            await self._done.wait()

    # -- internals ----------------------------------------------------------------------------

    def _what(self, ns: str) -> str:
        return f"{self.resource} in {ns or 'all namespaces'}"

    async def _cancel_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _delay(self, backoff: float) -> float:
        return backoff * self.rng.uniform(0.8, 1.2)

    def _changed(self) -> None:
        try:
            self.on_change()
        except Exception:
            log.exception("on_change of the %s reflector failed", self.resource)

    def _in_scope(self, ns: str, key: Key) -> bool:
        return not ns or key[0] == ns

    def _replace(self, ns: str, items: list[Obj]) -> None:
        for key in [k for k in self.cache if self._in_scope(ns, k)]:
            del self.cache[key]
        for item in items:
            key = _key(item)
            if key is not None and self._in_scope(ns, key):
                self.cache[key] = item

    def _apply(self, ns: str, batch: list[Obj]) -> bool:
        """Apply watch events; returns whether the cache changed. Raises on ERROR / 410."""
        changed = False
        loop = asyncio.get_running_loop()
        for ev in batch:
            kind, obj = ev.get("type"), ev.get("object")
            self.last_event = loop.time()
            if kind == "ERROR":
                if changed:  # what came before the error in this batch is applied
                    self._changed()
                err = KubeApiError.from_status(obj, what=f"watch {self._what(ns)}")
                if err.gone:
                    raise _Relist(str(err))
                raise err
            if not isinstance(obj, dict):
                continue
            rv = _version(obj)
            if kind == "BOOKMARK":
                if rv:
                    self.versions[ns] = rv
                continue
            key = _key(obj)
            if kind not in ("ADDED", "MODIFIED", "DELETED") or key is None:
                log.debug("skipping a %r event without a name on %s", kind, self._what(ns))
                continue
            if kind == "DELETED":
                changed |= self.cache.pop(key, None) is not None
            else:
                obj.setdefault("kind", self.resource.kind)
                obj.setdefault("apiVersion", self.resource.api_version)
                self.cache[key] = obj
                changed = True
            if rv:
                self.versions[ns] = rv
        return changed

    async def _list(self, ns: str) -> None:
        items, rv = await list_objects(self.api, self.resource, ns, self.label_selector,
                                       self.field_selector, self.read_timeout)
        self._replace(ns, items)
        self.versions[ns] = rv
        if ns in self._listed:
            self.relists += 1
            log.info("relisted %s: %d objects at version %s", self._what(ns), len(items), rv)
        self._listed.add(ns)
        if len(self._listed) == len(self.scopes):
            self.synced.set()
        self._changed()

    async def _watch(self, ns: str) -> bool:
        """One watch connection until the server ends it; returns whether anything arrived."""
        resp = await open_watch(self.api, self.resource, ns, self.versions[ns],
                                self.label_selector, self.field_selector, self.watch_timeout,
                                self.read_timeout)
        got = False
        try:
            self._up[ns] = True
            async for batch in watch_batches(resp):
                got = self._progress[ns] = True
                if self._apply(ns, batch):
                    self._changed()
        finally:
            self._up[ns] = False
            resp.close()
        return got

    async def _follow(self, ns: str) -> None:
        loop = asyncio.get_running_loop()
        backoff = self.backoff_initial
        need_list = True
        while not self._stopping:
            self._progress[ns] = False
            failure = ""
            quiet_end = False
            try:
                fresh = need_list
                if need_list:
                    await self._list(ns)
                    need_list = False
                started = loop.time()
                if not await self._watch(ns) and loop.time() - started < 1.0:
                    quiet_end = True  # the server ended it at once: do not hammer it
            except asyncio.CancelledError:
                raise
            except (_Relist, KubeApiError) as e:
                if isinstance(e, _Relist) or e.gone:
                    log.info("%s: %s; listing again", self._what(ns), e)
                    need_list = True
                    if not fresh or self._progress[ns]:
                        continue
                    failure = f"expired right after a list: {e}"  # do not loop on lists
                else:
                    failure = str(e)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                failure = _describe(e, self.read_timeout)
            except Exception as e:
                log.exception("%s: unexpected error", self._what(ns))
                failure = f"unexpected {type(e).__name__}"
            if self._progress[ns]:  # the connection worked for a while: start over
                backoff = self.backoff_initial
            if not failure and not quiet_end:
                continue
            wait = self._delay(backoff)
            backoff = min(backoff * 2, self.backoff_max)
            if failure:
                self.errors += 1
                log.warning("%s: %s; retrying in %.1fs", self._what(ns), failure, wait)
            await _sleep(wait)


def _describe(exc: BaseException, read_timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"nothing received for {read_timeout:g}s (read timeout)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
