"""GGUF quantized blocks -> our portable int4 weights, without a float round trip.

ggml's 4-bit types are affine per group of 32 values, which is exactly `Int4Weight` with
group 32 (layers.py), so their nibbles are copied and their scales converted, never
requantized:

    Q4_0  18-byte block: f16 d, 16 bytes of nibbles          w = (q - 8) * d
    Q4_1  20-byte block: f16 d, f16 m, 16 bytes of nibbles   w = q * d + m
          (both: element j < 16 is the low nibble of byte j, element 16 + j its high nibble)
    Q4_K  144-byte super-block of 256 = 8 sub-blocks of 32: f16 d, f16 dmin, 12 bytes of
          6-bit (sc, m) pairs, 128 bytes of nibbles (sub-block 2c = low nibbles of bytes
          32c .. 32c + 31, sub-block 2c + 1 = their high nibbles)    w = d sc q - dmin m

Worked example, one Q4_0 block with d = 0.5 and first byte 0x3A: element 0 is q = 0xA = 10,
w = (10 - 8) * 0.5 = 1.0; element 16 is q = 0x3 = 3, w = -2.5. Ours: scale = 0.5,
min = -4.0, and column 0 holds 10 (low nibble of our byte 0), column 16 holds 3.

    Q8_0  34-byte block: f16 d, 32 int8                       w = q * d

Q8_0 is int8 with a scale per group of 32 (`Int8Weight` with a (rows, cols / 32) scale): its
bytes are copied too. Q6_K (6-bit values with per-16 int8 scales) and Q5_* fit neither form:
they are dequantized and requantized to per-channel int8 by the caller (see load.py). (Where
our CPU kernel runs, a GGUF load takes the K-quants on their own bits instead: klinear.py.)
"""

from __future__ import annotations

import numpy as np
import torch

from mistral7b.kernels.native import k4_scale_min
from mistral7b.quant.layers import Int4Weight, Int8Weight, pack_nibbles

# ggml type name -> bytes per block (of 32 values; 256 for Q4_K).
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}
EXACT_INT4_TYPES = frozenset(_BLOCK_BYTES)


def import_int4(qtype_name: str, data: np.ndarray, shape: tuple[int, ...]) -> Int4Weight:
    """The GGUF tensor `data` (uint8 block bytes, any shape) of logical (rows, cols) shape."""
    rows, cols = shape
    size = _BLOCK_BYTES[qtype_name]
    per_block = 256 if qtype_name == "Q4_K" else 32
    blocks = np.asarray(data, dtype=np.uint8).reshape(rows, cols // per_block, size)
    if qtype_name == "Q4_K":
        return _q4_k(blocks, rows, cols)
    d = _f16(blocks[:, :, 0:2])                                              # (rows, nb)
    if qtype_name == "Q4_0":
        mins, qs = d * np.float32(-8), blocks[:, :, 2:]
    else:
        mins, qs = _f16(blocks[:, :, 2:4]), blocks[:, :, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)                         # (rows, nb, 32)
    return Int4Weight(pack_nibbles(torch.from_numpy(q.reshape(rows, cols))),
                      torch.from_numpy(d), torch.from_numpy(mins), 32)


def import_q8_0(data: np.ndarray, shape: tuple[int, ...]) -> Int8Weight:
    """A GGUF Q8_0 tensor of logical (rows, cols) shape, bit for bit."""
    rows, cols = shape
    blocks = np.asarray(data, dtype=np.uint8).reshape(rows, cols // 32, 34)
    q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(rows, cols)
    return Int8Weight(torch.from_numpy(q), torch.from_numpy(_f16(blocks[:, :, 0:2])))


def _q4_k(blocks: np.ndarray, rows: int, cols: int) -> Int4Weight:
    nb = cols // 256
    d, dmin = _f16(blocks[:, :, 0:2]), _f16(blocks[:, :, 2:4])               # (rows, nb)
    sc, m = k4_scale_min(blocks[:, :, 4:16])                                # (rows, nb, 8)
    scale = d[..., None] * sc.astype(np.float32)
    mins = -(dmin[..., None] * m.astype(np.float32))
    qs = blocks[:, :, 16:].reshape(rows, nb, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=3)                         # (rows, nb, 4, 2, 32)
    return Int4Weight(pack_nibbles(torch.from_numpy(q.reshape(rows, cols))),
                      torch.from_numpy(scale.reshape(rows, -1)),
                      torch.from_numpy(mins.reshape(rows, -1)), 32)


def _f16(two_bytes: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 -> (...) float32 of the little-endian float16 they hold."""
    return np.ascontiguousarray(two_bytes).view(np.float16)[..., 0].astype(np.float32)
