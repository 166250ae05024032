"""The file config's `routes:` list (README.md, "Routes"): Gateway API-like rules read into
watchers.model.Route values, one per host and match, with every problem reported by its key
path. The shape:

    routes:
      - hosts: [shop.example.com]
        matches:
          - path: {prefix: /api}        # or {exact: /x} or {regex: "/u/[0-9]+"}
            headers: {x-canary: "on"}   # or [{name: x-user, regex: "[a-f0-9]{8}"}]
            query: {debug: "1"}
            method: GET
        filters:
          request_headers: {set: {x-a: b}, add: {x-c: d}, remove: [x-e]}
          response_headers: {set: {cache-control: no-store}}
          rewrite: {host: api.internal, prefix: /v2}    # or path: /whole
          redirect: {scheme: https, host: h, port: 8443, path: /p, status: 301}
          mirrors: [{service: web-shadow, percent: 10}]   # or [web-shadow] (100 %)
          cors: {allow_origins: ["https://*.example.com"], allow_credentials: true}  # or true
          limits: {rps: 10, burst: 50, connections: 20, exempt: [10.0.0.0/8]}
        backends: [{service: web, weight: 90}, {service: web-canary, weight: 10}]
        timeout: 5s
"""

from __future__ import annotations

import re
from typing import Any

from edgelb.net.acl import parse_cidrs
from watchers.model import (
    ClientLimits,
    Cors,
    Filters,
    HeaderEdits,
    Mirror,
    Redirect,
    Rewrite,
    Route,
    ValueMatch,
    WeightedService,
)
from watchers.routing import regex_problem
from watchers.schema import Checker, join
from watchers.schema import kind as _kind


def _join(path: str, *keys: str | int) -> str:
    for key in keys:
        path = join(path, key)
    return path

ROUTE_KEYS = ("hosts", "matches", "filters", "backends", "timeout")
MATCH_KEYS = ("path", "headers", "query", "method")
PATH_KINDS = ("exact", "prefix", "regex")
FILTER_KEYS = ("request_headers", "response_headers", "redirect", "rewrite", "mirrors", "cors",
               "limits")
CORS_KEYS = ("allow_origins", "allow_methods", "allow_headers", "expose_headers",
             "allow_credentials", "max_age")
LIMIT_KEYS = ("rps", "burst", "connections", "exempt")
_ORIGIN = re.compile(r"^https?://(\*\.)?[a-z0-9.-]+(:[0-9]{1,5})?$")
EDIT_KEYS = ("set", "add", "remove")
REDIRECT_KEYS = ("scheme", "host", "port", "path", "prefix", "status")
REWRITE_KEYS = ("host", "path", "prefix")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # a header name (RFC 9110 token)
_VALUE = re.compile(r"^[\t\x20-\x7e\x80-\xff]*$")  # a header value: no CR, LF or NUL
# fields the proxy owns (framing, hop-by-hop, forwarding): a header filter may not touch them
PROXY_OWNED = frozenset({
    "host", "connection", "keep-alive", "proxy-connection", "te", "transfer-encoding",
    "upgrade", "content-length", "trailer", "x-forwarded-for", "x-forwarded-proto",
    "x-forwarded-host", "forwarded", "via", "proxy-authorization", "proxy-authenticate",
})


def named_in_routes(value: Any) -> frozenset[str]:
    """The service names the raw `routes:` list sends to (before it is checked): such a
    service needs no hosts, paths or listen of its own."""
    names: set[str] = set()
    for item in value if isinstance(value, list) else ():
        backends = item.get("backends") if isinstance(item, dict) else None
        filters = item.get("filters") if isinstance(item, dict) else None
        mirrors = filters.get("mirrors") if isinstance(filters, dict) else None
        for b in [*(backends if isinstance(backends, list) else ()),
                  *(mirrors if isinstance(mirrors, list) else ())]:
            name = b.get("service") if isinstance(b, dict) else b
            if isinstance(name, str):
                names.add(name)
    return frozenset(names)


