"""Speculative decoding (prompt lookup, `--speculate N`; with `--draft-model X` also a draft
model) against plain decoding on input-grounded tasks (bench/data/grounded.jsonl: edit,
extract, summarise, reformat, quote, fix typos), in the same process, one after the other:
decode tok/s (generated tokens after the first / decode time, medians of --repeat runs),
the drafts' acceptance rate, and whether the greedy answers are identical.

    python bench/bench_speculate.py                         # the default model, its Q4_1 blocks
    python bench/bench_speculate.py -m mistral-7b-instruct.Q4_0.gguf --speculate 4 -t 2
    python bench/bench_speculate.py --quant none --draft-model default   # float, int4 drafts

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
    p.add_argument("--draft-model", help="also run speculative decoding with this draft model")
    p.add_argument("--draft-quant", default="auto", help="the draft's weights (as --quant)")
    p.add_argument("-n", "--max-tokens", type=int, default=96)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    import mistral7b

    def quant(flag: str) -> str | None:
        return None if flag == "none" else flag

    torch.set_num_threads(args.threads)
    llm = mistral7b.load(args.model, quant=quant(args.quant), draft_model=args.draft_model,
                         draft_quant=quant(args.draft_quant))
    draft = llm.draft
    modes = {"plain": (0, None), "lookup": (args.speculate, None)}
    if draft is not None:
        modes["draft"] = (args.speculate, draft)
    tasks = [json.loads(line) for line in TASKS.read_text().splitlines() if line.strip()]
    print(f"{args.model} quant={args.quant} threads={args.threads} speculate={args.speculate} "
          f"max_tokens={args.max_tokens}, medians of {args.repeat}"
          + (f"; draft {args.draft_model} quant={args.draft_quant}" if draft else ""))
    spec_modes = [m for m in modes if m != "plain"]
    print(f"{'task':<11} {'plain tok/s':>11}"
          + "".join(f" {m + ' tok/s':>12} {'ratio':>6} {'accepted':>8} {'same':>5}"
                    for m in spec_modes))
    totals = {m: {"tokens": 0, "seconds": 0.0, "draft": 0, "acc": 0} for m in modes}
    ratios: dict[str, list[float]] = {m: [] for m in spec_modes}
    for task in tasks:
        messages = [{"role": "user", "content": task["prompt"]}]
        result = {}
        for mode, (k, drafter) in modes.items():
            llm.speculate, llm.draft = k, drafter
            speeds, text, draft_tokens, accepted = [], "", 0, 0
            for _ in range(args.repeat):
                llm.clear_cache()
                text = llm.chat(messages, max_tokens=args.max_tokens).text
                s = llm.stats
                speeds.append(max(s.generated_tokens - 1, 0) / s.decode_seconds)
                t = totals[mode]
                t["tokens"] += max(s.generated_tokens - 1, 0)
                t["seconds"] += s.decode_seconds
                t["draft"] += s.draft_tokens
                t["acc"] += s.accepted_tokens
                draft_tokens, accepted = s.draft_tokens, s.accepted_tokens
            rate = accepted / draft_tokens if draft_tokens else 0.0
            result[mode] = (statistics.median(speeds), text, rate)
        row = f"{task['task']:<11} {result['plain'][0]:>11.1f}"
        for m in spec_modes:
            ratio = result[m][0] / result["plain"][0]
            ratios[m].append(ratio)
            row += (f" {result[m][0]:>12.1f} {ratio:>5.2f}x {100 * result[m][2]:>7.0f}% "
                    f"{result[m][1] == result['plain'][1]!s:>5}")
        print(row)
    speed = {m: t["tokens"] / t["seconds"] for m, t in totals.items()}
    row = f"{'all':<11} {speed['plain']:>11.1f}"
    for m in spec_modes:
        t = totals[m]
        row += (f" {speed[m]:>12.1f} {speed[m] / speed['plain']:>5.2f}x "
                f"{100 * t['acc'] / max(t['draft'], 1):>7.0f}%      ")
    print(row + "  (median task ratio " + ", ".join(
        f"{m} {statistics.median(r):.2f}x" for m, r in ratios.items()) + ")")


if __name__ == "__main__":
    main()
