"""Weight-only int8 / int4 linear layers and the float -> integer quantizers behind them.

Two representations of a quantized weight W (out, in):

- the *portable* one (`Int8Weight`, `Int4Weight`): plain tensors with a fixed meaning, what
  the quantizers and the GGUF importer produce and what `mistral7b quantize` writes to disk;
- the *kernel* one, inside `Int8Linear` / `Int4Linear`, built once at load time (or when the
  layer is moved with `.to(device)`) from the portable one: our AVX-512 VNNI kernel's panels
  (native.py, csrc/qmm.cpp) where that runs, else whatever layout PyTorch's CPU weight-only
  kernels want (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`); on CUDA,
  PyTorch's CUDA kernels (cuda.py: tinygemm for int4, `_weight_int8pack_mm` for int8 decode).

int8, per output channel (symmetric):   W[n, k] = q[n, k] * scale[n],            q in [-127, 127]
int4, per group of `group` inputs:      W[n, k] = q[n, k] * scale[n, g] + min[n, g],
                                        q in [0, 15], g = k // group
The int4 form is ggml's Q4_1 rule and holds every 4-bit GGUF type exactly, with the same
float32 arithmetic as gguf's own dequantizer (so the import is bit-exact): Q4_1 is scale = d,
min = m; Q4_0's (q - 8) * d is scale = d, min = -8 d; Q4_K's sub-blocks of 32 are scale =
d_super * sc, min = -(dmin_super * m). PyTorch's int4 kernel computes (q - 8) * scale + zero,
so the layer holds zero = min + 8 * scale (rounded once, in the kernel's dtype).

PyTorch's kernels want their scales in the activation dtype: a bf16 model multiplies with
bf16 scales (the float32 portable scales rounded once, at load). Ours keeps them exact
(float16 where that is exact, else float32) and takes any activation dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mistral7b.kernels import native
from mistral7b.quant import cuda

INT4_GROUPS = (32, 64, 128, 256)
_NP = {torch.uint8: np.uint8, torch.int32: np.int32}
_ALIGN = 64  # bytes
# Rows of activations from which Int8Linear widens its weight to bf16 for one matmul.
INT8_DEQUANT_ROWS = 16


@dataclass
class Int8Weight:
    q: torch.Tensor        # (out, in) int8
    scale: torch.Tensor    # (out,) float32 per channel, or (out, in // group) (GGUF Q8_0: 32)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1])

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scale.shape[1] if self.scale.ndim == 2 else self.q.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, n_in = self.shape
        scale = self.scale.reshape(out, -1, 1)
        return (self.q.float().view(out, -1, self.group) * scale).view(out, n_in).to(dtype)


@dataclass
class Int4Weight:
    q: torch.Tensor        # (out, in // 2) uint8: low nibble = column 2j, high = column 2j + 1
    scale: torch.Tensor    # (out, in // group) float32
    min: torch.Tensor      # (out, in // group) float32: the value of q = 0
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1] * 2)

    def unpacked(self, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """(out, in) values 0..15 (numpy does the nibbles on the CPU: PyTorch's uint8 shifts
        are slow there; elsewhere torch, on the device)."""
        if self.q.device.type != "cpu":
            return cuda.unpack_nibbles(self.q).to(dtype)
        q = self.q.numpy()
        both = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(q.shape[0], -1)
        return torch.from_numpy(both.astype(_NP[dtype], copy=False))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, n_in = self.shape
        g = self.unpacked(torch.int32).float().view(out, -1, self.group)                # (out, G, group)
        w = g * self.scale[..., None] + self.min[..., None]
        return w.view(out, n_in).to(dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values 0..15 -> (out, in // 2) uint8, low nibble = even column."""
    a = q.to(torch.uint8).numpy()
    return torch.from_numpy(a[:, 0::2] | (a[:, 1::2] << 4))


# ------------------------------------------------------------------------------ quantizers


# Rows quantized at a time. The float32 temporaries of a chunk (a few per step) are above
# glibc's largest mmap threshold (32 MB), so they are mapped and unmapped whole instead of
# fragmenting the heap between the outputs (measured: with 16 MB chunks a 700 MB model's
# load grew the heap by 300 MB that was never given back). Outputs are allocated once.
_CHUNK_VALUES = 1 << 24


