"""Tokenizers and chat encoding: one interface (`Tokenizer`), three sources, one factory.

from mistral7b.tokenizer import load_tokenizer
tok = load_tokenizer("path/to/Mistral-7B-Instruct-v0.3")   # or a .gguf file
ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mistral7b.errors import TokenizerError
from mistral7b.tokenizer.base import SAFE_PROMPT, IncrementalDecoder, StreamDecoder, Tokenizer
from mistral7b.tokenizer.gguf import GGUFTokenizer
from mistral7b.tokenizer.hf import HFTokenizer
from mistral7b.tokenizer.mistral import MistralTokenizer, find_mistral_file

__all__ = [
    "SAFE_PROMPT",
    "GGUFTokenizer",
    "HFTokenizer",
    "IncrementalDecoder",
    "MistralTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "load_tokenizer",
]

_MISTRAL_MODEL_TYPES = ("mistral", "mixtral")


def load_tokenizer(source: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a model file or folder.

    - a `.gguf` file: `GGUFTokenizer` from its metadata;
    - a tokenizer file (`tokenizer.model*`, `tekken.json`): `MistralTokenizer`;
      `tokenizer.json`: `HFTokenizer` of its folder;
    - a folder: `MistralTokenizer` when it holds `tekken.json` or `tokenizer.model.vN`, or
      a `tokenizer.model` of a Mistral checkpoint (params.json beside it, or config.json
      saying model_type mistral/mixtral with no chat template or an `[INST]` one, or no
      tokenizer.json), so that Mistral chat is mistral-common's; else `HFTokenizer` when it holds `tokenizer.json`
      (Llama, SmolLM2, ... with their own chat template).
    """
    path = Path(source)
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFTokenizer.from_file(path)
        if path.name == "tokenizer.json":
            return HFTokenizer.from_folder(path.parent)
        if path.name.startswith("tokenizer.model") or _is_tekken(path):
            return MistralTokenizer.from_file(path)
        raise TokenizerError(
            f"{path}: not a tokenizer file (expected a .gguf file, tokenizer.json, "
            "tokenizer.model[.vN] or tekken.json)"
        )
    if not path.is_dir():
        raise TokenizerError(f"{path}: no such file or folder")
    mistral_file = find_mistral_file(path)
    has_hf = (path / "tokenizer.json").is_file()
    if mistral_file is not None and (mistral_file.name != "tokenizer.model" or not has_hf):
        return MistralTokenizer.from_file(mistral_file)
    if mistral_file is not None and _is_mistral_checkpoint(path):
        return MistralTokenizer.from_file(mistral_file)
    if has_hf:
        return HFTokenizer.from_folder(path)
    raise TokenizerError(
        f"{path}: no tokenizer found; looked for tekken.json, tokenizer.model.vN, "
        "tokenizer.model and tokenizer.json"
    )


def _is_mistral_checkpoint(folder: Path) -> bool:
    """A consolidated Mistral folder, or an HF one of a Mistral model that keeps Mistral's
    `[INST]` format (a fine-tune with another chat template, e.g. Zephyr, is not)."""
    if (folder / "params.json").is_file():
        return True
    model_type = _json_field(folder / "config.json", "model_type")
    if model_type not in _MISTRAL_MODEL_TYPES:
        return False
    template = _json_field(folder / "tokenizer_config.json", "chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template is None or "[INST]" in str(template)


def _json_field(path: Path, key: str) -> object:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def _is_tekken(path: Path) -> bool:
    return path.suffix == ".json" and "tekken" in path.name
