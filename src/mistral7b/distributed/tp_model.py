"""Running a tensor-parallel model: rank 0 drives, the other ranks follow call by call.

Rank 0 runs the ordinary engine and scheduler (tokenizer, sampling, stop strings, I/O, the
server) on its shard of the model. Every call of its Transformer first broadcasts the call's
inputs (tokens, positions, the attention plan, logits_index) to the other ranks, which run
the same call on their shards in `serve`; inside, the two all-reduces per block (tp.py) keep
all ranks' activations equal. Each rank's KV cache holds its own kv heads in the same slots:
the block bookkeeping is rank 0's alone (the plan it sends says where each token goes), and
the one pool operation that moves KV data, `_copy_slots` (prefix reuse, `fork`), is mirrored.
`truncate`, `release`, `trim` move no data and need no message.

Logits are wanted only where sampling happens, so the output projection lives on rank 0
alone (workers drop it: vocab x dim, 131 M parameters of Mistral 7B's 7.24 B). Sharding it by
vocabulary would save rank 0 that 1.8 % of the weights at the price of a gather of the
logits every step; bench/bench_tp.py measures what each rank holds.

Messages go over their own gloo group whose collectives never time out: a worker may wait
for rank 0's next call as long as a server sits idle. The all-reduces use the default group,
whose timeout (MISTRAL7B_COLLECTIVE_TIMEOUT) bounds how long a rank waits for a dead peer;
gloo also fails at once when a peer's connection drops. Either way each rank raises
RankFailed, and the CLI exits non-zero with that one line.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import inspect
import json
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mistral7b.attention_plan import AttentionPlan
from mistral7b.cache import KVPool
from mistral7b.config import ModelConfig
from mistral7b.distributed import runtime
from mistral7b.distributed.tp import ROW_PARALLEL, TPPlan
from mistral7b.distributed.tp_weights import load_shard
from mistral7b.errors import InputError, Mistral7BError
from mistral7b.model import Transformer
from mistral7b.weights.base import CheckpointReader

# The message channel waits for rank 0's next call without a deadline (an idle server).
_IDLE_WAIT = timedelta(days=365)


class RankFailed(Mistral7BError):
    """Another rank of the tensor-parallel group died or stopped answering."""


def _failed(what: str, exc: BaseException) -> RankFailed:
    rank = runtime.this_rank()
    detail = " ".join(str(exc).split())[:300]
    return RankFailed(
        f"tensor parallel: rank {rank.rank} of {rank.world_size} lost the group during {what} "
        f"(another rank died or did not answer within {runtime.TIMEOUT_ENV}="
        f"{runtime.collective_timeout().total_seconds():g} s): {detail}")


class Channel:
    """Rank 0's messages to the other ranks, in order, over a gloo group of their own."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo", timeout=_IDLE_WAIT)
        self.broken = False

    def send(self, message: tuple[Any, ...]) -> None:
        if self.broken:
            raise RankFailed("tensor parallel: the group has failed before; restart")
        try:
            dist.broadcast_object_list([message], src=0, group=self.group)
        except RuntimeError as exc:
            self.broken = True
            raise _failed(f"a {message[0]} message", exc) from None

    def receive(self) -> tuple[Any, ...]:
        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except RuntimeError as exc:
            raise _failed("the wait for rank 0's next call", exc) from None
        return box[0]


def _plan_to(plan: AttentionPlan | None, device: torch.device | str) -> AttentionPlan | None:
    """A copy of the plan on `device` (CPU to send it: a CUDA tensor would arrive on the
    sender's GPU index), without its per-step caches (grouped masks, query keys)."""
    if plan is None:
        return None
    moved = {f.name: getattr(plan, f.name).to(device) for f in dataclasses.fields(plan)
             if isinstance(getattr(plan, f.name), torch.Tensor)}
    return dataclasses.replace(plan, _grouped={}, _queries=None, **moved)


