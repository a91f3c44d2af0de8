"""Resource failures explain themselves (issue 14): a KV cache or weights allocation that
fails says what was being allocated, how many bytes, and which option or flag changes it."""

from __future__ import annotations

import re
from pathlib import Path

import fuzz_seeds
import pytest

import mistral7b
from mistral7b.errors import ResourceError


def test_kv_cache_that_cannot_be_allocated(tmp_path):
    llm = mistral7b.load(fuzz_seeds.write_gguf(tmp_path / "m.gguf"), kv_cache_memory=2**60)
    with pytest.raises(ResourceError) as info:
        llm.generate("hello", max_tokens=1)
    message = str(info.value)
    assert "KV cache" in message and "--kv-cache-memory" in message
    assert "kv_cache_memory=" in message
    n_bytes = int(re.search(r"(\d+) bytes", message).group(1))
    assert n_bytes >= 2**60  # the size asked for, in bytes


# A fresh interpreter, not a fork of this one: a forked child inherits this process's freed
# but still mapped heap, where a load can fit without asking the OS for memory at all (how
# much depends on which tests ran before). After its imports, the child caps its address
# space at what it has plus 200 MB, then loads the default model in float32 (~0.5 GB).
_LOAD_UNDER_A_LIMIT = """
import resource, sys
import mistral7b.tokenizer.gguf, mistral7b.weights.loader
from mistral7b.api import load
from mistral7b.errors import Mistral7BError
from mistral7b.kernels import native
native.ops()  # the kernel library, mapped before the limit is set
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 200 * 2**20, resource.RLIM_INFINITY))
try:
    load("default", dtype="float32")
except Mistral7BError as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
print("loaded")
"""


def test_weights_that_do_not_fit_the_memory_limit():
    """The default model in float32 under an address-space limit of 200 MB more than the
    process has: the load fails on a named tensor, saying how to make it fit."""
    import subprocess
    import sys

    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to size the limit")
    run = subprocess.run([sys.executable, "-c", _LOAD_UNDER_A_LIMIT], capture_output=True,
                         check=False,
                         text=True, timeout=300)
    detail = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 3, detail
    assert detail.startswith("ResourceError"), detail
    for fragment in ("could not allocate tensor", "bytes", "--quant", "quant=", "--dtype"):
        assert fragment in detail, detail
