"""What a model on disk is, read from its headers without loading weights: the columns of
`mistral7b list` (`summary`) and the page of `mistral7b show` (`details`)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral7b.errors import Mistral7BError
from mistral7b.weights.base import CheckpointReader

# (file, what it is) of LoRA adapters, as lora/files.py reads them.
_ADAPTER_MARKERS = ("adapter_config.json", "lora.safetensors")


@dataclass
class Summary:
    format: str                       # "gguf" | "hf" | "consolidated" | "?" (unreadable)
    quantization: str                 # "Q4_1", "int4 (mistral7b quantize)", "BF16", ...
    n_params: int | None
    error: str | None = None          # why the files could not be read


@dataclass
class Details:
    summary: Summary
    config: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "none (the model takes token ids only)"
    chat_format: str = "none"
    adapters: list[str] = field(default_factory=list)


def summary(path: Path) -> Summary:
    from mistral7b.weights import open_checkpoint

    try:
        reader = open_checkpoint(path)
    except Mistral7BError as exc:
        return Summary("?", "?", None, str(exc))
    try:
        return Summary(reader.format, quantization(reader), reader.config.n_params)
    finally:
        reader.close()


def quantization(reader: CheckpointReader) -> str:
    """How the linear weights are stored: the GGUF type holding most parameters, our
    quantized checkpoint's mode, or the safetensors dtype."""
    from mistral7b.quant import stored_quant
    from mistral7b.weights.gguf_file import GGUFReader

    if isinstance(reader, GGUFReader):
        count: Counter[str] = Counter()
        for t in reader.header.tensors.values():
            if len(t.shape) == 2:
                count[t.type.name] += t.shape[0] * t.shape[1]
        return count.most_common(1)[0][0] if count else "?"
    stored = stored_quant(reader)
    if stored is not None:
        return f"{stored} (mistral7b quantize)"
    return _safetensors_dtype(Path(reader.source("tok_embeddings.weight")))


def _safetensors_dtype(file: Path) -> str:
    """The dtype of the weights' file (the one holding the embedding: not an adapter's
    .safetensors lying beside it)."""
    from safetensors import safe_open

    if file.suffix != ".safetensors":
        return "?"                     # a .pth checkpoint: not unpickled just to list it
    with safe_open(str(file), framework="pt") as handle:
        keys = list(handle.keys())
        return handle.get_slice(keys[0]).get_dtype() if keys else "?"


def details(path: Path) -> Details:
    """Everything `show` prints; the tokenizer is read, the weights are not."""
    from mistral7b.api import checkpoint_tokenizer
    from mistral7b.weights import open_checkpoint

    reader = open_checkpoint(path)     # a broken model is an error here, not a row
    try:
        out = Details(Summary(reader.format, quantization(reader), reader.config.n_params))
        out.config = dataclasses.asdict(reader.config)
        tokenizer = checkpoint_tokenizer(reader)
    finally:
        reader.close()
    if tokenizer is not None:
        out.tokenizer, out.chat_format = describe_tokenizer(tokenizer)
    out.adapters = adapters_beside(path)
    return out


def describe_tokenizer(tokenizer: Any) -> tuple[str, str]:
    """(what the tokenizer is, which chat format encode_chat uses)."""
    from mistral7b.tokenizer import GGUFTokenizer, HFTokenizer, MistralTokenizer

    if isinstance(tokenizer, MistralTokenizer):
        return (f"mistral-common {tokenizer.version} ({tokenizer.path.name})",
                f"Mistral {tokenizer.version} instruct format (mistral-common)")
    kind = "GGUF-embedded" if isinstance(tokenizer, GGUFTokenizer) else "HF tokenizer.json"
    text = f"{kind}, {tokenizer.vocab_size} tokens"
    if isinstance(tokenizer, GGUFTokenizer) and tokenizer.uses_mistral_common:
        return text, "Mistral instruct format of its vocabulary (mistral-common)"
    if isinstance(tokenizer, HFTokenizer):
        if not tokenizer.has_own_chat_template:
            return text, "ChatML (the model has no chat template)"
        template = tokenizer.chat_template
        kind = "ChatML" if "<|im_start|>" in template else \
            "[INST]" if "[INST]" in template else "Jinja"
        return text, f"its own chat template ({kind}, {len(template)} characters)"
    return text, "?"


def adapters_beside(path: Path) -> list[str]:
    """LoRA adapters in the model's folder (or the GGUF's folder), one level down."""
    folder = path if path.is_dir() else path.parent
    found = []
    for candidate in sorted([folder, *[p for p in folder.iterdir() if p.is_dir()]]):
        for marker in _ADAPTER_MARKERS:
            if (candidate / marker).is_file():
                found.append(str(candidate if marker == "adapter_config.json"
                                 else candidate / marker))
    return found
