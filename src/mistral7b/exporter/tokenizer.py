"""The tokenizer that goes with an exported model, in each target's own form.

What the source holds (`SourceTokenizer.of`), checked in the order `api.load` reads it:

    kind        source                                        hf / consolidated target     gguf target
    "gguf"      a .gguf file (or `tokenizer.gguf` beside a    tokenizer.json +             its tokenizer.* keys
                `mistral7b quantize` folder)                  tokenizer_config.json        copied as they are
                                                              (+ the mistral-common file
                                                              when the vocabulary is v1/v3)
    "files"     tokenizer files of a folder: tokenizer.json,  copied as they are           SentencePiece "llama" from
                tokenizer_config.json, tokenizer.model[.vN],                               tokenizer.model*, else the
                tekken.json, ...                                                           byte-level BPE of
                                                                                           tokenizer.json as "gpt2"
    "shipped"   a consolidated folder without one, of a       the mistral-common file      SentencePiece "llama"
                Mistral vocabulary size (32000 / 32768)       (tokenizer.model.v1 / .v3)
    "none"      nothing                                       nothing (said in the log)    refused: llama.cpp needs one
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral7b.errors import TokenizerError
from mistral7b.tokenizer.gguf import GGUFTokenizer, mistral_vocab_size
from mistral7b.tokenizer.gguf_write import (
    add_bpe_metadata,
    add_sentencepiece_metadata,
    copy_tokenizer_metadata,
)
from mistral7b.tokenizer.mistral import SHIPPED_FILES, find_mistral_file, shipped_file
from mistral7b.weights.base import CheckpointReader
from mistral7b.weights.gguf_file import GGUFReader
from mistral7b.weights.gguf_parse import open_gguf

# Tokenizer files of a checkpoint folder, copied to hf / consolidated exports as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tekken.json")
SAVED_GGUF = "tokenizer.gguf"   # what `mistral7b quantize` writes for a GGUF source

# Chat templates for a GGUF of a Mistral SentencePiece vocabulary whose source has none
# (Mistral's own folders: mistral-common needs no template, llama.cpp does). For alternating
# user/assistant turns, with an optional system message first, they render what
# mistral-common encodes (tested): v1 puts the system prompt before the first user message,
# v3 before the last one, and v3's [INST] / [/INST] are control tokens with no spaces
# around them. (mistral-common also joins consecutive user or system messages with a blank
# line; these templates do not: mistral7b itself encodes this vocabulary with mistral-common.)
_MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}"
    "{%- endif %}{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.WHICH and system_message is defined %}"
    "{{- '[INST]SP' + system_message + '\\n\\n' + message['content'] + 'SP[/INST]' }}"
    "{%- else %}{{- '[INST]SP' + message['content'] + 'SP[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- 'SP' + message['content'] + eos_token }}"
    "{%- endif %}{%- endfor %}")
MISTRAL_TEMPLATES = {
    32000: _MISTRAL_TEMPLATE.replace("WHICH", "first").replace("SP", " "),
    32768: _MISTRAL_TEMPLATE.replace("WHICH", "last").replace("SP", ""),
}


@dataclass
class SourceTokenizer:
    kind: str                                    # "gguf" | "files" | "shipped" | "none"
    files: list[Path] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)        # kind "gguf"
    types: dict[str, tuple[int, Any]] = field(default_factory=dict)
    origin: str = ""

    @classmethod
    def of(cls, reader: CheckpointReader) -> SourceTokenizer:
        if isinstance(reader, GGUFReader):
            return cls("gguf", metadata=reader.header.metadata, types=reader.header.types,
                       origin=str(reader.path))
        folder = Path(reader.path)
        if (folder / SAVED_GGUF).is_file():
            _, header = open_gguf(folder / SAVED_GGUF)
            return cls("gguf", metadata=header.metadata, types=header.types,
                       origin=str(folder / SAVED_GGUF))
        files = [f for f in sorted(folder.iterdir()) if f.is_file() and (
            f.name in TOKENIZER_FILES or f.name.startswith("tokenizer.model"))]
        if files:
            return cls("files", files=files, origin=str(folder))
        if reader.format == "consolidated" and reader.config.vocab_size in SHIPPED_FILES:
            return cls("shipped", files=[shipped_file(reader.config.vocab_size)],
                       origin="mistral-common")
        return cls("none")

    @property
    def chat_template(self) -> str | None:
        if self.kind == "gguf":
            value = self.metadata.get("tokenizer.chat_template")
            return value if isinstance(value, str) else None
        folder = self.files[0].parent if self.kind == "files" else None
        if folder is None:
            return None
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        config = folder / "tokenizer_config.json"
        if config.is_file():
            value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
            return value if isinstance(value, str) else None
        return None

    # ---------------------------------------------------------- hf / consolidated folders

    def write_files(self, out: Path, target: str) -> str:
        """Write the tokenizer into folder `out`; returns what was written, for the log."""
        if self.kind == "none":
            return "no tokenizer in the source: none written"
        if self.kind in ("files", "shipped"):
            names = []
            for file in self.files:
                name = _mistral_name(file) if self.kind == "shipped" else file.name
                shutil.copyfile(file, out / name)
                names.append(name)
            spm = _sentencepiece_files(self.files)
            if target == "hf" and spm and not (out / "tokenizer.json").exists() \
                    and not (out / "tokenizer_config.json").exists() \
                    and _pieces(spm) in MISTRAL_TEMPLATES:
                # for transformers, which reads no mistral-common file
                meta = _spm_metadata(spm)
                meta["tokenizer.chat_template"] = MISTRAL_TEMPLATES[_pieces(spm)]
                names += _write_hf_files(meta, str(spm), out)
            said = f"tokenizer: {', '.join(names)}"
            if target == "consolidated" and find_mistral_file(out) is None:
                said += (" (the source has no Mistral tokenizer file; mistral-inference "
                         "needs tokenizer.model.v3 or tekken.json)")
            return said
        return self._write_from_gguf(out, target)

    def _write_from_gguf(self, out: Path, target: str) -> str:
        names = _write_hf_files(self.metadata, self.origin, out)
        tokens = self.metadata["tokenizer.ggml.tokens"]
        size = mistral_vocab_size(tokens) if self.metadata.get(
            "tokenizer.ggml.model") == "llama" else None
        if size is not None:  # a Mistral vocabulary: mistral-common's file gives its chat
            name = _mistral_name(shipped_file(size))
            shutil.copyfile(shipped_file(size), out / name)
            names.append(name)
        said = f"tokenizer: {', '.join(names)} (from the GGUF metadata)"
        if target == "consolidated" and size is None:
            said += " (no Mistral tokenizer file: mistral-inference cannot read this one)"
        return said

    # ---------------------------------------------------------------- GGUF metadata

    def add_to_gguf(self, writer: Any, vocab_size: int) -> str:
        """Write the tokenizer into a `gguf.GGUFWriter`'s metadata; returns what was written."""
        if self.kind == "none":
            raise TokenizerError("the source has no tokenizer, and a GGUF file needs one "
                                 "(llama.cpp reads it from the metadata): add tokenizer "
                                 "files to the source folder")
        if self.kind == "gguf":
            copy_tokenizer_metadata(writer, self.metadata, self.types)
            return f"tokenizer: copied from {self.origin}"
        chosen = _sentencepiece_files(self.files)
        if chosen is not None:
            add_sentencepiece_metadata(writer, chosen)
            said = f"tokenizer: SentencePiece {chosen.name}"
            if self.chat_template is None and _pieces(chosen) in MISTRAL_TEMPLATES:
                writer.add_chat_template(MISTRAL_TEMPLATES[_pieces(chosen)])
                said += " + a Mistral [INST] chat template"
        elif any(f.name == "tokenizer.json" for f in self.files):
            add_bpe_metadata(writer, self.files[0].parent, vocab_size)
            said = "tokenizer: byte-level BPE of tokenizer.json"
        else:
            kinds = ", ".join(f.name for f in self.files)
            raise TokenizerError(f"{self.origin}: tokenizer {kinds} cannot be written to GGUF "
                                 "(tekken.json, Mistral's tiktoken-based BPE, has no GGUF "
                                 "writer here yet; supported: tokenizer.model, a byte-level "
                                 "BPE tokenizer.json)")
        template = self.chat_template
        if template is not None:
            writer.add_chat_template(template)
        return said


