"""Rolling buffer KV cache and position-based attention masks (DESIGN §2.1-2.2).

Per layer and per sequence row the cache holds `n_slots` key/value vectors: W slots when the
model has a sliding window, else the longest sequence asked for. The k/v of absolute position
p lives in slot p mod n_slots, and every slot remembers the position it holds (-1 = empty),
so visibility is a pure function of positions:

    visible(q_pos, k_pos) = k_pos >= 0  and  k_pos <= q_pos  and  q_pos - k_pos < W

Worked example, W = n_slots = 4, a sequence that has seen positions 0..5:

    slot:      0  1  2  3
    position:  4  5  2  3        (4 and 5 overwrote 0 and 1)

A query at position 6 lands in slot 2; it may see positions 3, 4, 5 and itself (6 - 3 < 4),
which are exactly the slots that survive the write. That is why a single new token can be
written *before* attention ("write-first"). A chunk of several tokens cannot always: the chunk's
token at position 7 (slot 3) would overwrite position 3, which the chunk's query at 6 still
needs. Multi-token chunks on a wrapping cache therefore attend to [cache before the chunk ;
the chunk itself] and write the chunk's last n_slots tokens afterwards ("concat").
Without a window positions never wrap (n_slots covers the whole sequence), so every step is
write-first and attends only to the filled prefix of the slots.

Memory: 2 * n_layers * n_kv_heads * head_dim * n_slots elements per row, i.e. 128 KiB per
slot for Mistral 7B in bf16, 512 MiB per sequence at W = 4096 however long the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mistral7b.config import ModelConfig


@dataclass
class AttentionPlan:
    """Everything the layers of one forward step share: computed once, used n_layers times.

    B = batch rows in this step, T = padded chunk length, K = number of keys attended to.
    """

    rows: slice | list[int]         # cache rows of the B batch entries (a slice when contiguous)
    write_first: bool               # write the chunk, then attend to slots[:, :n_keys]
    n_keys: int                     # write-first: number of leading slots attended to
    mask: torch.Tensor              # (B, 1, T, K) bool, True = visible
    write_b: torch.Tensor           # (N,) batch index of each token written to the cache
    write_t: torch.Tensor           # (N,) its index inside the chunk
    write_row: torch.Tensor         # (N,) its cache row
    write_slot: torch.Tensor        # (N,) the slot it goes to
    _grouped: dict[int, torch.Tensor | None] = field(default_factory=dict, repr=False)

    def grouped_mask(self, groups: int) -> torch.Tensor | None:
        """The mask for G query heads folded into the query axis, (B, 1, G*T, K), built once
        per step (not once per layer); None when every key is visible to every query (a
        decode step whose keys all lie in the window), which lets attention skip masking."""
        if groups not in self._grouped:
            full = bool(self.mask.all())
            mask = self.mask.repeat(1, 1, groups, 1) if groups > 1 else self.mask
            self._grouped[groups] = None if full else mask
        return self._grouped[groups]


class KVCache:
    """Preallocated k/v tensors (n_layers, rows, n_kv_heads, n_slots, head_dim) + slot positions.

    One row per sequence; `lengths[r]` is how many tokens row r has seen (its next position).
    The engine owns the cache; the model only calls `update` through the plan.
    """

    def __init__(self, config: ModelConfig, n_rows: int, max_seq_len: int, *,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.window = config.sliding_window
        self.max_seq_len = max_seq_len
        self.n_slots = min(self.window, max_seq_len) if self.window else max_seq_len
        shape = (config.n_layers, n_rows, config.n_kv_heads, self.n_slots, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_pos = torch.full((n_rows, self.n_slots), -1, dtype=torch.long, device=device)
        self.lengths = [0] * n_rows
        self.device = torch.device(device)

    @property
    def n_rows(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reset(self, rows: list[int] | None = None) -> None:
        """Forget the sequences in `rows` (all by default) so the rows can be reused."""
        rows = list(range(self.n_rows)) if rows is None else rows
        for r in rows:
            self.lengths[r] = 0
        self.slot_pos[rows] = -1

    def plan(self, rows: list[int], n_new: list[int]) -> tuple[AttentionPlan, torch.Tensor]:
        """Plan one forward step where batch entry b feeds n_new[b] tokens to cache row rows[b].

        Returns the plan and the absolute positions (B, T) of the chunk (padding included),
        and advances `lengths`. Padding tokens (t >= n_new[b]) are never written and no
        real query ever sees them.
        """
        if len(rows) != len(n_new) or not rows:
            raise ValueError("rows and n_new must be non-empty and of equal length")
        dev = self.device
        T = max(n_new)
        start = torch.tensor([self.lengths[r] for r in rows], dtype=torch.long, device=dev)
        counts = torch.tensor(n_new, dtype=torch.long, device=dev)
        positions = start[:, None] + torch.arange(T, device=dev)            # (B, T)
        valid = torch.arange(T, device=dev)[None, :] < counts[:, None]      # (B, T)
        ends = [self.lengths[r] + n for r, n in zip(rows, n_new)]
        if max(ends) > self.max_seq_len:
            raise ValueError(
                f"sequence would reach {max(ends)} tokens but the cache was sized for "
                f"{self.max_seq_len}")
        wraps = self.window is not None and max(ends) > self.n_slots
        write_first = T == 1 or not wraps
        row_index = _as_index(rows)
        row_t = torch.tensor(rows, dtype=torch.long, device=dev)

        # Which chunk tokens go into the cache: the last n_slots valid ones of each row.
        keep = valid & (torch.arange(T, device=dev)[None, :] >= counts[:, None] - self.n_slots)
        write_b, write_t = keep.nonzero(as_tuple=True)
        write_pos = positions[write_b, write_t]
        write_slot = write_pos % self.n_slots
        write_row = row_t[write_b]

        q_pos = positions[:, :, None]                                       # (B, T, 1)
        if write_first:
            self.slot_pos[write_row, write_slot] = write_pos
            n_keys = min(self.n_slots, max(ends))
            k_pos = self.slot_pos[row_index, :n_keys][:, None, :]           # (B, 1, K)
        else:
            n_keys = self.n_slots
            cached = self.slot_pos[row_index][:, None, :]                   # (B, 1, S)
            chunk = torch.where(valid, positions, -1)[:, None, :]           # (B, 1, T)
            k_pos = torch.cat([cached, chunk], dim=-1)                      # (B, 1, S+T)
            self.slot_pos[write_row, write_slot] = write_pos
        mask = visible(q_pos, k_pos, self.window)
        # Padding queries see everything: their output is discarded, and a fully masked row
        # would make softmax produce NaN.
        mask |= ~valid[:, :, None]
        for r, end in zip(rows, ends):
            self.lengths[r] = end
        plan = AttentionPlan(row_index, write_first, n_keys, mask[:, None], write_b, write_t,
                             write_row, write_slot)
        return plan, positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's chunk k/v (B, KV, T, D) and return the keys/values to attend to.

        Returns (B, KV, K, D) tensors matching plan.mask's last dimension.
        """
        ck, cv = self.k[layer], self.v[layer]                               # (R, KV, S, D)
        src_k = k[plan.write_b, :, plan.write_t]                            # (N, KV, D)
        src_v = v[plan.write_b, :, plan.write_t]
        if plan.write_first:
            ck[plan.write_row, :, plan.write_slot] = src_k
            cv[plan.write_row, :, plan.write_slot] = src_v
            return ck[plan.rows, :, :plan.n_keys], cv[plan.rows, :, :plan.n_keys]
        keys = torch.cat([ck[plan.rows], k], dim=2)                          # (B, KV, S+T, D)
        values = torch.cat([cv[plan.rows], v], dim=2)
        ck[plan.write_row, :, plan.write_slot] = src_k
        cv[plan.write_row, :, plan.write_slot] = src_v
        return keys, values


