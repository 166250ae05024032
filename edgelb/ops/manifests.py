"""`edgelb manifests`: print ready-to-apply Kubernetes YAML for running edgelb as an ingress pod.

The YAML comes from the jinja2 templates in `templates/manifests/` (shipped in the package).
Everything the workload needs to agree with the config (admin port, entrypoint and static
ports, shutdown timings, ingress class, watched namespaces) is read from the config that goes
into the ConfigMap, so the two cannot drift apart: the default config, or `--config FILE`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import jinja2
import yaml

from edgelb import __version__
from edgelb.ops.config import Config, ConfigError, parse_config
from watchers.kubernetes.gateway.resources import CONTROLLER as GATEWAY_CONTROLLER

TEMPLATE_PACKAGE = "edgelb.templates"  # the top-level templates/ (setup.py)
TEMPLATE_DIR = "manifests"
# One template per group of objects, in apply order: what a later object refers to (namespace,
# service account, roles, config) exists before it.
TEMPLATES = (
    "namespace.yaml.j2",
    "serviceaccount.yaml.j2",
    "rbac.yaml.j2",
    "ingressclass.yaml.j2",
    "configmap.yaml.j2",
    "service.yaml.j2",
    "workload.yaml.j2",
    "pdb.yaml.j2",
    "servicemonitor.yaml.j2",  # only with --service-monitor
)
CONFIG_TEMPLATE = "config.yaml.j2"

NAME = "edgelb"
CONTROLLER = "edgelb.io/ingress-controller"
CONFIG_DIR = "/etc/edgelb"
CONFIG_FILE = "edgelb.yaml"
UID = 10001  # the Dockerfile's user
KINDS = ("deployment", "daemonset")
SERVICE_TYPES = ("LoadBalancer", "NodePort", "ClusterIP")
# The default config's ports: unprivileged, so the non-root process binds them as is.
ADMIN_PORT, HTTP_PORT, HTTPS_PORT = 9090, 8080, 8443
DEFAULT_DELAY, DEFAULT_GRACE = 5, 30
# Entrypoints with these names are published on the well-known port, the others on their own.
PUBLIC_PORTS = {"http": 80, "https": 443}
# Kubelet sends SIGKILL this long after the drain should have ended, at the latest.
KILL_MARGIN = 5
# Namespaces that exist in every cluster: not rendered (deleting the output must not try them).
SYSTEM_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})
ALL_ADDRESSES = frozenset({"0.0.0.0", "::"})

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PORT_NAME = re.compile(r"^(?!.*--)[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


class ManifestError(Exception):
    """A problem with the options or the config; `errors` holds one line each."""

    def __init__(self, errors: list[str], origin: str = "edgelb manifests") -> None:
        self.errors = list(errors)
        self.origin = origin
        n = len(self.errors)
        head = f"{origin}: {n} error{'s' if n != 1 else ''}"
        super().__init__(head + "".join(f"\n  {e}" for e in self.errors))


@dataclass(frozen=True, slots=True)
class Options:
    """What to render. None for ingress_class / watch_namespaces: take them from the config."""

    namespace: str = "edgelb"
    kind: str = "deployment"
    replicas: int | None = None  # None: 2 for a deployment
    image: str = f"edgelb:{__version__}"
    ingress_class: str | None = None
    config: str | None = None  # a file path; None: the default config
    service_type: str = "LoadBalancer"
    ports: tuple[int, ...] = ()
    watch_namespaces: tuple[str, ...] | None = None
    service_monitor: bool = False  # add a metrics Service and a ServiceMonitor
    service_monitor_labels: tuple[tuple[str, str], ...] = ()  # for Prometheus' selector


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Command line


def _dns_label(what: str) -> Any:
    def parse(value: str) -> str:
        if not _DNS_LABEL.match(value):
            raise argparse.ArgumentTypeError(
                f"{value!r} is not a valid {what}; use a lowercase DNS label (a-z, 0-9, '-', "
                "at most 63), e.g. edgelb")
        return value

    return parse


def _port_list(value: str) -> tuple[int, ...]:
    ports: list[int] = []
    for item in (s.strip() for s in value.split(",")):
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a port; give port numbers 1..65535 separated by commas, "
                "e.g. 10000,10001")
        if int(item) not in ports:
            ports.append(int(item))
    return tuple(ports)


def _namespace_list(value: str) -> tuple[str, ...]:
    check = _dns_label("namespace")
    names = [check(s.strip()) for s in value.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no namespace given; e.g. --watch-namespaces web,api")
    return tuple(dict.fromkeys(names))


# A label key: an optional DNS-subdomain prefix and "/", then a name; a value: a name or "".
_LABEL_NAME = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"^([a-z0-9]([a-z0-9.-]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")


def _label_list(value: str) -> tuple[tuple[str, str], ...]:
    labels: dict[str, str] = {}
    for item in (s.strip() for s in value.split(",")):
        if not item:
            continue
        key, eq, val = item.partition("=")
        if not eq or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(val):
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a Kubernetes label; give key=value pairs separated by "
                "commas, e.g. release=kube-prometheus-stack")
        labels[key] = val
    if not labels:
        raise argparse.ArgumentTypeError("no label given; e.g. release=kube-prometheus-stack")
    return tuple(labels.items())


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of 1 or more")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `edgelb manifests` on `parser` (the lead's subparser)."""
    parser.add_argument("--namespace", type=_dns_label("namespace"), default="edgelb",
                        metavar="NS", help="namespace of the proxy (default: edgelb)")
    parser.add_argument("--kind", choices=KINDS, default="deployment",
                        help="deployment (default) or daemonset (one proxy per node, on host "
                        "ports)")
    parser.add_argument("--replicas", type=_positive, default=None, metavar="N",
                        help="replicas of a deployment (default: 2)")
    parser.add_argument("--image", default=f"edgelb:{__version__}",
                        help=f"container image (default: edgelb:{__version__})")
    parser.add_argument("--ingress-class", type=_dns_label("ingress class name"), default=None,
                        metavar="NAME",
                        help="IngressClass to serve (default: the config's, else edgelb)")
    parser.add_argument("-c", "--config", default=None, metavar="FILE",
                        help="config to put in the ConfigMap (default: admin on :9090, "
                        "http on :8080, https on :8443 with the Ingresses' certificates, the "
                        "Kubernetes watcher on)")
    parser.add_argument("--service-type", choices=SERVICE_TYPES, default="LoadBalancer",
                        help="type of the public Service (default: LoadBalancer)")
    parser.add_argument("--ports", type=_port_list, default=(), metavar="P1,P2",
                        help="extra static ports (for Services annotated edgelb.io/port) on "
                        "the Service and the container")
    parser.add_argument("--watch-namespaces", type=_namespace_list, default=None,
                        metavar="NS1,NS2",
                        help="watch only these namespaces, with namespaced RBAC (default: the "
                        "config's, else every namespace)")
    parser.add_argument("--service-monitor", action="store_true",
                        help="add a ServiceMonitor (Prometheus Operator) that scrapes /metrics "
                        "on the admin port, and the headless Service it selects")
    parser.add_argument("--service-monitor-labels", type=_label_list, default=(),
                        metavar="K=V,K2=V2",
                        help="extra labels on the ServiceMonitor, for the Prometheus "
                        "resource's serviceMonitorSelector (implies --service-monitor)")


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(
        namespace=args.namespace,
        kind=args.kind,
        replicas=args.replicas,
        image=args.image,
        ingress_class=args.ingress_class,
        config=args.config,
        service_type=args.service_type,
        ports=tuple(args.ports),
        watch_namespaces=args.watch_namespaces,
        service_monitor=args.service_monitor or bool(args.service_monitor_labels),
        service_monitor_labels=tuple(args.service_monitor_labels),
    )


