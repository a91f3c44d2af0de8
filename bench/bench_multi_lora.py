"""Cost of per-row LoRA adapters in one decode step: B rows of the base model alone, against
the same B rows spread over the base and N served adapters (rank 16 on all seven
projections), on the same engine, after a 64-token pre-fill per row.

    python bench/bench_multi_lora.py -t 2                   # default model, 8 rows, 2 adapters

Medians of --steps decode steps each, alternating the two kinds so drift hits both.
Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mistral7b
from mistral7b.cache import BlockTable
from mistral7b.lora import adapter_from_model, apply_lora, lora_parameters, save_peft


def write_adapter(model: str, path: Path, seed: int, rank: int) -> Path:
    llm = mistral7b.load(model)
    apply_lora(llm.model, rank=rank, alpha=2 * rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(llm.model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    save_peft(adapter_from_model(llm.model), path, llm.config)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default="default")
    p.add_argument("-t", "--threads", type=int)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--adapters", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_adapter(args.model, Path(tmp) / f"a{i}", i, args.rank)
                 for i in range(args.adapters)]
        llm = mistral7b.load(args.model)
        for i, path in enumerate(paths):
            llm.add_adapter(f"a{i}", path)
    engine = llm.engine
    mixed = [i % (args.adapters + 1) for i in range(args.rows)]
    kinds = {"base": [0] * args.rows, "mixed": mixed}
    tables = {k: [BlockTable() for _ in range(args.rows)] for k in kinds}
    for k, adapters in kinds.items():        # a 64-token context per row
        engine.step(tables[k], [[(7 * b + j) % 1000 + 10 for j in range(64)]
                                for b in range(args.rows)], adapters=adapters)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for step in range(args.steps):
        for k, adapters in kinds.items():
            t0 = time.perf_counter()
            engine.step(tables[k], [[(step + b) % 1000 + 10] for b in range(args.rows)],
                        adapters=adapters)
            times[k].append(time.perf_counter() - t0)
    base, mix = statistics.median(times["base"]), statistics.median(times["mixed"])
    print(f"model {args.model}, {args.rows} rows, threads {torch.get_num_threads()}, "
          f"{args.adapters} adapters of rank {args.rank} on all projections")
    print("| rows | decode step ms (median) | tok/s | vs base |")
    print("|---|---:|---:|---:|")
    print(f"| all base | {base * 1000:.1f} | {args.rows / base:.1f} | 1.00x |")
    print(f"| base + {args.adapters} adapters ({mixed}) | {mix * 1000:.1f} | "
          f"{args.rows / mix:.1f} | {base / mix:.2f}x |")


if __name__ == "__main__":
    main()
