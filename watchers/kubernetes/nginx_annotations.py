"""An Ingress's ingress-nginx annotations -> what edgelb does with them: a pure reading.

`read(annotations, nginx)` looks at `edgelb.io/<name>` always and, when `nginx` is true
(`watchers.kubernetes.ingress_nginx_annotations`), at `nginx.ingress.kubernetes.io/<name>`;
when both are set the `edgelb.io/` one wins. The result (`Reading`) holds the parts edgelb
maps to (route shape, filters, per-service policy keys, canary, basic auth) and the problems,
one sentence each naming the annotation; nothing here raises, reads a clock or does I/O. The
Ingress translation (translate.py) applies a Reading to the routes and services it builds.

- Snippet annotations (`*-snippet`: arbitrary nginx configuration, the way into
  CVE-2025-1974 "IngressNightmare" and earlier CVEs) are refused: the Ingress is served
  without them and the refusal is a problem.
- An annotation edgelb does not support, or a value it cannot read, is a problem and is left
  out; the rest of the Ingress is served.
- Policy-like annotations (body size, timeouts, affinity, source ranges, basic auth, backend
  protocol, the HTTPS redirect) become `edgelb.io/<key>` strings for the per-service reader
  (watchers/schema.py), applied over the Service's own policy on a service of this Ingress
  alone (translate.py names it `namespace/service:port~ingress`).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from watchers.model import (
    ClientLimits,
    Cors,
    Filters,
    HeaderEdits,
    Redirect,
    Rewrite,
    Route,
    ValueMatch,
    WeightedService,
)
from watchers.routing import regex_problem
from watchers.schema import KEY_NAMES

NGINX = "nginx.ingress.kubernetes.io/"
EDGELB = "edgelb.io/"
CVE = "CVE-2025-1974"
PASSTHROUGH = "ssl-passthrough"

# read by edgelb, each mapped to something of its own (README: "ingress-nginx annotations")
SUPPORTED = frozenset({
    "rewrite-target", "use-regex", "app-root", "ssl-redirect", "force-ssl-redirect",
    "permanent-redirect", "permanent-redirect-code", "temporal-redirect",
    "temporal-redirect-code", "proxy-body-size", "proxy-connect-timeout",
    "proxy-read-timeout", "affinity", "whitelist-source-range", "allowlist-source-range",
    "denylist-source-range", "canary", "canary-weight", "canary-weight-total",
    "canary-by-header", "canary-by-header-value", "canary-by-header-pattern",
    "canary-by-cookie", "backend-protocol", "upstream-vhost", "x-forwarded-prefix",
    "enable-cors", "cors-allow-origin", "cors-allow-methods", "cors-allow-headers",
    "cors-expose-headers", "cors-allow-credentials", "cors-max-age", "limit-rps",
    "limit-rpm", "limit-connections", "limit-burst-multiplier", "limit-whitelist",
    "limit-allowlist", "auth-type", "auth-secret", "auth-secret-type", "auth-realm",
    "session-cookie-name", PASSTHROUGH,  # read by translate.py (passthrough_wanted)
})
# ingress-nginx annotations edgelb knows and does not implement (reported once, ignored);
# the README table says why for each
NOT_SUPPORTED = frozenset({
    "affinity-mode", "affinity-canary-behavior", "session-cookie-path",
    "session-cookie-domain", "session-cookie-change-on-failure", "session-cookie-samesite",
    "session-cookie-conditional-samesite-none", "session-cookie-expires",
    "session-cookie-max-age", "session-cookie-secure", "proxy-send-timeout",
    "auth-tls-secret", "auth-tls-verify-depth", "auth-tls-verify-client",
    "auth-tls-error-page", "auth-tls-pass-certificate-to-upstream", "auth-tls-match-cn",
    "auth-url", "auth-method", "auth-signin", "auth-signin-redirect-param",
    "auth-response-headers", "auth-request-redirect", "auth-cache-key",
    "auth-cache-duration", "auth-keepalive", "auth-keepalive-requests",
    "auth-keepalive-timeout", "auth-keepalive-share-vars", "auth-proxy-set-headers",
    "auth-always-set-cookie", "enable-global-auth", "client-body-buffer-size",
    "custom-http-errors", "custom-headers", "default-backend", "from-to-www-redirect",
    "http2-push-preload", "global-rate-limit", "global-rate-limit-window",
    "global-rate-limit-key", "global-rate-limit-ignored-cidrs", "limit-rate",
    "limit-rate-after", "preserve-trailing-slash", "proxy-cookie-domain",
    "proxy-cookie-path", "proxy-next-upstream", "proxy-next-upstream-timeout",
    "proxy-next-upstream-tries", "proxy-request-buffering", "proxy-redirect-from",
    "proxy-redirect-to", "proxy-http-version", "proxy-ssl-secret", "proxy-ssl-ciphers",
    "proxy-ssl-name", "proxy-ssl-protocols", "proxy-ssl-verify", "proxy-ssl-verify-depth",
    "proxy-ssl-server-name", "enable-rewrite-log", "satisfy", "server-alias",
    "service-upstream", "upstream-hash-by", "upstream-hash-by-subset",
    "upstream-hash-by-subset-size", "load-balance", "proxy-buffering",
    "proxy-buffers-number", "proxy-buffer-size", "proxy-max-temp-file-size",
    "ssl-ciphers", "ssl-prefer-server-ciphers", "connection-proxy-header",
    "enable-access-log", "enable-opentracing", "opentracing-trust-incoming-span",
    "enable-opentelemetry", "opentelemetry-trust-incoming-span",
    "opentelemetry-trust-incoming-spans", "enable-influxdb", "influxdb-measurement",
    "influxdb-port", "influxdb-host", "influxdb-server-name", "enable-modsecurity",
    "enable-owasp-core-rules", "modsecurity-transaction-id", "mirror-request-body",
    "mirror-target", "mirror-host", "disable-proxy-intercept-errors",
})

BACKEND_PROTOCOLS: dict[str, dict[str, Any]] = {  # ingress-nginx's -> edgelb's keys
    "HTTP": {},
    "HTTPS": {"backend-tls": {"verify": False}},
    "GRPC": {"backend-protocol": "h2c"},
    "GRPCS": {"backend-protocol": "h2", "backend-tls": {"verify": False}},
    "H2C": {"backend-protocol": "h2c"},
}
AUTH_FILE, AUTH_MAP = "auth-file", "auth-map"
DENY_ALL = ("0.0.0.0/0", "::/0")
MAX_USERS = 10_000
_SIZE = re.compile(r"^\s*([0-9]+)\s*([kKmMgG]?)\s*$")
_SECONDS = re.compile(r"^\s*([0-9]+)\s*s?\s*$")
_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")  # a header or cookie name
_ORIGIN = re.compile(r"^(\*|https?://(\*\.)?[A-Za-z0-9.-]+(:[0-9]{1,5})?)$")
_METHOD = re.compile(r"^[A-Za-z]+$")
_TOKEN = re.compile(r"^[A-Za-z0-9_*-]+$")
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Canary:
    """A canary Ingress: for the same host and path as a main Ingress, requests go to its
    service by header (first), then cookie, then `weight` of `total`."""

    weight: int = 0
    total: int = 100
    header: str = ""
    header_value: str = ""
    header_pattern: str = ""
    cookie: str = ""


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """Basic auth from a Secret of the Ingress's namespace."""

    secret: str
    kind: str = AUTH_FILE  # auth-file (an htpasswd file under `auth`) | auth-map
    realm: str = ""
    annotation: str = ""  # the auth-secret annotation as written, for messages


