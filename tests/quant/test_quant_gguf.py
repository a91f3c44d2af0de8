"""GGUF Q4_0 / Q4_1 / Q4_K blocks imported into int4 without a float round trip: bit-exact
against gguf's own dequantizer; Q8_0 requantized to int8 within half a step; a whole model
loaded as int4 from a quantized GGUF against the same file dequantized to float."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import hf_mistral, random_k_blocks, save_gguf

import mistral7b
from mistral7b.quant import Int4Linear, Int8Linear, load_quantized
from mistral7b.quant.gguf_import import import_int4
from mistral7b.quant.klinear import KQuantLinear
from mistral7b.weights import open_checkpoint

gguf = pytest.importorskip("gguf")
QT = gguf.GGMLQuantizationType


def _blocks(qtype, rows=48, cols=512, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if qtype == QT.Q4_K:
        return random_k_blocks("Q4_K", rows, cols, rng, (0.0005, 0.004))
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    w[:, :32] += 0.3  # a block that is far from symmetric (exercises Q4_1's min)
    return gguf.quants.quantize(w, qtype)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q4_K])
def test_int4_import_is_bit_exact(qtype):
    blocks = _blocks(qtype)
    want = gguf.quants.dequantize(blocks, qtype).reshape(48, 512)
    w = import_int4(qtype.name, blocks, (48, 512))
    assert w.group == 32 and w.q.shape == (48, 256) and w.scale.shape == (48, 16)
    got = w.dequantize(torch.float32).numpy()
    assert np.array_equal(got, want)  # same float32 arithmetic, not just close


def test_q8_0_import_is_bit_exact():
    from mistral7b.quant.gguf_import import import_q8_0

    blocks = _blocks(QT.Q8_0)
    want = gguf.quants.dequantize(blocks, QT.Q8_0).reshape(48, 512)
    w = import_q8_0(blocks, (48, 512))
    assert w.group == 32 and w.q.dtype == torch.int8 and w.scale.shape == (48, 16)
    assert np.array_equal(w.dequantize(torch.float32).numpy(), want)


def test_q4_0_worked_example():
    # the module docstring's example: d = 0.5, first byte 0x3A
    block = np.zeros(18, dtype=np.uint8)
    block[0:2] = np.array([0.5], dtype=np.float16).view(np.uint8)
    block[2] = 0x3A
    w = import_int4("Q4_0", block, (1, 32)).dequantize()
    assert w[0, 0] == 1.0 and w[0, 16] == -2.5 and w[0, 1] == -4.0


def _gguf_with(tmp_path, types: dict[str, object]):
    model = hf_mistral(dim=256, hidden=512, n_heads=4, n_kv_heads=2, head_dim=64, vocab=128,
                       seed=3)
    raw = {}
    rng = np.random.default_rng(4)
    for name, qtype in types.items():
        shape = dict(model.state_dict().items())  # noqa: F841 - shapes come from the config
        rows, cols = {"ffn_gate": (512, 256), "ffn_up": (512, 256), "ffn_down": (256, 512),
                      "attn_q": (256, 256), "attn_output": (256, 256)}[name.split(".")[2]]
        if qtype == QT.Q4_K:
            blocks = random_k_blocks("Q4_K", rows, cols, rng, (0.0005, 0.004))
        else:
            w = rng.standard_normal((rows, cols)).astype(np.float32) / cols**0.5
            blocks = gguf.quants.quantize(w, qtype)
        raw[name] = (blocks, qtype)
    return save_gguf(model, tmp_path / "q.gguf", raw=raw)


TYPES = {"blk.0.ffn_gate.weight": QT.Q4_0, "blk.0.ffn_up.weight": QT.Q4_1,
         "blk.0.ffn_down.weight": QT.Q4_K, "blk.1.ffn_gate.weight": QT.Q8_0,
         "blk.1.attn_q.weight": QT.Q4_0}


def test_loaded_int4_layers_multiply_by_the_files_weights(tmp_path):
    path = _gguf_with(tmp_path, TYPES)
    reader = open_checkpoint(path)
    model = load_quantized(reader, "int4", dtype=torch.float32, device="cpu")
    ff0, ff1 = model.layers[0].feed_forward, model.layers[1].feed_forward
    for layer, ours in ((ff0.w1, "layers.0.feed_forward.w1.weight"),
                        (ff0.w3, "layers.0.feed_forward.w3.weight"),
                        (ff0.w2, "layers.0.feed_forward.w2.weight"),
                        (model.layers[1].attention.wq, "layers.1.attention.wq.weight")):
        want = reader.tensor(ours)
        if layer.kernel == "native":
            # Q4_0 / Q4_1: float16 scales held exactly; Q4_K on its own bits (KQuantLinear,
            # test_kquant.py): the file's weights bit for bit either way
            q4_k = ours == "layers.0.feed_forward.w2.weight"
            assert isinstance(layer, KQuantLinear if q4_k else Int4Linear)
            assert torch.equal(layer.dequantize(torch.float32), want)
        else:
            assert isinstance(layer, Int4Linear) and layer.group == 32
            # PyTorch's kernel holds bf16 scale and zero = min + 8 * scale: the file's weights
            # up to that rounding (the portable import itself is bit-exact, tested above).
            torch.testing.assert_close(layer.dequantize(torch.float32), want, rtol=0,
                                       atol=float(want.abs().max()) * 2**-7)
    # Q8_0 is int8 with a scale per 32 values: copied as it is onto our kernel; PyTorch's
    # kernel takes per-channel scales only, so there it is requantized (within half a step)
    assert isinstance(ff1.w1, Int8Linear)
    want = reader.tensor("layers.1.feed_forward.w1.weight")
    if ff1.w1.kernel == "native":
        assert torch.equal(ff1.w1.dequantize(torch.float32), want)
        assert ff1.w1.portable().scale.shape == (want.shape[0], want.shape[1] // 32)
    else:
        step = ff1.w1.portable().scale[:, None]
        assert ((ff1.w1.dequantize(torch.float32) - want).abs() <= step / 2 + 1e-6).all()
    # F32 tensors are quantized with the asked-for rule
    assert isinstance(model.layers[1].feed_forward.w2, Int4Linear)


def test_int4_model_from_q4_gguf_matches_float_model(tmp_path):
    path = _gguf_with(tmp_path, {k: v for k, v in TYPES.items() if v != QT.Q8_0})
    ids = [1, 5, 9, 33, 7, 100, 64, 2, 17]
    llm = mistral7b.load(path, dtype="float32")   # dequantized to float (the float path)
    ref = llm.logits(ids)
    reader = open_checkpoint(path)
    llm.model = llm.engine.model = load_quantized(reader, "int4", dtype=torch.float32,
                                                  device="cpu")
    # Only the F32 tensors were quantized (int4 of random floats): bound the logits loosely;
    # the argmax agrees almost everywhere.
    got = llm.logits(ids)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_checkpoint_from_a_mixed_gguf_loads_back_to_identical_logits(tmp_path, quant):
    from mistral7b.engine import Engine
    from mistral7b.quant import stored_quant, write_quantized

    # (a Q4_K tensor is not in this invariant: loaded from the GGUF it runs on its own bits,
    # written to our checkpoint it becomes int4 with float16-rounded scales: convert.py)
    path = _gguf_with(tmp_path, {k: v for k, v in TYPES.items() if v != QT.Q4_K})
    ids = [1, 7, 19, 3, 88, 42, 5]
    direct = load_quantized(open_checkpoint(path), quant, dtype=torch.float32, device="cpu")
    out = write_quantized(open_checkpoint(path), tmp_path / "q", quant)
    back = open_checkpoint(out)
    assert stored_quant(back) == quant
    model = load_quantized(back, None, dtype=torch.float32, device="cpu")
    # the Q8_0 tensor keeps its scale per 32 in the file
    assert model.layers[1].feed_forward.w1.portable().scale.shape == \
        direct.layers[1].feed_forward.w1.portable().scale.shape
    assert torch.equal(Engine(model, model.config).logits(ids),
                       Engine(direct, direct.config).logits(ids))
