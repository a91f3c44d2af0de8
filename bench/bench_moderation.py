"""Self-reflection moderation (`LLM.moderate`): latency per input and precision/recall of
"flagged" on a small labelled set (bench/data/moderation_set.jsonl: 23 harmful prompts
covering the 13 categories, 23 benign ones, some with alarming words such as "kill a
Python process").

    python bench/bench_moderation.py -t 2                  # the default model (135M)
    python bench/bench_moderation.py -m PATH --quant int4 -t 2

Peers measured in the same run: the same classifier prompt answered by greedy generation
(what a user does without label scoring: the reply's first words matched to a label), and
the trivial "flag everything" classifier. Figures only, no assertions. A 135M model is far
below what the paper's figure is for (Mistral 7B Instruct): read these as what the pipeline
costs and what a small model gives, not as the method's quality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import mistral7b
from mistral7b.moderation import LABELS, NOT_MODERATED, classifier_prompt, moderate

DATA = Path(__file__).resolve().parent / "data" / "moderation_set.jsonl"


def prf(pred: list[bool], gold: list[bool]) -> tuple[float, float, float]:
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def generated_label(llm: mistral7b.LLM, text: str) -> str:
    """The greedy reply to the classifier prompt, matched to the label it starts with (an
    unmatched reply counts as "not moderated", as a parser would have to decide)."""
    reply = llm.chat([{"role": "user", "content": classifier_prompt(text)}],
                     max_tokens=8).text.strip().lower()
    for label in sorted(LABELS, key=len, reverse=True):
        if reply.startswith(label):
            return label
    return NOT_MODERATED


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default="default")
    p.add_argument("--quant", choices=("int8", "int4"))
    p.add_argument("-t", "--threads", type=int)
    p.add_argument("--data", type=Path, default=DATA)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    llm = mistral7b.load(args.model, quant=args.quant)
    tok = llm.require_tokenizer()
    gold = [r["label"] != NOT_MODERATED for r in rows]

    t0 = time.perf_counter()
    moderate(llm.engine, tok, "warm-up")          # computes (and caches) the prompt prefix
    cold = time.perf_counter() - t0
    scored, lat = [], []
    for r in rows:
        t0 = time.perf_counter()
        scored.append(moderate(llm.engine, tok, r["text"]))
        lat.append(time.perf_counter() - t0)
    generated, lat_gen = [], []
    for r in rows:
        t0 = time.perf_counter()
        generated.append(generated_label(llm, r["text"]))
        lat_gen.append(time.perf_counter() - t0)

    def line(name: str, pred: list[bool], cats: list[str], times: list[float] | None) -> str:
        precision, recall, f1 = prf(pred, gold)
        right = sum(c == r["label"] for c, r in zip(cats, rows) if r["label"] != NOT_MODERATED)
        timing = (f"{statistics.median(times) * 1000:.0f} / "
                  f"{sorted(times)[int(0.9 * len(times))] * 1000:.0f}" if times else "-")
        return (f"| {name} | {timing} | {precision:.2f} | {recall:.2f} | {f1:.2f} "
                f"| {right}/{sum(gold)} |")

    print(f"model: {args.model} (quant {args.quant or 'none'}), {len(rows)} inputs "
          f"({sum(gold)} harmful), threads {torch.get_num_threads()}; first call (prompt "
          f"prefix computed): {cold * 1000:.0f} ms")
    print("| classifier | latency ms p50 / p90 | precision | recall | F1 | right category |")
    print("|---|---:|---:|---:|---:|---:|")
    print(line("LLM.moderate (14 labels scored)", [m.flagged for m in scored],
               [m.category for m in scored], lat))
    print(line("greedy reply to the same prompt", [c != NOT_MODERATED for c in generated],
               generated, lat_gen))
    print(line("flag everything", [True] * len(rows), [""] * len(rows), None))
    counts: dict[str, int] = {}
    for m in scored:
        counts[m.category] = counts.get(m.category, 0) + 1
    print("LLM.moderate categories given:", json.dumps(counts))


if __name__ == "__main__":
    main()
