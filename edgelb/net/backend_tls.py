"""TLS from the proxy to backends: the per-service `tls:` setting and its client contexts.

A service's `tls:` value becomes a `BackendTLS` (`parse_backend_tls`); `client_context(spec)`
gives the `ssl.SSLContext` for `loop.create_connection(..., ssl=ctx, server_hostname=...)` and
`server_hostname(spec, host)` the name to pass with it.

Choices (documented here because they are not visible at the call sites):
- `PROTOCOL_TLS_CLIENT`, TLS 1.2 minimum, no compression, no renegotiation; Python's default
  client cipher list (it is already AEAD/forward-secret first; a backend is not an internet
  client, so it is not narrowed further than that).
- ALPN offers `http/1.1` by default (the data path speaks nothing else); TCP mode passes
  `alpn=()` because it does not know the protocol it relays.
- Verification uses the given CA file, else the system store; the name checked is `sni` when
  configured, else the backend's host. An IP host is checked against the certificate's IP
  subjectAltNames and sends no SNI (CPython never sends an IP as SNI, as RFC 6066 requires).
- Contexts are cached per (spec, ALPN): building one (the system store especially) costs
  milliseconds. The files behind a cached context are looked at again at most every
  `RECHECK_SECONDS`; when one changed (a rotated CA or client certificate) a new context is
  built for the next connections. A rebuild that fails keeps the previous context and logs it.
  The app's file watcher also watches these files and, once a changed config applies, marks
  the contexts built from them (`files_changed`), so a rotation applies within its poll.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import math
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from watchers.values import is_ip

log = logging.getLogger("edgelb.net.backend_tls")

ALPN_HTTP = ("http/1.1",)
RECHECK_SECONDS = 5.0
CACHE_SIZE = 256  # contexts kept; specs only change with the config, so this is never reached

KEYS = ("verify", "ca", "sni", "cert", "key")
EXAMPLE = "true, {verify: false} or {ca: ca.pem, sni: api.internal}"

_DNS_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DNS_NAME = re.compile(rf"^{_DNS_LABEL}(?:\.{_DNS_LABEL})*$")


class BackendTLSError(ValueError):
    """A setting that cannot be used: `key` is the offending key of `tls:`, the message says
    what is wrong and how to fix it."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


@dataclass(frozen=True)
class BackendTLS:
    """How to speak TLS to a service's backends.

    verify: check the backend's certificate chain and name. ca: a PEM file of trusted
    certificates (None: the system store). sni: the name sent and verified (None: the backend's
    host, no SNI when that is an IP). cert/key: a client certificate and its key (PEM files),
    for backends that require one.
    """

    verify: bool = True
    ca: str | None = None
    sni: str | None = None
    cert: str | None = None
    key: str | None = None


# ---------------------------------------------------------------------------------------------
# Parsing


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", int: "a number", float: "a number",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)



def parse_backend_tls(value: Any, path: str) -> tuple[BackendTLS | None, list[str]]:
    """A service's `tls:` config value -> (spec or None for plain TCP, errors).

    Accepted: null/false (no TLS), true (verify against the system store), or a mapping with
    the keys of `BackendTLS`. Files are read and loaded here, so `edgelb check` reports a
    missing or unusable CA, certificate or key. Each error is one line naming `path.key`.
    With errors the spec is None.
    """
    where = path or "tls"
    if value is None or value is False:
        return None, []
    if value is True:
        return BackendTLS(), []
    if not isinstance(value, dict):
        return None, [f"{where}: expected {EXAMPLE}, got {_kind(value)}"]
    errors: list[str] = []

    def error(key: str, message: str) -> None:
        errors.append(f"{_join(path, key)}: {message}")

    for key in value:
        if isinstance(key, bool):
            error(str(key).lower(), "YAML reads a bare on/off/yes/no/true/false key as a "
                  f"boolean; quote it, or use one of {', '.join(KEYS)}")
        elif not isinstance(key, str) or key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(KEYS)}"
            error(str(key), f"unknown key; {hint}")

    verify = value.get("verify", True)
    if not isinstance(verify, bool):
        error("verify", f"expected true or false, got {_kind(verify)}")
        verify = True
    strings: dict[str, str | None] = {}
    for key in ("ca", "sni", "cert", "key"):
        raw = value.get(key)
        if raw is None:
            strings[key] = None
        elif not isinstance(raw, str) or not raw.strip():
            what = "a host name" if key == "sni" else "the path of a PEM file"
            got = "an empty string" if isinstance(raw, str) else _kind(raw)
            error(key, f"expected {what}, got {got}")
            strings[key] = None
        else:
            strings[key] = raw.strip()

    sni = strings["sni"]
    if sni is not None:
        sni = sni.lower().rstrip(".")
        if is_ip(sni):
            error("sni", f"{sni} is an IP address, which cannot be sent as SNI; give the host "
                  "name on the backend's certificate, or leave sni out to check its IP")
            sni = None
        elif not _DNS_NAME.match(sni) or len(sni) > 253:
            error("sni", f"{strings['sni']!r} is not a valid host name; give the name on the "
                  "backend's certificate, e.g. api.internal")
            sni = None
    if strings["ca"] is not None and not verify:
        error("ca", "a CA is only used when verifying; remove ca, or remove verify: false")
    cert, key = strings["cert"], strings["key"]
    if ("cert" in value) != ("key" in value):
        have, lack = ("cert", "key") if "cert" in value else ("key", "cert")
        error(lack, f"{lack} is required with {have}; give the path of the client "
              f"{'private key' if lack == 'key' else 'certificate'} (PEM)")

    if errors:
        return None, errors
    spec = BackendTLS(verify=verify, ca=strings["ca"], sni=sni, cert=cert, key=key)
    try:
        _load_files(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), spec)
    except BackendTLSError as e:
        return None, [f"{_join(path, e.key)}: {e}"]
    return spec, []


