"""marathon-lb's label values, read one at a time: each reader returns a value or an error
text that says how to write the label. Nothing here raises on a string, however odd.

HAProxy's own syntax appears in three labels: `HAPROXY_{n}_BALANCE` (an algorithm name) and
the `HAPROXY_{n}_BACKEND_*_OPTIONS` templates, of which only plain `timeout <name> <value>`
lines have an edgelb meaning (`option_lines`).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

# HAPROXY_{n}_<NAME> and EDGELB_{n}_<KEY>: n a port index without leading zeros
PORT_LABEL = re.compile(r"^HAPROXY_(0|[1-9][0-9]{0,3})_([A-Z0-9_]+)$")
EDGELB_LABEL = re.compile(r"^EDGELB_(0|[1-9][0-9]{0,3})_([A-Z0-9_]+)$")
EDGELB_PREFIX = "EDGELB_"
HAPROXY_PREFIX = "HAPROXY_"

GROUP = "HAPROXY_GROUP"
DEPLOYMENT_PREFIX = "HAPROXY_DEPLOYMENT_"

# The per-port labels edgelb reads (HAPROXY_{n}_<name>); every other HAPROXY_{n}_* label is a
# raw template or a knob edgelb has no equivalent for, reported per app as unsupported.
MAPPED = frozenset({
    "GROUP", "PORT", "BIND_ADDR", "ENABLED", "MODE", "VHOST", "PATH", "BALANCE", "STICKY",
    "REDIRECT_TO_HTTPS", "USE_HSTS", "SSL_CERT", "AUTH", "BACKEND_WEIGHT",
    "BACKEND_SERVER_OPTIONS", "BACKEND_HTTP_OPTIONS", "BACKEND_TCP_OPTIONS",
    "BACKEND_NETWORK_ALLOWED_ACL", "HTTP_BACKEND_PROXYPASS_PATH", "HTTP_BACKEND_REVPROXY_PATH",
})
# Options templates whose `timeout` lines are read (the mode a template is used in: "" both)
OPTION_LABELS = {"BACKEND_SERVER_OPTIONS": "", "BACKEND_HTTP_OPTIONS": "http",
                 "BACKEND_TCP_OPTIONS": "tcp"}
REWRITE_LABELS = ("HTTP_BACKEND_PROXYPASS_PATH", "HTTP_BACKEND_REVPROXY_PATH")

# marathon-lb's HAPROXY_BACKEND_HSTS_OPTIONS sends max-age=15768000 (six months): kept
HSTS_MAX_AGE = 15768000

_TRUE = frozenset({"true", "yes", "y", "t", "1", "on"})
_FALSE = frozenset({"false", "no", "n", "f", "0", "off"})
_HOST_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"^(\*\.)?{_HOST_LABEL}(\.{_HOST_LABEL})*$")
_BAD_PATH = re.compile(r"[\s?#\x00-\x1f\x7f]")
_HAPROXY_TIME = re.compile(r"^([0-9]{1,12})(us|ms|s|m|h|d)?$")
_HDR = re.compile(r"^hdr\(\s*([!#$%&'*+.^_`|~0-9A-Za-z-]{1,128})\s*\)$")

# HAProxy `balance` algorithms edgelb maps (policy key -> value), and those it knows but has no
# equivalent for (the app keeps the defaults' balance and is told).
BALANCE = {
    "roundrobin": {"balance": "round-robin"},
    "static-rr": {"balance": "round-robin"},
    # HAProxy's leastconn is exactly edgelb's least-connections (fewest in flight per weight);
    # least-loaded also weighs latency, which a user who chose leastconn did not ask for
    "leastconn": {"balance": "least-connections"},
    "source": {"balance": "hash", "hash_key": "source"},
}
HAPROXY_ALGORITHMS = frozenset({"first", "uri", "url_param", "rdp-cookie", "random", "hash",
                                "hdr"})

# HAProxy timeout name -> the policy key it sets
TIMEOUTS = {
    "connect": "connect_timeout",
    "server": "response_timeout",
    "http-request": "header_timeout",
    "client": "idle_timeout",
    "http-keep-alive": "idle_timeout",
    "tunnel": "tunnel_timeout",
    "queue": "queue_timeout",
}
# lines of marathon-lb's default HAPROXY_BACKEND_HTTP_OPTIONS that edgelb does by itself
_BUILT_IN = (
    re.compile(r"^option\s+forwardfor$"),
    re.compile(r"^http-request\s+(add|set)-header\s+X-Forwarded-Proto\s+https\s+if\s+"
               r"\{\s*ssl_fc\s*\}$", re.I),
)


def split_list(value: str) -> list[str]:
    """A comma list: items stripped, empty ones dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_bool(value: str) -> bool | None:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    return None


def parse_port(value: str) -> int | None:
    v = value.strip()
    if not (v.isascii() and v.isdigit()) or len(v) > 5:
        return None
    n = int(v)
    return n if 1 <= n <= 65535 else None


def parse_int(value: str) -> int | None:
    v = value.strip()
    body = v[1:] if v[:1] in "+-" else v
    if not (body.isascii() and body.isdigit()) or len(body) > 9:
        return None
    return int(v)


def parse_bind_addr(value: str) -> str | None:
    """An IP address to bind (HAProxy's `*` is every IPv4 address)."""
    v = value.strip()
    if v in ("*", ""):
        return "0.0.0.0"
    if v.startswith("[") and v.endswith("]"):
        v = v[1:-1]
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        return None


