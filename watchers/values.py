"""Reading values out of JSON that came from outside (Kubernetes objects, Marathon apps): small
pure functions that never raise, shared by the translators."""

from __future__ import annotations

import math
from typing import Any


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
