"""The per-service keys, declared once: name, doc, default, JSON Schema and validation.

Everything that reads or shows a service's policy is derived from `KEYS`: the config file's
services and `defaults:` (edgelb.ops.config), the Kubernetes annotations `edgelb.io/<key>`
(`PolicySchema.from_annotations`), the `edgelb check` summary (`PolicySchema.summary`), the
JSON Schema printed by `edgelb schema` and the README's table of keys (`PolicySchema.markdown`).
`Policy` (watchers/model.py) stays a plain frozen dataclass for the hot path and holds the
default values, which `KEYS` reads off it; a test keeps its fields equal to `KEYS`.

This module imports nothing from edgelb nor balancers: what only they know (the balance policy
names, the parsers of `sources`, `auth` and `backend_tls`) is handed in as `Hooks`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from watchers.model import OUTLIER_KINDS, HealthCheck, Outlier, Policy, RetryBudget

# ---------------------------------------------------------------------------------------------
# Scalars: durations and sizes. They raise ValueError with a message that has no key path; the
# caller puts the path in front.

DURATION_PATTERN = r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h|d)?\s*$"
_DURATION = re.compile(DURATION_PATTERN)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_DURATION_HINT = "write it like 250ms, 2s, 1m, 1h, 365d, or a plain number of seconds"

SIZE_PATTERN = r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|k|m|g)?\s*$"
_SIZE = re.compile(SIZE_PATTERN)
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "k": 1024, "MB": 1000**2,
               "MiB": 1024**2, "m": 1024**2, "GB": 1000**3, "GiB": 1024**3, "g": 1024**3}


def kind(value: Any) -> str:
    """How a value is named in an error: `integer 3`, `string 'x'`, `a mapping`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value}".lower()
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def join(path: str, key: str | int) -> str:
    """A key path one step down: `services[0]`, `services[0].balance`."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def closest(word: Any, choices: Iterable[str]) -> str | None:
    """The choice a misspelt `word` most likely meant, or None."""
    close = difflib.get_close_matches(str(word), sorted(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def parse_size(value: Any) -> int:
    """`512`, `64KiB`, `10MiB`, `1GB` (also k/m/g as KiB/MiB/GiB) -> bytes."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size like 10MiB, got {kind(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value} is negative")
        return value
    m = _SIZE.match(value)
    if m is None:
        raise ValueError(f"{value!r} is not a size; write it like 512, 64KiB, 10MiB or 1GB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def parse_duration(value: Any) -> float:
    """`250ms`, `2s`, `1m`, `1h` or a plain number of seconds -> seconds (float, >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a duration, got {kind(value)}; {_DURATION_HINT}")
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m is None:
            if value.strip().startswith("-"):
                raise ValueError(f"duration {value!r} is negative; durations are 0 or more")
            raise ValueError(f"{value!r} is not a duration; {_DURATION_HINT}")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{value!r} is not a finite duration; {_DURATION_HINT}")
    if seconds < 0:
        raise ValueError(f"duration {value!r} is negative; durations are 0 or more")
    return seconds


def fmt_seconds(s: float) -> str:
    """2.0 -> `2s`, 0.25 -> `250ms`."""
    if s and s < 1:
        return f"{s * 1000:g}ms"
    return f"{s:g}s"


# ---------------------------------------------------------------------------------------------
# The checker: accumulates errors (`key.path: what is wrong; how to fix it`) while a document is
# walked, so every problem is reported in one pass.

INVALID: Any = object()  # marks a value that failed validation (None may be a valid value)


class Checker:
    """Accumulates errors while the document is walked."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.suggested: set[tuple[str, str]] = set()  # (mapping path, key offered for a typo)

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path or '(top level)'}: {message}")

    def missing(self, path: str, key: str, message: str) -> None:
        """Report a required key, unless a misspelling of it was already reported."""
        if (path, key) not in self.suggested:
            self.error(path, message)

    def mapping(self, value: Any, path: str, what: str = "a mapping") -> dict | None:
        if isinstance(value, dict):
            return value
        self.error(path, f"expected {what}, got {kind(value)}")
        return None

    def section(self, value: Any, path: str, what: str, valid: Iterable[str],
                why: dict[str, str] | None = None) -> dict | None:
        """An optional mapping with known keys: None when absent or not a mapping (then
        reported); unknown keys are reported and the mapping is returned anyway."""
        if value is None:
            return None
        m = self.mapping(value, path, what)
        if m is not None:
            self.keys(m, path, valid, why)
        return m

    def keys(self, value: dict, path: str, valid: Iterable[str],
             why: dict[str, str] | None = None) -> None:
        valid = list(valid)
        for key in value:
            if key in valid:
                continue
            if isinstance(key, bool):
                self.error(join(path, str(key).lower()),
                           "YAML reads a bare on/off/yes/no/true/false key as a boolean; quote "
                           f"it, or use one of {', '.join(sorted(valid))}")
                continue
            if why and key in why:
                self.error(join(path, str(key)), why[key])
            else:
                close = closest(key, valid)
                if close is None:
                    hint = f"valid keys: {', '.join(sorted(valid))}"
                else:
                    hint = f"did you mean {close!r}?"
                    self.suggested.add((path, close))
                self.error(join(path, str(key)), f"unknown key; {hint}")

    def list(self, value: Any, path: str, what: str, example: str) -> list | None:
        if isinstance(value, list):
            return value
        hint = f"; write it as a list, e.g. {example}"
        self.error(path, f"expected a list of {what}, got {kind(value)}{hint}")
        return None

    def duration(self, value: Any, path: str, positive: bool = False) -> float | None:
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            self.error(path, str(e))
            return None
        if positive and seconds <= 0:
            self.error(path, "must be more than 0; e.g. 1s")
            return None
        return seconds

    def integer(self, value: Any, path: str, minimum: int, nullable: bool = False) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            want = f"an integer >= {minimum}" + (" or null" if nullable else "")
            self.error(path, f"expected {want}, got {kind(value)}")
            return INVALID
        if value < minimum:
            extra = " (or null for no limit)" if nullable else ""
            self.error(path, f"must be at least {minimum}{extra}, got {value}")
            return INVALID
        return value

    def string(self, value: Any, path: str, pattern: re.Pattern[str] | None = None,
               rule: str = "") -> str | None:
        if not isinstance(value, str):
            self.error(path, f"expected a string, got {kind(value)}")
            return None
        if not value:
            self.error(path, "must not be empty")
            return None
        if pattern is not None and not pattern.match(value):
            self.error(path, f"{value!r} is not valid; {rule}")
            return None
        return value

    def boolean(self, value: Any, path: str) -> bool | None:
        if isinstance(value, bool):
            return value
        self.error(path, f"expected true or false, got {kind(value)}")
        return None


