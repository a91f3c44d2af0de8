"""Quantize-on-load: the same layers whatever the route (in memory, from a file, through a
quantized checkpoint written by `quantize`), and a peak memory below the float model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import hf_mistral, save_consolidated, save_gguf, save_hf
from tolerance import assert_close

from mistral7b.engine import Engine
from mistral7b.quant import Int4Linear, Int8Linear, load_quantized, quantize_model, stored_quant
from mistral7b.quant.checkpoint import write_quantized
from mistral7b.weights import open_checkpoint
from mistral7b.weights.loader import build_model

IDS = [1, 7, 19, 3, 88, 42, 5, 61, 12, 9, 33]


def _logits(model) -> torch.Tensor:
    return Engine(model, model.config).logits(IDS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = hf_mistral(dim=128, hidden=256, n_heads=4, n_kv_heads=2, head_dim=32, seed=5)
    root = tmp_path_factory.mktemp("quant")
    return {"consolidated": save_consolidated(model, root / "c"),
            "hf": save_hf(model, root / "hf"),
            "gguf": save_gguf(model, root / "m.gguf")}


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_every_source_gives_the_same_quantized_model(tiny, quant):
    float_model = build_model(open_checkpoint(tiny["consolidated"]), dtype=torch.float32,
                              device=torch.device("cpu"))
    ref_float = _logits(float_model)
    in_memory = _logits(quantize_model(float_model, quant))
    kind = Int8Linear if quant == "int8" else Int4Linear
    for fmt, path in tiny.items():
        model = load_quantized(open_checkpoint(path), quant, dtype=torch.float32, device="cpu")
        assert all(isinstance(getattr(b.feed_forward, n), kind) for b in model.layers
                   for n in ("w1", "w2", "w3"))
        assert isinstance(model.output, kind)
        assert_close(_logits(model), in_memory, what=fmt)
    # quantized, not broken: close to float and the same argmax nearly everywhere
    # (this tiny random model has near-ties everywhere; a broken layer gives cosine ~ 0)
    agree = (in_memory.argmax(-1) == ref_float.argmax(-1)).float().mean()
    cosine = torch.nn.functional.cosine_similarity(in_memory, ref_float, dim=-1).min()
    assert agree >= (0.9 if quant == "int8" else 0.5)
    assert cosine >= (0.99 if quant == "int8" else 0.8)


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_quantized_checkpoint_loads_back_to_identical_logits(tiny, tmp_path, quant, fmt):
    reader = open_checkpoint(tiny[fmt])
    direct = _logits(load_quantized(reader, quant, dtype=torch.float32, device="cpu"))
    out = write_quantized(open_checkpoint(tiny[fmt]), tmp_path / "q", quant)
    back = open_checkpoint(out)
    assert back.format == "consolidated" and stored_quant(back) == quant
    assert back.config == reader.config
    model = load_quantized(back, None, dtype=torch.float32, device="cpu")
    assert torch.equal(_logits(model), direct)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_bfloat16_quantized_load_computes_in_float32_over_a_bfloat16_cache(tiny, quant):
    """load(dtype=bfloat16, quant=...) on the CPU: the table and the KV cache in bfloat16, the
    activations float32 (Transformer.compute_in_float32), decoded by the fused step. Its
    logits are those of the float32 load of the same quantized weights to within the
    bfloat16 rounding of the table and cached keys (a bfloat16 activation path drifts more)."""
    import mistral7b

    llm = mistral7b.load(tiny["gguf"], dtype="bfloat16", quant=quant)
    model = llm.engine.model
    assert model.compute_dtype == torch.float32
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert all(b.attention_norm.weight.dtype == torch.float32 for b in model.layers)
    assert llm.engine.pool.k.dtype == torch.bfloat16
    assert llm.engine.fused_step() is not None
    ref = mistral7b.load(tiny["gguf"], dtype="float32", quant=quant).engine.logits(IDS)
    ours = llm.engine.logits(IDS)
    # the same load computing in bfloat16 throughout (what it did before)
    old = mistral7b.load(tiny["gguf"], dtype="bfloat16", quant=quant)
    old.engine.model.compute_dtype = None
    for block in old.engine.model.layers:
        for norm in (block.attention_norm, block.ffn_norm):
            norm.weight.data = norm.weight.data.to(torch.bfloat16)
    old.engine.model.norm.weight.data = old.engine.model.norm.weight.data.to(torch.bfloat16)
    bf16_all = old.engine.logits(IDS)
    assert ours.dtype == torch.float32
    err, err_bf16 = (ours - ref).abs().max(), (bf16_all - ref).abs().max()
    assert err < err_bf16
    assert torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min() > 0.995


def test_quantized_checkpoint_refuses_the_other_mode(tiny, tmp_path):
    from mistral7b.errors import InputError

    out = write_quantized(open_checkpoint(tiny["consolidated"]), tmp_path / "q", "int4")
    with pytest.raises(InputError, match="already quantized to int4"):
        load_quantized(open_checkpoint(out), "int8", dtype=torch.float32, device="cpu")


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch, psutil
    from mistral7b.weights import open_checkpoint
    from mistral7b.quant import load_quantized
    from mistral7b.weights.loader import build_model
    from mistral7b.quant import Int4Linear, quantize_int4
    path, how = sys.argv[1], sys.argv[2]
    # warm up the runtime (thread pools, allocator arenas) so only the load is measured
    w = torch.randn(4096, 1024).bfloat16()
    Int4Linear(quantize_int4(w), dtype=torch.bfloat16)(torch.randn(2, 1024).bfloat16()).sum()
    build_model, load_quantized, w = build_model, load_quantized, None
    reader = open_checkpoint(path)
    before = psutil.Process().memory_info().rss
    if how == "float":
        model = build_model(reader, dtype=torch.bfloat16, device=torch.device("cpu"))
        for p in model.parameters():
            p.sum()  # touch every page, as a forward would
    else:
        model = load_quantized(reader, how, dtype=torch.bfloat16, device="cpu")
    # VmHWM, not ru_maxrss: Linux copies ru_maxrss from the parent at fork, so a child of a
    # big pytest process would report the parent's peak.
    status = {line.split(":")[0]: int(line.split()[1]) * 1024
              for line in open("/proc/self/status")
              if line.startswith(("VmHWM", "RssAnon", "RssFile"))}
    print(json.dumps({"before": before, "peak": status["VmHWM"], **status}))
""")


