"""Mistral's own tokenizers through mistral-common, the ground truth for the instruct format.

Which file means which instruct version:

| file | version | used by |
|---|---|---|
| `tokenizer.model.v1`, or `tokenizer.model` with 32000 pieces | v1: `[INST]` is plain text | Mistral 7B v0.1, v0.2 |
| `tokenizer.model.v3`, or `tokenizer.model` with 32768 pieces and `[INST]` = id 3 | v3: `[INST]`=3, `[/INST]`=4 control ids | Mistral 7B v0.3 |
| `tekken.json` | as the file says | Mistral NeMo and later |

mistral-common reads a bare `tokenizer.model` as v1 whatever it holds; the checkpoints of
Mistral 7B v0.3 ship their v3 vocabulary under that name too, hence the size check here.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mistral7b.errors import TokenizerError
from mistral7b.tokenizer.base import (
    Tokenizer,
    check_text,
    normalize_messages,
    with_safe_prompt,
)

# The tokenizer files mistral-common ships, by vocabulary size.
SHIPPED_FILES = {
    32000: "tokenizer.model.v1",
    32768: "mistral_instruct_tokenizer_240323.model.v3",
}

# Message keys mistral-common's message classes know, per role (others, e.g. "name", dropped).
_MESSAGE_KEYS = {
    "system": ("content",),
    "user": ("content",),
    "assistant": ("content", "tool_calls", "prefix"),
    "tool": ("content", "tool_call_id", "name"),
}


def shipped_file(vocab_size: int) -> Path:
    """Path of the tokenizer file mistral-common ships for a Mistral vocab of `vocab_size`."""
    import mistral_common

    if vocab_size not in SHIPPED_FILES:
        known = ", ".join(f"{n} ({name})" for n, name in SHIPPED_FILES.items())
        raise TokenizerError(
            f"mistral-common ships no Mistral tokenizer with {vocab_size} tokens; known: {known}"
        )
    return Path(mistral_common.__file__).parent / "data" / SHIPPED_FILES[vocab_size]


@functools.lru_cache(maxsize=4)
def shipped_pieces(vocab_size: int) -> tuple[str, ...]:
    """The pieces of the shipped Mistral vocabulary of `vocab_size` tokens, by id."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(shipped_file(vocab_size)))
    return tuple(sp.id_to_piece(i) for i in range(sp.get_piece_size()))


def _spm_version(path: Path) -> str:
    """Instruct version of a SentencePiece file: from a `.model.vN` suffix, else its size."""
    match = re.search(r"\.model\.(v\d+)(m\d+)?$", path.name)
    if match:
        return match.group(1)
    from sentencepiece import SentencePieceProcessor

    try:
        sp = SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{path}: not a readable SentencePiece model ({e})") from e
    if sp.get_piece_size() == 32768 and sp.id_to_piece(3) == "[INST]":
        return "v3"
    return "v1"


def _load_mistral_common(path: Path, mode: Any) -> Any:
    """A mistral-common MistralTokenizer for `path` validating requests in `mode`."""
    from mistral_common.exceptions import MistralCommonException
    from mistral_common.protocol.instruct.normalize import get_normalizer
    from mistral_common.protocol.instruct.validator import get_validator
    from mistral_common.tokens.tokenizers import instruct
    from mistral_common.tokens.tokenizers.base import TokenizerVersion
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MCTokenizer
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

    try:
        if path.suffix == ".json" or re.search(r"\.model\.v\d+(m\d+)?$", path.name):
            return MCTokenizer.from_file(str(path), mode=mode)
        version = TokenizerVersion(_spm_version(path))
        raw = SentencePieceTokenizer(str(path), tokenizer_version=version)
        instruct_cls = {
            TokenizerVersion.v1: instruct.InstructTokenizerV1,
            TokenizerVersion.v3: instruct.InstructTokenizerV3,
        }[version]
        return MCTokenizer(
            instruct_cls(raw),
            validator=get_validator(version, mode),
            request_normalizer=get_normalizer(version, None),
        )
    except TokenizerError:
        raise
    except (MistralCommonException, RuntimeError, OSError, ValueError, AssertionError) as e:
        raise TokenizerError(f"{path}: mistral-common cannot load this tokenizer file ({e})") from e


