"""Access control for a service: source-address allow/deny lists and HTTP basic auth.

Both checks run on the data path (per connection, per request), so each keeps a small bounded
cache: a source filter remembers its decision per address; credentials remember which
`Authorization` header values verified (never the ones that failed, so a wrong guess always
pays the full hash cost).

Password hashes are verified in pure Python: SHA-crypt (`$5$` SHA-256, `$6$` SHA-512, as made
by `mkpasswd -m sha-512`, `openssl passwd -6` and used in HAProxy userlists) following the
published algorithm, and `scrypt$N$r$p$salt$hash` through `hashlib.scrypt`. The `crypt` module
is not used: it is deprecated and removed in Python 3.13.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# ---------------------------------------------------------------------------------------------
# Source addresses

CIDR_EXAMPLE = "10.0.0.0/8, 192.168.1.7 or 2001:db8::/32"
SOURCE_KEYS = ("allow", "deny")
_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")
_SPLIT = re.compile(r"[\s,]+")


def _as_ipv4(net: Network) -> Network:
    """`::ffff:a.b.c.d/n` (n >= 96) is the IPv4 network a.b.c.d/(n-96); anything else as is."""
    if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(_MAPPED_V4):  # type: ignore[arg-type]
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def parse_cidrs(values: Any, path: str) -> tuple[list[Network], list[str]]:
    """CIDRs from a list of strings, or from one string separated by spaces or commas (as in
    marathon-lb's `HAPROXY_{n}_BACKEND_NETWORK_ALLOWED_ACL`). A bare address is a /32 or /128;
    host bits may be set (`10.1.2.3/8` is `10.0.0.0/8`). Returns (networks, errors); each error
    names `path[i]` and says how to write the item."""
    if values is None:
        return [], []
    if isinstance(values, str):
        items: list[Any] = [v for v in _SPLIT.split(values.strip()) if v]
    elif isinstance(values, (list, tuple)):
        items = list(values)
    else:
        return [], [f"{path}: expected a list of CIDRs (e.g. [{CIDR_EXAMPLE}]), got "
                    f"{type(values).__name__}"]
    nets: list[Network] = []
    errors: list[str] = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            nets.append(_as_ipv4(item))
            continue
        if not isinstance(item, str) or not item.strip():
            errors.append(f"{where}: expected a CIDR string such as {CIDR_EXAMPLE}, got "
                          f"{item!r}")
            continue
        try:
            net = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            errors.append(f"{where}: {item!r} is not an IP address or CIDR; write it like "
                          f"{CIDR_EXAMPLE}")
            continue
        nets.append(_as_ipv4(net))
    return nets, errors


def _ranges(nets: Iterable[Network], version: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sorted, disjoint [start, end] integer ranges covering the `version` networks."""
    same = [n for n in nets if n.version == version]
    merged = list(ipaddress.collapse_addresses(same))  # type: ignore[arg-type]
    return (tuple(int(n.network_address) for n in merged),
            tuple(int(n.broadcast_address) for n in merged))


def _within(ranges: tuple[tuple[int, ...], tuple[int, ...]], x: int) -> bool:
    starts, ends = ranges
    i = bisect.bisect_right(starts, x) - 1
    return i >= 0 and x <= ends[i]


class SourceFilter:
    """Which client addresses may reach a service.

    A denied address is refused even if an allow entry covers it; an empty allow list allows
    every address that is not denied. IPv4-mapped IPv6 clients (`::ffff:10.0.0.1`, what a
    dual-stack socket reports) are matched as IPv4. An address that does not parse (e.g. a
    Unix socket peer) is refused by an active filter.
    """

    __slots__ = ("_cache", "_cache_size", "_key", "active", "allow", "deny")

    def __init__(self, allow: Sequence[str | Network] = (), deny: Sequence[str | Network] = (),
                 cache_size: int = 4096) -> None:
        allow_nets, errors = parse_cidrs(list(allow), "allow")
        deny_nets, more = parse_cidrs(list(deny), "deny")
        if errors or more:
            raise ValueError("; ".join(errors + more))
        self.allow: tuple[Network, ...] = tuple(allow_nets)
        self.deny: tuple[Network, ...] = tuple(deny_nets)
        self._key = (_ranges(allow_nets, 4), _ranges(allow_nets, 6),
                     _ranges(deny_nets, 4), _ranges(deny_nets, 6))
        self.active = bool(allow_nets or deny_nets)  # False: permits() is always True
        self._cache: dict[str | bytes, bool] = {}
        self._cache_size = cache_size

    def permits(self, ip: str | bytes) -> bool:
        """True if the client at `ip` (text form; bytes are ASCII text, not packed) may
        connect. Cached per address value; the cache is emptied when it is full."""
        if not self.active:
            return True
        cache = self._cache
        ok = cache.get(ip)
        if ok is None:
            ok = self._decide(ip)
            if len(cache) >= self._cache_size:
                cache.clear()
            cache[ip] = ok
        return ok

    def _decide(self, ip: str | bytes) -> bool:
        try:
            text = ip.decode("ascii") if isinstance(ip, bytes) else ip
            addr = ipaddress.ip_address(text)
        except (ValueError, UnicodeDecodeError):
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:  # type: ignore[union-attr]
            addr = addr.ipv4_mapped  # type: ignore[union-attr]
        x = int(addr)
        allow4, allow6, deny4, deny6 = self._key
        if _within(deny4 if addr.version == 4 else deny6, x):
            return False
        if not self.allow:
            return True
        return _within(allow4 if addr.version == 4 else allow6, x)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SourceFilter) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return (f"SourceFilter(allow={[str(n) for n in self.allow]}, "
                f"deny={[str(n) for n in self.deny]})")