def command(args: argparse.Namespace) -> int:
    """`edgelb manifests ...`: the YAML on stdout, exit 0; or every error on stderr, exit 1."""
    try:
        result = render(options_from_args(args))
    except (ManifestError, ConfigError) as e:
        n = len(e.errors)
        print(f"{e.origin}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
        for err in e.errors:
            print(f"  {err}", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"edgelb manifests: warning: {warning}", file=sys.stderr)
    sys.stdout.write(result.text)
    return 0


# ---------------------------------------------------------------------------------------------
# Templates


_PLAIN = re.compile(r"^[A-Za-z/][A-Za-z0-9._/-]*$")
_YAML_WORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})


def _quote(value: Any) -> str:
    """A YAML scalar that reads back as this string under YAML 1.1 and 1.2: plain when it is
    a simple word or path, else double-quoted (JSON's string syntax is a subset of YAML's)."""
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _YAML_WORDS and yaml.safe_load(text) == text:
        return text
    return _UNSAFE.sub(_escape, json.dumps(text, ensure_ascii=False))


# Characters a YAML reader refuses, or reads as line breaks (folded inside quotes): escaped.
_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]")
_YAML_ESCAPES = {"\x85": "\\N", "\u2028": "\\L", "\u2029": "\\P"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _YAML_ESCAPES.get(char) or f"\\u{ord(char):04x}"


def _mapping(value: dict[str, str], indent: int) -> str:
    pad = " " * indent
    return "\n".join(f"{pad}{_quote(k)}: {_quote(v)}" for k, v in value.items())


def _block(text: str, parent: int) -> str:
    """`text` as the value of a key indented by `parent`: a YAML literal block (indented two
    more), or a quoted string when a literal block would not carry it exactly (control
    characters, odd line breaks, trailing blank lines, which the document's end swallows)."""
    body = text.rstrip("\n")
    if not body or len(text) - len(body) > 1:
        return _quote(text)
    chomp = "" if text.endswith("\n") else "-"
    # An explicit indentation (relative to the parent) when the text itself starts indented.
    indicator = "2" if body.lstrip("\n").startswith(" ") else ""
    pad = " " * (parent + 2)
    lines = "\n".join(pad + line if line else "" for line in body.split("\n"))
    candidate = f"|{indicator}{chomp}\n{lines}"
    try:
        same = yaml.safe_load(f"{' ' * parent}k: {candidate}\n") == {"k": text}
    except yaml.YAMLError:
        same = False
    return candidate if same else _quote(text)


def _environment() -> jinja2.Environment:
    root = resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE_DIR)

    def load(name: str) -> str:
        return root.joinpath(name).read_text("utf-8")

    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(load),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # YAML, not HTML: values are quoted by the `q` filter instead
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(q=_quote, mapping=_mapping, block=_block)
    return env


