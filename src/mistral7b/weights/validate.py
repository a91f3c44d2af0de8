"""Checks of what a checkpoint claims against what it holds, before anything is sized from it.

Two layers, both cheap next to the load itself:

1. `check_fits(config, ...)`: the config's counts against the file. A config is only read
   after its own fields are type- and range-checked (config.py); this then ties them to the
   file: `n_layers` layers need 9 tensors each, and the parameters the config implies must
   fit in the bytes the tensors occupy at 1 bit each at least (IQ1_S, the smallest GGUF type,
   takes 1.56). So a `block_count` of 2^14 in a 2 MB file fails here, before the loader
   makes 147k tensor names or a KV cache of 2^14 layers.
2. Tensor data, as each tensor is first read (llama.cpp's `--check-tensors`, on by default):
   float tensors must be finite and within the float16 range, |x| <= 65504 (one vectorised
   `aminmax` pass; a trained weight beyond it is a corrupt byte, e.g. a flipped exponent bit,
   and would overflow the float16 compute of a CUDA load); quantized GGUF blocks must have
   finite scales (only the 2-byte scale fields of each block are read: 1/9 of a Q4_0
   tensor's bytes). Dequantized values of finite scales are finite by construction. What
   the checks cost at load is in README ("Untrusted input").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mistral7b.config import ModelConfig
from mistral7b.errors import ModelFileError

MAX_ABS_VALUE = 65504.0                 # the float16 range
TENSORS_PER_LAYER = 9                   # 2 norms, wq wk wv wo, w1 w2 w3
MIN_BITS_PER_PARAM = 1

# GGUF block types: byte offsets of the float16 scale fields inside one block (ggml-common.h).
# Q4_1/Q5_1/Q8_1/Q4_K/Q5_K put d and m (or dmin) first; Q2_K, Q3_K, Q6_K and the ternary types
# put d last; the i-quants start with d.
_F16_SCALES: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q8_1": (0, 2),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,),
    "IQ1_S": (0,), "IQ4_NL": (0,), "IQ4_XS": (0,), "TQ1_0": (52,), "TQ2_0": (64,),
}
_F32_SCALES: dict[str, tuple[int, ...]] = {"Q8_K": (0,)}


def check_fits(config: ModelConfig, path: str | Path, n_tensors: int, n_bytes: int) -> None:
    """ModelFileError unless the file's `n_tensors` tensors of `n_bytes` bytes in all could
    hold the model `config` describes (checked before any per-layer structure is made)."""
    # Gross mismatches only: a file a few tensors short gets check_tensors' message naming
    # the missing tensor.
    if config.n_layers > n_tensors // TENSORS_PER_LAYER + 1:
        raise ModelFileError(path, f"the config says n_layers={config.n_layers}, but the file "
                                   f"holds only {n_tensors} tensors ({TENSORS_PER_LAYER} per "
                                   "layer)")
    params = config.n_params
    if params * MIN_BITS_PER_PARAM > 8 * n_bytes:
        raise ModelFileError(
            path, f"the config (dim={config.dim}, n_layers={config.n_layers}, hidden_dim="
                  f"{config.hidden_dim}, vocab_size={config.vocab_size}) means {params:,} "
                  f"parameters, more than the file's {n_bytes:,} bytes of tensors can hold")


def check_values(name: str, tensor: torch.Tensor, source: str | Path) -> None:
    """ModelFileError unless every value of a float tensor is finite and |x| <= 65504."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    lo, hi = torch.aminmax(tensor.detach().reshape(-1))  # NaN propagates to both
    lo_f, hi_f = float(lo), float(hi)
    if not (-MAX_ABS_VALUE <= lo_f and hi_f <= MAX_ABS_VALUE):
        flat = tensor.detach().reshape(-1)
        bad = ~torch.isfinite(flat)
        what = "non-finite values (NaN or infinity)" if bool(bad.any()) else (
            f"values out of range [{lo_f:g}, {hi_f:g}] (a weight beyond ±{MAX_ABS_VALUE:g} "
            "is a corrupt byte)")
        raise ModelFileError(source, f"tensor {name!r} holds {what}; the file is corrupt")


def check_block_scales(name: str, qtype: str, data: np.ndarray, source: str | Path,
                       block_bytes: int) -> bool:
    """ModelFileError if a GGUF quantized tensor's blocks hold a non-finite scale. Returns
    False for a type whose layout is not in the table (the caller checks dequantized values)."""
    if qtype in _F16_SCALES:
        offsets, kind = _F16_SCALES[qtype], np.float16
    elif qtype in _F32_SCALES:
        offsets, kind = _F32_SCALES[qtype], np.float32
    else:
        return False
    width = np.dtype(kind).itemsize
    blocks = np.asarray(data).reshape(-1).view(np.uint8).reshape(-1, block_bytes)
    for at in offsets:
        scales = blocks[:, at: at + width].view(kind)   # a strided view: nothing copied
        finite = np.isfinite(scales)
        if not finite.all():
            block = int(np.argmin(finite.reshape(-1)))
            raise ModelFileError(source, f"tensor {name!r} ({qtype}) has a non-finite scale "
                                         f"in block {block}; the file is corrupt")
    return True


def check_quantized(name: str, qtype: Any, data: np.ndarray, source: str | Path,
                    dequantize: Any) -> None:
    """Block scales where the layout is known, else the dequantized values (slower, rare).
    `qtype`: a gguf_parse.GGMLType; `dequantize(data, qtype)` -> float32 array."""
    if not check_block_scales(name, qtype.name, data, source, qtype.type_size):
        check_values(name, torch.from_numpy(dequantize(data, qtype)), source)
