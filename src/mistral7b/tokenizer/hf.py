"""Tokenizers of the `tokenizers` library with their model's chat template (HF folders).

`HFTokenizer` reads a folder as transformers would: `tokenizer.json` for the vocabulary and
rules; `tokenizer_config.json` (or `chat_template.jinja`) for the chat template, the BOS/EOS
tokens and whether a BOS is added; `special_tokens_map.json` and `generation_config.json` for
what those leave out. `GGUFTokenizer` (gguf.py) is the same class fed from GGUF metadata.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mistral7b.errors import TokenizerError
from mistral7b.tokenizer.base import (
    Tokenizer,
    check_text,
    normalize_messages,
    with_safe_prompt,
)
from mistral7b.tokenizer.chat_template import (
    CHATML_TEMPLATE,
    end_of_turn_markers,
    render_chat_template,
    template_reads,
)


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of its model.

    Plain `encode` treats special-token strings in the text as text (`<|im_start|>` typed by a
    user is not the control id). `encode_chat` renders the chat template in a sandbox and
    encodes the rendered text the way transformers' `apply_chat_template` does, special-token
    strings the template writes becoming their ids, with one difference: special-token text
    inside the messages stays text (see `encode_chat`), so a user cannot forge a role
    boundary. No BOS is added to the rendered text (templates write their own).
    Without a template, ChatML is used (`<|im_start|>role\\n...<|im_end|>\\n`).

    `bos_id` is None when the model adds no BOS (SmolLM2: its BOS token exists but
    add_bos_token is false). `stop_ids` are EOS, the generation config's eos ids, and the
    end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, ...) the template writes, if it is a token.
    """

    def __init__(
        self,
        backend: Any,
        *,
        eos_id: int,
        bos_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: Sequence[int] = (),
        name: str = "tokenizer",
    ) -> None:
        self.name = name
        self._backend = backend
        # Plain text is encoded with the backend's special-token matching switched off
        # (`_encode_plain`); the lock keeps another thread's encode from seeing the switch.
        # (A second backend built from `to_str` would cost ~0.1 s of every load.)
        self._switch = threading.Lock()
        backend.encode_special_tokens = False
        self._eos_id = int(eos_id)
        self._bos_token_id = bos_id
        self._add_bos = bool(add_bos) and bos_id is not None
        self.has_own_chat_template = chat_template is not None
        self.chat_template = chat_template if chat_template is not None else CHATML_TEMPLATE
        stops = {self._eos_id, *(int(i) for i in extra_stop_ids)}
        stops |= end_of_turn_markers(self.chat_template, backend.token_to_id)
        self._stop_ids = frozenset(stops)
        self._specials = _SpecialTokens(backend)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> HFTokenizer:
        """An HF model or tokenizer folder holding `tokenizer.json`."""
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{folder}: no tokenizer.json in this folder")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception for a malformed file
            raise TokenizerError(f"{path}: not a readable tokenizers file ({e})") from e
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        generation = _read_json(folder / "generation_config.json")

        def token_id(key: str) -> int | None:
            token = _token_content(config.get(key)) or _token_content(special_map.get(key))
            return backend.token_to_id(token) if token else None

        eos_ids = _id_list(generation.get("eos_token_id"))
        eos_id = token_id("eos_token")
        if eos_id is None:
            if not eos_ids:
                raise TokenizerError(
                    f"{folder}: no EOS token: none named in tokenizer_config.json, "
                    "special_tokens_map.json or generation_config.json"
                )
            eos_id = eos_ids[0]
        bos_id = token_id("bos_token")
        if bos_id is None and isinstance(generation.get("bos_token_id"), int):
            bos_id = generation["bos_token_id"]
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:  # as transformers does: whatever tokenizer.json's post-processor adds
            with_special = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(with_special) and with_special[0] == bos_id
        return cls(
            backend,
            eos_id=eos_id,
            bos_id=bos_id,
            add_bos=add_bos,
            chat_template=_chat_template(folder, config),
            extra_stop_ids=eos_ids,
            name=str(folder),
        )

    @property
    def backend(self) -> Any:
        """The underlying `tokenizers.Tokenizer` (special-token strings parsed as specials)."""
        return self._backend

    @property
    def bos_id(self) -> int | None:
        return self._bos_token_id if self._add_bos else None

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> frozenset[int]:
        return self._stop_ids

    def id_to_piece(self, token_id: int) -> str:
        piece = self._backend.id_to_token(int(token_id))
        if piece is None:
            raise TokenizerError(f"{self.name}: token id {token_id} is not in the vocabulary")
        return piece

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self._encode_plain(check_text(text))
        bos_id = self.bos_id
        if bos and bos_id is not None:
            return [bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        safe_prompt: bool = False,
    ) -> list[int]:
        """Render the chat template, then encode the text with its special tokens.

        Only the template's own special-token strings become control ids. Special-token text
        inside a message (`hi<|im_end|>\\n<|im_start|>system ...`) stays plain text, as
        `encode` makes it and as Mistral's structural encoding does for `[INST]`: before
        rendering, each such string in the messages is swapped for a placeholder the
        template cannot tell from text (private-use characters that appear nowhere in the
        conversation or template); the rendered text is cut at the special tokens left (the
        template's), and each piece between them is encoded as plain text with the
        placeholders put back. Pieces are cut where transformers' tokenizer would cut them, so
        a conversation without such text gets exactly `apply_chat_template`'s ids.

        `tools` go to the template as transformers' `apply_chat_template(tools=...)` hands
        them over; a template that never reads `tools` cannot show them to the model, so
        tools with such a template raise TokenizerError rather than being dropped.
        `safe_prompt=True` puts SAFE_PROMPT first in the system message (adding one, which
        then replaces a template's default system prompt).
        """
        messages = normalize_messages(messages)
        if safe_prompt:
            messages = with_safe_prompt(messages)
        hidden, restore = self._specials.hide(messages, self.chat_template)
        text = self._render(hidden, add_generation_prompt, tools)
        if restore is None:  # no special-token text in the messages
            return self._encode_with_specials(text)
        ids: list[int] = []
        for piece, special_id in self._specials.split(text):
            if special_id is not None:
                ids.append(special_id)
            elif piece:
                ids += self._encode_plain(restore(piece))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of `text` with special-token strings (`</s>`, `<|im_end|>`) left as text."""
        with self._switch:
            self._backend.encode_special_tokens = True
            try:
                return list(self._backend.encode(text, add_special_tokens=False).ids)
            finally:
                self._backend.encode_special_tokens = False

    def _encode_with_specials(self, text: str) -> list[int]:
        with self._switch:
            return list(self._backend.encode(text, add_special_tokens=False).ids)

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template reads the `tools` variable (renders function specs)."""
        return template_reads(self.chat_template, "tools")

    @property
    def tool_calls_id(self) -> int | None:
        return None

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        safe_prompt: bool = False,
    ) -> str:
        """The prompt text the chat template makes of `messages`."""
        messages = normalize_messages(messages)
        if safe_prompt:
            messages = with_safe_prompt(messages)
        return self._render(messages, add_generation_prompt, tools)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> str:
        extra: dict[str, Any] = {}
        if tools:
            if not self.supports_tools:
                raise TokenizerError(
                    f"{self.name}: this model's chat template has no tool support (it never "
                    "reads `tools`), so it cannot be given functions to call; use a model "
                    "whose template renders tools (Mistral v0.3, Qwen, Hermes, Llama 3.1)")
            extra["tools"] = tools
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt,
            bos_token=self._token_text(self._bos_token_id),
            eos_token=self._token_text(self._eos_id),
            **extra,
        )

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self._backend.id_to_token(token_id) or ""


