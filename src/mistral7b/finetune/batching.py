"""Micro-batches for training: packing short examples into rows, and the row's attention plan.

Packing puts several examples into one row of at most seq_len tokens. Each example keeps its
own positions (0, 1, 2, ... again at its start) and sees only its own tokens: the mask is the
model's banded causal rule *and* "same example". Worked example, a row packing [a0 a1 a2] and
[b0 b1] (T = 5):

    positions  0 1 2 0 1        query b1 sees b0, b1 -- never a0..a2
    segment    0 0 0 1 1

So a packed row computes exactly what the examples would alone, minus the padding.
Without packing, rows hold one example each and batches group examples of similar length
(bucketing), so little padding is computed either way.

The epoch's order is a pure function of (seed, epoch): a resumed run rebuilds the same
micro-batches and skips those already done.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mistral7b.attention_plan import AttentionPlan, visible
from mistral7b.finetune.data import Example

IGNORE = -100  # label of padded logits positions (F.cross_entropy's ignore_index)


@dataclass
class Batch:
    """One forward's worth of rows. B rows, T tokens, n = most targets in a row.

    Only positions that predict a target get logits (the output projection over the whole
    vocabulary is a large share of a small model's compute).
    """

    tokens: torch.Tensor        # (B, T) token ids, 0 in padding
    positions: torch.Tensor     # (B, T) position of each token inside its own example
    plan: AttentionPlan         # mask (B, 1, T, T): causal, banded, within one example
    logits_index: torch.Tensor  # (B, n) positions whose logits predict a target
    labels: torch.Tensor        # (B, n) the target ids, IGNORE where padding
    n_tokens: int               # real tokens (padding excluded)
    n_targets: int              # tokens whose loss counts


def epoch_rows(examples: Sequence[Example], *, seq_len: int, batch_size: int, pack: bool,
               seed: int, epoch: int) -> list[list[list[int]]]:
    """Micro-batches of rows of example indices for one epoch: [batch][row][example]."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    if pack:
        rows: list[list[int]] = []
        room: list[int] = []
        for i in order:  # first fit, in shuffled order
            n = len(examples[i])
            for r, free in enumerate(room):
                if n <= free:
                    rows[r].append(i)
                    room[r] -= n
                    break
            else:
                rows.append([i])
                room.append(seq_len - n)
        rng.shuffle(rows)
    else:
        # Bucketing: sort by length (ties broken by the shuffle), then cut into batches.
        rows = [[i] for i in sorted(order, key=lambda i: len(examples[i]))]
    batches = [rows[s: s + batch_size] for s in range(0, len(rows), batch_size)]
    rng.shuffle(batches)
    return batches


def make_batch(examples: Sequence[Example], rows: list[list[int]], window: int | None,
               device: torch.device | str = "cpu") -> Batch:
    """Tensors for rows of (packed) examples."""
    B = len(rows)
    lengths = [sum(len(examples[i]) for i in row) for row in rows]
    T = max(lengths)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)
    index_rows: list[list[int]] = []
    label_rows: list[list[int]] = []
    for b, row in enumerate(rows):
        t, idx, lab = 0, [], []
        for s, i in enumerate(row):
            ex = examples[i]
            n = len(ex)
            tokens[b, t: t + n] = torch.tensor(ex.ids)
            positions[b, t: t + n] = torch.arange(n)
            segment[b, t: t + n] = s
            # target j is predicted by the logits at j - 1 of the same example
            for j in range(1, n):
                if ex.targets[j]:
                    idx.append(t + j - 1)
                    lab.append(ex.ids[j])
            t += n
        index_rows.append(idx)
        label_rows.append(lab)
    n = max(1, max(len(r) for r in index_rows))
    logits_index = torch.zeros(B, n, dtype=torch.long)
    labels = torch.full((B, n), IGNORE, dtype=torch.long)
    for b, (idx, lab) in enumerate(zip(index_rows, label_rows)):
        logits_index[b, : len(idx)] = torch.tensor(idx, dtype=torch.long)
        labels[b, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    plan = packed_plan(positions, segment, window)
    n_targets = sum(len(r) for r in label_rows)
    return Batch(tokens.to(device), positions.to(device), _plan_to(plan, device),
                 logits_index.to(device), labels.to(device), sum(lengths), n_targets)


def packed_plan(positions: torch.Tensor, segment: torch.Tensor,
                window: int | None) -> AttentionPlan:
    """A cache-free plan whose mask keeps each packed example to itself (segment -1 = pad)."""
    valid = segment >= 0                                                   # (B, T)
    k_pos = torch.where(valid, positions, -1)[:, None, :]                  # (B, 1, T)
    same = segment[:, :, None] == segment[:, None, :]                      # (B, T, T)
    mask = visible(positions[:, :, None], k_pos, window) & same
    mask |= ~valid[:, :, None]  # padding queries see everything (no all-masked softmax row)
    empty = torch.zeros(0, dtype=torch.long)
    return AttentionPlan(mask[:, None], empty, empty, empty)


def _plan_to(plan: AttentionPlan, device: torch.device | str) -> AttentionPlan:
    if torch.device(device) == plan.mask.device:
        return plan
    return AttentionPlan(plan.mask.to(device), plan.write_b.to(device),
                         plan.write_t.to(device), plan.write_slot.to(device))