def _documents(text: str) -> list[str]:
    """Split on `---` lines; drop the documents that hold only comments (a skipped object)."""
    docs: list[str] = []
    for chunk in re.split(r"(?m)^---[ \t]*\n?", text):
        content = [ln for ln in chunk.splitlines() if ln.strip() and not ln.lstrip()
                   .startswith("#")]
        if content:
            docs.append(chunk.strip("\n") + "\n")
    return docs


# ---------------------------------------------------------------------------------------------
# The plan: everything the templates need, checked against the config


@dataclass(frozen=True, slots=True)
class _Port:
    name: str
    port: int  # in the container
    public: int  # on the Service (and the host, for a daemonset)
    owner: str  # where it comes from, for messages


def _default_config(options: Options) -> str:
    env = _environment()
    return env.get_template(CONFIG_TEMPLATE).render(
        admin_port=ADMIN_PORT, http_port=HTTP_PORT, https_port=HTTPS_PORT,
        ingress_class=options.ingress_class or NAME,
        watch_namespaces=list(options.watch_namespaces or ()),
        shutdown_delay=DEFAULT_DELAY, shutdown_grace=DEFAULT_GRACE,
    )


def _read_config(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([f"(file): cannot read {path}: {e.strerror or e}; check the path "
                           "and its permissions"], path) from None
    parse_config(data, origin=path)  # every error, each naming its key; and the encoding
    text = data.decode("utf-8").replace("\r\n", "\n")
    return text.rstrip() + "\n"  # trailing blank lines mean nothing to YAML


def _port_name(name: str, port: int, taken: set[str]) -> str:
    """A Kubernetes port name (at most 15 of a-z, 0-9, '-', with a letter) for an entrypoint;
    `ep-<port>` when its own name does not make one."""
    candidate = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", name.lower())).strip("-")
    usable = bool(_PORT_NAME.match(candidate) and re.search("[a-z]", candidate))
    if not usable or candidate in taken or candidate.startswith("static-"):
        return f"ep-{port}"
    return candidate


def _listen_errors(config: Config, admin_set: bool) -> list[str]:
    """Listeners a pod cannot serve on: anything but all addresses is unreachable from the
    kubelet (probes), Prometheus and the Service, since the pod IP is not known in advance."""
    errors = []
    fix = "in a pod, listen on all addresses: 0.0.0.0:{port} (or [::]:{port})"
    if config.admin.host not in ALL_ADDRESSES:
        where = "admin.listen" + ("" if admin_set else f" (default {config.admin})")
        errors.append(f"{where}: {config.admin} is not reachable by the kubelet's probes nor "
                      f"Prometheus; {fix.format(port=config.admin.port)}, e.g. admin: "
                      f"{{listen: 0.0.0.0:{config.admin.port}}}")
    for e in config.entrypoints:
        if e.listen.host not in ALL_ADDRESSES:
            errors.append(f"entrypoints.{e.name}.listen: {e.listen} is not reachable through "
                          f"the Service; {fix.format(port=e.listen.port)}")
    for i, s in enumerate(config.snapshot.services):
        if s.listen is not None and s.listen.host not in ALL_ADDRESSES:
            errors.append(f"services[{i}].listen ({s.name}): {s.listen} is not reachable "
                          f"through the Service; {fix.format(port=s.listen.port)}")
    return errors


def _ports(config: Config, extra: tuple[int, ...]) -> tuple[list[_Port], list[str]]:
    """Public ports: entrypoints, the config's static services, then --ports."""
    ports: list[_Port] = []
    errors: list[str] = []
    names: set[str] = {"admin"}
    for e in config.entrypoints:
        name = _port_name(e.name, e.listen.port, names)
        names.add(name)
        public = PUBLIC_PORTS.get(e.name, e.listen.port)
        ports.append(_Port(name, e.listen.port, public, f"entrypoints.{e.name}.listen"))
    static = [(s.listen.port, f"services[{i}].listen ({s.name})")
              for i, s in enumerate(config.snapshot.services) if s.listen is not None]
    in_config = {p for p, _ in static}
    admin = config.admin.port
    for port in extra:
        if port == admin:
            errors.append(f"--ports: {port} is the admin port (admin.listen), which is never "
                          "published; choose another port")
        elif any(p.port == port for p in ports):
            owner = next(p.owner for p in ports if p.port == port)
            errors.append(f"--ports: {port} is already the port of {owner}; drop it from "
                          "--ports")
        elif port not in in_config:
            static.append((port, "--ports"))
    for port, owner in static:
        ports.append(_Port(f"static-{port}", port, port, owner))
    seen: dict[int, str] = {}
    for p in ports:
        if p.public in seen:
            fix = ("choose another port" if p.owner == "--ports" else "give this listener "
                   "another port")
            errors.append(f"{p.owner}: public port {p.public} is also that of {seen[p.public]} "
                          f"(entrypoints named http and https are published on 80 and 443); "
                          f"{fix}")
        seen.setdefault(p.public, p.owner)
    return ports, errors


def _seconds(value: float) -> str:
    return f"{value:g}"


def termination_grace(delay: float, grace: float) -> int:
    """terminationGracePeriodSeconds: the preStop sleep (`delay`), then edgelb's own shutdown
    after SIGTERM (unready for `delay`, then drain for up to `grace`), plus a margin. Kubelet
    counts the preStop hook inside this period."""
    return math.ceil(delay + delay + grace) + KILL_MARGIN


def _option_errors(options: Options) -> list[str]:
    errors = []
    if options.kind not in KINDS:
        errors.append(f"--kind: {options.kind!r} is not one of {', '.join(KINDS)}")
    if options.service_type not in SERVICE_TYPES:
        errors.append(f"--service-type: {options.service_type!r} is not one of "
                      f"{', '.join(SERVICE_TYPES)}")
    if options.kind == "daemonset" and options.replicas is not None:
        errors.append("--replicas: a daemonset runs one pod per node; drop --replicas or use "
                      "--kind deployment")
    if not options.image or any(c.isspace() for c in options.image):
        errors.append(f"--image: {options.image!r} is not an image reference; e.g. "
                      f"registry.example.com/edgelb:{__version__}")
    return errors


def _watch(config: Config, options: Options) -> tuple[str, tuple[str, ...], list[str]]:
    """The ingress class and the watched namespaces (empty: all): the options may only
    repeat what the config says, since the RBAC and IngressClass must match what it watches."""
    errors = []
    k8s = config.kubernetes
    ingress_class = options.ingress_class or (k8s.ingress_class if k8s else NAME)
    if k8s is not None and options.ingress_class and k8s.ingress_class != options.ingress_class:
        errors.append(f"watchers.kubernetes.ingress_class: is {k8s.ingress_class!r} but "
                      f"--ingress-class is {options.ingress_class!r}; make them the same, or "
                      "drop --ingress-class")
    watched = tuple(k8s.namespaces) if k8s else ()
    if options.watch_namespaces is not None:
        if k8s is not None and set(watched) != set(options.watch_namespaces):
            shown = ", ".join(watched) if watched else "every namespace"
            errors.append(f"watchers.kubernetes.namespaces: is [{shown}] but "
                          f"--watch-namespaces is {','.join(options.watch_namespaces)}; the "
                          "RBAC must cover what the proxy watches: make them the same, or "
                          "drop --watch-namespaces")
        watched = options.watch_namespaces
    return ingress_class, watched, errors


def render(options: Options) -> Rendered:
    """The manifests for `options` as one multi-document YAML text, plus warnings.

    Raises ManifestError for bad options, ConfigError (origin: the file) for a config that
    edgelb would refuse or that a pod cannot serve."""
    errors = _option_errors(options)
    if errors:
        raise ManifestError(errors)
    if options.config is None:
        origin = "default config"
        text = _default_config(options)
    else:
        origin = options.config
        text = _read_config(options.config)
    config = parse_config(text, origin=origin)

    doc = yaml.safe_load(text)
    admin_set = isinstance(doc.get("admin"), dict) and "listen" in doc["admin"]
    errors = _listen_errors(config, admin_set)
    ports, port_errors = _ports(config, options.ports)
    ingress_class, watched, watch_errors = _watch(config, options)
    errors += port_errors + watch_errors
    if errors:
        raise ConfigError(errors, origin)

    warnings = []
    if config.kubernetes is None or not config.kubernetes.enabled:
        warnings.append(f"{origin} does not enable watchers.kubernetes: the proxy will not "
                        "follow Ingresses or Services annotated edgelb.io/port")
    delay, grace = config.shutdown.delay, config.shutdown.grace
    if delay <= 0:
        warnings.append(f"{origin}: shutdown.delay is 0, so there is no preStop sleep and a "
                        "terminating pod may still be sent new connections while its endpoint "
                        "is removed; set e.g. shutdown: {delay: 5s}")

    daemonset = options.kind == "daemonset"
    labels = {
        "app.kubernetes.io/name": NAME,
        "app.kubernetes.io/instance": NAME,
        "app.kubernetes.io/component": "ingress-controller",
        "app.kubernetes.io/version": __version__,
        "app.kubernetes.io/managed-by": "edgelb-manifests",
    }
    selector = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/instance": NAME}
    container_ports = [{"name": "admin", "port": config.admin.port, "host_port": None}]
    container_ports += [{"name": p.name, "port": p.port,
                         "host_port": p.public if daemonset else None} for p in ports]
    context = {
        "name": NAME,
        "namespace": options.namespace,
        "create_namespace": options.namespace not in SYSTEM_NAMESPACES,
        "labels": labels,
        "selector": selector,
        "kind": options.kind,
        "replicas": options.replicas or 2,
        "image": options.image,
        "ingress_class": ingress_class,
        "controller": CONTROLLER,
        "gateway_controller": GATEWAY_CONTROLLER,
        "watch_namespaces": list(watched),
        "gateway_api": bool(config.kubernetes is not None and config.kubernetes.enabled
                            and config.kubernetes.gateway_api),
        "cluster_rbac_name": f"{NAME}-{options.namespace}",
        "lease_rbac_name": f"{NAME}-leader-election",
        "config_text": text,
        "config_dir": CONFIG_DIR,
        "config_file": CONFIG_FILE,
        "config_path": f"{CONFIG_DIR}/{CONFIG_FILE}",
        "admin_port": config.admin.port,
        "container_ports": container_ports,
        "service_ports": [{"name": p.name, "port": p.public, "target": p.name} for p in ports],
        "service_type": options.service_type,
        "unprivileged_ports": any(p["port"] < 1024 for p in container_ports),
        "prestop_sleep": _seconds(delay) if delay > 0 else "",
        "termination_grace": termination_grace(delay, grace),
        "uid": UID,
        "service_monitor": options.service_monitor,
        "metrics_service": f"{NAME}-metrics",
        "metrics_labels": {**labels, "app.kubernetes.io/component": "metrics"},
        "metrics_selector": {**selector, "app.kubernetes.io/component": "metrics"},
        "service_monitor_labels": {**labels, "app.kubernetes.io/component": "metrics",
                                   **dict(options.service_monitor_labels)},
    }
    env = _environment()
    docs: list[str] = []
    for name in TEMPLATES:
        docs += _documents(env.get_template(name).render(context))
    header = (f"# edgelb {__version__}: `edgelb manifests` output; apply with "
              "`kubectl apply -f FILE`.\n")
    out = header + "---\n" + "---\n".join(docs)
    list(yaml.safe_load_all(out))  # a template bug must not reach kubectl
    return Rendered(out, warnings)
