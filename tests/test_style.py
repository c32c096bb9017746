"""The code passes its own linter and formatter (ruff, configured in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args):
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(exe).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_check_passes():
    r = ruff("check", ".")
    assert r.returncode == 0, r.stdout[-3000:]


def test_ruff_format_leaves_every_file_as_it_is():
    r = ruff("format", "--check", ".")
    assert r.returncode == 0, r.stdout[-3000:]
