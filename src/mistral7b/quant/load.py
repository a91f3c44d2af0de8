"""Build a quantized Transformer straight from a checkpoint, one tensor at a time.

The model is built on the meta device (no storage); then, for each linear layer, its source
tensor is read (memory-mapped), turned into an int8/int4 weight, packed into an
`Int8Linear`/`Int4Linear` that replaces the meta `nn.Linear`, and its mapped pages are handed
back (memory.py). So the peak is the quantized model plus one float tensor in flight, never
the float model: 7B int4 from a 14.5 GB bf16 checkpoint peaks near 5 GB.

Each linear layer's weight comes from its source tensor as convert.py's table says (float
quantized, GGUF 4/8-bit blocks copied, our own checkpoint's weights as stored).
Everything else (embeddings, norms) is loaded in `dtype` as the float loader does.
"""

from __future__ import annotations

import torch
from torch import nn

from mistral7b import progress
from mistral7b.errors import InputError, ModelFileError
from mistral7b.kernels import native
from mistral7b.model import Transformer
from mistral7b.modules import set_parameter, swap_module
from mistral7b.quant.checkpoint import read_stored_weight, stored_quant
from mistral7b.quant.convert import (
    DEFAULT_INT4_GROUP,
    QuantWeight,
    check_mode,
    linear_names,
    quantize_tensor,
    source_weight,
)
from mistral7b.quant.klinear import KQuantLinear
from mistral7b.quant.layers import Int4Linear, Int4Weight, Int8Linear, Int8Weight
from mistral7b.quant.memory import release, trim_heap
from mistral7b.quant.qembedding import QuantEmbedding
from mistral7b.weights.base import CheckpointReader
from mistral7b.weights.gguf_file import GGUFReader
from mistral7b.weights.loader import check_tensors
from mistral7b.weights.names import expected_shapes, is_linear_weight


def make_linear(weight: QuantWeight | native.Panels | native.KPanels, *, dtype: torch.dtype,
                device: torch.device | str) -> Int8Linear | Int4Linear | KQuantLinear:
    if isinstance(weight, native.KPanels):
        return KQuantLinear.from_kpanels(weight, dtype=dtype)
    if isinstance(weight, native.Panels):
        cls = Int8Linear if weight.bits == 8 else Int4Linear
        return cls.from_panels(weight, dtype=dtype)  # type: ignore[return-value]
    if isinstance(weight, Int8Weight):
        return Int8Linear(weight, dtype=dtype, device=device)
    return Int4Linear(weight, dtype=dtype, device=device)


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
    if stored is None:
        check_tensors(reader)  # every tensor there, with the shape the config needs
    for name in expected_shapes(config):
        if name not in present:
            raise ModelFileError(reader.path, f"tensor {name!r} is missing from the checkpoint")
    with torch.device("meta"):
        model = Transformer(config)
    names = linear_names(config)
    for name in progress.bar(names, desc=f"loading ({mode})", unit="tensor",
                             show=progress.big(reader.size_bytes())):
        source = name if name in present else "tok_embeddings.weight"
        weight: QuantWeight | native.Panels | native.KPanels
        if stored is not None:
            weight = read_stored_weight(reader, source, mode)
        else:
            weight = gguf_panels(reader, source, mode, device) \
                or source_weight(reader, source, mode, group)
        try:
            linear = make_linear(weight, dtype=dtype, device=device)
        except ValueError as exc:  # a shape the kernel cannot take (int4: out % 16)
            raise InputError(f"{reader.path}: {name} cannot be quantized to {mode} ({exc}); "
                             "load it with quant='int8' (CLI: --quant int8) or unquantized"
                             ) from None
        swap_module(model, name.removesuffix(".weight"), linear)
        if stored is not None and not isinstance(weight, (native.Panels, native.KPanels)) and (
                isinstance(weight, Int4Weight) or linear.kernel == "native"):
            # repacked into the kernel's layout: the mapped values are not needed again
            # (PyTorch's int8 kernel uses them in place from the map, zero-copy)
            release(weight.q, unmodified=True)
        del weight
        trim_heap()
    device = torch.device(device)
    table = quant_table(reader, dtype, device)
    if table is not None:
        swap_module(model, "tok_embeddings", table)
    for name, want in expected_shapes(config).items():
        if is_linear_weight(name) or (table is not None and name == "tok_embeddings.weight"):
            continue
        t = reader.tensor_as(name, dtype)
        if tuple(t.shape) != want:
            raise ModelFileError(reader.source(name), f"tensor {name!r} has shape "
                                                      f"{list(t.shape)}, expected {list(want)}")
        if t.dtype != dtype or t.device != device:
            t = t.to(device=device, dtype=dtype)
        set_parameter(model, name, t)
    model.requires_grad_(False)
    return model.eval()