@dataclass(frozen=True)
class Reading:
    """What an Ingress's annotations ask of edgelb."""

    regex: bool = False  # paths are (case-insensitive, prefix) regular expressions
    rewrite_target: str | None = None  # the path sent upstream; `$1`.. from a regex path
    app_root: str | None = None  # `/` answers 302 to this path
    redirect: Redirect | None = None  # every request answers this redirect
    request_headers: HeaderEdits | None = None
    upstream_host: str = ""
    cors: Cors | None = None
    limits: ClientLimits | None = None
    # edgelb.io/<key> (without the prefix) -> (JSON value, the annotation that set it)
    policy: dict[str, tuple[str, str]] = field(default_factory=dict)
    ssl_redirect: bool | None = None  # None: ingress-nginx's default (on with spec.tls)
    force_ssl_redirect: bool = False
    canary: Canary | None = None
    auth: BasicAuth | None = None
    problems: tuple[str, ...] = ()

    @property
    def filters(self) -> Filters | None:
        """The route filters of the Ingress's paths (None: none)."""
        rewrite = None
        if self.rewrite_target is not None or self.upstream_host:
            rewrite = Rewrite(host=self.upstream_host, path=self.rewrite_target)
        f = Filters(request_headers=self.request_headers, redirect=self.redirect,
                    rewrite=rewrite, cors=self.cors, limits=self.limits)
        return None if f == Filters() else f

    @property
    def per_ingress(self) -> bool:
        """Whether the Ingress needs services of its own (per-service policy differs; the
        HTTPS redirect is asked separately: it depends on the Ingress's TLS)."""
        return bool(self.policy) or self.auth is not None

    def wants_https_redirect(self, has_tls: bool, nginx_default: bool) -> bool:
        """force-ssl-redirect; else ssl-redirect for an Ingress with TLS, whose default is
        ingress-nginx's (on) when `nginx_default`, else off."""
        if self.force_ssl_redirect:
            return True
        wanted = self.ssl_redirect if self.ssl_redirect is not None else nginx_default
        return has_tls and wanted


