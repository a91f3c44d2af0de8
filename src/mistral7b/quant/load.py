"""Build a quantized Transformer straight from a checkpoint, one tensor at a time.

The model is built on the meta device (no storage); then, for each linear layer, its source
tensor is read (memory-mapped), turned into an int8/int4 weight, packed into an
`Int8Linear`/`Int4Linear` that replaces the meta `nn.Linear`, and its mapped pages are handed
back (memory.py). So the peak is the quantized model plus one float tensor in flight, never
the float model: 7B int4 from a 14.5 GB bf16 checkpoint peaks near 5 GB.

Where the weights come from, per linear layer:

    source                          quant="int4"                    quant="int8"
    float (bf16/f16/f32 tensors)    int4, groups of `group`         int8 per channel
    GGUF Q4_0 / Q4_1 / Q4_K         int4 group 32, bits copied      dequantize -> int8
    GGUF Q8_0                       int8 group 32, bits copied      int8 group 32, bits copied
    GGUF Q5_*, Q6_K                 int8 (kept above 4 bits, as     dequantize -> int8
                                    llama.cpp's Q4 files keep their output layer in Q6_K)
    our quantized checkpoint        the stored int4/int8 weights, as written (checkpoint.py)

Everything else (embeddings, norms) is loaded in `dtype` as the float loader does.
"""

from __future__ import annotations

import torch
from torch import nn

from mistral7b.config import ModelConfig
from mistral7b.errors import InputError, ModelFileError
from mistral7b.model import Transformer
from mistral7b.quant.checkpoint import read_stored_weight, stored_quant
from mistral7b.quant.gguf_import import EXACT_INT4_TYPES, import_int4, import_q8_0
from mistral7b.quant.layers import (
    Int4Linear,
    Int4Weight,
    Int8Linear,
    Int8Weight,
    int4_group_for,
    quantize_int4,
    quantize_int8,
)
from mistral7b.quant.memory import release, trim_heap
from mistral7b.weights.base import CheckpointReader
from mistral7b.weights.gguf_file import FLOAT_TYPES
from mistral7b.weights.names import expected_shapes

QUANT_MODES = ("int8", "int4")
DEFAULT_INT4_GROUP = 32

QuantWeight = Int8Weight | Int4Weight


def check_mode(quant: str) -> str:
    if quant not in QUANT_MODES:
        raise InputError(f"unknown quant {quant!r}: use one of {', '.join(QUANT_MODES)}")
    return quant


def is_linear_weight(name: str) -> bool:
    """`layers.3.attention.wq.weight`, `layers.3.feed_forward.w2.weight`, `output.weight`."""
    return name == "output.weight" or name.rsplit(".", 2)[-2] in (
        "wq", "wk", "wv", "wo", "w1", "w2", "w3")


def linear_names(config: ModelConfig) -> list[str]:
    """Every linear weight the model multiplies by, the output projection included (a tied
    output is quantized from the embedding: the lookup table itself stays float)."""
    names = [n for n in expected_shapes(config) if is_linear_weight(n)]
    return names if "output.weight" in names else [*names, "output.weight"]


def make_linear(weight: QuantWeight, *, dtype: torch.dtype,
                device: torch.device | str) -> nn.Module:
    if isinstance(weight, Int8Weight):
        return Int8Linear(weight, dtype=dtype, device=device)
    return Int4Linear(weight, dtype=dtype, device=device)


def quantize_tensor(w: torch.Tensor, quant: str, group: int = DEFAULT_INT4_GROUP) -> QuantWeight:
    if quant == "int8":
        return quantize_int8(w)
    return quantize_int4(w, int4_group_for(w.shape[1], group))


def load_quantized(reader: CheckpointReader, quant: str | None, *, dtype: torch.dtype,
                   device: torch.device | str, group: int = DEFAULT_INT4_GROUP) -> Transformer:
    """A Transformer whose linear layers are int8/int4, read from `reader` tensor by tensor.

    `quant=None` takes the mode stored in a checkpoint written by `mistral7b quantize`; a
    checkpoint stored in one mode cannot be loaded in the other.
    """
    config = reader.config
    stored = stored_quant(reader)
    if stored is not None and quant not in (None, stored):
        raise InputError(f"{reader.path} is already quantized to {stored}; load it with "
                         f"quant={stored!r} or None")
    mode = check_mode(quant or stored or "")
    present = reader.names()
    for name in expected_shapes(config):
        if name not in present:
            raise ModelFileError(reader.path, f"tensor {name!r} is missing from the checkpoint")
    with torch.device("meta"):
        model = Transformer(config)
    for name in linear_names(config):
        source = name if name in present else "tok_embeddings.weight"
        if stored is not None:
            weight = read_stored_weight(reader, source, mode)
        else:
            weight = source_weight(reader, source, mode, group)
        linear = make_linear(weight, dtype=dtype, device=device)
        _set_module(model, name.removesuffix(".weight"), linear)
        if stored is not None and (isinstance(weight, Int4Weight) or linear.kernel == "native"):
            # repacked into the kernel's layout: the mapped values are not needed again
            # (PyTorch's int8 kernel uses them in place from the map, zero-copy)
            release(weight.q, unmodified=True)
        del weight
        trim_heap()
    device = torch.device(device)
    for name, want in expected_shapes(config).items():
        if is_linear_weight(name):
            continue
        t = reader.tensor_as(name, dtype)
        if tuple(t.shape) != want:
            raise ModelFileError(reader.source(name), f"tensor {name!r} has shape "
                                                      f"{list(t.shape)}, expected {list(want)}")
        if t.dtype != dtype or t.device != device:
            t = t.to(device=device, dtype=dtype)
        _set_param(model, name, t)
    model.requires_grad_(False)
    return model.eval()


def quantize_model(model: Transformer, quant: str,
                   group: int = DEFAULT_INT4_GROUP) -> Transformer:
    """Swap every linear layer of a loaded float model for its int8/int4 form, in place."""
    check_mode(quant)
    for name in linear_names(model.config):
        path = name.removesuffix(".weight")
        linear = model.get_submodule(path)
        weight = quantize_tensor(linear.weight, quant, group)
        _set_module(model, path, make_linear(weight, dtype=linear.weight.dtype,
                                             device=linear.weight.device))
    return model


def source_weight(reader: CheckpointReader, name: str, quant: str, group: int) -> QuantWeight:
    """The quantized form of one source tensor (the table in the module docstring)."""
    keep = name == "tok_embeddings.weight"  # a tied output: the table is still needed
    if reader.format == "gguf":
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


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _set_param(model: nn.Module, name: str, t: torch.Tensor) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, nn.Parameter(t, requires_grad=False))
