"""TLS termination: certificates, modern server defaults, and a store that picks by SNI.

A listener is given ONE context, `CertificateStore.server_context()`. It holds no certificate of
its own: its `sni_callback` looks the client's server name up in the store's current table and
switches the handshake to that certificate's own context. `CertificateStore.set()` replaces the
whole table in one assignment, so a swap applies to the next handshake and leaves established
connections (which keep a reference to the context they were given) alone.

The runtime does not depend on `cryptography`. Subject alternative names, the serial and the
expiry are read from the certificate's DER with the small parser below (only the few X.509
fields needed); the pair is loaded and checked by OpenSSL through `SSLContext.load_cert_chain`,
which only takes paths, so the PEM is handed to it through an anonymous in-memory file
(`memfd_create`), or a private temporary directory where that does not exist.

Defaults of every context (documented choices):
- `PROTOCOL_TLS_SERVER`, TLS 1.2 minimum (1.0/1.1 are deprecated by RFC 8996);
- TLS 1.2 ciphers: ECDHE key exchange with AEAD only (AES-GCM, ChaCha20-Poly1305), server
  order; TLS 1.3 suites are OpenSSL's (all AEAD);
- no compression (CRIME), no renegotiation (a client-driven CPU cost, and unneeded);
- session tickets on (`OP_NO_TICKET` not set, OpenSSL's 2 TLS 1.3 tickets per handshake):
  resumption saves a full handshake;
- ALPN offers `h2` then `http/1.1` (edgelb/h2 serves HTTP/2); a listener with `http2: false`
  offers `http/1.1` only (`CertificateStore.alpn`: each certificate's context for that list).

The config's top-level `tls:` block (`session_tickets`, `min_version`) is process-wide, like the
process it configures: `configure()` records it and sets it on every live server context this
module made (weakly tracked) and on every one made later. The attributes involved (minimum
version, options, `num_tickets`) are copied into each connection when its handshake starts, so
a change applies to the next handshake and leaves handshakes in progress alone. Only the
listener's context matters for them: switching to a certificate's context on SNI keeps the
connection's version bounds, options and ticket count; certificates' contexts get the same
values anyway, so no context edgelb made disagrees with the config.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import functools
import logging
import os
import re
import ssl
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from watchers.kubernetes.secrets import SecretError, secret_pem

log = logging.getLogger("edgelb.net.tls")
HANDSHAKE_TIMEOUT = 10.0  # seconds a client may take to finish its TLS handshake

CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"
ALPN = ("h2", "http/1.1")
ALPN_HTTP1 = ("http/1.1",)  # a listener with http2: false
OUTCOMES = ("exact", "wildcard", "default", "no_sni", "unrecognized")


class TLSConfigError(ValueError):
    """A certificate or key that cannot be used; the message names its source and the fix."""

    def __init__(self, source: str, message: str) -> None:
        self.source = source
        super().__init__(f"{source}: {message}")


# ---------------------------------------------------------------------------------------------
# Minimal DER reading: just enough of X.509 for the serial, notAfter and the DNS SANs.

_SAN_OID = bytes.fromhex("551d11")  # 2.5.29.17 subjectAltName


class _DerError(ValueError):
    pass


def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the element at `pos`."""
    if pos + 2 > end:
        raise _DerError("truncated element")
    tag, first = buf[pos], buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > end:
            raise _DerError("bad length")
        length = int.from_bytes(buf[pos:pos + count], "big")
        pos += count
    if pos + length > end:
        raise _DerError("element runs past its container")
    return tag, pos, pos + length


