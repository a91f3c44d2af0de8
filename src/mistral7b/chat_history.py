"""The next chat turn continued on the model's own tokens, so the prefix cache keeps matching.

A client's next turn sends the previous answer back as text. Encoding that text again need not
give the ids the model generated: a string has many spellings in a vocabulary and a sampled
token is not always the canonical one (a tiny random model almost never picks it; a real one
does now and then, e.g. around digits, spaces and code). Where the ids differ, the prefix cache
stops matching and the answer and everything after it are computed again each turn.

`TurnMemory` keeps the last answered conversation: its prompt ids, the answer's ids and text.
When a new conversation is that one plus the same answer and new messages, its prompt becomes

    previous prompt ids + the answer's generated ids + the template's ids after the answer

which is exactly what the cache holds followed by what is new. Turn after turn the prompt
stays the model's own tokens: each turn is matched against the plain encoding of the last
one and continues the ids the model was given for it. The template's part after the
answer ("tail") is found by encoding the conversation with an empty answer (or, for a format
that refuses an empty one, as the common end of two one-letter answers), and is used only when
both encodings show it: the new conversation's ids must start with the previous prompt and end
with the tail. Anything else (an edited history, a system prompt that the format moves into the
last user message, as Mistral v3 does, a tool call, an answer cut by a stop string) falls back
to the plain encoding, which is always correct, only slower.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

from mistral7b.errors import Mistral7BError
from mistral7b.sequence import Completion
from mistral7b.tokenizer.base import Tokenizer

Encode = Callable[[list[dict[str, Any]]], list[int]]
# Answers whose encodings give the template's tail when the format refuses an empty one.
_PROBES = ("A", "Z")


@dataclasses.dataclass(frozen=True)
class _Turn:
    messages: list[dict[str, Any]]
    plain: list[int]           # the conversation's ids as its chat format encodes them
    prompt: list[int]          # the ids the model was given for it (what the cache holds)
    answer: list[int]          # generated ids, without the stop token that ended them
    text: str


class TurnMemory:
    """The last answered chat turn of one LLM (see the module docstring)."""

    def __init__(self) -> None:
        self._last: _Turn | None = None

    def forget(self) -> None:
        self._last = None

    def remember(self, tok: Tokenizer, messages: list[dict[str, Any]], plain: list[int],
                 prompt: list[int], completion: Completion | None) -> None:
        """Keep `completion`, the answer to `messages` (encoded as `plain`, given to the
        model as `prompt`), if its ids are exactly its text; otherwise forget the last turn."""
        self._last = None
        if completion is None or completion.tool_calls:
            return
        ids = list(completion.token_ids)
        if completion.finish_reason == "stop" and ids and ids[-1] in tok.stop_ids:
            ids.pop()
        if completion.finish_reason not in ("stop", "length") or tok.decode(ids) != \
                completion.text:
            return                   # e.g. cut by a stop string: its ids hold more than text
        self._last = _Turn(copy.deepcopy(messages), list(plain), list(prompt), ids,
                           completion.text)

    def continue_ids(self, messages: list[dict[str, Any]], ids: list[int],
                     encode: Encode) -> list[int]:
        """The prompt ids for `messages` (plainly encoded: `ids`) on the previous answer's own
        tokens, or `ids` unchanged when the conversation does not continue that turn."""
        last = self._last
        if last is None:
            return ids
        n = len(last.messages)
        if len(messages) <= n + 1 or messages[:n] != last.messages:
            return ids
        if messages[n] != {"role": "assistant", "content": last.text}:
            return ids
        start = len(last.plain)
        if ids[:start] != last.plain:
            return ids
        tail = _tail(messages, n, start, last.plain, encode)
        if tail is None or len(ids) - start < len(tail) or ids[len(ids) - len(tail):] != tail:
            return ids
        return last.prompt + last.answer + tail


def _tail(messages: list[dict[str, Any]], n: int, start: int, prompt: list[int],
          encode: Encode) -> list[int] | None:
    """The ids the format puts after the answer at messages[n] (with what follows it)."""

    def with_answer(text: str) -> list[int] | None:
        probe = messages[:n] + [{"role": "assistant", "content": text}] + messages[n + 1:]
        try:
            out = encode(probe)
        except Mistral7BError:
            return None
        return out[start:] if out[:start] == prompt else None

    empty = with_answer("")
    if empty is not None:
        return empty
    a, b = (with_answer(text) for text in _PROBES)
    if a is None or b is None:
        return None
    common = 0
    while common < min(len(a), len(b)) and a[len(a) - 1 - common] == b[len(b) - 1 - common]:
        common += 1
    # Each probe must be exactly one token of its own before the tail, or the boundary is
    # unclear (the letter merged with what follows).
    if len(a) - common != 1 or len(b) - common != 1:
        return None
    return a[len(a) - common:]
