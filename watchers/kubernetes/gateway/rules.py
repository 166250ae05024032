"""HTTPRoute and GRPCRoute rules -> edgelb Routes (watchers/model): matches, filters, weighted
backends and timeouts, each malformed part a problem on the route (the rule is skipped, or the
match), never an exception. A mixin of the Gateway API translator (translate.py), which gives it
`problem`, `share` (a backendRef resolved into a service) and the `routes` it appends to."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from watchers.kubernetes.gateway.values import duration, port_number
from watchers.kubernetes.translate import Key, Obj
from watchers.model import (
    Backend,
    Cors,
    Filters,
    HeaderEdits,
    Mirror,
    Policy,
    Redirect,
    Rewrite,
    Route,
    ValueMatch,
    WeightedService,
)
from watchers.routing import regex_problem
from watchers.values import as_list, as_map, as_str, path_prefix

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_REDIRECT_CODES = (301, 302, 303, 307, 308)


@dataclass
class Share:
    """A backendRef as resolved: the service it leads to, or why it cannot."""

    service: str
    weight: int
    reason: str = ""  # "" resolved; else the ResolvedRefs reason
    message: str = ""
    backends: tuple[Backend, ...] = ()
    policy: Policy | None = None


class _SkipRule(Exception):
    """A filter of the rule cannot be honoured: the rule is skipped (reported already)."""


class HttpRules:
    """Reads the rules of an attached HTTPRoute or GRPCRoute (see the module docstring)."""

    routes: list[Route]

    def problem(self, kind: str, key: Key, message: str) -> None:
        raise NotImplementedError

    def share(self, kind: str, key: Key, ref: Obj, mode: str = "http",
              protocol: str = "http1") -> Share:
        raise NotImplementedError

    def http_rule(self, kind: str, key: Key, rule: Obj, index: int, hosts: list[str],
                  rank: int) -> list[Share]:
        where = f"spec.rules[{index}]"
        grpc = kind == "GRPCRoute"
        try:
            filters, redirect_only = self.filters(kind, key, as_list(rule.get("filters")), where)
        except _SkipRule:
            return []
        shares = [] if redirect_only else [
            self.share(kind, key, as_map(r), protocol="h2c" if grpc else "http1")
            for r in as_list(rule.get("backendRefs"))]
        for r in as_list(rule.get("backendRefs")):
            if as_list(as_map(r).get("filters")):
                self.problem(kind, key, f"{where}: filters on a backendRef are not supported; "
                                        "put them on the rule")
        failures = [s for s in shares if s.reason]
        for s in failures:
            self.problem(kind, key, f"{where}: {s.message}; its share answers 500")
        backends = tuple(WeightedService(s.service, s.weight, not s.reason)
                         for s in shares if s.weight > 0)
        service = next((b.service for b in backends if b.resolved), "")
        if not redirect_only and not backends:  # nothing to send to: every request gets 500
            backends = (WeightedService(f"{key[0]}/{key[1]} {where}", 1, False),)
        if backends and backends[0].service != service and len(backends) == 1:
            service = ""  # the router picks from the split, and the share answers 500
        timeout = None
        raw = as_map(rule.get("timeouts")).get("request")
        if raw is not None:
            timeout = duration(raw)
            if timeout is None:
                self.problem(kind, key, f"{where}.timeouts.request: {raw!r} is not a duration "
                                        "like 10s or 1m30s; no timeout of its own")
            elif timeout == 0:
                timeout = math.inf  # the spec: a zero duration disables the timeout
        matches = as_list(rule.get("matches")) or [{}]
        for j, m in enumerate(matches):
            conds = self.grpc_match(key, as_map(m), f"{where}.matches[{j}]") if grpc \
                else self.http_match(key, as_map(m), f"{where}.matches[{j}]")
            if conds is None:
                continue
            path, exact, regex, method, headers, query = conds
            for host in hosts:
                self.routes.append(Route(
                    host=host, path=path, service=service, exact=exact, regex=regex,
                    method=method, headers=headers, query=query, filters=filters or None,
                    backends=backends, timeout=timeout,
                    name=f"{kind} {key[0]}/{key[1]} rule {index}",
                    order=rank * 1024 + min(index, 1023), any_depth=True))
        return failures

    def value_matches(self, kind: str, key: Key, items: list[Any], where: str,
                      header: bool) -> tuple[ValueMatch, ...] | None:
        out = []
        for i, m in enumerate(items):
            m = as_map(m)
            name, value = as_str(m.get("name")), m.get("value")
            typ = as_str(m.get("type")) or "Exact"
            if not name or not isinstance(value, str) or typ not in ("Exact",
                                                                     "RegularExpression"):
                self.problem(kind, key, f"{where}[{i}]: needs a name, a value and type Exact "
                                        "or RegularExpression; match skipped")
                return None
            if typ == "RegularExpression" and (why := regex_problem(value)) is not None:
                self.problem(kind, key, f"{where}[{i}]: {why}; match skipped")
                return None
            out.append(ValueMatch(name.lower() if header else name, value,
                                  typ == "RegularExpression"))
        return tuple(out)

    def http_match(self, key: Key, m: Obj, where: str) -> tuple[Any, ...] | None:
        path = as_map(m.get("path"))
        typ = as_str(path.get("type")) or "PathPrefix"
        value = path.get("value", "/")
        if not isinstance(value, str) or (typ != "RegularExpression"
                                          and not value.startswith("/")):
            self.problem("HTTPRoute", key, f"{where}.path.value: {value!r} is not an absolute "
                                           "path; match skipped")
            return None
        if typ == "RegularExpression":
            if (why := regex_problem(value)) is not None:
                self.problem("HTTPRoute", key, f"{where}.path: {why}; match skipped")
                return None
        elif typ == "PathPrefix":
            value = path_prefix(value)
        elif typ != "Exact":
            self.problem("HTTPRoute", key, f"{where}.path.type: {typ!r} is not Exact, "
                                           "PathPrefix or RegularExpression; match skipped")
            return None
        headers = self.value_matches("HTTPRoute", key, as_list(m.get("headers")),
                                     f"{where}.headers", True)
        query = self.value_matches("HTTPRoute", key, as_list(m.get("queryParams")),
                                   f"{where}.queryParams", False)
        if headers is None or query is None:
            return None
        return (value, typ == "Exact", typ == "RegularExpression", as_str(m.get("method")),
                headers, query)

    def grpc_match(self, key: Key, m: Obj, where: str) -> tuple[Any, ...] | None:
        method = as_map(m.get("method"))
        typ = as_str(method.get("type")) or "Exact"
        svc, name = as_str(method.get("service")), as_str(method.get("method"))
        headers = self.value_matches("GRPCRoute", key, as_list(m.get("headers")),
                                     f"{where}.headers", True)
        if headers is None:
            return None
        if typ == "RegularExpression":
            for part in (svc, name):
                if part and (why := regex_problem(part)) is not None:
                    self.problem("GRPCRoute", key, f"{where}.method: {why}; match skipped")
                    return None
            return (f"/{svc or '[^/]+'}/{name or '[^/]+'}", False, True, "POST", headers, ())
        if typ != "Exact" or any(c in svc + name for c in "/?# "):
            self.problem("GRPCRoute", key, f"{where}.method: type {typ!r}, service {svc!r}, "
                                           f"method {name!r} is not a gRPC method match; "
                                           "match skipped")
            return None
        if svc and name:
            return (f"/{svc}/{name}", True, False, "POST", headers, ())
        if svc:
            return (f"/{svc}", False, False, "POST", headers, ())
        if name:
            return (f"/[^/]+/{re.escape(name)}", False, True, "POST", headers, ())
        return ("/", False, False, "POST", headers, ())

    def header_edits(self, kind: str, key: Key, raw: Obj, where: str) -> HeaderEdits | None:
        pairs: dict[str, list[tuple[str, str]]] = {"set": [], "add": []}
        for part in ("set", "add"):
            for h in as_list(raw.get(part)):
                h = as_map(h)
                name, value = as_str(h.get("name")), h.get("value")
                if not _HEADER_NAME.match(name) or not isinstance(value, str) \
                        or any(c in value for c in "\r\n\0"):
                    self.problem(kind, key, f"{where}.{part}: {name!r}={value!r} is not a "
                                            "header; rule skipped")
                    return None
                pairs[part].append((name.lower(), value))
        remove = tuple(as_str(n).lower() for n in as_list(raw.get("remove")) if as_str(n))
        return HeaderEdits(set=tuple(pairs["set"]), add=tuple(pairs["add"]), remove=remove)

    def filters(self, kind: str, key: Key, items: list[Any], where: str
                ) -> tuple[Filters | None, bool]:
        """The rule's Filters (None: none) and whether the rule only redirects; _SkipRule when
        a filter cannot be honoured."""
        found: dict[str, Any] = {}
        mirrors: list[Mirror] = []
        for i, f in enumerate(items):
            f = as_map(f)
            typ = as_str(f.get("type"))
            at = f"{where}.filters[{i}]"
            if typ in ("RequestHeaderModifier", "ResponseHeaderModifier"):
                raw = as_map(f.get("requestHeaderModifier" if typ.startswith("Request")
                                 else "responseHeaderModifier"))
                edits = self.header_edits(kind, key, raw, at)
                if edits is None:
                    raise _SkipRule
                found["request_headers" if typ.startswith("Request")
                      else "response_headers"] = edits
            elif typ == "RequestRedirect" and kind == "HTTPRoute":
                r = self.redirect(key, as_map(f.get("requestRedirect")), at)
                if r is None:
                    raise _SkipRule
                found["redirect"] = r
            elif typ == "URLRewrite" and kind == "HTTPRoute":
                raw = as_map(f.get("urlRewrite"))
                path = as_map(raw.get("path"))
                full, prefix = self.path_modifier(key, path, at)
                found["rewrite"] = Rewrite(host=as_str(raw.get("hostname")).lower(), path=full,
                                           prefix=prefix)
            elif typ == "RequestMirror":
                raw = as_map(f.get("requestMirror"))
                s = self.share(kind, key, as_map(raw.get("backendRef")),
                               protocol="h2c" if kind == "GRPCRoute" else "http1")
                if s.reason:
                    self.problem(kind, key, f"{at}: {s.message}; not mirrored")
                    continue
                percent = raw.get("percent")
                frac = as_map(raw.get("fraction"))
                if isinstance(percent, int):
                    pct = float(percent)
                elif isinstance(frac.get("numerator"), int):
                    denom = frac.get("denominator") or 100
                    pct = 100.0 * frac["numerator"] / denom if isinstance(denom, int) and \
                        denom > 0 else 100.0
                else:
                    pct = 100.0
                mirrors.append(Mirror(s.service, max(0.0, min(100.0, pct))))
            elif typ == "CORS" and kind == "HTTPRoute":
                found["cors"] = self.cors(as_map(f.get("cors")))
            else:
                self.problem(kind, key, f"{at}: filter type {typ!r} is not supported by "
                                        "edgelb; rule skipped")
                raise _SkipRule
        if mirrors:
            found["mirrors"] = tuple(mirrors)
        if not found:
            return None, False
        return Filters(**found), "redirect" in found

    def path_modifier(self, key: Key, path: Obj, where: str
                      ) -> tuple[str | None, str | None]:
        """(full path, prefix replacement) of a path modifier; _SkipRule when malformed."""
        if not path:
            return None, None
        typ = as_str(path.get("type"))
        if typ == "ReplaceFullPath" and as_str(path.get("replaceFullPath")).startswith("/"):
            return as_str(path.get("replaceFullPath")), None
        if typ == "ReplacePrefixMatch" and isinstance(path.get("replacePrefixMatch"), str):
            return None, as_str(path.get("replacePrefixMatch")) or "/"
        self.problem("HTTPRoute", key, f"{where}.path: type {typ!r} with its value is not a "
                                       "path modifier; rule skipped")
        raise _SkipRule

    def redirect(self, key: Key, raw: Obj, where: str) -> Redirect | None:
        status = raw.get("statusCode", 302)
        if status not in _REDIRECT_CODES:
            self.problem("HTTPRoute", key, f"{where}.statusCode: {status!r} is not a redirect "
                                           "status (301, 302, 303, 307, 308); rule skipped")
            return None
        port = raw.get("port")
        full, prefix = self.path_modifier(key, as_map(raw.get("path")), where)
        scheme = as_str(raw.get("scheme")).lower()
        if scheme not in ("", "http", "https"):
            self.problem("HTTPRoute", key, f"{where}.scheme: {scheme!r} is not http or https; "
                                           "rule skipped")
            return None
        return Redirect(scheme=scheme, host=as_str(raw.get("hostname")).lower(),
                        port=port_number(port), path=full, prefix=prefix,
                        status=status)

    def cors(self, raw: Obj) -> Cors:
        def strings(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
            got = tuple(as_str(v) for v in as_list(raw.get(name)) if as_str(v))
            return got or default

        base = Cors()
        age = raw.get("maxAge")
        return Cors(allow_origins=strings("allowOrigins", base.allow_origins),
                    allow_methods=strings("allowMethods", base.allow_methods),
                    allow_headers=strings("allowHeaders", base.allow_headers),
                    expose_headers=strings("exposeHeaders", ()),
                    allow_credentials=raw.get("allowCredentials") is True,
                    max_age=age if isinstance(age, int) and age >= 0 else 5)
