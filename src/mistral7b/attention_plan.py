"""What every layer of one forward step shares about attention: which keys each query sees.

`AttentionPlan` is made once per step (by KVPool.plan for the cached path, `uncached_plan`
for training and scoring) and read by every layer. Visibility is a pure function of
absolute positions (DESIGN §2.1-2.2; cache.py's docstring works an example):

    visible(q_pos, k_pos) = k_pos >= 0  and  k_pos <= q_pos  and  q_pos - k_pos < W
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Steps of up to this many tokens per row (decode, speculative verification, short chunks)
# attend through our paged kernel where it runs; longer pre-fill chunks through SDPA.
PAGED_MAX_T = 16


@dataclass
class AttentionPlan:
    """Everything the layers of one forward step share: computed once, used n_layers times.

    B = batch rows, T = padded chunk length, K = keys attended to. Keys come either as one
    contiguous slot range of the pool (`view`, no copy: one row whose blocks are adjacent)
    or gathered by slot index (`gather`, (B, K), padding points at the zero block).
    """

    mask: torch.Tensor                      # (B, 1, T, K) bool, True = visible
    write_b: torch.Tensor                   # (N,) batch index of each token written
    write_t: torch.Tensor                   # (N,) its index inside the chunk
    write_slot: torch.Tensor                # (N,) the pool slot it goes to
    view: tuple[int, int] | None = None     # keys = slots [start, stop) (B == 1)
    gather: torch.Tensor | None = None      # (B, K) slot of each key
    _grouped: dict[int, torch.Tensor | None] = field(default_factory=dict, repr=False)
    _queries: tuple | None = field(default=None, repr=False)

    def query_keys(self) -> tuple[torch.Tensor, torch.Tensor | None, int, int,
                                  torch.Tensor | None]:
        """The step's queries one by one, for attention read from the pool in place
        (kernels/csrc/attention.cpp): query row r = b * T + t. Returns
        (write slot of each query row, -1 for padding: (B*T,), the key slots gather
        (B*T, K) or None with the slot range [start, stop) for every row, and the mask
        (B*T, K), None when every key is visible). Made once per step."""
        if self._queries is None:
            B, _, T, K = self.mask.shape
            slots = torch.full((B * T,), -1, dtype=torch.long, device=self.mask.device)
            slots[self.write_b * T + self.write_t] = self.write_slot
            gather = None if self.gather is None else self.gather.repeat_interleave(T, 0)
            start, stop = self.view if self.view is not None else (0, 0)
            mask = None if self.grouped_mask(1) is None else self.mask.reshape(B * T, K)
            self._queries = (slots, gather, start, stop, mask)
        return self._queries

    def grouped_mask(self, groups: int) -> torch.Tensor | None:
        """The mask for G query heads folded into the query axis, (B, 1, G*T, K), built once
        per step (not once per layer); None when every key is visible to every query (a
        decode step whose keys all lie in the window), which lets attention skip masking."""
        if groups not in self._grouped:
            full = bool(self.mask.all())
            mask = self.mask.repeat(1, 1, groups, 1) if groups > 1 else self.mask
            self._grouped[groups] = None if full else mask
        return self._grouped[groups]


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
    return AttentionPlan(mask[:, None], empty, empty, empty), positions


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """The banded causal rule as a pure function of absolute positions (broadcasting).

    A key is visible to a query when its slot is filled (k_pos >= 0), it is not in the future,
    and, with a window W, it is one of the W most recent positions (the query's own included).
    """
    mask = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        mask &= (q_pos - k_pos) < window
    return mask
