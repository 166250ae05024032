"""Which modules of the data path are compiled to C with mypyc, and whether they are now.

The per-request Python of the proxy (about a quarter of its CPU per request, the rest being
the kernel's) runs roughly a quarter faster compiled: bench/micro_http.py measures it. The
same sources stay plain Python, so a build without a C compiler (or `EDGELB_COMPILE=0`)
ships them as they are and only runs slower. setup.py reads MODULES from here without
importing the package, so this file imports nothing of edgelb.

What compiling asks of these modules: they type-check under mypy (pyproject.toml,
[tool.mypy]); their classes are native (fixed attributes, attribute types checked at run
time, no subclassing from Python); and the protocol classes do not subclass
asyncio.Protocol (an event loop only calls their methods).
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

MODULES = (
    "edgelb.http.exchange",
    "edgelb.http.request",
    "edgelb.http.accounting",
    "edgelb.http.dispatch",
    "edgelb.http.upstream",
    "edgelb.http.client",
    "edgelb.http.response_head",
    "edgelb.http.headers",
    "edgelb.pool",
    "balancers.base",
    "balancers.least_loaded",
    "balancers.round_robin",
    "balancers.least_connections",
    "balancers.hashing",
    "balancers.ewma",
)


def is_compiled(module: str) -> bool:
    """True when `module` (imported here if it was not yet) was loaded from a C extension."""
    return str(importlib.import_module(module).__file__).endswith((".so", ".pyd"))


@functools.cache  # what a process loaded does not change
def describe() -> str:
    """'data path compiled with mypyc', 'pure Python', or which part is compiled."""
    done = [m for m in MODULES if is_compiled(m)]
    if len(done) == len(MODULES):
        return "data path compiled with mypyc"
    if not done:
        return "pure Python"
    return "partly compiled with mypyc: " + ", ".join(done)


def build_kind() -> str:
    """The `build` label of edgelb_build_info: "compiled" (every module of MODULES loaded from
    C), "pure" (none), or "partial" (a tree where some did not build)."""
    done = sum(1 for m in MODULES if is_compiled(m))
    return "compiled" if done == len(MODULES) else "pure" if not done else "partial"


def stale() -> list[str]:
    """Compiled modules whose source is newer than their C code: a tree edited since
    `make compiled`, where the old code would still be what is imported. (The code is in
    one shared library, edgelb/native__mypyc*; each module's own extension only loads it.)"""
    here = Path(__file__).parent
    libs = list(here.glob("native__mypyc*"))
    out = []
    for module in MODULES:
        source = here.parent.joinpath(*module.split(".")).with_suffix(".py")
        exts = list(source.parent.glob(source.stem + ".*.so"))
        if not exts or not source.exists():
            continue
        if source.stat().st_mtime > max(p.stat().st_mtime for p in exts + libs):
            out.append(module)
    return out