def _children(buf: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    pos = start
    while pos < end:
        tag, s, e = _tlv(buf, pos, end)
        out.append((tag, s, e))
        pos = e
    return out


def _der_time(tag: int, raw: bytes) -> dt.datetime:
    text = raw.decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise _DerError("validity is not a time")
    if not text.endswith("Z"):
        raise _DerError("time is not in UTC")
    stamp = dt.datetime.strptime(text[:14], "%Y%m%d%H%M%S")
    return stamp.replace(tzinfo=dt.UTC)


def _parse_x509(der: bytes) -> tuple[int, dt.datetime, list[str]]:
    """(serial, notAfter, DNS names of subjectAltName) of one DER certificate."""
    tag, s, e = _tlv(der, 0, len(der))
    if tag != 0x30:
        raise _DerError("not a SEQUENCE")
    tag, s, e = _tlv(der, s, e)  # tbsCertificate
    if tag != 0x30:
        raise _DerError("no tbsCertificate")
    fields = _children(der, s, e)
    if fields and fields[0][0] == 0xA0:  # [0] version
        fields = fields[1:]
    if len(fields) < 6 or fields[0][0] != 0x02 or fields[3][0] != 0x30:
        raise _DerError("unexpected tbsCertificate layout")
    serial = int.from_bytes(der[fields[0][1]:fields[0][2]], "big", signed=True)
    validity = _children(der, fields[3][1], fields[3][2])
    if len(validity) != 2:
        raise _DerError("bad validity")
    vtag, vs, ve = validity[1]
    not_after = _der_time(vtag, der[vs:ve])
    names: list[str] = []
    for tag, s, e in fields[6:]:
        if tag != 0xA3:  # [3] extensions
            continue
        _, ls, le = _tlv(der, s, e)
        for _, xs, xe in _children(der, ls, le):
            parts = _children(der, xs, xe)
            if not parts or parts[0][0] != 0x06 or der[parts[0][1]:parts[0][2]] != _SAN_OID:
                continue
            otag, os_, oe = parts[-1]
            if otag != 0x04:
                raise _DerError("bad subjectAltName extension")
            _, gs, ge = _tlv(der, os_, oe)
            for gtag, ns, ne in _children(der, gs, ge):
                if gtag == 0x82:  # [2] dNSName, IA5String
                    names.append(der[ns:ne].decode("ascii"))
    return serial, not_after, names


# ---------------------------------------------------------------------------------------------
# Certificates

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
_DNS_NAME = re.compile(r"^(\*\.)?([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)"
                       r"(\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*$")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, eq=False)
