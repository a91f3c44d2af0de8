"""Write a random-weight Mistral-7B-shaped checkpoint in bf16, streaming one tensor at a time
(peak memory: one tensor), as consolidated safetensors or as sharded HF safetensors.

    python bench/write_random_checkpoint.py /data/m7b-consolidated --format consolidated
    python bench/write_random_checkpoint.py /data/m7b-hf --format hf --shard-gb 5

The safetensors layout (8-byte little-endian header size, JSON header with dtype/shape/
data_offsets, then raw data) is written directly so that nothing but the current tensor is
ever in memory; `safetensors.safe_open` reads the result back (checked at the end).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mistral7b.config import PRESETS, ModelConfig
from mistral7b.weights.names import expected_shapes, format_name


def tensor_plan(config: ModelConfig, fmt: str) -> list[tuple[str, tuple[int, ...]]]:
    names = "ours" if fmt == "consolidated" else "hf"
    return [(format_name(n, names), s) for n, s in expected_shapes(config).items()]


def write_safetensors(path: Path, plan: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    header, offset = {}, 0
    for name, shape in plan:
        nbytes = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    gen = torch.Generator().manual_seed(seed)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in plan:
            std = 1.0 if len(shape) == 1 else shape[1] ** -0.5
            t = (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.bfloat16)
            f.write(t.view(torch.int16).numpy().tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--format", choices=["consolidated", "hf"], required=True)
    ap.add_argument("--preset", default="mistral-7b-v0.1", choices=sorted(PRESETS))
    ap.add_argument("--shard-gb", type=float, default=5.0)
    args = ap.parse_args()
    config = PRESETS[args.preset]
    args.out.mkdir(parents=True, exist_ok=True)
    plan = tensor_plan(config, args.format)
    if args.format == "consolidated":
        params = {k: v for k, v in config.to_dict().items()
                  if k not in ("max_seq_len", "tied_embeddings")}
        (args.out / "params.json").write_text(json.dumps(params, indent=1))
        write_safetensors(args.out / "consolidated.safetensors", plan, seed=0)
    else:
        hf_config = {
            "architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "hidden_size": config.dim, "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
            "head_dim": config.head_dim, "intermediate_size": config.hidden_dim,
            "rms_norm_eps": config.norm_eps, "vocab_size": config.vocab_size,
            "rope_theta": config.rope_theta, "sliding_window": config.sliding_window,
            "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
        (args.out / "config.json").write_text(json.dumps(hf_config, indent=1))
        limit = int(args.shard_gb * 1e9)
        shards, current, size = [], [], 0
        for name, shape in plan:
            nbytes = 2 * int(torch.Size(shape).numel())
            if current and size + nbytes > limit:
                shards.append(current)
                current, size = [], 0
            current.append((name, shape))
            size += nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(args.out / fname, shard, seed=i)
            weight_map.update({name: fname for name, _ in shard})
        index = {"metadata": {"total_size": sum(2 * torch.Size(s).numel() for _, s in plan)},
                 "weight_map": weight_map}
        (args.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    print(args.out)


if __name__ == "__main__":
    main()