# ---------------------------------------------------------------------------------------------
# Contexts


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # OpenSSL calls this only for an encrypted key; without it, it would prompt on the tty.
    raise _EncryptedKey


def _read_error(key: str, path: str, e: OSError, what: str) -> BackendTLSError:
    return BackendTLSError(key, f"cannot read {path} ({e.strerror or e}); give the path of "
                           f"{what} in PEM")


def _load_files(ctx: ssl.SSLContext, spec: BackendTLS) -> None:
    """Load the CA and client certificate files of `spec` into `ctx`."""
    if spec.ca is not None:
        what = "the CA certificate(s) that signed the backends' certificates"
        try:
            with open(spec.ca, "rb") as f:
                data = f.read()
        except OSError as e:
            raise _read_error("ca", spec.ca, e, what) from None
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise BackendTLSError("ca", f"{spec.ca} holds no PEM certificate (no -----BEGIN "
                                  f"CERTIFICATE----- block); give {what}")
        try:
            ctx.load_verify_locations(cafile=spec.ca)
        except (ssl.SSLError, OSError) as e:
            raise BackendTLSError("ca", f"OpenSSL cannot load {spec.ca} ({_reason(e)}); give "
                                  f"{what}") from None
    if spec.cert is not None and spec.key is not None:
        for key, path in (("cert", spec.cert), ("key", spec.key)):
            what = "the client certificate" if key == "cert" else "the client certificate's key"
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise _read_error(key, path, e, what) from None
        try:
            ctx.load_cert_chain(spec.cert, spec.key, password=_no_password)
        except _EncryptedKey:
            raise BackendTLSError("key", f"{spec.key} is encrypted; give the key without a "
                                  "passphrase (e.g. `openssl pkey -in KEY -out KEY.plain`)"
                                  ) from None
        except (ssl.SSLError, OSError) as e:
            reason = _reason(e)
            if "KEY_VALUES_MISMATCH" in reason.upper():
                raise BackendTLSError("key", f"{spec.key} is not the key of {spec.cert}; give "
                                      "the key the client certificate was issued for") from None
            raise BackendTLSError("cert", f"OpenSSL cannot load {spec.cert} with {spec.key} "
                                  f"({reason}); give a PEM certificate (chain) and its "
                                  "unencrypted key") from None


def _reason(e: Exception) -> str:
    return str(getattr(e, "reason", None) or e)


_warned_no_store = False


def _load_system_store(ctx: ssl.SSLContext) -> None:
    global _warned_no_store
    ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    paths = ssl.get_default_verify_paths()
    found = any(p and os.path.exists(p) for p in (paths.cafile, paths.capath))
    if not found and not ctx.cert_store_stats().get("x509_ca") and not _warned_no_store:
        _warned_no_store = True
        log.warning("backend tls: no system CA certificates found (looked at %s and %s); "
                    "verifying backends will fail: install the ca-certificates package or "
                    "give tls.ca", paths.openssl_cafile, paths.openssl_capath)