def _row_chunks(w: torch.Tensor):
    step = max(1, _CHUNK_VALUES // w.shape[1])
    for r in range(0, w.shape[0], step):
        yield r, w[r: r + step].detach().to(torch.float32, copy=True)  # worked on in place


def quantize_int8(w: torch.Tensor, row_max: torch.Tensor | None = None) -> Int8Weight:
    """Symmetric per-output-channel int8: scale = max |W[n, :]| / 127, rounded up to a bf16
    value, so the CPU kernel's bf16 scales are exactly the stored ones (and |q| <= 127).
    `row_max`: max |W[n, :]| of whole rows when `w` holds only some of their columns (a
    tensor-parallel shard), so that the shard is quantized on the whole row's grid."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scales = torch.empty(w.shape[0])
    for r, c in _row_chunks(w):
        amax = c.abs().amax(dim=1) if row_max is None else row_max[r: r + len(c)].float()
        scale = amax.clamp(min=1e-30) / 127                                   # (rows,)
        # bf16 keeps 8 significant bits: 1 + 2^-8 lifts any value above its rounding down
        scale = (scale * (1 + 2**-8)).to(torch.bfloat16).float()
        q[r: r + len(c)] = torch.round(c / scale[:, None]).clamp_(-127, 127)
        scales[r: r + len(c)] = scale
    return Int8Weight(q, scales)


def quantize_int4(w: torch.Tensor, group: int = 32) -> Int4Weight:
    """Asymmetric int4 per group of `group` inputs (Q4_1's rule): min and max of the group
    map to q = 0 and q = 15. Scale and min are float16 values (as in Q4_1), so our kernel
    stores them in 2 bytes each exactly (0.625 byte per weight in all)."""
    out, n_in = w.shape
    if n_in % group:
        raise ValueError(f"int4 group {group} does not divide in_features {n_in}")
    q = torch.empty(out, n_in // 2, dtype=torch.uint8)
    scales = torch.empty(out, n_in // group)
    mins = torch.empty(out, n_in // group)
    for r, c in _row_chunks(w):
        g = c.view(c.shape[0], -1, group)                                    # (rows, G, group)
        lo, hi = _half_exact(g.amin(dim=2)), g.amax(dim=2)
        # float16 keeps 11 significant bits: 1 + 2^-10 lifts the scale above its rounding
        # down, so the max still fits in 15 steps
        scale = _half_exact(((hi - lo) / 15 * (1 + 2**-10)).clamp(min=2**-14))
        g = g.sub_(lo[..., None]).div_(scale[..., None]).round_().clamp_(0, 15)
        q[r: r + len(c)] = pack_nibbles(g.view(c.shape[0], n_in))
        scales[r: r + len(c)] = scale
        mins[r: r + len(c)] = lo
    return Int4Weight(q, scales, mins, group)


def _half_exact(t: torch.Tensor) -> torch.Tensor:
    """t rounded to float16 where float16 can hold it (its range is +-65504)."""
    return torch.where(t.abs() < 65000, t.half().float(), t)


def int4_group_for(n_in: int, group: int) -> int:
    """The asked-for group size if it divides n_in, else the largest smaller one that does
    (SmolLM2's 576-wide layers cannot take groups of 128)."""
    for g in sorted((g for g in INT4_GROUPS if g <= group), reverse=True):
        if n_in % g == 0:
            return g
    raise ValueError(f"in_features {n_in} is not a multiple of 32: cannot quantize to int4")


# ---------------------------------------------------------------------------------- layers


def use_native(device: torch.device, n_out: int, n_in: int, group: int) -> bool:
    """Our AVX-512 VNNI kernel (native.py) where it runs and the shape fits it."""
    return device.type == "cpu" and native.fits(n_out, n_in, group) and native.ops() is not None


class _NativeLinear(nn.Module):
    """The part of Int8Linear / Int4Linear that runs on our kernel: the weight as panels
    (native.Panels) in buffers `qweight`, `scales` and `mins` (None for symmetric weights)."""

    # Set by the subclasses; declared so type checkers do not read them as submodules.
    in_features: int
    out_features: int
    bits: int
    group: int
    offset: float
    kernel: str
    dtype: torch.dtype
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    on_cpu: bool
    compute_dtype: torch.dtype

    def _hold(self, p: native.Panels) -> None:
        self.kernel = "native"
        self.bits, self.group, self.offset = p.bits, p.group, p.offset
        self.register_buffer("qweight", p.w)
        self.register_buffer("scales", p.scale)
        self.register_buffer("mins", p.mins)

    @classmethod
    def from_panels(cls, p: native.Panels, *, dtype: torch.dtype) -> _NativeLinear:
        """A CPU layer on our kernel straight from its panels (GGUF blocks read as they are,
        native.gguf_panels): what `cls(weight, ...)` builds from the portable form."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features, layer.dtype = p.n_out, p.n_in, dtype
        layer.on_cpu = True
        # as the constructors choose for the PyTorch kernels (unused by ours, kept consistent)
        layer.compute_dtype = torch.bfloat16 if p.bits == 8 or dtype == torch.float32 else dtype
        layer._hold(p)
        return layer

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        """`.to(device)` / `.cuda()` / `.cpu()`: each kernel has its own layout, so a layer
        moved to another device is rebuilt there from its portable weight (kept otherwise:
        a dtype cast does not touch integer buffers)."""
        here = self.qweight.device
        there = fn(torch.empty(0, device=here)).device
        if there == here:
            return super()._apply(fn, recurse)
        fresh = self.rebuilt(there)
        self.__class__ = type(fresh)
        self.__dict__.update(fresh.__dict__)
        return self

    def rebuilt(self, device: torch.device) -> _NativeLinear:
        """This layer's weight as a layer on `device` (what `.to(device)` turns it into)."""
        return type(self)(self.portable(), dtype=self.dtype, device=device)

    def portable(self) -> Int8Weight | Int4Weight:
        raise NotImplementedError

    def panels(self) -> native.Panels:
        return native.Panels(self.qweight, self.scales, self.mins, self.bits, self.group,
                             self.offset, self.out_features, self.in_features)

    def _native_forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.float()
        y = native.ops().qmm(x2.contiguous(), self.qweight, self.scales, self.mins, self.bits,
                             self.group, self.offset, self.out_features)
        return y.to(x.dtype).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        name = f"int{self.bits}" + (f" group={self.group}" if self.bits == 4 else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {name}, "
                f"kernel={self.kernel}")


class Int8Linear(_NativeLinear):
    """y = x @ (q * scale)^T without materialising the float weight.

    On a CPU with AVX-512 VNNI: our kernel (native.py; activations quantized to int8 per
    block of 32, as llama.cpp's Q8_0 x Q8_0 product). Elsewhere on the CPU
    `aten._weight_int8pack_mm`, which is fast with bf16 activations only (float32 activations
    take a ~10x slower path), so float32 inputs are multiplied in bf16 and the result cast back
    (`compute_dtype`). On CUDA (kernel "cuda", cuda.py): PyTorch's CUDA int8 kernel for decode,
    a blockwise dequant into cuBLAS for pre-fill; float32 scales, activations in their dtype.
    """

    def __init__(self, weight: Int8Weight, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits = 8
        self.dtype = dtype
        device = torch.device(device)
        self.compute_dtype = torch.bfloat16 if device.type == "cpu" else dtype
        if use_native(device, self.out_features, self.in_features, weight.group):
            self._hold(native.pack_int8(weight.q, weight.scale))
            return
        self.kernel = "torch" if device.type == "cpu" else "cuda"
        if weight.group != self.in_features:
            # PyTorch's kernels take one scale per channel: requantize (GGUF Q8_0 blocks)
            weight = quantize_int8(weight.dequantize())
        q = weight.q.to(device).contiguous()
        if q.data_ptr() % _ALIGN:
            # The CPU kernel reads the rows with aligned vector loads and crashes on a
            # misaligned buffer (a memory-mapped tensor can start anywhere in its file).
            q = q.clone()
        self.register_buffer("qweight", q)
        scale_dtype = self.compute_dtype if self.kernel == "torch" else torch.float32
        self.register_buffer("scales", weight.scale.to(device, scale_dtype))

    def portable(self) -> Int8Weight:
        if self.kernel == "native":
            q = (self.panels().values().to(torch.int16) - 128).to(torch.int8)
            scale = native.unpanel(self.scales).float()
            return Int8Weight(q, scale.reshape(-1) if self.group == self.in_features else scale)
        return Int8Weight(self.qweight.cpu(), self.scales.float().cpu())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.kernel == "native":
            return self.panels().dequantize(dtype or self.dtype)
        return (self.qweight.float() * self.scales.float()[:, None]).to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native":
            return self._native_forward(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cpu" and x2.shape[0] < INT8_DEQUANT_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(self.compute_dtype), self.qweight,
                                                   self.scales)
        elif x2.device.type == "cpu":
            # Pre-fill: the int8 kernel does ~0.13 TFLOP/s at 256 rows; widening the weight to
            # bf16 (one transient copy of this layer) and using oneDNN's bf16 matmul is ~2x
            # faster overall (bench/bench_kernels.py).
            w = self.qweight.to(self.compute_dtype).mul_(self.scales[:, None])
            y = F.linear(x2.to(self.compute_dtype), w)
        elif x2.shape[0] <= INT8_DEQUANT_ROWS and x2.device.type == "cuda":
            y = cuda.int8mm(x2, self.qweight, self.scales)
        else:
            y = cuda.blockwise_linear(x2.to(self.compute_dtype), self.out_features,
                                      cuda.int8_rows(self.qweight, self.scales,
                                                     self.compute_dtype))
        return y.to(x.dtype).view(*lead, self.out_features)


class Int4Linear(_NativeLinear):
    """y = x @ W^T with W in groups of int4 (the module docstring's formula).

    On a CPU with AVX-512 VNNI: our kernel (native.py), the nibbles repacked into its panels
    with float16 scales where exact (float32 otherwise) and no mins for symmetric (Q4_0)
    weights. Elsewhere on the CPU: `aten._weight_int4pack_mm_for_cpu` on the nibbles repacked
    into its own layout, with (in // group, out, 2) [scale, zero] in bf16 (float32 models) or
    the layer's dtype (the kernel wants them in the activations' dtype). On CUDA sm80+:
    tinygemm (cuda.py), bf16 activations and [scale, zero] pairs. Other devices keep the
    portable tensors ([scale, min] pairs) and dequantize a block of rows at a time on the
    device (correct, not fast).
    """

    scales_and_zeros: torch.Tensor  # a buffer, on the kernels other than ours

    def __init__(self, weight: Int4Weight, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits = 4
        self.group = weight.group
        self.dtype = dtype
        device = torch.device(device)
        self.on_cpu = device.type == "cpu"
        # PyTorch's CPU kernel with float32 activations is ~10x slower than with bf16 (0.5 vs
        # 4.6 GB/s at decode, bench/bench_kernels.py): a float32 model multiplies in bf16.
        self.compute_dtype = torch.bfloat16 if self.on_cpu and dtype == torch.float32 else dtype
        if self.out_features % 16:
            raise ValueError(f"int4 needs out_features divisible by 16, got {self.out_features}")
        if use_native(device, self.out_features, self.in_features, self.group):
            self._hold(native.pack_int4(weight.q, weight.scale, weight.min, weight.group))
        elif cuda.tinygemm_fits(device, self.out_features, self.in_features, self.group):
            self.kernel = "tinygemm"
            self.compute_dtype = torch.bfloat16     # the kernel's only activation dtype
            packed, sz = cuda.int4pack(weight.q, weight.scale, weight.min, device)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales_and_zeros", sz)
        elif self.on_cpu:
            self.kernel = "torch"
            # The kernel's layout packs blocks of 64 output rows independently, so rows can be
            # converted a slice at a time (the int32 input it wants is 8x the packed size).
            step = 64 * max(1, _CHUNK_VALUES // (64 * self.in_features))
            packed = torch.cat([
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    Int4Weight(weight.q[r: r + step], weight.scale, weight.min,
                               weight.group).unpacked(torch.int32), 1)
                for r in range(0, self.out_features, step)])
            zero = weight.min + 8 * weight.scale
            sz = torch.stack([weight.scale.t(), zero.t()], dim=-1)               # (G, out, 2)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales_and_zeros", sz.to(self.compute_dtype).contiguous())
        else:
            self.kernel = "generic"
            self.register_buffer("qweight", weight.q.to(device))
            sz = torch.stack([weight.scale, weight.min], dim=-1)                 # (out, G, 2)
            self.register_buffer("scales_and_zeros", sz.to(device, dtype))

    @property
    def dequantize_is_slow(self) -> bool:
        """PyTorch's int4 layout can only be read back through its kernel (see dequantize)."""
        return self.kernel == "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native":
            return self._native_forward(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "torch":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(self.compute_dtype), self.qweight, self.group, self.scales_and_zeros)
        elif self.kernel == "tinygemm":
            y = cuda.int4mm(x2, self.qweight, self.group, self.scales_and_zeros)
        else:
            y = cuda.blockwise_linear(x2.to(self.dtype), self.out_features, cuda.int4_rows(
                self.qweight, self.scales_and_zeros, self.group, self.dtype))
        return y.to(x.dtype).view(*lead, self.out_features)

    def portable(self) -> Int4Weight:
        """The layer's weight in the portable form, on the CPU (PyTorch's layouts are read
        back through their kernel and quantized again: the same grid up to the rounding of
        their bf16 scales)."""
        if self.kernel == "native":
            scale = native.unpanel(self.scales).float()
            mins = (native.unpanel(self.mins).float() if self.mins is not None
                    else -self.offset * scale)
            return Int4Weight(pack_nibbles(self.panels().values()), scale, mins, self.group)
        if self.kernel == "generic":
            sz = self.scales_and_zeros.float().cpu()
            return Int4Weight(self.qweight.cpu(), sz[..., 0], sz[..., 1], self.group)
        return quantize_int4(self.dequantize(torch.float32).cpu(), self.group)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight (out, in) this layer multiplies by."""
        dtype = dtype or self.dtype
        if self.kernel == "native":
            return self.panels().dequantize(dtype)
        if self.kernel == "generic":
            return cuda.int4_rows(self.qweight, self.scales_and_zeros, self.group,
                                  dtype)(0, self.out_features)
        # PyTorch's layouts are their own business: read W back through the kernel itself,
        # I @ W^T, a slice of the identity at a time (exact: each output is 1 * w + 0s).
        rows = []
        for k0 in range(0, self.in_features, 1024):
            k1 = min(k0 + 1024, self.in_features)
            eye = torch.zeros(k1 - k0, self.in_features, dtype=self.compute_dtype,
                              device=self.qweight.device)
            eye[:, k0:k1] = torch.eye(k1 - k0, dtype=self.compute_dtype)
            rows.append(self.forward(eye).to(self.compute_dtype))
        return torch.cat(rows).t().to(dtype)


class BF16Linear(nn.Linear):
    """An nn.Linear (same weight, same everything) whose bf16 decode-sized products, 1 to 4
    rows, run on our AVX-512 BF16 kernel: it streams the weight ~1.5x faster than oneDNN's
    bf16 path does for one row (bench/bench_kernels.py). Larger inputs (pre-fill) go to
    F.linear. Only built where native.ops().has_bf16() (see swap_bf16_linears)."""

    MAX_ROWS = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (rows > self.MAX_ROWS or x.dtype != torch.bfloat16 or self.bias is not None
                or self.weight.dtype != torch.bfloat16 or self.weight.requires_grad
                or torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.weight, self.bias)
        y = native.ops().bf16_gemv(x.reshape(rows, self.in_features).contiguous(), self.weight)
        return y.view(*x.shape[:-1], self.out_features)


def swap_bf16_linears(model: nn.Module) -> int:
    """Turn the bf16 CPU nn.Linear layers of `model` into BF16Linear in place (the weights
    are shared, not copied); returns how many. Nothing changes where the kernel cannot run."""
    ops = native.ops()
    if ops is None or not ops.has_bf16():
        return 0
    count = 0
    for module in model.modules():
        if (type(module) is nn.Linear and module.weight.dtype == torch.bfloat16
                and module.weight.device.type == "cpu" and module.in_features % 32 == 0
                and module.weight.is_contiguous()):
            module.__class__ = BF16Linear  # same object, same parameters: only forward differs
            count += 1
    return count
