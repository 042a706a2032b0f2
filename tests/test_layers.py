"""The import-linter contract in pyproject.toml holds, and it would catch an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(package_parent: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    cmd = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def test_layers_point_down():
    run = lint_imports(ROOT, ROOT)
    assert run.returncode == 0, run.stdout[-3000:]


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "mmalign", tmp_path / "mmalign", ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    media = tmp_path / "mmalign/data/media.py"
    upward = "\n\ndef _up():\n    from mmalign.model import SpeechLLM\n"
    media.write_text(media.read_text() + upward)
    run = lint_imports(tmp_path, tmp_path)
    assert run.returncode != 0
    assert "mmalign.data.media -> mmalign.model" in run.stdout
