"""Sliding-window perplexity against HF transformers, computed independently with the
"perplexity of fixed-length models" loop of transformers' own guide."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import hf_mistral, save_hf

import mistral7b
from mistral7b.errors import InputError
from mistral7b.eval.perplexity import perplexity, sliding_windows


def test_windows_follow_the_docstring_example():
    assert sliding_windows(10, 4, 2) == [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (50, 16, 5), (7, 32, 16), (33, 8, 7),
                                             (2, 2, 1)])
def test_every_token_is_scored_once_with_at_most_window_minus_one_context(n, window, stride):
    scored = []
    for begin, first, end in sliding_windows(n, window, stride):
        assert 0 <= begin < first <= end <= n
        assert end - 1 - begin <= window - 1       # the input is [begin, end - 1)
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="stride"):
        sliding_windows(100, 8, 8)
    with pytest.raises(InputError, match="window"):
        sliding_windows(100, 1, 1)
    with pytest.raises(InputError, match="at least 2 tokens"):
        sliding_windows(1, 8, 4)


def hf_guide_perplexity(model, ids: list[int], max_length: int, stride: int) -> float:
    """transformers' documented sliding-window perplexity, written out with its own model."""
    input_ids = torch.tensor([ids])
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        chunk = input_ids[:, begin:end]
        target = chunk.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(chunk, labels=target).loss      # mean over the shifted labels
        n_valid = (target[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * n_valid
        n_tokens += n_valid
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("window,stride,n", [(16, 5, 16 + 10 * 5), (12, 11, 12 + 3 * 11),
                                             (64, 32, 40)])
def test_perplexity_equals_hf_transformers(tmp_path, window, stride, n):
    # The model's own sliding window (8) is smaller than the evaluation window, so both the
    # model's band and the evaluation's windows are exercised.
    hf = hf_mistral(vocab=96, window=8, seed=5)
    llm = mistral7b.load(save_hf(hf, tmp_path), device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 96, (n,), generator=g).tolist()
    # n = window + k * stride: the guide's windows and ours coincide (the guide's last window
    # would otherwise get less context than ours).
    ours = perplexity(llm.engine.model, ids, window=window, stride=stride, batch_size=3,
                      sliding_window=llm.config.sliding_window)
    ref = hf_guide_perplexity(hf, ids, window, stride)
    assert ours.n_scored == n - 1
    assert ours.perplexity == pytest.approx(ref, rel=1e-4)
    assert math.exp(ours.nll) == pytest.approx(ours.perplexity)
    assert f"window {window}, stride {stride}" in str(ours)
