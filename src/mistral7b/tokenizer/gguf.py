"""The tokenizer embedded in a GGUF file's metadata, rebuilt with the `tokenizers` library.

GGUF metadata used (`tokenizer.ggml.*` unless said otherwise):

| key | meaning |
|---|---|
| model | "llama": SentencePiece BPE (Mistral, Llama 2); "gpt2": byte-level BPE (SmolLM2, Llama 3) |
| pre | the gpt2 pre-tokenizer (split regex) by name, see `PRE_TOKENIZERS` |
| tokens, scores, token_type | the vocabulary by id; scores rank SentencePiece merges |
| merges | gpt2 only: "left right" merge rules, best first |
| bos/eos/unknown_token_id, add_bos_token, add_space_prefix | as named |
| tokenizer.chat_template | the model's Jinja chat template |

Token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

from mistral7b.errors import TokenizerError
from mistral7b.tokenizer.hf import HFTokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GPT-2's split regex (what tokenizers' ByteLevel pre-tokenizer applies with use_regex=True).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> (split regexes applied in order, ignore_merges), as llama.cpp's
# pre-tokenizer table groups them. "smollm" (the default model) is StarCoder's: every digit
# on its own, then GPT-2's regex.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((GPT2_REGEX,), False),
    "gpt2": ((GPT2_REGEX,), False),
    "gpt-2": ((GPT2_REGEX,), False),
    "smollm": ((r"\p{N}", GPT2_REGEX), False),
    "starcoder": ((r"\p{N}", GPT2_REGEX), False),
    "refact": ((r"\p{N}", GPT2_REGEX), False),
    "llama-bpe": ((_LLAMA3_REGEX,), True),
    "llama3": ((_LLAMA3_REGEX,), True),
    "qwen2": ((_QWEN2_REGEX,), False),
}


class GGUFTokenizer(HFTokenizer):
    """The tokenizer of a GGUF file.

    Chat: a Mistral vocabulary (its pieces equal, id for id, those of the v1 or v3 file
    mistral-common ships) whose chat template is absent or an `[INST]` template is encoded by
    mistral-common, exactly like `MistralTokenizer`; a Mistral fine-tune with another format
    (Zephyr's `<|user|>`, ChatML) uses its own template. Everything else renders
    `tokenizer.chat_template` (ChatML when absent) as `HFTokenizer` does.
    """

    def __init__(self, *args: Any, mistral_vocab_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mistral: Any = None
        if mistral_vocab_size is not None:
            from mistral7b.tokenizer.mistral import MistralTokenizer

            self._mistral = MistralTokenizer.for_vocab(mistral_vocab_size)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> GGUFTokenizer:
        """Read the tokenizer metadata of the GGUF file at `path`."""
        from mistral7b.errors import ModelFileError
        from mistral7b.weights.gguf_parse import open_gguf

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: GGUF file not found")
        try:
            _, header = open_gguf(path)
        except ModelFileError as e:
            raise TokenizerError(f"{path}: not a readable GGUF file ({e})") from e
        return cls.from_metadata(header.metadata, path)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], path: str | os.PathLike[str]) -> GGUFTokenizer:
        """From a parsed header's metadata (the weight loader's, to read the file once)."""
        path = Path(path)
        meta = _tokenizer_metadata(metadata, path)
        tokens, types, model = meta["tokens"], meta["token_type"], meta["model"]
        try:
            if model == "llama":
                backend = sentencepiece_bpe(
                    tokens,
                    meta["scores"],
                    types,
                    meta.get("unknown_token_id", 0),
                    meta.get("add_space_prefix", True),
                )
            else:
                backend = byte_level_bpe(tokens, meta["merges"], types, meta.get("pre", "default"))
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from e
        except Exception as e:  # tokenizers rejects merges of unknown tokens, ...
            raise TokenizerError(f"{path}: inconsistent tokenizer metadata ({e})") from e
        template = meta.get("chat_template")
        mistral_size = None
        if model == "llama" and (template is None or "[INST]" in template):
            mistral_size = mistral_vocab_size(tokens)
        return cls(
            backend,
            eos_id=meta["eos_token_id"],
            bos_id=meta.get("bos_token_id"),
            # llama.cpp's defaults when the key is absent: SentencePiece adds BOS, gpt2 not.
            add_bos=meta.get("add_bos_token", model == "llama"),
            chat_template=template,
            name=str(path),
            mistral_vocab_size=mistral_size,
        )

    @property
    def uses_mistral_common(self) -> bool:
        """True when `encode_chat` is mistral-common's (a Mistral vocabulary)."""
        return self._mistral is not None

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        safe_prompt: bool = False,
    ) -> list[int]:
        if self._mistral is not None:
            return self._mistral.encode_chat(messages, add_generation_prompt, tools=tools,
                                             safe_prompt=safe_prompt)
        return super().encode_chat(messages, add_generation_prompt, tools=tools,
                                   safe_prompt=safe_prompt)

    @property
    def tool_calls_id(self) -> int | None:
        """Mistral's `[TOOL_CALLS]` id when chat goes through mistral-common (v3), else None."""
        return self._mistral.tool_calls_id if self._mistral is not None else None

    @property
    def supports_tools(self) -> bool:
        if self._mistral is not None:
            return self._mistral.supports_tools
        return super().supports_tools


