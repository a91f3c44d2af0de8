"""Resource failures explain themselves (issue 14): a KV cache or weights allocation that
fails says what was being allocated, how many bytes, and which option or flag changes it."""

from __future__ import annotations

import re

import fuzz_harness
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


def test_weights_that_do_not_fit_the_memory_limit():
    """The default model in float32 (~0.5 GB of dequantized weights) under an address-space
    limit of 200 MB more than the process has: the load fails on a named tensor."""
    def load() -> None:
        mistral7b.load("default", dtype="float32")

    result = fuzz_harness.run_one("weights", 0, load, timeout_s=120, memory_mb=200)
    assert result.outcome == fuzz_harness.REJECTED, result.detail
    assert result.detail.startswith("ResourceError"), result.detail
    for fragment in ("could not allocate tensor", "bytes", "--quant", "quant=", "--dtype"):
        assert fragment in result.detail, result.detail
