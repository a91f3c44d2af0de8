"""Training data: JSONL files checked line by line, tokenized with a loss mask.

One JSON object per line, either

    {"text": "plain text ..."}                         every token is a target
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

For chat data only the assistant's tokens are targets, its end-of-turn marker included (so
the model learns to stop): the conversation is encoded with the model's own chat format and
each assistant turn's tokens are found as the difference between the prompt that precedes it
(`encode_chat(messages[:k], add_generation_prompt=True)`) and the conversation through it
(`encode_chat(messages[:k+1], add_generation_prompt=False)`). When a format is not
prefix-stable (Mistral's v1-v3 put the system prompt into the *last* user turn), each
assistant turn becomes its own example, its context encoded as the format encodes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral7b.errors import InputError, Mistral7BError

if TYPE_CHECKING:
    from mistral7b.tokenizer.base import Tokenizer

ROLES = ("system", "user", "assistant")


class DataError(InputError):
    """A training file line that cannot be used; the message names the file and line."""

    def __init__(self, path: str | Path, line: int, problem: str) -> None:
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{path}:{line}: {problem}")


@dataclass
class Record:
    """One validated line: `text` for plain data or `messages` for chat."""

    line: int
    text: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass
class Example:
    """A tokenized training sequence. `targets[t]` says whether token t is predicted (its
    loss counts): the model at position t-1 is trained to output ids[t]."""

    ids: list[int]
    targets: list[bool]
    line: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return sum(self.targets)


def read_records(path: str | Path) -> list[Record]:
    """Parse and validate every line of a JSONL file; the first bad line raises DataError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a .jsonl file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw[: exc.start].count(b"\n") + 1
        raise DataError(path, line_no, "not UTF-8 text") from None
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, n, f"not valid JSON ({exc.msg} at column {exc.colno})") \
                from None
        except (ValueError, RecursionError) as exc:  # 4300+ digit integers, deep nesting
            raise DataError(path, n, f"not usable JSON ({type(exc).__name__}: "
                                     f"{str(exc)[:100]})") from None
        records.append(validate_record(obj, path, n))
    if not records:
        raise InputError(f"{path}: no examples (the file is empty)")
    return records


def validate_record(obj: Any, path: str | Path, line: int) -> Record:
    if not isinstance(obj, dict):
        raise DataError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    has_text, has_messages = "text" in obj, "messages" in obj
    if has_text == has_messages:
        raise DataError(path, line, 'needs exactly one of "text" (plain) or "messages" (chat)')
    if has_text:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise DataError(path, line, '"text" must be a non-empty string')
        return Record(line, text=obj["text"])
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(path, line, '"messages" must be a non-empty list')
    out = []
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise DataError(path, line, f"{where} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(path, line, f"{where} has role {role!r}; use one of "
                                        f"{', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(path, line, f'{where} ({role}) needs a string "content"')
        if role == "system" and i != 0:
            raise DataError(path, line, f"{where}: a system message may only come first")
        if role == "assistant" and not content.strip():
            raise DataError(path, line, f"{where}: the assistant's content is empty")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(path, line, "no assistant message: nothing to learn from")
    if out[-1]["role"] != "assistant":
        raise DataError(path, line, "the last message must be the assistant's (a trailing "
                                    f"{out[-1]['role']} turn would not be trained on)")
    return Record(line, messages=out)


def tokenize(records: Sequence[Record], tokenizer: Tokenizer, *, max_len: int,
             path: str | Path = "") -> tuple[list[Example], int]:
    """Examples of `records`, cut to max_len tokens. Returns (examples, number truncated).

    An example whose targets all fall beyond max_len raises DataError (it would teach
    nothing); a longer one keeps its first max_len tokens.
    """
    examples, truncated = [], 0
    for rec in records:
        if rec.messages is not None:
            items = _chat_examples(rec.messages, rec.line, tokenizer, path)
        else:
            assert rec.text is not None  # validate_record gives every record one of the two
            ids = tokenizer.encode(rec.text, bos=True) + [tokenizer.eos_id]
            items = [Example(ids, [False] + [True] * (len(ids) - 1), rec.line)]
        for ex in items:
            if len(ex) > max_len:
                truncated += 1
                ex = Example(ex.ids[:max_len], ex.targets[:max_len], ex.line)
            if not ex.n_targets:
                raise DataError(path, rec.line, f"no trainable token within the first "
                                                f"{max_len} tokens: raise --seq-len")
            examples.append(ex)
    return examples, truncated


def _chat_examples(msgs: list[dict[str, str]], line: int, tokenizer: Tokenizer,
                   path: str | Path) -> list[Example]:
    try:
        full = tokenizer.encode_chat(msgs, add_generation_prompt=False)
        turns = []
        for k, m in enumerate(msgs):
            if m["role"] == "assistant":
                prompt = tokenizer.encode_chat(msgs[:k], add_generation_prompt=True)
                through = tokenizer.encode_chat(msgs[: k + 1], add_generation_prompt=False)
                turns.append((prompt, through))
    except Mistral7BError as exc:  # TokenizerError for a conversation the format refuses
        raise DataError(path, line, f"the chat format rejects it: {exc}") from None
    for prompt, through in turns:
        if through[: len(prompt)] != prompt or len(through) <= len(prompt):
            raise DataError(path, line, "the chat format does not end a reply's prompt "
                                        "where the reply starts; cannot mask its loss")
    stable = all(full[: len(t)] == t for _, t in turns)
    if stable:
        targets = [False] * len(full)
        for prompt, through in turns:
            targets[len(prompt): len(through)] = [True] * (len(through) - len(prompt))
        return [Example(full, targets, line)]
    return [Example(t, [False] * len(p) + [True] * (len(t) - len(p)), line)
            for p, t in turns]


def fingerprint(examples: Sequence[Example]) -> str:
    """A hash of the tokenized data, stored in checkpoints so --resume refuses other data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.ids, ex.targets]).encode())
    return h.hexdigest()[:16]