# -- reading ------------------------------------------------------------------------------------


def merged(annotations: Mapping[str, Any], nginx: bool) -> dict[str, tuple[str, Any]]:
    """name -> (the annotation as written, its value): `edgelb.io/<name>` always, and
    `nginx.ingress.kubernetes.io/<name>` when `nginx`; the edgelb.io/ one wins."""
    out: dict[str, tuple[str, Any]] = {}
    if nginx:
        for k, v in annotations.items():
            if isinstance(k, str) and k.startswith(NGINX):
                out[k[len(NGINX):]] = (k, v)
    for k, v in annotations.items():
        if isinstance(k, str) and k.startswith(EDGELB):
            out[k[len(EDGELB):]] = (k, v)
    return out


def ignored_nginx(annotations: Mapping[str, Any], nginx: bool) -> bool:
    """True when the Ingress carries ingress-nginx annotations that are not read."""
    return not nginx and any(isinstance(k, str) and k.startswith(NGINX) for k in annotations)


def read(annotations: Mapping[str, Any], nginx: bool) -> Reading:
    """The Reading of one Ingress's annotations (see the module docstring)."""
    return _Reader(merged(annotations, nginx)).run()


class _Reader:
    def __init__(self, found: dict[str, tuple[str, Any]]) -> None:
        self.found = found
        self.problems: list[str] = []
        self.fields: dict[str, Any] = {}
        self.policy: dict[str, tuple[str, str]] = {}

    def problem(self, name: str, message: str) -> None:
        self.problems.append(f"{self.found[name][0]}: {message}")

    def text(self, name: str) -> str | None:
        """The value of `name` as a string, or None (unset, or not a string: a problem)."""
        if name not in self.found:
            return None
        value = self.found[name][1]
        if not isinstance(value, str):
            self.problem(name, f"annotation values are strings; write {value!r} in quotes; "
                               "ignored")
            return None
        return value.strip()

    def flag(self, name: str) -> bool | None:
        value = self.text(name)
        if value is None:
            return None
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        self.problem(name, f'{value!r} is not "true" or "false"; ignored')
        return None

    def number(self, name: str, low: int = 0, high: int = 10**9) -> int | None:
        value = self.text(name)
        if value is None:
            return None
        if value.isascii() and value.isdigit() and low <= int(value) <= high:
            return int(value)
        self.problem(name, f"{value!r} is not a whole number from {low} to {high}; ignored")
        return None

    def set_policy(self, key: str, value: Any, name: str) -> None:
        self.policy[key] = (json.dumps(value), self.found[name][0])

    def run(self) -> Reading:
        for name in sorted(self.found):
            if name.endswith("-snippet") or name == "snippet":
                self.problem(name, "snippet annotations are refused: arbitrary nginx "
                                   f"configuration was the way into {CVE} (IngressNightmare) "
                                   "and earlier CVEs; the Ingress is served without it")
            elif name in NOT_SUPPORTED:
                self.problem(name, "not supported by edgelb (see the README's table of "
                                   "ingress-nginx annotations); ignored")
            elif name not in SUPPORTED:
                key = name.replace("-", "_")
                hint = (f"; {name} is a per-service key: set {EDGELB}{name} on the Service"
                        if key in KEY_NAMES else "")
                self.problem(name, f"unknown annotation on an Ingress; ignored{hint}")
        self.paths()
        self.redirects()
        self.policies()
        self.headers()
        self.cors()
        self.limits()
        self.canary()
        self.auth()
        return Reading(policy=self.policy, problems=tuple(self.problems), **self.fields)

    # -- routes ---------------------------------------------------------------------------------

    def paths(self) -> None:
        regex = self.flag("use-regex")
        target = self.text("rewrite-target")
        if target is not None:
            if not target.startswith("/") or any(c in target for c in " \t?#"):
                self.problem("rewrite-target", f"{target!r} is not an absolute path (start it "
                                               "with '/', no spaces, '?' or '#'); ignored")
                target = None
            else:
                self.fields["rewrite_target"] = target
        # ingress-nginx: rewrite-target makes the Ingress's paths regular expressions
        self.fields["regex"] = bool(regex) or target is not None
        root = self.text("app-root")
        if root is not None:
            if root.startswith("/") and root != "/" and not any(c in root for c in " \t#"):
                self.fields["app_root"] = root
            else:
                self.problem("app-root", f"{root!r} is not an absolute path other than '/'; "
                                         "ignored")
        host = self.text("upstream-vhost")
        if host is not None:
            if host and re.fullmatch(r"[A-Za-z0-9.:\[\]-]{1,253}", host):
                self.fields["upstream_host"] = host
            else:
                self.problem("upstream-vhost", f"{host!r} is not a host name; ignored")

    def redirects(self) -> None:
        for name, code_name, default, codes in (
                ("permanent-redirect", "permanent-redirect-code", 301, (301, 308)),
                ("temporal-redirect", "temporal-redirect-code", 302, (302, 303, 307))):
            url = self.text(name)
            code = self.number(code_name, 300, 308) if code_name in self.found else None
            if url is None:
                continue
            if "redirect" in self.fields:
                self.problem(name, "a permanent redirect is set as well and wins; ignored")
                continue
            redirect = _redirect(url)
            if redirect is None:
                self.problem(name, f"{url!r} is not an http(s) URL or an absolute path; "
                                   "ignored")
                continue
            if code is not None and code not in codes:
                self.problem(code_name, f"{code} is not one of {codes}; using {default}")
                code = None
            self.fields["redirect"] = replace(redirect, status=code or default)
        ssl = self.flag("ssl-redirect")
        if ssl is not None:
            self.fields["ssl_redirect"] = ssl
        if self.flag("force-ssl-redirect"):
            self.fields["force_ssl_redirect"] = True

    # -- per-service policy -----------------------------------------------------------------------

    def policies(self) -> None:
        size = self.text("proxy-body-size")
        if size is not None:
            m = _SIZE.match(size)
            if m is None:
                self.problem("proxy-body-size", f"{size!r} is not a size like 8m, 512k, 1g "
                                                "or 0 (no limit); ignored")
            else:
                n = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[
                    m.group(2).lower()]
                self.set_policy("max-body", n or None, "proxy-body-size")
        for name, key in (("proxy-connect-timeout", "connect-timeout"),
                          ("proxy-read-timeout", "response-timeout")):
            value = self.text(name)
            if value is None:
                continue
            m = _SECONDS.match(value)
            if m is None or int(m.group(1)) == 0:
                self.problem(name, f"{value!r} is not a whole number of seconds above 0; "
                                   "ignored")
                continue
            self.set_policy(key, f"{int(m.group(1))}s", name)
        affinity = self.text("affinity")
        if affinity is not None:
            if affinity == "cookie":
                self.set_policy("sticky", True, "affinity")
                name = self.text("session-cookie-name")
                if name is not None:
                    self.set_policy("sticky_cookie", name, "session-cookie-name")
            else:
                self.problem("affinity", f"{affinity!r}: the only affinity is \"cookie\"; "
                                         "ignored")
        allow_name = ("whitelist-source-range" if "whitelist-source-range" in self.found
                      else "allowlist-source-range")
        allow, bad_allow = self.cidrs(allow_name)
        deny, bad_deny = self.cidrs("denylist-source-range")
        if bad_allow or bad_deny:  # unreadable: closed, never open to everyone
            self.set_policy("sources", {"deny": list(DENY_ALL)},
                            allow_name if bad_allow else "denylist-source-range")
        elif allow or deny:
            self.set_policy("sources", {"allow": allow, "deny": deny},
                            allow_name if allow else "denylist-source-range")
        protocol = self.text("backend-protocol")
        if protocol is not None:
            keys = BACKEND_PROTOCOLS.get(protocol.upper())
            if keys is None:
                self.problem("backend-protocol", f"{protocol!r} is not supported; edgelb "
                                                 f"speaks {', '.join(BACKEND_PROTOCOLS)} to "
                                                 "backends; using HTTP")
            for key, value in (keys or {}).items():
                self.set_policy(key, value, "backend-protocol")

    def cidrs(self, name: str) -> tuple[list[str], bool]:
        """The comma-separated addresses and CIDRs of `name`, and whether one was bad."""
        value = self.text(name)
        out: list[str] = []
        for part in (value or "").split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(str(ipaddress.ip_network(part, strict=False)))
            except ValueError:
                closed = "no client is exempt" if name.startswith("limit-") else \
                    "every client is refused (403)"
                self.problem(name, f"{part!r} is not an address or CIDR; {closed} until it "
                                   "is fixed")
                return [], True
        return out, False

    # -- filters ----------------------------------------------------------------------------------

    def headers(self) -> None:
        prefix = self.text("x-forwarded-prefix")
        if prefix is None:
            return
        if prefix and all(0x20 <= ord(c) < 0x7f for c in prefix):
            self.fields["request_headers"] = HeaderEdits(set=(("x-forwarded-prefix", prefix),))
        else:
            self.problem("x-forwarded-prefix", f"{prefix!r} is not a printable ASCII header "
                                               "value; ignored")

    def cors(self) -> None:
        if not self.flag("enable-cors"):
            for name in ("cors-allow-origin", "cors-allow-methods", "cors-allow-headers",
                         "cors-expose-headers", "cors-allow-credentials", "cors-max-age"):
                if name in self.found:
                    self.problem(name, "has no effect without enable-cors: \"true\"")
            return
        kw: dict[str, Any] = {"allow_credentials": True}  # ingress-nginx's default
        for name, key, pattern in (("cors-allow-origin", "allow_origins", _ORIGIN),
                                   ("cors-allow-methods", "allow_methods", _METHOD),
                                   ("cors-allow-headers", "allow_headers", _TOKEN),
                                   ("cors-expose-headers", "expose_headers", _TOKEN)):
            value = self.text(name)
            if value is None:
                continue
            items = [p.strip() for p in value.split(",") if p.strip()]
            bad = [p for p in items if not pattern.match(p)]
            if bad or not items:
                self.problem(name, f"{bad[0] if bad else value!r} is not allowed in this "
                                   "comma-separated list; the default is used")
                continue
            kw[key] = tuple(p.upper() for p in items) if key == "allow_methods" else tuple(items)
        credentials = self.flag("cors-allow-credentials")
        if credentials is not None:
            kw["allow_credentials"] = credentials
        age = self.number("cors-max-age", 0, 10**8)
        if age is not None:
            kw["max_age"] = age
        self.fields["cors"] = Cors(**kw)

    def limits(self) -> None:
        rps = self.number("limit-rps", 1, 10**6)
        rpm = self.number("limit-rpm", 1, 10**8)
        connections = self.number("limit-connections", 1, 10**6)
        multiplier = self.number("limit-burst-multiplier", 1, 1000)
        exempt_name = ("limit-whitelist" if "limit-whitelist" in self.found
                       else "limit-allowlist")
        exempt, _ = self.cidrs(exempt_name)
        if rps and rpm:
            self.problem("limit-rpm", "limit-rps is set as well; edgelb keeps one rate per "
                                      "client and uses limit-rps")
        rate = float(rps) if rps else (rpm / 60.0 if rpm else 0.0)
        if not rate and not connections:
            for name in ("limit-burst-multiplier", exempt_name):
                if name in self.found:
                    self.problem(name, "has no effect without limit-rps, limit-rpm or "
                                       "limit-connections")
            return
        burst = 0
        if rate:
            burst = int((rps or rpm or 0) * (multiplier or 5))
        self.fields["limits"] = ClientLimits(rps=rate, burst=burst, connections=connections or 0,
                                             exempt=tuple(exempt or ()))

    # -- canary and auth --------------------------------------------------------------------------

    def canary(self) -> None:
        names = ("canary-weight", "canary-weight-total", "canary-by-header",
                 "canary-by-header-value", "canary-by-header-pattern", "canary-by-cookie")
        if not self.flag("canary"):
            for name in names:
                if name in self.found:
                    self.problem(name, "has no effect without canary: \"true\"")
            return
        total = self.number("canary-weight-total", 1, 10**6) or 100
        weight = self.number("canary-weight", 0, 10**6) or 0
        if weight > total:
            self.problem("canary-weight", f"{weight} is above the total {total}; using {total}")
            weight = total
        header = self.text("canary-by-header") or ""
        if header and not _NAME.match(header):
            self.problem("canary-by-header", f"{header!r} is not a header name; ignored")
            header = ""
        value = self.text("canary-by-header-value") or ""
        pattern = self.text("canary-by-header-pattern") or ""
        if pattern and not value:
            why = regex_problem(pattern)
            if why:
                self.problem("canary-by-header-pattern", f"{why}; ignored")
                pattern = ""
        cookie = self.text("canary-by-cookie") or ""
        if cookie and not _NAME.match(cookie):
            self.problem("canary-by-cookie", f"{cookie!r} is not a cookie name; ignored")
            cookie = ""
        self.fields["canary"] = Canary(weight=weight, total=total, header=header,
                                       header_value=value, header_pattern=pattern,
                                       cookie=cookie)

    def auth(self) -> None:
        kind = self.text("auth-type")
        secret = self.text("auth-secret")
        if kind is None:
            if secret is not None:
                self.problem("auth-secret", "has no effect without auth-type: basic")
            return
        if kind.lower() != "basic":
            self.problem("auth-type", f"{kind!r}: edgelb supports basic auth only (digest is "
                                      "not supported); the Ingress's paths answer 503 until "
                                      "this is fixed")
            self.fields["auth"] = BasicAuth(secret="", annotation=self.found["auth-type"][0])
            return
        if not secret:
            self.problem("auth-type", "basic auth needs auth-secret naming a Secret of this "
                                      "namespace; the Ingress's paths answer 503 until it is "
                                      "set")
        elif not _SECRET_NAME.match(secret.rpartition("/")[2]):
            self.problem("auth-secret", f"{secret!r} is not a Secret name; the Ingress's paths "
                                        "answer 503 until it is fixed")
            secret = ""
        source = self.found.get("auth-secret", self.found["auth-type"])[0]
        secret_type = (self.text("auth-secret-type") or AUTH_FILE).lower()
        if secret_type not in (AUTH_FILE, AUTH_MAP):
            self.problem("auth-secret-type", f"{secret_type!r} is not auth-file or auth-map; "
                                             "using auth-file")
            secret_type = AUTH_FILE
        realm = self.text("auth-realm") or ""
        self.fields["auth"] = BasicAuth(secret=secret or "", kind=secret_type, realm=realm,
                                        annotation=source)


