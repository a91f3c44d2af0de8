"""Helpers for the command-line tests: they run the real `mistral7b` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# ../shared/reference beside the project (DESIGN §8): llama.cpp's outputs on the default model.
REFERENCE = Path(__file__).resolve().parents[3] / "shared/reference/smollm2/reference.json"
CLI = [sys.executable, "-m", "mistral7b.cli.main"]
TIMEOUT = 240  # seconds; a model-loading run takes ~5-15 s on the 2-core machines


def run_cli(*args: str, input: str | None = None, env: dict[str, str] | None = None,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """`mistral7b ARGS...` with `input` on stdin (else /dev/null, never the test's TTY)."""
    stdin = None if input is not None else subprocess.DEVNULL
    return subprocess.run([*CLI, *args], check=False, input=input, stdin=stdin,
                          capture_output=True, text=True, env=env or cli_env(), timeout=timeout)


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", **extra)
    return env


def assert_user_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit code 2 and exactly one stderr line `error: ...` (no traceback); returns it."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]
