"""The wheel that `pip install .` builds (as the Dockerfile does) carries everything edgelb needs.

Builds the wheel offline from a copy of the packaging inputs (the same allow-list as
.dockerignore), installs it with --no-deps into a fresh venv outside the source tree, and runs
the installed copy. The dependencies come from the running (dev) environment through a .pth
file, so nothing is downloaded. Editable-install hooks of the dev environment are not
processed from a .pth path entry, so imports cannot fall back to the source tree; the test
checks where every module was loaded from anyway.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ["pyproject.toml", "setup.py", "README.md", "LICENSE", "edgelb", "watchers", "balancers",
           "templates"]
IGNORE = shutil.ignore_patterns("__pycache__", "*.py[co]", "*.egg-info", "*.so")

# Runs inside the installed venv, cwd outside the source tree; prints one JSON document.
PROBE = r"""
import importlib, importlib.util, json, sys
from importlib import resources

import jinja2
from jinja2 import nodes

mods = ["edgelb", "edgelb.ops.cli", "edgelb.http", "edgelb.control", "edgelb.net",
        "edgelb.tcp.listener", "edgelb.ops", "watchers", "watchers.model", "balancers",
        "edgelb.templates"]
files = {m: importlib.import_module(m).__file__ for m in mods}


class Anything(jinja2.ChainableUndefined):
    # Stands in for every missing variable: the templates' context is the app's business,
    # here only shipping, loading and rendering machinery is checked.
    def __call__(self, *a, **k): return self
    def __int__(self): return 0
    def __float__(self): return 0.0
    def __round__(self, n=0): return 0
    def __format__(self, spec): return ""
    def _self(self, *a): return self
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _self
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _self
    __pow__ = __rpow__ = __neg__ = __pos__ = _self
    def __lt__(self, other): return False
    __le__ = __gt__ = __ge__ = __lt__


def walk(node, prefix=""):
    for child in node.iterdir():
        rel = prefix + child.name
        if child.is_dir():
            yield from walk(child, rel + "/")
        elif child.name.endswith(".j2"):
            yield rel, child.read_text("utf-8")


root = resources.files("edgelb.templates")
top_level_templates = importlib.util.find_spec("templates") is not None
rendered = {}
for rel, source in sorted(walk(root)):
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(root)), undefined=Anything)
    used = {n.name for n in env.parse(source).find_all(nodes.Filter)}
    for name in used - set(env.filters):  # the app registers its own filters
        env.filters[name] = lambda value, *a, **k: value
    out = env.get_template(rel).render()
    rendered[rel] = len(out)

loaded = None
if importlib.util.find_spec("edgelb.ops.admin") is not None:
    admin = importlib.import_module("edgelb.ops.admin")
    if hasattr(admin, "load_template"):
        admin.load_template()  # the app's own lookup and compile, from the installed copy
        if hasattr(admin, "load_script"):
            assert b"status.json" in admin.load_script()  # the status page's script ships too
        loaded = admin.__file__

from edgelb import compiled

built = {m: importlib.import_module(m).__file__ for m in compiled.MODULES}
print(json.dumps({"files": files, "templates_root": str(root), "rendered": rendered,
                  "top_level_templates": top_level_templates,
                  "admin_template": loaded, "prefix": sys.prefix, "compiled": built,
                  "build": compiled.describe()}))
