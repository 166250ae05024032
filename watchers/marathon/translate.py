"""Marathon apps -> one edgelb Snapshot: a pure function over the raw `GET /v2/apps?embed=
apps.tasks` list, marathon-lb's labels kept (README "Migrating from marathon-lb").

Nothing here does I/O or reads a clock, and nothing raises: the same apps always give the same
Translation. An app with a bad label, a port another app holds, or anything else wrong is
skipped alone and named in a `Problem`; a label edgelb has no equivalent for (a raw HAProxy
template) is a Problem too, but its app stays exposed. Choices marathon-lb leaves open:

- With the proxy's group `*` every app is exposed, labelled or not (marathon-lb's `--group *`);
  otherwise an app needs `HAPROXY_GROUP` or `HAPROXY_{n}_GROUP` naming the group (or `*`).
- A port index is bound on `HAPROXY_{n}_PORT`, else its service port; a VHOST app is routed on
  the entrypoints AND bound there (as marathon-lb). A port with neither a port to bind nor a
  VHOST (an IP-per-task app without service ports) is left out and reported; marathon-lb's
  ports picked from a range (`--min-serv-port-ip-per-task`) are not reproduced: they move
  when apps come and go.
- Two apps asking for one static port: the later app id is skipped. Two apps routing the same
  host and path: the higher `HAPROXY_{n}_BACKEND_WEIGHT` keeps it (equal: the first app id) and
  the others lose that route only, as in marathon-lb where their ACL was never reached.
- Without `HAPROXY_{n}_BALANCE` the defaults' balance applies (edgelb's least-loaded, not
  marathon-lb's roundrobin); `EDGELB_{n}_<KEY>` labels win over the HAPROXY label they overlap.
- A task Marathon is killing (TASK_KILLING) stays as a terminating backend: drained, no new
  request. Other states than running are left out.
- `HAPROXY_{n}_SSL_CERT` names a PEM file (certificate and key) on the proxy host. It becomes
  a file-based PemPair (no bytes: the runtime reads the file when it applies the snapshot) in
  `Certificates.pairs`, pinned to the app's VHOSTs in `Certificates.hosts`; a file that is
  missing or bad is a Notice of the runtime (its last good certificate serves), which
  `notice_problems` turns into Problems of the apps naming it.
- `HAPROXY_DEPLOYMENT_*` (marathon-lb's zdd blue/green): the apps of one deployment group are
  one service per port, named after the group, bound on the port of the newest app
  (`HAPROXY_DEPLOYMENT_STARTED_AT`, whose labels rule) and holding the tasks of every colour,
  so traffic follows their instance counts; old tasks drain as new ones turn healthy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from watchers.marathon import apps as shape
from watchers.marathon import labels as lbl
from watchers.model import (
    Address,
    Backend,
    Certificates,
    Notice,
    PemPair,
    Policy,
    Route,
    Service,
    Snapshot,
)
from watchers.schema import KEY_NAMES, closest
from watchers.values import Obj, as_list, as_map, is_int, path_prefix, positive

SOURCE = "marathon"
# (annotations `edgelb.io/<key>` -> value, base) -> (policy, errors naming the annotation): the
# reader the Kubernetes translator is given (edgelb.ops.config.policy_from_annotations)
PolicyReader = Callable[[dict[str, str], Policy], tuple[Policy, list[str]]]
ANNOTATION_PREFIX = "edgelb.io/"
LISTEN_HOST = "0.0.0.0"
MAX_ID = 512
_ID = re.compile(r"^(/[A-Za-z0-9._-]{1,255})+$")
_WILDCARDS = frozenset({"0.0.0.0", "::"})


@dataclass(frozen=True)
class Options:
    group: str = "external"  # the proxy's group (marathon-lb --group); "*" exposes every app
    health: bool = True  # honour Marathon healthCheckResults (tasks with health checks are
    # routed only once some result is alive)
    defaults: Policy = Policy()  # noqa: RUF009 (frozen, shared safely) the base of every policy
    tls_entrypoint: bool = True  # the proxy has a TLS entrypoint (SSL_CERT, REDIRECT_TO_HTTPS)


@dataclass(frozen=True, slots=True)
class Problem:
    app: str  # the Marathon app id, e.g. "/shop/web"
    message: str  # names the label (e.g. "HAPROXY_0_PORT") and the fix

    def __str__(self) -> str:
        return f"app {self.app}: {self.message}" if self.app else self.message


@dataclass(frozen=True)
class Translation:
    snapshot: Snapshot  # source "marathon"; services, routes, certificates
    problems: tuple[Problem, ...] = ()
    apps: Mapping[str, str] = field(default_factory=dict)  # service name -> its app id
    exposed: int = 0  # apps exposed (for status/logs)


def translate(apps: Sequence[Any], options: Options, *, read_policy: PolicyReader
              ) -> Translation:
    """The Snapshot (source "marathon") for the apps list of `GET /v2/apps?embed=apps.tasks`,
    with every problem found on the way.

    `read_policy` reads `edgelb.io/<key>` annotations into a Policy (the caller passes
    `edgelb.ops.config.policy_from_annotations`; watchers never import edgelb): the
    `EDGELB_{n}_<KEY>` labels and the HAPROXY labels that set policy keys go through it, so
    they are checked exactly as the config file's keys."""
    return _Translator(options, read_policy).run(apps)