# ---------------------------------------------------------------------------------------------
# Readers of the compound keys (mappings merged over the defaults' value)

HEALTH_KEYS = ("path", "interval", "timeout", "rise", "fall", "type", "method", "status",
               "host", "service")
HEALTH_KINDS = ("http", "tcp", "grpc")
OUTLIER_KEYS = ("failures", "kinds", "ejection", "max_ejection", "max_ejected")
RETRY_BUDGET_KEYS = ("ratio", "min")
_METHOD = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_GRPC_SERVICE = re.compile(r"^[A-Za-z0-9_.]{0,200}$")
_STATUS_RANGE = re.compile(r"^([1-5][0-9][0-9])(?:-([1-5][0-9][0-9]))?$")
_HOST_HEADER = re.compile(r"^[A-Za-z0-9.:\[\]_-]+$")
_HEALTH_PATH = re.compile(r"^/\S*$")
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # an RFC 9110 token: a header or cookie name
_COOKIE_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
_HASH_KEY = re.compile(rf"^(source|header:{_TOKEN}|cookie:{_TOKEN})$")


def _switch_mapping(c: Checker, value: Any, path: str, on: Any, keys: Iterable[str],
                    what: str) -> tuple[dict | None, Any]:
    """A section that is a mapping merged over the defaults, or a switch: (the mapping to
    read, None), or (None, the value itself): null/false -> None, true -> `on`, not a
    mapping -> INVALID (reported)."""
    if value is None or value is False:
        return None, None
    if value is True:
        return None, on
    m = c.mapping(value, path, what)
    if m is None:
        return None, INVALID
    c.keys(m, path, keys)
    return m, None


