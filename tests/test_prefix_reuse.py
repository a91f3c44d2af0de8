"""Prefix reuse through the Python API on the embedded default model: the next chat turn
computes only its new tokens and answers exactly as a cold start does."""

from __future__ import annotations

import pytest

import mistral7b

USER, ASSISTANT = "user", "assistant"


@pytest.fixture(scope="module")
def llm():
    return mistral7b.load("default", device="cpu", dtype="float32")


def test_the_second_chat_turn_prefills_only_the_new_turn(llm):
    tok = llm.tokenizer
    first = [{"role": USER, "content": "Name a colour."}]
    r1 = llm.chat(first, max_tokens=12)
    ids1 = tok.encode_chat(first)
    assert llm.stats.cached_tokens == 0 and llm.stats.prefill_tokens == len(ids1)
    second = first + [{"role": ASSISTANT, "content": r1.text},
                      {"role": USER, "content": "And another one?"}]
    ids2 = tok.encode_chat(second)
    r2 = llm.chat(second, max_tokens=12)
    s = llm.stats
    # Everything the first call fed is reused: its prompt and its answer (but for the last
    # token sampled when it stopped on length: that one was never fed).
    assert ids2[: len(ids1) + len(r1.token_ids)] == ids1 + r1.token_ids  # the premise
    fed = len(ids1) + len(r1.token_ids) - (r1.finish_reason == "length")
    assert s.cached_tokens == fed
    assert s.prefill_tokens == len(ids2) - s.cached_tokens
    assert r2.cached_tokens == s.cached_tokens
    # and the answer is the one a cold start gives (greedy)
    llm.clear_cache()
    cold = llm.chat(second, max_tokens=12)
    assert llm.stats.cached_tokens == 0
    assert cold.token_ids == r2.token_ids


def test_reuse_gives_the_logits_of_a_cold_prefill(llm):
    """Generate over a prompt, then score its extension: the reused part is not computed
    again, and the logits of the rest equal a cold computation (DESIGN §2.8)."""
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6, bos=True)
    assert len(ids) > 50
    cold = llm.logits(ids)                     # through a cache of its own, not registered
    out = llm.generate(ids[:40], max_tokens=1)
    assert out.cached_tokens == 0
    again = llm.generate(ids, max_tokens=1)
    assert again.cached_tokens == 40           # the first call's prompt: a full block + 8
    assert again.token_ids == [int(cold[-1].argmax())]


def test_changed_weights_are_never_served_from_the_cache(llm):
    """KV cached before the weights changed (LoRA merged, a training step) is dropped."""
    import torch

    prompt = llm.tokenizer.encode("A list of fruits: apple, banana, cherry,", bos=True)
    llm.generate(prompt, max_tokens=4)
    assert llm.generate(prompt, max_tokens=4).cached_tokens > 0
    w = llm.model.layers[0].feed_forward.w2.weight
    with torch.no_grad():
        w.mul_(1.5)
    try:
        changed = llm.generate(prompt, max_tokens=4)
        assert changed.cached_tokens == 0
        assert changed.token_ids == [int(t) for t in llm.logits(prompt)[-1:].argmax(-1)] + \
            changed.token_ids[1:]
    finally:
        with torch.no_grad():
            w.div_(1.5)
