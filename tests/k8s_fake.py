"""FakeKubeAPI: a small Kubernetes API server for tests, speaking the real wire protocol.

It serves, over plain HTTP on 127.0.0.1, the resources edgelb reads and writes: core/v1
services, secrets, pods, nodes and events; discovery.k8s.io/v1 endpointslices;
networking.k8s.io/v1 ingresses and ingressclasses; coordination.k8s.io/v1 leases; core/v1
configmaps and namespaces; and the Gateway API's gateway.networking.k8s.io/v1 (GatewayClass
cluster-scoped; Gateway, HTTPRoute, GRPCRoute, ReferenceGrant, TLSRoute, TCPRoute and
BackendTLSPolicy namespaced: all v1 in the standard channel of Gateway API v1.6) with API
discovery of that group version (an `APIResourceList`). Those CRD kinds carry
`metadata.generation`, raised when anything but the status changes.
`FakeKubeAPI(gateway_api=False)` (or `absent={"tcproutes"}`) serves a cluster without those
CRDs: their URLs answer 404 as a real server does. The official
client (`kubernetes.aio`) talks to it through a kubeconfig written by `kubeconfig(path)`.

What is faithful (because the code under test depends on it):
- one global, increasing resourceVersion (a string of an int) stamped on every change;
- list: `{"kind": "<Kind>List", "apiVersion", "metadata": {"resourceVersion"}, "items"}`, the
  items without kind/apiVersion (as a real server encodes built-in lists);
- watch (`watch=1|true`): newline-delimited JSON events over chunked encoding, replaying the
  retained history after `resourceVersion` (or synthetic ADDED events for the current state when
  it is empty or "0"); a selector-filtered watch sees an object leaving the selection as DELETED
  and entering it as ADDED; `allowWatchBookmarks=true` adds a BOOKMARK every
  `bookmark_interval` seconds; `timeoutSeconds` ends the stream; a version older than the
  retained history (see `compact()`) gets an ERROR event carrying a 410 `Expired` Status, then
  the stream ends;
- `labelSelector` (=, ==, !=, exists, !exists, in, notin) and `fieldSelector` (dotted paths with
  =, ==, !=), namespaced and cluster-wide collection URLs;
- get/create/replace/merge-patch/delete of single objects with optimistic concurrency (409 on a
  stale resourceVersion), `PUT` and merge `PATCH` of `.../{name}/status` (the status only),
  errors as `Status` objects.

Test controls: `put`, `delete`, `get`, `objects`, `compact`, `drop_watches`, `hang_watches`,
`stop`/`start` (state survives a restart on the same port), counters `list_calls` and
`watch_calls` per resource plural, the `requests` log, recorded `events` and `status_updates`,
and `wait_for(predicate)` to await any of these without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

HOST = "127.0.0.1"
Obj = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS: tuple[Kind, ...] = (
    Kind("", "v1", "services", "Service", True),
    Kind("", "v1", "secrets", "Secret", True),
    Kind("", "v1", "pods", "Pod", True),
    Kind("", "v1", "nodes", "Node", False),
    Kind("", "v1", "events", "Event", True),
    Kind("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    Kind("networking.k8s.io", "v1", "ingresses", "Ingress", True),
    Kind("networking.k8s.io", "v1", "ingressclasses", "IngressClass", False),
    Kind("coordination.k8s.io", "v1", "leases", "Lease", True),
    Kind("", "v1", "configmaps", "ConfigMap", True),
    Kind("", "v1", "namespaces", "Namespace", False),
)
GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_KINDS: tuple[Kind, ...] = (
    Kind(GATEWAY_GROUP, "v1", "gatewayclasses", "GatewayClass", False),
    Kind(GATEWAY_GROUP, "v1", "gateways", "Gateway", True),
    Kind(GATEWAY_GROUP, "v1", "httproutes", "HTTPRoute", True),
    Kind(GATEWAY_GROUP, "v1", "grpcroutes", "GRPCRoute", True),
    Kind(GATEWAY_GROUP, "v1", "referencegrants", "ReferenceGrant", True),
    Kind(GATEWAY_GROUP, "v1", "tlsroutes", "TLSRoute", True),
    Kind(GATEWAY_GROUP, "v1", "tcproutes", "TCPRoute", True),
    Kind(GATEWAY_GROUP, "v1", "backendtlspolicies", "BackendTLSPolicy", True),
)
KINDS = KINDS + GATEWAY_KINDS
_BY_PATH = {(k.group, k.version, k.plural): k for k in KINDS}
_BY_NAME = {**{k.kind: k for k in KINDS}, **{k.plural: k for k in KINDS}}


def kind_of(name: str) -> Kind:
    """A Kind by its kind ("Service") or plural ("services")."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"FakeKubeAPI does not serve {name!r}; known: {sorted(_BY_NAME)}") from None