def read_health_check(c: Checker, value: Any, path: str, base: HealthCheck | None) -> Any:
    """A mapping merged over `base` (the defaults' check); null or false turns checks off."""
    m, done = _switch_mapping(c, value, path, base or HealthCheck(), HEALTH_KEYS,
                              "a mapping like {path: /healthz, interval: 2s} or null")
    if m is None:
        return done
    fields: dict[str, Any] = {}
    ok = True
    if "path" in m:
        p = c.string(m["path"], join(path, "path"), _HEALTH_PATH,
                     "an HTTP path starts with '/' and has no spaces, e.g. /healthz")
        ok &= p is not None
        fields["path"] = p
    for key in ("interval", "timeout"):
        if key in m:
            d = c.duration(m[key], join(path, key), positive=True)
            ok &= d is not None
            fields[key] = d
    for key in ("rise", "fall"):
        if key in m:
            n = c.integer(m[key], join(path, key), 1)
            ok &= n is not INVALID
            fields[key] = n
    if "type" in m:
        check_kind = m["type"]
        if check_kind not in HEALTH_KINDS:
            c.error(join(path, "type"), f"expected http, tcp or grpc (grpc.health.v1 over "
                    f"HTTP/2), got {check_kind!r}")
            ok = False
        fields["kind"] = check_kind
    if "method" in m:
        meth = c.string(m["method"], join(path, "method"), _METHOD,
                        "an HTTP method token, e.g. GET or HEAD")
        ok &= meth is not None
        fields["method"] = meth
    if "status" in m:
        rng = _status_range(c, m["status"], join(path, "status"))
        ok &= rng is not None
        fields["status"] = rng
    if "host" in m:
        host = c.string(m["host"], join(path, "host"), _HOST_HEADER,
                        "a host name (and port) for the Host header, e.g. app.internal")
        ok &= host is not None
        fields["host"] = host
    if m.get("service") == "":
        fields["service"] = ""
    elif "service" in m:
        name = c.string(m["service"], join(path, "service"), _GRPC_SERVICE,
                        "a gRPC service name like shop.Cart, or \"\" for the whole server")
        ok &= name is not None
        fields["service"] = name
    if not ok:
        return INVALID
    return dataclasses.replace(base or HealthCheck(), **fields)


def _status_range(c: Checker, value: Any, path: str) -> tuple[int, int] | None:
    """`200`, `"200-399"` -> an inclusive range of expected status codes."""
    match = _STATUS_RANGE.match(str(value)) if isinstance(value, (int, str)) else None
    if match is None or isinstance(value, bool):
        c.error(path, f"expected a status or a range like 200-399, got {value!r}")
        return None
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if high < low:
        c.error(path, f"the range {value!r} ends below its start; write it low-high")
        return None
    return (low, high)


def read_share(c: Checker, value: Any, path: str, example: str) -> float | None:
    """A share of something: 0.1 or "10%", from 0 to 1."""
    if isinstance(value, str) and value.endswith("%"):
        try:
            value = float(value[:-1]) / 100.0
        except ValueError:
            pass
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    c.error(path, f"expected a share from 0 to 1 or a percentage, e.g. {example}, got "
            f"{value!r}")
    return None


def read_outlier(c: Checker, value: Any, path: str, base: Outlier | None) -> Any:
    """A mapping merged over `base`; false or null turns passive ejection off."""
    m, done = _switch_mapping(c, value, path, base or Outlier(), OUTLIER_KEYS,
                              "a mapping like {failures: 5, ejection: 30s} or false")
    if m is None:
        return done
    fields: dict[str, Any] = {}
    ok = True
    if "failures" in m:
        n = c.integer(m["failures"], join(path, "failures"), 1)
        ok &= n is not INVALID
        fields["failures"] = n
    for key in ("ejection", "max_ejection"):
        if key in m:
            d = c.duration(m[key], join(path, key), positive=True)
            ok &= d is not None
            fields[key] = d
    if "max_ejected" in m:
        share = read_share(c, m["max_ejected"], join(path, "max_ejected"), "10%")
        ok &= share is not None
        fields["max_ejected"] = share
    if "kinds" in m:  # not `on`: YAML 1.1 reads a bare `on` key as true
        kinds = c.list(m["kinds"], join(path, "kinds"), "failure kinds", "[connect, reset, 503]")
        if kinds is None:
            ok = False
        else:
            names = [str(k) for k in kinds]
            bad = [k for k in names if k not in OUTLIER_KINDS]
            known = f"use some of {', '.join(OUTLIER_KINDS)}"
            if bad:
                c.error(join(path, "kinds"), f"unknown failure kind {bad[0]!r}; {known}")
                ok = False
            elif not names:
                c.error(join(path, "kinds"), f"must name at least one failure kind; {known}")
                ok = False
            fields["kinds"] = frozenset(names)
    if not ok:
        return INVALID
    merged = dataclasses.replace(base or Outlier(), **fields)
    if merged.max_ejection < merged.ejection:
        c.error(join(path, "max_ejection"), "must be at least `ejection`")
        return INVALID
    return merged


def read_retry_budget(c: Checker, value: Any, path: str, base: RetryBudget) -> Any:
    m = c.mapping(value, path, "a mapping like {ratio: 0.2, min: 3}")
    if m is None:
        return INVALID
    c.keys(m, path, RETRY_BUDGET_KEYS)
    fields: dict[str, Any] = {}
    ok = True
    if "ratio" in m:
        share = read_share(c, m["ratio"], join(path, "ratio"), "0.2")
        ok &= share is not None
        fields["ratio"] = share
    if "min" in m:
        n = c.integer(m["min"], join(path, "min"), 0)
        ok &= n is not INVALID
        fields["min"] = n
    return dataclasses.replace(base, **fields) if ok else INVALID