def parse_routes(c: Checker, value: Any, host_parser: Any, path_parser: Any,
                 services: set[str]) -> list[Route]:
    """Every route of `routes:` (None: none). `host_parser`/`path_parser` are the config's
    checks of a host and a path prefix; `services`: the names the backends may use."""
    if value is None:
        return []
    items = c.list(value, "routes", "routes", "[{hosts: [a.example.com], backends: "
                   "[{service: web}]}]")
    if items is None:
        return []
    out: list[Route] = []
    for i, item in enumerate(items):
        out.extend(_route(c, item, _join("routes", i), i, host_parser, path_parser, services))
    return out


def _route(c: Checker, item: Any, path: str, order: int, host_parser: Any, path_parser: Any,
           services: set[str]) -> list[Route]:
    m = c.mapping(item, path, "a route (hosts, matches, filters, backends, timeout)")
    if m is None:
        return []
    c.keys(m, path, ROUTE_KEYS)
    before = len(c.errors)
    hosts: list[str] = []
    if m.get("hosts") is not None:
        for j, h in enumerate(c.list(m["hosts"], _join(path, "hosts"), "host names",
                                     "[web.example.com]") or []):
            host = host_parser(c, h, _join(path, "hosts", j))
            if host is not None:
                hosts.append(host)
    matches = _matches(c, m.get("matches"), _join(path, "matches"), path_parser)
    filters = _filters(c, m.get("filters"), _join(path, "filters"), services)
    backends = _backends(c, m.get("backends"), _join(path, "backends"), services)
    timeout = None
    if m.get("timeout") is not None:
        timeout = c.duration(m["timeout"], _join(path, "timeout"), positive=True)
    redirect = filters.redirect if filters is not None else None
    if not backends and redirect is None and len(c.errors) == before:
        c.error(_join(path, "backends"), "a route needs backends (e.g. [{service: web}]), or "
                "a redirect filter")
    if redirect is not None and backends:
        c.error(_join(path, "filters", "redirect"), "a redirect answers the request itself; "
                "drop the backends, or the redirect")
    if filters is not None and filters.rewrite is not None and redirect is not None:
        c.error(_join(path, "filters"), "give a redirect or a rewrite, not both")
    if filters is not None and redirect is not None and (filters.mirrors or filters.limits):
        c.error(_join(path, "filters"), "a redirect answers the request itself: there is no "
                "request to mirror or to limit; drop mirrors and limits, or the redirect")
    for j, (kind, *_rest) in enumerate(matches):
        uses_prefix = (filters is not None and (
            (filters.rewrite is not None and filters.rewrite.prefix is not None)
            or (redirect is not None and redirect.prefix is not None)))
        if uses_prefix and kind != "prefix":
            c.error(_join(path, "matches", j, "path"), "a prefix replacement (rewrite or "
                    "redirect prefix) needs a path prefix match; use {prefix: ...}")
    if len(c.errors) != before:
        return []
    routes = []
    first = backends[0].service if backends else ""
    for host in hosts or [""]:
        for kind, rpath, headers, query, method in matches:
            routes.append(Route(host=host, path=rpath, service=first, exact=kind == "exact",
                                regex=kind == "regex", method=method, headers=headers,
                                query=query, filters=filters, backends=backends,
                                timeout=timeout, name=path, order=order))
    return routes


_Match = tuple[str, str, tuple[ValueMatch, ...], tuple[ValueMatch, ...], str]