def service_name(app_id: str, service_port: int | None, index: int) -> str:
    """marathon-lb's backend name: "/shop/web", 10000 -> "shop_web_10000" ("shop_web_p0"
    without a service port)."""
    base = app_id.lstrip("/").replace("/", "_")
    return f"{base}_{service_port}" if service_port is not None else f"{base}_p{index}"


def notice_problems(translation: Translation, notices: Sequence[Notice]) -> list[Problem]:
    """The runtime's Notices about this translation's certificate files (one that cannot be
    read or does not parse; see `certificate_origin`) as Problems of the apps naming them."""
    ours = {pem.origin for pem in translation.snapshot.certificates.pairs}
    out = []
    for n in notices:
        m = _ORIGIN.match(n.origin)
        if n.origin in ours and m:
            out.append(Problem(m.group(2), f"SSL_CERT {m.group(1)}: {n.message}; its last good "
                                           "certificate, if any, is served"))
    return out


def certificate_origin(path: str, app_id: str) -> str:
    """The origin of an SSL_CERT pair: its file and the app (one pair per app, so a Notice
    names the app, and each app keeps its own last good certificate)."""
    return f"{path} (app {app_id})"


_ORIGIN = re.compile(r"^(.*) \(app (/.*)\)$", re.S)


# -- one port index of one app, as read ---------------------------------------------------------


@dataclass
class _Port:
    app: str
    index: int
    name: str
    mode: str
    listen: Address | None
    hosts: list[str]
    path: str
    policy: Policy
    backends: tuple[Backend, ...]
    weight: int  # HAPROXY_{n}_BACKEND_WEIGHT: the higher keeps a contested host and path
    certs: list[PemPair]
    service_port: int | None = None
    capacity: float = 1.0

    def service(self) -> Service:
        return Service(name=self.name, mode=self.mode, listen=self.listen,
                       backends=self.backends, policy=self.policy)


