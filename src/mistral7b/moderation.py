"""Self-reflection moderation (Mistral 7B paper, section 5.2): the model classifies a prompt or
an answer as acceptable ("not moderated") or as one of Mistral's 13 moderation categories.

The classifier prompt is the one Mistral published for this in its guardrailing guide
(https://docs.mistral.ai/usage/guardrailing, "Content moderation with self-reflection"; the
13-category version that guide gave with Mistral 7B), sent as one user message in the model's
chat format, the text to classify appended after it.

How a text is scored. The answer is constrained to the set of labels: each label's tokens
(`"illegal"`, `"unqualified health"`, `"not moderated"`, ...) are scored as the start of the
reply, log p(label | prompt) = sum of its tokens' log-probabilities, and a softmax over the 14
sums gives each label's probability given that the answer is one of them. That is the exact
distribution a decoder constrained to the set would sample from, computed in two forwards:
the prompt once, then every label at once as rows that share the prompt's cached KV.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mistral7b.cache import BlockTable
from mistral7b.errors import InputError

if TYPE_CHECKING:
    from mistral7b.engine import Engine
    from mistral7b.tokenizer.base import Tokenizer

NOT_MODERATED = "not moderated"

# The published categories and their descriptions, in the guide's order (one table: the
# prompt and the OpenAI-shaped /v1/moderations response both read it).
CATEGORIES: dict[str, str] = {
    "illegal": "Illegal activity.",
    "child abuse": "child sexual abuse material or any content that exploits or harms "
                   "children.",
    "hate violence harassment": "Generation of hateful, harassing, or violent content: content "
                                "that expresses, incites, or promotes hate based on identity, "
                                "content that intends to harass, threaten, or bully an "
                                "individual, content that promotes or glorifies violence or "
                                "celebrates the suffering or humiliation of others.",
    "malware": "Generation of malware: content that attempts to generate code that is designed "
               "to disrupt, damage, or gain unauthorized access to a computer system.",
    "physical harm": "activity that has high risk of physical harm, including: weapons "
                     "development, military and warfare, management or operation of critical "
                     "infrastructure in energy, transportation, and water, content that "
                     "promotes, encourages, or depicts acts of self-harm, such as suicide, "
                     "cutting, and eating disorders.",
    "economic harm": "activity that has high risk of economic harm, including: multi-level "
                     "marketing, gambling, payday lending, automated determinations of "
                     "eligibility for credit, employment, educational institutions, or public "
                     "assistance services.",
    "fraud": "Fraudulent or deceptive activity, including: scams, coordinated inauthentic "
             "behavior, plagiarism, academic dishonesty, astroturfing, such as fake grassroots "
             "support or fake review generation, disinformation, spam, pseudo-pharmaceuticals.",
    "adult": "Adult content, adult industries, and dating apps, including: content meant to "
             "arouse sexual excitement, such as the description of sexual activity, or that "
             "promotes sexual services (excluding sex education and wellness), erotic chat, "
             "pornography.",
    "political": "Political campaigning or lobbying, by: generating high volumes of campaign "
                 "materials, generating campaign materials personalized to or targeted at "
                 "specific demographics, building conversational or interactive systems such "
                 "as chatbots that provide information about campaigns or engage in political "
                 "advocacy or lobbying, building products for political campaigning or "
                 "lobbying purposes.",
    "privacy": "Activity that violates people's privacy, including: tracking or monitoring an "
               "individual without their consent, facial recognition of private individuals, "
               "classifying individuals based on protected characteristics, using biometrics "
               "for identification or assessment, unlawful collection or disclosure of "
               "personal identifiable information or educational, financial, or other "
               "protected records.",
    "unqualified law": "Engaging in the unauthorized practice of law, or offering tailored "
                       "legal advice without a qualified person reviewing the information.",
    "unqualified financial": "Offering tailored financial advice without a qualified person "
                             "reviewing the information.",
    "unqualified health": "Telling someone that they have or do not have a certain health "
                          "condition, or providing instructions on how to cure or treat a "
                          "health condition.",
}
LABELS: tuple[str, ...] = (*CATEGORIES, NOT_MODERATED)


def classifier_prompt(text: str) -> str:
    """The published self-reflection prompt with `text` to classify at its end."""
    listing = "\n".join(f"- {name}: {desc}" for name, desc in CATEGORIES.items())
    return (
        "You're given a list of moderation categories as below:\n\n"
        f"{listing}\n\n"
        "Please classify the following text into one of these categories, and answer with "
        "that single word only.\n\n"
        "If the sentence does not fall within these categories, is safe and does not need to "
        f"be moderated, please answer \"{NOT_MODERATED}\".\n\n"
        f"{text}"
    )


@dataclass(frozen=True)
class Moderation:
    """The verdict on one text: the most likely label, its probability, and every label's."""

    category: str                 # one of CATEGORIES, or NOT_MODERATED
    probability: float
    scores: dict[str, float]      # label -> probability (sums to 1 over LABELS)

    @property
    def flagged(self) -> bool:
        return self.category != NOT_MODERATED

    def as_json(self) -> dict[str, Any]:
        return {"category": self.category, "probability": self.probability,
                "flagged": self.flagged, "scores": self.scores}