def _matches(c: Checker, value: Any, path: str, path_parser: Any) -> list[_Match]:
    if value is None:
        return [("prefix", "/", (), (), "")]
    items = c.list(value, path, "matches", "[{path: {prefix: /api}}]")
    if not items:
        if items is not None:
            c.error(path, "an empty list matches nothing; leave matches out to match every "
                    "request")
        return []
    out = []
    for j, item in enumerate(items):
        mpath = _join(path, j)
        m = c.mapping(item, mpath, "a match (path, headers, query, method)")
        if m is None:
            continue
        c.keys(m, mpath, MATCH_KEYS)
        kind, rpath = "prefix", "/"
        if m.get("path") is not None:
            got = _path_match(c, m["path"], _join(mpath, "path"), path_parser)
            if got is None:
                continue
            kind, rpath = got
        headers = _values(c, m.get("headers"), _join(mpath, "headers"), True)
        query = _values(c, m.get("query"), _join(mpath, "query"), False)
        method = ""
        if m.get("method") is not None:
            method = str(m["method"]).upper()
            if method not in METHODS:
                c.error(_join(mpath, "method"), f"{m['method']!r} is not a method; one of "
                        f"{', '.join(METHODS)}")
                continue
        if headers is None or query is None:
            continue
        out.append((kind, rpath, headers, query, method))
    return out


def _path_match(c: Checker, value: Any, path: str, path_parser: Any) -> tuple[str, str] | None:
    m = c.mapping(value, path, "one of {exact: /p}, {prefix: /p} or {regex: '/p/[0-9]+'}")
    if m is None:
        return None
    c.keys(m, path, PATH_KINDS)
    given = [k for k in PATH_KINDS if k in m]
    if len(given) != 1:
        c.error(path, "give exactly one of exact, prefix or regex")
        return None
    kind = given[0]
    raw = m[kind]
    kpath = _join(path, kind)
    if not isinstance(raw, str) or not raw.startswith("/"):
        c.error(kpath, f"expected a path starting with '/', got {raw!r}")
        return None
    if kind == "regex":
        problem = regex_problem(raw)
        if problem:
            c.error(kpath, problem)
            return None
        return kind, raw
    if kind == "exact":
        if re.search(r"[\s?#]", raw):
            c.error(kpath, f"{raw!r} is not a path; no spaces, '?' or '#'")
            return None
        return kind, raw
    prefix = path_parser(c, raw, kpath)
    return None if prefix is None else (kind, prefix)


def _values(c: Checker, value: Any, path: str, headers: bool
            ) -> tuple[ValueMatch, ...] | None:
    """{name: value} (equal), or [{name, value} | {name, regex}]."""
    if value is None:
        return ()
    what = "header" if headers else "query parameter"
    pairs: list[tuple[str, Any, Any, str]] = []  # name, value, regex, path
    if isinstance(value, dict):
        pairs = [(k, v, None, _join(path, str(k))) for k, v in value.items()]
    else:
        items = c.list(value, path, f"{what} matches", "{x-canary: 'on'}")
        if items is None:
            return None
        for j, item in enumerate(items):
            ipath = _join(path, j)
            m = c.mapping(item, ipath, "{name: N, value: V} or {name: N, regex: R}")
            if m is None:
                return None
            c.keys(m, ipath, ("name", "value", "regex"))
            if ("value" in m) == ("regex" in m):
                c.error(ipath, "give exactly one of value and regex")
                return None
            pairs.append((m.get("name"), m.get("value"), m.get("regex"), ipath))
    out = []
    seen: set[str] = set()
    for name, val, regex, ipath in pairs:
        if not isinstance(name, str) or not (_TOKEN.match(name) if headers else name):
            c.error(ipath, f"{name!r} is not a {what} name")
            return None
        key = name.lower() if headers else name
        if headers and key in PROXY_OWNED and key != "host":
            c.error(ipath, f"{name} is consumed by the proxy (framing, hop-by-hop or "
                    "forwarding) and cannot be matched; match another header")
            return None
        if key in seen:
            c.error(ipath, f"{what} {name} is matched twice; match it once")
            return None
        seen.add(key)
        pattern = regex if regex is not None else val
        if isinstance(pattern, (int, float)) and not isinstance(pattern, bool):
            pattern = str(pattern)
        if not isinstance(pattern, str):
            c.error(ipath, f"expected a string, got {_kind(pattern)} (quote it)")
            return None
        if regex is not None:
            problem = regex_problem(pattern)
            if problem:
                c.error(_join(ipath, "regex"), problem)
                return None
        out.append(ValueMatch(name=key, value=pattern, regex=regex is not None))
    return tuple(out)


