"""The sampling filters written the plain way, as the oracle for mistral7b.sampling.

Each takes logits ``[..., V]``, sorts or scans the whole row, and masks what it drops with
``-inf``. Production (`sampling._filtered_distribution`) computes the same distribution on
the surviving tokens only, with partial top-k instead of full sorts; tests check that the
two agree and that these match hand-computed examples.
"""

from __future__ import annotations

import math

import torch

from mistral7b.sampling import _MASS_TOL  # the documented slack for float32 probability mass


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` highest logits of each row (ties -> lowest ids), mask the rest.

    ``k == 0`` or ``k >= V`` keeps everything; exactly k (as llama.cpp, not every token tied
    with the k-th) makes top_k=1 identical to greedy.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order[..., :k], True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose mass reaches ``p``.

    Ranked by probability, ties by lowest id; rank r is kept when the mass of ranks 0..r-1 is
    below p, so rank 0 always is. Probabilities [0.5, 0.3, 0.15, 0.05] with p = 0.8 keep ids 0
    and 1. Masses within _MASS_TOL of p count as reaching it.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits.double(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep_sorted = mass_before < p - _MASS_TOL
    keep_sorted[..., 0] = True
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with ``p >= min_p * p_max``, i.e. ``l >= l_max + log(min_p)``.

    p_max 0.5 and min_p 0.2 keep every token with p >= 0.1; ``min_p == 0`` keeps everything.
    """
    if min_p <= 0.0:
        return logits
    row_max = logits.amax(dim=-1, keepdim=True)
    keep = logits >= row_max + (math.log(min_p) - _MASS_TOL)
    return logits.masked_fill(~keep, float("-inf"))