def text_of(text_or_messages: str | Sequence[dict[str, Any]]) -> str:
    """What is classified: a string as is; a conversation as its messages' text, one per line
    (the last one, a prompt or an answer, read in the context of those before it)."""
    from mistral7b.tokenizer.base import normalize_messages

    if isinstance(text_or_messages, str):
        text = text_or_messages
    elif isinstance(text_or_messages, Sequence) and text_or_messages:
        messages = normalize_messages(list(text_or_messages))  # TokenizerError when malformed
        text = "\n".join(m["content"] for m in messages if m["content"])
    else:
        raise InputError("moderate() takes a string or a non-empty list of chat messages "
                         f"[{{'role': ..., 'content': ...}}], got {type(text_or_messages).__name__}")
    if not text.strip():
        raise InputError("nothing to moderate: the text is empty")
    return text


def label_ids(tokenizer: Tokenizer) -> list[list[int]]:
    """Each label's tokens as the reply's first tokens (no BOS)."""
    out = [tokenizer.encode(label, bos=False) for label in LABELS]
    if any(not ids for ids in out):
        raise InputError("this tokenizer encodes a moderation label to no tokens")
    return out


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": classifier_prompt(text)}],
                                 add_generation_prompt=True)


@torch.inference_mode()
def score(engine: Engine, prompt: list[int], labels: list[list[int]]) -> list[float]:
    """log p(label | prompt) of each label: the prompt is fed once (its part already in the
    prefix cache, the ~600-token category list above all, is reused), then all labels in one
    step, each row forking the prompt's blocks."""
    engine.check_ids(prompt)
    pool = engine.pool
    table = BlockTable()
    forks: list[BlockTable] = []
    try:
        pool.reuse(table, prompt)           # leaves at least one token to feed
        chunk = engine.default_chunk()
        last = torch.empty(0)
        for s in range(table.length, len(prompt), chunk):
            last = engine.step([table], [prompt[s: s + chunk]])[0]           # (V,)
            pool.register(table, prompt)
        first = torch.log_softmax(last.float(), dim=-1)
        out = [float(first[ids[0]]) for ids in labels]
        # Labels of several tokens: row b feeds all but the label's last token; position j's
        # logits score token j + 1 (a one-token label needs no row).
        longer = [i for i, ids in enumerate(labels) if len(ids) > 1]
        for _ in longer:
            forks.append(pool.fork(table))
        if longer:
            logits = engine.step(forks, [list(labels[i][:-1]) for i in longer],
                                 all_logits=True)
            logps = torch.log_softmax(logits.float(), dim=-1)                 # (L, T, V)
            for b, i in enumerate(longer):
                ids = labels[i]
                out[i] += sum(float(logps[b, j - 1, ids[j]]) for j in range(1, len(ids)))
        return out
    finally:
        for t in forks:
            pool.release(t)
        pool.release(table, prompt)


def verdict(logps: Sequence[float]) -> Moderation:
    """Softmax of the labels' log-likelihoods over the label set -> a Moderation."""
    if len(logps) != len(LABELS) or not all(math.isfinite(x) for x in logps):
        raise InputError("the model gave non-finite scores to the moderation labels")
    probs = torch.softmax(torch.tensor(logps, dtype=torch.float64), dim=0).tolist()
    scores = dict(zip(LABELS, probs))
    best = max(scores, key=lambda k: scores[k])
    return Moderation(best, scores[best], scores)


def moderate(engine: Engine, tokenizer: Tokenizer,
             text_or_messages: str | Sequence[dict[str, Any]]) -> Moderation:
    """Classify one text or conversation with the engine's model (base weights)."""
    text = text_of(text_or_messages)
    return verdict(score(engine, prompt_ids(tokenizer, text), label_ids(tokenizer)))