def parse_source_filter(value: Any, path: str) -> tuple[SourceFilter | None, list[str]]:
    """A config value `{allow: [CIDR...], deny: [CIDR...]}`, or a bare list / marathon-lb
    string of allowed CIDRs. None (or both lists empty) gives no filter."""
    if value is None:
        return None, []
    if isinstance(value, dict):
        errors = [f"{path}.{k}: unknown key; valid keys: {', '.join(SOURCE_KEYS)}"
                  for k in value if k not in SOURCE_KEYS]
        allow, e1 = parse_cidrs(value.get("allow"), f"{path}.allow")
        deny, e2 = parse_cidrs(value.get("deny"), f"{path}.deny")
        errors += e1 + e2
    elif isinstance(value, (str, list)):
        allow, errors = parse_cidrs(value, path)
        deny = []
    else:
        return None, [f"{path}: expected {{allow: [CIDR...], deny: [CIDR...]}} or a list of "
                      f"allowed CIDRs, got {type(value).__name__}"]
    if errors:
        return None, errors
    if not allow and not deny:
        return None, []
    return SourceFilter(allow, deny), []


# ---------------------------------------------------------------------------------------------
# Password hashes

_CRYPT64 = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ROUNDS_DEFAULT = 5000
ROUNDS_MIN = 1000
ROUNDS_MAX = 999_999_999  # what the algorithm allows
ROUNDS_LIMIT = 200_000  # what edgelb accepts: each check of a new header blocks the event loop
SCRYPT_MAX_MEMORY = 256 * 1024 * 1024

# Byte order of the final digest in the text form: groups of digest indexes, most significant
# byte first, each group written as little-endian 6-bit characters.
_SHA256_ORDER = ((0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14), (15, 25, 5),
                 (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29), (31, 30))
_SHA512_ORDER = ((0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26),
                 (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10),
                 (53, 11, 32), (12, 33, 54), (34, 55, 13), (56, 14, 35), (15, 36, 57),
                 (37, 58, 16), (59, 17, 38), (18, 39, 60), (40, 61, 19), (62, 20, 41), (63,))
