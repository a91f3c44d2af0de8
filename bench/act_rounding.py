"""What rounding the activations to int8 costs a product, with one scale per 32 inputs (our
int4/int8 kernels, ggml's Q8_0) or one per 256 (our K-quant kernel since issue 16's seventh
pass, ggml's Q8_K, what llama.cpp multiplies K-quants by).

    python bench/act_rounding.py [-m default] [--text FILE]

Runs the model on a text, keeps the inputs of every feed-forward w2 (the SwiGLU products: the
widest-tailed activations of a layer) and every other linear layer whose width is a multiple
of 256, and prints for each kind of input the relative error of x @ W^T (float64, the layer's
own weights) when x is rounded each way: ||q(x) W^T - x W^T|| / ||x W^T||. Figures only.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import mistral7b

TEXT = ("The lighthouse keeper climbed the spiral stairs at dusk, as he had done every evening "
        "for thirty years. Below, the sea was grey and restless; above, the lamp waited. He "
        "wound the clockwork, trimmed the wick, and wrote the weather in his log: wind from "
        "the north-east, rising, a fishing boat making for the harbour before the storm. ") * 4


def rounded(x: torch.Tensor, span: int) -> torch.Tensor:
    """x rounded to int8 with one scale (max|x| / 127) per `span` inputs, as the kernels do."""
    blocks = x.reshape(x.shape[0], -1, span)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127.0)).reshape(x.shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default="default")
    p.add_argument("--text", help="a text file to run (default: a built-in paragraph)")
    args = p.parse_args()
    llm = mistral7b.load(args.model, dtype="float32")
    text = Path(args.text).read_text() if args.text else TEXT
    ids = llm.tokenizer.encode(text)[:1024]
    inputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = []
    for name, module in llm.model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.in_features % 256 == 0:
            kind = name.split(".")[-1]

            def keep(mod, inp, out, kind=kind):
                inputs.setdefault(kind, []).append((inp[0].detach().reshape(-1, mod.in_features),
                                                    mod.weight.detach()))
            hooks.append(module.register_forward_hook(keep))
    with torch.no_grad():
        llm.logits(ids)
    for h in hooks:
        h.remove()
    print(f"model: {args.model} | {len(ids)} tokens | relative error of x @ W^T, median over layers")
    print("| input of | width | layers | scale per 32 | scale per 256 | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, pairs in inputs.items():
        errs: dict[int, list[float]] = {32: [], 256: []}
        for x, w in pairs:
            x, w = x.double(), w.double()
            exact = x @ w.t()
            for span, found in errs.items():
                found.append(float((rounded(x, span) @ w.t() - exact).norm() / exact.norm()))
        e32, e256 = statistics.median(errs[32]), statistics.median(errs[256])
        print(f"| {kind} | {pairs[0][0].shape[1]} | {len(pairs)} | {e32:.2e} | {e256:.2e} "
              f"| {e256 / e32:.2f}x |")


if __name__ == "__main__":
    main()
