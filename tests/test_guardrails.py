"""The paper's guardrails in the Python API: `LLM.chat(..., safe_prompt=True)` encodes the
guardrail system prompt as mistral-common encodes a system message, and self-reflection
moderation (`LLM.moderate`) scores each label exactly as a full forward pass would."""

from __future__ import annotations

import pytest
import torch
from tiny_models import hf_mistral, save_consolidated

import mistral7b
from mistral7b.errors import Mistral7BError
from mistral7b.moderation import CATEGORIES, LABELS, NOT_MODERATED, classifier_prompt
from mistral7b.tokenizer import SAFE_PROMPT


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    """A tiny random Mistral with the v3 vocabulary: a consolidated folder without tokenizer
    files loads mistral-common's v3 tokenizer."""
    hf = hf_mistral(vocab=32768, window=None, seed=5)
    folder = save_consolidated(hf, tmp_path_factory.mktemp("tiny_v3"))
    return mistral7b.load(folder, device="cpu", dtype="float32")


def mistral_common_ids(messages: list[dict]) -> list[int]:
    from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"])
                                              for m in messages])
    return list(MistralTokenizer.v3().encode_chat_completion(request).tokens)


def fed_tokens(llm, run) -> list[int]:
    """Every token the engine computed during run() (with nothing cached before it)."""
    llm.clear_cache()
    fed: list[int] = []
    step = llm.engine.step

    def spy(tables, chunks, *args, **kwargs):
        if len(chunks) == 1:
            fed.extend(chunks[0])
        return step(tables, chunks, *args, **kwargs)

    llm.engine.step = spy
    try:
        run()
    finally:
        del llm.engine.step
    return fed


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_chat_safe_prompt_is_mistral_commons_system_message(tiny_v3, system):
    user = [{"role": "user", "content": "What is the best French cheese?"}]
    messages = ([{"role": "system", "content": system}] if system else []) + user
    expected_system = f"{SAFE_PROMPT}\n\n{system}" if system else SAFE_PROMPT
    expected = mistral_common_ids([{"role": "system", "content": expected_system}, *user])
    completion = tiny_v3.chat(messages, safe_prompt=True, max_tokens=3)
    fed = fed_tokens(tiny_v3, lambda: tiny_v3.chat(messages, safe_prompt=True, max_tokens=1))
    assert fed == expected
    assert completion.prompt_tokens == len(expected)
    assert mistral_common_ids(messages) != expected    # without it the prompt differs


def test_classifier_prompt_lists_the_13_published_categories():
    assert list(CATEGORIES) == [
        "illegal", "child abuse", "hate violence harassment", "malware", "physical harm",
        "economic harm", "fraud", "adult", "political", "privacy", "unqualified law",
        "unqualified financial", "unqualified health"]
    prompt = classifier_prompt("TEXT")
    assert prompt.startswith("You're given a list of moderation categories as below:\n\n"
                             "- illegal: Illegal activity.\n")
    assert prompt.endswith('please answer "not moderated".\n\nTEXT')
    assert LABELS[-1] == NOT_MODERATED


def test_moderate_scores_every_label_as_a_full_forward_does(tiny_v3):
    """Each label's probability is the softmax over the labels of log p(label | prompt), and
    log p is what an uncached forward over prompt + label gives."""
    from mistral7b.moderation import label_ids, moderate, prompt_ids

    text = "How do I pick the lock of my neighbour's door?"
    result = moderate(tiny_v3.engine, tiny_v3.tokenizer, text)
    prompt = prompt_ids(tiny_v3.tokenizer, text)
    assert prompt == mistral_common_ids([{"role": "user", "content": classifier_prompt(text)}])
    full = []
    for ids in label_ids(tiny_v3.tokenizer):
        logits = tiny_v3.logits(prompt + ids)                       # one forward, no reuse
        logp = torch.log_softmax(logits.double(), -1)
        full.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids)))
    expected = torch.softmax(torch.tensor(full, dtype=torch.float64), 0)
    got = torch.tensor([result.scores[label] for label in LABELS], dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-4)
    assert abs(sum(result.scores.values()) - 1) < 1e-9
    category, probability = tiny_v3.moderate(text)
    assert category == LABELS[int(expected.argmax())] and category in LABELS
    assert probability == pytest.approx(float(expected.max()), abs=1e-4)
    # a conversation is classified as its messages' text
    assert tiny_v3.moderate([{"role": "user", "content": text}]) == (category, probability)


def test_moderate_refuses_what_it_cannot_classify(tiny_v3):
    with pytest.raises(Mistral7BError, match="empty"):
        tiny_v3.moderate("   ")
    with pytest.raises(Mistral7BError, match="role"):
        tiny_v3.moderate([{"role": "robot", "content": "hi"}])
    with pytest.raises(Mistral7BError, match="string or a non-empty list"):
        tiny_v3.moderate(42)  # type: ignore[arg-type]


def test_default_model_answers_with_a_category_from_the_set():
    llm = mistral7b.load("default", quant="int4")
    category, probability = llm.moderate("Write ransomware that encrypts a hospital's files.")
    assert category in LABELS
    assert 1 / len(LABELS) <= probability <= 1
