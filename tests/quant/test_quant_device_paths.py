"""The device-side pieces of the CUDA paths that run anywhere (the kernels themselves are in
tests/cuda, marked `cuda`): nibbles unpacked on the device as numpy does on the CPU, the
blockwise dequantized matmul against the whole float matmul, and a quantized layer moved to
another device rebuilt there from its portable weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mistral7b.quant import Int4Linear, Int8Linear, quantize_int4, quantize_int8
from mistral7b.quant import cuda as qcuda
from mistral7b.quant.layers import Int4Weight


def _w(out=96, n_in=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n_in, generator=g) / n_in**0.5, torch.randn(7, n_in, generator=g)


def test_torch_nibbles_equal_numpy_nibbles():
    q = torch.randint(0, 256, (16, 40), dtype=torch.uint8)
    w = Int4Weight(q, torch.ones(16, 1), torch.zeros(16, 1), 80)
    assert torch.equal(qcuda.unpack_nibbles(q), w.unpacked())


@pytest.mark.parametrize("block_values", [1 << 24, 96 * 256 // 5])  # one block; 5 blocks
def test_blockwise_dequantized_matmul_equals_the_float_matmul(monkeypatch, block_values):
    monkeypatch.setattr(qcuda, "BLOCK_VALUES", block_values)
    w, x = _w()
    q4 = quantize_int4(w, 64)
    sz = torch.stack([q4.scale, q4.min], dim=-1)                      # (out, G, 2)
    got = qcuda.blockwise_linear(x, 96, qcuda.int4_rows(q4.q, sz, 64, torch.float32))
    torch.testing.assert_close(got, F.linear(x, q4.dequantize()), rtol=0, atol=1e-5)
    q8 = quantize_int8(w)
    got = qcuda.blockwise_linear(x, 96, qcuda.int8_rows(q8.q, q8.scale, torch.float32))
    torch.testing.assert_close(got, F.linear(x, q8.dequantize()), rtol=0, atol=1e-5)


def test_tinygemm_shapes():
    assert qcuda.inner_k_tiles(4096) == 8 and qcuda.inner_k_tiles(576) == 4
    assert qcuda.inner_k_tiles(96) == 2
    assert not qcuda.tinygemm_fits(torch.device("cpu"), 4096, 4096, 128)


@pytest.mark.parametrize("cls", ["int8", "int4"])
def test_a_layer_moved_to_another_device_is_rebuilt_there(cls):
    """`.to(device)` rebuilds the kernel layout for the new device from the portable weight
    (the meta device stands in for CUDA here: the same code path, no GPU needed); the
    portable weight a layer gives back is the one it was built from."""
    w, x = _w()
    portable = quantize_int8(w) if cls == "int8" else quantize_int4(w, 64)
    make = Int8Linear if cls == "int8" else Int4Linear
    layer = make(portable, dtype=torch.float32)
    again = make(layer.portable(), dtype=torch.float32)
    atol = 0.0 if layer.kernel == "native" or cls == "int8" else float(w.abs().max()) * 2**-7
    torch.testing.assert_close(again.dequantize(torch.float32), portable.dequantize(),
                               rtol=0, atol=atol)
    model = torch.nn.Sequential(layer)
    model.to("meta")                                    # Module._apply, as .cuda() does
    assert layer.qweight.device.type == "meta"
    assert layer.kernel == ("cuda" if cls == "int8" else "generic")
    assert layer(x.to("meta")).shape == (7, 96)
