"""Logits -> token: sampling parameters and small pure functions over float32 logits.

One decode step gives float32 logits ``[B, V]``, one row per sequence, and each sequence has
its own :class:`SamplingParams`. For a row, :func:`sample_token` applies, in this order (the
order of vLLM's v0 sampler; llama.cpp's default chain puts temperature last instead):

    1. repetition penalty        (HF/CTRL; tokens of prompt + output)
    2. frequency/presence        (OpenAI; tokens of the output only), then logit_bias
    3. temperature               (0 -> greedy argmax, steps 4-7 skipped)
    4. top-k                     (exactly k tokens; ties -> lowest ids)
    5. top-p                     (smallest nucleus with mass >= p; ties -> lowest ids)
    6. min-p                     (p >= min_p * p_max)
    7. categorical draw (inverse CDF) with the sequence's own torch.Generator

Top-k is unaffected by temperature; top-p and min-p see the tempered distribution (after
top-k, top-p measures mass within the k kept tokens, as vLLM does). sample_token runs
steps 3-7 on the surviving tokens only, so a 32k row with top_k=40 costs ~0.2 ms on CPU, not a full sort.
Filters never change the argmax, so greedy ignores them. Steps 4-6 have no full-row
functions here: tests/sampling_reference.py writes each as a plain mask over ``[..., V]``,
the oracle that `_filtered_distribution` is checked against.

:func:`sample_batch` is the engine's entry point: when every row is greedy without penalties
(the common decode case) it is one vectorised ``argmax``; other rows go through
:func:`sample_token`. Reported log-probabilities (:func:`token_logprobs`) are those of the raw
model distribution, before any penalty or filter, as OpenAI and vLLM report them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from mistral7b.errors import InputError
from mistral7b.sampling_params import SamplingParams

# Slack for comparisons of probability mass: float32 logits carry ~1e-7 relative rounding, so
# a nucleus of mass 0.8 in exact arithmetic may sum to 0.79999995. 1e-6 absorbs that.
_MASS_TOL = 1e-6


class NonFiniteLogitsError(InputError):
    """The model produced NaN/+inf logits (or a row with every token masked) for some rows.

    ``rows`` lists the offending batch rows so a server can fail only those requests.
    """

    def __init__(self, rows: Sequence[int]) -> None:
        self.rows = list(rows)
        super().__init__(
            f"logits of batch row(s) {self.rows} contain NaN or +inf, or mask every token; "
            "no token can be sampled (the model's weights or inputs are probably broken)"
        )


class TokenHistory(NamedTuple):
    """What the penalties look at for one sequence: its prompt ids and generated ids."""

    prompt_ids: Sequence[int] | torch.Tensor
    output_ids: Sequence[int] | torch.Tensor


# ---------------------------------------------------------------------------------------------
# Parameters (the SamplingParams class is in sampling_params.py, torch-free)


def apply_logit_bias(row: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """``row[id] += b`` for each (id, b); -100 bans a token outright (-inf)."""
    if not bias:
        return row
    ids = _as_ids([i for i, _ in bias], row.shape[-1], row.device)
    values = torch.tensor([float("-inf") if b <= -100 else b for _, b in bias],
                          dtype=row.dtype, device=row.device)
    return row.index_add(-1, ids, values)


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A generator for one sequence, or None (use torch's global RNG) when unseeded.

    Give every seeded sequence its own generator: its draws then depend only on its own
    history, never on which other sequences share the batch. A CPU generator (the default)
    also serves CUDA logits: each draw takes one uniform from it and moves that scalar.
    """
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# ---------------------------------------------------------------------------------------------
# Pure functions over logits [..., V]


def check_finite_logits(logits: torch.Tensor) -> None:
    """Raise NonFiniteLogitsError unless every row of ``[..., V]`` has a finite maximum.

    ``-inf`` entries are masking and allowed; NaN, +inf or an all ``-inf`` row are not
    (``amax`` propagates NaN, so one reduction checks all three).
    """
    row_max = logits.amax(dim=-1).reshape(-1)  # (rows,)
    bad = ~torch.isfinite(row_max)
    if bool(bad.any()):
        raise NonFiniteLogitsError(bad.nonzero().flatten().tolist())


