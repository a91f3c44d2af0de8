"""Speculative decoding with a draft model (draft.py): greedy output identical to plain
greedy (ragged batch, a window shorter than the sequence, EOS and stop strings inside
accepted drafts, preemption), the target as its own draft accepting every draft, sampling
keeping the distribution (speculate.py's chi-square method), the draft pool empty after the
requests end or are cancelled, and `load(..., draft_model=)` checking the vocabulary."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_speculate import (
    VOCAB,
    Decoder,
    _copying_model,
    assert_matches_exact_joint,
    sample_first_three,
)
from tiny_models import hf_mistral, mistral_v3_folder, save_consolidated

import mistral7b
from mistral7b.batch import run_batch
from mistral7b.draft import DEFAULT_DRAFT_TOKENS, DraftModel
from mistral7b.engine import Engine
from mistral7b.errors import InputError
from mistral7b.request import GenerationRequest
from mistral7b.sampling import SamplingParams
from mistral7b.scheduler import Scheduler
from mistral7b.sequence import GenerationStats


@pytest.fixture(autouse=True)
def _no_draft_failure(caplog):
    """A failing draft step only costs speed (draft.py decodes without a draft then), so
    the outputs alone would not show it: the log must."""
    yield
    failed = [r for r in caplog.get_records("call")
              if r.name == "mistral7b.draft" and r.levelname == "ERROR"]
    assert not failed, failed[0].getMessage()


def _tiny(seed: int, window: int | None = 16, vocab: int = VOCAB):
    """tests/server/test_scheduler.py's tiny random decoder, with other weights (seed)."""
    sys.path.insert(0, str(Path(__file__).parent / "server"))
    from test_scheduler import tiny_model

    return tiny_model(window, seed=seed, vocab=vocab)


def _engine(model, kv: int = 2**24) -> Engine:
    net, config = model
    return Engine(net, config, kv_cache_memory=kv, kv_block_size=4)


def _draft(model) -> DraftModel:
    return DraftModel(_engine(model), vocab=VOCAB)


def _run(target, prompts, params, *, draft=None, k=0, stop_ids=frozenset(), kv=2**24):
    stats = GenerationStats()
    outs: dict[int, list] = {i: [] for i in range(len(prompts))}
    for i, out in run_batch(_engine(target, kv), prompts, [params] * len(prompts),
                            stop_ids=stop_ids, new_decoder=Decoder, stats=stats,
                            speculate=k, draft=draft):
        outs[i].append(out)
    result = [([o.token_id for o in outs[i] if o.token_id is not None],
               "".join(o.text for o in outs[i]), outs[i][-1].finish_reason)
              for i in range(len(prompts))]
    return result, stats


# Ragged prompts; prompt + output exceeds the window of 16.
PROMPTS = [[1, 5, 9, 14, 2, 33, 40], [1] + list(range(50, 70)), [1, 3, 4, 3, 4, 8, 90, 12, 7]]
TARGET = _tiny(0)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_target_as_its_own_draft_accepts_every_draft(k):
    params = SamplingParams(max_tokens=40)
    plain, _ = _run(TARGET, PROMPTS, params)
    draft = _draft(TARGET)
    spec, stats = _run(TARGET, PROMPTS, params, draft=draft, k=k)
    assert spec == plain
    assert stats.draft_tokens > 0 and stats.acceptance_rate == 1.0
    assert draft.rows == 0 and draft.held_blocks == 0      # every table went back


@pytest.mark.parametrize("window", [16, None])
def test_a_different_draft_gives_the_plain_greedy_output(window):
    """A random draft of the same vocabulary (other weights, its own window or none)."""
    params = SamplingParams(max_tokens=40)
    plain, _ = _run(TARGET, PROMPTS, params)
    draft = _draft(_tiny(7, window))
    spec, stats = _run(TARGET, PROMPTS, params, draft=draft, k=4)
    assert spec == plain
    assert stats.draft_tokens > 0 and stats.accepted_tokens < stats.draft_tokens
    assert draft.rows == 0 and draft.held_blocks == 0


