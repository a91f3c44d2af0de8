"""Several LoRA adapters at once: stacked for every token (`load(lora=[...])`), and served side
by side with a per-row adapter in one batch (`add_adapter`, the scheduler), each against a
separate `load(lora=...)` of the same adapter."""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_close

import mistral7b
from mistral7b.errors import InputError
from mistral7b.lora import adapter_from_model, apply_lora, lora_parameters, save_mistral, save_peft
from mistral7b.request import GenerationRequest
from mistral7b.sampling import SamplingParams
from mistral7b.scheduler import Scheduler

PROMPTS = ["hello there", "a b c d e f", "the cat sat on"]


def _load(folder, **kw):
    return mistral7b.load(folder, device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def adapters(tiny_chat_folder, tmp_path_factory):
    """Two random adapters of different ranks and targets: one PEFT, one Mistral format."""
    _, folder = tiny_chat_folder
    out = []
    for seed, (rank, targets, save) in enumerate([(4, ("wq", "wv", "w2"), save_peft),
                                                  (2, ("wk", "wo", "w1", "w3"), save_mistral)]):
        llm = _load(folder)
        apply_lora(llm.model, rank=rank, alpha=2 * rank, targets=targets)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lora_parameters(llm.model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        path = tmp_path_factory.mktemp(f"adapter{seed}")
        save(adapter_from_model(llm.model), path, llm.config)
        out.append(path)
    return folder, out


def _greedy(llm, prompt, **kw):
    return llm.generate(prompt, max_tokens=12, ignore_eos=True, **kw).token_ids


def test_adapters_stacked_equal_their_sum(adapters):
    """lora=[a, (b, 0.5)] gives the logits of base + dA + 0.5 dB (merged and not)."""
    folder, (a, b) = adapters
    ids = [1, 5, 9, 14, 20, 3, 7]
    base = _load(folder).logits(ids)
    da = _load(folder, lora=a).logits(ids) - base
    db = _load(folder, lora=b).logits(ids) - base
    for merge in (True, False):
        both = _load(folder, lora=[a, (b, 0.5)], lora_merge=merge).logits(ids)
        # LoRA is linear in each layer's weights but the network is not: compare with the
        # adapters merged one after the other instead of summing logit differences.
        seq = _load(folder, lora=a)
        from mistral7b.lora.multi import apply_lora_files

        apply_lora_files(seq.model, [(b, 0.5)], merge=True)
        assert_close(both, seq.logits(ids), what=f"stacked (merge={merge}) vs sequential")
    assert float(da.abs().max()) > 1e-3 and float(db.abs().max()) > 1e-3


def test_served_adapter_equals_a_separate_load(adapters):
    folder, (a, b) = adapters
    llm = _load(folder)
    llm.add_adapter("a", a)
    llm.add_adapter("b", b, scale=0.5)
    for prompt in PROMPTS:
        assert _greedy(llm, prompt, adapter="a") == _greedy(_load(folder, lora=a), prompt)
        assert _greedy(llm, prompt, adapter="b") == _greedy(_load(folder, lora=[(b, 0.5)]),
                                                            prompt)
        assert _greedy(llm, prompt) == _greedy(_load(folder), prompt)
    with pytest.raises(InputError, match="no adapter named 'c'"):
        llm.generate("x", adapter="c")
    with pytest.raises(InputError, match="already taken"):
        llm.add_adapter("a", a)


def test_rows_of_different_adapters_share_one_step(adapters):
    """Requests for adapter a, adapter b and the base, submitted together, are decoded in the
    same forward steps (per-row adapter) and each gives what a separate load gives."""
    folder, (a, b) = adapters
    llm = _load(folder)
    llm.add_adapter("a", a)
    llm.add_adapter("b", b)
    tok = llm.tokenizer
    sched = Scheduler(llm.engine, stop_ids=tok.stop_ids, new_decoder=tok.decoder,
                      max_concurrency=16, max_model_len=256)
    steps: list[list[int] | None] = []
    step = llm.engine.step

    def spy(tables, chunks, all_logits=False, adapters=None):
        steps.append(adapters)
        return step(tables, chunks, all_logits, adapters)

    llm.engine.step = spy
    jobs = []   # (expected ids, collected ids)
    for prompt in PROMPTS:
        for name, lora in (("a", a), ("b", b), (None, None)):
            got: list[int] = []
            expected = _greedy(_load(folder, lora=lora) if lora else _load(folder), prompt)
            ids = tok.encode(prompt, bos=True)
            sched.submit(GenerationRequest(
                ids, [SamplingParams(max_tokens=12, ignore_eos=True)],
                lambda out, got=got: got.append(out.token_id) if out.token_id is not None
                else None, 12, adapter=llm.adapters[name] if name else 0))
            jobs.append((expected, got))
    while not sched.idle():
        sched.run_once()
    for expected, got in jobs:
        assert got == expected
    decode_steps = [s for s in steps if s is not None and len(s) == len(jobs)]
    assert decode_steps and all(sorted(set(s)) == [0, 1, 2] for s in decode_steps)


def test_prefix_cache_is_kept_apart_per_adapter(adapters):
    """The same prompt with adapter a after the base: nothing of the base's KV is reused."""
    folder, (a, _) = adapters
    llm = _load(folder)
    llm.add_adapter("a", a)
    prompt = "the same prompt, long enough to fill several KV blocks of 32 tokens each...."
    llm.generate(prompt, max_tokens=2)
    out = llm.generate(prompt, max_tokens=2, adapter="a")
    assert out.cached_tokens == 0
    assert llm.generate(prompt, max_tokens=2, adapter="a").cached_tokens > 0
