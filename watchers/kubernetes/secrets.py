"""A `kubernetes.io/tls` Secret's certificate pair, as PEM bytes (decoded, not parsed: parsing
and loading is the runtime's, edgelb.net.tls)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

TLS_SECRET_TYPE = "kubernetes.io/tls"
_FIX = "recreate it with `kubectl create secret tls NAME --cert=FILE --key=FILE`"


class SecretError(ValueError):
    """A Secret that holds no usable pair; the message names it and the fix."""

    def __init__(self, source: str, message: str) -> None:
        self.source = source
        self.message = message
        super().__init__(f"{source}: {message}")


def secret_source(secret: Any) -> str:
    """`Secret namespace/name`: how a Secret's certificate is named in messages."""
    meta = secret.get("metadata") if isinstance(secret, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    return f"Secret {meta.get('namespace') or '?'}/{meta.get('name') or '?'}"


def secret_pem(secret: Any) -> tuple[bytes, bytes, str]:
    """(tls.crt, tls.key, `Secret ns/name`) of a Secret as the API returns it (base64
    data); raises SecretError when it is not a TLS Secret with both keys."""
    source = secret_source(secret)
    if not isinstance(secret, Mapping):
        raise SecretError(source, f"is not an object; {_FIX}")
    kind = secret.get("type")
    if kind != TLS_SECRET_TYPE:
        raise SecretError(source, f"has type {kind!r}, not {TLS_SECRET_TYPE}; {_FIX}")
    data = secret.get("data")
    data = data if isinstance(data, Mapping) else {}
    decoded = []
    for key in ("tls.crt", "tls.key"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise SecretError(source, f"data.{key} is missing or empty; {_FIX}")
        try:
            decoded.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise SecretError(source, f"data.{key} is not valid base64; {_FIX}") from None
    return decoded[0], decoded[1], source