class Certificate:
    """A certificate chain with its key, and a server context loaded with the pair.

    `names` are the DNS subjectAltNames, lowercase (`*.example.com` for a wildcard);
    `cert_pem` is the whole chain as given (leaf first).
    """

    names: tuple[str, ...]
    not_after: dt.datetime
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    source: str
    context: ssl.SSLContext = field(repr=False)
    serial: int = 0
    alpn: tuple[str, ...] = ALPN  # what `context` offers
    # contexts of the same pair for other ALPN lists (context_for), made once each
    variants: dict[tuple[str, ...], ssl.SSLContext] = field(default_factory=dict, repr=False)

    def context_for(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        """A server context with this pair offering `alpn` (OpenSSL negotiates ALPN with the
        context the SNI callback selects, so a listener's list needs a context of its own)."""
        if alpn == self.alpn:
            return self.context
        ctx = self.variants.get(alpn)
        if ctx is None:
            ctx = new_server_context()
            ctx.set_alpn_protocols(list(alpn))
            with _as_path(self.cert_pem) as cert_path, _as_path(self.key_pem) as key_path:
                ctx.load_cert_chain(cert_path, key_path, password=_no_password)
            self.variants[alpn] = ctx
        return ctx

    @property
    def expired(self) -> bool:
        return self.not_after <= _utcnow()

    def info(self) -> dict[str, Any]:
        """JSON-ready description (no key material)."""
        return {
            "names": list(self.names),
            "not_after": self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "serial": format(self.serial, "x"),
            "source": self.source,
            "expired": self.expired,
        }


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Apply edgelb's server defaults (see the module docstring) to `ctx`."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                    | ssl.OP_NO_RENEGOTIATION)
    ctx.options &= ~ssl.OP_NO_TICKET
    ctx.set_alpn_protocols(list(ALPN))
    return ctx


# ---------------------------------------------------------------------------------------------
# Process-wide options (the config's `tls:` block)

MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
DEFAULT_TICKETS = 2  # OpenSSL's number of TLS 1.3 tickets per full handshake


@dataclass(frozen=True, slots=True)
class Options:
    """What `tls:` sets on every server context: `session_tickets` false issues no ticket at
    all (TLS 1.3: `num_tickets = 0`, so not even stateful ones; TLS 1.2: `OP_NO_TICKET`);
    `min_version` is "1.2" or "1.3"."""

    session_tickets: bool = True
    min_version: str = "1.2"


_options = Options()
_live: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()


def apply_options(ctx: ssl.SSLContext, options: Options) -> None:
    """Set `options` on a server context; safe on a context that is serving."""
    ctx.minimum_version = MIN_VERSIONS[options.min_version]
    if options.session_tickets:
        ctx.options &= ~ssl.OP_NO_TICKET
        ctx.num_tickets = DEFAULT_TICKETS
    else:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0


def configure(options: Options) -> int:
    """Make `options` the process's TLS options, on every live server context and every one
    made from now on. Returns how many live contexts were changed."""
    global _options
    if options.min_version not in MIN_VERSIONS:  # before anything changes
        raise ValueError(f"tls min_version {options.min_version!r}: use one of "
                         f"{', '.join(MIN_VERSIONS)}")
    changed, _options = options != _options, options
    contexts = list(_live)
    for ctx in contexts:
        apply_options(ctx, options)
    if changed:
        log.info("tls: session tickets %s, TLS %s minimum, on %d server context(s)",
                 "on" if options.session_tickets else "off", options.min_version, len(contexts))
    return len(contexts)


def current_options() -> Options:
    return _options


def new_server_context() -> ssl.SSLContext:
    """A hardened server context carrying the current options, tracked for `configure()`."""
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    apply_options(ctx, _options)
    _live.add(ctx)
    return ctx


@contextlib.contextmanager
def _as_path(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that reads `data`; key material stays off disk where possible."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("edgelb-tls", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="edgelb-tls-") as tmp:  # created mode 0700
        path = os.path.join(tmp, "pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Called by OpenSSL only for an encrypted key; without it OpenSSL would prompt on the tty.
    raise _EncryptedKey


def _blocks(pem: bytes) -> list[tuple[str, bytes]]:
    return [(m.group(1).decode(), m.group(2)) for m in _PEM_BLOCK.finditer(pem)]


def _names(raw: list[str], source: str) -> tuple[str, ...]:
    out: list[str] = []
    for name in raw:
        n = name.strip().lower().rstrip(".")
        if not _DNS_NAME.match(n):
            log.warning("%s: subjectAltName %r is not a usable DNS name; ignored", source, name)
        elif n not in out:
            out.append(n)
    return tuple(out)


def load_pem(cert_pem: bytes, key_pem: bytes, source: str, *,
             cert_label: str = "the certificate", key_label: str = "the key",
             alpn: Sequence[str] = ALPN) -> Certificate:
    """Check and load a PEM certificate chain (leaf first) and its unencrypted private key.

    `alpn`: the protocols its context offers. OpenSSL negotiates ALPN with the context the SNI
    callback selected, so a certificate served on a tcp port is loaded with `alpn=()`: the
    relayed protocol is the backend's to choose, and no ALPN beats a wrong `http/1.1`.

    Raises TLSConfigError naming `source` (and the labels, e.g. a file or a Secret key). An
    expired certificate is loaded with a warning: serving it beats refusing the whole set.
    """
    err = functools.partial(TLSConfigError, source)
    if isinstance(cert_pem, str):
        cert_pem = cert_pem.encode()
    if isinstance(key_pem, str):
        key_pem = key_pem.encode()
    cert_blocks = [body for kind, body in _blocks(cert_pem) if kind == "CERTIFICATE"]
    if not cert_blocks:
        kinds = {kind for kind, _ in _blocks(cert_pem)}
        if any(k.endswith("PRIVATE KEY") for k in kinds):
            raise err(f"{cert_label} holds a private key, not a certificate; are the "
                      "certificate and the key swapped?")
        raise err(f"{cert_label} is not PEM (no -----BEGIN CERTIFICATE----- block); give the "
                  "certificate chain in PEM, leaf first")
    try:
        der = base64.b64decode(b"".join(cert_blocks[0].split()), validate=True)
        serial, not_after, raw_names = _parse_x509(der)
    except (binascii.Error, _DerError, ValueError, IndexError) as e:
        raise err(f"{cert_label}: the first CERTIFICATE block is not a valid X.509 "
                  f"certificate ({e}); re-export it in PEM") from None
    names = _names(raw_names, source)
    if not names:
        raise err(f"{cert_label} has no DNS name in subjectAltName (clients ignore the "
                  "subject CN); reissue it with the host names as subjectAltNames")
    key_kinds = [kind for kind, _ in _blocks(key_pem)]
    if not any(k.endswith("PRIVATE KEY") for k in key_kinds):
        if "CERTIFICATE" in key_kinds:
            raise err(f"{key_label} holds a certificate, not a private key; are the "
                      "certificate and the key swapped?")
        raise err(f"{key_label} is not a PEM private key (no -----BEGIN ... PRIVATE KEY----- "
                  "block); give the unencrypted key in PEM")
    if "ENCRYPTED PRIVATE KEY" in key_kinds or b"Proc-Type: 4,ENCRYPTED" in key_pem:
        raise err(f"{key_label} is encrypted; give it without a passphrase (e.g. "
                  "`openssl pkey -in KEY -out KEY.plain`)")
    ctx = new_server_context()
    if tuple(alpn) != ALPN:
        ctx.set_alpn_protocols(list(alpn))  # empty: the server acknowledges no protocol
    try:
        with _as_path(cert_pem) as cert_path, _as_path(key_pem) as key_path:
            ctx.load_cert_chain(cert_path, key_path, password=_no_password)
    except _EncryptedKey:
        raise err(f"{key_label} is encrypted; give it without a passphrase") from None
    except ssl.SSLError as e:
        reason = (e.reason or str(e)).upper()
        if "KEY_VALUES_MISMATCH" in reason or "X509_CHECK_PRIVATE_KEY" in reason:
            raise err(f"{key_label} does not match {cert_label}; give the key the "
                      "certificate was issued for (leaf certificate first in the chain)") from None
        raise err(f"OpenSSL cannot load the pair ({e.reason or e}); check that both are "
                  "valid PEM") from None
    cert = Certificate(names=names, not_after=not_after, cert_pem=cert_pem, key_pem=key_pem,
                       source=source, context=ctx, serial=serial, alpn=tuple(alpn))
    if cert.expired:
        log.warning("%s: certificate for %s expired on %s; clients will refuse it; renew it",
                    source, ", ".join(names), cert.info()["not_after"])
    return cert


def load_files(cert_path: str, key_path: str, alpn: Sequence[str] = ALPN, *,
               reuse: Certificate | None = None) -> Certificate:
    """A certificate chain file and its key file (may be the same file).

    `reuse`: the certificate loaded from these files before (with the same `alpn`); it is
    returned as it is when the files still hold its bytes, so a re-read of unchanged files
    makes no new context and changes nothing that is serving."""
    data = []
    for what, path in (("certificate", cert_path), ("key", key_path)):
        try:
            with open(path, "rb") as f:
                data.append(f.read())
        except OSError as e:
            raise TLSConfigError(path, f"cannot read the {what} file: {e.strerror}; check "
                                 f"the path of the TLS {what} in the config") from None
    return load_file_pem(cert_path, key_path, data[0], data[1], alpn, reuse=reuse)


def load_file_pem(cert_path: str, key_path: str, cert_pem: bytes, key_pem: bytes,
                  alpn: Sequence[str] = ALPN, *, reuse: Certificate | None = None
                  ) -> Certificate:
    """A pair read from a certificate file and its key file (by whoever watches them): as
    `load_files`, `reuse` is returned when it holds these bytes."""
    if reuse is not None and (reuse.cert_pem, reuse.key_pem) == (cert_pem, key_pem):
        return reuse
    source = cert_path if cert_path == key_path else f"{cert_path} (key {key_path})"
    return load_pem(cert_pem, key_pem, source, cert_label=f"certificate file {cert_path}",
                    key_label=f"key file {key_path}", alpn=alpn)


def load_secret(secret: Mapping[str, Any]) -> Certificate:
    """A `kubernetes.io/tls` Secret as the API returns it (base64 `tls.crt` and `tls.key`)."""
    try:
        cert_pem, key_pem, source = secret_pem(secret)
    except SecretError as e:
        raise TLSConfigError(e.source, e.message) from None
    return load_pem(cert_pem, key_pem, source, cert_label="tls.crt", key_label="tls.key")


# ---------------------------------------------------------------------------------------------
# The store


@dataclass(frozen=True)
class _Table:
    exact: dict[str, Certificate]
    wildcard: dict[str, Certificate]  # "example.com" -> the certificate for *.example.com
    default: Certificate | None
    certs: tuple[Certificate, ...]


def _index(certs: Iterable[Certificate], hosts: Mapping[str, Certificate] | None
           ) -> tuple[dict[str, Certificate], dict[str, Certificate]]:
    exact: dict[str, Certificate] = {}
    wildcard: dict[str, Certificate] = {}

    def put(pattern: str, cert: Certificate, force: bool) -> None:
        table, key = (wildcard, pattern[2:]) if pattern.startswith("*.") else (exact, pattern)
        have = table.get(key)
        # Two certificates for one name: the later expiry wins (overlap during a renewal).
        if force or have is None or cert.not_after > have.not_after:
            table[key] = cert

    for cert in certs:
        for name in cert.names:
            put(name, cert, False)
    for pattern, cert in (hosts or {}).items():
        if pattern:  # "" (no host) is the default's job
            put(pattern.lower().rstrip("."), cert, True)
    return exact, wildcard


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """`set()` arguments that name the same certificate objects (by identity) in the same
    order, under the same host patterns."""
    (certs, default, hosts), (certs2, default2, hosts2) = a, b
    return (default is default2 and len(certs) == len(certs2) and len(hosts) == len(hosts2)
            and all(x is y for x, y in zip(certs, certs2, strict=True))
            and all(p == q and x is y for (p, x), (q, y) in zip(hosts, hosts2, strict=True)))


class CertificateStore:
    """Certificates by server name, swapped as a whole; one server context selects from them.

    Selection: the exact name, else a `*.` wildcard covering exactly one more label, else the
    default; a handshake without SNI gets the default; with nothing to serve the handshake
    fails with an `unrecognized_name` alert. `handshakes` counts ClientHellos by outcome
    (exact, wildcard, default [SNI matched nothing], no_sni, unrecognized).
    """

    def __init__(self) -> None:
        self._table = _Table({}, {}, None, ())
        self._given: tuple[Any, ...] = ((), None, ())  # the arguments of the last set()
        self.handshakes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.swaps = 0
        self._context = new_server_context()
        self._context.sni_callback = self._on_sni
        self.alpn: tuple[str, ...] | None = None  # None: each certificate's own list

    def set(self, certs: Iterable[Certificate], default: Certificate | None = None, *,
            hosts: Mapping[str, Certificate] | None = None) -> None:
        """Replace every certificate at once; the next handshake sees the new set. Setting the
        same certificate objects again changes nothing (no swap, no log line).

        `hosts` optionally pins names or `*.` patterns to a certificate regardless of its SANs
        (e.g. an Ingress host -> its Secret); it wins over the SAN index.
        """
        certs = tuple(certs)
        given = (certs, default, tuple((hosts or {}).items()))
        if _same(given, self._given):
            return  # the same certificates (they are immutable): nothing to swap
        self._given = given
        listed = certs + tuple((hosts or {}).values()) + ((default,) if default else ())
        unique = tuple({id(c): c for c in listed}.values())
        exact, wildcard = _index(certs, hosts)
        self._table = _Table(exact, wildcard, default, unique)  # one assignment: atomic
        self.swaps += 1
        log.info("tls: %d certificate(s), %d name(s), default %s", len(unique),
                 len(exact) + len(wildcard), default.source if default else "none")

    def server_context(self) -> ssl.SSLContext:
        """The context for `loop.create_server(..., ssl=ctx)`; the same object every call."""
        return self._context

    def _select(self, server_name: str | None) -> tuple[Certificate | None, str]:
        table = self._table
        if not server_name:
            return table.default, "no_sni" if table.default else "unrecognized"
        name = server_name.lower().rstrip(".")
        cert = table.exact.get(name)
        if cert is not None:
            return cert, "exact"
        _, dot, parent = name.partition(".")
        if dot and parent:
            cert = table.wildcard.get(parent)
            if cert is not None:
                return cert, "wildcard"
        return table.default, "default" if table.default else "unrecognized"

    def match(self, server_name: str | None) -> Certificate | None:
        """The certificate a handshake for `server_name` (None: no SNI) would get."""
        return self._select(server_name)[0]

    def _on_sni(self, ssl_obj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                _ctx: ssl.SSLContext) -> int | None:
        cert, outcome = self._select(server_name)
        self.handshakes[outcome] += 1
        if cert is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        alpn = self.alpn
        ssl_obj.context = cert.context if alpn is None else cert.context_for(alpn)
        return None

    def certificates(self) -> tuple[Certificate, ...]:
        return self._table.certs

    def summary(self) -> list[dict[str, Any]]:
        """For /status.json: each certificate's names, expiry, serial, source, and default."""
        default = self._table.default
        out = []
        for cert in self._table.certs:
            info = cert.info()
            info["default"] = cert is default
            out.append(info)
        return out
