"""Our kernels build wherever they can run. The kernel tests skip on a CPU where the library
cannot run (not x86, no compiler, neither AVX2 nor AVX-512 VNNI); without this file a
compile error would look the same: a long run of skips. Here it is one failure that shows
the compiler's message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mistral7b.kernels import native

pytestmark = pytest.mark.skipif(
    not native._is_x86() or native._compiler() is None
    or os.environ.get("MISTRAL7B_NATIVE", "1") == "0",
    reason="no x86 CPU or no C++ compiler here, or MISTRAL7B_NATIVE=0: nothing to build")


def _has_avx2() -> bool:
    """AVX2, FMA and F16C, what the kernel's AVX2 side needs (qmm_ops.cpp isa()), read as
    whole words of the first `flags` line (a substring test would take fma4 for fma)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo to read this CPU's features from")
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return {"avx2", "fma", "f16c"} <= set(line.partition(":")[2].split())


def test_the_kernel_library_compiles_and_links() -> None:
    # raises RuntimeError carrying the compiler's output when a source does not compile
    path = native.build()
    assert path.is_file() and path.stat().st_size > 0


def test_an_avx2_cpu_runs_our_kernels() -> None:
    if not _has_avx2():
        pytest.skip("this CPU has no AVX2")
    ops = native.ops()
    assert ops is not None, "the library built but did not load: see the log's warning"
    assert ops.isa() in ("avx2", "avx512")