def _build(spec: BackendTLS, alpn: Sequence[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if spec.verify:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if spec.ca is None:
            _load_system_store(ctx)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    _load_files(ctx, spec)
    return ctx


def _signature(spec: BackendTLS) -> tuple[tuple[int, int, int] | None, ...]:
    """What identifies the current contents of the spec's files (None: unreadable)."""
    out = []
    for path in (spec.ca, spec.cert, spec.key):
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclass
class _Entry:
    context: ssl.SSLContext
    signature: tuple[tuple[int, int, int] | None, ...]
    checked: float


_cache: dict[tuple[BackendTLS, tuple[str, ...]], _Entry] = {}
_clock: Callable[[], float] = time.monotonic


def client_context(spec: BackendTLS, alpn: Sequence[str] = ALPN_HTTP) -> ssl.SSLContext:
    """The client context for `spec` (cached; rebuilt when its files change).

    Raises BackendTLSError when the context cannot be built the first time (a file that
    `parse_backend_tls` accepted has gone or broken since).
    """
    key = (spec, tuple(alpn))
    now = _clock()
    entry = _cache.get(key)
    if entry is not None:
        if now - entry.checked < RECHECK_SECONDS:
            return entry.context
        entry.checked = now
        signature = _signature(spec)
        if signature == entry.signature:
            return entry.context
        try:
            entry.context = _build(spec, alpn)
        except BackendTLSError as e:
            log.warning("backend tls: tls.%s changed but cannot be loaded: %s; keeping the "
                        "previous certificates", e.key, e)
        else:
            log.info("backend tls: reloaded %s", ", ".join(
                p for p in (spec.ca, spec.cert, spec.key) if p))
        entry.signature = signature  # a broken file is not retried until it changes again
        return entry.context
    signature = _signature(spec)
    context = _build(spec, alpn)
    if len(_cache) >= CACHE_SIZE:
        del _cache[next(iter(_cache))]
    _cache[key] = _Entry(context, signature, now)
    return context


def files_changed(paths: Iterable[str]) -> int:
    """The file watcher saw these files change: contexts built from any of them are rebuilt
    for the next connection (not at the next `RECHECK_SECONDS` check; a rebuild that fails
    keeps the previous context, as there). Returns how many contexts were marked."""
    changed = set(paths)
    marked = 0
    for (spec, _alpn), entry in _cache.items():
        if changed.intersection(p for p in (spec.ca, spec.cert, spec.key) if p):
            entry.checked = -math.inf
            entry.signature = ()  # matches no real signature: rebuild
            marked += 1
    return marked


def clear_cache() -> None:
    """Forget every cached context (tests; a config reload does not need it)."""
    _cache.clear()


def server_hostname(spec: BackendTLS, host: str) -> str:
    """The `server_hostname` to connect to a backend at `host` with.

    `spec.sni` when set, else the host itself: a name is sent as SNI and verified; an IP
    literal is verified against the certificate's IP addresses and not sent (CPython's rule).
    Never empty, so it also works with `check_hostname` on.
    """
    return spec.sni or host


# ---------------------------------------------------------------------------------------------
# TCP mode: TLS over the raw non-blocking sockets its relay drives itself


def wrap(sock: socket.socket, spec: BackendTLS, host: str,
         alpn: Sequence[str] = ()) -> ssl.SSLSocket:
    """Wrap a connected non-blocking socket for TLS to the backend at `host`; no I/O yet.

    The returned SSLSocket takes over the descriptor (`sock` is detached and must not be used
    or closed afterwards); close the SSLSocket instead. Drive the handshake with `handshake`.
    """
    ctx = client_context(spec, alpn)
    return ctx.wrap_socket(sock, server_hostname=server_hostname(spec, host),
                           do_handshake_on_connect=False)


async def handshake(loop: asyncio.AbstractEventLoop, tls_sock: ssl.SSLSocket) -> None:
    """Complete the handshake of a non-blocking `wrap`ped socket, waiting on the loop.

    Raises ssl.SSLError (ssl.SSLCertVerificationError for a refused certificate) or OSError;
    the caller bounds it with its connect timeout and closes the socket on any failure.
    """
    fd = tls_sock.fileno()
    while True:
        try:
            tls_sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            add, remove = loop.add_reader, loop.remove_reader
        except ssl.SSLWantWriteError:
            add, remove = loop.add_writer, loop.remove_writer
        ready = loop.create_future()
        add(fd, lambda f=ready: f.done() or f.set_result(None))
        try:
            await ready
        finally:
            remove(fd)
