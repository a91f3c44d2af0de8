"""The tensors an export writes: a checkpoint's, read one at a time, with LoRA merged in.

`MergedSource` walks the tensors the model needs (weights/names.py's `expected_shapes`, in
our names and interleaved rotary layout, whatever the file format) and hands each one out
with the adapters' update folded in by the lora package's own merge (`LoRALinear.merged`:
W + scale * B @ A, computed in float32). Peak memory is one tensor: a float source is read
from its memory map, a quantized GGUF tensor is dequantized alone, and `done(name)` gives the
pages back before the next one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mistral7b.errors import InputError
from mistral7b.lora.files import Adapter
from mistral7b.lora.layers import LoRALinear
from mistral7b.lora.multi import LoraSpec, combine_adapters, read_adapter, scaled
from mistral7b.quant.checkpoint import stored_quant
from mistral7b.quant.memory import release
from mistral7b.weights.base import CheckpointReader
from mistral7b.weights.gguf_file import FLOAT_TYPES, GGUFReader
from mistral7b.weights.names import expected_shapes

_FLOAT_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_GGUF_FLOAT_NAMES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


class MergedSource:
    """The tensors of `reader` with the adapters `lora` ((path, scale) pairs) merged."""

    def __init__(self, reader: CheckpointReader, lora: Sequence[LoraSpec] = ()) -> None:
        if stored_quant(reader) is not None:
            raise InputError(f"{reader.path} is an int8/int4 checkpoint written by `mistral7b "
                             "quantize`; export from the checkpoint it was made from")
        self.reader = reader
        self.config = reader.config
        self.shapes = expected_shapes(reader.config)
        missing = [n for n in self.shapes if n not in reader.names()]
        if missing:
            raise InputError(f"{reader.path}: tensor {missing[0]!r} is missing "
                             f"({len(missing)} missing in all)")
        self.adapter: Adapter | None = None
        if lora:
            adapters = [scaled(read_adapter(path, reader.config), w) for path, w in lora]
            self.adapter = combine_adapters(adapters)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def default_type(self) -> str:
        """The float type the source stores its weights in ("f32", "f16", "bf16"), read from
        the token embedding; f16 for a quantized GGUF (its block values d * q are exact in
        f16, as llama.cpp dequantizes them)."""
        name = "tok_embeddings.weight"
        if isinstance(self.reader, GGUFReader):
            return _GGUF_FLOAT_NAMES.get(self.reader.raw(name).qtype.name, "f16")
        return _FLOAT_NAMES.get(self.reader.tensor(name).dtype, "f32")

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name` (our naming and layout) with the adapters merged: the file's own
        float tensor when nothing is merged (memory-mapped, any float dtype), else float32."""
        module = name.removesuffix(".weight")
        if isinstance(self.reader, GGUFReader) and \
                self.reader.raw(name).qtype.name not in FLOAT_TYPES:
            w = self.reader.tensor_as(name, torch.float32)
        else:
            w = self.reader.tensor(name)
        if self.adapter is None or module not in self.adapter.scales:
            return w
        a = self.adapter.tensors[f"{module}.lora_A.weight"]
        b = self.adapter.tensors[f"{module}.lora_B.weight"]
        base = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        base.weight = nn.Parameter(w.float(), requires_grad=False)
        lora = LoRALinear(base, a.shape[0], self.adapter.scales[module])
        with torch.no_grad():
            lora.lora_A.weight.copy_(a)
            lora.lora_B.weight.copy_(b)
        return lora.merged().weight.detach()

    def done(self, name: str, t: torch.Tensor) -> None:
        """Tensor `name` (handed out as `t`) is written: give its memory back."""
        self.reader.forget(name)
        release(t)

    @property
    def label(self) -> str:
        """A model name for file metadata: the folder or file name of the source."""
        path = Path(self.reader.path)
        return path.stem if path.is_file() else path.name