def _filters(c: Checker, value: Any, path: str, services: set[str]) -> Filters | None:
    m = c.section(value, path, "filters (request_headers, response_headers, redirect, "
                  "rewrite, mirrors, cors, limits)", FILTER_KEYS)
    if m is None:
        return None
    req = _edits(c, m.get("request_headers"), _join(path, "request_headers"))
    resp = _edits(c, m.get("response_headers"), _join(path, "response_headers"))
    redirect = _redirect(c, m.get("redirect"), _join(path, "redirect"))
    rewrite = _rewrite(c, m.get("rewrite"), _join(path, "rewrite"))
    mirrors = _mirrors(c, m.get("mirrors"), _join(path, "mirrors"), services)
    cors = _cors(c, m.get("cors"), _join(path, "cors"))
    limits = _limits(c, m.get("limits"), _join(path, "limits"))
    if req is resp is redirect is rewrite is cors is limits is None and not mirrors:
        return None
    return Filters(request_headers=req, response_headers=resp, redirect=redirect,
                   rewrite=rewrite, mirrors=mirrors, cors=cors, limits=limits)


def _mirrors(c: Checker, value: Any, path: str, services: set[str]) -> tuple[Mirror, ...]:
    """[{service: NAME, percent: P}] or [NAME]: copies of the requests, fire-and-forget."""
    if value is None:
        return ()
    items = c.list(value, path, "mirrors", "[{service: web-shadow, percent: 10}]")
    out: list[Mirror] = []
    for j, item in enumerate(items or []):
        mpath = _join(path, j)
        found = _service_entry(c, item, mpath, services, "percent", "P", " to mirror to")
        if found is None:
            continue
        m, name = found
        percent = m.get("percent", 100)
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) \
                or not 0 < percent <= 100:
            c.error(_join(mpath, "percent"), f"{percent!r}: a number more than 0, at most 100")
            continue
        if any(x.service == name for x in out):
            c.error(_join(mpath, "service"), f"{name} is mirrored to twice; list it once")
            continue
        out.append(Mirror(service=name, percent=float(percent)))
    return tuple(out)


def _strings(c: Checker, value: Any, path: str, example: str,
             pattern: re.Pattern[str] | None = None, rule: str = "") -> tuple[str, ...] | None:
    items = c.list(value, path, "a list of strings", example)
    if items is None:
        return None
    out = []
    for j, item in enumerate(items):
        text = c.string(item, _join(path, j), pattern, rule)
        if text is None:
            return None
        out.append(text)
    return tuple(out)


def _cors(c: Checker, value: Any, path: str) -> Cors | None:
    """true (ingress-nginx's enable-cors defaults) or a mapping of CORS_KEYS."""
    if value is None or value is False:
        return None
    if value is True:
        return Cors()
    m = c.section(value, path, "CORS settings (true for the defaults, or a mapping of "
                  f"{', '.join(CORS_KEYS)})", CORS_KEYS)
    if m is None:
        return None
    got: dict[str, Any] = {}
    if m.get("allow_origins") is not None:
        opath = _join(path, "allow_origins")
        origins = _strings(c, m["allow_origins"], opath, '["https://app.example.com"]')
        if origins is None:
            return None
        for j, o in enumerate(origins):
            if o != "*" and not _ORIGIN.match(o.lower()):
                c.error(_join(opath, j), f"{o!r} is not an origin; \"*\", "
                        "\"https://app.example.com\" or \"https://*.example.com\" (scheme and "
                        "host, an optional port, no path)")
                return None
        if not origins:
            c.error(opath, "an empty list allows no origin; give [\"*\"] or the origins")
            return None
        got["allow_origins"] = origins
    for key, example in (("allow_methods", "[GET, POST]"), ("allow_headers", "[Content-Type]"),
                         ("expose_headers", "[X-Total-Count]")):
        if m.get(key) is not None:
            names = _strings(c, m[key], _join(path, key), example, _TOKEN,
                             "a method or header name (letters, digits, '-')")
            if names is None:
                return None
            got[key] = tuple(n.upper() for n in names) if key == "allow_methods" else names
    if m.get("allow_credentials") is not None:
        flag = c.boolean(m["allow_credentials"], _join(path, "allow_credentials"))
        if flag is None:
            return None
        got["allow_credentials"] = flag
    if m.get("max_age") is not None:
        age = c.duration(m["max_age"], _join(path, "max_age"))
        if age is None:
            return None
        got["max_age"] = int(age)
    return Cors(**got)