def uncached_plan(lengths: list[int], window: int | None,
                  device: torch.device | str = "cpu") -> tuple[AttentionPlan, torch.Tensor]:
    """A plan for a forward without a cache (training, scoring whole sequences): row b holds
    lengths[b] tokens from position 0, padded to the longest; keys are the chunk itself.

    Returns the plan and the positions (B, T); pass `cache=None` to the model with it.
    """
    T = max(lengths)
    counts = torch.tensor(lengths, dtype=torch.long, device=device)
    positions = torch.arange(T, device=device).expand(len(lengths), T)
    valid = positions < counts[:, None]
    k_pos = torch.where(valid, positions, -1)[:, None, :]                  # (B, 1, T)
    mask = visible(positions[:, :, None], k_pos, window) | ~valid[:, :, None]
    empty = torch.zeros(0, dtype=torch.long, device=device)
    plan = AttentionPlan(slice(0, len(lengths)), False, T, mask[:, None], empty, empty, empty,
                         empty)
    return plan, positions


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """The banded causal rule as a pure function of absolute positions (broadcasting).

    A key is visible to a query when its slot is filled (k_pos >= 0), it is not in the future,
    and, with a window W, it is one of the W most recent positions (the query's own included).
    """
    mask = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        mask &= (q_pos - k_pos) < window
    return mask


def _as_index(rows: list[int]) -> slice | list[int]:
    """A slice when rows are contiguous, so reading the cache is a view and not a copy."""
    first = rows[0]
    if rows == list(range(first, first + len(rows))):
        return slice(first, first + len(rows))
    return rows
