"""Sources are sources: the watchers load without edgelb (what they need from it is passed in)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_watchers_import_no_edgelb_module() -> None:
    code = (
        "import sys\n"
        "import watchers.file, watchers.source, watchers.model\n"
        "import watchers.kubernetes.watcher, watchers.kubernetes.secrets\n"
        "loaded = sorted(m for m in sys.modules if m == 'edgelb' or m.startswith('edgelb.'))\n"
        "print(','.join(loaded))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
