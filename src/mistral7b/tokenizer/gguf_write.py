"""Tokenizers written into a GGUF file's metadata, the keys `GGUFTokenizer` (gguf.py) and
llama.cpp read back:

| source | GGUF tokenizer model |
|---|---|
| a SentencePiece file (`tokenizer.model[.vN]`: Mistral v1/v3, Llama 2) | "llama": pieces, scores, token types |
| an HF `tokenizer.json` holding a byte-level BPE (SmolLM2, Llama 3, GPT-2) | "gpt2": tokens, merges, token types, the pre-tokenizer by name |
| another GGUF file | its `tokenizer.*` keys, copied with their value types |

What cannot be written (tekken.json, a WordPiece or Unigram tokenizer.json, a pre-tokenizer
llama.cpp has no name for) raises TokenizerError naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mistral7b.errors import TokenizerError
from mistral7b.tokenizer.gguf import (
    BYTE,
    CONTROL,
    GPT2_REGEX,
    NORMAL,
    PRE_TOKENIZERS,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
)

# A digit on its own: what tokenizers' `Digits(individual_digits=True)` splits.
_DIGIT_REGEX = r"\p{N}"


def add_sentencepiece_metadata(writer: Any, spm_file: str | os.PathLike[str],
                               rename: dict[int, str] | None = None) -> None:
    """Write a SentencePiece model's vocabulary into a `gguf.GGUFWriter` as llama.cpp's
    converter does: model "llama", pieces, scores, token types, special ids, add_bos and the
    space prefix (the keys `GGUFTokenizer` reads back). `rename` replaces pieces by id."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(spm_file))
    n = sp.get_piece_size()

    def token_type(i: int) -> int:
        if sp.is_unknown(i):
            return UNKNOWN
        if sp.is_control(i):
            return CONTROL
        if sp.is_byte(i):
            return BYTE
        return UNUSED if sp.is_unused(i) else NORMAL

    pieces = [sp.id_to_piece(i) for i in range(n)]
    for i, piece in (rename or {}).items():
        pieces[i] = piece
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([token_type(i) for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)


def copy_tokenizer_metadata(writer: Any, metadata: dict[str, Any],
                            types: dict[str, tuple[int, Any]]) -> None:
    """Copy the `tokenizer.*` keys of a parsed GGUF header (gguf_parse: `metadata` values,
    `types` value types) into a `gguf.GGUFWriter`, each with its own value type."""
    import gguf

    for key, value in metadata.items():
        if not key.startswith("tokenizer."):
            continue
        kind, _ = types[key]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType(kind))


def add_bpe_metadata(writer: Any, folder: Path, vocab_size: int) -> None:
    """Write the byte-level BPE of an HF folder's `tokenizer.json` as a "gpt2" GGUF tokenizer
    of `vocab_size` tokens (ids the file leaves unused become `[PAD{id}]`, as llama.cpp's
    converter writes them), with its BOS/EOS and add-BOS rule from tokenizer_config.json."""
    path = folder / "tokenizer.json"
    spec = _read_json(path)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(spec):
        raise TokenizerError(
            f"{path}: a {model.get('type')} tokenizer without byte-level pre-tokenization "
            "cannot be written to GGUF (supported: a byte-level BPE tokenizer.json, or a "
            "SentencePiece tokenizer.model beside it)")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), path)
    added = {int(t["id"]): t for t in spec.get("added_tokens") or []}
    by_id: dict[int, str] = {int(i): tok for tok, i in model.get("vocab", {}).items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id, default=-1) >= vocab_size:
        raise TokenizerError(f"{path}: token id {max(by_id)} does not fit the model's "
                             f"{vocab_size}-token embedding")
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            types.append(NORMAL if i in by_id else UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    config = _read_json(folder / "tokenizer_config.json") if (
        folder / "tokenizer_config.json").is_file() else {}
    vocab = {tok: i for i, tok in enumerate(tokens)}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    bos, eos = _token(config.get("bos_token"), vocab), _token(config.get("eos_token"), vocab)
    if eos is None:
        raise TokenizerError(f"{folder}: tokenizer_config.json names no eos_token")
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(bool(config.get("add_bos_token", False)) and bos is not None)


def _is_byte_level(spec: dict[str, Any]) -> bool:
    decoder = spec.get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    return "ByteLevel" in kinds


def _pre_tokenizer_name(pre: dict[str, Any] | None, path: Path) -> str:
    """The llama.cpp name (`tokenizer.ggml.pre`) of a tokenizer.json pre-tokenizer, by the
    split regexes it applies in order."""
    parts = (pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else \
        ([pre] if pre else [])
    regexes: list[str] = []
    for part in parts:
        kind = part.get("type")
        if kind == "Digits" and part.get("individual_digits"):
            regexes.append(_DIGIT_REGEX)
        elif kind == "Split" and "Regex" in (part.get("pattern") or {}):
            regexes.append(part["pattern"]["Regex"])
        elif kind == "ByteLevel":
            if part.get("use_regex", True):
                regexes.append(GPT2_REGEX)
        else:
            raise TokenizerError(f"{path}: pre-tokenizer step {kind!r} has no GGUF equivalent")
    for name, (table, _) in PRE_TOKENIZERS.items():
        if tuple(regexes) == table:
            return name
    raise TokenizerError(f"{path}: its pre-tokenizer (split by {regexes!r:.200}) is not one "
                         "llama.cpp knows by name; it cannot be written to GGUF")


def _token(value: Any, vocab: dict[str, int]) -> int | None:
    content = value.get("content") if isinstance(value, dict) else value
    return vocab.get(content) if isinstance(content, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TokenizerError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data