def _write_hf_files(metadata: dict[str, Any], origin: str, out: Path) -> list[str]:
    """tokenizer.json + tokenizer_config.json (with the chat template) of a tokenizer given
    as GGUF metadata, for transformers' PreTrainedTokenizerFast and our HFTokenizer."""
    tok = GGUFTokenizer.from_metadata(metadata, origin)
    tokens = metadata["tokenizer.ggml.tokens"]
    backend = tok.backend
    if tok.bos_id is not None:   # transformers adds BOS through the post-processor
        from tokenizers import processors

        bos = tokens[tok.bos_id]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)])
    backend.save(str(out / "tokenizer.json"))
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokens[tok.eos_id],
        "add_bos_token": tok.bos_id is not None,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    if isinstance(bos_id, int) and 0 <= bos_id < len(tokens):
        config["bos_token"] = tokens[bos_id]
    if tok.has_own_chat_template:
        config["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]


class _Metadata:
    """Collects what `add_sentencepiece_metadata` writes into a GGUF writer as a dict of
    GGUF keys (the form `GGUFTokenizer.from_metadata` reads)."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}

    def __getattr__(self, method: str) -> Any:
        key = {"add_tokenizer_model": "model", "add_token_list": "tokens",
               "add_token_scores": "scores", "add_token_types": "token_type",
               "add_bos_token_id": "bos_token_id", "add_eos_token_id": "eos_token_id",
               "add_unk_token_id": "unknown_token_id", "add_add_bos_token": "add_bos_token",
               "add_add_space_prefix": "add_space_prefix"}[method]
        return lambda value: self.keys.__setitem__(f"tokenizer.ggml.{key}", value)


def _spm_metadata(spm_file: Path) -> dict[str, Any]:
    collect = _Metadata()
    add_sentencepiece_metadata(collect, spm_file)
    return collect.keys


def _sentencepiece_files(files: list[Path]) -> Path | None:
    """The SentencePiece file among a folder's tokenizer files (`tokenizer.model.v3` over
    `tokenizer.model`), or None."""
    spm = [f for f in files if f.name.startswith("tokenizer.model") or
           f.name.endswith((".model.v1", ".model.v3"))]
    return max(spm, key=lambda f: f.name) if spm else None


def _pieces(spm_file: Path) -> int:
    from sentencepiece import SentencePieceProcessor

    return int(SentencePieceProcessor(model_file=str(spm_file)).get_piece_size())


def _mistral_name(file: Path) -> str:
    """The name a mistral-common tokenizer file takes in a checkpoint folder: its version
    suffix kept (`tokenizer.model.v3`), so `find_mistral_file` reads the right version."""
    if file.name.startswith("tokenizer.model") or file.name == "tekken.json":
        return file.name
    return "tokenizer.model." + file.name.rsplit(".", 1)[-1]
