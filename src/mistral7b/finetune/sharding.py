"""Fine-tuning on several ranks: FSDP2 over the LoRA model, and each rank's slice of a batch.

Under torchrun (`torchrun --nproc-per-node N -m mistral7b.cli.main finetune ...`, or
`mistral7b finetune --nproc N`, which starts torchrun itself) with N > 1, the Trainer joins
the process group (gloo on CPU, NCCL on CUDA) and shards the model with FSDP2's
`fully_shard`: one unit per transformer block, then the root (embeddings, final norm,
output). What each rank holds, N ranks:

- 1/N of every *parameter*: the frozen float base (embeddings, norms, float linear weights)
  and the trainable LoRA A/B matrices, as DTensor shards along dim 0; and 1/N of AdamW's
  moments, which are shaped like the LoRA parameters.
- While a block runs forward or backward, that block's whole weights, all-gathered and freed
  again after it (reshard_after_forward); the root's while it runs.
- Frozen *quantized* bases (QLoRA's FrozenQuantLinear, a model loaded with quant=int8/int4)
  keep their integers in buffers, which FSDP2 does not shard: every rank holds the whole
  quantized base (7B at int4: ~4 GB a rank) plus 1/N of everything else. Integer weights
  cannot be all-gathered as float parameters without a float copy, which QLoRA exists to avoid.

Data: a step's global batch is the same rows whatever N is (`grad_accum` micro-batches of
`batch_size` rows, batching.py), and rank r takes rows r, r + N, r + 2N, ... of each
micro-batch. The loss of a rank is its rows' target-token loss sum over the *global* target
count, times N because FSDP2 averages gradients over the ranks: the summed gradient is the
single-process one, so a run gives the same adapter on any number of ranks (to float
rounding) and can resume on a different number. A rank whose slice of a micro-batch is empty
(batch_size < N) still runs one row, weighted 0: every rank must take part in FSDP2's
collectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mistral7b.distributed.runtime import join, this_rank, under_torchrun
from mistral7b.errors import InputError
from mistral7b.lora import lora_state_dict

if TYPE_CHECKING:
    from mistral7b.model import Transformer


@dataclass
class Ranks:
    """The ranks a Trainer runs on: rank `rank` of `world`; `mesh` is None for one process."""

    rank: int = 0
    world: int = 1
    mesh: Any = None              # torch.distributed.device_mesh.DeviceMesh (1-D), or None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def start(cls, device: torch.device) -> Ranks:
        """Join the torchrun group when there is one of more than one process."""
        if not under_torchrun() or this_rank().world_size == 1:
            return cls(device=device)
        from torch.distributed.device_mesh import init_device_mesh

        local = this_rank().local_rank
        if device.type == "cuda" and (device.index if device.index is not None else 0) != local:
            raise InputError(f"rank with LOCAL_RANK={local} has its model on {device}: under "
                             f"torchrun each process loads on cuda:{local} (its own GPU)")
        r = join(str(device))
        mesh = init_device_mesh(device.type, (r.world_size,))
        return cls(r.rank, r.world_size, mesh, device)

    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_rows(self, rows: Sequence[list[int]]) -> tuple[list[list[int]], int]:
        """This rank's rows of a micro-batch and its loss weight (N, or 0 for a stand-in row
        when the slice is empty)."""
        mine = list(rows[self.rank:: self.world])
        return (mine, self.world) if mine else ([rows[0]], 0)

    def sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of `values` over the ranks (float64)."""
        if not self.sharded:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, value: float) -> list[float]:
        """Every rank's `value`, in rank order (on every rank)."""
        mine = [0.0] * self.world
        mine[self.rank] = value
        return self.sum(mine)

    def check_same(self, value: str, what: str) -> None:
        """InputError on every rank unless all ranks hold the same `value` (a digest of the
        data or settings): ranks that disagree would train on a mix without noticing."""
        if not self.sharded:
            return
        import torch.distributed as dist

        values: list[str | None] = [None] * self.world
        dist.all_gather_object(values, value)
        if len(set(values)) > 1:
            differ = [r for r, v in enumerate(values) if v != values[0]]
            raise InputError(f"the ranks do not agree on the {what}: ranks {differ} differ "
                             "from rank 0; start every rank with the same files and flags")

    def any(self, flag: bool) -> bool:
        return self.sum([float(flag)])[0] > 0

    def barrier(self) -> None:
        if self.sharded:
            import torch.distributed as dist

            dist.barrier()


def shard_model(model: Transformer, ranks: Ranks) -> None:
    """FSDP2: `fully_shard` each block, then the root (which takes what no block holds)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block, mesh=ranks.mesh)
    fully_shard(model, mesh=ranks.mesh)


def gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce-scatter gradients after this backward (the last micro-batch of a step) or keep
    them unsharded and local, accumulating (the others): one reduction per step."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def full_lora_tensors(model: Transformer, ranks: Ranks) -> dict[str, torch.Tensor]:
    """The LoRA weights as whole CPU tensors, on rank 0 (the others get {}). Every rank must
    call it: each sharded weight is all-gathered in turn."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in lora_state_dict(model).items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if ranks.is_main:
            out[name] = t.detach().to("cpu", copy=True)
    return out
