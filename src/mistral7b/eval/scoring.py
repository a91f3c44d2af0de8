"""Log-likelihood of continuations: the one scoring routine under perplexity, multiple choice
and the lm-evaluation-harness model.

A request is (context ids, continuation ids). The model reads context + continuation[:-1]
(cut from the left to `max_len` tokens when longer) in one cache-free forward, and the
log-probabilities of the continuation tokens are summed. Worked example, context [a b],
continuation [c d]: the input is [a b c]; logits at b predict c, logits at c predict d.

Requests are sorted by length and run in padded batches of `batch_size` rows; only the
positions that predict a continuation token get logits (the vocabulary projection is costly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mistral7b import progress
from mistral7b.attention_plan import uncached_plan
from mistral7b.errors import InputError

if TYPE_CHECKING:
    from mistral7b.tokenizer.base import Tokenizer


@dataclass
class Score:
    logprob: float      # sum of log p(continuation token | everything before it)
    is_greedy: bool     # every continuation token is the argmax at its position
    n_tokens: int       # continuation tokens scored


def score_continuations(model: torch.nn.Module, requests: Sequence[tuple[list[int], list[int]]],
                        *, max_len: int, batch_size: int = 8,
                        window: int | None = None) -> list[Score]:
    """Score each (context, continuation); results in the order of `requests`.

    `window` is the model's sliding window (None = full causal); `max_len` caps the tokens of
    one forward. A continuation longer than max_len is an error: it cannot be scored in one
    window (use perplexity's sliding windows for long text).
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    inputs, n_cont = [], []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise InputError(f"request {i}: the continuation is empty")
        if not ctx:
            raise InputError(f"request {i}: the context is empty (start it with BOS)")
        if len(cont) > max_len:
            raise InputError(f"request {i}: a {len(cont)}-token continuation does not fit in "
                             f"{max_len} tokens")
        seq = (list(ctx) + list(cont))[:-1][-max_len:]
        inputs.append(seq)
        n_cont.append(len(cont))
    targets = [list(cont) for _, cont in requests]
    device = next(model.parameters()).device
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    out: list[Score | None] = [None] * len(inputs)
    starts = range(0, len(order), batch_size)
    with torch.inference_mode():
        for s in progress.bar(starts, desc="scoring", unit="batch"):
            rows = order[s: s + batch_size]
            lengths = [len(inputs[i]) for i in rows]
            T, n = max(lengths), max(n_cont[i] for i in rows)
            tokens = torch.zeros(len(rows), T, dtype=torch.long)
            index = torch.zeros(len(rows), n, dtype=torch.long)
            labels = torch.zeros(len(rows), n, dtype=torch.long)
            for b, i in enumerate(rows):
                L, k = lengths[b], n_cont[i]
                tokens[b, :L] = torch.tensor(inputs[i])
                index[b, :k] = torch.arange(L - k, L)       # the last k positions of the row
                labels[b, :k] = torch.tensor(targets[i])
            plan, positions = uncached_plan(lengths, window, device)
            logits = model(tokens.to(device), positions, None, plan,
                           logits_index=index.to(device))                  # (B, n, V)
            logp = torch.log_softmax(logits.float(), dim=-1)
            labels = labels.to(device)
            picked = logp.gather(-1, labels[..., None])[..., 0]             # (B, n)
            greedy = logp.argmax(-1) == labels
            for b, i in enumerate(rows):
                k = n_cont[i]
                out[i] = Score(picked[b, :k].sum().item(), bool(greedy[b, :k].all()), k)
    return out  # type: ignore[return-value]


def encode_pair(tokenizer: Tokenizer, context: str,
                continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split where the text splits.

    Trailing whitespace of the context moves to the continuation (" Paris" is one token in
    most vocabularies; "Paris" after a space-ending context is not). The whole text is
    encoded once and split after the context's tokens, so the continuation's ids are those
    the model sees in running text; if the tokenizer merges across the boundary, the
    continuation is encoded alone. An empty context becomes the BOS (or EOS) token.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = tokenizer.encode(stripped, bos=True) if stripped else []
    whole = tokenizer.encode(stripped + continuation, bos=True)
    if ctx and whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        cont = whole[len(ctx):]
    elif not ctx and tokenizer.bos_id is not None and whole[:1] == [tokenizer.bos_id]:
        cont = whole[1:]
    else:
        cont = tokenizer.encode(continuation, bos=False)
    if not ctx:
        ctx = [prefix_token(tokenizer)]
    return ctx, cont


def prefix_token(tokenizer: Tokenizer) -> int:
    """What an empty context starts from: BOS when the model uses one, else EOS (as
    lm-evaluation-harness does)."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
