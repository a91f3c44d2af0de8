"""Tiny random Mistral models built inside the tests, and writers for every checkpoint format.

The writers convert HF's layout with their own index arithmetic (not the package's), so a
wrong permutation in the package cannot be cancelled by the same mistake here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

HF_TO_OURS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_HF_TO_OURS = {
    "input_layernorm": "attention_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
LAYER_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.down_proj": "ffn_down",
    "mlp.up_proj": "ffn_up",
}


def hf_mistral(*, vocab: int = 96, dim: int = 64, n_layers: int = 2, n_heads: int = 4,
               n_kv_heads: int = 2, head_dim: int = 16, hidden: int = 96,
               window: int | None = 8, theta: float = 10000.0, tie: bool = False,
               max_pos: int = 512, seed: int = 0):
    """A float32 HF MistralForCausalLM with weights large enough that logits discriminate."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
        sliding_window=window, rope_theta=theta, max_position_embeddings=max_pos,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, attn_implementation="eager",
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.dim() == 2:
                fan_in = p.shape[1]
                p.copy_(torch.randn_like(p) * (1.5 / fan_in**0.5))
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """HF's logits computed in float64 (on a copy), so a comparison holds only our error."""
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).double()(torch.tensor([ids])).logits[0]


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF half-split rows -> interleaved rows, by explicit index lists (DESIGN §2.6)."""
    head_dim = w.shape[0] // n_heads
    order = []
    for h in range(n_heads):
        base = h * head_dim
        for r in range(head_dim // 2):
            order.append(base + r)                   # original row 2r     = HF row r
            order.append(base + head_dim // 2 + r)   # original row 2r + 1 = HF row Dh/2 + r
    return w[order]


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def save_hf(model, folder: Path, max_shard_size: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def consolidated_state(model) -> dict[str, np.ndarray]:
    cfg = model.config
    out = {}
    for name, w in _state(model).items():
        if name in HF_TO_OURS:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            out[HF_TO_OURS[name]] = w
            continue
        parts = name.split(".")  # model.layers.{i}.<module...>.weight
        i, module = parts[2], ".".join(parts[3:-1])
        if module == "self_attn.q_proj":
            w = _unpermute(w, cfg.num_attention_heads)
        elif module == "self_attn.k_proj":
            w = _unpermute(w, cfg.num_key_value_heads)
        out[f"layers.{i}.{LAYER_HF_TO_OURS[module]}.weight"] = w
    return out


def params_json(model) -> dict:
    cfg = model.config
    params = {
        "dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "head_dim": cfg.head_dim,
        "hidden_dim": cfg.intermediate_size, "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads, "norm_eps": cfg.rms_norm_eps,
        "vocab_size": cfg.vocab_size, "rope_theta": _theta(cfg),
    }
    if cfg.sliding_window:
        params["sliding_window"] = cfg.sliding_window
    return params


def _theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    return float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def save_consolidated(model, folder: Path, fmt: str = "safetensors") -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params_json(model)))
    state = consolidated_state(model)
    if fmt == "safetensors":
        save_file(state, str(folder / "consolidated.safetensors"))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in state.items()},
                   folder / "consolidated.00.pth")
    return folder


def save_gguf(model, path: Path, raw: dict | None = None) -> Path:
    """An F32 GGUF of `model`; `raw` maps GGUF tensor names to (block bytes, quant type) to
    store instead of the float tensor."""
    import gguf

    raw = raw or {}
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    gguf_names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                  "output.weight": "output.weight"}
    for ours, arr in consolidated_state(model).items():
        if ours in gguf_names:
            name = gguf_names[ours]
        else:
            _, i, *rest = ours.split(".")
            module = ".".join(rest[:-1])
            hf_module = {v: k for k, v in LAYER_HF_TO_OURS.items()}[module]
            name = f"blk.{i}.{LAYER_HF_TO_GGUF[hf_module]}.weight"
        if name in raw:
            blocks, qtype = raw[name]
            w.add_tensor(name, blocks, raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def mistral_v3_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny random model with Mistral 7B v0.3's 32768-token vocabulary and its v3 tokenizer
    (the file mistral-common ships, as `tokenizer.model.v3`): chat, tools and structured
    output then go through mistral-common's encoding."""
    import shutil

    import mistral_common

    model = hf_mistral(vocab=32768, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                       hidden=64, window=None, theta=1e6, seed=seed)
    save_consolidated(model, folder)
    shipped = Path(mistral_common.__file__).parent / "data" / \
        "mistral_instruct_tokenizer_240323.model.v3"
    shutil.copy(shipped, folder / "tokenizer.model.v3")
    return folder


# Bytes per super-block of each K-quant and where its float16 factors (d, dmin) sit in it
# (ggml's block_q4_K / block_q5_K / block_q6_K).
K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def random_k_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator,
                    scale: tuple[float, float] = (0.002, 0.01)) -> np.ndarray:
    """(rows, cols / 256 * block bytes) random valid K-quant blocks (gguf-py only dequantizes
    K-quants): every value, sub-block scale and min random, the float16 factors drawn from
    `scale`, so that the weights are finite and small."""
    size, factors = K_BLOCKS[kind]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    for at in factors:
        d = rng.uniform(*scale, size=(rows, cols // 256)).astype(np.float16)
        blocks[:, :, at: at + 2] = d.view(np.uint8).reshape(rows, cols // 256, 2)
    return blocks.reshape(rows, -1)


def k_quant_gguf(path: Path) -> tuple[Path, dict]:
    """A tiny GGUF (shapes of 256 inputs) whose linears are random K-quants of every kind
    and whose embedding table is Q4_K; returns the path and the raw {GGUF name: (blocks,
    type)} it holds."""
    import gguf

    model = hf_mistral(dim=256, hidden=256, n_heads=4, n_kv_heads=2, head_dim=64, vocab=128,
                       seed=5)
    rng = np.random.default_rng(6)
    qt = gguf.GGMLQuantizationType
    kinds = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
             "ffn_gate": "Q4_K", "ffn_up": "Q5_K", "ffn_down": "Q6_K"}
    raw = {"token_embd.weight": (random_k_blocks("Q4_K", 128, 256, rng, (1e-3, 4e-3)),
                                 qt.Q4_K)}
    for layer in range(2):
        for name, kind in kinds.items():
            rows = 128 if name in ("attn_k", "attn_v") else 256
            raw[f"blk.{layer}.{name}.weight"] = (
                random_k_blocks(kind, rows, 256, rng, (1e-4, 4e-4)), qt[kind])
    return save_gguf(model, path, raw=raw), raw
