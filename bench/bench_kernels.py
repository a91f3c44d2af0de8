"""Weight-only matmul kernels on this CPU: effective GB/s at decode (M = 1) and TFLOP/s at
pre-fill (M = 256) for a Mistral-7B FFN matrix (14336 x 4096), medians of several runs.

    python bench/bench_kernels.py [--threads 2] [--repeat 5] [--rows 1,256] [--only "int4 g32 ours"]
    python bench/bench_kernels.py --rows 1,256 --only "int4 g32 ours float32,Q4_K,Q6_K"
    python bench/bench_kernels.py --model m7b.Q4_0.gguf --layer 0 --rows 256

What it compares: bf16 F.linear (oneDNN) and our bf16 kernel (BF16Linear, M = 1); for int8
(per channel) and int4 (groups of 32/128), with bf16 and float32 activations, our AVX-512
VNNI kernel ("ours", kernels/native.py) against PyTorch's (aten._weight_int8pack_mm,
aten._weight_int4pack_mm_for_cpu, "torch"); GGUF K-quants (Q4_K, Q5_K, Q6_K: random valid
blocks) on our kernel; and dequantize-to-bf16 + matmul for pre-fill.
With --model, instead: each projection of one layer of that model as `load(quant="auto")`
holds it (wq .. w2, whatever their layers and types), timed alone at --rows.
Several copies of the matrix are cycled so each call reads its weights from memory, not
cache.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from random_gguf import random_blocks

from mistral7b.kernels import native
from mistral7b.quant import layers as qlayers
from mistral7b.quant.klinear import KQuantLinear
from mistral7b.quant.layers import (
    Int4Linear,
    Int8Linear,
    quantize_int4,
    quantize_int8,
)

N, K = 14336, 4096


def timed(fn, xs, repeat: int) -> float:
    fn(xs[0])
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for x in xs:
            fn(x)
        runs.append((time.perf_counter() - t) / len(xs))
    return statistics.median(runs)


ROWS: tuple[int, ...] = (1, 256)     # --rows


def slow(kernel: str, dtype: torch.dtype) -> tuple[int, ...]:
    """PyTorch's kernels with float32 activations take ~10-20 s per M = 256 call: M = 1 only."""
    return (1,) if kernel == "torch" and dtype == torch.float32 else ROWS


@contextlib.contextmanager
def forced(kernel: str):
    """Build layers on our kernel ("ours") or PyTorch's ("torch")."""
    saved = qlayers.use_native
    if kernel == "torch":
        qlayers.use_native = lambda *args: False
    try:
        yield
    finally:
        qlayers.use_native = saved


