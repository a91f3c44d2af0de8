"""The tokenizer interface every model format implements, and streaming detokenization.

Three implementations sit beside this module: `MistralTokenizer` (mistral-common, the ground
truth for Mistral's instruct format), `HFTokenizer` (a `tokenizer.json` folder) and
`GGUFTokenizer` (the tokenizer embedded in a GGUF file's metadata). They subclass `Tokenizer`
for its `decoder()`; the engine, server, trainer and evaluators depend only on the protocols
`Tokenizer` and `IncrementalDecoder`, so any object with these methods will do.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from mistral7b.errors import InputError, TokenizerError

# The guardrail system prompt of the Mistral 7B paper (section 5.1).
SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. "
    "Ensure replies promote fairness and positivity."
)

_ROLES = ("system", "user", "assistant", "tool")


class IncrementalDecoder(Protocol):
    """Generated ids in, text deltas out: what the engine needs of a tokenizer per sequence."""

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ("" while a character is open)."""
        ...

    def flush(self) -> str:
        """Text still held back at the end of the stream."""
        ...


class Tokenizer(Protocol):
    """Text <-> token ids, chat encoding and streaming detokenization for one model."""

    @abstractmethod
    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`, with the model's BOS first when `bos` and the model uses one.

        Text is always plain text: a control token spelled out in `text` (`[INST]`, `</s>`,
        `<|im_start|>`) is encoded as the characters it is made of, never as the control id.
        No EOS is ever appended.
        """

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; special/control tokens (BOS, EOS, [INST], ...) are skipped."""

    @abstractmethod
    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        safe_prompt: bool = False,
    ) -> list[int]:
        """The prompt ids of a conversation `[{"role": ..., "content": ...}, ...]`.

        Roles are "system", "user", "assistant" (and "tool" where the format has it).
        `add_generation_prompt=True` ends the ids where the assistant's reply starts;
        `tools` (OpenAI's `[{"type": "function", "function": {...}}]`) are the functions the
        model may call, written where the format puts them; assistant messages may carry
        OpenAI `tool_calls` and "tool" messages a `tool_call_id`. A format without tool
        calling raises TokenizerError when tools are given.
        `safe_prompt=True` adds the paper's guardrail `SAFE_PROMPT` as the system prompt.
        """

    @property
    @abstractmethod
    def bos_id(self) -> int | None:
        """The id `encode(..., bos=True)` puts first, or None for a model that uses no BOS."""

    @property
    @abstractmethod
    def eos_id(self) -> int:
        """The end-of-sequence id."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (the size of the model's embedding table for its vocab)."""

    @property
    @abstractmethod
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS plus the end-of-turn marker of the chat format."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` as stored (`▁the`, `Ġthe`, `<0x0A>`, `</s>`)."""

    @property
    def supports_tools(self) -> bool:
        """Whether `encode_chat` can show the model `tools` (the chat format has them)."""
        return False

    @property
    def tool_calls_id(self) -> int | None:
        """The control id that starts a generated tool call (Mistral's `[TOOL_CALLS]`), or
        None when calls are written as text (or not at all)."""
        return None

    def decoder(self) -> IncrementalDecoder:
        """A fresh streaming detokenizer: feed it generated ids one by one."""
        return StreamDecoder(self.decode, self.encode("a", bos=False))


class StreamDecoder:
    """The `IncrementalDecoder` of every tokenizer here: turns a stream of token ids into text
    deltas whose concatenation is `decode(all_ids)`.

    Two things make this harder than decoding each token alone:

    - A character can span tokens: byte-level BPE splits "é" (C3 A9) or an emoji into byte
      tokens, SentencePiece falls back to `<0xNN>` pieces. Decoding a half character gives
      U+FFFD, so a delta is held back while the decoded text ends with U+FFFD (at most
      `max_held` tokens: a character has at most 4 bytes, so anything still unfinished after
      that is a real U+FFFD and is emitted).
    - SentencePiece drops the leading space of the *first* piece of a text only:
      decode([▁Hello]) = "Hello" but decode([▁a, ▁Hello]) = "a Hello". So once any text has
      been emitted, pending ids are decoded behind an anchor (the ids of "a"), whose own text
      is then cut off: decode(anchor + [▁Hello])[len("a"):] = " Hello", the text the
      piece has in the middle of a sequence.

    Worked example, Mistral v1, "Hi 🦙" = [▁Hi, ▁, <0xF0>, <0x9F>, <0xA6>, <0x99>]:
    push(▁Hi) -> "Hi"; push(▁) -> " "; push(<0xF0>), push(<0x9F>), push(<0xA6>) -> ""
    (held: the text ends with U+FFFD); push(<0x99>) -> "🦙". Each push decodes only the
    pending ids (plus the anchor), so the cost per token is O(1) however long the stream is.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        anchor_ids: Sequence[int],
        max_held: int = 8,
    ) -> None:
        self._decode = decode
        self._anchor = list(anchor_ids)
        self._anchor_text = decode(self._anchor)
        self._max_held = max_held
        self._pending: list[int] = []  # ids whose text has not been emitted yet
        self._started = False  # True once non-empty text has been emitted
        self._held = 0  # pushes in a row that returned "" to wait for a character's end

    def _pending_text(self) -> str:
        if not self._started:
            # Nothing emitted yet: the pending ids are the whole sequence so far (maybe a BOS
            # or other control ids), decoded as such, leading-space rule included.
            return self._decode(self._pending)
        text = self._decode(self._anchor + self._pending)
        return text[len(self._anchor_text) :]

    def _emit(self, text: str) -> str:
        # Before the first text, ids that decode to "" (BOS, control tokens) stay pending so
        # that the first text piece is still decoded as the first one.
        if self._started or text:
            self._started = True
            self._pending = []
        self._held = 0
        return text

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ("" while a character is open)."""
        self._pending.append(int(token_id))
        text = self._pending_text()
        if text.endswith("\ufffd") and self._held < self._max_held:
            self._held += 1
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Text still held back at the end of the stream (an unfinished character as U+FFFD)."""
        if not self._pending:
            return ""
        return self._emit(self._pending_text())