class MistralTokenizer(Tokenizer):
    """A Mistral tokenizer file read by mistral-common.

    `encode_chat` hands the conversation to mistral-common's `encode_chat_completion`, so the
    ids are exactly Mistral's: the system prompt goes into the last user turn (joined with
    "\\n\\n"), consecutive messages of one role are merged, each past assistant turn ends with
    EOS, and text a user types ("[INST]", "</s>") stays plain text.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from mistral_common.protocol.instruct.validator import ValidationMode

        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: tokenizer file not found")
        self._mc = _load_mistral_common(self.path, ValidationMode.test)
        self._raw = self._mc.instruct_tokenizer.tokenizer
        self._closed_mc: Any = None  # validates a conversation ending with an assistant turn

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> MistralTokenizer:
        """A `tokenizer.model[.vN]` or `tekken.json` file."""
        return cls(path)

    @classmethod
    def for_vocab(cls, vocab_size: int) -> MistralTokenizer:
        """The tokenizer mistral-common ships for Mistral 7B's vocab: 32000 -> v1, 32768 -> v3."""
        return cls(shipped_file(vocab_size))

    @property
    def version(self) -> str:
        """The instruct format version: "v1", "v3", ..."""
        return self._raw.version.value

    @property
    def bos_id(self) -> int:
        return self._raw.bos_id

    @property
    def eos_id(self) -> int:
        return self._raw.eos_id

    @property
    def vocab_size(self) -> int:
        return self._raw.n_words

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.eos_id})

    def id_to_piece(self, token_id: int) -> str:
        return self._raw.id_to_piece(token_id)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return list(self._raw.encode(check_text(text), bos=bos, eos=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._mc.decode([int(i) for i in ids])

    @property
    def tool_calls_id(self) -> int | None:
        """The `[TOOL_CALLS]` control id that starts a generated call (v3 and later)."""
        if not self.supports_tools:
            return None
        return int(self._raw.get_special_token("[TOOL_CALLS]"))

    @property
    def supports_tools(self) -> bool:
        """v1 (Mistral 7B v0.1/v0.2) has no tool tokens; v3 and later have them."""
        return self.version != "v1"

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        safe_prompt: bool = False,
    ) -> list[int]:
        """Mistral's instruct ids of `messages`, from mistral-common.

        Mistral's format has no separate generation prompt: a conversation ending with a user
        (or tool) turn ends with `[/INST]`, the point where the reply starts, whatever
        `add_generation_prompt` says. When the last message is the assistant's:
        - `add_generation_prompt=True`: the prompt continues that message (mistral-common's
          `prefix=True`: no EOS after it), for the model to complete;
        - `add_generation_prompt=False`: the turn is closed with EOS (mistral-common's
          finetuning validation), the full conversation as in training.
        `safe_prompt=True` puts SAFE_PROMPT first in the system prompt, as Mistral's API does
        (mistral-common itself has no such option).

        `tools`, assistant `tool_calls` and tool messages go to mistral-common as they are,
        except call ids: v3 wants 9 letters or digits, so any other id (OpenAI's
        "call_...") is mapped to one with `mistral_call_id`, the same for a call and the
        result that answers it.
        """
        if tools and not self.supports_tools:
            raise TokenizerError(
                f"the Mistral {self.version} instruct format ({self.path.name}) has no tool "
                "calling; tools need a v3 tokenizer (Mistral 7B v0.3)")
        messages = [_mistral_ids(m) for m in normalize_messages(messages)]
        if safe_prompt:
            messages = with_safe_prompt(messages)
        messages = [
            {"role": m["role"], **{k: m[k] for k in _MESSAGE_KEYS[m["role"]] if k in m}}
            for m in messages
        ]
        mc = self._mc
        if messages[-1]["role"] == "assistant" and not messages[-1].get("prefix"):
            if add_generation_prompt:
                messages[-1] = {**messages[-1], "prefix": True}
            else:
                mc = self._closed()
        return self._encode_request(mc, messages, tools)

    def _closed(self) -> Any:
        if self._closed_mc is None:
            from mistral_common.protocol.instruct.validator import ValidationMode

            self._closed_mc = _load_mistral_common(self.path, ValidationMode.finetuning)
        return self._closed_mc

    def _encode_request(self, mc: Any, messages: list[dict[str, Any]],
                        tools: list[dict[str, Any]] | None = None) -> list[int]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from pydantic import ValidationError

        try:
            body: dict[str, Any] = {"messages": messages}
            if tools:
                body["tools"] = tools
            request: ChatCompletionRequest[Any] = ChatCompletionRequest.model_validate(body)
            return list(mc.encode_chat_completion(request).tokens)
        except (MistralCommonException, ValidationError, ValueError, AssertionError) as e:
            raise TokenizerError(
                f"this conversation is not valid for the Mistral {self.version} instruct format "
                f"({self.path.name}): {e}"
            ) from e


_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def mistral_call_id(call_id: str) -> str:
    """`call_id` if it keeps mistral-common's v3 rule (9 letters or digits), else a stable
    9-character id made from its SHA-256, so a call and its result still match."""
    if _CALL_ID.fullmatch(call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    out = []
    for _ in range(9):
        number, digit = divmod(number, len(_ID_ALPHABET))
        out.append(_ID_ALPHABET[digit])
    return "".join(out)


def _mistral_ids(message: dict[str, Any]) -> dict[str, Any]:
    """A message whose tool-call ids follow mistral_call_id."""
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        message = {**message, "tool_calls": [
            {**c, "id": mistral_call_id(c["id"])} if isinstance(c, dict)
            and isinstance(c.get("id"), str) else c for c in calls]}
    if isinstance(message.get("tool_call_id"), str):
        message = {**message, "tool_call_id": mistral_call_id(message["tool_call_id"])}
    return message


def find_mistral_file(folder: str | os.PathLike[str]) -> Path | None:
    """The mistral-common tokenizer file of a checkpoint folder, or None.

    Order: `tekken.json`, then the highest `tokenizer.model.vN`, then `tokenizer.model`.
    """
    folder = Path(folder)
    tekken = folder / "tekken.json"
    if tekken.is_file():
        return tekken
    versioned = []
    for p in folder.glob("tokenizer.model.v*"):
        match = re.fullmatch(r"tokenizer\.model\.v(\d+)(m\d+)?", p.name)
        if match and p.is_file():
            versioned.append((int(match.group(1)), p.name, p))
    if versioned:
        return max(versioned)[2]
    plain = folder / "tokenizer.model"
    return plain if plain.is_file() else None