def proxy_protocol_version(value: Any) -> int | None:
    """`proxy_protocol`: false/null/0 -> 0 (none), 1/v1 -> 1, 2/v2 -> 2; None if invalid."""
    if value is None or value is False:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1, 2):
        return value
    if isinstance(value, str):
        return {"0": 0, "1": 1, "v1": 1, "2": 2, "v2": 2}.get(value.strip().lower())
    return None


# ---------------------------------------------------------------------------------------------
# The declaration

# (value, key path) -> (parsed value or None, errors naming the key path)
ValueParser = Callable[[Any, str], tuple[Any, list[str]]]


@dataclass(frozen=True)
class Hooks:
    """What the schema needs from edgelb and balancers, which watchers do not import."""

    balance: tuple[str, ...]  # the balance policy names (balancers.POLICIES)
    sources: ValueParser  # edgelb.net.acl.parse_source_filter
    auth: ValueParser  # edgelb.net.acl.parse_auth
    backend_tls: ValueParser  # edgelb.net.backend_tls.parse_backend_tls


@dataclass
class Reading:
    """One walk over a policy mapping: where errors go, what unset keys fall back to, hooks."""

    c: Checker
    base: Policy
    hooks: Hooks


# (reading, value, key path) -> the parsed value, or INVALID (then reported)
Reader = Callable[[Reading, Any, str], Any]
# (policy, mode) -> this key's part of the summary line, or None
Summary = Callable[[Policy, str], "str | None"]


@dataclass(frozen=True)
class Key:
    """One per-service key, as written in a service, `defaults:` or an annotation."""

    name: str
    default: Any  # read off Policy(), whose fields are the keys (a test keeps them equal)
    doc: str  # one line for the README table and the JSON Schema's description
    json: dict[str, Any]  # the JSON Schema of the value as written in YAML
    read: Reader
    shown: str = ""  # the default as a user writes it, when str(default) would not do
    summary: Summary | None = None
    hook: str = ""  # a Hooks field that parses (or, for balance, names) the values

    def default_text(self) -> str:
        if self.shown:
            return self.shown
        value = self.default
        if value is None:
            return "null"
        if isinstance(value, bool):
            return "true" if value else "false"
        if self.json is DURATION:
            return fmt_seconds(value)
        return str(value)


# -- JSON Schema fragments ----------------------------------------------------------------------

DURATION: dict[str, Any] = {"anyOf": [{"type": "number", "minimum": 0},
                                      {"type": "string", "pattern": DURATION_PATTERN}]}
SIZE: dict[str, Any] = {"anyOf": [{"type": "integer", "minimum": 0},
                                  {"type": "string", "pattern": SIZE_PATTERN}]}
SHARE: dict[str, Any] = {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1},
                                   {"type": "string", "pattern": r"^[0-9.]+%$"}]}
BOOLEAN: dict[str, Any] = {"type": "boolean"}


def integer(minimum: int, nullable: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"type": ["integer", "null"] if nullable else "integer",
                           "minimum": minimum}
    return out