def test_quantize_on_load_peak_memory_stays_under_the_float_size(tmp_path):
    """A ~700 MB bf16 model (mid-size, random) loaded as int4: the peak resident memory
    grows by much less than the float weights, which the float loader does need."""
    from safetensors.torch import save_file

    from mistral7b.config import ModelConfig
    from mistral7b.weights.names import expected_shapes

    config = ModelConfig(dim=1536, n_layers=12, head_dim=64, hidden_dim=4096, n_heads=24,
                         n_kv_heads=8, norm_eps=1e-5, vocab_size=16384, rope_theta=1e4,
                         sliding_window=None)
    folder = tmp_path / "mid"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    state = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
             for n, s in expected_shapes(config).items()}
    float_bytes = sum(t.nbytes for t in state.values())
    save_file(state, str(folder / "consolidated.safetensors"))
    del state
    # Written pages are dirty until they reach the disk, and the kernel cannot drop dirty
    # pages: make the file like any checkpoint on disk before measuring.
    with (folder / "consolidated.safetensors").open("rb+") as f:
        os.fsync(f.fileno())
    (folder / "params.json").write_text(json.dumps(config.to_params_json()))

    def peak(how: str) -> int:
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(folder), how],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        return r["peak"] - r["before"]

    grown_float = peak("float")
    grown_int4 = peak("int4")
    assert float_bytes > 600e6
    assert grown_float > 0.8 * float_bytes        # the float model is resident
    # int4 weights are ~0.31 of bf16; the rest is one tensor in flight and allocator slack
    assert grown_int4 < 0.65 * float_bytes