def _limits(c: Checker, value: Any, path: str) -> ClientLimits | None:
    m = c.section(value, path, f"per-client limits ({', '.join(LIMIT_KEYS)})", LIMIT_KEYS)
    if m is None:
        return None
    rps = m.get("rps", 0)
    if isinstance(rps, bool) or not isinstance(rps, (int, float)) or rps < 0:
        c.error(_join(path, "rps"), f"{rps!r}: requests per second per client, a number >= 0")
        return None
    got = {}
    for key in ("burst", "connections"):
        n = c.integer(m.get(key, 0), _join(path, key), 0)
        if not isinstance(n, int):
            return None
        got[key] = n
    if got["burst"] and not rps:
        c.error(_join(path, "burst"), "a burst needs rps; set rps, or drop burst")
        return None
    if not rps and not got["connections"]:
        c.error(path, "give rps or connections (or both); without them nothing is limited")
        return None
    epath = _join(path, "exempt")
    nets, errors = parse_cidrs(m.get("exempt"), epath)
    for e in errors:
        where, _, why = e.partition(": ")
        c.error(where, why)
    if errors:
        return None
    return ClientLimits(rps=float(rps), burst=got["burst"], connections=got["connections"],
                        exempt=tuple(str(n) for n in nets))


def _header_name(c: Checker, name: Any, path: str) -> str | None:
    if not isinstance(name, str) or not _TOKEN.match(name):
        c.error(path, f"{name!r} is not a header name")
        return None
    lname = name.lower()
    if lname in PROXY_OWNED:
        c.error(path, f"{name} is set by the proxy itself (framing, hop-by-hop or forwarding); "
                "a filter may not change it (rewrite host changes the Host)")
        return None
    return lname


def _edits(c: Checker, value: Any, path: str) -> HeaderEdits | None:
    m = c.section(value, path, "header edits (set, add, remove)", EDIT_KEYS)
    if m is None:
        return None
    parts: dict[str, tuple[tuple[str, str], ...]] = {}
    for key in ("set", "add"):
        spath = _join(path, key)
        pairs = None
        if m.get(key) is not None:
            pairs = c.mapping(m[key], spath, "a mapping of header name to value")
        got = []
        for name, val in (pairs or {}).items():
            npath = _join(spath, str(name))
            lname = _header_name(c, name, npath)
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                val = str(val)
            if not isinstance(val, str) or not _VALUE.match(val):
                c.error(npath, "expected a header value: a string without CR, LF or NUL")
                continue
            if lname is not None:
                got.append((lname, val.strip()))
        parts[key] = tuple(got)
    removed = []
    if m.get("remove") is not None:
        rpath = _join(path, "remove")
        for j, name in enumerate(c.list(m["remove"], rpath, "header names", "[x-debug]") or []):
            lname = _header_name(c, name, _join(rpath, j))
            if lname is not None:
                removed.append(lname)
    return HeaderEdits(set=parts.get("set", ()), add=parts.get("add", ()),
                       remove=tuple(removed))