def parse_vhosts(value: str) -> tuple[list[str], str]:
    """Host names of a comma list, lower-cased; ("", error) on the first bad one."""
    hosts: list[str] = []
    for item in split_list(value):
        host = item.lower().rstrip(".")
        if len(host) > 253 or not _HOST.match(host):
            return [], (f"{item!r} is not a host name; write names like app.example.com "
                        "(or *.example.com), separated by commas")
        if host not in hosts:
            hosts.append(host)
    if not hosts:
        return [], "is empty; write a host name such as app.example.com"
    return hosts, ""


def parse_path(value: str) -> tuple[str, str]:
    """A path prefix (marathon-lb's path_beg): (path, "") or ("", error)."""
    v = value.strip()
    if not v.startswith("/") or _BAD_PATH.search(v) or len(v) > 1024:
        return "", (f"{value!r} is not a path prefix; write one starting with /, without "
                    "spaces, ? or #, e.g. /api")
    return v, ""


@dataclass(frozen=True)
class Balance:
    """What `HAPROXY_{n}_BALANCE` gives: policy fields, or why not."""

    fields: dict[str, str] = field(default_factory=dict)
    unsupported: str = ""  # a HAProxy algorithm edgelb has no equivalent for
    error: str = ""  # not a HAProxy algorithm at all


def parse_balance(value: str) -> Balance:
    v = value.strip()
    low = v.lower()
    if low in BALANCE:
        return Balance(dict(BALANCE[low]))
    m = _HDR.match(v)
    if m:  # HAProxy hashes the header's value: edgelb's hash on header:NAME
        return Balance({"balance": "hash", "hash_key": f"header:{m.group(1)}"})
    word = re.split(r"[\s(]", low, maxsplit=1)[0]
    if word in HAPROXY_ALGORITHMS:
        return Balance(unsupported=(f"HAProxy's {word!r} algorithm has no edgelb equivalent; "
                                    "the defaults' balance is used (roundrobin, static-rr, "
                                    "leastconn, source and hdr(NAME) are mapped)"))
    return Balance(error=(f"{v!r} is not a balance algorithm; write roundrobin, leastconn, "
                          "source or hdr(NAME) (or EDGELB_n_BALANCE with an edgelb policy)"))


def haproxy_duration(value: str) -> str | None:
    """A HAProxy time (`30s`, `500`, `2m`; no unit is milliseconds) as an edgelb duration."""
    m = _HAPROXY_TIME.match(value.strip())
    if m is None:
        return None
    number, unit = m.group(1), m.group(2) or "ms"
    if unit == "us":
        return f"{int(number) / 1000}ms"
    return number + unit


@dataclass
class Options:
    """What the `HAPROXY_{n}_BACKEND_*_OPTIONS` labels of one port give."""

    fields: dict[str, str] = field(default_factory=dict)  # policy key -> duration text
    origin: dict[str, str] = field(default_factory=dict)  # policy key -> the label setting it
    unsupported: list[str] = field(default_factory=list)  # "LABEL: line"
    errors: list[str] = field(default_factory=list)


def _lines(text: str) -> Iterable[str]:
    """A template's lines: real newlines, or `\\n` written out in the label."""
    for line in text.replace("\\n", "\n").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def option_lines(labels: list[tuple[str, str]], into: Options) -> None:
    """Read (label name, text) pairs in order: plain timeout lines set policy keys (a later
    line wins), lines edgelb does by itself are dropped, the rest is reported."""
    for name, text in labels:
        for line in _lines(text):
            words = line.split()
            if len(words) == 3 and words[0] == "timeout" and words[1] in TIMEOUTS:
                duration = haproxy_duration(words[2])
                if duration is None:
                    into.errors.append(f"{name}: {line!r}: {words[2]!r} is not a HAProxy time; "
                                       "write e.g. 30s, 500ms or 500 (milliseconds)")
                else:
                    into.fields[TIMEOUTS[words[1]]] = duration
                    into.origin[TIMEOUTS[words[1]]] = f"{name} ({line})"
            elif not any(p.match(" ".join(words)) for p in _BUILT_IN):
                shown = line if len(line) <= 80 else line[:77] + "..."
                into.unsupported.append(f"{name}: {shown!r}")


def auth_value(value: str) -> tuple[str, str]:
    """`realm:user:HASH`, comma-separated for several users (`realm:user:HASH,user2:HASH` or
    each with its realm): the `auth` policy value as the config's mapping, in JSON (which the
    policy reader reads as YAML), or ("", error)."""
    items = split_list(value)
    if not items:
        return "", "is empty; write realm:user:HASH"
    realm = ""
    users: list[str] = []
    for i, item in enumerate(items):
        parts = item.split(":")
        if len(parts) == 3:
            if realm and parts[0] != realm:
                return "", (f"item {i + 1} names realm {parts[0]!r}, the first {realm!r}; one "
                            "realm per port")
            realm = parts[0]
            parts = parts[1:]
        elif len(parts) != 2 or i == 0:
            return "", (f"item {i + 1} is not realm:user:HASH (or user:HASH after the first); "
                        "write e.g. shop:alice:$2y$...")
        users.append(":".join(parts))
    return json.dumps({"realm": realm, "users": users}), ""


def annotation_key(key: str) -> str:
    """EDGELB_{n}_<KEY>'s KEY as a policy key (`MAX_INFLIGHT` -> `max_inflight`)."""
    return key.lower().replace("-", "_")
