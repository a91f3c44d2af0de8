"""Multiple-choice evaluation by log-likelihood (MMLU / HellaSwag / ARC style), k-shot.

Task file: JSONL, one question a line:

    {"question": "Which gas do plants take in?", "choices": ["Oxygen", "Carbon dioxide"],
     "answer": 1, "subject": "biology"}

`answer` is the index of the right choice (or its letter, "B"); `subject` is optional. A
line may give `"prompt"` instead of `"question"`: the text used verbatim as the context
(HellaSwag's activity + context), each choice then scored as " " + choice.

Two prompt styles:

- cloze (ARC, HellaSwag, PIQA): context "Question: {question}\\nAnswer:", each choice scored as
  the continuation " {choice}".
- letters (MMLU): the choices are listed as "A. ..." lines after the question, then
  "Answer:"; the continuations are " A", " B", ... MMLU's header "The following are multiple
  choice questions (with answers) about {subject}." starts the prompt when a subject is given.

k-shot: k solved examples (prompt + right answer) precede the question, separated by blank
lines: the first k of `fewshot` (same subject first, for MMLU), or of the task file itself
without the question being asked.

acc picks the choice with the highest log-likelihood; acc_norm divides each by the choice's
length in characters first (lm-evaluation-harness's acc_norm), which HellaSwag and ARC need
so longer endings are not penalised for their length (with letters it equals acc).
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mistral7b.errors import InputError
from mistral7b.eval.scoring import encode_pair, score_continuations

if TYPE_CHECKING:
    from mistral7b.tokenizer.base import Tokenizer

STYLES = ("cloze", "letters")
LETTERS = string.ascii_uppercase


@dataclass
class MCItem:
    question: str
    choices: list[str]
    answer: int
    subject: str | None = None
    verbatim: bool = False       # `question` is a ready prompt (a "prompt" field)
    line: int = 0


@dataclass
class MCResult:
    accuracy: float
    accuracy_norm: float
    n: int
    shots: int
    style: str
    predictions: list[int] = field(default_factory=list)        # argmax of log-likelihood
    predictions_norm: list[int] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)   # per item, per choice

    def __str__(self) -> str:
        return (f"acc {self.accuracy:.4f}  acc_norm {self.accuracy_norm:.4f}  "
                f"({self.n} questions, {self.shots}-shot, {self.style} prompts)")


def read_items(path: str | Path) -> list[MCItem]:
    """Read and check a task file; errors name the line."""
    path = Path(path)
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        items.append(parse_item(obj, f"{path}:{n}", n))
    if not items:
        raise InputError(f"{path}: no questions in the file")
    return items


def parse_item(obj: Any, where: str, line: int = 0) -> MCItem:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object")
    verbatim = "prompt" in obj
    question = obj.get("prompt", obj.get("question"))
    if not isinstance(question, str):
        raise InputError(f'{where}: needs a "question" (or "prompt") string')
    choices = obj.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or \
            not all(isinstance(c, str) and c.strip() for c in choices):
        raise InputError(f'{where}: "choices" must be a list of at least 2 non-empty strings')
    if len(choices) > len(LETTERS):
        raise InputError(f"{where}: at most {len(LETTERS)} choices")
    answer = obj.get("answer")
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS:
        answer = LETTERS.index(answer.upper())
    if isinstance(answer, bool) or not isinstance(answer, int) or \
            not 0 <= answer < len(choices):
        raise InputError(f'{where}: "answer" must be a choice index 0..{len(choices) - 1} '
                         f"or its letter, got {obj.get('answer')!r}")
    subject = obj.get("subject")
    return MCItem(question, list(choices), answer, subject if isinstance(subject, str) else None,
                  verbatim, line)


def prompt_and_continuations(item: MCItem, style: str) -> tuple[str, list[str]]:
    """The question's prompt text and the continuation text of each choice."""
    if style == "letters":
        lines = [item.question.strip()]
        lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
        return "\n".join(lines) + "\nAnswer:", [f" {LETTERS[i]}" for i in
                                                range(len(item.choices))]
    if style != "cloze":
        raise InputError(f"unknown prompt style {style!r}: use one of {', '.join(STYLES)}")
    prompt = item.question if item.verbatim else f"Question: {item.question}\nAnswer:"
    return prompt, [c if c[:1].isspace() else " " + c for c in item.choices]


def build_prompt(item: MCItem, shots: Sequence[MCItem], style: str) -> str:
    """k solved examples, then the question (without its answer)."""
    parts = []
    for shot in shots:
        p, conts = prompt_and_continuations(shot, style)
        parts.append(p + conts[shot.answer])
    parts.append(prompt_and_continuations(item, style)[0])
    text = "\n\n".join(parts)
    if style == "letters" and item.subject:
        subject = item.subject.replace("_", " ")
        text = (f"The following are multiple choice questions (with answers) about "
                f"{subject}.\n\n" + text)
    return text


def pick_shots(item: MCItem, k: int, pool: Sequence[MCItem]) -> list[MCItem]:
    """The first k of `pool` other than `item`, those of the item's subject first."""
    if k <= 0:
        return []
    others = [p for p in pool if p is not item]
    same = [p for p in others if item.subject and p.subject == item.subject]
    rest = [p for p in others if p not in same]
    chosen = (same + rest)[:k]
    if len(chosen) < k:
        raise InputError(f"{k}-shot needs {k} other questions, only {len(chosen)} available")
    return chosen


def evaluate(model: torch.nn.Module, tokenizer: Tokenizer, items: Sequence[MCItem], *,
             shots: int = 0, fewshot: Sequence[MCItem] | None = None, style: str = "cloze",
             max_len: int = 2048, batch_size: int = 8, window: int | None = None) -> MCResult:
    """Score every choice of every item; see the module docstring."""
    if style not in STYLES:
        raise InputError(f"unknown prompt style {style!r}: use one of {', '.join(STYLES)}")
    pool = list(fewshot) if fewshot is not None else list(items)
    requests: list[tuple[list[int], list[int]]] = []
    spans = []
    for item in items:
        context = build_prompt(item, pick_shots(item, shots, pool), style)
        _, conts = prompt_and_continuations(item, style)
        start = len(requests)
        requests += [encode_pair(tokenizer, context, c) for c in conts]
        spans.append((start, len(requests)))
    scores = score_continuations(model, requests, max_len=max_len, batch_size=batch_size,
                                 window=window)
    preds, preds_norm, logprobs = [], [], []
    for item, (a, b) in zip(items, spans):
        lps = [s.logprob for s in scores[a:b]]
        logprobs.append(lps)
        preds.append(max(range(len(lps)), key=lambda i: lps[i]))
        _, conts = prompt_and_continuations(item, style)
        norm = [lp / max(1, len(c.strip())) for lp, c in zip(lps, conts)]
        preds_norm.append(max(range(len(norm)), key=lambda i: norm[i]))
    n = len(items)
    acc = sum(p == it.answer for p, it in zip(preds, items)) / n
    acc_norm = sum(p == it.answer for p, it in zip(preds_norm, items)) / n
    return MCResult(acc, acc_norm, n, shots, style, preds, preds_norm, logprobs)