def model_layer(args: argparse.Namespace) -> None:
    """Each projection of layer args.layer of the loaded model at each row count: median and
    best of args.repeat + 2 calls (the products of one layer fit in no cache: no copies)."""
    import mistral7b

    block = mistral7b.load(args.model, quant="auto").model.layers[args.layer]
    mods = {"wq": block.attention.wq, "wk": block.attention.wk, "wv": block.attention.wv,
            "wo": block.attention.wo, "w1": block.feed_forward.w1, "w3": block.feed_forward.w3,
            "w2": block.feed_forward.w2}
    for m in ROWS:
        for name, layer in mods.items():
            x = torch.randn(m, layer.in_features)
            layer(x)
            runs = []
            for _ in range(args.repeat + 2):
                t = time.perf_counter()
                layer(x)
                runs.append(time.perf_counter() - t)
            ops = 2 * m * layer.in_features * layer.out_features
            kind = getattr(layer, "bits", None)
            print(f"layer {args.layer} {name} {type(layer).__name__}"
                  f"{f' {kind}-bit' if kind else ''} {layer.out_features}x{layer.in_features} "
                  f"M={m}: {statistics.median(runs) * 1e3:8.2f} ms  "
                  f"{ops / statistics.median(runs) / 1e9:5.0f} GOP/s (best "
                  f"{ops / min(runs) / 1e9:.0f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--rows", default="1,256",
                    help="activation rows M to time, comma-separated (serving: 1,8)")
    ap.add_argument("--only", help="run only the rows whose name starts with this (several: "
                                   "comma-separated)")
    ap.add_argument("--model", help="time one layer's projections of this model instead")
    ap.add_argument("--layer", type=int, default=0, help="which layer, with --model")
    args = ap.parse_args()
    global ROWS
    ROWS = tuple(int(m) for m in args.rows.split(","))
    torch.set_num_threads(args.threads)
    if args.model:
        model_layer(args)
        return
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(N, K, generator=g).mul_(K**-0.5) for _ in range(args.copies)]
    rows = []

    def report(name, layers, dtype, nbytes, sizes=None):
        if args.only and not name.startswith(tuple(args.only.split(","))):
            return
        for m in sizes or ROWS:
            x = torch.randn(m, K, dtype=dtype)
            sec = timed(lambda layer, x=x: layer(x), layers, args.repeat)
            gbs = nbytes / sec / 1e9
            tflops = 2 * m * N * K / sec / 1e12
            rows.append((name, m, sec * 1e3, gbs, tflops))
            print(f"{name:34s} M={m:<4d} {sec * 1e3:8.2f} ms  {gbs:6.1f} GB/s(w)  "
                  f"{tflops:6.3f} TFLOP/s", flush=True)

    bf16 = [w.bfloat16() for w in ws]
    report("bf16 F.linear", [lambda x, w=w: F.linear(x, w) for w in bf16], torch.bfloat16,
           N * K * 2)
    if native.ops() is not None and native.ops().has_bf16() and not args.only:
        x = torch.randn(1, K, dtype=torch.bfloat16)
        sec = timed(lambda w, x=x: native.ops().bf16_gemv(x, w), bf16, args.repeat)
        print(f"{'bf16 ours (BF16Linear)':34s} M=1    {sec * 1e3:8.2f} ms  "
              f"{N * K * 2 / sec / 1e9:6.1f} GB/s(w)", flush=True)
    del bf16
    kernels = ("ours", "torch") if native.ops() is not None else ("torch",)
    q8 = [quantize_int8(w) for w in ws]
    for kernel in kernels:
        for dt in (torch.bfloat16, torch.float32):
            with forced(kernel):
                layers = [Int8Linear(q, dtype=dt) for q in q8]
            report(f"int8 {kernel} {str(dt)[6:]} act", layers, dt, N * K, slow(kernel, dt))
    del q8, layers
    for group in (32, 128):
        q4 = [quantize_int4(w, group) for w in ws]
        for kernel in kernels:
            for dt in (torch.bfloat16, torch.float32):
                with forced(kernel):
                    layers = [Int4Linear(q, dtype=dt) for q in q4]
                # ours: float16 scale + min; PyTorch's: scale + zero in bf16 (bf16 models) or
                # float32
                per_group = 4 if kernel == "ours" or dt == torch.bfloat16 else 8
                nbytes = N * K // 2 + N * (K // group) * per_group
                report(f"int4 g{group} {kernel} {str(dt)[6:]}", layers, dt, nbytes,
                       slow(kernel, dt))
        if args.only:
            continue
        # pre-fill alternative: dequantize to bf16 once per call, then bf16 matmul
        deq = [lambda x, q=q: F.linear(x, q.dequantize(torch.bfloat16)) for q in q4[:2]]
        x = torch.randn(256, K, dtype=torch.bfloat16)
        sec = timed(lambda f, x=x: f(x), deq, max(2, args.repeat // 2))
        print(f"{'dequant(portable)+bf16 mm g' + str(group):34s} M=256  {sec * 1e3:8.2f} ms  "
              f"{2 * 256 * N * K / sec / 1e12:6.3f} TFLOP/s", flush=True)

    if native.ops() is not None:
        rng = np.random.default_rng(0)
        for kind in ("Q4_K", "Q5_K", "Q6_K"):
            panels = [native.gguf_kpanels(kind, torch.from_numpy(random_blocks(N, K, kind, rng)),
                                          N, K) for _ in ws]
            layers = [KQuantLinear.from_kpanels(p, dtype=torch.float32) for p in panels if p]
            report(f"{kind} ours float32", layers, torch.float32, panels[0].nbytes)


if __name__ == "__main__":
    main()
