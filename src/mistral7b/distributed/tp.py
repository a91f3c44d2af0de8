"""Tensor parallel: which slice of every weight a rank holds (the shard math, nothing else).

Megatron's split of a decoder block over `tp` ranks, with heads kept whole so that grouped-
query attention stays local to a rank (no communication inside attention):

    tensor                 split                   rank r of tp holds
    wq (H*Dh, D)           column-parallel (rows)  query heads r*H/tp .. (r+1)*H/tp - 1
    wk, wv (KV*Dh, D)      column-parallel (rows)  the kv heads those query heads use
    wo (D, H*Dh)           row-parallel (columns)  the columns of its query heads
    w1, w3 (F, D)          column-parallel (rows)  rows r*F/tp .. (r+1)*F/tp - 1
    w2 (D, F)              row-parallel (columns)  the same range, as columns
    embeddings, norms      replicated
    output (V, D)          rank 0 only (see tp_model.py: logits are needed where sampling is)

A row-parallel layer gives each rank a partial sum of y = x W^T over its columns; one
all-reduce (sum) after wo and one after w2 make every rank's activations whole again: two
all-reduces per block, none elsewhere.

Worked example, Mistral 7B (H = 32, KV = 8, G = 4 query heads per kv head, F = 14336), tp = 2:
rank 1 holds query heads 16..31 (wq rows 2048..4095), kv heads 4..7 (wk/wv rows 512..1023;
query head 16 uses kv head 16 // 4 = 4, as on one process), wo columns 2048..4095, and
w1/w3 rows / w2 columns 7168..14335. Its KV cache holds kv heads 4..7 only: half the memory.

With tp > KV (vLLM's rule) each kv head is replicated on tp / KV ranks: tp = 16 gives rank r
query heads 2r, 2r+1 and kv head r // 2 (both use it: (2r) // 4 = (2r+1) // 4 = r // 2).
That needs tp to be a multiple of KV; otherwise KV must be a multiple of tp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mistral7b.config import ModelConfig
from mistral7b.errors import InputError

_LAYER_TENSOR = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight")
# rows (dim 0) or columns (dim 1) of each sharded tensor
_SPLIT = {"attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "attention.wo": 1,
          "feed_forward.w1": 0, "feed_forward.w3": 0, "feed_forward.w2": 1}
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")   # followed by an all-reduce


@dataclass(frozen=True)
class TPPlan:
    """Rank `rank` of `tp` over a model of shape `config` (the whole model's)."""

    config: ModelConfig
    tp: int
    rank: int

    def __post_init__(self) -> None:
        c, tp = self.config, self.tp
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise InputError(f"tp must be a positive integer, got {tp!r}")
        if not 0 <= self.rank < tp:
            raise InputError(f"rank {self.rank} is outside a tensor-parallel group of {tp}")
        kv_ok = c.n_kv_heads % tp == 0 or tp % c.n_kv_heads == 0
        if c.n_heads % tp or not kv_ok:
            raise InputError(
                f"tp={tp} cannot split this model's attention heads (n_heads={c.n_heads}, "
                f"n_kv_heads={c.n_kv_heads}): tp must divide n_heads, and divide n_kv_heads "
                f"or be a multiple of it; choose one of {valid_tp(c) or [1]}")
        if c.hidden_dim % tp:
            raise InputError(f"tp={tp} does not divide the feed-forward width hidden_dim="
                             f"{c.hidden_dim}; choose one of {valid_tp(c) or [1]}")

    @property
    def q_heads(self) -> tuple[int, int]:
        """[first, stop) of this rank's query heads."""
        n = self.config.n_heads // self.tp
        return self.rank * n, (self.rank + 1) * n

    @property
    def kv_heads(self) -> tuple[int, int]:
        """[first, stop) of the kv heads this rank's query heads use (one replicated head
        when tp > n_kv_heads)."""
        kv, tp = self.config.n_kv_heads, self.tp
        if kv >= tp:
            n = kv // tp
            return self.rank * n, (self.rank + 1) * n
        head = self.rank * kv // tp
        return head, head + 1

    @property
    def ffn(self) -> tuple[int, int]:
        n = self.config.hidden_dim // self.tp
        return self.rank * n, (self.rank + 1) * n

    @property
    def local_config(self) -> ModelConfig:
        """The shape of this rank's shard: a Transformer built from it is the shard."""
        (q0, q1), (k0, k1), (f0, f1) = self.q_heads, self.kv_heads, self.ffn
        return self.config.with_(n_heads=q1 - q0, n_kv_heads=k1 - k0, hidden_dim=f1 - f0)

    def part(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of tensor `name` (our naming) that this rank holds, or None
        when it holds the whole tensor."""
        match = _LAYER_TENSOR.fullmatch(name)
        if match is None or self.tp == 1:
            return None
        layer = match[1]
        dh = self.config.head_dim
        if layer in ("attention.wq", "attention.wo"):
            lo, hi = self.q_heads[0] * dh, self.q_heads[1] * dh
        elif layer in ("attention.wk", "attention.wv"):
            lo, hi = self.kv_heads[0] * dh, self.kv_heads[1] * dh
        else:
            lo, hi = self.ffn
        return _SPLIT[layer], lo, hi

    def local_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        part = self.part(name)
        if part is None:
            return tuple(shape)
        dim, lo, hi = part
        out = list(shape)
        out[dim] = hi - lo
        return tuple(out)


def valid_tp(config: ModelConfig, most: int = 64) -> list[int]:
    """The tensor-parallel sizes up to `most` this model's heads and width allow."""
    c = config
    return [tp for tp in range(2, most + 1)
            if c.n_heads % tp == 0 and c.hidden_dim % tp == 0
            and (c.n_kv_heads % tp == 0 or tp % c.n_kv_heads == 0)]


def check_group_boundary(name: str, plan: TPPlan, cols: int, group: int, what: str) -> None:
    """A row-parallel shard (wo, w2) splits the input dimension: the cut must fall between
    quantization groups, so that each rank's groups are exactly those of the whole row."""
    part = plan.part(name)
    if part is None or part[0] != 1:
        return
    _, lo, hi = part
    if lo % group or hi % group:
        raise InputError(
            f"{name}: tp={plan.tp} splits its {cols} input columns at {lo}..{hi}, which is "
            f"not a multiple of the {what} group of {group} values; use a tp that keeps "
            f"whole groups ({[t for t in valid_tp(plan.config) if (cols // t) % group == 0]})"
            " or load it unquantized")
