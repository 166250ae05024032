"""Reading values out of JSON that came from outside (Kubernetes objects, Marathon apps): small
pure functions that never raise, shared by the translators."""

from __future__ import annotations

import ipaddress
import math
from typing import Any

Obj = dict[str, Any]


def as_map(value: Any) -> Obj:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def as_str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def valid_port(value: Any) -> bool:
    return is_int(value) and 1 <= value <= 65535


def positive(value: Any) -> float | None:
    """`value` as a finite number above 0 (a number or a numeric string), else None."""
    if isinstance(value, bool):
        return None
    try:
        f = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def path_prefix(path: str) -> str:
    """A path prefix without its trailing slashes (`/api/` is `/api`; `/` stays `/`)."""
    return path.rstrip("/") or "/"


def is_ip(text: str) -> bool:
    """Whether `text` is an IPv4 or IPv6 address (not a host name)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