def _as_ids(ids: Sequence[int] | torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise InputError(
            f"token ids must be in [0, {vocab_size - 1}], got ids in "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    return ids


def apply_repetition_penalty(
    logits: torch.Tensor, prev_ids: Sequence[int] | torch.Tensor, penalty: float
) -> torch.Tensor:
    """HF/CTRL repetition penalty on every token id in ``prev_ids`` (prompt + output).

    logits: ``[V]`` with prev_ids ``[N]``, or ``[B, V]`` with prev_ids ``[B, N]`` (pad a short
    row by repeating one of its ids: repeats change nothing). A seen token's positive logit is
    divided by ``penalty``, a negative one multiplied, so ``penalty > 1`` always makes it less
    likely: e.g. penalty 2 turns 3.0 into 1.5 and -1.0 into -2.0.
    """
    if penalty == 1.0:
        return logits
    ids = _as_ids(prev_ids, logits.shape[-1], logits.device)
    if ids.numel() == 0:
        return logits
    seen = logits.gather(-1, ids)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, ids, seen)


def token_counts(ids: Sequence[int] | torch.Tensor, vocab_size: int,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """How often each vocabulary id occurs in ``ids``: a ``[V]`` float32 tensor."""
    ids = _as_ids(ids, vocab_size, torch.device(device)).reshape(-1)
    return torch.bincount(ids, minlength=vocab_size).to(torch.float32)


def apply_frequency_presence(
    logits: torch.Tensor, output_token_counts: torch.Tensor, freq: float, presence: float
) -> torch.Tensor:
    """OpenAI penalties: ``logit[j] -= count[j] * freq + (count[j] > 0) * presence``.

    output_token_counts has the shape of logits (``[V]`` or ``[B, V]``) and counts the
    *generated* tokens only (see :func:`token_counts`); the prompt is not penalised.
    """
    if freq == 0.0 and presence == 0.0:
        return logits
    counts = output_token_counts.to(device=logits.device, dtype=logits.dtype)
    return logits - counts * freq - (counts > 0).to(logits.dtype) * presence


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``: softmax of the result is the tempered distribution.

    Temperature must be positive; greedy (temperature 0) is decided before this step.
    """
    if not temperature > 0 or not math.isfinite(temperature):
        raise InputError(f"apply_temperature needs a finite temperature > 0, got {temperature}")
    if temperature == 1.0:
        return logits
    return logits / temperature


def _exactly_top(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask ``[..., V]`` of exactly the k largest entries; among ties the lowest ids win."""
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (..., 1) k-th largest value
    above = logits > kth
    tied = logits == kth
    room = k - above.sum(dim=-1, keepdim=True)  # how many tied entries still fit
    return above | (tied & (tied.cumsum(dim=-1) <= room))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dimension, ties -> lowest id (torch.argmax returns the first)."""
    return logits.argmax(dim=-1)


def _float_row(logits_row: torch.Tensor) -> torch.Tensor:
    if logits_row.dim() != 1:
        raise InputError(f"expected one row of logits [V], got shape {tuple(logits_row.shape)}")
    return logits_row.float()


def _apply_penalties(
    row: torch.Tensor, params: SamplingParams, history: TokenHistory | None
) -> torch.Tensor:
    if not params.has_penalties:
        return row
    if history is not None:
        prompt_ids, output_ids = history
        vocab = row.shape[-1]
        if params.repetition_penalty != 1.0:
            prompt = _as_ids(prompt_ids, vocab, row.device).reshape(-1)
            output = _as_ids(output_ids, vocab, row.device).reshape(-1)
            row = apply_repetition_penalty(row, torch.cat([prompt, output]),
                                           params.repetition_penalty)
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            counts = token_counts(output_ids, vocab, row.device)
            row = apply_frequency_presence(
                row, counts, params.frequency_penalty, params.presence_penalty
            )
    return apply_logit_bias(row, params.logit_bias)


def _nucleus_candidates(logits: torch.Tensor, log_z: torch.Tensor, p: float) -> torch.Tensor | None:
    """Ids (ascending) of the exact top m tokens for the smallest m in 64, 512, 4096, ... whose
    mass reaches p, or None when only the whole row does. The nucleus lies inside them, so
    top-p need not sort all V logits (a 32k sort is ~1 ms on CPU; topk(64) ~40 us)."""
    vocab = logits.shape[-1]
    m = 64
    while m < vocab:
        mass = torch.exp(torch.logsumexp(logits.topk(m).values.double(), dim=-1) - log_z)
        if float(mass) >= p - _MASS_TOL:
            return _exactly_top(logits, m).nonzero().flatten()
        m *= 8
    return None


def _filtered_distribution(
    row: torch.Tensor, params: SamplingParams
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Temperature, top-k, top-p, min-p on one row [V], computed on the surviving tokens only.

    Returns (ids [n] or None for "all V, in id order", their tempered logits [n]). The result
    is the same distribution as the reference filters' ``min_p(top_p(top_k(apply_temperature(
    row))))`` restricted to its finite entries (tests/sampling_reference.py).
    """
    logits = apply_temperature(row, params.temperature)
    ids: torch.Tensor | None = None
    if 0 < params.top_k < logits.shape[-1]:
        ids = _exactly_top(logits, params.top_k).nonzero().flatten()  # ascending ids
        logits = logits[ids]
    if params.top_p < 1.0:
        log_z = torch.logsumexp(logits.double(), dim=-1)  # normaliser of the top-k support
        if ids is None:
            ids = _nucleus_candidates(logits, log_z, params.top_p)
            if ids is not None:
                logits = logits[ids]
        # stable sort of ascending ids: ties rank the lowest id first, as in top_p_filter
        logits, order = torch.sort(logits, descending=True, stable=True)
        probs = torch.exp(logits.double() - log_z)
        mass_before = probs.cumsum(dim=-1) - probs  # non-decreasing: kept ranks are a prefix
        n = max(1, int((mass_before < params.top_p - _MASS_TOL).sum()))
        logits, order = logits[:n], order[:n]
        ids = order if ids is None else ids[order]
    if params.min_p > 0.0:
        keep = logits >= logits.max() + (math.log(params.min_p) - _MASS_TOL)
        if ids is None:
            ids = keep.nonzero().flatten()
            logits = logits[ids]
        else:
            ids, logits = ids[keep], logits[keep]
    return ids, logits


def _categorical(logits: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw index i with probability softmax(logits)[i] by inverse CDF: one uniform from the
    generator (torch's global RNG when None) per draw, so a seed fixes the whole sequence.
    Zero-probability entries have a flat CDF step and are never chosen."""
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((), generator=generator, device=device).to(logits.device, torch.float64)
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(dim=-1)
    index = torch.searchsorted(cdf, (u * cdf[-1]).reshape(1), right=True)
    return min(int(index), logits.shape[-1] - 1)


def _sample_checked_row(
    row: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    history: TokenHistory | None,
) -> int:
    row = _apply_penalties(row, params, history)
    if params.greedy:
        return int(greedy(row))
    ids, logits = _filtered_distribution(row, params)
    index = _categorical(logits, generator)
    return index if ids is None else int(ids[index])


def sample_token(
    logits_row: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    history: TokenHistory | None = None,
) -> int:
    """Pick one token id from one row of logits ``[V]`` (order: see the module docstring).

    history: (prompt_ids, output_ids) of this sequence, needed only when params has
    penalties (None = nothing seen yet). generator: from :func:`make_generator`; None draws
    from torch's global RNG. Raises NonFiniteLogitsError for NaN/+inf logits.
    """
    row = _float_row(logits_row)
    check_finite_logits(row)
    return _sample_checked_row(row, params, generator, history)


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    histories: Sequence[TokenHistory | None] | None = None,
) -> list[int]:
    """One token id per row of ``logits [B, V]``; row i uses params[i], generators[i], ...

    When every row is greedy without penalties this is one vectorised argmax (a few
    microseconds on CPU); otherwise plain-greedy rows still share that argmax and the others
    go through :func:`sample_token`. Raises NonFiniteLogitsError listing *all* bad rows, so
    the caller can fail those sequences and call again with the rest.
    """
    if logits.dim() != 2:
        raise InputError(f"expected logits [B, V], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    for name, seq in (("params", params), ("generators", generators), ("histories", histories)):
        if seq is not None and len(seq) != batch:
            raise InputError(f"{name} has {len(seq)} entries for a batch of {batch} rows")

    plain = [p.greedy and not p.has_penalties for p in params]
    if all(plain):
        ids = greedy(logits)  # (B,)
        # argmax lands on NaN/+inf when a row has one, on -inf when all are masked
        if not bool(torch.isfinite(logits.gather(-1, ids[:, None])).all()):
            check_finite_logits(logits)
        return ids.tolist()

    logits = logits.float()
    check_finite_logits(logits)
    out = greedy(logits).tolist() if any(plain) else [0] * batch
    for i in range(batch):
        if not plain[i]:
            out[i] = _sample_checked_row(
                logits[i],
                params[i],
                generators[i] if generators is not None else None,
                histories[i] if histories is not None else None,
            )
    return out


def token_logprobs(
    logits_row: torch.Tensor, token_id: int, top_n: int = 0
) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of ``token_id`` and the ``top_n`` most likely (id, logprob) pairs.

    Computed from ``log_softmax`` of the raw float32 logits ``[V]`` (before penalties,
    temperature or filters, as OpenAI/vLLM report). The list is sorted by logprob descending,
    ties by lowest id, and has exactly ``min(top_n, V)`` entries.
    """
    row = _float_row(logits_row)
    check_finite_logits(row)
    vocab = row.shape[-1]
    if not 0 <= token_id < vocab:
        raise InputError(f"token_id must be in [0, {vocab - 1}], got {token_id}")
    if top_n < 0:
        raise InputError(f"top_n must be >= 0, got {top_n}")
    logprobs = torch.log_softmax(row, dim=-1)
    chosen = float(logprobs[token_id])
    n = min(top_n, vocab)
    if n == 0:
        return chosen, []
    ids = _exactly_top(logprobs, n).nonzero().flatten()  # ascending ids
    values, order = torch.sort(logprobs[ids], descending=True, stable=True)
    return chosen, list(zip(ids[order].tolist(), values.tolist()))