def gguf_panels(reader: CheckpointReader, name: str, quant: str,
                device: torch.device | str) -> native.Panels | native.KPanels | None:
    """A GGUF tensor whose blocks our kernel takes as they are (Q4_0 / Q4_1 and the K-quants
    Q4_K / Q5_K / Q6_K in int4 mode, Q8_0 in either), repacked in one C++ pass; None for
    everything else (source_weight).
    The repack checks every block's scale as it copies it, so the bytes are read once: only
    when it declines is the tensor checked the reader's way (a corrupt scale raises there)."""
    if not isinstance(reader, GGUFReader) or torch.device(device).type != "cpu":
        return None
    kind = reader.qtype(name).name
    kquant = kind in native.GGUF_KQUANT_TYPES
    if kind != "Q8_0" and (quant != "int4" or not (kind in native.GGUF_PANEL_TYPES or kquant)):
        return None
    raw = reader.raw(name, check=False)
    n_out, n_in = raw.shape
    repack = native.gguf_kpanels if kquant else native.gguf_panels
    panels = repack(kind, torch.from_numpy(raw.data), n_out, n_in)
    if panels is None:
        reader.raw(name)
    elif name != "tok_embeddings.weight":  # a tied table is still read
        release(raw.data, unmodified=True)
    return panels


def quant_table(reader: CheckpointReader, dtype: torch.dtype,
                device: torch.device) -> QuantEmbedding | None:
    """The token-embedding table kept in its GGUF blocks (qembedding.py) where that works: a
    quantized table in a type our kernel library dequantizes, untied, on the CPU."""
    name = "tok_embeddings.weight"
    if (not isinstance(reader, GGUFReader) or device.type != "cpu"
            or reader.config.tied_embeddings or native.ops() is None):
        return None
    kind = reader.qtype(name).name
    rows, cols = reader.shape(name)
    if not (kind in native.GGUF_PANEL_TYPES or kind in native.GGUF_KQUANT_TYPES) or (
            (rows, cols) != (reader.config.vocab_size, reader.config.dim)):
        return None   # (a wrong shape is reported by the float path)
    raw = reader.raw(name)                                  # its block scales checked
    blocks = torch.from_numpy(raw.data.reshape(rows, -1)).clone()
    release(raw.data, unmodified=True)
    return QuantEmbedding(blocks, kind, cols, dtype)


def quantize_model(model: Transformer, quant: str,
                   group: int = DEFAULT_INT4_GROUP) -> Transformer:
    """Swap every linear layer of a loaded float model for its int8/int4 form, in place."""
    check_mode(quant)
    for name in linear_names(model.config):
        path = name.removesuffix(".weight")
        linear = model.get_submodule(path)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{path} is a {type(linear).__name__}, not a float nn.Linear: "
                            "quantize the model before adding LoRA, and only once")
        weight = quantize_tensor(linear.weight, quant, group)
        swap_module(model, path, make_linear(weight, dtype=linear.weight.dtype,
                                             device=linear.weight.device))
    return model
