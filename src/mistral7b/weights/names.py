"""The one table that maps every checkpoint format's tensor names onto ours, and the HF q/k
row permutation. Our names are those of Mistral's consolidated files (the model's own).

    ours                                  HF (transformers)                          GGUF
    tok_embeddings.weight                 model.embed_tokens.weight                  token_embd.weight
    norm.weight                           model.norm.weight                          output_norm.weight
    output.weight                         lm_head.weight                             output.weight
    layers.{i}.attention_norm.weight      model.layers.{i}.input_layernorm.weight    blk.{i}.attn_norm.weight
    layers.{i}.attention.wq.weight        model.layers.{i}.self_attn.q_proj.weight   blk.{i}.attn_q.weight
    ...                                   (see _PER_LAYER)
"""

from __future__ import annotations

import re

import torch

from mistral7b.config import ModelConfig

# (ours, hf, gguf); {i} is the layer index.
_GLOBAL = [
    ("tok_embeddings.weight", "model.embed_tokens.weight", "token_embd.weight"),
    ("norm.weight", "model.norm.weight", "output_norm.weight"),
    ("output.weight", "lm_head.weight", "output.weight"),
]
_PER_LAYER = [
    ("attention_norm.weight", "input_layernorm.weight", "attn_norm.weight"),
    ("attention.wq.weight", "self_attn.q_proj.weight", "attn_q.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight", "attn_k.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight", "attn_v.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight", "attn_output.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight", "ffn_norm.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight", "ffn_gate.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight", "ffn_down.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight", "ffn_up.weight"),
]
_PREFIX = {"ours": "layers.{i}.", "hf": "model.layers.{i}.", "gguf": "blk.{i}."}
_COLUMN = {"ours": 0, "hf": 1, "gguf": 2}

# A block's seven linear layers, as module paths inside `layers.{i}`: what LoRA adapts and
# quantization replaces (with `output`, outside the blocks). Their other names are their rows
# of _PER_LAYER.
LINEAR_LAYERS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def _build_map(fmt: str) -> dict[str, str]:
    """Our name pattern -> the format's name pattern (with {i})."""
    col = _COLUMN[fmt]
    table = {row[0]: row[col] for row in _GLOBAL}
    for row in _PER_LAYER:
        table["layers.{i}." + row[0]] = _PREFIX[fmt] + row[col]
    return table


_TO_FORMAT = {fmt: _build_map(fmt) for fmt in ("hf", "gguf")}
_LAYER_RE = re.compile(r"(\d+)")
_BLOCK_WEIGHT_RE = re.compile(r"layers\.\d+\.(.+)\.weight")


def format_name(ours: str, fmt: str) -> str:
    """`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight` (fmt='hf')."""
    if fmt == "ours":
        return ours
    pattern = _LAYER_RE.sub("{i}", ours, count=1)
    target = _TO_FORMAT[fmt][pattern]
    match = _LAYER_RE.search(ours)
    return target.format(i=match.group(1)) if match else target


def is_linear_weight(name: str) -> bool:
    """`layers.3.attention.wq.weight` and `output.weight` are; norms and embeddings are not."""
    match = _BLOCK_WEIGHT_RE.fullmatch(name)
    return name == "output.weight" or (match is not None and match[1] in LINEAR_LAYERS)


def hf_module(path: str) -> str:
    """The last HF module name of a linear layer: `attention.wq` -> `q_proj` (PEFT's
    `target_modules` names)."""
    return format_name(f"layers.0.{path}.weight", "hf").split(".")[-2]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, in our naming, with its shape (out, in) for this config."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (c.vocab_size, c.dim),
        "norm.weight": (c.dim,),
    }
    if not c.tied_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (c.dim,)
        shapes[p + "attention.wq.weight"] = (c.n_heads * c.head_dim, c.dim)
        shapes[p + "attention.wk.weight"] = (c.n_kv_heads * c.head_dim, c.dim)
        shapes[p + "attention.wv.weight"] = (c.n_kv_heads * c.head_dim, c.dim)
        shapes[p + "attention.wo.weight"] = (c.dim, c.n_heads * c.head_dim)
        shapes[p + "ffn_norm.weight"] = (c.dim,)
        shapes[p + "feed_forward.w1.weight"] = (c.hidden_dim, c.dim)
        shapes[p + "feed_forward.w2.weight"] = (c.dim, c.hidden_dim)
        shapes[p + "feed_forward.w3.weight"] = (c.hidden_dim, c.dim)
    return shapes


def rotary_heads(ours: str, config: ModelConfig) -> int | None:
    """Number of heads whose rows need the HF rotary permutation, or None for other tensors."""
    if ours.endswith("attention.wq.weight"):
        return config.n_heads
    if ours.endswith("attention.wk.weight"):
        return config.n_kv_heads
    return None


def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row permutation (half-split rotary -> interleaved pairs), per head.

    Within a head of Dh rows, HF row r < Dh/2 is original row 2r and HF row Dh/2 + r is
    original row 2r + 1. Works on the leading dimension, so it also applies to a LoRA B.
    """
    rows, rest = w.shape[0], w.shape[1:]
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows, *rest)


def interleaved_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `hf_to_interleaved`: our layout -> HF's (for exporting)."""
    rows, rest = w.shape[0], w.shape[1:]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)