def check_text(text: str, param: str = "text") -> str:
    """`text` unchanged, or InputError naming `param` when it is not valid Unicode.

    A Python str can hold what no UTF-8 text can: a lone UTF-16 surrogate (U+D800..U+DFFF),
    from a JSON escape such as "\\ud800" (valid JSON) or from invalid bytes in a command
    line (decoded with surrogateescape). Every tokenizer's `encode` and every chat message
    passes here, and so does the server's request validation, so such text is a clear
    InputError (HTTP 400 naming the parameter) on every surface, never a failure deep inside
    a tokenizer.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = text[e.start]
        raise InputError(
            f"{param} is not valid Unicode: it holds a lone surrogate U+{ord(char):04X} at "
            f"character {e.start}; send valid UTF-8 text (it came from invalid bytes, or from "
            "an unpaired \\ud800-\\udfff escape in JSON)"
        ) from None
    return text


def check_strings(value: Any, param: str) -> None:
    """check_text on every string inside a message field (tool calls nest them)."""
    if isinstance(value, str):
        check_text(value, param)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_strings(item, f"{param}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_strings(item, f"{param}[{i}]")


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation and return copies of its messages with `content` as a string.

    OpenAI-style content lists (`[{"type": "text", "text": ...}, ...]`) are joined; None
    content (an assistant message carrying only tool calls) becomes "". Other keys are kept.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError(
            "a chat needs a non-empty list of messages {'role': ..., 'content': ...}"
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TokenizerError(f"chat message {i} is a {type(message).__name__}, not a dict")
        role = message.get("role")
        if role not in _ROLES:
            raise TokenizerError(
                f"chat message {i} has role {role!r}; expected one of {', '.join(_ROLES)}"
            )
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, (list, tuple)):
            parts = []
            for part in content:
                if isinstance(part, str):
                    parts.append(part)
                elif isinstance(part, dict) and part.get("type", "text") == "text":
                    parts.append(str(part.get("text", "")))
                else:
                    raise TokenizerError(
                        f"chat message {i} has a content part of type "
                        f"{part.get('type') if isinstance(part, dict) else type(part).__name__!r}; "
                        "only text is supported"
                    )
            content = "".join(parts)
        elif not isinstance(content, str):
            raise TokenizerError(
                f"chat message {i} content is a {type(content).__name__}, not a string"
            )
        for key, value in message.items():
            check_strings(value, f"messages[{i}].{key}")
        out.append({**message, "content": check_text(content, f"messages[{i}].content")})
    return out


def with_safe_prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with SAFE_PROMPT first in the system prompt.

    An existing first system message becomes "SAFE_PROMPT\\n\\n<its content>"; without one, a
    system message holding SAFE_PROMPT is put first (it then replaces a chat template's default
    system prompt, as any system message does).
    """
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        content = f"{SAFE_PROMPT}\n\n{first['content']}" if first["content"] else SAFE_PROMPT
        return [{**first, "content": content}, *messages[1:]]
    return [{"role": "system", "content": SAFE_PROMPT}, *messages]
