"""Lint is part of the suite: `ruff check .` and hadolint on the Dockerfile must both pass."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tool(name: str) -> str:
    """The tool installed beside the running interpreter (the '.[test]' extra), else on PATH."""
    for scripts in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        if (scripts / name).exists():
            return str(scripts / name)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: run `make venv` (installs the '.[test]' extra)")
    return found


def check(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}"


def test_ruff_check() -> None:
    check([tool("ruff"), "check", "--no-cache", "--output-format", "concise", "."])


def test_hadolint_dockerfile() -> None:
    check([tool("hadolint"), "Dockerfile"])
