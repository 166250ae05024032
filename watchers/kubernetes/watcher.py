"""The Kubernetes watcher as the process runs it: reflectors keep caches of the cluster's
objects, a debounced loop translates them into one Snapshot and hands it to `emit` (the
runtime's apply; watchers.source). The Snapshot carries the routes and services, the PEM of
the TLS Secrets the Ingresses name (the runtime parses them: one that does not parse keeps its
last good certificate and is reported here as a problem of the Secret), and the zone of the
proxy's Node (`topology.kubernetes.io/zone`), which the runtime uses when the config sets none.
The watcher's health goes to `report`; it writes no runtime state and does not import edgelb:
what it needs from it (the annotations reader, the defaults, the configured zone, whether TLS
entrypoints route by SNI, how background loops are run) is passed in.

Bursts are coalesced: a change is applied within DEBOUNCE (50 ms) plus the translation, and
applies happen at most once per DEBOUNCE under a storm of events. When the API server is out
of reach the reflectors keep their caches, so the last snapshot keeps serving (stale but
serving); `edgelb_watcher_up{watcher="kubernetes"}` drops to 0 and
`edgelb_watcher_last_event_age_seconds` grows. /readyz waits for the first full sync.

Every loop (the reflectors, the translate loop, the health watch, the leader election) runs
supervised (`Tasks.supervise`): one that raises is logged, the watcher is marked down
(`edgelb_watcher_up` 0, the error in /status.json) and the loop restarts after a backoff
(0.1 s doubling to 30 s, jittered) while the last good snapshot keeps serving; nothing is
removed. A restarted translate loop translates the caches at once, and the watcher is up again
once that translation has been applied (and every watch is connected). /readyz is not changed
by this: a replica that synced once stays ready on its stale-but-good routes, since a flaky
API server would otherwise pull every replica out of its Service at the same moment; before the
first sync it is not ready anyway.

One replica (leader election on a Lease, when `leader_election` is on) writes the Ingresses'
`status.loadBalancer` with `publish_address`, or the address of `publish_service`.

With `gateway_api` on, the Gateway API is followed too (watchers/kubernetes/gateway): at start
API discovery says which of its kinds the cluster serves; without the CRDs a problem is
reported, Ingresses are served as ever and discovery is tried again every GATEWAY_RECHECK
seconds. Its routes, services and certificates join the Ingresses' in the one snapshot (what
the Ingresses hold stays theirs), and the leader writes its status (gateway/status.py). Problems
found in objects are logged once each and posted as Warning Events on the object.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from watchers.kubernetes.gateway.resources import CONFIGMAPS, KINDS, NAMESPACES, REQUIRED
from watchers.kubernetes.gateway.translate import (
    GatewayState,
    GatewayTranslation,
    translate_gateway,
)
from watchers.kubernetes.leader import REQUEST_ERRORS
from watchers.kubernetes.reflector import (
    ENDPOINTSLICES,
    INGRESSCLASSES,
    INGRESSES,
    NODES,
    PODS,
    SECRETS,
    SERVICES,
    Reflector,
)
from watchers.kubernetes.secrets import SecretError, secret_pem
from watchers.kubernetes.translate import ClusterState, Problem, Translation, translate
from watchers.model import Certificates, Notice, PemPair, Policy, Service
from watchers.source import Emit, Health, Report, Tasks, cancel_and_wait

log = logging.getLogger("edgelb.kubernetes")

NAME = "kubernetes"
DEBOUNCE = 0.05  # seconds: coalesce a burst of events into one apply
ZONE_LABEL = "topology.kubernetes.io/zone"
LEADER_LEASE = "edgelb-leader"
TRANSLATE_LOOP = "kubernetes translate loop"
GATEWAY_RECHECK = 30.0  # seconds between looks for the Gateway API CRDs while they are absent
GATEWAY_CACHES = (*KINDS, "configmaps", "namespaces")
BACKEND_TLS_ANNOTATION = "edgelb.io/backend-tls"


class KubernetesWatcher:
    """Follows the cluster and feeds `emit` (a watchers.source.Source); `start()` then
    `stop()`, or `run()`.

    `config`: the `watchers.kubernetes` block (edgelb.ops.config.KubernetesWatcherConfig: its
    kubeconfig, namespaces, ingress_class, pod_weights, publish_address, publish_service,
    leader_election and ingress_nginx_annotations are read). `read_policy(annotations,
    base)`: the per-service keys of a Service's `edgelb.io/*` annotations
    (edgelb.ops.config.policy_from_annotations)."""

    name = NAME

    def __init__(
        self,
        config: Any,
        *,
        emit: Emit,
        report: Report,
        read_policy: Callable[..., tuple[Policy, list[str]]],
        defaults: Callable[[], Policy],
        zone: Callable[[], str],
        tasks: Tasks,
        sni_routing: Callable[[], bool] = lambda: False,
        environ: Mapping[str, str] | None = None,
        read_timeout: float = 60.0,
        api: Any = None,
    ) -> None:
        self.config = config
        self.emit = emit
        self.report = report
        self.read_policy = read_policy
        self.defaults = defaults  # the file's `defaults:` as they are now
        self.zone = zone  # the configured zone ("" = unknown: the Node's label is used)
        self.tasks = tasks  # spawn, supervise and describe (edgelb.control.tasks)
        self.sni_routing = sni_routing  # whether some entrypoint terminates TLS
        self.environ = os.environ if environ is None else environ
        self.read_timeout = read_timeout
        self.api = api  # an ApiClient; made from the credentials at start() when None
        self._own_api = api is None
        self.reflectors: dict[str, Reflector] = {}
        self.node_zone = ""
        self.translation: Translation | None = None
        self.applies = 0
        self._dirty = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()  # every task of ours, until it ends
        self.down: dict[str, str] = {}  # supervised loop that raised -> its error, until back
        self._reported: set[Problem] = set()
        self._problems = 0  # in the latest translation
        self._last_event = 0.0  # unix time of the last watch event or bookmark
        self._pems: dict[tuple[str, str], tuple[str, PemPair]] = {}  # Secret -> (rv, its pair)
        self._stopped = asyncio.Event()
        self._leader: Any = None
        self._status: Any = None
        self._events: Any = None
        # the Gateway API (config `gateway_api`): its reflectors are in self.reflectors once
        # discovery found the CRDs; until then a problem says why it is not served
        self.gateway_on = False
        self.gateway_translation: GatewayTranslation | None = None
        self._gateway_problem: Problem | None = None
        self._gateway_status: Any = None
        self._ca_dir: str | None = None  # BackendTLSPolicy CA files (a private temp dir)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (credentials: in-cluster, else `kubeconfig`, else $KUBECONFIG) and start
        following. A credentials problem raises CredentialsError naming what was tried."""
        if self.api is None:
            from watchers.kubernetes.client import make_api_client

            self.api = await make_api_client(self.config.kubeconfig, environ=self.environ)
        cfg = self.config
        ns = cfg.namespaces
        kinds: dict[str, tuple[Any, str, tuple[str, ...]]] = {
            "services": (SERVICES, "", ns),
            "endpointslices": (ENDPOINTSLICES, "", ns),
            "ingresses": (INGRESSES, "", ns),
            "ingressclasses": (INGRESSCLASSES, "", ()),
            "secrets": (SECRETS, "type=kubernetes.io/tls", ns),
            # basic-auth Secrets of Ingress annotations (`kubectl create secret generic`)
            "opaque_secrets": (SECRETS, "type=Opaque", ns),
        }
        if cfg.pod_weights:
            kinds["pods"] = (PODS, "", ns)
        node = self.environ.get("NODE_NAME", "")
        if node:
            kinds["nodes"] = (NODES, f"metadata.name={node}", ())
        for key, (resource, fields, scope) in kinds.items():
            self.reflectors[key] = Reflector(
                self.api, resource, self._changed, namespaces=scope, field_selector=fields,
                read_timeout=self.read_timeout,
            )
        if getattr(cfg, "gateway_api", False):
            await self._discover_gateway_api()
        self._report_health()
        for k, r in self.reflectors.items():
            self._supervise(f"kubernetes reflector {k}", r.run)
        if getattr(cfg, "gateway_api", False) and not self.gateway_on:
            self._supervise("kubernetes gateway api discovery", self._recheck_gateway_api)
        # restarted, the translate loop translates at once; it is up once that applied
        self._supervise(TRANSLATE_LOOP, self._loop, on_up=self._dirty.set)
        self._supervise("kubernetes health watch", self._watch_health)
        self._start_leader()

    async def run(self) -> None:
        """`start()`, then follow the cluster until cancelled or `stop()`."""
        await self.start()
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        self._stopped.set()
        await cancel_and_wait(self._tasks)
        if self._ca_dir is not None:
            import shutil

            shutil.rmtree(self._ca_dir, ignore_errors=True)
        if self._leader is not None:
            try:
                await asyncio.wait_for(self._leader.release(), 2.0)
            except Exception as e:
                log.warning("could not release the leader lease: %s", e)
        if self._own_api and self.api is not None:
            await self.api.close()

    def refresh(self) -> None:
        """Translate again soon (e.g. the file's `defaults:` changed)."""
        self._dirty.set()

    @property
    def synced(self) -> bool:
        return bool(self.reflectors) and all(r.synced.is_set() for r in self.reflectors.values())

    # -- supervision ---------------------------------------------------------------------------

    def _supervise(self, name: str, factory: Callable[[], Awaitable[None]],
                   on_up: Callable[[], Any] | None = None) -> None:
        """Run `factory()` under supervision (see the module docstring). By default a loop
        counts as back when it restarts; `on_up` replaces that (the translate loop is back
        once a translation applied)."""
        self.tasks.spawn(
            self.tasks.supervise(name, factory, on_down=partial(self._loop_down, name),
                                 on_up=on_up or partial(self._loop_back, name), logger=log),
            name, self._tasks)

    def _loop_down(self, name: str, exc: BaseException) -> None:
        """A loop raised and waits to restart: the watcher is down, the error shown."""
        self.down[name] = f"{name} failed ({self.tasks.describe(exc)}); restarting it"
        self._report_health()

    def _loop_back(self, name: str) -> None:
        self.down.pop(name, None)
        self._report_health()

    def _report_health(self) -> None:
        """Up or down, the error of a loop that is down, the last event and the problems, as
        things are now (edgelb_watcher_up, /status.json)."""
        error = next(iter(self.down.values()), "")
        self.report(NAME, Health(up=self._up(), error=error, last_event=self._last_event,
                                 problems=self._problems))

    # -- the translate loop ------------------------------------------------------------------

    def _changed(self) -> None:
        self._last_event = time.time()
        self._dirty.set()

    async def _loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(DEBOUNCE)  # let the rest of a burst arrive
            self._dirty.clear()
            if not self.synced:
                continue  # the first snapshot waits for every kind's first list
            await self.apply_now()

    async def apply_now(self) -> None:
        """Translate the caches and hand the snapshot to `emit` (the loop calls this)."""
        self.node_zone = self._node_zone()
        # the reflectors' caches as they are: translate() reads them without awaiting
        state = ClusterState(**{kind: self._cache(kind) for kind in (
            "services", "endpointslices", "ingresses", "ingressclasses", "secrets", "pods")})
        if self._cache("opaque_secrets"):  # a Secret has one type: the keys never collide
            state = dataclasses.replace(state, secrets={**state.secrets,
                                                        **self._cache("opaque_secrets")})
        translation = translate(
            state,
            ingress_class=self.config.ingress_class,
            defaults=self.defaults(),
            zone=self.zone() or self.node_zone,
            pod_weights=self.config.pod_weights,
            read_policy=self.read_policy,
            sni_routing=self.sni_routing(),
            ingress_nginx=getattr(self.config, "ingress_nginx_annotations", False),
        )
        if self.gateway_on:
            gateway = translate_gateway(
                state, GatewayState(**{kind: self._cache(kind) for kind in GATEWAY_CACHES}),
                read_policy=self.read_policy, defaults=self.defaults(),
                zone=self.zone() or self.node_zone, pod_weights=self.config.pod_weights,
                sni_routing=self.sni_routing(), tls_taken=translation.tls,
                passthrough_taken=_passthrough_hosts(translation),
                ports_taken=[s.listen.port for s in translation.snapshot.services if s.listen])
            translation = self._with_gateway(translation, gateway)
            self.gateway_translation = gateway
        problems = list(translation.problems)
        if self._gateway_problem is not None:
            problems.append(self._gateway_problem)
        certificates, origins = self._certificates(translation, problems)
        # the Secrets' certificates go with the snapshot that routes their hosts: in the same
        # step when it is accepted, not at all when it is rejected
        snapshot = dataclasses.replace(translation.snapshot, certificates=certificates,
                                       zone=self.node_zone)
        notices: tuple[Notice, ...] = ()
        try:
            notices = await self.emit(snapshot)
        except Exception as e:
            # recorded and logged by the runtime; the last good snapshot keeps serving
            log.error("the cluster's snapshot was rejected: %s", e)
            return
        finally:
            # translated and applied (or rejected): the translate loop works again
            problems.extend(_secret_problem(origins, n) for n in notices)
            self.down.pop(TRANSLATE_LOOP, None)
            self._report(problems)
        self.translation = translation
        self.applies += 1
        await self._publish_status()

    # -- the Gateway API -----------------------------------------------------------------------

    async def _discover_gateway_api(self) -> bool:
        """Add the reflectors of the Gateway API kinds the cluster serves; False (and a problem
        reported with every snapshot) while its CRDs are not installed."""
        from watchers.kubernetes.gateway.resources import served_kinds

        what = "watchers.kubernetes.gateway_api is on, but"
        try:
            served = await served_kinds(self.api)
        except REQUEST_ERRORS as e:
            self._gateway_problem = Problem(
                "CustomResourceDefinition", "", "gateway.networking.k8s.io",
                f"{what} the API could not be asked which Gateway API kinds it serves ({e}); "
                f"asking again every {GATEWAY_RECHECK:g}s; Ingresses are served meanwhile")
            return False
        missing = [k for k in REQUIRED if k not in served]
        if missing:
            self._gateway_problem = Problem(
                "CustomResourceDefinition", "", "gateway.networking.k8s.io",
                f"{what} the cluster does not serve {', '.join(missing)} of "
                "gateway.networking.k8s.io/v1; install the Gateway API CRDs (standard "
                "channel); Ingresses are served meanwhile")
            return False
        self._gateway_problem = None
        ns = self.config.namespaces
        for name, resource in KINDS.items():
            if name in served:
                self._add_reflector(name, resource, ns)
        self._add_reflector("namespaces", NAMESPACES, ())
        self._add_reflector("configmaps", CONFIGMAPS, ns)
        self.gateway_on = True
        self._gateway_status_writer()
        return True

    def _add_reflector(self, name: str, resource: Any, scope: tuple[str, ...]) -> None:
        self.reflectors[name] = Reflector(self.api, resource, self._changed, namespaces=scope,
                                          read_timeout=self.read_timeout)

    async def _recheck_gateway_api(self) -> None:
        """While the CRDs are absent, look again now and then; start following once found."""
        while not self.gateway_on:
            await asyncio.sleep(GATEWAY_RECHECK)
            before = set(self.reflectors)
            if await self._discover_gateway_api():
                for k in set(self.reflectors) - before:
                    self._supervise(f"kubernetes reflector {k}", self.reflectors[k].run)
                log.warning("kubernetes: the Gateway API CRDs are installed; following them")
            self._dirty.set()

    def _with_gateway(self, translation: Translation, gateway: GatewayTranslation
                      ) -> Translation:
        """The Ingress translation with the Gateway API's routes, services, certificates and
        problems added (Ingress certificates keep their host names)."""
        services = list(translation.snapshot.services)
        for svc in gateway.services:
            services.append(self._backend_tls(svc, gateway, translation.problems))
        snapshot = dataclasses.replace(
            translation.snapshot, services=tuple(services),
            routes=translation.snapshot.routes + gateway.routes)
        return dataclasses.replace(
            translation, snapshot=snapshot, tls={**gateway.tls, **translation.tls},
            problems=[*translation.problems, *gateway.problems])

    def _backend_tls(self, svc: Service, gateway: GatewayTranslation,
                     problems: list[Problem]) -> Service:
        """A service a BackendTLSPolicy targets speaks TLS to its backends: its CA (from the
        ConfigMap, written to a private file) or the system store, and the host name."""
        want = gateway.backend_tls.get(svc.name)
        if want is None:
            return svc
        ca_ref = want.ca
        spec: dict[str, Any] = {"sni": want.hostname}
        if ca_ref is not None:
            cm = self._cache("configmaps").get((ca_ref[0], ca_ref[1])) or {}
            pem = ((cm.get("data") or {}).get(ca_ref[2]) or "")
            spec["ca"] = self._ca_file(pem)
        import json

        policy, errs = self.read_policy({BACKEND_TLS_ANNOTATION: json.dumps(spec)}, svc.policy)
        for e in errs:
            problems.append(Problem("BackendTLSPolicy", *want.policy,
                                    f"Service {svc.name}: {e}"))
        return svc if errs else dataclasses.replace(svc, policy=policy)

    def _ca_file(self, pem: str) -> str:
        """A file holding `pem`, named by its digest (edgelb's backend TLS reads CA files)."""
        import hashlib
        import tempfile

        if self._ca_dir is None:
            self._ca_dir = tempfile.mkdtemp(prefix="edgelb-ca-")
        path = os.path.join(self._ca_dir, hashlib.sha256(pem.encode()).hexdigest() + ".pem")
        if not os.path.exists(path):
            with open(path, "w", encoding="utf-8") as f:
                f.write(pem)
        return path

    def _gateway_status_writer(self) -> None:
        from watchers.kubernetes.gateway.status import GatewayStatusWriter

        if self._gateway_status is None:
            self._gateway_status = GatewayStatusWriter(self.api)

    def _certificates(self, translation: Translation, problems: list[Problem]
                      ) -> tuple[Certificates, dict[str, tuple[str, str]]]:
        """The PEM of the Secrets the Ingresses name for TLS, and the host patterns they
        serve; with the Secret of each origin. A Secret that holds no pair keeps its last
        good one and is reported (the runtime does the same for a pair that does not parse)."""
        secrets = self.reflectors.get("secrets")
        cache = secrets.cache if secrets is not None else {}
        loaded: dict[tuple[str, str], PemPair] = {}
        hosts: dict[str, PemPair] = {}
        for pattern, key in translation.tls.items():
            pem = loaded.get(key)
            if pem is None:
                obj = cache.get(key)
                if obj is None:
                    continue  # the translation reported the missing Secret
                version = (obj.get("metadata") or {}).get("resourceVersion", "")
                held = self._pems.get(key)
                if held is not None and held[0] == version:
                    pem = held[1]
                else:
                    try:
                        cert, private, origin = secret_pem(obj)
                        pem = PemPair(cert, private, origin, labels=("tls.crt", "tls.key"))
                        self._pems[key] = (version, pem)
                    except SecretError as e:
                        problems.append(Problem("Secret", key[0], key[1], str(e)))
                        pem = held[1] if held is not None else None  # the last good one
                if pem is None:
                    continue
                loaded[key] = pem
            hosts[pattern] = pem
        for key in [k for k in self._pems if k not in loaded]:
            del self._pems[key]
        origins = {pem.origin: key for key, pem in loaded.items()}
        return Certificates(pairs=tuple(loaded.values()), hosts=tuple(hosts.items())), origins

    def _cache(self, kind: str) -> dict:
        """A reflector's live cache (read it before the next await), or {}."""
        r = self.reflectors.get(kind)
        return r.cache if r is not None else {}

    def _node_zone(self) -> str:
        r = self.reflectors.get("nodes")
        if r is None:
            return ""
        for node in r.cache.values():
            labels = (node.get("metadata") or {}).get("labels") or {}
            zone = labels.get(ZONE_LABEL)
            if isinstance(zone, str):
                return zone
        return ""

    def _up(self) -> bool:
        """Every watch connected and no loop down."""
        return (bool(self.reflectors) and not self.down
                and all(r.up for r in self.reflectors.values()))

    async def _watch_health(self) -> None:
        """Keep edgelb_watcher_up current while nothing changes (e.g. the API is down)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            if any(w is not None and w.needs_retry
                   for w in (self._status, self._gateway_status)):
                self._dirty.set()  # a status write failed: try again
            last = max((r.last_event for r in self.reflectors.values()), default=0.0)
            if last:  # watch events and bookmarks: the source is alive
                self._last_event = max(self._last_event, time.time() - (loop.time() - last))
            self._report_health()

    def _report(self, problems: list[Problem]) -> None:
        current = set(problems)
        for p in problems:
            if p not in self._reported:
                log.warning("kubernetes: %s", p)
                self._post_event(p)
        self._reported = current
        self._problems = len(problems)
        self._report_health()

    # -- leader election, Ingress status, Events -------------------------------------------------

    def _identity(self) -> str:
        return self.environ.get("POD_NAME") or socket.gethostname()

    def _start_leader(self) -> None:
        try:
            from watchers.kubernetes.events import EventRecorder
            from watchers.kubernetes.leader import LeaderElector
            from watchers.kubernetes.status import StatusWriter
        except ImportError:  # pragma: no cover - shipped together
            return
        self._events = EventRecorder(self.api, host=self._identity())
        if self.gateway_on:
            self._gateway_status_writer()
        publish = bool(self.config.publish_address or self.config.publish_service)
        if not (publish or getattr(self.config, "gateway_api", False)):
            return  # nothing to write: no status, no election needed
        if publish:
            self._status = StatusWriter(self.api)
        if not self.config.leader_election:
            return
        namespace = self.environ.get("POD_NAMESPACE", "default")
        self._leader = LeaderElector(
            self.api, namespace, f"{LEADER_LEASE}-{self.config.ingress_class}",
            self._identity(), on_change=self._on_leader,
        )
        self._supervise("kubernetes leader election", self._leader.run)

    def _on_leader(self, leader: bool) -> None:
        log.warning("kubernetes: this replica %s the leader (Ingress status)",
                    "is now" if leader else "is no longer")
        if leader:
            self._dirty.set()  # publish at once

    def _is_writer(self) -> bool:
        if self._status is None and self._gateway_status is None:
            return False
        return self._leader is None or self._leader.is_leader

    def _addresses(self) -> list[str]:
        addresses = list(self.config.publish_address)
        if not addresses and self.config.publish_service:
            from watchers.kubernetes.status import addresses_from_service

            ns, _, name = self.config.publish_service.partition("/")
            addresses = addresses_from_service(self._cache("services").get((ns, name)))
        return addresses

    async def _publish_status(self) -> None:
        if not self._is_writer() or self.translation is None:
            return
        addresses = self._addresses()
        if self._gateway_status is not None and self.gateway_translation is not None:
            caches = {kind: dict(self._cache(kind)) for kind in KINDS}
            try:
                await self._gateway_status.publish(self.gateway_translation.statuses,
                                                   addresses, caches)
            except Exception as e:
                log.warning("kubernetes: could not write Gateway API status: %s", e)
        if not addresses or self._status is None:
            return
        ingresses = dict(self._cache("ingresses"))  # read across awaits: a copy
        try:
            await self._status.publish(self.translation.ingresses, addresses, ingresses)
            gone = set(self._status.published) - set(self.translation.ingresses)
            if gone:  # Ingresses that left our class: our addresses come off their status
                await self._status.clear(gone, ingresses)
        except Exception as e:
            log.warning("kubernetes: could not write Ingress status: %s", e)

    def _post_event(self, p: Problem) -> None:
        if self._events is None or p.kind == "CustomResourceDefinition":
            return  # not an object of the cluster: logged and counted only
        obj = self._find(p)
        meta = (obj or {}).get("metadata") or {}
        coro = self._events.warn(
            p.kind, (obj or {}).get("apiVersion", _API_VERSIONS.get(p.kind, "v1")),
            p.namespace, p.name, meta.get("uid", ""), "EdgelbConfig", p.message,
        )
        self.tasks.spawn(coro, f"kubernetes event on {p.kind} {p.namespace}/{p.name}",
                         self._tasks)

    def _find(self, p: Problem) -> dict | None:
        kind = {"Service": "services", "Ingress": "ingresses", "Pod": "pods",
                "EndpointSlice": "endpointslices", "Secret": "secrets",
                "IngressClass": "ingressclasses", "ConfigMap": "configmaps",
                **{r.kind: name for name, r in KINDS.items()}}.get(p.kind)
        r = self.reflectors.get(kind) if kind else None
        return r.cache.get((p.namespace, p.name)) if r is not None else None


def _passthrough_hosts(translation: Translation) -> list[str]:
    """The host names the Ingresses pass through undecrypted."""
    snap = translation.snapshot
    relayed = {s.name for s in snap.services if s.tls_passthrough}
    return [r.host for r in snap.routes if r.service in relayed]


def _secret_problem(origins: dict[str, tuple[str, str]], notice: Notice) -> Problem:
    """A certificate the runtime could not parse, as a problem of its Secret."""
    namespace, name = origins.get(notice.origin, ("", notice.origin))
    return Problem("Secret", namespace, name, notice.message)


_API_VERSIONS = {
    "Ingress": "networking.k8s.io/v1",
    "IngressClass": "networking.k8s.io/v1",
    "EndpointSlice": "discovery.k8s.io/v1",
    **{r.kind: r.api_version for r in KINDS.values()},
}
