"""Our kernels on both instruction sets (csrc/simd.h): one text compiled for AVX-512 VNNI and
for AVX2, chosen at run time, with MISTRAL7B_ISA=avx2 picking AVX2 on an AVX-512 CPU (read
once per process, so the AVX2 side runs in a child process).

- A child forced to AVX2 reports it, and keeps the bf16 kernel (AVX-512 BF16) off.
- Integer products are exact on both and the float work per lane is the same sequence, so
  qmm and kqmm give the same bits on both (int4 affine / symmetric, int8 with q = -128 and
  +127, Q4_K / Q5_K / Q6_K; one and many rows). RMSNorm and decode attention sum across 16
  lanes in AVX-512's order on both (simd.h f_sum16), so they match too; they are held here
  to float32 rounding only, which is what their callers rely on.
- On an AVX-512 CPU the kernel rule tests run again in a child forced to AVX2 (on an AVX2
  CPU they run in this process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mistral7b.kernels import native

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(native.ops() is None, reason="our kernels do not run here")

SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from mistral7b.kernels import native
from mistral7b.quant.layers import quantize_int4
import numpy as np
from tiny_models import random_k_blocks

ops = native.ops()
out = {{"isa": ops.isa(), "bf16": bool(ops.has_bf16())}}
g = torch.Generator().manual_seed(0)
for m in (1, 3, 11):
    x = torch.randn(m, 512, generator=g)
    x[0, :32] = 0.0
    x[-1, 7] = 30.0
    w = torch.randn(64, 512, generator=g) / 20
    q = quantize_int4(w, 64)
    p = native.pack_int4(q.q, q.scale, q.min, 64, exact=True)
    out[f"int4 affine {{m}}"] = p.matmul(x)
    p = native.pack_int4(q.q, q.scale, q.scale * -8.0, 64, exact=True)
    out[f"int4 symmetric {{m}}"] = p.matmul(x)
    q8 = torch.randint(-128, 128, (64, 512), generator=g, dtype=torch.int8)
    q8[0, :64] = -128
    q8[1, :64] = 127
    p8 = native.pack_int8(q8, torch.rand(64, generator=g) / 50)
    out[f"int8 {{m}}"] = p8.matmul(x)
    for kind in ("Q4_K", "Q5_K", "Q6_K"):
        blocks = random_k_blocks(kind, 32, 512, np.random.default_rng(m))
        kp = native.gguf_kpanels(kind, torch.from_numpy(blocks), 32, 512)
        out[f"{{kind}} {{m}}"] = kp.matmul(x)
    xs = torch.randn(m, 200, generator=g)
    out[f"norm {{m}}"] = ops.rms_norm(xs, torch.rand(200, generator=g), 1e-5)
    qa = torch.randn(m, 8, 64, generator=g)
    k, v = torch.randn(2, 50, 64, generator=g), torch.randn(2, 50, 64, generator=g)
    out[f"attention {{m}}"] = ops.paged_attention(qa, k, v, None, 3, 3 + 37, None)
torch.save(out, sys.argv[1])
"""


def _run(tmp_path: Path, isa: str | None) -> dict:
    out = tmp_path / f"{isa}.pt"
    env = dict(os.environ)
    env.pop("MISTRAL7B_ISA", None)
    if isa:
        env["MISTRAL7B_ISA"] = isa
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(ROOT / "tests")),
                           str(out)], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def test_forced_avx2_is_avx2_and_gives_avx512s_bits(tmp_path):
    avx2, best = _run(tmp_path, "avx2"), _run(tmp_path, None)
    assert avx2["isa"] == "avx2" and not avx2["bf16"]
    assert best["isa"] in ("avx512", "avx2")
    for key, want in best.items():
        if key in ("isa", "bf16"):
            continue
        if key.startswith(("norm", "attention")):
            torch.testing.assert_close(avx2[key], want, rtol=2e-6, atol=1e-6)
        else:
            assert torch.equal(avx2[key], want), key


@pytest.mark.skipif(native.ops() is None or native.ops().isa() != "avx512",
                    reason="an AVX2 CPU runs the rule tests on AVX2 in this process already")
def test_the_kernel_rule_tests_pass_on_avx2_too():
    files = ["tests/quant/test_native_kernel.py", "tests/quant/test_kquant.py",
             "tests/test_decode_kernels.py", "tests/quant/test_gguf_panels.py"]
    env = dict(os.environ, MISTRAL7B_ISA="avx2")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *files], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