_VARIANTS: dict[str, tuple[Callable[..., Any], tuple[tuple[int, ...], ...], int]] = {
    "5": (hashlib.sha256, _SHA256_ORDER, 43),
    "6": (hashlib.sha512, _SHA512_ORDER, 86),
}
_SHA_CRYPT = re.compile(r"^\$([56])\$(?:rounds=([0-9]+)\$)?([^$]*)(?:\$(.*))?$", re.S)

MKPASSWD_HINT = "`mkpasswd -m sha-512` (or `openssl passwd -6`)"
SCRYPT_ONE_LINER = (
    "python3 -c 'import base64,getpass,hashlib,os;s=os.urandom(16);"
    "e=lambda b:base64.b64encode(b).decode();"
    "print(\"scrypt$16384$8$1$\"+e(s)+\"$\"+e(hashlib.scrypt(getpass.getpass().encode(),"
    "salt=s,n=16384,r=8,p=1)))'"
)
HASH_HINT = f"store a hash made with {MKPASSWD_HINT}, or for scrypt with `{SCRYPT_ONE_LINER}`"


def _repeat(block: bytes, n: int) -> bytes:
    """`block` repeated and cut to exactly n bytes."""
    return (block * (n // len(block) + 1))[:n]


def _crypt64(digest: bytes, order: tuple[tuple[int, ...], ...]) -> bytes:
    out = bytearray()
    for group in order:
        w = 0
        for i in group:
            w = (w << 8) | digest[i]
        for _ in range((len(group) * 8 + 5) // 6):
            out.append(_CRYPT64[w & 0x3F])
            w >>= 6
    return bytes(out)


def _sha_crypt_digest(variant: str, password: bytes, salt: bytes, rounds: int) -> bytes:
    """The text-encoded SHA-crypt hash of `password` (the part after the last `$`)."""
    h, order, _ = _VARIANTS[variant]
    n = len(password)
    b = h(password + salt + password).digest()
    parts = [password, salt, _repeat(b, n)]
    bit = n
    while bit:  # one block per bit of the password length, low bit first
        parts.append(b if bit & 1 else password)
        bit >>= 1
    a = h(b"".join(parts)).digest()
    p = _repeat(h(password * n).digest(), n)
    s = _repeat(h(salt * (16 + a[0])).digest(), len(salt))
    # The middle of round i holds S if i % 3 and P if i % 7; odd rounds put P first.
    middles = [(s if i % 3 else b"") + (p if i % 7 else b"") for i in range(42)]
    c = a
    for i in range(rounds):
        mid = middles[i % 42]
        c = h(p + mid + c).digest() if i & 1 else h(c + mid + p).digest()
    return _crypt64(c, order)


def sha_crypt(password: str | bytes, setting: str) -> str:
    """crypt(3) for `$5$` / `$6$`: `setting` is `$6$[rounds=N$]salt[$...]`; returns the whole
    hash string. Salt is cut to 16 characters and rounds clamped to 1000..999999999, as the
    algorithm specifies."""
    m = _SHA_CRYPT.match(setting)
    if m is None:
        raise ValueError("a SHA-crypt setting starts with $5$ or $6$, e.g. $6$saltsalt")
    variant, rounds_text, salt_text = m.group(1), m.group(2), m.group(3)
    salt = salt_text.encode("utf-8")[:16]
    rounds = ROUNDS_DEFAULT
    prefix = f"${variant}$"
    if rounds_text is not None:
        rounds = max(ROUNDS_MIN, min(int(rounds_text), ROUNDS_MAX))
        prefix += f"rounds={rounds}$"
    pw = password.encode("utf-8") if isinstance(password, str) else password
    digest = _sha_crypt_digest(variant, pw, salt, rounds)
    return prefix + salt.decode("utf-8", "surrogateescape") + "$" + digest.decode("ascii")


def scrypt_hash(password: str | bytes, n: int = 16384, r: int = 8, p: int = 1,
                salt: bytes | None = None) -> str:
    """A `scrypt$N$r$p$salt_b64$hash_b64` string for `password` (random 16-byte salt)."""
    pw = password.encode("utf-8") if isinstance(password, str) else password
    salt = os.urandom(16) if salt is None else salt
    dk = hashlib.scrypt(pw, salt=salt, n=n, r=r, p=p, maxmem=_scrypt_maxmem(n, r, p), dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(dk).decode()}"


def _scrypt_maxmem(n: int, r: int, p: int) -> int:
    return 128 * r * (n + 2) + 128 * r * p + (1 << 20)


class _Verifier:
    """One stored hash; `verify(password)` recomputes it and compares in constant time."""

    __slots__ = ("compute", "expected")

    def __init__(self, compute: Callable[[bytes], bytes], expected: bytes) -> None:
        self.compute = compute
        self.expected = expected

    def verify(self, password: bytes) -> bool:
        return hmac.compare_digest(self.compute(password), self.expected)


def _sha_crypt_verifier(text: str) -> tuple[_Verifier | None, str]:
    m = _SHA_CRYPT.match(text)
    if m is None or m.group(4) is None:
        return None, "a SHA-crypt hash has the form $6$[rounds=N$]salt$hash"
    variant, rounds_text, salt_text, digest = m.groups()
    _, _, size = _VARIANTS[variant]
    if len(salt_text.encode("utf-8")) > 16:
        return None, "the salt is longer than 16 characters, so this hash is damaged; re-hash"
    if len(digest) != size or not set(digest.encode("ascii", "replace")) <= set(_CRYPT64):
        return None, (f"the hash part after the salt must be {size} characters of "
                      f"[./0-9A-Za-z]; the value looks cut or damaged, re-hash the password")
    rounds = ROUNDS_DEFAULT
    if rounds_text is not None:
        rounds = int(rounds_text)
        if not ROUNDS_MIN <= rounds <= ROUNDS_MAX:
            return None, f"rounds={rounds} is outside {ROUNDS_MIN}..{ROUNDS_MAX}; re-hash"
        if rounds > ROUNDS_LIMIT:
            return None, (f"rounds={rounds} is too slow to verify on the request path (at most "
                          f"{ROUNDS_LIMIT}); re-hash with the default ({MKPASSWD_HINT})")
    salt = salt_text.encode("utf-8")

    def compute(password: bytes) -> bytes:
        return _sha_crypt_digest(variant, password, salt, rounds)

    return _Verifier(compute, digest.encode("ascii")), ""


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _scrypt_verifier(text: str) -> tuple[_Verifier | None, str]:
    form = "scrypt$N$r$p$salt_base64$hash_base64"
    parts = text.split("$")
    if len(parts) != 6:
        return None, f"a scrypt hash has the form {form}; make one with {SCRYPT_ONE_LINER}"
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None, f"N, r and p of {form} must be integers, e.g. scrypt$16384$8$1$..."
    if n < 2 or n & (n - 1) or r < 1 or p < 1:
        return None, "scrypt needs N a power of 2 above 1 and r, p at least 1 (e.g. 16384 8 1)"
    if 128 * r * n > SCRYPT_MAX_MEMORY or n * r * p > 1 << 24:
        return None, (f"scrypt N={n} r={r} p={p} costs too much memory or time per check; "
                      "use N=16384 r=8 p=1")
    salt, expected = _b64(parts[4]), _b64(parts[5])
    if not salt or expected is None or len(expected) < 16:
        return None, (f"the salt and hash of {form} must be base64 (the hash at least 16 "
                      "bytes); re-hash the password")
    maxmem = _scrypt_maxmem(n, r, p)

    def compute(password: bytes) -> bytes:
        return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem,
                              dklen=len(expected))

    return _Verifier(compute, expected), ""


_UNSUPPORTED = (
    ("$1$", "MD5-crypt"), ("$apr1$", "Apache MD5"), ("$2", "bcrypt"), ("$y$", "yescrypt"),
    ("$7$", "scrypt in crypt(3) form"), ("$gy$", "gost-yescrypt"), ("$argon2", "Argon2"),
    ("{SHA}", "htpasswd SHA-1"), ("{SSHA}", "salted SHA-1"), ("$pbkdf2", "PBKDF2"),
)


def _verifier(text: str) -> tuple[_Verifier | None, str]:
    """The verifier for a stored hash, or (None, what is wrong and how to fix it). The message
    never repeats the value: it may be a plain-text password."""
    if text.startswith(("$5$", "$6$")):
        return _sha_crypt_verifier(text)
    if text.startswith("scrypt$"):
        return _scrypt_verifier(text)
    for prefix, name in _UNSUPPORTED:
        if text.startswith(prefix):
            return None, (f"{name} hashes ({prefix}...) are not supported; use SHA-512 crypt: "
                          f"{HASH_HINT}")
    if text.startswith("$"):
        return None, f"unknown hash scheme; {HASH_HINT}"
    return None, f"this looks like a plain-text password, which edgelb refuses; {HASH_HINT}"


# ---------------------------------------------------------------------------------------------
# Basic auth

DEFAULT_REALM = "edgelb"
AUTH_KEYS = ("realm", "users")
MAX_AUTHORIZATION = 4096  # longer header values are refused before any hashing
_REALM = re.compile(r"^[\x20-\x7e]+$")
_USER = re.compile(r"^[^\x00-\x1f\x7f:]+$")


def challenge(realm: str) -> bytes:
    """The header line (with its CRLF) a 401 response carries to ask for basic auth."""
    quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
    return f'www-authenticate: Basic realm="{quoted}", charset="UTF-8"\r\n'.encode()


def parse_basic(value: bytes | str) -> tuple[str, bytes] | None:
    """(user, password) from an `Authorization: Basic base64(user:password)` value, or None
    when the scheme is not Basic, the base64 is bad, there is no colon or the user is not
    UTF-8. The scheme is case-insensitive; missing base64 padding is tolerated."""
    if isinstance(value, str):
        try:
            value = value.encode("latin-1")
        except UnicodeEncodeError:
            return None
    scheme, _, token = value.strip(b" \t").partition(b" ")
    token = token.strip(b" \t")
    if scheme.lower() != b"basic" or not token:
        return None
    if len(token) % 4:
        token += b"=" * (-len(token) % 4)
    try:
        decoded = binascii.a2b_base64(token, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


def _parse_users(entries: Any, path: str) -> tuple[dict[str, _Verifier], list[str]]:
    if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
        return {}, [f"{path}: expected a list of \"user:HASH\" strings, got "
                    f"{type(entries).__name__}"]
    if not entries:
        return {}, [f"{path}: list at least one \"user:HASH\" entry, or remove the auth key"]
    users: dict[str, _Verifier] = {}
    errors: list[str] = []
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        if not isinstance(entry, str):
            errors.append(f"{where}: expected a \"user:HASH\" string, got "
                          f"{type(entry).__name__}")
            continue
        user, colon, stored = entry.partition(":")
        if not colon or not stored:
            errors.append(f"{where}: expected \"user:HASH\" (a user name, a colon, a password "
                          f"hash); {HASH_HINT}")
            continue
        if not _USER.match(user):
            errors.append(f"{where}: the user name must be non-empty, without control "
                          "characters")
            continue
        if user in users:
            errors.append(f"{where}: user {user!r} is listed twice; keep one entry")
            continue
        verifier, problem = _verifier(stored)
        if verifier is None:
            errors.append(f"{where} (user {user!r}): {problem}")
            continue
        users[user] = verifier
    return users, errors


class Credentials:
    """The users allowed through basic auth on one service, and their realm.

    `check()` returns the user a header value authenticates, or None. Successful header values
    are cached (bounded, emptied when full); failures are never cached. `verifications` counts
    the hashes computed, which is what a cache hit saves.
    """

    __slots__ = ("_cache", "_cache_size", "_decoy", "_key", "_users", "challenge_header",
                 "realm", "verifications")

    def __init__(self, realm: str, users: Sequence[str], cache_size: int = 1024) -> None:
        parsed, errors = _parse_users(list(users), "users")
        if not _REALM.match(realm):
            errors.insert(0, "realm: must be non-empty printable ASCII")
        if errors:
            raise ValueError("; ".join(errors))
        self.realm = realm
        self._users = {name.encode("utf-8"): (name, v) for name, v in parsed.items()}
        self._decoy = next(iter(parsed.values()))  # hashed for unknown users: same timing
        self._key = (realm, tuple(sorted(users)))
        self.challenge_header = challenge(realm)
        self._cache: dict[bytes | str, str] = {}
        self._cache_size = cache_size
        self.verifications = 0

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self._users.values())

    def cached(self, authorization: bytes | str | None) -> str | None:
        """The user for an already verified header value, without hashing (the fast path)."""
        return self._cache.get(authorization) if authorization is not None else None

    def check(self, authorization: bytes | str | None) -> str | None:
        """The user that `authorization` (the header's value) authenticates, or None."""
        if authorization is None:
            return None
        user = self._cache.get(authorization)
        if user is not None:
            return user
        if len(authorization) > MAX_AUTHORIZATION:
            return None
        parsed = parse_basic(authorization)
        if parsed is None or not parsed[1]:  # an empty password never authenticates
            return None
        name, password = parsed
        entry = self._users.get(name.encode("utf-8"))
        self.verifications += 1
        if entry is None:
            self._decoy.verify(password)
            return None
        if not entry[1].verify(password):
            return None
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[authorization] = entry[0]
        return entry[0]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Credentials) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Credentials(realm={self.realm!r}, users={list(self.users)})"


def parse_auth(value: Any, path: str) -> tuple[Credentials | None, list[str]]:
    """Credentials from `{realm: shop, users: ["alice:$6$...", ...]}` (realm optional) or from
    marathon-lb's `HAPROXY_{n}_AUTH` string `realm:user:HASH`. None gives no auth. Errors name
    the item and the fix, and never repeat a password."""
    if value is None:
        return None, []
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) != 3:
            return None, [f"{path}: expected realm:user:HASH (marathon-lb's HAPROXY_n_AUTH), "
                          f"e.g. shop:alice:$6$...; {HASH_HINT}"]
        realm, entries, upath = parts[0], [f"{parts[1]}:{parts[2]}"], path
        errors: list[str] = []
    elif isinstance(value, dict):
        errors = [f"{path}.{k}: unknown key; valid keys: {', '.join(AUTH_KEYS)}"
                  for k in value if k not in AUTH_KEYS]
        realm = value.get("realm", DEFAULT_REALM)
        if "users" not in value:
            errors.append(f"{path}: missing users: list \"user:HASH\" entries; {HASH_HINT}")
        entries, upath = value.get("users"), f"{path}.users"
    else:
        return None, [f"{path}: expected {{realm: NAME, users: [\"user:HASH\", ...]}} or "
                      f"realm:user:HASH, got {type(value).__name__}"]
    if not isinstance(realm, str) or not _REALM.match(realm):
        errors.append(f"{path}.realm: expected a non-empty printable ASCII name, e.g. shop")
    if entries is not None:
        if upath == path:  # marathon-lb form: name the label, not a list item
            _, user_errors = _parse_users(entries, path)
            user_errors = [e.replace(f"{path}[0]", path, 1) for e in user_errors]
        else:
            _, user_errors = _parse_users(entries, upath)
        errors += user_errors
    if errors:
        return None, errors
    return Credentials(realm, entries), []
