"""Build hook: compiles the data path's modules (edgelb/compiled.py) with mypyc.

Everything else about the package is in pyproject.toml. The compiled modules are optional:
with `EDGELB_COMPILE=0`, or when no C compiler works, the wheel carries the same modules as
plain Python (slower, otherwise the same). A type error in a compiled module fails the
build: it would be a wrong program, not a missing tool.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
MODULES = runpy.run_path(str(HERE / "edgelb" / "compiled.py"))["MODULES"]


def _warn(msg: str) -> None:
    print(f"edgelb setup: {msg}; the data path stays pure Python (slower)", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """A C build that fails (no compiler, no Python headers) leaves pure Python behind.

    All or nothing: mypyc's per-module stubs import one shared library, so after a failure
    every built file is removed rather than leave a stub whose library is missing.
    """

    def copy_file(self, infile, outfile, *args, **kwargs):  # type: ignore[override]
        """`build_ext --inplace` (the Makefile) replaces a library a running edgelb may have
        mapped: unlink it first, so the process keeps the old file instead of crashing on a
        rewritten one."""
        if str(outfile).endswith((".so", ".pyd")):
            Path(outfile).unlink(missing_ok=True)
        return super().copy_file(infile, outfile, *args, **kwargs)

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # distutils raises several unrelated error types here
            for path in self.get_outputs():
                Path(path).unlink(missing_ok=True)
            _warn(f"compiling failed ({e})")


def ext_modules() -> list:
    if os.environ.get("EDGELB_COMPILE", "1") == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypy (mypyc) is not installed")
        return []
    old = os.getcwd()
    os.chdir(HERE)  # mypyc wants paths relative to the project
    try:
        paths = [m.replace(".", "/") + ".py" for m in MODULES]
        # one shared library inside the package (edgelb/native__mypyc.*.so), not at top level
        return mypycify(paths, opt_level="3", group_name="edgelb.native")
    finally:
        os.chdir(old)


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
