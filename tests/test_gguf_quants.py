"""Quantized GGUF tensors dequantize correctly: hand-decoded blocks for the simple types, and a
whole model whose FFN weights are stored in six quantization types against HF transformers
running the same (dequantized) weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import K_BLOCKS, hf_logits, hf_mistral, random_k_blocks, save_gguf
from tolerance import assert_close

import mistral7b
from mistral7b.weights import open_checkpoint

gguf = pytest.importorskip("gguf")
QT = gguf.GGMLQuantizationType



def _blocks(w: np.ndarray, qtype, rng) -> np.ndarray:
    """Bytes of `w` in `qtype`: gguf's quantizer where it has one; random valid blocks for
    the K-quants (gguf-py only dequantizes those) with small finite scales."""
    if qtype.name not in K_BLOCKS:
        return gguf.quants.quantize(w.astype(np.float32), qtype)
    return random_k_blocks(qtype.name, *w.shape, rng)


def test_q8_0_q4_0_q4_1_blocks_decode_per_the_ggml_layout(tmp_path, monkeypatch):
    # tensor_as converts a few rows at a time: make that 3 rows here (64 columns)
    monkeypatch.setattr("mistral7b.weights.gguf_file._DEQUANT_VALUES", 3 * 64)
    rng = np.random.default_rng(0)
    model = hf_mistral(dim=64, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, seed=1)
    w = model.model.layers[0].mlp.gate_proj.weight.detach().numpy()
    raw = {}
    for name, qt in (("blk.0.ffn_gate.weight", QT.Q8_0), ("blk.0.ffn_up.weight", QT.Q4_0),
                     ("blk.0.ffn_down.weight", QT.Q4_1)):
        raw[name] = (_blocks(w, qt, rng), qt)
    path = save_gguf(model, tmp_path / "q.gguf", raw=raw)
    reader = open_checkpoint(path)
    for ours, gname in (("layers.0.feed_forward.w1.weight", "blk.0.ffn_gate.weight"),
                        ("layers.0.feed_forward.w3.weight", "blk.0.ffn_up.weight"),
                        ("layers.0.feed_forward.w2.weight", "blk.0.ffn_down.weight")):
        blocks, qt = raw[gname]
        got = reader.tensor(ours).numpy()
        assert got.shape == w.shape
        assert np.array_equal(got, _decode_by_hand(blocks, qt).reshape(w.shape))
        as_bf16 = reader.tensor_as(ours, torch.bfloat16)
        assert torch.equal(as_bf16, torch.from_numpy(got).to(torch.bfloat16))
        # and the quantization is faithful to the float weights it came from
        assert np.abs(got - w).max() < 0.2 * np.abs(w).max()


def _decode_by_hand(blocks: np.ndarray, qtype) -> np.ndarray:
    """ggml's block layouts: Q8_0 = f16 d + 32 int8; Q4_0 = f16 d + 16 bytes of nibbles
    (low nibbles are elements 0..15, high 16..31), value (q - 8) * d; Q4_1 = f16 d, f16 m,
    16 bytes, value q * d + m."""
    flat = blocks.reshape(-1)
    size = {QT.Q8_0: 34, QT.Q4_0: 18, QT.Q4_1: 20}[qtype]
    out = []
    for b in flat.reshape(-1, size):
        d = float(b[0:2].view(np.float16)[0])
        if qtype == QT.Q8_0:
            out.append(b[2:].view(np.int8).astype(np.float32) * d)
            continue
        m = float(b[2:4].view(np.float16)[0]) if qtype == QT.Q4_1 else 0.0
        qs = b[4:] if qtype == QT.Q4_1 else b[2:]
        q = np.concatenate([qs & 0x0F, qs >> 4]).astype(np.float32)
        out.append((q - 8) * d if qtype == QT.Q4_0 else q * d + m)
    return np.concatenate(out)


def test_model_with_six_quant_types_matches_hf_on_dequantized_weights(tmp_path):
    rng = np.random.default_rng(1)
    model = hf_mistral(dim=256, hidden=256, n_heads=4, n_kv_heads=2, head_dim=64, window=5,
                       seed=2)
    plan = {0: {"gate_proj": (QT.Q4_K, "ffn_gate"), "up_proj": (QT.Q5_K, "ffn_up"),
                "down_proj": (QT.Q6_K, "ffn_down")},
            1: {"gate_proj": (QT.Q8_0, "ffn_gate"), "up_proj": (QT.Q4_0, "ffn_up"),
                "down_proj": (QT.Q4_1, "ffn_down")}}
    raw = {}
    with torch.no_grad():
        for layer, modules in plan.items():
            for hf_name, (qt, gguf_name) in modules.items():
                weight = getattr(model.model.layers[layer].mlp, hf_name).weight
                blocks = _blocks(weight.numpy(), qt, rng)
                # the reference: gguf-py's own dequantizer, put into the HF model
                weight.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, qt)))
                raw[f"blk.{layer}.{gguf_name}.weight"] = (blocks, qt)
    path = save_gguf(model, tmp_path / "mixed.gguf", raw=raw)
    ids = list(range(3, 40))
    ref = hf_logits(model, ids)
    llm = mistral7b.load(path, dtype="float32")
    for chunk in (None, 1, 4):
        assert_close(llm.logits(ids, chunk_size=chunk), ref, what=f"chunk {chunk}")


def test_bf16_and_f16_tensors(tmp_path):
    model = hf_mistral(seed=4)
    w = model.model.layers[1].self_attn.v_proj.weight.detach().numpy()
    raw = {"blk.1.attn_v.weight": (gguf.quants.quantize(w, QT.BF16), QT.BF16),
           "blk.1.attn_output.weight": (
               model.model.layers[1].self_attn.o_proj.weight.detach().numpy()
               .astype(np.float16), QT.F16)}
    path = save_gguf(model, tmp_path / "half.gguf", raw=raw)
    reader = open_checkpoint(path)
    v = reader.tensor("layers.1.attention.wv.weight")
    assert v.dtype == torch.bfloat16
    assert torch.equal(v, torch.from_numpy(w).to(torch.bfloat16))
    o = reader.tensor("layers.1.attention.wo.weight")
    assert o.dtype == torch.float16 and o.shape == (64, 64)
    assert reader.raw("layers.1.attention.wv.weight").qtype.name == "BF16"
