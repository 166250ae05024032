"""Build hook: compiles the data path's modules (edgelb/compiled.py) with mypyc.

Everything else about the package is in pyproject.toml, but for the package list: the
repository's top-level `templates/` ships as `edgelb.templates` (a top-level `templates`
package would take a name that belongs to another PyPI project). `EDGELB_COMPILE` chooses:

- unset (a plain `pip install .`): compile if possible; if mypyc or the C compiler fails, say
  why and ship the same modules as plain Python (slower, otherwise the same), so an install
  never fails for want of a compiler or over a newer mypy's opinion;
- `1` (the Makefile, the Dockerfile, the packaging test): compile or fail the build, so a
  type error or a broken toolchain is seen, not hidden behind a slower proxy;
- `0`: do not compile.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
MODULES = runpy.run_path(str(HERE / "edgelb" / "compiled.py"))["MODULES"]


MODE = os.environ.get("EDGELB_COMPILE", "")
STRICT = MODE == "1"


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
            if STRICT:
                raise
            _warn(f"compiling failed ({e})")


def ext_modules() -> list:
    if MODE == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        if STRICT:
            raise SystemExit(
                "edgelb setup: EDGELB_COMPILE=1 but mypy (mypyc) is not installed") from None
        _warn("mypy (mypyc) is not installed")
        return []
    old = os.getcwd()
    os.chdir(HERE)  # mypyc wants paths relative to the project
    try:
        paths = [m.replace(".", "/") + ".py" for m in MODULES]
        # one shared library inside the package (edgelb/native__mypyc.*.so), not at top level
        return mypycify(paths, opt_level="3", group_name="edgelb.native")
    except (Exception, SystemExit) as e:  # mypyc exits on a type error
        if STRICT:
            raise
        _warn(f"mypyc failed ({e!r})")
        return []
    finally:
        os.chdir(old)


# Every package under edgelb, watchers and balancers (subpackages need an __init__.py), and
# the templates under edgelb's name.
PACKAGES = [*find_packages(include=["edgelb", "edgelb.*", "watchers", "watchers.*",
                                    "balancers", "balancers.*"]), "edgelb.templates"]

setup(
    packages=PACKAGES,
    package_dir={"edgelb.templates": "templates"},
    package_data={"edgelb.templates": ["**/*.j2", "**/*.html", "**/*.yaml", "**/*.js"]},
    ext_modules=ext_modules(),
    cmdclass={"build_ext": OptionalBuildExt},
)
