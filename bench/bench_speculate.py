"""Speculative decoding (prompt lookup, `--speculate N`) against plain decoding on
input-grounded tasks (bench/data/grounded.jsonl: edit, extract, summarise, reformat, quote,
fix typos), in the same process, one after the other: decode tok/s (generated tokens after
the first / decode time, medians of --repeat runs), the drafts' acceptance rate, and whether
the greedy answers are identical.

    python bench/bench_speculate.py                         # the default model, its Q4_1 blocks
    python bench/bench_speculate.py -m mistral-7b-instruct.Q4_0.gguf --speculate 4 -t 2

The physical limit beside a decode speed is the weights' bytes per token over the read
bandwidth; speculation passes it by emitting several tokens per pass over the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TASKS = Path(__file__).with_name("data") / "grounded.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default="default")
    p.add_argument("--quant", default="auto")
    p.add_argument("--speculate", type=int, default=4)
    p.add_argument("-n", "--max-tokens", type=int, default=96)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    import mistral7b

    torch.set_num_threads(args.threads)
    llm = mistral7b.load(args.model, quant=None if args.quant == "none" else args.quant)
    tasks = [json.loads(line) for line in TASKS.read_text().splitlines() if line.strip()]
    print(f"{args.model} quant={args.quant} threads={args.threads} speculate={args.speculate} "
          f"max_tokens={args.max_tokens}, medians of {args.repeat}")
    print(f"{'task':<11} {'plain tok/s':>11} {'spec tok/s':>10} {'ratio':>6} {'accepted':>9} "
          f"{'same':>5}")
    totals = {"plain": [0, 0.0], "spec": [0, 0.0], "draft": 0, "acc": 0}
    ratios = []
    for task in tasks:
        messages = [{"role": "user", "content": task["prompt"]}]
        result = {}
        for mode, k in (("plain", 0), ("spec", args.speculate)):
            llm.speculate = k
            speeds, text = [], ""
            for _ in range(args.repeat):
                llm.clear_cache()
                text = llm.chat(messages, max_tokens=args.max_tokens).text
                s = llm.stats
                speeds.append(max(s.generated_tokens - 1, 0) / s.decode_seconds)
                totals[mode][0] += max(s.generated_tokens - 1, 0)
                totals[mode][1] += s.decode_seconds
            if mode == "spec":
                totals["draft"] += s.draft_tokens
                totals["acc"] += s.accepted_tokens
                rate = s.accepted_tokens / s.draft_tokens if s.draft_tokens else 0.0
            result[mode] = (statistics.median(speeds), text)
        ratio = result["spec"][0] / result["plain"][0]
        ratios.append(ratio)
        print(f"{task['task']:<11} {result['plain'][0]:>11.1f} {result['spec'][0]:>10.1f} "
              f"{ratio:>5.2f}x {100 * rate:>8.0f}% {result['spec'][1] == result['plain'][1]!s:>5}")
    plain = totals["plain"][0] / totals["plain"][1]
    spec = totals["spec"][0] / totals["spec"][1]
    print(f"{'all':<11} {plain:>11.1f} {spec:>10.1f} {spec / plain:>5.2f}x "
          f"{100 * totals['acc'] / max(totals['draft'], 1):>8.0f}%   (median task ratio "
          f"{statistics.median(ratios):.2f}x)")


if __name__ == "__main__":
    main()
