"""One rank's shard of a checkpoint, read slice by slice from the mapped file.

`shard_reader(reader, plan)` is a reader like any other whose config is the shard's shape
(tp.py's `local_config`) and whose tensors are this rank's slices, so the ordinary loaders
(weights/loader.py for floats, quant/load.py for int8/int4 and GGUF blocks) build the shard
unchanged, one tensor at a time: no rank ever reads or holds the whole model.

- safetensors (consolidated, HF): the slice is a view into the map; only its pages are read.
  HF's q/k rotary permutation acts within a head, so it is undone on the rank's own heads
  after slicing (weights/hf.py `tensor_part`).
- GGUF: the slice of the stored bytes (`raw_part`): rows of blocks for column-parallel
  layers, whole blocks of every row for row-parallel ones (an error if the cut is inside a
  block), so quantized blocks are copied as they are.
- int4 from floats: groups lie along the input dimension, so a row-parallel cut must fall on
  a group boundary (checked); each rank's groups are then exactly the single process's.
  int8 from floats has one scale per output row: a row-parallel shard scales its half-row by
  its own maximum, a finer grid than the whole row's (within the same error bound).
"""

from __future__ import annotations

import torch

from mistral7b.distributed.tp import TPPlan, check_group_boundary
from mistral7b.errors import InputError
from mistral7b.model import Transformer
from mistral7b.weights.base import CheckpointReader
from mistral7b.weights.gguf_file import GGUFReader, RawTensor


class ShardReader(CheckpointReader):
    """This rank's slices of the tensors of `inner` (a safetensors or .pth checkpoint)."""

    def __init__(self, inner: CheckpointReader, plan: TPPlan) -> None:
        self.inner, self.plan = inner, plan
        self.path, self.format = inner.path, inner.format
        self.config = plan.local_config

    def names(self) -> set[str]:
        return self.inner.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.plan.local_shape(name, self.inner.shape(name))

    def tensor(self, name: str) -> torch.Tensor:
        part = self.plan.part(name)
        return self.inner.tensor(name) if part is None else self.inner.tensor_part(name, *part)

    def tensor_as(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if self.plan.part(name) is None:
            return self.inner.tensor_as(name, dtype)
        return super().tensor_as(name, dtype)

    def forget(self, name: str) -> None:
        self.inner.forget(name)

    def source(self, name: str) -> str:
        return self.inner.source(name)

    def close(self) -> None:
        self.inner.close()


class GGUFShard(GGUFReader):
    """This rank's slices of a GGUF file's tensors, as stored (blocks and all): a GGUFReader
    whose `raw` is the slice, so dequantizing and block import see only the slice."""

    def __init__(self, inner: GGUFReader, plan: TPPlan) -> None:
        vars(self).update(vars(inner))      # the same map, header and checks: nothing re-read
        self.plan = plan
        self.config = plan.local_config

    def shape(self, name: str) -> tuple[int, ...]:
        return self.plan.local_shape(name, super().shape(name))

    def raw(self, name: str, *, check: bool = True) -> RawTensor:
        part = self.plan.part(name)
        return super().raw(name, check=check) if part is None else \
            self.raw_part(name, *part, check=check)


def shard_reader(reader: CheckpointReader, plan: TPPlan) -> CheckpointReader:
    return GGUFShard(reader, plan) if isinstance(reader, GGUFReader) else \
        ShardReader(reader, plan)


def load_shard(reader: CheckpointReader, plan: TPPlan, quant: str | None, *,
               dtype: torch.dtype, device: torch.device) -> Transformer:
    """This rank's Transformer (its local_config's shape), in float or int8/int4."""
    from mistral7b.quant import stored_quant
    from mistral7b.quant.convert import DEFAULT_INT4_GROUP, linear_names
    from mistral7b.quant.layers import int4_group_for
    from mistral7b.quant.load import load_quantized
    from mistral7b.weights.loader import build_model

    if stored_quant(reader) is not None:
        raise InputError(f"{reader.path} was written by `mistral7b quantize`: tensor parallel "
                         "reads float or GGUF checkpoints; load the original with "
                         "quant='int8'/'int4' (CLI: --quant)")
    if quant == "int4":
        for name in linear_names(reader.config):
            if name in reader.names():
                cols = reader.shape(name)[1]
                group = int4_group_for(cols, DEFAULT_INT4_GROUP)
                check_group_boundary(name, plan, cols, group, "int4")
    shard = shard_reader(reader, plan)
    if quant is None:
        return build_model(shard, dtype=dtype, device=device)
    model = load_quantized(shard, quant, dtype=dtype, device=device)
    if quant == "int8":
        _whole_row_scales(model, shard, plan, dtype=dtype, device=device)
    return model


def _whole_row_scales(model: Transformer, shard: CheckpointReader, plan: TPPlan, *,
                      dtype: torch.dtype, device: torch.device) -> None:
    """Requantize the int8 row-parallel layers (wo, w2) on their whole rows' scales.

    int8 keeps one scale per output row, max |W[n, :]| / 127; a shard holding half of each
    row would otherwise scale it by its own half's maximum, and the ranks together would not
    compute the single process's weights. The ranks agree on each row's maximum with one
    all-reduce (max) per layer, reading nothing beyond their own columns. GGUF Q8_0 blocks
    (a scale per 32 values) are whole on each rank already."""
    import torch.distributed as dist

    from mistral7b.modules import swap_module
    from mistral7b.quant.layers import quantize_int8
    from mistral7b.quant.load import make_linear

    for name in sorted(shard.names()):      # the same order on every rank
        part = plan.part(name)
        if part is None or part[0] != 1:
            continue
        if isinstance(shard, GGUFReader) and shard.raw(name).qtype.name == "Q8_0":
            continue
        t = shard.tensor(name).float()
        row_max = t.abs().amax(dim=1).to(device)        # NCCL reduces on the GPU
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        linear = make_linear(quantize_int8(t, row_max.cpu()), dtype=dtype, device=device)
        swap_module(model, name.removesuffix(".weight"), linear)