def _redirect(url: str) -> Redirect | None:
    """A Redirect to `url` (http(s)://host[:port]/path, or /path)."""
    if url.startswith("/") and not url.startswith("//"):
        return Redirect(path=url)
    try:
        parts = urlsplit(url)
        port = parts.port or 0
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Redirect(scheme=parts.scheme, host=parts.hostname, port=port, path=path)


# -- applying a Reading -------------------------------------------------------------------------


def regex_path(path: str) -> str:
    """An ingress-nginx regex path as an edgelb regex route: nginx matches `location ~*` (a
    case-insensitive match at the start of the path), edgelb a whole-path match."""
    return f"(?i:{path}).*"


def shape(route: Route, reading: Reading) -> Route:
    """`route` (an Ingress path) with the Reading's filters. On a regex route `$1`.. in the
    rewrite target are the path's groups (the data path expands them: Rewrite.path)."""
    return replace(route, filters=reading.filters)


def canary_routes(main: Route, service: str, canary: Canary, name: str) -> list[Route]:
    """The routes that send `main`'s requests to the canary `service`: by header (`always`,
    or the given value or pattern; `never` keeps them on main), then by cookie (`always` /
    `never`), then `main` itself split by weight. Header routes come before cookie routes
    (`order`); both before `main` (they have one header match more)."""
    out: list[Route] = []
    base = main.headers
    kept = main.service

    def add(match: ValueMatch, to: str, order: int) -> None:
        out.append(replace(main, headers=(*base, match), service=to, backends=(),
                           order=order, name=name))

    if canary.header:
        if canary.header_value:
            add(ValueMatch(canary.header, canary.header_value), service, -2)
        elif canary.header_pattern:
            add(ValueMatch(canary.header, canary.header_pattern, regex=True), service, -2)
        else:
            add(ValueMatch(canary.header, "always"), service, -2)
            add(ValueMatch(canary.header, "never"), kept, -2)
    if canary.cookie:
        c = re.escape(canary.cookie)
        add(ValueMatch("cookie", rf"(?:.*;\s*)?{c}=always(?:;.*)?", regex=True), service, -1)
        add(ValueMatch("cookie", rf"(?:.*;\s*)?{c}=never(?:;.*)?", regex=True), kept, -1)
    if canary.weight:
        split = (WeightedService(kept, canary.total - canary.weight),
                 WeightedService(service, canary.weight))
        out.append(replace(main, backends=split, name=name))
    else:
        out.append(main)
    return out


