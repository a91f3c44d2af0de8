"""`KQuantLinear`: a GGUF K-quant weight (Q4_K, Q5_K, Q6_K, what Q4_K_M / Q5_K_M files hold)
run on its own bits by our CPU kernel (kernels/csrc/kquant.cpp).

Nothing is widened or rounded: the 4/5/6-bit values, the packed sub-block scales and mins and
the float16 super-block factors are the file's, rearranged into panels, so the weights held
are gguf's dequantized ones exactly (native.KPanels.dequantize) and the memory is the file's
(4.5 / 5.5 / 6.5625 bits a weight). Only built on the CPU where our kernel runs (load.py);
anywhere else a K-quant tensor becomes an int4 (Q4_K, exactly) or int8 (Q5_K, Q6_K,
requantized) weight, which is also what `.to(device)` turns this layer into.
"""

from __future__ import annotations

import torch
from torch import nn

from mistral7b.kernels import native
from mistral7b.quant.layers import (
    Int4Linear,
    Int4Weight,
    Int8Linear,
    Int8Weight,
    _NativeLinear,
    pack_nibbles,
    quantize_int8,
)


class KQuantLinear(_NativeLinear):
    """y = x @ W^T for one K-quant weight on our kernel (float32 sums; any float input)."""

    super_d: torch.Tensor
    super_min: torch.Tensor | None

    @classmethod
    def from_kpanels(cls, p: native.KPanels, *, dtype: torch.dtype) -> KQuantLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features, layer.dtype = p.n_out, p.n_in, dtype
        layer.on_cpu, layer.compute_dtype, layer.kernel = True, torch.float32, "native"
        layer.bits, layer.group, layer.offset = p.bits, p.group, 0.0
        for name, t in (("qweight", p.w), ("scales", p.scale), ("mins", None),
                        ("super_d", p.d), ("super_min", p.dmin)):
            layer.register_buffer(name, t)
        return layer

    def kpanels(self) -> native.KPanels:
        return native.KPanels(self.qweight, self.scales, self.super_d, self.super_min, self.bits,
                              self.group, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        return self.kpanels().matmul(x2).to(x.dtype).view(*lead, self.out_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.kpanels().dequantize(dtype or self.dtype)

    def portable(self) -> Int4Weight | Int8Weight:
        """Q4_K: int4 with float32 scale d * sc and min -(dmin * m) per 32, exactly the same
        weights; Q5_K / Q6_K: int8 per channel, requantized (what their load elsewhere is)."""
        p = self.kpanels()
        if self.bits != 4:
            return quantize_int8(p.dequantize(torch.float32))
        d_sc, dm = p.sub_factors()
        assert dm is not None
        return Int4Weight(pack_nibbles(p.values()), d_sc, -dm, 32)

    def rebuilt(self, device: torch.device) -> _NativeLinear:
        """Moved to another device, the layer becomes the int4/int8 layer of its portable
        weight there (no K-quant kernel but ours)."""
        weight = self.portable()
        if isinstance(weight, Int4Weight):
            return Int4Linear(weight, dtype=self.dtype, device=device)
        return Int8Linear(weight, dtype=self.dtype, device=device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.kpanels().kind}, kernel=native")