"""


def source_version() -> str:
    text = (ROOT / "edgelb" / "__init__.py").read_text()
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M)
    assert match, "edgelb/__init__.py must set __version__ = \"X.Y.Z\""
    return match.group(1)


def run(cmd: list[str], cwd: Path,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def copy_inputs(src: Path) -> Path:
    """The packaging inputs (what .dockerignore lets in) copied to `src`."""
    src.mkdir()
    for name in SHIPPED:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=IGNORE)
        elif path.exists():
            shutil.copy2(path, src / name)
    return src


def build_and_install(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """A venv outside the source tree with only the built wheel installed; returns its root."""
    setuptools_version = metadata.version("setuptools")
    if int(setuptools_version.split(".")[0]) < 77 or not _has("wheel"):
        pytest.fail(
            f"setuptools>=77 and wheel are needed to build offline (found setuptools "
            f"{setuptools_version}); run `make venv` (installs the '.[test]' extra)"
        )
    tmp = tmp_path_factory.mktemp("packaging")
    src = copy_inputs(tmp / "src")

    dist = tmp / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(dist)],
        cwd=tmp, env={**os.environ, **env},
    )
    (wheel,) = dist.glob("edgelb-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "-q", str(wheel)],
        cwd=tmp,
    )
    # The dependencies (uvloop, jinja2, ...) from the dev environment, after the venv's own
    # site-packages on sys.path, so the installed edgelb wins over anything found there.
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = Path(run([str(python), "-c", where], cwd=tmp).stdout.strip())
    dev_paths = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (purelib / "zz_dev_deps.pth").write_text("".join(f"{p}\n" for p in dev_paths))
    return venv


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_and_install(tmp_path_factory, {"EDGELB_COMPILE": "1"})


def _has(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


pytestmark = pytest.mark.timeout(240)  # the first test builds the wheel: mypyc and a C compiler


def test_console_script_prints_the_version(installed: Path) -> None:
    proc = run([str(installed / "bin" / "edgelb"), "--version"], cwd=installed.parent)
    assert proc.stdout.strip() == f"edgelb {source_version()}"


def test_installed_copy_ships_the_packages_and_templates(installed: Path) -> None:
    probe = installed.parent / "probe.py"
    probe.write_text(PROBE)
    proc = run([str(installed / "bin" / "python"), str(probe)], cwd=installed.parent)
    report = json.loads(proc.stdout)
    prefix = Path(report["prefix"]).resolve()
    assert prefix == installed.resolve()
    for module, file in report["files"].items():
        assert file, f"{module} has no __file__ (a namespace package?): add an __init__.py"
        assert Path(file).resolve().is_relative_to(prefix), f"{module} loaded from {file}"
    assert Path(report["templates_root"]).resolve().is_relative_to(prefix)
    assert report["rendered"], "the installed templates package holds no *.j2 file"
    # shipped as edgelb.templates: no top-level `templates` package (another project's name)
    assert report["top_level_templates"] is False
    assert all(size > 0 for size in report["rendered"].values()), report["rendered"]
    if (ROOT / "templates" / "status.html.j2").exists():
        assert "status.html.j2" in report["rendered"]
    if report["admin_template"] is not None:
        assert Path(report["admin_template"]).resolve().is_relative_to(prefix)


def _can_compile() -> bool:
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which("cc") is not None and include.exists() and _has("mypy")


@pytest.mark.skipif(not _can_compile(), reason="no C compiler or Python headers (the Makefile "
                    "installs gcc and python3-dev on Debian when it may)")
def test_the_wheel_carries_the_data_path_compiled(installed: Path) -> None:
    """setup.py compiles edgelb/compiled.py's modules with mypyc, and the installed copy loads
    them as C extensions."""
    probe = installed.parent / "probe.py"
    probe.write_text(PROBE)
    proc = run([str(installed / "bin" / "python"), str(probe)], cwd=installed.parent)
    report = json.loads(proc.stdout)
    prefix = Path(report["prefix"]).resolve()
    for module, file in report["compiled"].items():
        assert Path(file).resolve().is_relative_to(prefix), f"{module} loaded from {file}"
        assert file.endswith(".so"), f"{module} is not compiled: {file}"
    assert report["build"] == "data path compiled with mypyc"


def test_installed_copy_renders_the_kubernetes_manifests(installed: Path) -> None:
    proc = run([str(installed / "bin" / "edgelb"), "manifests", "--kind", "daemonset"],
               cwd=installed.parent)
    assert "kind: DaemonSet" in proc.stdout
    assert "kind: IngressClass" in proc.stdout


def test_without_compiling_the_wheel_is_pure_python_and_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """EDGELB_COMPILE=0 (or no C compiler): the same modules ship as plain Python."""
    venv = build_and_install(tmp_path_factory, {"EDGELB_COMPILE": "0"})
    probe = venv.parent / "probe.py"
    probe.write_text(PROBE)
    report = json.loads(run([str(venv / "bin" / "python"), str(probe)], cwd=venv.parent).stdout)
    assert report["build"] == "pure Python"
    assert all(f.endswith(".py") for f in report["compiled"].values()), report["compiled"]
    proc = run([str(venv / "bin" / "edgelb"), "--version"], cwd=venv.parent)
    assert proc.stdout.strip() == f"edgelb {source_version()}"


@pytest.mark.skipif(not _can_compile(), reason="no C compiler or Python headers")
def test_a_type_error_fails_a_strict_build_and_leaves_a_default_one_pure(tmp_path: Path) -> None:
    """EDGELB_COMPILE=1 (Makefile, Dockerfile) turns a type error in a compiled module into a
    failed build naming it; a plain build warns and ships the modules as plain Python."""
    src = copy_inputs(tmp_path / "src")
    with (src / "edgelb" / "http" / "headers.py").open("a") as f:
        f.write('\n\ndef _broken() -> int:\n    return "not an int"\n')
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
           "--no-index", "-v", "-w"]
    strict = subprocess.run([*cmd, str(tmp_path / "strict")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=180, env={**os.environ, "EDGELB_COMPILE": "1"})
    assert strict.returncode != 0
    assert "headers.py" in strict.stdout + strict.stderr
    assert "Incompatible return value type" in strict.stdout + strict.stderr
    assert not list((tmp_path / "strict").glob("*.whl"))

    env = {k: v for k, v in os.environ.items() if k != "EDGELB_COMPILE"}
    plain = subprocess.run([*cmd, str(tmp_path / "plain")], cwd=tmp_path, capture_output=True,
                           text=True, timeout=180, env=env)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "edgelb setup: mypyc failed" in plain.stdout + plain.stderr
    (wheel,) = (tmp_path / "plain").glob("edgelb-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")  # no C extension inside