def test_rows_with_ids_the_draft_cannot_embed_decode_without_drafts():
    """A draft whose embedding is smaller than the target's: a row holding a larger id (in
    its prompt, or generated later) gets no more drafts; the output stays plain greedy."""
    params = SamplingParams(max_tokens=40)
    plain, _ = _run(TARGET, PROMPTS, params)
    draft = DraftModel(_engine(_tiny(3, vocab=90)), vocab=VOCAB)    # PROMPTS[2] holds 90
    assert draft.vocab == 90
    spec, stats = _run(TARGET, PROMPTS, params, draft=draft, k=4)
    assert spec == plain and stats.draft_tokens > 0
    assert draft.rows == 0 and draft.held_blocks == 0


def test_eos_and_stop_strings_inside_accepted_drafts():
    params = SamplingParams(max_tokens=40)
    plain, _ = _run(TARGET, PROMPTS, params)
    eos = frozenset({plain[0][0][25]})          # a token written late, inside a draft
    stopped, _ = _run(TARGET, PROMPTS, params, stop_ids=eos)
    spec, stats = _run(TARGET, PROMPTS, params, draft=_draft(TARGET), k=4, stop_ids=eos)
    assert spec == stopped and stats.accepted_tokens > 0
    assert stopped[0][2] == "stop" and len(stopped[0][0]) < 40
    stop = f"<{plain[1][0][20]}><{plain[1][0][21]}>"
    with_stop = SamplingParams(max_tokens=40, stop=[stop])
    plain_s, _ = _run(TARGET, PROMPTS, with_stop)
    spec_s, _ = _run(TARGET, PROMPTS, with_stop, draft=_draft(TARGET), k=4)
    assert spec_s == plain_s and plain_s[1][2] == "stop" and stop not in plain_s[1][1]


def test_preempted_rows_release_their_draft_and_resume_exactly():
    """A target pool too small for every row at once: rows are preempted and re-filled;
    the output is still plain greedy and the draft's tables all go back."""
    target = _tiny(0, window=None)
    params = SamplingParams(max_tokens=40)
    plain, _ = _run(target, PROMPTS, params)
    draft = _draft(target)
    kv = 24 * 4 * 512                       # 24 blocks of 4 tokens at 512 bytes a token
    spec, stats = _run(target, PROMPTS, params, draft=draft, k=4, kv=kv)
    assert spec == plain and stats.accepted_tokens > 0
    assert draft.rows == 0 and draft.held_blocks == 0


def test_draft_pool_sized_from_the_target_and_a_full_one_only_stops_drafting(caplog):
    target_engine = _engine(TARGET, kv=40 * 4 * 512)
    draft = DraftModel(Engine(*TARGET, kv_block_size=4), vocab=VOCAB, target=target_engine)
    assert draft.pool.capacity_blocks >= target_engine.pool.capacity_blocks
    # room for two rows' tables (5 blocks of 4 under a window of 16, plus drafts), not three
    small = DraftModel(Engine(*TARGET, kv_cache_memory=12 * 4 * 512, kv_block_size=4),
                       vocab=VOCAB)
    params = SamplingParams(max_tokens=40)
    plain, _ = _run(TARGET, PROMPTS, params)
    caplog.set_level("INFO", logger="mistral7b.draft")
    spec, stats = _run(TARGET, PROMPTS, params, draft=small, k=4)
    assert spec == plain and stats.accepted_tokens > 0 and small.held_blocks == 0
    assert any("draft KV cache full" in r.getMessage() for r in caplog.records)