def app_root_route(host: str, root: str, name: str) -> Route:
    """`/` on `host` answers 302 to the app root (ingress-nginx's app-root)."""
    return Route(host=host, path="/", service="", exact=True,
                 filters=Filters(redirect=Redirect(path=root, status=302)), name=name)


def auth_users(secret: Any, kind: str) -> tuple[list[str], str | None]:
    """The `user:HASH` entries of a basic-auth Secret (auth-file: the htpasswd lines under
    `auth`; auth-map: one key per user), or ([], why not)."""
    if not isinstance(secret, Mapping):
        return [], "not found"
    data = secret.get("data")
    data = data if isinstance(data, Mapping) else {}

    def decoded(key: str) -> str | None:
        raw = data.get(key)
        if not isinstance(raw, str):
            return None
        try:
            return base64.b64decode(raw, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None

    users: list[str] = []
    if kind == AUTH_MAP:
        for user in sorted(k for k in data if isinstance(k, str)):
            value = decoded(user)
            if value is None:
                return [], f"data.{user} is not base64 of UTF-8 text"
            users.append(f"{user}:{value.strip()}")
    else:
        text = decoded("auth")
        if text is None:
            return [], ("has no data.auth holding an htpasswd file (create it with "
                        "`htpasswd -cB auth USER` and `kubectl create secret generic NAME "
                        "--from-file=auth`)")
        users = [ln.strip() for ln in text.splitlines() if ln.strip() and
                 not ln.lstrip().startswith("#")]
    if not users:
        return [], "lists no users"
    if len(users) > MAX_USERS:
        return [], f"lists {len(users)} users; at most {MAX_USERS}"
    return users, None
