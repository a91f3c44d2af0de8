"""Perplexity of float, int8 and int4 on the same text with the default model, and top-1
agreement of the quantized models' next-token predictions with float's.

    python bench/quality.py [--text FILE] [--tokens 1024]

"int8"/"int4" requantize the float model's linear layers in memory (`quantize_model`, the
layers `load(quant=...)` builds from a float checkpoint). The default model's GGUF is Q4_1,
so "float" is its exact dequantization and "int4 (Q4_1 bits)" imports the file's own 4-bit
blocks (`load_quantized`), which is what `load(default, quant="int4")` runs.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import mistral7b
from mistral7b.quant import load_quantized, quantize_model
from mistral7b.weights import open_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", type=Path,
                    default=Path(__file__).resolve().parents[1] / "README.md")
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(2)
    llm = mistral7b.load("default")
    ids = llm.tokenizer.encode(args.text.read_text(encoding="utf-8"), bos=True)[: args.tokens]
    base = llm.model
    results = {}
    for name in ("float", "int8", "int4", "int4 (Q4_1 bits)"):
        if name == "int4 (Q4_1 bits)":  # the GGUF's own 4-bit blocks, imported exactly
            reader = open_checkpoint(llm.path)
            model = load_quantized(reader, "int4", dtype=torch.float32, device="cpu")
        else:
            model = base if name == "float" else quantize_model(copy.deepcopy(base), name)
        llm.model = llm.engine.model = model
        logits = llm.logits(ids)[:-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
        results[name] = (math.exp(nll.item()), logits.argmax(-1))
    print(f"text: {args.text.name}, {len(ids)} tokens, model: default (SmolLM2-135M)")
    print(f"{'':18s}{'perplexity':>12s}{'top-1 = float':>15s}")
    for name, (ppl, top) in results.items():
        agree = (top == results["float"][1]).float().mean().item()
        print(f"{name:18s}{ppl:12.3f}{agree:14.1%}")


if __name__ == "__main__":
    main()
