"""Small valid model files for the fuzzer to mutate, written here (no download, no transformers).

One tiny decoder (dim 32, 2 layers, 4 query / 2 kv heads, window 16) with random weights, in
every format mistral7b reads:

    gguf_f32/m.gguf        F32 tensors + a byte-level BPE tokenizer and a ChatML template
    gguf_q/m.gguf          the same with Q8_0 / Q4_1 / Q4_0 / Q5_0 blocks (scale checks)
    hf/                    config.json + model.safetensors (HF names)
    consolidated/          params.json + consolidated.safetensors (our names)

The tokenizer: GPT-2's 256 byte symbols, a few merges, and the ChatML control tokens, so that
chat templates, special-token parsing and UTF-8 handling are all on the fuzzed path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DIM, N_LAYERS, N_HEADS, N_KV, HEAD_DIM, HIDDEN, WINDOW, CONTEXT = 32, 2, 4, 2, 8, 64, 16, 8192
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]

# (ours, HF, GGUF) names of the per-layer tensors and their (out, in) shapes
_LAYER = [
    ("attention_norm.weight", "input_layernorm.weight", "attn_norm.weight", (DIM,)),
    ("attention.wq.weight", "self_attn.q_proj.weight", "attn_q.weight", (N_HEADS * HEAD_DIM, DIM)),
    ("attention.wk.weight", "self_attn.k_proj.weight", "attn_k.weight", (N_KV * HEAD_DIM, DIM)),
    ("attention.wv.weight", "self_attn.v_proj.weight", "attn_v.weight", (N_KV * HEAD_DIM, DIM)),
    ("attention.wo.weight", "self_attn.o_proj.weight", "attn_output.weight",
     (DIM, N_HEADS * HEAD_DIM)),
    ("ffn_norm.weight", "post_attention_layernorm.weight", "ffn_norm.weight", (DIM,)),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight", "ffn_gate.weight", (HIDDEN, DIM)),
    ("feed_forward.w2.weight", "mlp.down_proj.weight", "ffn_down.weight", (DIM, HIDDEN)),
    ("feed_forward.w3.weight", "mlp.up_proj.weight", "ffn_up.weight", (HIDDEN, DIM)),
]


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the seed tokenizer."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    unused = [f"<unused{i}>" for i in range(8)]  # 272 tokens: int4 wants rows % 16 == 0
    tokens = SPECIALS + alphabet + [a + b for a, b in _MERGES] + unused
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - len(unused)) + [5] * 8
    return tokens, types, [f"{a} {b}" for a, b in _MERGES]


def weights(seed: int = 0) -> dict[str, tuple[np.ndarray, str, str]]:
    """ours -> (float32 array, HF name, GGUF name)."""
    rng = np.random.default_rng(seed)
    vocab = len(vocabulary()[0])

    def w(shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) == 1:
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    out = {
        "tok_embeddings.weight": (w((vocab, DIM)), "model.embed_tokens.weight",
                                  "token_embd.weight"),
        "norm.weight": (w((DIM,)), "model.norm.weight", "output_norm.weight"),
        "output.weight": (w((vocab, DIM)), "lm_head.weight", "output.weight"),
    }
    for i in range(N_LAYERS):
        for ours, hf, gg, shape in _LAYER:
            out[f"layers.{i}.{ours}"] = (w(shape), f"model.layers.{i}.{hf}", f"blk.{i}.{gg}")
    return out


def write_gguf(path: Path, *, quantized: bool = False, tokenizer: dict | None = None,
               metadata: dict | None = None) -> Path:
    """The seed GGUF. `tokenizer` / `metadata` replace (or with value None drop) keys:
    tokenizer keys by their short name ("tokens", "eos_token_id", "chat_template", ...),
    metadata keys by full name with a (value, GGUFValueType) pair."""
    import logging

    import gguf

    logging.getLogger("gguf").setLevel(logging.ERROR)  # "Duplicated key name": on purpose
    tokens, types, merges = vocabulary()
    tok: dict = {"model": "gpt2", "pre": "gpt2", "tokens": tokens, "token_type": types,
                 "merges": merges, "bos_token_id": 1, "eos_token_id": 2,
                 "add_bos_token": False, "chat_template": CHATML}
    tok.update(tokenizer or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    plain = {
        "llama.block_count": N_LAYERS, "llama.context_length": CONTEXT,
        "llama.embedding_length": DIM, "llama.feed_forward_length": HIDDEN,
        "llama.attention.head_count": N_HEADS, "llama.attention.head_count_kv": N_KV,
        "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.attention.sliding_window": WINDOW,
    }
    metadata = metadata or {}
    for key, value in plain.items():
        if key in metadata:
            continue
        if isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for key, pair in metadata.items():
        if pair is not None:
            w.add_key_value(key, pair[0], pair[1])
    adders = {"model": w.add_tokenizer_model, "pre": w.add_tokenizer_pre,
              "tokens": w.add_token_list, "token_type": w.add_token_types,
              "merges": w.add_token_merges, "bos_token_id": w.add_bos_token_id,
              "eos_token_id": w.add_eos_token_id, "add_bos_token": w.add_add_bos_token,
              "chat_template": w.add_chat_template, "scores": w.add_token_scores}
    for name, value in tok.items():
        if value is None:
            continue
        if name in adders:
            adders[name](value)
        else:  # a key the writer has no helper for: as a raw key/value
            w.add_key_value(f"tokenizer.ggml.{name}", *value)
    qtypes = [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1,
              gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q5_0]
    for k, (_, (arr, _, name)) in enumerate(weights().items()):
        if quantized and arr.ndim == 2:
            qtype = qtypes[k % len(qtypes)]
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_config() -> dict:
    return {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": DIM, "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV, "head_dim": HEAD_DIM, "intermediate_size": HIDDEN,
        "vocab_size": len(vocabulary()[0]), "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "sliding_window": WINDOW, "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": False,
    }


def params_json() -> dict:
    return {"dim": DIM, "n_layers": N_LAYERS, "head_dim": HEAD_DIM, "hidden_dim": HIDDEN,
            "n_heads": N_HEADS, "n_kv_heads": N_KV, "norm_eps": 1e-5,
            "vocab_size": len(vocabulary()[0]), "rope_theta": 10000.0,
            "sliding_window": WINDOW, "max_seq_len": CONTEXT}


def write_hf(folder: Path) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(), indent=1))
    save_file({hf: arr for arr, hf, _ in weights().values()}, str(folder / "model.safetensors"))
    return folder


def write_consolidated(folder: Path) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params_json(), indent=1))
    save_file({ours: arr for ours, (arr, _, _) in weights().items()},
              str(folder / "consolidated.safetensors"))
    return folder


def write_all(root: Path) -> dict[str, Path]:
    """Every seed under `root`: name -> the path `mistral7b.load` takes."""
    return {
        "gguf_f32": write_gguf(root / "gguf_f32" / "m.gguf"),
        "gguf_q": write_gguf(root / "gguf_q" / "m.gguf", quantized=True),
        "hf": write_hf(root / "hf"),
        "consolidated": write_consolidated(root / "consolidated"),
    }