def _all_reduce(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a row-parallel layer: sum the ranks' partial products."""
    output = output.contiguous()
    try:
        dist.all_reduce(output)
    except RuntimeError as exc:
        raise _failed("an all-reduce", exc) from None
    return output


def add_all_reduces(model: Transformer) -> None:
    for layer in model.layers:
        for path in ROW_PARALLEL:
            layer.get_submodule(path).register_forward_hook(_all_reduce)


class MirroredPool(KVPool):
    """Rank 0's KV pool: made, and its slots copied, on every rank alike."""

    def __init__(self, config: ModelConfig, budget_bytes: int, *, dtype: torch.dtype,
                 device: torch.device | str, block_size: int, channel: Channel,
                 local: ModelConfig) -> None:
        channel.send(("pool", budget_bytes, dtype, block_size))
        self._channel = channel
        super().__init__(local, budget_bytes, dtype=dtype, device=device,
                         block_size=block_size)

    def _copy_slots(self, src: int, dst: int, n: int) -> None:
        self._channel.send(("copy", src, dst, n))
        super()._copy_slots(src, dst, n)


_FORWARD = inspect.signature(Transformer.forward)


class TensorParallel:
    """This process's place in a tensor-parallel group and what it needs to run its shard."""

    def __init__(self, tp: int, device: torch.device) -> None:
        if not runtime.under_torchrun():
            raise InputError(
                f"tp={tp} needs one process per rank: run the script under `torchrun "
                f"--nproc-per-node {tp} ...` (the CLI's --tp {tp} starts them itself)")
        rank = runtime.this_rank()
        if rank.world_size != tp:
            raise InputError(f"tp={tp} but torchrun started {rank.world_size} processes: "
                             f"they must be equal (--nproc-per-node x --nnodes)")
        if device.type == "cuda":
            device = torch.device("cuda", rank.local_rank)
        self.rank, self.tp, self.device = rank, tp, device
        runtime.join(str(device))
        self.channel = Channel()
        self.stopped = False

    def load(self, reader: CheckpointReader, quant: str | None, *,
             dtype: torch.dtype) -> Transformer:
        self._check_agreement(reader, quant, dtype)   # first: then every rank fails alike
        plan = TPPlan(reader.config, self.tp, self.rank.rank)
        model = load_shard(reader, plan, quant, dtype=dtype, device=self.device)
        add_all_reduces(model)
        self.plan = plan
        return model

    def _check_agreement(self, reader: CheckpointReader, quant: str | None,
                         dtype: torch.dtype) -> None:
        """Every rank must load the same file as the same model: compare a fingerprint of
        the config, the load options and the files' sizes and times."""
        mine = _fingerprint(reader, quant, dtype)
        everyone: list[Any] = [None] * self.tp
        try:
            dist.all_gather_object(everyone, mine)
        except RuntimeError as exc:
            raise _failed("the start-up check", exc) from None
        odd = [r for r, theirs in enumerate(everyone) if theirs != everyone[0]]
        if odd:
            raise InputError(
                f"tensor parallel: rank(s) {odd} opened a different model or options than "
                f"rank 0 ({reader.path}): every rank must load the same file, unchanged, "
                "with the same quant and dtype")

    def start(self, model: Transformer) -> None:
        """Rank 0: broadcast every model call and stop the workers at exit. Other ranks:
        serve rank 0's calls until it stops, then exit the process (status 0)."""
        if self.rank.is_main:
            model.register_forward_pre_hook(self._broadcast_call, with_kwargs=True)
            atexit.register(self.stop)
            return
        self._drop_output(model)
        try:
            serve(model, self.channel, self.device)
        finally:
            runtime.leave()
        sys.exit(0)

    @staticmethod
    def _drop_output(model: Transformer) -> None:
        """A worker computes no logits (module docstring): free the output projection, and
        the mapped file pages it was read from (an untied one is not used by anything else;
        the pages are unwritten, so dropping them changes nothing)."""
        from mistral7b.quant.memory import release

        weight = getattr(model.output, "weight", None)
        if isinstance(weight, torch.Tensor) and not model.config.tied_embeddings:
            release(weight, unmodified=True)
        model.output = nn.Identity()  # type: ignore[assignment]

    def pool_type(self, config: ModelConfig, budget_bytes: int, *, dtype: torch.dtype,
                  device: torch.device | str, block_size: int) -> KVPool:
        """Engine.pool_type on rank 0: the cache of this rank's kv heads, on every rank."""
        return MirroredPool(config, budget_bytes, dtype=dtype, device=device,
                            block_size=block_size, channel=self.channel,
                            local=self.plan.local_config)

    def _broadcast_call(self, module: nn.Module, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> None:
        call = _FORWARD.bind(module, *args, **kwargs).arguments
        index = call.get("logits_index")
        self.channel.send((
            "forward", call["tokens"].cpu(), call["positions"].cpu(),
            call["cache"] is not None, _plan_to(call["plan"], "cpu"),
            None if index is None else index.cpu()))

    def stop(self) -> None:
        """Tell the workers to exit (rank 0; once; nothing if the group already failed)."""
        if self.stopped or not self.rank.is_main:
            return
        self.stopped = True
        if not self.channel.broken:
            try:
                self.channel.send(("stop",))
            except RankFailed:
                pass
        runtime.leave()


@torch.inference_mode()
def serve(model: Transformer, channel: Channel, device: torch.device) -> None:
    """A worker rank: run rank 0's calls on this shard until it says stop."""
    pool: KVPool | None = None
    while True:
        message = channel.receive()
        kind = message[0]
        if kind == "forward":
            _, tokens, positions, cached, plan, index = message
            model(tokens.to(device), positions.to(device), pool if cached else None,
                  _plan_to(plan, device), None if index is None else index.to(device))
        elif kind == "pool":
            _, budget, dtype, block_size = message
            pool = None
            with torch.inference_mode(False):
                try:
                    pool = KVPool(model.config, budget, dtype=dtype, device=device,
                                  block_size=block_size)
                except InputError:
                    pass                        # rank 0 failed the same way and retries
        elif kind == "copy":
            assert pool is not None
            with torch.inference_mode(False):
                pool._copy_slots(*message[1:])
        elif kind == "stop":
            return
        else:
            raise RankFailed(f"tensor parallel: unknown message {kind!r} from rank 0")


def _fingerprint(reader: CheckpointReader, quant: str | None, dtype: torch.dtype) -> str:
    path = reader.path
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    text = json.dumps([reader.config.to_dict(), quant, str(dtype), stats], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()
