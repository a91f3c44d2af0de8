"""Helpers of the export tests: the token ids compared, float32 loads, random adapters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lora_helpers import write_random_adapter

IDS = [1, 5, 17, 33, 2, 60, 61, 7, 9, 11, 40, 41, 42, 3, 90, 12, 13, 14, 15, 16]  # > window 8


def load32(path, **kw):
    import mistral7b

    return mistral7b.load(path, device="cpu", dtype="float32", **kw)


def random_adapter(source: Path, folder: Path, *, seed: int, fmt: str = "peft",
                   std: float = 0.05) -> Path:
    """A rank-4 adapter on every linear of the model at `source`, random A and B."""
    return write_random_adapter(folder, source, seed=seed, rank=4, alpha=8, fmt=fmt, std=std)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`mistral7b ARGS...` in a fresh interpreter (stdin closed), its output captured."""
    return subprocess.run([sys.executable, "-m", "mistral7b.cli.main", *args], check=False,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
