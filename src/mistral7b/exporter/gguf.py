"""`--to gguf`: one GGUF file that llama.cpp, transformers' GGUF loader and mistral7b read.

Metadata: architecture "llama" (llama.cpp runs Mistral 7B as llama) with the keys its loader
reads: context length, embedding / feed-forward widths, block count, head counts (GQA), key
and value lengths, rope dimension and freq base, RMS epsilon, vocabulary size, the sliding
window when the model has one; the tokenizer and chat template (export/tokenizer.py).

Tensors: GGUF names (weights/names.py), rows in the interleaved rotary layout the model
uses (llama.cpp's converter writes them so). As llama.cpp does, 1-D tensors (the norms) stay
F32; matrices take the chosen type:

    type    block                                    bytes per 32 weights
    f32     -                                        128
    f16     -                                        64
    bf16    -                                        64
    q8_0    f16 d + 32 int8 q:       w = d * q       34
    q4_0    f16 d + 16 bytes of 4-bit q: w = d * (q - 8)   18

Q8_0 and Q4_0 blocks are made by the `gguf` package's quantizers (`gguf.quants.quantize`,
llama.cpp's reference rounding), a slice of rows at a time so memory stays at one tensor.
A matrix whose rows are not whole blocks of 32 falls back to F16 (llama.cpp's quantizer does
the same) and the log says which.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mistral7b.config import ModelConfig
from mistral7b.exporter.source import MergedSource
from mistral7b.exporter.tokenizer import SourceTokenizer
from mistral7b.weights.names import format_name

QUANT_BLOCK = 32                 # weights per Q8_0 / Q4_0 block
_QUANT_VALUES = 1 << 22          # float32 values quantized at a time (16 MB)
_GGML_NAME = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


def file_type(kind: str) -> int:
    """llama.cpp's `general.file_type` (LlamaFileType) of a file mostly of type `kind`."""
    import gguf

    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16",
             "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
    return int(gguf.LlamaFileType[names[kind]])


def llama_writer(path: Path, c: ModelConfig, name: str, ftype: int) -> Any:
    """A `gguf.GGUFWriter` holding the llama-architecture metadata of config `c` (no
    tokenizer yet, no tensors) for a file of llama.cpp file type `ftype` (`file_type`)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    return w


def tensor_kind(shape: tuple[int, ...], kind: str) -> str:
    """The type one tensor is written in: F32 for 1-D, `kind` for matrices, F16 where a
    block type does not divide the row."""
    if len(shape) == 1:
        return "f32"
    if kind in ("q8_0", "q4_0") and shape[-1] % QUANT_BLOCK:
        return "f16"
    return kind


def encode(t: torch.Tensor, kind: str) -> np.ndarray:
    """Tensor `t` (rows, cols) as the bytes (or floats) of GGUF type `kind`."""
    if kind == "f32":
        return np.ascontiguousarray(t.float().numpy())
    if kind == "f16":
        return np.ascontiguousarray(t.to(torch.float16).numpy())
    if kind == "bf16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    import gguf

    qtype = gguf.GGMLQuantizationType[_GGML_NAME[kind]]
    rows, cols = t.shape
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.empty((rows, cols // block_size * type_size), dtype=np.uint8)
    step = max(1, _QUANT_VALUES // cols)
    for r in range(0, rows, step):
        part = t[r: r + step].float().numpy()
        out[r: r + step] = gguf.quants.quantize(part, qtype)
    return out


def write_gguf(source: MergedSource, out: Path, kind: str, tokenizer: SourceTokenizer,
               step: Callable[[str], None]) -> list[str]:
    """Write the GGUF file `out`; returns lines for the log."""
    import gguf

    c = source.config
    writer = llama_writer(out, c, source.label, file_type(kind))
    said = tokenizer.add_to_gguf(writer, c.vocab_size)
    plan = []
    fallback = []
    for name, shape in source.shapes.items():
        t_kind = tensor_kind(shape, kind)
        if t_kind != kind and len(shape) > 1:
            fallback.append(name)
        qtype = gguf.GGMLQuantizationType[_GGML_NAME[t_kind]]
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(shape)) // block_size * type_size
        if t_kind in ("f32", "f16"):
            dtype = np.dtype(np.float32 if t_kind == "f32" else np.float16)
            writer.add_tensor_info(format_name(name, "gguf"), shape, dtype, n_bytes)
        else:   # gguf-py takes the shape of block types in bytes
            byte_shape = (shape[0], n_bytes // shape[0])
            writer.add_tensor_info(format_name(name, "gguf"), byte_shape, np.dtype(np.uint8),
                                   n_bytes, raw_dtype=qtype)
        plan.append((name, t_kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for name, t_kind in plan:
            t = source.tensor(name)
            data = encode(t, t_kind)
            writer.write_tensor_data(data)
            source.done(name, t)
            del data
            step(name)
    finally:
        writer.close()
    lines = [f"GGUF llama, {kind.upper()} matrices, F32 norms", said]
    if fallback:
        shown = ", ".join(fallback[:3]) + (", ..." if len(fallback) > 3 else "")
        lines.append(f"{len(fallback)} tensor(s) kept in F16: rows not a multiple of "
                     f"{QUANT_BLOCK} ({shown})")
    return lines
