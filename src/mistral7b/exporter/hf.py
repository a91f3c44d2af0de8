"""`--to hf`: a folder transformers loads with `AutoModelForCausalLM.from_pretrained`.

    config.json                       MistralForCausalLM (a sliding window, or a Mistral
                                      source) or LlamaForCausalLM, with head_dim, GQA heads,
                                      rope_theta, sliding_window, tied embeddings
    generation_config.json            BOS / EOS ids
    model.safetensors                 one file up to `shard_bytes`, else
    model-0000i-of-0000n.safetensors  shards + model.safetensors.index.json (HF's layout)
    tokenizer files                   export/tokenizer.py

q/k rows are permuted into HF's half-split rotary layout (`interleaved_to_hf`, the inverse of
what the HF reader undoes), so the rotary HF applies equals ours and the logits agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mistral7b.config import ModelConfig
from mistral7b.exporter.source import MergedSource
from mistral7b.exporter.tokenizer import SourceTokenizer
from mistral7b.weights.names import format_name, interleaved_to_hf, rotary_heads
from mistral7b.weights.safetensors_write import Entry, StreamWriter

DEFAULT_SHARD_BYTES = 5 * 10**9     # transformers' `save_pretrained` default shard size
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def write_hf(source: MergedSource, out: Path, dtype: torch.dtype, tokenizer: SourceTokenizer,
             step: Callable[[str], None], shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write the HF folder `out` (exists, empty); returns lines for the log."""
    c = source.config
    entries = [Entry(format_name(n, "hf"), dtype, s) for n, s in source.shapes.items()]
    shards = _shards(entries, shard_bytes)
    weight_map = {}
    ours = dict(zip([e.name for e in entries], source.names))
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else \
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with (out / file).open("wb") as f:
            writer = StreamWriter(f, shard, {"format": "pt"})
            for e in shard:
                name = ours[e.name]
                t = source.tensor(name)
                heads = rotary_heads(name, c)
                out_t = t.to(dtype)
                if heads is not None:
                    out_t = interleaved_to_hf(out_t, heads)
                writer.write(e.name, out_t)
                source.done(name, t)
                del out_t
                step(name)
        weight_map.update({e.name: file for e in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    said = tokenizer.write_files(out, "hf")
    bos, eos = _special_ids(out)
    config = hf_config(c, _model_type(source), dtype, bos, eos)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return [f"{len(shards)} safetensors file(s), {config['architectures'][0]}", said]


def hf_config(c: ModelConfig, model_type: str, dtype: torch.dtype, bos: int | None,
              eos: int | None) -> dict[str, Any]:
    """config.json of a MistralForCausalLM ("mistral") or LlamaForCausalLM ("llama").
    rope_theta is written both top-level (transformers 4) and in `rope_parameters` (5)."""
    config: dict[str, Any] = {
        "architectures": ["MistralForCausalLM" if model_type == "mistral"
                          else "LlamaForCausalLM"],
        "model_type": model_type,
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seq_len,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tied_embeddings,
        "attention_dropout": 0.0,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    if model_type == "mistral":
        config["sliding_window"] = c.sliding_window
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config


def _model_type(source: MergedSource) -> str:
    """"mistral" for a model with a sliding window (Llama has none) or a Mistral source; an
    HF source keeps its own type, a GGUF source follows its architecture name."""
    if source.config.sliding_window is not None:
        return "mistral"
    path = Path(source.reader.path)
    if source.reader.format == "hf":
        kind = json.loads((path / "config.json").read_text()).get("model_type")
        return "llama" if kind == "llama" else "mistral"
    if source.reader.format == "gguf":
        arch = getattr(source.reader, "metadata", {}).get("general.architecture")
        return "mistral" if arch == "mistral" else "llama"
    return "mistral"


def _special_ids(out: Path) -> tuple[int | None, int | None]:
    """BOS and EOS ids of the tokenizer just written to `out` (None, None without one)."""
    from mistral7b.errors import TokenizerError
    from mistral7b.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(out)
    except TokenizerError:
        return None, None
    bos = tok.bos_id
    return bos, tok.eos_id


def _shards(entries: list[Entry], limit: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards
