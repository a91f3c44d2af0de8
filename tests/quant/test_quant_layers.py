"""Int8Linear / Int4Linear against float matmul, within error bounds derived from the
quantization step (no timings here: see bench/)."""

from __future__ import annotations

import pytest
import torch

from mistral7b.quant import Int4Linear, Int4Weight, Int8Linear, quantize_int4, quantize_int8
from mistral7b.quant.layers import int4_group_for, pack_nibbles


def _weights(out=96, n_in=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) / n_in**0.5
    x = torch.randn(5, 3, n_in, generator=g)
    return w, x


def test_int8_weights_are_within_half_a_step():
    w, _ = _weights()
    q = quantize_int8(w)
    assert q.q.dtype == torch.int8 and q.q.abs().max() <= 127
    err = (q.dequantize() - w).abs()
    assert (err <= q.scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_weights_are_within_half_a_step(group):
    w, _ = _weights()
    q = quantize_int4(w, group)
    assert q.q.dtype == torch.uint8 and q.q.shape == (96, 128)
    step = q.scale.repeat_interleave(group, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    # the group's min and max are on the grid (q = 0 and q = 15)
    g = w.view(96, -1, group)
    deq = q.dequantize().view(96, -1, group)
    torch.testing.assert_close(deq.amin(2), g.amin(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(deq.amax(2), g.amax(2), rtol=0, atol=1e-6)


def test_nibble_packing_order():
    q = torch.tensor([[1, 2, 15, 0]])
    assert pack_nibbles(q).tolist() == [[0x21, 0x0F]]
    w = Int4Weight(pack_nibbles(q), torch.ones(1, 1), torch.zeros(1, 1), 4)
    assert w.unpacked().tolist() == [[1, 2, 15, 0]]


def _bound(x, w, step):
    """|x (W - Wq)^T| <= |x| (step / 2)^T elementwise: the quantization error's worst case."""
    return x.abs().reshape(-1, x.shape[-1]) @ (step / 2).t()


@pytest.mark.parametrize("batch", [5, 40])  # 15 rows: decode kernel; 120: widened to bf16
def test_int8_linear_vs_float_matmul(batch):
    w, _ = _weights()
    x = torch.randn(batch, 3, 256, generator=torch.Generator().manual_seed(1))
    q = quantize_int8(w)
    layer = Int8Linear(q, dtype=torch.float32)
    y = layer(x)
    assert y.shape == (batch, 3, 96) and y.dtype == torch.float32
    ref = x @ w.t()
    # The CPU path multiplies in bf16 (8-bit mantissa): allow that rounding on top of the
    # int8 step, relative to |x| |W|.
    step = q.scale[:, None].expand_as(w)
    bf16 = 2**-7 * (x.abs().reshape(-1, 256) @ w.abs().t())
    err = (y - ref).reshape(-1, 96).abs()
    assert (err <= _bound(x, w, step) + bf16).all()
    # and it is the matmul with its own dequantized weight, up to bf16 rounding
    exact = x @ layer.dequantize(torch.float32).t()
    assert ((y - exact).reshape(-1, 96).abs() <= bf16).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 128])
def test_int4_linear_vs_float_matmul(dtype, group):
    w, x = _weights()
    q = quantize_int4(w, group)
    layer = Int4Linear(q, dtype=dtype)
    y = layer(x.to(dtype)).float()
    ref = x.to(dtype).float() @ w.t()
    step = q.scale.repeat_interleave(group, dim=1)
    # On the CPU the kernel runs in bf16 (float32 models too): its rounding on top of the
    # int4 step, relative to |x| |W|.
    rounding = 2**-7 * (x.abs().reshape(-1, 256) @ w.abs().t())
    err = (y - ref).reshape(-1, 96).abs()
    assert (err <= _bound(x, w, step) + rounding).all()
    exact = x.to(dtype).float() @ layer.dequantize(torch.float32).t()
    assert ((y - exact).reshape(-1, 96).abs() <= rounding).all()


def test_int4_linear_reads_back_its_weight():
    w, _ = _weights()
    q = quantize_int4(w, 32)
    layer = Int4Linear(q, dtype=torch.float32)
    # the kernel holds bf16 scale/zero: the portable weight up to their rounding
    want = q.dequantize()
    torch.testing.assert_close(layer.dequantize(), want, rtol=0,
                               atol=float(want.abs().max()) * 2**-7)


def test_int4_group_falls_back_to_a_divisor():
    assert int4_group_for(4096, 128) == 128
    assert int4_group_for(576, 128) == 64     # SmolLM2's width
    assert int4_group_for(1536, 128) == 128
    with pytest.raises(ValueError):
        int4_group_for(100, 32)
