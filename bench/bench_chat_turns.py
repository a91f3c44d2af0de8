"""Chat time to first token, turn by turn, with the prefix cache and without it.

    python bench/bench_chat_turns.py -t 2                      # the default model
    python bench/bench_chat_turns.py -m mistral-7b-random.Q4_0.gguf --quant int4 -t 2

A conversation grows by one user message and one answer (--answer greedy tokens) a turn.
`LLM.chat` reuses the KV of the previous turn, so each turn computes only its new tokens;
the "cold" series empties the KV cache before each turn, which is what every turn cost
before the prefix cache (the whole conversation pre-filled again). Both series run in the
same process on the same conversation; the answers are the same (greedy), and checked.
Prints a table (or JSON with --json); figures only, no assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch: see the README

import torch

import mistral7b

QUESTIONS = [
    "Tell me about the history of the bicycle.",
    "Who invented the pedal?",
    "How did tyres change riding?",
    "What about gears?",
    "Why are racing bikes so light?",
    "How do brakes work?",
    "What is a fixed-gear bicycle?",
    "Are electric bicycles different?",
    "How should I choose my first bike?",
    "Summarise what we discussed.",
]


def run(llm: mistral7b.LLM, turns: int, answer: int, cold: bool) -> list[dict]:
    messages: list[dict[str, str]] = []
    rows = []
    llm.clear_cache()
    for i in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]})
        if cold:
            # Drop the cached KV but not the last answer's ids (chat_history.py), so both
            # series give the model the same prompt ids.
            llm.engine.pool.clear_prefixes()
        reply = llm.chat(messages, max_tokens=answer, ignore_eos=True)
        s = llm.stats
        rows.append({"turn": i + 1, "prompt_tokens": s.prompt_tokens,
                     "cached_tokens": s.cached_tokens, "ttft_s": s.first_token_seconds,
                     "ids": reply.token_ids})
        messages.append({"role": "assistant", "content": reply.text})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default="default")
    p.add_argument("--quant", choices=("int8", "int4"))
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--answer", type=int, default=48, help="tokens per answer")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model.startswith("random-int4:"):        # e.g. random-int4:mistral-7b-v0.3
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from random_int4 import random_int4_llm

        llm = random_int4_llm(args.model.split(":", 1)[1])
    else:
        llm = mistral7b.load(args.model, quant=args.quant)
    llm.chat([{"role": "user", "content": "Hi"}], max_tokens=2)          # warm-up
    warm = run(llm, args.turns, args.answer, cold=False)
    cold = run(llm, args.turns, args.answer, cold=True)
    same = all(w["ids"] == c["ids"] for w, c in zip(warm, cold))
    if args.json:
        for r in warm + cold:
            r.pop("ids")
        print(json.dumps({"model": args.model, "quant": args.quant, "threads": args.threads,
                          "reuse": warm, "cold": cold, "same_answers": same}))
        return
    print(f"{args.model} quant={args.quant} threads={args.threads} answer={args.answer} tok")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT reuse':>11} {'TTFT cold':>10}")
    for w, c in zip(warm, cold):
        print(f"{w['turn']:>4} {w['prompt_tokens']:>7} {w['cached_tokens']:>7} "
              f"{w['ttft_s']:>10.3f}s {c['ttft_s']:>9.3f}s")
    t2, tn = warm[1]["ttft_s"], warm[-1]["ttft_s"]
    print(f"reuse: turn {len(warm)} / turn 2 = {tn / t2:.2f}x; cold: "
          f"{cold[-1]['ttft_s'] / cold[1]['ttft_s']:.2f}x; same answers: {same}",
          file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
