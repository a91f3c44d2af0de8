"""Perplexity over long text with a sliding window: each token scored once, with up to
window - 1 tokens of context.

    window N = tokens per forward (a token plus up to N-1 of context)
    stride S = new tokens scored per window after the first (1 <= S <= N-1)

The first window reads tokens 0..N-1 and scores 1..N-1 (token 0, usually BOS, has nothing to
be predicted from); each next window scores the S tokens after the last scored one, reading
the N-1 tokens before the last of them. Worked example, 10 tokens, N = 4, S = 2:

    window 1: reads 0 1 2      scores 1 2 3
    window 2: reads 2 3 4      scores 4 5       (context of 4: 2 3; of 5: 2 3 4)
    window 3: reads 4 5 6      scores 6 7
    window 4: reads 6 7 8      scores 8 9

This is the "perplexity of fixed-length models" evaluation of HF transformers' guide, except
that the last window also gets full context. Smaller S means more context per token and more
compute (n / S forwards). Perplexity = exp(mean negative log-likelihood).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mistral7b.errors import InputError
from mistral7b.eval.scoring import score_continuations


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float              # mean negative log-likelihood per scored token (nats)
    n_scored: int
    n_windows: int
    window: int
    stride: int

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.4f} (window {self.window}, stride {self.stride}, "
                f"{self.n_scored} tokens scored in {self.n_windows} windows, "
                f"mean NLL {self.nll:.4f} nats)")


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first_scored, end) of each window: it reads [begin, end - 1) as input and
    scores tokens [first_scored, end)."""
    check_settings(window, stride)
    if n_tokens < 2:
        raise InputError(f"perplexity needs at least 2 tokens, got {n_tokens}")
    end = min(window, n_tokens)
    out = [(0, 1, end)]
    while end < n_tokens:
        first, end = end, min(end + stride, n_tokens)
        out.append((end - window, first, end))
    return out


def check_settings(window: int, stride: int) -> None:
    if window < 2:
        raise InputError(f"--window must be >= 2 tokens, got {window}")
    if not 1 <= stride < window:
        raise InputError(f"--stride must be between 1 and window - 1 = {window - 1} (each "
                         f"token is scored once, with context), got {stride}")


def perplexity(model: torch.nn.Module, ids: Sequence[int], *, window: int, stride: int,
               batch_size: int = 4, sliding_window: int | None = None) -> PerplexityResult:
    """Sliding-window perplexity of `ids` under `model` (a loaded Transformer).

    `sliding_window` is the model's own attention window (config.sliding_window).
    """
    ids = list(ids)
    spans = sliding_windows(len(ids), window, stride)
    requests = [(ids[b:f], ids[f:e]) for b, f, e in spans]
    scores = score_continuations(model, requests, max_len=window - 1, batch_size=batch_size,
                                 window=sliding_window)
    n = sum(s.n_tokens for s in scores)
    nll = -sum(s.logprob for s in scores) / n
    return PerplexityResult(math.exp(nll), nll, n, len(spans), window, stride)
