"""Access control for a service: source-address allow/deny lists and HTTP basic auth.

Both checks run on the data path (per connection, per request). A source filter remembers its
decision per address (bounded). Basic auth never hashes on the event loop: `Credentials.admit`
answers at once from a bounded cache of verified `Authorization` values (cache_ttl), of
recently refused ones, or from the failure throttle per client address; anything else is
hashed in a small thread pool with a bounded number of verifications admitted (HASH_POOL), and
the request waits for the verdict.

Password hashes: bcrypt (`$2a$`, `$2b$`, `$2y$` as `htpasswd -B` makes them) through the
`bcrypt` package; SHA-crypt (`$5$` SHA-256, `$6$` SHA-512, as made by `mkpasswd -m sha-512`,
`openssl passwd -6` and used in HAProxy userlists) and Apache's apr1 (`$apr1$`, `htpasswd -m`;
accepted, and reported as weak) in pure Python following the published algorithms; and
`scrypt$N$r$p$salt$hash` through `hashlib.scrypt`. The `crypt` module is not used: it is
deprecated and removed in Python 3.13.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
log = logging.getLogger("edgelb.auth")

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
ROUNDS_LIMIT = 200_000  # what edgelb accepts: about 0.1 s per check of a new header
BCRYPT_COST_LIMIT = 12  # the same bound for bcrypt: cost 12 is about 0.2 s per check
SCRYPT_MAX_MEMORY = 256 * 1024 * 1024
APR1_ROUNDS = 1000
# The pure-Python hashes (SHA-crypt, apr1) hold the GIL while they run. In a verification
# thread they stop for GIL_PAUSE seconds every SLICE_ROUNDS rounds, so that the event loop
# thread waits for the GIL at most one slice (about 0.5 ms), not the interpreter's 5 ms
# switch interval, each time it wakes up. hashlib.scrypt and bcrypt release the GIL.
SLICE_ROUNDS = 1000
GIL_PAUSE = 0.00005

Pause = Callable[[], None] | None

# Byte order of the final digest in the text form: groups of digest indexes, most significant
# byte first, each group written as little-endian 6-bit characters.
_SHA256_ORDER = ((0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14), (15, 25, 5),
                 (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29), (31, 30))
_SHA512_ORDER = ((0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26),
                 (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10),
                 (53, 11, 32), (12, 33, 54), (34, 55, 13), (56, 14, 35), (15, 36, 57),
                 (37, 58, 16), (59, 17, 38), (18, 39, 60), (40, 61, 19), (62, 20, 41), (63,))
_MD5_ORDER = ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5), (11,))
_VARIANTS: dict[str, tuple[Callable[..., Any], tuple[tuple[int, ...], ...], int]] = {
    "5": (hashlib.sha256, _SHA256_ORDER, 43),
    "6": (hashlib.sha512, _SHA512_ORDER, 86),
}
_SHA_CRYPT = re.compile(r"^\$([56])\$(?:rounds=([0-9]+)\$)?([^$]*)(?:\$(.*))?$", re.S)
_APR1 = re.compile(r"^\$apr1\$([^$]{0,8})\$([./0-9A-Za-z]{22})$")
_BCRYPT = re.compile(r"^\$2([aby])\$([0-9]{2})\$([./0-9A-Za-z]{53})$")
_DES_CRYPT = re.compile(r"^[./0-9A-Za-z]{13}$")

MKPASSWD_HINT = "`mkpasswd -m sha-512` (or `openssl passwd -6`)"
HTPASSWD_HINT = "`htpasswd -nB USER` (bcrypt)"
SCRYPT_ONE_LINER = (
    "python3 -c 'import base64,getpass,hashlib,os;s=os.urandom(16);"
    "e=lambda b:base64.b64encode(b).decode();"
    "print(\"scrypt$16384$8$1$\"+e(s)+\"$\"+e(hashlib.scrypt(getpass.getpass().encode(),"
    "salt=s,n=16384,r=8,p=1)))'"
)
HASH_HINT = (f"store a hash made with {HTPASSWD_HINT}, {MKPASSWD_HINT}, or for scrypt with "
             f"`{SCRYPT_ONE_LINER}`")


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


def _let_the_loop_in() -> None:
    """Give up the GIL for a moment (see SLICE_ROUNDS)."""
    time.sleep(GIL_PAUSE)


def _rounds(h: Callable[..., Any], c: bytes, p: bytes, s: bytes, rounds: int,
            pause: Pause) -> bytes:
    """The rounds shared by SHA-crypt and MD5-crypt: round i hashes C and P around a middle
    that holds S if i % 3 and P if i % 7; odd rounds put P first."""
    middles = [(s if i % 3 else b"") + (p if i % 7 else b"") for i in range(42)]
    for start in range(0, rounds, SLICE_ROUNDS):
        if pause is not None and start:
            pause()
        for i in range(start, min(rounds, start + SLICE_ROUNDS)):
            mid = middles[i % 42]
            c = h(p + mid + c).digest() if i & 1 else h(c + mid + p).digest()
    return c


def _sha_crypt_digest(variant: str, password: bytes, salt: bytes, rounds: int,
                      pause: Pause = None) -> bytes:
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
    return _crypt64(_rounds(h, a, p, s, rounds, pause), order)


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


def _apr1_digest(password: bytes, salt: bytes, pause: Pause = None) -> bytes:
    """The text-encoded hash of Apache's `$apr1$` (MD5-crypt with the magic `$apr1$`, as
    `htpasswd -m` and `openssl passwd -apr1` make it): the 22 characters after the salt."""
    md5 = hashlib.md5
    n = len(password)
    b = md5(password + salt + password).digest()
    parts = [password, b"$apr1$", salt, _repeat(b, n)]
    bit = n
    while bit:  # one byte per bit of the password length: NUL for a 1, the first byte for a 0
        parts.append(b"\0" if bit & 1 else password[:1])
        bit >>= 1
    a = md5(b"".join(parts)).digest()
    return _crypt64(_rounds(md5, a, password, salt, APR1_ROUNDS, pause), _MD5_ORDER)


def apr1_hash(password: str | bytes, salt: str) -> str:
    """`$apr1$salt$hash` for `password` (salt cut to 8 characters), as `htpasswd -m` makes it.
    apr1 is weak (see `edgelb check`): this exists to read the files users have."""
    pw = password.encode("utf-8") if isinstance(password, str) else password
    raw = salt.encode("utf-8")[:8]
    return f"$apr1${raw.decode('utf-8', 'surrogateescape')}${_apr1_digest(pw, raw).decode()}"


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
    """One stored hash; `verify(password)` recomputes it and compares in constant time.
    `scheme` names the kind of hash (apr1 is reported as weak)."""

    __slots__ = ("compute", "expected", "scheme")

    def __init__(self, compute: Callable[[bytes, Pause], bytes], expected: bytes,
                 scheme: str) -> None:
        self.compute = compute
        self.expected = expected
        self.scheme = scheme

    def verify(self, password: bytes, pause: Pause = None) -> bool:
        """`pause`: called between slices of a pure-Python hash (see SLICE_ROUNDS)."""
        return hmac.compare_digest(self.compute(password, pause), self.expected)


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

    def compute(password: bytes, pause: Pause) -> bytes:
        return _sha_crypt_digest(variant, password, salt, rounds, pause)

    return _Verifier(compute, digest.encode("ascii"), f"sha{'256' if variant == '5' else '512'}"
                     "-crypt"), ""


def _apr1_verifier(text: str) -> tuple[_Verifier | None, str]:
    m = _APR1.match(text)
    if m is None:
        return None, ("an apr1 hash has the form $apr1$SALT$HASH (a salt of up to 8 "
                      "characters, 22 characters of [./0-9A-Za-z]); the value looks cut or "
                      f"damaged: re-hash the password, better with {HTPASSWD_HINT}")
    salt = m.group(1).encode("utf-8")

    def compute(password: bytes, pause: Pause) -> bytes:
        return _apr1_digest(password, salt, pause)

    return _Verifier(compute, m.group(2).encode("ascii"), "apr1"), ""


def _bcrypt_verifier(text: str) -> tuple[_Verifier | None, str]:
    m = _BCRYPT.match(text)
    if m is None:
        if text.startswith(("$2a$", "$2b$", "$2y$")):
            return None, ("a bcrypt hash has the form $2y$NN$ and 53 characters of "
                          "[./0-9A-Za-z] (60 in all); the value looks cut or damaged, re-hash "
                          f"the password with {HTPASSWD_HINT}")
        return None, (f"bcrypt hashes of this variant ({text[:4]}...) are not supported; "
                      f"re-hash with {HTPASSWD_HINT}, which makes $2y$")
    cost = int(m.group(2))
    if not 4 <= cost <= 31:
        return None, f"bcrypt cost {cost} is outside 4..31; re-hash with {HTPASSWD_HINT}"
    if cost > BCRYPT_COST_LIMIT:
        return None, (f"bcrypt cost {cost} is too slow to verify on the request path (at most "
                      f"{BCRYPT_COST_LIMIT}); re-hash with `htpasswd -nB -C 10 USER`")
    import bcrypt  # a dependency; imported when the first bcrypt user is read

    # $2y$ (PHP's and htpasswd's name) is the same algorithm as $2b$
    stored = ("$2b$" if m.group(1) == "y" else f"$2{m.group(1)}$") + text[4:]
    setting = stored.encode("ascii")

    def compute(password: bytes, pause: Pause) -> bytes:
        # bcrypt reads at most 72 bytes (htpasswd and OpenBSD cut there; the package refuses
        # longer ones), and hashpw returns the whole string with the stored salt and cost
        try:
            return bcrypt.hashpw(password[:72], setting)
        except ValueError:  # e.g. a NUL byte in the password
            return b""

    return _Verifier(compute, setting, "bcrypt"), ""


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

    def compute(password: bytes, pause: Pause) -> bytes:
        return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem,
                              dklen=len(expected))

    return _Verifier(compute, expected, "scrypt"), ""


_UNSUPPORTED = (
    ("$1$", "MD5-crypt"), ("$y$", "yescrypt"),
    ("$7$", "scrypt in crypt(3) form"), ("$gy$", "gost-yescrypt"), ("$argon2", "Argon2"),
    ("{SHA}", "htpasswd SHA-1 (htpasswd -s)"), ("{SSHA}", "salted SHA-1"), ("$pbkdf2", "PBKDF2"),
)


def _verifier(text: str) -> tuple[_Verifier | None, str]:
    """The verifier for a stored hash, or (None, what is wrong and how to fix it). The message
    never repeats the value: it may be a plain-text password."""
    if text.startswith(("$5$", "$6$")):
        return _sha_crypt_verifier(text)
    if text.startswith("scrypt$"):
        return _scrypt_verifier(text)
    if text.startswith("$2"):
        return _bcrypt_verifier(text)
    if text.startswith("$apr1$"):
        return _apr1_verifier(text)
    for prefix, name in _UNSUPPORTED:
        if text.startswith(prefix):
            return None, f"{name} hashes ({prefix}...) are not supported; {HASH_HINT}"
    if text.startswith("$"):
        return None, f"unknown hash scheme; {HASH_HINT}"
    if _DES_CRYPT.match(text):
        return None, ("this is a plain-text password or a DES crypt hash (htpasswd -d: only "
                      f"the first 8 characters count); edgelb refuses both; {HASH_HINT}")
    return None, f"this looks like a plain-text password, which edgelb refuses; {HASH_HINT}"


# ---------------------------------------------------------------------------------------------
# Verification off the event loop

# Threads that compute password hashes, per process: at most half the cores (the event loop
# keeps the rest), at least one, at most two.
AUTH_THREADS = max(1, min(2, (os.cpu_count() or 1) // 2))
MAX_VERIFYING = 32  # hashes admitted at once per process (running + waiting); beyond: 503


class _HashPool:
    """The process's verification threads and the count of verifications they hold.

    `acquire()`/`release()` run on the event loop thread only. The executor is made on first
    use, and again in a forked child (threads do not survive a fork)."""

    __slots__ = ("busy", "executor", "limit", "pid", "threads")

    def __init__(self, threads: int, limit: int) -> None:
        self.threads = threads
        self.limit = limit
        self.busy = 0
        self.executor: ThreadPoolExecutor | None = None
        self.pid = 0

    def acquire(self) -> bool:
        if self.busy >= self.limit:
            return False
        self.busy += 1
        return True

    def release(self) -> None:
        self.busy = max(0, self.busy - 1)

    def run(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any],
            *args: Any) -> asyncio.Future[Any]:
        if self.executor is None or self.pid != os.getpid():
            self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="edgelb-auth")
            self.pid = os.getpid()
        return loop.run_in_executor(self.executor, fn, *args)


HASH_POOL = _HashPool(AUTH_THREADS, MAX_VERIFYING)


# ---------------------------------------------------------------------------------------------
# Basic auth

DEFAULT_REALM = "edgelb"
AUTH_KEYS = ("realm", "users", "cache_ttl", "max_failures", "failure_window")
MAX_AUTHORIZATION = 4096  # longer header values are refused before any hashing
CACHE_TTL = 300.0  # seconds a verified header value is let through without hashing
NEGATIVE_TTL = 60.0  # at most this long a wrong one is refused without hashing
CACHE_SIZE = 1024  # header values remembered, each way
MAX_FAILURES = 10  # failures from one address within FAILURE_WINDOW before 429
FAILURE_WINDOW = 10.0
MAX_CLIENTS = 10_000  # addresses the failure throttle tracks per credentials
_REALM = re.compile(r"^[\x20-\x7e]+$")
_USER = re.compile(r"^[^\x00-\x1f\x7f:]+$")

# Verdicts of Credentials.admit(); AUTH_RESULTS names the first six (the metric's `result`).
AUTH_OK = 0  # verified now: one hash computed
AUTH_CACHED = 1  # verified within cache_ttl: no hash
AUTH_FAILED = 2  # wrong user or password: 401
AUTH_MISSING = 3  # no Authorization, or no usable Basic credentials in it: 401, no hash
AUTH_THROTTLED = 4  # too many failures from this address: 429
AUTH_BUSY = 5  # MAX_VERIFYING hashes already held in this process: 503
AUTH_PENDING = 6  # being verified in a thread: the callback gets one of the above
AUTH_RESULTS = ("ok", "cached", "failed", "missing", "throttled", "busy")


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


def _client_key(ip: bytes | str) -> bytes:
    """What the failure throttle counts per: an IPv4 address, or an IPv6 /64 (a host usually
    holds a whole /64); an IPv4-mapped IPv6 address is its IPv4 address."""
    raw = ip.encode("latin-1", "replace") if isinstance(ip, str) else ip
    if b":" not in raw:
        return raw
    try:
        addr = ipaddress.IPv6Address(raw.decode("ascii").split("%", 1)[0])
    except (ValueError, UnicodeDecodeError):
        return raw
    mapped = addr.ipv4_mapped
    if mapped is not None:
        return str(mapped).encode("ascii")
    return addr.packed[:8]


def _remember(table: dict[Any, Any], key: Any, value: Any, size: int) -> None:
    """table[key] = value, dropping the oldest entry when the table holds `size`."""
    if key not in table and len(table) >= size:
        del table[next(iter(table))]
    table[key] = value


class _AuthState:
    """What Credentials learn while serving: verified and refused header values (each with
    when it expires), failures per client (window start, failures, hashes pending) and the
    verifications in flight with the callbacks waiting for each. Kept across a reload that
    leaves the realm and users as they were (Credentials.adopt)."""

    __slots__ = ("bad", "clients", "good", "waiting")

    def __init__(self) -> None:
        self.good: dict[bytes | str, tuple[str, float]] = {}
        self.bad: dict[bytes | str, float] = {}
        self.clients: dict[bytes, list[float]] = {}
        self.waiting: dict[bytes | str, list[tuple[bytes, Callable[[int], None]]]] = {}


class Credentials:
    """The users allowed through basic auth on one service, and their realm.

    The data path calls `admit()`: a header value verified within `cache_ttl` passes at once;
    otherwise its hash is computed in a thread of HASH_POOL (never on the event loop), and
    the request waits for the verdict. Requests carrying the same value while it is verified
    wait for the same hash. A wrong value is refused without hashing for a while after. An
    address with `max_failures` failures (or hashes still pending) within `failure_window`
    seconds gets AUTH_THROTTLED until the window ends. `check()` verifies on the calling
    thread (tests, tools). `verifications` counts the hashes computed.
    """

    __slots__ = ("_clock", "_decoy", "_key", "_users", "cache_size", "cache_ttl",
                 "challenge_header", "failure_window", "max_failures", "realm", "state",
                 "users_key", "verifications", "warnings", "weak")

    def __init__(self, realm: str, users: Sequence[str], cache_size: int = CACHE_SIZE,
                 cache_ttl: float = CACHE_TTL, max_failures: int = MAX_FAILURES,
                 failure_window: float = FAILURE_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        parsed, errors = _parse_users(list(users), "users")
        if not _REALM.match(realm):
            errors.insert(0, "realm: must be non-empty printable ASCII")
        if errors:
            raise ValueError("; ".join(errors))
        self.realm = realm
        self._users = {name.encode("utf-8"): (name, v) for name, v in parsed.items()}
        self._decoy = next(iter(parsed.values()))  # hashed for unknown users: same timing
        self.users_key = (realm, tuple(sorted(users)))
        self._key = (*self.users_key, cache_ttl, max_failures, failure_window)
        self.challenge_header = challenge(realm)
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl
        self.max_failures = max_failures
        self.failure_window = failure_window
        self._clock = clock
        self.state = _AuthState()
        self.verifications = 0
        self.weak = tuple(name for name, v in parsed.items() if v.scheme == "apr1")
        self.warnings: tuple[str, ...] = ()  # set by parse_auth, with the config path

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self._users.values())

    def adopt(self, old: Credentials) -> None:
        """Take over what `old` learnt (caches, failures, pending hashes) when it checked the
        same users in the same realm: a reload then costs no client a new hash and gives no
        address a fresh failure count."""
        if old is not self and old.users_key == self.users_key:
            self.state = old.state

    # -- the data path -------------------------------------------------------------------

    def admit(self, authorization: bytes | str | None, client: bytes | str,
              loop: asyncio.AbstractEventLoop, done: Callable[[int], None]) -> int:
        """The verdict on a request's `Authorization` value from `client` (its address): one
        of AUTH_OK..AUTH_BUSY now, or AUTH_PENDING and later `done(verdict)` on the loop."""
        if authorization is None:
            return AUTH_MISSING
        state = self.state
        now = self._clock()
        hit = state.good.get(authorization)
        if hit is not None:
            if hit[1] > now:
                return AUTH_CACHED
            del state.good[authorization]
        key = _client_key(client)
        if self.max_failures and self._throttled(key, now):
            return AUTH_THROTTLED
        until = state.bad.get(authorization)
        if until is not None:
            if until > now:
                self._failed(key, now)
                return AUTH_FAILED
            del state.bad[authorization]
        waiters = state.waiting.get(authorization)
        if waiters is not None:  # the same value is being verified: wait for that hash
            waiters.append((key, done))
            return AUTH_PENDING
        parsed = self._parse(authorization)
        if parsed is None:
            return AUTH_MISSING
        if not HASH_POOL.acquire():
            return AUTH_BUSY
        if self.max_failures:
            self._client(key, now)[2] += 1  # a pending hash counts against the address
        state.waiting[authorization] = [(key, done)]
        self.verifications += 1
        future = HASH_POOL.run(loop, self._verify, parsed[0], parsed[1], _let_the_loop_in)
        future.add_done_callback(partial(self._verified, state, authorization, key))
        return AUTH_PENDING

    def retry_after(self, client: bytes | str) -> int:
        """Seconds until `client` may try again (the Retry-After of a 429), at least 1."""
        record = self.state.clients.get(_client_key(client))
        if record is None or record[1] < self.max_failures:
            return 1  # throttled by pending hashes: they end soon
        return max(1, math.ceil(record[0] + self.failure_window - self._clock()))

    def _verified(self, state: _AuthState, authorization: bytes | str, key: bytes,
                  future: asyncio.Future[Any]) -> None:
        """A hash came back (on the loop): remember the verdict, answer every waiter."""
        HASH_POOL.release()
        waiters = state.waiting.pop(authorization, [])
        record = state.clients.get(key)
        if record is not None and record[2] > 0:
            record[2] -= 1
        user: str | None = None
        if not future.cancelled():
            exc = future.exception()
            if exc is not None:
                log.error("basic auth: verifying a password failed: %r", exc)
            else:
                user = future.result()
        now = self._clock()
        self._remember_verdict(state, authorization, user, now)
        verdict = AUTH_OK if user is not None else AUTH_FAILED
        for client, done in waiters:
            if user is None and self.max_failures:
                self._failed(client, now)
            try:
                done(verdict)
            except Exception:
                log.exception("basic auth: a request waiting for a verification failed")

    # -- parts ---------------------------------------------------------------------------

    def _parse(self, authorization: bytes | str) -> tuple[str, bytes] | None:
        """(user, password) worth a hash: Basic, not too long, a non-empty password."""
        if len(authorization) > MAX_AUTHORIZATION:
            return None
        parsed = parse_basic(authorization)
        if parsed is None or not parsed[1]:  # an empty password never authenticates
            return None
        return parsed

    def _verify(self, name: str, password: bytes, pause: Pause = None) -> str | None:
        """The user if `password` is theirs; runs in a verification thread (no shared state
        is touched). An unknown user costs a hash too, so the answer takes as long."""
        entry = self._users.get(name.encode("utf-8"))
        if entry is None:
            self._decoy.verify(password, pause)
            return None
        return entry[0] if entry[1].verify(password, pause) else None

    def _remember_verdict(self, state: _AuthState, authorization: bytes | str,
                          user: str | None, now: float) -> None:
        if user is not None:
            if self.cache_ttl > 0:
                _remember(state.good, authorization, (user, now + self.cache_ttl),
                          self.cache_size)
        else:
            ttl = min(self.cache_ttl, NEGATIVE_TTL)
            if ttl > 0:
                _remember(state.bad, authorization, now + ttl, self.cache_size)

    def _client(self, key: bytes, now: float) -> list[float]:
        """The failure record of `key`, made if new. The table keeps MAX_CLIENTS records,
        the oldest made out first (no scan: with many addresses each stays O(1))."""
        clients = self.state.clients
        record = clients.get(key)
        if record is None:
            record = [now, 0, 0]
            _remember(clients, key, record, MAX_CLIENTS)
        return record

    def _throttled(self, key: bytes, now: float) -> bool:
        record = self.state.clients.get(key)
        if record is None:
            return False
        if now - record[0] >= self.failure_window:  # a new window
            record[0] = now
            record[1] = 0
        return record[1] + record[2] >= self.max_failures

    def _failed(self, key: bytes, now: float) -> None:
        if self.max_failures:
            record = self._client(key, now)
            if now - record[0] >= self.failure_window:
                record[0] = now
                record[1] = 0
            record[1] += 1

    # -- direct use ----------------------------------------------------------------------

    def cached(self, authorization: bytes | str | None) -> str | None:
        """The user for a header value verified within cache_ttl, without hashing."""
        hit = self.state.good.get(authorization) if authorization is not None else None
        if hit is None or hit[1] <= self._clock():
            return None
        return hit[0]

    def check(self, authorization: bytes | str | None) -> str | None:
        """The user that `authorization` (the header's value) authenticates, or None,
        computed on this thread (no throttle). The data path uses admit()."""
        if authorization is None:
            return None
        user = self.cached(authorization)
        if user is not None:
            return user
        state = self.state
        now = self._clock()
        until = state.bad.get(authorization)
        if until is not None and until > now:
            return None
        parsed = self._parse(authorization)
        if parsed is None:
            return None
        self.verifications += 1
        user = self._verify(*parsed)
        self._remember_verdict(state, authorization, user, now)
        return user

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Credentials) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Credentials(realm={self.realm!r}, users={list(self.users)})"


def _auth_options(value: dict, path: str) -> tuple[dict[str, Any], list[str]]:
    """cache_ttl, max_failures and failure_window of an auth mapping, as Credentials takes
    them; errors name the key and the fix."""
    from watchers.schema import parse_duration

    out: dict[str, Any] = {}
    errors: list[str] = []
    for key in ("cache_ttl", "failure_window"):
        if key not in value:
            continue
        try:
            seconds = parse_duration(value[key])
        except ValueError as e:
            errors.append(f"{path}.{key}: {e}")
            continue
        if key == "failure_window" and seconds <= 0:
            errors.append(f"{path}.failure_window: must be above 0, e.g. 10s")
        elif seconds > 86400:
            errors.append(f"{path}.{key}: at most 1d, got {seconds:g}s")
        else:
            out[key] = seconds
    if "max_failures" in value:
        n = value["max_failures"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            errors.append(f"{path}.max_failures: expected a whole number of failures (0: no "
                          f"throttle), got {n!r}")
        else:
            out["max_failures"] = n
    return out, errors


def _weak_warnings(creds: Credentials, entries: Sequence[str], upath: str) -> tuple[str, ...]:
    if not creds.weak:
        return ()
    weak = set(creds.weak)
    out = []
    for i, entry in enumerate(entries):
        user = entry.partition(":")[0]
        if user in weak:
            where = upath if len(entries) == 1 and not upath.endswith(".users") else \
                f"{upath}[{i}]"
            out.append(f"{where} (user {user!r}): apr1 ($apr1$, htpasswd -m) is a weak hash "
                       "(1000 rounds of MD5: fast to guess if the file leaks); re-hash with "
                       f"{HTPASSWD_HINT}")
    return tuple(out)


def parse_auth(value: Any, path: str) -> tuple[Credentials | None, list[str]]:
    """Credentials from `{realm: shop, users: ["alice:$2y$...", ...], cache_ttl: 5m,
    max_failures: 10, failure_window: 10s}` (all but users optional) or from marathon-lb's
    `HAPROXY_{n}_AUTH` string `realm:user:HASH`. None gives no auth. Errors name the item and
    the fix, and never repeat a password; weak hashes (apr1) are accepted and named in the
    credentials' `warnings`."""
    if value is None:
        return None, []
    options: dict[str, Any] = {}
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
        options, more = _auth_options(value, path)
        errors += more
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
    creds = Credentials(realm, entries, **options)
    creds.warnings = _weak_warnings(creds, entries, upath)
    return creds, []