class _SpecialTokens:
    """The special tokens of a backend as strings, to keep them out of message text."""

    def __init__(self, backend: Any) -> None:
        added = backend.get_added_tokens_decoder()
        self.by_text = {t.content: i for i, t in added.items() if t.special and t.content}
        self.strip = {t.content: (t.lstrip, t.rstrip) for t in added.values() if t.special}
        # Longest first, so that "<|im_start|>" wins over a special that is its prefix.
        alternatives = sorted(self.by_text, key=len, reverse=True)
        self.pattern = (re.compile("|".join(map(re.escape, alternatives)))
                        if alternatives else None)

    def hide(self, messages: list[dict[str, Any]], template: str
             ) -> tuple[list[dict[str, Any]], Callable[[str], str] | None]:
        """`messages` with every special-token string inside replaced by a placeholder, and
        the function that puts them back (None when there was nothing to hide)."""
        pattern = self.pattern
        if pattern is None or not any(_strings_match(pattern, m) for m in messages):
            return messages, None
        used = set(template) | {c for m in messages for c in _chars(m)}
        start = next(c for c in range(0xE000, 0xF8FF, 2) if chr(c) not in used
                     and chr(c + 1) not in used)
        open_, close = chr(start), chr(start + 1)
        texts = list(self.by_text)
        index = {text: k for k, text in enumerate(texts)}

        def swap(text: str) -> str:
            return pattern.sub(lambda m: f"{open_}{index[m.group(0)]}{close}", text)

        back = re.compile(f"{re.escape(open_)}(\\d+){re.escape(close)}")

        def restore(text: str) -> str:
            return back.sub(lambda m: texts[int(m.group(1))], text)

        return [_map_strings(swap, m) for m in messages], restore

    def split(self, text: str) -> list[tuple[str, int | None]]:
        """Rendered text as [(piece, None) | (special text, its id)], honouring the
        tokens' lstrip/rstrip (whitespace beside them is dropped, as tokenizers does)."""
        assert self.pattern is not None
        out: list[tuple[str, int | None]] = []
        at = 0
        for m in self.pattern.finditer(text):
            piece = text[at: m.start()]
            lstrip, _ = self.strip[m.group(0)]
            if lstrip:
                piece = piece.rstrip()
            if out and out[-1][1] is not None and self.strip[out[-1][0]][1]:
                piece = piece.lstrip()
            out += [(piece, None), (m.group(0), self.by_text[m.group(0)])]
            at = m.end()
        tail = text[at:]
        if out and out[-1][1] is not None and self.strip[out[-1][0]][1]:
            tail = tail.lstrip()
        out.append((tail, None))
        return out


def _strings_match(pattern: re.Pattern[str], value: Any) -> bool:
    if isinstance(value, str):
        return pattern.search(value) is not None
    if isinstance(value, dict):
        return any(_strings_match(pattern, v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_strings_match(pattern, v) for v in value)
    return False


def _chars(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(value)
    if isinstance(value, dict):
        return set().union(*(_chars(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(_chars(v) for v in value)) if value else set()
    return set()


def _map_strings(fn: Callable[[str], str], value: Any) -> Any:
    """`value` with `fn` applied to every string in it (keys and roles excepted)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: (v if k == "role" else _map_strings(fn, v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(fn, v) for v in value]
    return value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The folder's chat template: `chat_template.jinja`, else tokenizer_config.json's."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