def strict_object(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A mapping with only these keys (unknown keys are errors, as in the config parser)."""
    return {"type": "object", "properties": properties, "additionalProperties": False, **extra}


_STRINGS = {"type": "array", "items": {"type": "string"}}
HEALTH_CHECK_JSON = {"anyOf": [{"type": ["boolean", "null"]}, strict_object({
    "path": {"type": "string", "pattern": _HEALTH_PATH.pattern},
    "interval": DURATION, "timeout": DURATION,
    "rise": integer(1), "fall": integer(1),
    "type": {"enum": list(HEALTH_KINDS)},
    "service": {"type": "string", "pattern": _GRPC_SERVICE.pattern},
    "method": {"type": "string", "pattern": _METHOD.pattern},
    "status": {"anyOf": [{"type": "integer", "minimum": 100, "maximum": 599},
                         {"type": "string", "pattern": _STATUS_RANGE.pattern}]},
    "host": {"type": "string", "pattern": _HOST_HEADER.pattern},
})]}
OUTLIER_JSON = {"anyOf": [{"type": ["boolean", "null"]}, strict_object({
    "failures": integer(1), "ejection": DURATION, "max_ejection": DURATION,
    "max_ejected": SHARE,
    "kinds": {"type": "array", "minItems": 1,
              "items": {"enum": [*OUTLIER_KINDS, *(int(k) for k in OUTLIER_KINDS
                                                   if k.isdigit())]}},
})]}
RETRY_BUDGET_JSON = strict_object({"ratio": SHARE, "min": integer(0)})
_CIDRS = {"anyOf": [{"type": "string"}, _STRINGS]}
SOURCES_JSON = {"anyOf": [{"type": "null"}, {"type": "string"}, _STRINGS,
                          strict_object({"allow": _CIDRS, "deny": _CIDRS})]}
AUTH_JSON = {"anyOf": [
    {"type": "null"},
    {"type": "string", "description": "realm:user:HASH (marathon-lb's HAPROXY_n_AUTH)"},
    strict_object({"realm": {"type": "string"}, "users": _STRINGS,
                   "cache_ttl": DURATION, "max_failures": integer(0),
                   "failure_window": DURATION}, required=["users"]),
]}
BACKEND_TLS_JSON = {"anyOf": [{"type": ["boolean", "null"]}, strict_object({
    "verify": BOOLEAN, "ca": {"type": "string"}, "sni": {"type": "string"},
    "cert": {"type": "string"}, "key": {"type": "string"},
})]}


# -- readers of the simple keys -----------------------------------------------------------------

def _duration(positive: bool) -> Reader:
    def read(r: Reading, value: Any, path: str) -> Any:
        d = r.c.duration(value, path, positive=positive)
        return INVALID if d is None else d
    return read


def _integer(minimum: int, nullable: bool = False) -> Reader:
    def read(r: Reading, value: Any, path: str) -> Any:
        return r.c.integer(value, path, minimum, nullable=nullable)
    return read


def _retries(r: Reading, value: Any, path: str) -> Any:
    n = r.c.integer(value, path, 0)
    if n is not INVALID and n > 5:
        r.c.error(path, f"at most 5 retries, got {n}; more multiply an overload")
        return INVALID
    return n


def _boolean(r: Reading, value: Any, path: str) -> Any:
    b = r.c.boolean(value, path)
    return INVALID if b is None else b


def _balance(r: Reading, value: Any, path: str) -> Any:
    names = r.hooks.balance
    if not isinstance(value, str):
        r.c.error(path, f"expected a policy name, got {kind(value)}; "
                  f"use one of {', '.join(sorted(names))}")
        return INVALID
    if value not in names:
        close = closest(value, names)
        hint = f"did you mean {close!r}? " if close else ""
        r.c.error(path, f"unknown balance policy {value!r}; {hint}"
                  f"known: {', '.join(sorted(names))}")
        return INVALID
    return value


BACKEND_PROTOCOLS = ("http1", "h2", "h2c")


def _backend_protocol(r: Reading, value: Any, path: str) -> Any:
    if value not in BACKEND_PROTOCOLS:
        close = closest(value, BACKEND_PROTOCOLS)
        hint = f"did you mean {close!r}? " if close else ""
        r.c.error(path, f"unknown backend protocol {value!r}; {hint}use http1 (the default), "
                  "h2 (HTTP/2 over TLS with backend_tls) or h2c (HTTP/2 in the clear)")
        return INVALID
    return value


def _sum_backend_protocol(p: Policy, mode: str) -> str | None:
    if mode == "http" and p.backend_protocol != "http1":
        return f"{p.backend_protocol} to backends"
    return None


def _sticky_cookie(r: Reading, value: Any, path: str) -> Any:
    v = r.c.string(value, path, _COOKIE_NAME,
                   "a cookie name is 1 to 64 token characters, e.g. route or SERVERID")
    return INVALID if v is None else v


def _hash_key(r: Reading, value: Any, path: str) -> Any:
    v = r.c.string(value, path, _HASH_KEY,
                   "use source, header:NAME or cookie:NAME (what `balance: hash` hashes)")
    return INVALID if v is None else v


def _zone_threshold(r: Reading, value: Any, path: str) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    r.c.error(path, f"expected a number above 0 (in-zone load, e.g. 0.8), got {kind(value)}")
    return INVALID


def _subset(r: Reading, value: Any, path: str) -> Any:
    """subset: 12 | auto | {size: 12 | auto}; 0 or null: every backend."""
    if isinstance(value, dict):
        r.c.keys(value, path, ("size",))
        value = value.get("size")
    if value is None or value == 0:
        return 0
    if value == "auto":
        return -1
    n = r.c.integer(value, path, 1)
    return n if isinstance(n, int) else INVALID


def _panic_threshold(r: Reading, value: Any, path: str) -> Any:
    share = read_share(r.c, value, path, "0.5 or 50%")
    return INVALID if share is None else share


def _max_body(r: Reading, value: Any, path: str) -> Any:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        r.c.error(path, f"{e} (or null for no limit)")
        return INVALID


def _hsts(r: Reading, value: Any, path: str) -> Any:
    """hsts: true (one year) | false | a duration (max-age)."""
    if value is True:
        return 31536000
    if value is False or value is None:
        return 0
    d = r.c.duration(value, path)
    return INVALID if d is None else int(d)


def _proxy_protocol(r: Reading, value: Any, path: str) -> Any:
    version = proxy_protocol_version(value)
    if version is None:
        r.c.error(path, f"expected 1 or v1, 2 or v2, or false (none), got {kind(value)}; "
                  "the PROXY protocol version backends expect")
        return INVALID
    return version


def _health_check(r: Reading, value: Any, path: str) -> Any:
    return read_health_check(r.c, value, path, r.base.health_check)


def _outlier(r: Reading, value: Any, path: str) -> Any:
    return read_outlier(r.c, value, path, r.base.outlier)


def _retry_budget(r: Reading, value: Any, path: str) -> Any:
    return read_retry_budget(r.c, value, path, r.base.retry_budget)


def _hooked(name: str) -> Reader:
    """A key parsed by the hook `name` (edgelb's parser); its warnings (e.g. a weak password
    hash) are kept."""
    def read(r: Reading, value: Any, path: str) -> Any:
        parse: ValueParser = getattr(r.hooks, name)
        parsed, errors = parse(value, path)
        if errors:
            r.c.errors.extend(errors)
            return INVALID
        r.c.warnings.extend(getattr(parsed, "warnings", ()) or ())
        return parsed
    return read


# -- summaries ----------------------------------------------------------------------------------

def _sum_cap(p: Policy, mode: str) -> str | None:
    if p.max_inflight is None and not p.adaptive:
        return None
    cap = f"max_inflight {p.max_inflight or 'none'}" + (" (adaptive)" if p.adaptive else "")
    return f"{cap}, queue {p.queue_size} for {fmt_seconds(p.queue_timeout)}"


def _sum_health(p: Policy, mode: str) -> str | None:
    hc = p.health_check
    if hc is None:
        return None
    what = {"http": f"{hc.method} {hc.path}", "tcp": "tcp connect",
            "grpc": f"grpc.health.v1 {hc.service or '(server)'}"}.get(hc.kind, hc.kind)
    return f"health {what} every {fmt_seconds(hc.interval)} (rise {hc.rise}, fall {hc.fall})"


def _sum_outlier(p: Policy, mode: str) -> str | None:
    o = p.outlier
    if o is None:
        return None
    return (f"eject after {o.failures} failures for {fmt_seconds(o.ejection)}+ "
            f"(at most {o.max_ejected:.0%})")


def _sum_seconds(label: str, field: str, only: str = "") -> Summary:
    def show(p: Policy, mode: str) -> str | None:
        if only and mode != only:
            return None
        return f"{label} {fmt_seconds(getattr(p, field))}"
    return show


def _sum_proxy(p: Policy, mode: str) -> str | None:
    if mode == "tcp" and p.proxy_protocol:
        return f"PROXY protocol v{p.proxy_protocol} to backends"
    return None


_D = Policy()

# In the order of the README table; the summary shows its parts in this order too.
KEYS: tuple[Key, ...] = (
    Key("balance", _D.balance, "how a backend is picked (see Routing and balancing)",
        {"type": "string"}, _balance, hook="balance",
        summary=lambda p, mode: f"balance {p.balance}"),
    Key("hash_key", _D.hash_key, "what `balance: hash` hashes: source, header:NAME or "
        "cookie:NAME", {"type": "string", "pattern": _HASH_KEY.pattern}, _hash_key),
    Key("sticky", _D.sticky, "pin a client to its backend with a cookie", BOOLEAN, _boolean),
    Key("sticky_cookie", _D.sticky_cookie, "the name of `sticky`'s cookie",
        {"type": "string", "pattern": _COOKIE_NAME.pattern}, _sticky_cookie),
    Key("zone_aware", _D.zone_aware, "keep traffic in the proxy's zone while it has room",
        BOOLEAN, _boolean),
    Key("zone_threshold", _D.zone_threshold, "in-zone load (in-flight per capacity) above "
        "which traffic spills to every zone", {"type": "number", "exclusiveMinimum": 0},
        _zone_threshold),
    Key("subset", _D.subset, "balance over a deterministic subset of K backends per replica "
        "(K, auto, or 0 for all)",
        {"anyOf": [{"type": ["integer", "null"], "minimum": 0}, {"const": "auto"},
                   {"const": False},
                   strict_object({"size": {"anyOf": [{"type": ["integer", "null"],
                                                      "minimum": 0}, {"const": "auto"}]}})]},
        _subset),
    Key("slow_start", _D.slow_start, "a backend added to a running pool ramps 10% -> 100% "
        "of its weight over this", DURATION, _duration(positive=False)),
    Key("max_inflight", _D.max_inflight, "per-backend cap on concurrent requests (or "
        "connections), scaled by weight; null: no cap", integer(1, nullable=True),
        _integer(1, nullable=True), summary=_sum_cap),
    Key("adaptive", _D.adaptive, "the cap follows a gradient controller on observed latency",
        BOOLEAN, _boolean),
    Key("queue_size", _D.queue_size, "requests that may wait while every backend is at its cap",
        integer(0), _integer(0)),
    Key("queue_timeout", _D.queue_timeout, "how long a request waits for a backend under its "
        "cap (then 503)", DURATION, _duration(positive=False)),
    Key("connect_timeout", _D.connect_timeout, "to connect to a backend", DURATION,
        _duration(positive=True), summary=_sum_seconds("connect", "connect_timeout")),
    Key("header_timeout", _D.header_timeout, "a client must send its request head within "
        "this", DURATION, _duration(positive=True)),
    Key("response_timeout", _D.response_timeout, "from request sent to response head",
        DURATION, _duration(positive=True),
        summary=_sum_seconds("response", "response_timeout", only="http")),
    Key("idle_timeout", _D.idle_timeout, "keep-alive connections, both sides", DURATION,
        _duration(positive=True), summary=_sum_seconds("idle", "idle_timeout")),
    Key("tunnel_timeout", _D.tunnel_timeout, "an upgraded (WebSocket) connection silent this "
        "long closes", DURATION, _duration(positive=True), shown="1h"),
    Key("max_idle", _D.max_idle, "idle keep-alive connections kept per backend", integer(0),
        _integer(0)),
    Key("proxy_protocol", _D.proxy_protocol, "tcp mode: send a PROXY protocol header (1 or 2) "
        "to the backends; false: none",
        {"anyOf": [{"type": ["boolean", "null"]}, {"enum": [0, 1, 2]},
                   {"type": "string", "pattern": "^\\s*(?:[0-2]|[vV][12])\\s*$"}]},
        _proxy_protocol, shown="false", summary=_sum_proxy),
    Key("backend_protocol", _D.backend_protocol, "http mode: what the backends speak: http1, "
        "h2 (TLS with ALPN h2: set backend_tls) or h2c; h2 and h2c multiplex calls on few "
        "connections (gRPC backends need one of them)", {"enum": list(BACKEND_PROTOCOLS)},
        _backend_protocol, summary=_sum_backend_protocol),
    Key("health_check", _D.health_check, "active checks {path, interval, timeout, rise, fall, "
        "type (http, tcp, grpc: grpc.health.v1 over h2c, h2 with backend_tls), method, status, "
        "host, service (grpc)}, merged over the defaults'; null: none", HEALTH_CHECK_JSON,
        _health_check, summary=_sum_health),
    Key("outlier", _D.outlier, "passive ejection {failures, kinds, ejection, max_ejection, "
        "max_ejected}; false: none", OUTLIER_JSON, _outlier,
        shown="{failures: 5, ejection: 30s}", summary=_sum_outlier),
    Key("panic_threshold", _D.panic_threshold, "below this healthy share, balance over the "
        "whole pool", SHARE, _panic_threshold),
    Key("retries", _D.retries, "extra attempts for an idempotent request that failed (at most "
        "5)", {"type": "integer", "minimum": 0, "maximum": 5},
        _retries,
        summary=lambda p, mode: f"retries {p.retries}" if mode == "http" else None),
    Key("retry_budget", _D.retry_budget, "retries in flight at most {ratio} of the requests "
        "in flight, or {min}", RETRY_BUDGET_JSON, _retry_budget, shown="{ratio: 0.2, min: 3}"),
    Key("max_body", _D.max_body, "bytes a request body may have (413 beyond), e.g. 10MiB; "
        "null: no limit", {"anyOf": [{"type": "null"}, SIZE]}, _max_body),
    Key("redirect_to_https", _D.redirect_to_https, "answer plain-HTTP requests with a 308 to "
        "https", BOOLEAN, _boolean),
    Key("hsts", _D.hsts, "Strict-Transport-Security max-age on https responses (a duration; "
        "true: one year)", {"anyOf": [{"type": ["boolean", "null"]}, DURATION]}, _hsts,
        shown="false"),
    Key("sources", _D.sources, "client addresses allowed: [CIDR, ...] or {allow, deny}",
        SOURCES_JSON, _hooked("sources"), hook="sources"),
    Key("auth", _D.auth, "basic auth {realm, users: [\"user:HASH\"], cache_ttl, max_failures, "
        "failure_window}", AUTH_JSON, _hooked("auth"), hook="auth"),
    Key("backend_tls", _D.backend_tls, "speak TLS to the backends: true, or {verify, ca, sni, "
        "cert, key}", BACKEND_TLS_JSON, _hooked("backend_tls"), hook="backend_tls"),
)

KEY_NAMES: tuple[str, ...] = tuple(k.name for k in KEYS)


class PolicySchema:
    """The declaration with its hooks: reads, summarises and exports the per-service keys."""

    def __init__(self, hooks: Hooks, keys: tuple[Key, ...] = KEYS) -> None:
        self.hooks = hooks
        self.keys = keys
        self.names = tuple(k.name for k in keys)
        self.by_name = {k.name: k for k in keys}

    def read(self, c: Checker, m: dict, path: str, base: Policy) -> dict[str, Any]:
        """The keys set in mapping `m`, validated (errors into `c`, in the order the keys are
        written); invalid ones are left out, other keys are the caller's."""
        r = Reading(c, base, self.hooks)
        out: dict[str, Any] = {}
        for name, value in m.items():
            key = self.by_name.get(name) if isinstance(name, str) else None
            if key is not None:
                parsed = key.read(r, value, join(path, name))
                if parsed is not INVALID:
                    out[name] = parsed
        return out

    def from_annotations(self, annotations: dict[str, str], base: Policy,
                         prefix: str = "edgelb.io/",
                         skip: Iterable[str] = ("port", "mode", "weight"),
                         ) -> tuple[Policy, list[str]]:
        """The keys set as annotations `<prefix><key>` (dashes or underscores, e.g.
        `edgelb.io/max-inflight: "64"`), validated exactly as in the config file, over `base`.

        Each value is read as a YAML scalar or flow mapping (`"64"`, `"true"`, `"250ms"`,
        `"{path: /healthz, interval: 2s}"`). Returns the policy and the errors, each naming the
        annotation; with errors the policy is `base` (the caller skips the object). `skip`:
        keys the watcher reads itself (exposure and capacity)."""
        doc: dict[str, Any] = {}
        errs: list[str] = []
        for name, raw in annotations.items():
            if not name.startswith(prefix):
                continue
            key = name[len(prefix):].replace("-", "_")
            if key in skip:
                continue
            if key not in self.names:
                close = closest(key, self.names)
                hint = f"did you mean {prefix}{close.replace('_', '-')}?" if close else (
                    "known: " + ", ".join(prefix + k.replace("_", "-") for k in self.names))
                errs.append(f"{name}: unknown annotation; {hint}")
                continue
            try:
                value = yaml.safe_load(raw) if isinstance(raw, str) else raw
            except yaml.YAMLError:
                errs.append(f"{name}: {raw!r} is not a value edgelb can read; write e.g. "
                            "\"64\", \"true\", \"250ms\" or \"{path: /healthz}\"")
                continue
            doc[key] = value
        c = Checker()
        fields = self.read(c, doc, "", base)
        for err in c.errors:
            key, _, message = err.partition(": ")
            head, _, rest = key.partition(".")
            where = prefix + head.replace("_", "-") + (f" ({rest})" if rest else "")
            errs.append(f"{where}: {message}")
        if errs:
            return base, errs
        return dataclasses.replace(base, **fields), []

    def summary(self, policy: Policy, mode: str) -> str:
        """One line of a service's policy for `edgelb check`."""
        parts = (k.summary(policy, mode) for k in self.keys if k.summary is not None)
        return ", ".join(p for p in parts if p)

    def json_properties(self) -> dict[str, Any]:
        """The JSON Schema of each key, with its doc and default as written."""
        out: dict[str, Any] = {}
        for k in self.keys:
            prop = dict(k.json)
            if k.hook == "balance":
                prop = {"enum": sorted(self.hooks.balance)}
            prop["description"] = f"{k.doc} (default: {k.default_text()})"
            out[k.name] = prop
        return out

    def markdown(self) -> str:
        """The README table of the per-service keys."""
        rows = ["| key | default | meaning |", "|---|---|---|"]
        for k in self.keys:
            doc = k.doc
            if k.hook == "balance":
                doc += ": " + " \\| ".join(sorted(self.hooks.balance))
            rows.append(f"| `{k.name}` | `{k.default_text()}` | {doc} |")
        return "\n".join(rows) + "\n"