# short name -> (type of the value or of each item, is a list)
_METADATA_TYPES: dict[str, tuple[type, bool]] = {
    "model": (str, False), "pre": (str, False), "tokens": (str, True), "scores": (float, True),
    "token_type": (int, True), "merges": (str, True), "bos_token_id": (int, False),
    "eos_token_id": (int, False), "unknown_token_id": (int, False),
    "add_bos_token": (bool, False), "add_space_prefix": (bool, False),
    "chat_template": (str, False),
}


def _all_are(values: list[Any], item_types: set[type], kind: type) -> bool:
    """Every item of `values` (whose item types are `item_types`) passes `_is(item, kind)`."""
    if kind is float:
        return item_types <= {int, float} and all(map(math.isfinite, values))
    return item_types <= {kind}


def _is(value: Any, kind: type) -> bool:
    """`value` is of GGUF value kind `kind`: bools are not ints; ints count as floats (scores
    of 0), floats must be finite."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    return isinstance(value, kind)


def _tokenizer_metadata(metadata: dict[str, Any], path: Path) -> dict[str, Any]:
    """The `tokenizer.*` metadata by short name ("tokens", "eos_token_id", "chat_template"),
    checked for what building the tokenizer needs."""
    names = [
        "model",
        "pre",
        "tokens",
        "scores",
        "token_type",
        "merges",
        "bos_token_id",
        "eos_token_id",
        "unknown_token_id",
        "add_bos_token",
        "add_space_prefix",
    ]
    keys = {name: f"tokenizer.ggml.{name}" for name in names}
    keys["chat_template"] = "tokenizer.chat_template"
    meta = {}
    for name, key in keys.items():
        value = metadata.get(key)
        # The item types of a list, gathered at C speed (a vocabulary has 32k-150k items).
        item_types = set(map(type, value)) if isinstance(value, list) else set()
        if isinstance(value, bytes) or bytes in item_types:
            raise TokenizerError(f"{path}: {key} holds a string that is not UTF-8")
        if value is None:
            continue
        kind, is_list = _METADATA_TYPES[name]
        ok = (isinstance(value, list) and _all_are(value, item_types, kind)) if is_list \
            else _is(value, kind)
        if not ok:
            want = f"a list of {kind.__name__}" if is_list else kind.__name__
            raise TokenizerError(f"{path}: {key} must be {want}, found {str(value)[:60]!r}")
        meta[name] = value
    model, tokens = meta.get("model"), meta.get("tokens")
    if model is None or not tokens:
        raise TokenizerError(
            f"{path}: no tokenizer in this GGUF file "
            "(tokenizer.ggml.model / tokenizer.ggml.tokens missing)"
        )
    if model not in ("llama", "gpt2"):
        raise TokenizerError(
            f"{path}: tokenizer model {model!r} is not supported "
            "(supported: 'llama' SentencePiece BPE, 'gpt2' byte-level BPE)"
        )
    n = len(tokens)
    meta.setdefault("token_type", [NORMAL] * n)
    if len(meta["token_type"]) != n:
        raise TokenizerError(
            f"{path}: tokenizer.ggml.token_type has {len(meta['token_type'])} entries "
            f"for {n} tokens"
        )
    if model == "llama" and len(meta.get("scores", ())) != n:
        raise TokenizerError(f"{path}: tokenizer.ggml.scores missing or not one per token")
    if model == "gpt2" and not meta.get("merges"):
        raise TokenizerError(f"{path}: gpt2 tokenizer without tokenizer.ggml.merges")
    for name in ("eos_token_id", "bos_token_id", "unknown_token_id"):
        value = meta.get(name)
        if value is not None and not 0 <= value < n:
            raise TokenizerError(f"{path}: tokenizer.ggml.{name} = {value} is out of range")
    if "eos_token_id" not in meta:
        raise TokenizerError(f"{path}: tokenizer.ggml.eos_token_id missing")
    return meta


def mistral_vocab_size(tokens: list[str]) -> int | None:
    """32000 or 32768 when `tokens` are exactly the pieces of a Mistral file mistral-common
    ships (so its chat encoding gives the right ids), else None."""
    from mistral7b.tokenizer.mistral import SHIPPED_FILES, shipped_pieces

    if len(tokens) in SHIPPED_FILES and tuple(tokens) == shipped_pieces(len(tokens)):
        return len(tokens)
    return None


def _added_tokens(tokens: list[str], types: list[int]) -> list[Any]:
    from tokenizers import AddedToken

    added = []
    for token, kind in zip(tokens, types):
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            special = kind != USER_DEFINED
            added.append(AddedToken(token, special=special, normalized=False))
    return added


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a duplicated string keeps its first id
    return vocab


def sentencepiece_bpe(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    unk_id: int = 0,
    add_space_prefix: bool = True,
) -> Any:
    """A `tokenizers.Tokenizer` encoding like a SentencePiece BPE model with these pieces.

    SentencePiece BPE starts from characters and repeatedly merges the adjacent pair whose
    concatenation is the highest-scoring normal piece. A rank-ordered merge list reproduces
    that: every way to split each normal piece into two normal pieces is a merge, ranked by
    the piece's score (best first; ties by id). Characters missing from the vocabulary become
    their UTF-8 bytes `<0xNN>` (byte fallback). Text is prefixed with "▁" and spaces become
    "▁" (normalizer); decoding undoes both and drops the one leading space, as
    SentencePiece does.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers

    vocab = _vocab(tokens)
    mergeable = [kind == NORMAL for kind in types]
    ranked = []
    for merged_id, piece in enumerate(tokens):
        if not mergeable[merged_id] or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left_id = vocab.get(piece[:cut])
            right_id = vocab.get(piece[cut:])
            if left_id is None or right_id is None:
                continue
            if mergeable[left_id] and mergeable[right_id]:
                ranked.append((-scores[merged_id], merged_id, left_id, piece[:cut], piece[cut:]))
    ranked.sort()
    merges = [(left, right) for _, _, _, left, right in ranked]
    has_bytes = any(kind == BYTE for kind in types)
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk_id] if 0 <= unk_id < len(tokens) else None,
            fuse_unk=True,
            byte_fallback=has_bytes,
        )
    )
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode_steps)
    backend.add_special_tokens(_added_tokens(tokens, types))
    return backend


def byte_level_bpe(tokens: list[str], merges: list[str], types: list[int], pre: str) -> Any:
    """A `tokenizers.Tokenizer` for a GPT-2 style byte-level BPE vocabulary.

    `pre` (tokenizer.ggml.pre) picks how text is split before BPE, see `PRE_TOKENIZERS`;
    an unknown name falls back to GPT-2's split with a warning.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    if pre not in PRE_TOKENIZERS:
        warnings.warn(
            f"GGUF pre-tokenizer {pre!r} is not known here; splitting text as GPT-2 does, "
            "which may tokenize some text differently from llama.cpp",
            stacklevel=3,
        )
    regexes, ignore_merges = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])
    pairs = []
    for rule in merges:
        left, sep, right = rule.partition(" ")
        if not sep:
            raise TokenizerError(f"malformed merge rule {rule!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    backend = Backend(models.BPE(vocab=_vocab(tokens), merges=pairs, ignore_merges=ignore_merges))
    splits = [
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False) for regex in regexes
    ]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(_added_tokens(tokens, types))
    return backend
