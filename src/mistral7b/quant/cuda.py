"""Weight-only int8 / int4 matmuls on CUDA, with PyTorch's own kernels: no host round trip.

int4: tinygemm (`aten._weight_int4pack_mm`, gpt-fast's kernel, compiled into PyTorch for
sm80+), bf16 activations, groups of 32/64/128/256. `_convert_weight_to_int4pack` takes the
nibbles as (out, in / 2) uint8 with the *high* nibble = the even column (ours: the low), and
the kernel computes w = (q - 8) * scale + zero from (in / group, out, 2) bf16 [scale, zero]
pairs: zero = min + 8 * scale, as the CPU kernel. innerKTiles (8 k-tiles of 16 per int32
word group) wants in_features % 128; 4 and 2 take in % 64 and % 32.

int8: `aten._weight_int8pack_mm` has a CUDA kernel in this PyTorch (a warp per output, float32
accumulation over int8 weights read once): the decode path, few rows. It re-reads W for every
row, so pre-fill (many rows, compute-bound) instead dequantizes W a block of output rows at a
time into the compute dtype and runs cuBLAS on it: transient memory bounded by
`BLOCK_VALUES`, never the whole layer in float. torchao's int8 weight-only path needs
torch.compile to fuse its dequant, and its int4 path is this same tinygemm kernel: it brings
nothing here that these two ops do not.

GPUs below sm80 (no tinygemm) run int4 by the same blockwise dequant, on the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Largest float block dequantized at once: 2^24 values = 32 MiB in bf16.
BLOCK_VALUES = 1 << 24
TINYGEMM_GROUPS = (32, 64, 128, 256)


def tinygemm_fits(device: torch.device, n_out: int, n_in: int, group: int) -> bool:
    """tinygemm runs here (sm80+) and takes this shape."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return (major >= 8 and group in TINYGEMM_GROUPS and n_in % group == 0 and n_in % 32 == 0
            and n_out % 8 == 0)


def inner_k_tiles(n_in: int) -> int:
    return next(t for t in (8, 4, 2) if n_in % (t * 16) == 0)


def int4pack(q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """tinygemm's (weight, scales_and_zeros) from our nibbles (out, in / 2) uint8 (low nibble
    = even column) and float32 (out, G) scale / min, built on `device`."""
    q = q.to(device)
    swapped = ((q & 0x0F) << 4) | (q >> 4)                  # high nibble = even column
    packed = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(),
                                                        inner_k_tiles(q.shape[1] * 2))
    scale, mins = scale.to(device, torch.float32), mins.to(device, torch.float32)
    zero = mins + 8 * scale
    sz = torch.stack([scale.t(), zero.t()], dim=-1)           # (G, out, 2)
    return packed, sz.to(torch.bfloat16).contiguous()


def int4mm(x2: torch.Tensor, packed: torch.Tensor, group: int,
           scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x2 (rows, in) -> (rows, out) bf16 through tinygemm."""
    return torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), packed,
                                              group, scales_and_zeros)


def unpack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(out, in / 2) uint8 -> (out, in) values 0..15, on q's device (low nibble first)."""
    return torch.stack([q & 0x0F, q >> 4], dim=-1).view(q.shape[0], -1)


def blockwise_linear(x2: torch.Tensor, n_out: int,
                     rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """x2 @ W^T with W dequantized by `rows(r0, r1)` (the float rows r0..r1 of W, in x2's
    dtype) a block at a time: (rows, in) -> (rows, out)."""
    step = max(8, BLOCK_VALUES // x2.shape[1] // 8 * 8)
    if step >= n_out:
        return F.linear(x2, rows(0, n_out))
    out = x2.new_empty(x2.shape[0], n_out)
    for r0 in range(0, n_out, step):
        r1 = min(r0 + step, n_out)
        out[:, r0:r1] = F.linear(x2, rows(r0, r1))
    return out


def int4_rows(q: torch.Tensor, sz: torch.Tensor, group: int,
              dtype: torch.dtype) -> Callable[[int, int], torch.Tensor]:
    """`rows` for blockwise_linear from portable int4 on the device: q (out, in / 2) uint8,
    sz (out, G, 2) [scale, min]."""
    def rows(r0: int, r1: int) -> torch.Tensor:
        v = unpack_nibbles(q[r0:r1]).to(dtype).view(r1 - r0, -1, group)
        s = sz[r0:r1].to(dtype)
        return (v * s[..., 0:1] + s[..., 1:2]).view(r1 - r0, -1)
    return rows


def int8_rows(q: torch.Tensor, scales: torch.Tensor,
              dtype: torch.dtype) -> Callable[[int, int], torch.Tensor]:
    """`rows` for blockwise_linear from int8 q (out, in) and per-channel scales (out,)."""
    def rows(r0: int, r1: int) -> torch.Tensor:
        return q[r0:r1].to(dtype) * scales[r0:r1, None].to(dtype)
    return rows


def int8mm(x2: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x2 (rows, in) @ (q * scales)^T through PyTorch's CUDA int8 weight-only kernel (float32
    accumulation; the result in x2's dtype)."""
    return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scales)