class _Translator:
    def __init__(self, options: Options, read_policy: PolicyReader) -> None:
        self.options = options
        self.read_policy = read_policy
        self.groups = frozenset(lbl.split_list(options.group)) if isinstance(
            options.group, str) else frozenset()
        self.problems: list[Problem] = []
        self._seen: set[Problem] = set()

    def problem(self, app: str, message: str) -> None:
        p = Problem(app, message)
        if p not in self._seen:
            self._seen.add(p)
            self.problems.append(p)

    def run(self, apps: Any) -> Translation:
        if not isinstance(apps, (list, tuple)):
            self.problem("", f"the apps of /v2/apps are not a list (got "
                             f"{type(apps).__name__}); nothing is exposed")
            return Translation(Snapshot(SOURCE), tuple(self.problems))
        by_id = self.by_id(apps)
        read: dict[str, list[_Port]] = {}
        for app_id in sorted(by_id):
            try:
                ports = self.read_app(app_id, by_id[app_id])
            except Exception as e:  # the contract: a Problem, never an exception
                self.problem(app_id, f"internal error while reading this app "
                                     f"({type(e).__name__}: {e}); it is skipped, please report")
                continue
            if ports:
                read[app_id] = ports
        read = self.merge_deployments(read, by_id)
        read = self.claim_ports(read)
        self.claim_routes(read)
        return self.snapshot(read)

    def by_id(self, apps: Sequence[Any]) -> dict[str, Obj]:
        out: dict[str, Obj] = {}
        for i, app in enumerate(apps):
            raw = app.get("id") if isinstance(app, dict) else None
            if not isinstance(raw, str) or not raw:
                self.problem(f"apps[{i}]", "not an app with an id; skipped")
                continue
            app_id = raw if raw.startswith("/") else "/" + raw
            if len(app_id) > MAX_ID or not _ID.match(app_id):
                shown = app_id if len(app_id) <= 80 else app_id[:77] + "..."
                self.problem(f"apps[{i}]", f"id {shown!r} is not a Marathon app id; skipped")
                continue
            if app_id in out:
                self.problem(app_id, f"apps[{i}]: the id appears twice; the first is used")
                continue
            out[app_id] = app  # type: ignore[assignment]  (a dict: checked above)
        return out

    # -- one app --------------------------------------------------------------------------------

    def matches(self, value: str | None) -> bool:
        if "*" in self.groups:
            return True
        if value is None:
            return False
        wanted = set(lbl.split_list(value))
        return "*" in wanted or bool(wanted & self.groups)

    def read_app(self, app_id: str, app: Obj) -> list[_Port]:
        raw = app.get("labels")
        if raw is not None and not isinstance(raw, dict):
            if "*" in self.groups:
                self.problem(app_id, "labels is not a mapping; skipped")
            return []
        labels: dict[str, str] = {}
        errors: list[str] = []
        for k, v in as_map(raw).items():
            if not isinstance(k, str) or not k.startswith((lbl.HAPROXY_PREFIX,
                                                           lbl.EDGELB_PREFIX)):
                continue
            if not isinstance(v, str):
                errors.append(f"{k}: label values are strings, got {type(v).__name__}")
                continue
            labels[k] = v
        layout, error = shape.ports(app)
        count = layout.count if layout is not None else 0

        def group_of(n: int) -> str | None:
            return labels.get(f"HAPROXY_{n}_GROUP", labels.get(lbl.GROUP))

        if layout is None:
            claimed = self.matches(labels.get(lbl.GROUP)) or any(
                self.matches(v) for k, v in labels.items()
                if (m := lbl.PORT_LABEL.match(k)) and m.group(2) == "GROUP")
            if claimed:
                self.problem(app_id, f"{error}; skipped")
            return []
        wanted: list[int] = []
        for n in range(count):
            if not self.matches(group_of(n)):
                continue
            enabled = labels.get(f"HAPROXY_{n}_ENABLED")
            if enabled is not None:
                flag = lbl.parse_bool(enabled)
                if flag is None:
                    errors.append(f"HAPROXY_{n}_ENABLED: {enabled!r} is not true or false")
                    continue
                if not flag:
                    continue
            wanted.append(n)
        if not wanted and not errors:
            return []
        if not wanted and not any(self.matches(group_of(n)) for n in range(count)):
            return []  # not ours: its labels are its business
        notes: list[str] = []
        self.survey(labels, count, wanted, errors, notes)
        ports: list[_Port] = []
        for n in wanted:
            port = self.read_port(app_id, app, labels, layout, n, errors, notes)
            if port is not None:
                ports.append(port)
        listens = [str(p.listen) for p in ports if p.listen is not None]
        for addr in sorted({a for a in listens if listens.count(a) > 1}):
            errors.append(f"two of its ports are bound on {addr}; give each its own "
                          "HAPROXY_n_PORT")
        for note in notes:
            self.problem(app_id, note)
        if errors:
            for e in errors:
                self.problem(app_id, f"{e}; the app is not exposed")
            return []
        return ports

    def survey(self, labels: dict[str, str], count: int, wanted: list[int],
               errors: list[str], notes: list[str]) -> None:
        """Every HAPROXY/EDGELB label the port readers do not read: reported."""
        for k in sorted(labels):
            if k == lbl.GROUP or k.startswith(lbl.DEPLOYMENT_PREFIX):
                continue
            m = lbl.PORT_LABEL.match(k)
            if m:
                n, name = int(m.group(1)), m.group(2)
                if n >= count:
                    notes.append(f"{k}: the app has {count} port(s); ignored")
                elif n in wanted and name not in lbl.MAPPED:
                    notes.append(f"{k}: unsupported (a raw HAProxy template, or a marathon-lb "
                                 "label edgelb has no equivalent for); ignored, see README "
                                 "\"Migrating from marathon-lb\"")
                continue
            m = lbl.EDGELB_LABEL.match(k)
            if m:
                if int(m.group(1)) >= count:
                    errors.append(f"{k}: the app has {count} port(s), no index {m.group(1)}")
                continue
            if k.startswith(lbl.EDGELB_PREFIX):
                errors.append(f"{k}: edgelb's labels are per port: EDGELB_<index>_<KEY>, e.g. "
                              "EDGELB_0_MAX_INFLIGHT")
            else:
                notes.append(f"{k}: unsupported (a raw HAProxy template, or a marathon-lb "
                             "label edgelb has no equivalent for); ignored")

    def read_port(self, app_id: str, app: Obj, labels: dict[str, str], layout: shape.Ports,
                  n: int, errors: list[str], notes: list[str]) -> _Port | None:
        def get(name: str) -> str | None:
            return labels.get(f"HAPROXY_{n}_{name}")

        def lab(name: str) -> str:
            return f"HAPROXY_{n}_{name}"

        before = len(errors)
        hosts: list[str] = []
        if (v := get("VHOST")) is not None:
            hosts, err = lbl.parse_vhosts(v)
            if err:
                errors.append(f"{lab('VHOST')}: {err}")
        path = "/"
        if (v := get("PATH")) is not None:
            path, err = lbl.parse_path(v)
            if err:
                errors.append(f"{lab('PATH')}: {err}")
            elif get("VHOST") is None:
                errors.append(f"{lab('PATH')}: a path is routed under a host; set {lab('VHOST')}")
        mode = "http" if get("VHOST") is not None else "tcp"
        if (v := get("MODE")) is not None:
            if v.strip().lower() not in ("http", "tcp"):
                errors.append(f"{lab('MODE')}: {v!r} is not a mode; write http or tcp")
            else:
                mode = v.strip().lower()
                if mode == "tcp" and get("VHOST") is not None:
                    errors.append(f"{lab('MODE')}: tcp, but {lab('VHOST')} routes by host, "
                                  "which needs http; drop one of them")
        port = None
        if (v := get("PORT")) is not None:
            port = lbl.parse_port(v)
            if port is None:
                errors.append(f"{lab('PORT')}: {v!r} is not a port; write a number 1-65535")
        bind = LISTEN_HOST
        if (v := get("BIND_ADDR")) is not None:
            addr = lbl.parse_bind_addr(v)
            if addr is None:
                errors.append(f"{lab('BIND_ADDR')}: {v!r} is not an IP address; write e.g. "
                              "0.0.0.0, 10.0.0.5 or ::")
            else:
                bind = addr
        weight = 0
        if (v := get("BACKEND_WEIGHT")) is not None:
            w = lbl.parse_int(v)
            if w is None:
                errors.append(f"{lab('BACKEND_WEIGHT')}: {v!r} is not a whole number; write "
                              "e.g. 10 (higher wins a host and path several apps route)")
            else:
                weight = w
        for name in lbl.REWRITE_LABELS:
            if get(name) is not None:
                errors.append(f"{lab(name)}: edgelb does not rewrite paths yet; rather than "
                              "serve it with paths its backends do not expect, the app is left "
                              "out (drop the label, or serve the app under its own path)")
        policy = self.policy(labels, n, mode, errors, notes)
        capacity = self.capacity(app, labels, n, errors)
        certs = self.certificates(app_id, get("SSL_CERT"), lab("SSL_CERT"), errors, notes)
        if len(errors) > before or policy is None or capacity is None:
            return None
        service_port = layout.service[n]
        listen_port = port if port is not None else service_port
        if listen_port is None and not hosts:
            notes.append(f"port index {n} has no service port (IP-per-task apps often have "
                         f"none) and no {lab('VHOST')}; set {lab('PORT')} or a VHOST to expose "
                         "it; left out")
            return None
        backends = self.backends(app, layout, n, capacity, notes)
        return _Port(
            app=app_id, index=n, name=service_name(app_id, service_port, n), mode=mode,
            listen=Address(bind, listen_port) if listen_port is not None else None,
            hosts=hosts, path=path, policy=policy, backends=backends, weight=weight,
            certs=certs, service_port=service_port, capacity=capacity)

    # -- policy ---------------------------------------------------------------------------------

    def policy(self, labels: dict[str, str], n: int, mode: str, errors: list[str],
               notes: list[str]) -> Policy | None:
        """The HAPROXY labels that set policy keys and EDGELB_{n}_<KEY>, through read_policy."""
        values: dict[str, str] = {}
        origin: dict[str, str] = {}  # policy key -> the label it came from

        def put(key: str, value: str, label: str) -> None:
            values[key] = value
            origin[key] = label

        def get(name: str) -> str | None:
            return labels.get(f"HAPROXY_{n}_{name}")

        def http_only(name: str) -> bool:
            if mode == "http":
                return True
            notes.append(f"HAPROXY_{n}_{name}: applies to http mode, and this port is tcp; "
                         "ignored")
            return False

        def flag(name: str) -> bool | None:
            v = get(name)
            if v is None:
                return None
            b = lbl.parse_bool(v)
            if b is None:
                errors.append(f"HAPROXY_{n}_{name}: {v!r} is not true or false")
            return b

        if (v := get("BALANCE")) is not None:
            bal = lbl.parse_balance(v)
            if bal.error:
                errors.append(f"HAPROXY_{n}_BALANCE: {bal.error}")
            elif bal.unsupported:
                notes.append(f"HAPROXY_{n}_BALANCE: {bal.unsupported}")
            for key, value in bal.fields.items():
                put(key, value, f"HAPROXY_{n}_BALANCE")
        sticky = flag("STICKY")
        if sticky is not None and http_only("STICKY"):
            put("sticky", str(sticky).lower(), f"HAPROXY_{n}_STICKY")
        redirect = flag("REDIRECT_TO_HTTPS")
        if redirect and http_only("REDIRECT_TO_HTTPS"):
            if self.options.tls_entrypoint:
                put("redirect_to_https", "true", f"HAPROXY_{n}_REDIRECT_TO_HTTPS")
            else:
                notes.append(f"HAPROXY_{n}_REDIRECT_TO_HTTPS: the proxy has no TLS entrypoint "
                             "to redirect to; ignored (add one with tls under entrypoints:)")
        hsts = flag("USE_HSTS")
        if hsts and http_only("USE_HSTS"):
            put("hsts", str(lbl.HSTS_MAX_AGE), f"HAPROXY_{n}_USE_HSTS")
        if (v := get("AUTH")) is not None and http_only("AUTH"):
            value, err = lbl.auth_value(v)
            if err:
                errors.append(f"HAPROXY_{n}_AUTH: {err}")
            else:
                put("auth", value, f"HAPROXY_{n}_AUTH")
        if (v := get("BACKEND_NETWORK_ALLOWED_ACL")) is not None:
            put("sources", json.dumps(v), f"HAPROXY_{n}_BACKEND_NETWORK_ALLOWED_ACL")
        opts = lbl.Options()
        lbl.option_lines([(f"HAPROXY_{n}_{name}", labels[f"HAPROXY_{n}_{name}"])
                          for name, used in lbl.OPTION_LABELS.items()
                          if f"HAPROXY_{n}_{name}" in labels and used in ("", mode)], opts)
        errors.extend(opts.errors)
        notes.extend(f"{u}: unsupported (only plain `timeout <name> <value>` lines have an "
                     "edgelb meaning); ignored" for u in opts.unsupported)
        for key, value in opts.fields.items():
            put(key, value, opts.origin[key])
        for k in sorted(labels):
            m = lbl.EDGELB_LABEL.match(k)
            if not m or int(m.group(1)) != n:
                continue
            key = lbl.annotation_key(m.group(2))
            if key == "weight":
                continue  # capacity: read by capacity()
            if key in ("port", "mode"):
                errors.append(f"{k}: set HAPROXY_{n}_{key.upper()} instead")
            elif key not in KEY_NAMES:
                near = closest(key, KEY_NAMES)
                hint = (f"did you mean EDGELB_{n}_{near.upper()}?" if near else
                        "see the per-service keys in the README")
                errors.append(f"{k}: unknown key; {hint}")
            else:
                put(key, labels[k], k)
        annotations = {ANNOTATION_PREFIX + k.replace("_", "-"): v for k, v in values.items()}
        base = self.options.defaults
        policy, errs = self.read_policy(annotations, base)
        if errs:
            for e in errs:
                errors.append(_relabel(e, origin))
            return None
        if mode == "http" and policy.proxy_protocol != base.proxy_protocol:
            notes.append(f"EDGELB_{n}_PROXY_PROTOCOL: applies to tcp mode; ignored for http, "
                         "where X-Forwarded-For and Forwarded carry the client's address")
            policy = replace(policy, proxy_protocol=base.proxy_protocol)
        return policy

    def capacity(self, app: Obj, labels: dict[str, str], n: int, errors: list[str]
                 ) -> float | None:
        """Every task's weight: EDGELB_{n}_WEIGHT, else the app's cpus, else 1."""
        raw = labels.get(f"EDGELB_{n}_WEIGHT")
        if raw is not None:
            w = positive(raw)
            if w is None:
                errors.append(f"EDGELB_{n}_WEIGHT: {raw!r} is not a positive number; write "
                              "e.g. 2 or 0.5")
            return w
        cpus = positive(app.get("cpus"))
        return cpus if cpus is not None else 1.0

    def certificates(self, app_id: str, value: str | None, label: str, errors: list[str],
                     notes: list[str]) -> list[PemPair]:
        """SSL_CERT's files as file-based pairs: no bytes, the runtime reads the files."""
        if value is None:
            return []
        paths = lbl.split_list(value)
        bad = [p for p in paths if not p.startswith("/") or any(c in p for c in "\x00\n\r")]
        if not paths or bad:
            errors.append(f"{label}: {value!r} is not an absolute file path; name the PEM file "
                          "(certificate and key) on the proxy host, e.g. /etc/ssl/shop.pem")
            return []
        if not self.options.tls_entrypoint:
            notes.append(f"{label}: the proxy has no TLS entrypoint to serve it on; ignored "
                         "(add one with tls under entrypoints:)")
            return []
        return [PemPair(b"", b"", certificate_origin(p, app_id), files=(p, p),
                        labels=(f"certificate file {p}", f"key file {p}")) for p in paths]

    def backends(self, app: Obj, layout: shape.Ports, n: int, weight: float,
                 notes: list[str]) -> tuple[Backend, ...]:
        found: dict[tuple[str, int], Backend] = {}
        candidates = 0
        for task in as_list(app.get("tasks")):
            task = as_map(task)
            state = shape.task_state(task, app, self.options.health)
            if not state:
                continue
            candidates += 1
            spot = shape.task_address(task, layout, n)
            if spot is None:
                continue
            b = Backend(host=spot[0], port=spot[1], weight=weight, ready=state == "ready",
                        terminating=state == "terminating")
            if spot not in found or (b.ready and not found[spot].ready):
                found[spot] = b
        if candidates and not found:
            where = ("ipAddresses and a container port" if layout.mode == shape.CONTAINER
                     else f"host and ports[{n}]")
            notes.append(f"port index {n}: none of its {candidates} running task(s) has "
                         f"{where}; no backends")
        return tuple(sorted(found.values(), key=lambda b: (b.host, b.port)))

    # -- HAPROXY_DEPLOYMENT_* ---------------------------------------------------------------------

    def merge_deployments(self, read: dict[str, list[_Port]], by_id: dict[str, Obj]
                          ) -> dict[str, list[_Port]]:
        """marathon-lb's zdd: the apps of one HAPROXY_DEPLOYMENT_GROUP are one service per
        port, named after the group (so its state carries over from colour to colour), with
        the ports, labels and routes of the app deployed first (HAPROXY_DEPLOYMENT_STARTED_AT)
        and the tasks of both. As marathon-lb does, as many of the old app's tasks as the new
        one has healthy (within what HAPROXY_DEPLOYMENT_TARGET_INSTANCES leaves) drain."""
        groups: dict[str, list[str]] = {}
        for app_id in list(read):
            raw = as_map(by_id[app_id].get("labels")).get(lbl.DEPLOYMENT_PREFIX + "GROUP")
            if raw is None:
                continue
            group = raw if raw.startswith("/") else "/" + raw
            if not _ID.match(group) or len(group) > MAX_ID:
                self.problem(app_id, f"HAPROXY_DEPLOYMENT_GROUP: {raw!r} is not an app id "
                                     "path; the app is not exposed")
                del read[app_id]
                continue
            groups.setdefault(group, []).append(app_id)
        for group, members in sorted(groups.items()):
            members.sort(key=lambda a: (_started_at(by_id[a]), a))
            old, new = members[0], members[-1]
            for extra in members[1:-1]:
                self.problem(extra, f"HAPROXY_DEPLOYMENT_GROUP {group}: a third app in the "
                                    f"group (with {old} and {new}); the app is not exposed")
                del read[extra]
            for p in read[old]:
                p.name = service_name(group, p.service_port, p.index)
            if new == old:
                continue
            joining = {p.index: p for p in read.pop(new)}
            draining = self.draining(by_id[old], by_id[new])
            for p in read[old]:
                q = joining.get(p.index)
                if q is None:
                    continue
                spots = {(b.host, b.port): b for b in q.backends}
                for b in p.backends:
                    spot = (b.host, b.port)
                    if spot in spots:
                        continue
                    if spot in draining.get(p.index, ()):
                        b = replace(b, ready=False, terminating=True)
                    spots[spot] = b
                p.backends = tuple(sorted(spots.values(), key=lambda b: (b.host, b.port)))
        return read

    def draining(self, old: Obj, new: Obj) -> dict[int, set[tuple[str, int]]]:
        """The addresses (per port index) of the old app's tasks that drain."""
        layout, _ = shape.ports(old)
        if layout is None:
            return {}
        healthy = sum(1 for t in as_list(new.get("tasks"))
                      if shape.task_state(as_map(t), new, self.options.health) == "ready")
        labels = as_map(new.get("labels"))
        target = 1
        if labels.get(lbl.DEPLOYMENT_PREFIX + "NEW_INSTANCES") is not None:
            target = lbl.parse_int(str(labels.get(lbl.DEPLOYMENT_PREFIX + "TARGET_INSTANCES"))
                                   ) or 1
        tasks = sorted((as_map(t) for t in as_list(old.get("tasks"))),
                       key=lambda t: str(t.get("id")))
        instances = old.get("instances")
        instances = instances if is_int(instances) else len(tasks)
        count = min(len(tasks), healthy, max(0, healthy + instances - target))
        out: dict[int, set[tuple[str, int]]] = {}
        for n in range(layout.count):
            for t in tasks[:count]:
                spot = shape.task_address(t, layout, n)
                if spot is not None:
                    out.setdefault(n, set()).add(spot)
        return out

    # -- the whole snapshot -------------------------------------------------------------------

    def claim_ports(self, read: dict[str, list[_Port]]) -> dict[str, list[_Port]]:
        """Static ports, in app id order: an app asking for one an earlier app holds is
        skipped whole. Names too (ids that differ only in `/` and `_` cannot both be served)."""
        held: dict[int, list[tuple[str, str]]] = {}  # port -> (bind host, app id)
        names: dict[str, str] = {}
        kept: dict[str, list[_Port]] = {}
        for app_id in sorted(read):
            ports = read[app_id]
            clash = ""
            for p in ports:
                if p.name in names:
                    clash = (f"its service name {p.name} is taken by app {names[p.name]}; "
                             "the app is not exposed")
                    break
                if p.listen is None:
                    continue
                for host, owner in held.get(p.listen.port, []):
                    if host == p.listen.host or host in _WILDCARDS or p.listen.host in _WILDCARDS:
                        clash = (f"HAPROXY_{p.index}_PORT: port {p.listen.port} is already "
                                 f"bound by app {owner}; give this app another port (the "
                                 "app is not exposed)")
                        break
                if clash:
                    break
            if clash:
                self.problem(app_id, clash)
                continue
            for p in ports:
                names[p.name] = app_id
                if p.listen is not None:
                    held.setdefault(p.listen.port, []).append((p.listen.host, app_id))
            kept[app_id] = ports
        return kept

    def claim_routes(self, read: dict[str, list[_Port]]) -> None:
        """One app per host and path: the highest BACKEND_WEIGHT, then the first app id."""
        claims: dict[tuple[str, str], list[_Port]] = {}
        for app_id in sorted(read):
            for p in read[app_id]:
                for host in p.hosts:
                    claims.setdefault((host, path_prefix(p.path)), []).append(p)
        for (host, path), contenders in sorted(claims.items()):
            if len(contenders) < 2:
                continue
            ranked = sorted(contenders, key=lambda p: (-p.weight, p.app, p.index))
            win = ranked[0]
            for p in ranked[1:]:
                if host in p.hosts:
                    p.hosts.remove(host)
                how = (f"a higher HAPROXY_{win.index}_BACKEND_WEIGHT ({win.weight} > {p.weight})"
                       if win.weight > p.weight else
                       f"the same weight ({p.weight}) and an earlier app id")
                self.problem(p.app, f"HAPROXY_{p.index}_VHOST: {host}{path} is routed to app "
                                    f"{win.app} ({how}); not routed to this app")

    def snapshot(self, read: dict[str, list[_Port]]) -> Translation:
        services: list[Service] = []
        routes: list[Route] = []
        apps: dict[str, str] = {}
        pairs: dict[PemPair, None] = {}
        pins: dict[str, tuple[PemPair, str]] = {}
        exposed: set[str] = set()
        for app_id in sorted(read):
            for p in read[app_id]:
                if p.listen is None and not p.hosts:
                    continue  # every route went to another app
                services.append(p.service())
                apps[p.name] = p.app
                exposed.add(p.app)
                routes.extend(Route(host, p.path, p.name) for host in p.hosts)
                for pem in p.certs:
                    pairs[pem] = None
                    for host in p.hosts:
                        have = pins.get(host)
                        if have is None:
                            pins[host] = (pem, p.app)
                        elif have[0].files != pem.files:
                            self.problem(p.app, f"HAPROXY_{p.index}_SSL_CERT: host {host} "
                                                f"already has {have[0].files[0]} from app "
                                                f"{have[1]}; this one is not pinned to it")
        certificates = Certificates(
            pairs=tuple(pairs), hosts=tuple((h, pins[h][0]) for h in sorted(pins)))
        snap = Snapshot(
            source=SOURCE,
            services=tuple(sorted(services, key=lambda s: s.name)),
            routes=tuple(sorted(routes, key=lambda r: (r.host, r.path, r.service))),
            certificates=certificates)
        return Translation(snapshot=snap, problems=tuple(self.problems), apps=apps,
                           exposed=len(exposed))


def _relabel(error: str, origin: dict[str, str]) -> str:
    """An error of the policy reader (`edgelb.io/max-inflight: ...`) naming the label."""
    for key in sorted(origin, key=len, reverse=True):
        name = ANNOTATION_PREFIX + key.replace("_", "-")
        after = error[len(name):len(name) + 1]
        if error.startswith(name) and not (after.isalnum() or after in ("-", "_")):
            return origin[key] + error[len(name):]
    return error


def _started_at(app: Obj) -> str:
    """HAPROXY_DEPLOYMENT_STARTED_AT (ISO 8601, as zdd writes it); unset sorts first."""
    value = as_map(app.get("labels")).get(lbl.DEPLOYMENT_PREFIX + "STARTED_AT")
    return value if isinstance(value, str) else ""