def test_cancelled_request_releases_its_draft_table():
    engine = _engine(TARGET)
    draft = _draft(TARGET)
    sched = Scheduler(engine, stop_ids=frozenset(), new_decoder=Decoder, max_model_len=128,
                      speculate=4, draft=draft)
    outs: dict[int, list] = {0: [], 1: []}
    reqs = [GenerationRequest(list(p), [SamplingParams(max_tokens=60)],
                              outs[i].append, 60) for i, p in enumerate(PROMPTS[:2])]
    for r in reqs:
        sched.submit(r)
    while draft.rows < 2:
        sched.run_once()
    sched.cancel(reqs[0])
    sched.run_once()
    assert draft.rows == 1
    while not reqs[1].done:
        sched.run_once()
    assert draft.rows == 0 and draft.held_blocks == 0
    assert engine.pool.capacity_blocks == engine.pool.available_blocks


def test_sampling_with_a_draft_model_keeps_the_distribution():
    """As test_speculate's chi-square test: 3000 seeded samples of the first three tokens
    against their exact joint distribution, the copying model drafting for itself (its
    greedy guess, the likeliest successor, is accepted about 60% of the time)."""
    model = _copying_model()
    prompt = [1, 7, 8, 9, 10, 11, 6, 7, 8, 9]
    stats = GenerationStats()
    draft = _draft(model)
    counts = sample_first_three(model, prompt, 3000, stats, speculate=2, draft=draft)
    assert stats.accepted_tokens > 100 and stats.accepted_tokens < stats.draft_tokens
    assert_matches_exact_joint(model, prompt, counts)
    assert draft.held_blocks == 0


# ------------------------------------------------------------------ load(draft_model=)


@pytest.fixture(scope="module")
def v3_folders(tmp_path_factory):
    """A v3-tokenizer target, a v3 draft with other weights and an embedding padded past
    the vocabulary, and a v1 model (another tokenizer)."""
    import shutil

    target = mistral_v3_folder(tmp_path_factory.mktemp("target"), seed=0)
    padded = tmp_path_factory.mktemp("padded")
    save_consolidated(hf_mistral(vocab=32768 + 64, dim=32, n_layers=1, n_heads=2,
                                 n_kv_heads=1, head_dim=16, hidden=64, window=None,
                                 theta=1e6, seed=3), padded)
    shutil.copy(target / "tokenizer.model.v3", padded / "tokenizer.model.v3")
    v1 = save_consolidated(hf_mistral(vocab=32000, dim=32, n_layers=1, n_heads=2,
                                      n_kv_heads=1, head_dim=16, hidden=64, window=None,
                                      theta=1e6, seed=5), tmp_path_factory.mktemp("v1"))
    return target, padded, v1


PROMPT = "Write the numbers one to twenty: one, two, three, four,"


def test_load_with_a_draft_model_gives_the_plain_answer(v3_folders):
    target, padded, _ = v3_folders
    plain = mistral7b.load(target).generate(PROMPT, max_tokens=24)
    for draft_path in (target, padded):
        llm = mistral7b.load(target, draft_model=draft_path)
        assert llm.draft is not None and llm.speculate == DEFAULT_DRAFT_TOKENS
        assert llm.draft.vocab == 32768                 # padded ids are never proposed
        got = llm.generate(PROMPT, max_tokens=24)
        assert got.token_ids == plain.token_ids and got.text == plain.text
        assert llm.stats.draft_tokens > 0
        if draft_path == target:
            assert llm.stats.acceptance_rate == 1.0
        assert llm.draft.held_blocks == 0 and llm.draft.pool.cached_bytes > 0
        llm.clear_cache()                   # the draft's cached prefixes too
        assert llm.draft.pool.cached_bytes == 0
    assert mistral7b.load(target, draft_model=padded, speculate=2).speculate == 2


def test_draft_with_another_vocabulary_is_refused(v3_folders):
    target, _, v1 = v3_folders
    with pytest.raises(InputError, match=r"does not share the vocabulary.*vocabulary sizes "
                                         r"differ \(32768 vs 32000\)"):
        mistral7b.load(target, draft_model=v1)
    with pytest.raises(InputError, match="draft_model="):
        mistral7b.load(target, draft_model=target, tp=2)