class ApiError(Exception):
    """Answered as a Kubernetes `Status` object with this code and reason."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return status_object(self.code, self.reason, self.message)


def status_object(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


# -- selectors ----------------------------------------------------------------------------------

_SET_RE = re.compile(
    r"^\s*(!?)\s*([^\s!=(),]+)\s*(?:(in|notin)\s*\(([^)]*)\)|(==|=|!=)\s*(\S*))?\s*$")


def _split_requirements(selector: str) -> list[str]:
    """Split on the commas that are not inside a `( ... )` set."""
    parts, depth, cur = [], 0, []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p.strip()]


def label_matcher(selector: str) -> Callable[[dict[str, str]], bool]:
    """Compile a label selector; raises ApiError 400 when it does not parse."""
    reqs: list[Callable[[dict[str, str]], bool]] = []
    for part in _split_requirements(selector):
        m = _SET_RE.match(part)
        if m is None:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        neg, key, set_op, values, op, value = m.groups()
        if neg and (set_op or op):
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        if set_op:
            allowed = {v.strip() for v in values.split(",") if v.strip()}
            if set_op == "in":
                reqs.append(lambda lb, k=key, a=allowed: lb.get(k) in a)
            else:
                reqs.append(lambda lb, k=key, a=allowed: lb.get(k) not in a)
        elif op in ("=", "=="):
            reqs.append(lambda lb, k=key, v=value: lb.get(k) == v)
        elif op == "!=":
            reqs.append(lambda lb, k=key, v=value: lb.get(k) != v)
        elif neg:
            reqs.append(lambda lb, k=key: k not in lb)
        else:
            reqs.append(lambda lb, k=key: k in lb)
    return lambda labels: all(r(labels) for r in reqs)


def _field(obj: Obj, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def field_matcher(selector: str) -> Callable[[Obj], bool]:
    """Compile a field selector (`a.b=x`, `a.b==x`, `a.b!=x`, comma = and)."""
    reqs: list[Callable[[Obj], bool]] = []
    for part in _split_requirements(selector):
        m = re.match(r"^\s*([A-Za-z0-9_.\-/]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if m is None:
            raise ApiError(400, "BadRequest", f"invalid field selector: {part!r}")
        path, op, value = m.groups()
        if op == "!=":
            reqs.append(lambda o, p=path, v=value: _field(o, p) != v)
        else:
            reqs.append(lambda o, p=path, v=value: _field(o, p) == v)
    return lambda obj: all(r(obj) for r in reqs)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic-merge patches of simple objects)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# -- state --------------------------------------------------------------------------------------

@dataclass
class Change:
    """One stored change: `old` is None for ADDED, `new` is the deleted object for DELETED."""

    rv: int
    kind: Kind
    type: str
    old: Obj | None
    new: Obj


@dataclass
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    plural: str = ""
    namespace: str | None = None
    watch: bool = False


@dataclass(eq=False)
class _Watch:
    kind: Kind
    namespace: str | None
    match: Callable[[Obj], bool]
    queue: asyncio.Queue[Change | None] = field(default_factory=asyncio.Queue)
    ended: bool = False


class FakeKubeAPI:
    """See the module docstring. `async with FakeKubeAPI() as api:` starts and stops it."""

    def __init__(self, token: str | None = None, bookmark_interval: float = 0.1,
                 gateway_api: bool = True, absent: Iterable[str] = ()) -> None:
        self.token = token
        # plurals whose CRD is not installed: their URLs answer 404
        self.absent: set[str] = set(absent) | (
            set() if gateway_api else {k.plural for k in GATEWAY_KINDS})
        self.bookmark_interval = bookmark_interval
        self.port = 0
        self.rv = 0  # the global resourceVersion, as an int
        self.compacted_rv = 0  # watches from an older version get 410 Expired
        self.list_calls: Counter[str] = Counter()
        self.watch_calls: Counter[str] = Counter()
        self.bookmarks_sent: Counter[str] = Counter()
        self.requests: list[RequestRecord] = []
        self.events: list[Obj] = []  # every core/v1 Event as created or patched
        self.status_updates: list[tuple[str, str, Obj]] = []  # (namespace, name, status)
        self._store: dict[str, dict[tuple[str, str], Obj]] = {k.plural: {} for k in KINDS}
        self._history: list[Change] = []
        self._watches: set[_Watch] = set()
        self._hanging = False
        self._closing = False
        self._unhang = asyncio.Event()
        self._unhang.set()
        self._tick = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._names = itertools.count(1)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, port: int | None = None) -> FakeKubeAPI:
        """Listen on 127.0.0.1 (port 0 the first time, then the same port again)."""
        if self._runner is not None:
            return self
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5,
                               access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, HOST, self.port if port is None else port)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Stop listening and end every open stream; the stored state is kept for `start()`."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing = True  # what still arrives gets 503 until the socket is closed
        self.drop_watches()
        try:
            await runner.cleanup()
        finally:
            self._closing = False

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def __aenter__(self) -> FakeKubeAPI:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.drop_watches()
        self.hang_watches(False)
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def kubeconfig(self, path: str | Path, token: str | None = None,
                   namespace: str = "default") -> Path:
        """Write a kubeconfig pointing the official client here (http; a static token if given,
        else this server's token, else no auth). Returns the path."""
        user: Obj = {}
        tok = token if token is not None else self.token
        if tok:
            user["token"] = tok
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                      "namespace": namespace}}],
            "current-context": "fake",
        }
        p = Path(path)
        p.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
        return p

    # -- test controls ------------------------------------------------------------------------

    def put(self, obj: Obj) -> Obj:
        """Create or replace `obj` (needs `kind` and `metadata.name`; namespace defaults to
        "default" for namespaced kinds). Returns the stored copy with its new resourceVersion."""
        kind = kind_of(obj["kind"])
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if kind.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        return self._write(kind, obj)

    def delete(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        """Delete an object (kind or plural); returns it, or None if it did not exist."""
        k = kind_of(kind)
        key = ((namespace or "") if k.namespaced else "", name)
        old = self._store[k.plural].pop(key, None)
        if old is None:
            return None
        gone = copy.deepcopy(old)
        self.rv += 1
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._record(Change(self.rv, k, "DELETED", old, gone))
        return copy.deepcopy(gone)

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        k = kind_of(kind)
        obj = self._store[k.plural].get(((namespace or "") if k.namespaced else "", name))
        return copy.deepcopy(obj) if obj is not None else None

    def objects(self, kind: str, namespace: str | None = None) -> dict[tuple[str, str], Obj]:
        """The current objects of a kind as `{(namespace, name): obj}` (with kind/apiVersion)."""
        k = kind_of(kind)
        return {key: copy.deepcopy(o) for key, o in self._store[k.plural].items()
                if namespace is None or key[0] == namespace}

    def compact(self) -> None:
        """Forget all history: a watch from any version before now gets 410 Expired."""
        self.compacted_rv = self.rv
        self._history.clear()

    def drop_watches(self) -> None:
        """End every open watch stream cleanly (as a server ending its watches does)."""
        for w in list(self._watches):
            w.ended = True
            w.queue.put_nowait(None)

    def hang_watches(self, hang: bool = True) -> None:
        """While on, open and new watch streams send nothing (no events, no bookmarks, no end)
        but keep their connections open; `hang_watches(False)` lets them go on."""
        self._hanging = hang
        if hang:
            self._unhang.clear()
        else:
            self._unhang.set()

    def watch_requests(self, plural: str) -> list[dict[str, str]]:
        """The query parameters of every watch request made on `plural`, in order."""
        return [r.query for r in self.requests if r.watch and r.plural == plural]

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0,
                       what: str = "the condition") -> None:
        """Await until `predicate()` holds, re-checked on every request and change here."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"FakeKubeAPI: {what} did not hold within {timeout:g}s")
            tick = self._tick
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tick.wait(), min(remaining, 0.25))

    # -- internals ----------------------------------------------------------------------------

    def _notify(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    def _write(self, kind: Kind, obj: Obj) -> Obj:
        meta = obj["metadata"]
        obj["kind"], obj["apiVersion"] = kind.kind, kind.api_version
        key = (meta.get("namespace", ""), meta["name"])
        old = self._store[kind.plural].get(key)
        if old is None:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", "2024-01-01T00:00:00Z")
        else:
            meta["uid"] = old["metadata"].get("uid")
            meta["creationTimestamp"] = old["metadata"].get("creationTimestamp")
        if kind.group == GATEWAY_GROUP:  # CRDs with a status subresource count generations
            if old is None:
                meta["generation"] = 1
            else:
                before = int(old["metadata"].get("generation") or 1)
                meta["generation"] = before + (_spec_of(old) != _spec_of(obj))
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        self._store[kind.plural][key] = obj
        self._record(Change(self.rv, kind, "ADDED" if old is None else "MODIFIED", old,
                            copy.deepcopy(obj)))
        return copy.deepcopy(obj)

    def _record(self, change: Change) -> None:
        self._history.append(change)
        for w in self._watches:
            if w.kind is change.kind:
                w.queue.put_nowait(change)
        self._notify()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        rec = RequestRecord(request.method, request.path, query)
        self.requests.append(rec)
        self._notify()
        try:
            if self._closing:
                raise ApiError(503, "ServiceUnavailable", "the API server is shutting down")
            if self.token is not None and (
                    request.headers.get("Authorization", "") != f"Bearer {self.token}"):
                raise ApiError(401, "Unauthorized", "Unauthorized")
            discovery = self._discovery(request.path)
            if discovery is not None:
                return web.json_response(discovery)
            kind, ns, name, sub = self._route(request.path)
            rec.plural, rec.namespace = kind.plural, ns
            if request.method == "GET" and name is None:
                if query.get("watch") in ("1", "true"):
                    rec.watch = True
                    self.watch_calls[kind.plural] += 1
                    self._notify()
                    return await self._watch(request, kind, ns, query)
                self.list_calls[kind.plural] += 1
                self._notify()
                return self._list(kind, ns, query)
            try:
                body = await request.json() if request.can_read_body else None
            except ValueError as e:
                raise ApiError(400, "BadRequest", f"the body is not JSON: {e}") from None
            return web.json_response(self._item(request.method, kind, ns, name, sub, body),
                                     status=201 if request.method == "POST" else 200)
        except ApiError as e:
            return web.json_response(e.status(), status=e.code)

    def _route(self, path: str) -> tuple[Kind, str | None, str | None, str | None]:
        parts = [p for p in path.split("/") if p]
        not_found = ApiError(404, "NotFound", "the server could not find the requested resource")
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise not_found
        ns: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise not_found
        kind = _BY_PATH.get((group, version, rest[0]))
        if kind is None or kind.plural in self.absent or (ns is not None and not kind.namespaced):
            raise not_found
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if name is not None and kind.namespaced and ns is None:
            raise not_found
        return kind, ns, name, sub

    def _discovery(self, path: str) -> Obj | None:
        """The APIResourceList of the Gateway API group version, as `kubectl api-resources`
        reads it; None for other paths. Absent kinds are left out; none served: 404."""
        if path.rstrip("/") != f"/apis/{GATEWAY_GROUP}/v1":
            return None
        served = [k for k in GATEWAY_KINDS if k.plural not in self.absent]
        if not served:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        resources = []
        for k in served:
            verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
            resources.append({"name": k.plural, "singularName": k.kind.lower(),
                              "namespaced": k.namespaced, "kind": k.kind, "verbs": verbs})
            resources.append({"name": f"{k.plural}/status", "singularName": "",
                              "namespaced": k.namespaced, "kind": k.kind,
                              "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{GATEWAY_GROUP}/v1", "resources": resources}

    def _matcher(self, query: dict[str, str]) -> Callable[[Obj], bool]:
        labels = label_matcher(query.get("labelSelector", ""))
        fields = field_matcher(query.get("fieldSelector", ""))
        return lambda o: labels(o.get("metadata", {}).get("labels") or {}) and fields(o)

    def _select(self, kind: Kind, ns: str | None, match: Callable[[Obj], bool]) -> list[Obj]:
        store = self._store[kind.plural]
        return [o for key, o in sorted(store.items())
                if (ns is None or key[0] == ns) and match(o)]

    def _list(self, kind: Kind, ns: str | None, query: dict[str, str]) -> web.Response:
        items = []
        for o in self._select(kind, ns, self._matcher(query)):
            item = copy.deepcopy(o)
            item.pop("kind", None)
            item.pop("apiVersion", None)
            items.append(item)
        return web.json_response({
            "kind": f"{kind.kind}List", "apiVersion": kind.api_version,
            "metadata": {"resourceVersion": str(self.rv)}, "items": items,
        })

    def _event(self, w: _Watch, change: Change) -> Obj | None:
        """The event `w` sees for `change` (selector transitions), or None."""
        if w.namespace is not None and change.new["metadata"].get("namespace") != w.namespace:
            return None
        if change.type == "DELETED":
            return {"type": "DELETED", "object": change.new} if w.match(change.old or {}) \
                else None
        was = change.old is not None and w.match(change.old)
        now = w.match(change.new)
        if now:
            return {"type": "MODIFIED" if was else "ADDED", "object": change.new}
        if was:
            return {"type": "DELETED", "object": change.new}
        return None

    async def _watch(self, request: web.Request, kind: Kind, ns: str | None,
                     query: dict[str, str]) -> web.StreamResponse:
        match = self._matcher(query)
        rv_param = query.get("resourceVersion", "")
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        if rv_param not in ("", "0") and not rv_param.isdigit():
            raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv_param!r}")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None

        # Subscribe and take the backlog in one step (no await between): nothing is missed.
        w = _Watch(kind, ns, match)
        backlog: list[Obj] = []
        expired = rv_param not in ("", "0") and int(rv_param) < self.compacted_rv
        if not expired:
            self._watches.add(w)
            if rv_param in ("", "0"):
                backlog = [{"type": "ADDED", "object": copy.deepcopy(o)}
                           for o in self._select(kind, ns, match)]
            else:
                since = int(rv_param)
                for change in self._history:
                    if change.rv > since and change.kind is kind:
                        ev = self._event(w, change)
                        if ev is not None:
                            backlog.append(ev)
        try:
            if expired:
                msg = f"too old resource version: {rv_param} ({self.compacted_rv})"
                await self._send(resp, {"type": "ERROR",
                                        "object": status_object(410, "Expired", msg)})
                return resp
            for ev in backlog:
                await self._send(resp, ev)
            await self._stream(resp, w, kind, bookmarks, deadline)
        except ConnectionError:
            return resp
        finally:
            self._watches.discard(w)
            self._notify()
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    async def _stream(self, resp: web.StreamResponse, w: _Watch, kind: Kind, bookmarks: bool,
                      deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._hold(w)
            wait = self.bookmark_interval if bookmarks else None
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    return
                wait = left if wait is None else min(wait, left)
            try:
                change = await asyncio.wait_for(w.queue.get(), wait)
            except TimeoutError:
                if self._hanging:
                    continue
                if bookmarks and (deadline is None or loop.time() < deadline):
                    await self._send(resp, {"type": "BOOKMARK", "object": {
                        "kind": kind.kind, "apiVersion": kind.api_version,
                        "metadata": {"resourceVersion": str(self.rv)}}})
                    self.bookmarks_sent[kind.plural] += 1
                    self._notify()
                continue
            if change is None:
                return
            await self._hold(w)
            if w.ended:
                return
            ev = self._event(w, change)
            if ev is not None:
                await self._send(resp, ev)

    async def _hold(self, w: _Watch) -> None:
        """While hanging, send nothing; a dropped watch still ends."""
        while self._hanging and not w.ended:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unhang.wait(), 0.05)

    async def _send(self, resp: web.StreamResponse, event: Obj) -> None:
        await resp.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")

    # -- single objects -----------------------------------------------------------------------

    def _item(self, method: str, kind: Kind, ns: str | None, name: str | None,
              sub: str | None, body: Any) -> Obj:
        store = self._store[kind.plural]
        if method == "POST" and name is None:
            return self._create(kind, ns, body)
        if name is None:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on a collection")
        key = (ns or "", name)
        current = store.get(key)
        what = f'{kind.plural} "{name}"'
        if current is None:
            raise ApiError(404, "NotFound", f"{what} not found")
        if sub not in (None, "status"):
            raise ApiError(404, "NotFound", f"the server could not find {sub!r} of {what}")
        if method == "GET":
            return copy.deepcopy(current)
        if method == "DELETE":
            gone = self.delete(kind.kind, ns, name)
            assert gone is not None
            return gone
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", f"{method} needs a JSON object body")
        if method == "PATCH" and sub == "status":
            new = copy.deepcopy(current)
            new["status"] = merge_patch(current.get("status") or {}, body.get("status") or {})
            self.status_updates.append((ns or "", name, copy.deepcopy(new["status"])))
        elif method == "PATCH":
            new = merge_patch(current, body)
            if "status" in current and kind.group == GATEWAY_GROUP:  # the subresource's part
                new["status"] = copy.deepcopy(current["status"])
            if kind.kind == "Event":
                self.events.append(copy.deepcopy(new))
        elif method == "PUT":
            sent_rv = (body.get("metadata") or {}).get("resourceVersion")
            if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f"Operation cannot be fulfilled on {what}: the "
                               "object has been modified; please apply your changes to the "
                               "latest version and try again")
            if sub == "status":
                new = copy.deepcopy(current)
                new["status"] = copy.deepcopy(body.get("status") or {})
                self.status_updates.append((ns or "", name, copy.deepcopy(new["status"])))
            else:
                new = copy.deepcopy(body)
                new.setdefault("metadata", {})
                if "status" in current:
                    new["status"] = copy.deepcopy(current["status"])
        else:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on {what}")
        meta = new.setdefault("metadata", {})
        meta["name"] = name
        if kind.namespaced:
            meta["namespace"] = ns
        return self._write(kind, new)

    def _create(self, kind: Kind, ns: str | None, body: Any) -> Obj:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "create needs a JSON object body")
        if kind.namespaced and ns is None:
            raise ApiError(405, "MethodNotAllowed", f"create {kind.plural} in a namespace")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name or metadata.generateName is needed")
            meta["name"] = f"{meta['generateName']}{next(self._names):05d}"
        if kind.namespaced:
            meta["namespace"] = ns
        meta.pop("resourceVersion", None)
        if (ns or "", meta["name"]) in self._store[kind.plural]:
            raise ApiError(409, "AlreadyExists", f'{kind.plural} "{meta["name"]}" already exists')
        stored = self._write(kind, obj)
        if kind.kind == "Event":
            self.events.append(copy.deepcopy(stored))
        return stored


def _spec_of(obj: Obj) -> Any:
    """What counts for `metadata.generation`: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind",
                                                      "apiVersion")}


def objs(kind: str, names: Iterable[str], namespace: str = "default",
         labels: dict[str, str] | None = None) -> list[Obj]:
    """Minimal objects of `kind` for tests."""
    k = kind_of(kind)
    out = []
    for name in names:
        meta: Obj = {"name": name}
        if k.namespaced:
            meta["namespace"] = namespace
        if labels:
            meta["labels"] = dict(labels)
        out.append({"kind": k.kind, "apiVersion": k.api_version, "metadata": meta})
    return out
