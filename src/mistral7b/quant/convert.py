"""One source tensor -> one int8/int4 weight: the decision both the quantize-on-load path
(load.py) and the checkpoint writer (checkpoint.py) take, tensor by tensor.

Where the weights come from, per linear layer:

    source                          quant="int4"                    quant="int8"
    float (bf16/f16/f32 tensors)    int4, groups of `group`         int8 per channel
    GGUF Q4_0 / Q4_1 / Q4_K         int4 group 32, bits copied      dequantize -> int8
    GGUF Q8_0                       int8 group 32, bits copied      int8 group 32, bits copied
    GGUF Q5_*, Q6_K                 int8 (kept above 4 bits, as     dequantize -> int8
                                    llama.cpp's Q4 files keep their output layer in Q6_K)
    our quantized checkpoint        the stored int4/int8 weights, as written (checkpoint.py)

That is the portable form (what `mistral7b quantize` writes, and what runs off our CPU
kernel). Loading a GGUF on the CPU where our kernel runs takes a shortcut first (load.py
gguf_panels): Q4_0 / Q4_1 / Q8_0 blocks straight into its panels, and in int4 mode Q4_K /
Q5_K / Q6_K on their own bits (quant/klinear.py), nothing widened or rounded. A checkpoint
written from a K-quant file holds them as the table says: Q4_K with its d * sc scales
rounded to float16, Q5_K / Q6_K as int8.
"""

from __future__ import annotations

import torch

from mistral7b.config import ModelConfig
from mistral7b.errors import InputError
from mistral7b.quant.gguf_import import EXACT_INT4_TYPES, import_int4, import_q8_0
from mistral7b.quant.layers import (
    Int4Weight,
    Int8Weight,
    int4_group_for,
    quantize_int4,
    quantize_int8,
)
from mistral7b.quant.memory import release
from mistral7b.weights.base import CheckpointReader
from mistral7b.weights.gguf_file import FLOAT_TYPES, GGUFReader
from mistral7b.weights.names import expected_shapes, is_linear_weight

QUANT_MODES = ("int8", "int4")
AUTO = "auto"  # load(quant="auto"): the file's own blocks where it has them (file_mode)
DEFAULT_INT4_GROUP = 32

QuantWeight = Int8Weight | Int4Weight


def file_mode(reader: CheckpointReader) -> str | None:
    """What `quant="auto"` runs a checkpoint as: a GGUF whose linear layers are mostly
    quantized on its own blocks ("int8" when they are Q8_0, else "int4": 4-bit types copied,
    K-quants on their own bits where our kernel runs, else as the table above), as llama.cpp
    and Ollama run it; float files stay float. By parameter count, so a Q4_K_M's Q6_K output
    layer does not decide."""
    if not isinstance(reader, GGUFReader):
        return None
    count: dict[str, int] = {}
    for name in linear_names(reader.config):
        if name not in reader.names():
            continue
        rows, cols = reader.shape(name)
        kind = reader.qtype(name).name     # the header's word: no block is read here
        count[kind] = count.get(kind, 0) + rows * cols
    if not count:
        return None
    main = max(count, key=lambda kind: count[kind])
    if main in FLOAT_TYPES or main in ("F64", "I8", "I16", "I32", "I64"):
        return None
    return "int8" if main == "Q8_0" else "int4"


def check_mode(quant: str) -> str:
    if quant not in QUANT_MODES:
        raise InputError(f"unknown quant {quant!r}: use one of {', '.join(QUANT_MODES)}")
    return quant


def linear_names(config: ModelConfig) -> list[str]:
    """Every linear weight the model multiplies by, the output projection included (a tied
    output is quantized from the embedding: the lookup table itself stays float)."""
    names = [n for n in expected_shapes(config) if is_linear_weight(n)]
    return names if "output.weight" in names else [*names, "output.weight"]


def quantize_tensor(w: torch.Tensor, quant: str, group: int = DEFAULT_INT4_GROUP) -> QuantWeight:
    if quant == "int8":
        return quantize_int8(w)
    return quantize_int4(w, int4_group_for(w.shape[1], group))


def source_weight(reader: CheckpointReader, name: str, quant: str, group: int) -> QuantWeight:
    """The quantized form of one source tensor (the table in the module docstring)."""
    keep = name == "tok_embeddings.weight"  # a tied output: the table is still needed
    weight: QuantWeight
    if isinstance(reader, GGUFReader):
        raw = reader.raw(name)
        qname = raw.qtype.name
        if qname not in FLOAT_TYPES:
            if quant == "int4" and qname in EXACT_INT4_TYPES:
                weight = import_int4(qname, raw.data, raw.shape)
            elif qname == "Q8_0":  # int8 with a scale per 32: copied, in either mode
                weight = import_q8_0(raw.data, raw.shape)
            else:
                # int8 asked for, or a type wider than 4 bits: dequantize, requantize.
                weight = quantize_int8(reader.tensor(name))
            release(raw.data, unmodified=not keep)  # the GGUF map is never written
            return weight
    t = reader.tensor(name)
    weight = quantize_tensor(t, quant, group)
    if not keep:
        # Mapped file pages, unwritten except HF's wq/wk (un-permuted in place by the reader,
        # 1.3 GB of private pages for 7B that only MADV_DONTNEED frees). Once the reader has
        # forgotten the tensor, all of them may revert to the file's bytes.
        reader.forget(name)
        release(t, unmodified=True)
    return weight
