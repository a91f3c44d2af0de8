"""FSDP2 fine-tuning on 1 and N local processes: tokens/s and each rank's peak memory.

    python bench/bench_fsdp.py [-m default] [--nproc 2] [--steps 6] [--batch-size 8]

Runs `mistral7b finetune --nproc K --json` for K = 1 and K = N on the same synthetic chat data
(the global batch is the same rows whatever K is) and prints, per K, training tokens/s and
every rank's peak RSS (ru_maxrss: the float base as loaded counts before FSDP2 shards it).
On a machine with fewer cores than processes x threads this is a correctness and memory
check, not a speed claim: the ranks share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = ["river", "mountain", "quiet", "garden", "lantern", "copper", "window", "orchard",
         "signal", "harbor", "meadow", "violet", "thunder", "pocket", "marble", "ladder"]


def write_data(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            q = " ".join(rng.choices(WORDS, k=rng.randint(6, 14)))
            a = " ".join(rng.choices(WORDS, k=rng.randint(20, 40)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="default")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--grad-checkpoint", action="store_true")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        write_data(data, 64)
        for k in sorted({1, args.nproc}):
            cmd = [sys.executable, "-m", "mistral7b.cli.main", "finetune", "-m", args.model,
                   "--data", str(data), "-o", str(Path(tmp) / f"out{k}"), "--steps",
                   str(args.steps), "--batch-size", str(args.batch_size), "--seq-len",
                   str(args.seq_len), "--warmup", "1", "--json", "-q", "--nproc", str(k),
                   *(["--grad-checkpoint"] if args.grad_checkpoint else [])]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // k))}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            rows[k] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.model}: {args.steps} steps, global batch {args.batch_size} rows x "
          f"{args.seq_len} tokens, LoRA r=16 on all linears"
          + (", activation checkpointing" if args.grad_checkpoint else ""))
    print(f"{'processes':>10}{'tok/s':>10}{'final loss':>12}  peak RSS per rank (MiB)")
    for k, r in rows.items():
        print(f"{k:>10}{r['tokens_per_second']:>10.1f}{r['final_loss']:>12.4f}  "
              f"{', '.join(f'{v:.0f}' for v in r['peak_rss_mib_per_rank'])}")


if __name__ == "__main__":
    main()
