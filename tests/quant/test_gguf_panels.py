"""GGUF Q4_0 / Q4_1 / Q8_0 blocks repacked straight into our kernel's panels (one C++ pass,
csrc/pack.cpp gguf_panels) equal, bit for bit, what importing them into the portable form and
packing that gives (the path every other source takes); a whole GGUF model loads to the same
buffers and the same logits through either."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import hf_mistral, save_gguf

from mistral7b.kernels import native
from mistral7b.quant.gguf_import import import_int4, import_q8_0

gguf = pytest.importorskip("gguf")
QT = gguf.GGMLQuantizationType
pytestmark = pytest.mark.skipif(native.ops() is None, reason="our kernel does not run here")


def _blocks(qtype, rows, cols, seed, symmetric=False):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    if not symmetric:
        w[:, :32] += 0.3
    return gguf.quants.quantize(w, qtype)


def _reference(kind, blocks, rows, cols):
    if kind == "Q8_0":
        w8 = import_q8_0(blocks, (rows, cols))
        return native.pack_int8(w8.q, w8.scale)
    w4 = import_int4(kind, blocks, (rows, cols))
    return native.pack_int4(w4.q, w4.scale, w4.min, w4.group)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows, cols", [(16, 32), (48, 512), (272, 96)])
def test_fast_repack_equals_import_then_pack(kind, rows, cols):
    blocks = _blocks(QT[kind], rows, cols, seed=rows + cols)
    want = _reference(kind, blocks, rows, cols)
    got = native.gguf_panels(kind, torch.from_numpy(blocks.reshape(-1)), rows, cols)
    assert got is not None
    assert (got.bits, got.group, got.offset, got.n_out, got.n_in) == \
        (want.bits, want.group, want.offset, want.n_out, want.n_in)
    assert torch.equal(got.w, want.w)
    assert got.scale.dtype == want.scale.dtype and torch.equal(got.scale, want.scale)
    assert (got.mins is None) == (want.mins is None)
    if want.mins is not None:
        assert torch.equal(got.mins, want.mins)


def test_q4_1_with_symmetric_mins_drops_them_like_pack_int4():
    rows, cols = 32, 64
    blocks = _blocks(QT.Q4_1, rows, cols, seed=1).reshape(rows, cols // 32, 20).copy()
    d = np.full((rows, cols // 32), 0.25, dtype=np.float16)
    blocks[:, :, 0:2] = d.view(np.uint8).reshape(rows, cols // 32, 2)
    blocks[:, :, 2:4] = (d * np.float16(-8)).view(np.uint8).reshape(rows, cols // 32, 2)
    want = _reference("Q4_1", blocks, rows, cols)
    got = native.gguf_panels("Q4_1", torch.from_numpy(blocks.reshape(-1)), rows, cols)
    assert want.mins is None and got is not None and got.mins is None
    assert torch.equal(got.w, want.w) and torch.equal(got.scale, want.scale)


def test_scales_beyond_float16_safe_range_take_the_general_path():
    rows, cols = 16, 32
    blocks = _blocks(QT.Q4_0, rows, cols, seed=2).reshape(rows, 1, 18).copy()
    blocks[0, 0, 0:2] = np.array([65504.0], dtype=np.float16).view(np.uint8)
    assert native.gguf_panels("Q4_0", torch.from_numpy(blocks.reshape(-1)), rows, cols) is None


def test_a_gguf_model_loads_to_the_same_buffers_either_way(tmp_path, monkeypatch):
    from mistral7b.quant import load as qload
    from mistral7b.quant import load_quantized
    from mistral7b.weights import open_checkpoint

    model = hf_mistral(dim=64, n_layers=2)
    raw = {}
    for i, (name, rows, cols) in enumerate([("blk.0.ffn_gate.weight", 96, 64),
                                            ("blk.0.ffn_up.weight", 96, 64),
                                            ("blk.1.ffn_down.weight", 64, 96),
                                            ("blk.1.attn_q.weight", 64, 64)]):
        kind = [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_1][i]
        raw[name] = (_blocks(kind, rows, cols, seed=i), kind)
    path = save_gguf(model, tmp_path / "m.gguf", raw=raw)
    fast = load_quantized(open_checkpoint(path), "int4", dtype=torch.float32, device="cpu")
    monkeypatch.setattr(qload, "gguf_panels", lambda *a, **k: None)
    slow = load_quantized(open_checkpoint(path), "int4", dtype=torch.float32, device="cpu")
    fast_state, slow_state = fast.state_dict(), slow.state_dict()
    assert fast_state.keys() == slow_state.keys()
    for key in fast_state:
        assert fast_state[key].dtype == slow_state[key].dtype, key
        assert torch.equal(fast_state[key], slow_state[key]), key
    for name in ("w1", "w3"):
        layer = getattr(fast.layers[0].feed_forward, name)
        assert layer.kernel == "native" and layer.bits == 4


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_fast_dequantize_equals_gguf_bit_for_bit(kind):
    rows, cols = 40, 320
    blocks = _blocks(QT[kind], rows, cols, seed=7)
    want = gguf.quants.dequantize(blocks, QT[kind]).reshape(rows, cols)
    got = native.gguf_dequantize(kind, torch.from_numpy(blocks.reshape(-1)), rows, cols)
    assert got is not None and got.dtype == torch.float32
    assert np.array_equal(got.numpy(), want)


def test_q4_1_mins_beyond_float16_safe_range_take_the_general_path():
    rows, cols = 16, 32
    blocks = _blocks(QT.Q4_1, rows, cols, seed=3).reshape(rows, 1, 20).copy()
    blocks[3, 0, 2:4] = np.array([-65504.0], dtype=np.float16).view(np.uint8)
    assert native.gguf_panels("Q4_1", torch.from_numpy(blocks.reshape(-1)), rows, cols) is None
