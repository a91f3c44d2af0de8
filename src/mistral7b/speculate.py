"""Speculative decoding by prompt lookup: draft tokens copied from the sequence itself.

On a CPU, decoding is bound by reading the weights: feeding 1 + k tokens to the model costs
about what feeding one does, as long as k is small. So when the text being written repeats
text already in the context (a summary quoting its source, an edit of a given file,
extraction of fields), guess the next k tokens by finding the last n tokens earlier in the
sequence and copying what followed them there (Saxena's prompt-lookup decoding, vLLM's
"ngram" speculator), and let one step check all k guesses.

Verification, per row of a decode step fed [x, d1 .. dk] (x the last sampled token):

    logits L0 .. Lk      (L_i: the next-token distribution after x, d1 .. d_i)
    for i = 0 .. k:
        t_i = sample(L_i)                  # the row's own sampler, penalties, generator
        emit t_i; stop at EOS / stop string / max_tokens
        if i == k or t_i != d_{i+1}: stop  # t_i was the correction (or the bonus token)

Greedy: t_i is the argmax, so the output is token for token what plain decoding gives (the
draft only decides how many tokens one step may emit). Sampling: the draft is one token with
probability 1, so "sample t_i from p, accept d if t_i = d" accepts d with probability p(d)
and otherwise yields t_i from p restricted to tokens other than d, renormalised: the
rejection-sampling rule of Leviathan et al. (2023) for a deterministic draft. Every emitted
token is therefore distributed exactly as in plain decoding.

A draft model (draft.py, `--draft-model`) proposes its k tokens greedily (argmax, no
penalties), so its draft too is a deterministic function of the context and this same rule
verifies it, unchanged: no q-ratio test (Leviathan et al.'s general rule, for a draft that
samples) is needed.

The KV written for rejected draft tokens is dropped (`KVPool.truncate`): the table keeps x
and the accepted drafts, and the last emitted token is fed next step, as in plain decoding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from mistral7b.queueing import ChoiceSeq

MAX_NGRAM = 4       # longest suffix looked up
MIN_NGRAM = 1
MAX_SPECULATE = 16  # the largest --speculate: a step costs more once k is in the tens


def propose(tokens: list[int], k: int, *, max_ngram: int = MAX_NGRAM,
            min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's longest
    matching suffix (max_ngram down to min_ngram tokens); [] when nothing matches.

    Worked example: tokens = [5 6 7 9 5 6], k = 3. The suffix [5 6] occurred at 0, followed
    by [7 9 5]: that is the draft. (The 3-token suffix [9 5 6] occurs nowhere earlier.)
    """
    n = len(tokens)
    if k < 1 or n < 2:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    # hit[i]: the suffix of the current size ends at position i (i < n - 1: strictly earlier)
    hit = arr[: n - 1] == arr[n - 1]
    best: list[int] = []
    for size in range(1, min(max_ngram, n - 1) + 1):
        if size > 1:
            shifted = np.zeros_like(hit)
            shifted[size - 1:] = arr[: n - size] == arr[n - size]
            hit &= shifted
        if not hit.any():
            break
        if size >= min_ngram:
            end = int(np.flatnonzero(hit)[-1])      # the latest occurrence of this suffix
            draft = tokens[end + 1: end + 1 + k]
            if draft:
                best = draft
    return best


def verify(rows: list[ChoiceSeq], drafts: list[list[int]], logits: torch.Tensor,
           sample: Callable[[list[ChoiceSeq], torch.Tensor], None],
           truncate: Callable[[ChoiceSeq, int], None]) -> list[int]:
    """The rule above, for the rows of one step fed [x, d1 .. dk] (logits (B, 1 + k, V)):
    `sample(rows, logits)` samples and emits one position's token for each of the rows,
    `truncate(row, n)` keeps the step's first n positions in the row's cache (x and the
    drafts accepted so far). Returns how many drafts each row kept."""
    kept_n = [0] * len(rows)
    active, pos = list(range(len(rows))), 0
    while active:
        for i in active:
            truncate(rows[i], 1 + pos)
        emitted = [len(rows[i].seq.output) for i in active]
        sample([rows[i] for i in active], logits[active, pos])
        kept = []
        for i, before in zip(active, emitted):
            seq, draft = rows[i].seq, drafts[i]
            if rows[i].req.done or seq.finish_reason or len(seq.output) == before:
                continue                        # ended, failed, or nothing emitted
            if pos < len(draft) and seq.output[-1] == draft[pos]:
                kept_n[i] += 1
                kept.append(i)
        active, pos = kept, pos + 1
    return kept_n


def check_speculate(n: int) -> int:
    from mistral7b.errors import InputError

    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_SPECULATE:
        raise InputError(f"speculate must be an integer from 0 (off) to {MAX_SPECULATE}, "
                         f"got {n!r}")
    return n
