"""The checks of .pre-commit-config.yaml, run by the suite so that CI enforces them too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [
    ["ruff", "check", "src", "tests", "bench"],
    ["mypy"],                  # files and options: [tool.mypy] in pyproject.toml
], ids=["ruff", "mypy"])
def test_clean(args):
    out = subprocess.run([sys.executable, "-m", *args], check=False, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (f"{' '.join(args)} (installed by pip install -e '.[dev]'):\n"
                                 + out.stdout[-4000:] + out.stderr[-2000:])
