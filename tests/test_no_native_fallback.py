"""The path for a CPU where our kernel library cannot run (neither AVX2 nor AVX-512 VNNI, no compiler),
forced with MISTRAL7B_NATIVE=0 in a child process: PyTorch's int4 kernel, SDPA decode
attention, the torch RMSNorm formula, no fused step, K-quants as int4 / int8 and the
embedding table as floats. It runs, and its float32 decode logits equal this process's (our
kernels) within float32 rounding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent

SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
from test_fused_step import PROMPTS, engine, greedy_steps, tiny
from mistral7b.kernels import native
from mistral7b.quant.layers import Int4Linear

out = {{"native": native.ops() is not None}}
model = tiny(None)
eng = engine(model, True)
out["fused"] = eng.fused_step() is not None
out["paged"] = eng.pool.paged is not None
feed = [[5, 6, 7]] * 24
out["float"] = torch.stack([lg for _, lg in greedy_steps(eng, 24, feed=feed)])
q = tiny("int4")
out["int4_kernel"] = q.layers[0].attention.wq.kernel
out["int4"] = torch.stack([lg for _, lg in greedy_steps(engine(q, True), 8, feed=feed)])
import pathlib, tempfile, mistral7b
from tiny_models import k_quant_gguf
path, _ = k_quant_gguf(pathlib.Path(tempfile.mkdtemp()) / "k.gguf")
llm = mistral7b.load(path, quant="auto", dtype="float32")
out["k_layers"] = sorted({{type(m).__name__ for m in llm.model.modules()}})
out["k_logits"] = llm.logits(list(range(3, 30)))
torch.save(out, sys.argv[1])
"""


def run(tmp_path: Path, native: bool) -> dict:
    out = tmp_path / f"native{int(native)}.pt"
    env = dict(os.environ, MISTRAL7B_NATIVE="1" if native else "0")
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(here=str(HERE)), str(out)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def test_without_our_kernels_everything_still_runs_and_agrees(tmp_path):
    off, on = run(tmp_path, False), run(tmp_path, True)
    assert not off["native"] and not off["fused"] and not off["paged"]
    assert off["int4_kernel"] == "torch"
    assert torch.isfinite(off["int4"]).all()
    assert "KQuantLinear" not in off["k_layers"] and "QuantEmbedding" not in off["k_layers"]
    assert {"Int4Linear", "Int8Linear", "Embedding"} <= set(off["k_layers"])
    assert torch.isfinite(off["k_logits"]).all()
    if on["native"]:                      # a CPU where ours runs: both paths, one answer
        assert on["fused"] and on["paged"] and on["int4_kernel"] == "native"
        assert {"KQuantLinear", "QuantEmbedding"} <= set(on["k_layers"])
        torch.testing.assert_close(on["float"], off["float"], atol=1e-5, rtol=1e-5)