def _replacement(c: Checker, m: dict, path: str) -> tuple[str | None, str | None] | None:
    if "path" in m and "prefix" in m:
        c.error(path, "give path (the whole path) or prefix (the matched prefix), not both")
        return None
    got: list[str | None] = []
    for key in ("path", "prefix"):
        val = m.get(key)
        if val is not None and (not isinstance(val, str) or not val.startswith("/")
                                or re.search(r"[\s?#]", val)):
            c.error(_join(path, key), f"{val!r} is not a path; start with '/', no spaces, '?' "
                    "or '#'")
            return None
        got.append(val)
    return got[0], got[1]


def _redirect(c: Checker, value: Any, path: str) -> Redirect | None:
    m = c.section(value, path, "a redirect (scheme, host, port, path, prefix, status)",
                  REDIRECT_KEYS)
    if m is None:
        return None
    scheme = m.get("scheme") or ""
    if scheme not in ("", "http", "https"):
        c.error(_join(path, "scheme"), f"{scheme!r}: http or https")
        return None
    host = m.get("host") or ""
    if not isinstance(host, str) or re.search(r"[\s/:?#@]", host):
        c.error(_join(path, "host"), f"{host!r} is not a host name (no port or path)")
        return None
    port = m.get("port") or 0
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        c.error(_join(path, "port"), f"{port!r} is not a port")
        return None
    status = m.get("status", 302)
    if status not in REDIRECT_STATUSES:
        c.error(_join(path, "status"), f"{status!r}: one of "
                f"{', '.join(map(str, REDIRECT_STATUSES))}")
        return None
    repl = _replacement(c, m, path)
    if repl is None:
        return None
    return Redirect(scheme=scheme, host=host.lower(), port=port, path=repl[0], prefix=repl[1],
                    status=status)


def _rewrite(c: Checker, value: Any, path: str) -> Rewrite | None:
    m = c.section(value, path, "a rewrite (host, path, prefix)", REWRITE_KEYS)
    if m is None:
        return None
    host = m.get("host") or ""
    if not isinstance(host, str) or re.search(r"[\s/?#@]", host):
        c.error(_join(path, "host"), f"{host!r} is not a host (host or host:port)")
        return None
    repl = _replacement(c, m, path)
    if repl is None:
        return None
    if not host and repl == (None, None):
        c.error(path, "give at least one of host, path and prefix")
        return None
    return Rewrite(host=host, path=repl[0], prefix=repl[1])


def _service_entry(c: Checker, item: Any, path: str, services: set[str], extra: str,
                   example: str, purpose: str = "") -> tuple[dict[str, Any], str] | None:
    """One `{service: NAME, <extra>: ...}` (or a bare NAME) of a list: the mapping and the
    name of an http service that exists, or None (the error given)."""
    if isinstance(item, str):
        item = {"service": item}
    m = c.mapping(item, path, f"{{service: NAME, {extra}: {example}}}")
    if m is None:
        return None
    c.keys(m, path, ("service", extra))
    name = m.get("service")
    if not isinstance(name, str) or name not in services:
        known = ", ".join(sorted(services)) or "none"
        c.error(_join(path, "service"), f"no http service named {name!r}{purpose}; "
                f"known: {known}")
        return None
    return m, name


def _backends(c: Checker, value: Any, path: str, services: set[str]
              ) -> tuple[WeightedService, ...]:
    if value is None:
        return ()
    items = c.list(value, path, "weighted services", "[{service: web, weight: 90}]")
    if items is None:
        return ()
    out = []
    for j, item in enumerate(items):
        bpath = _join(path, j)
        found = _service_entry(c, item, bpath, services, "weight", "N")
        if found is None:
            continue
        m, name = found
        weight = m.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1000000:
            c.error(_join(bpath, "weight"), f"{weight!r}: an integer from 0 to 1000000")
            continue
        out.append(WeightedService(service=name, weight=weight))
    if out and not any(b.weight for b in out):
        c.error(path, "every weight is 0: no request could be sent; give one a weight")
    if len({b.service for b in out}) != len(out):
        c.error(path, "a service is listed twice; list it once with the sum of its weights")
    return tuple(out)
