"""Weight-only matmul kernels on this CPU: effective GB/s at decode (M = 1) and TFLOP/s at
pre-fill (M = 256) for a Mistral-7B FFN matrix (14336 x 4096), medians of several runs.

    python bench/bench_kernels.py [--threads 2] [--repeat 5]

What it compares: bf16 F.linear (oneDNN), aten._weight_int8pack_mm (per-channel int8, with
bf16 and float32 activations), aten._weight_int4pack_mm_for_cpu (int4, groups of 32/128, bf16
and float32), and dequantize-to-bf16 + matmul for pre-fill. Several copies of the matrix are
cycled so each call reads its weights from memory, not cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mistral7b.quant.layers import Int4Linear, Int8Linear, quantize_int4, quantize_int8

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--copies", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(N, K, generator=g).mul_(K**-0.5) for _ in range(args.copies)]
    rows = []

    def report(name, layers, dtype, nbytes):
        for m in (1, 256):
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
    del bf16
    q8 = [quantize_int8(w) for w in ws]
    for dt in (torch.bfloat16, torch.float32):
        layers = [Int8Linear(q, dtype=dt) for q in q8]
        if dt == torch.float32:  # the raw kernel with float32 activations and scales
            raw = [(lyr.qweight, lyr.scales.float()) for lyr in layers]
            report("int8pack_mm fp32 act (raw)", [
                lambda x, q=q, s=s: torch.ops.aten._weight_int8pack_mm(x, q, s)
                for q, s in raw], dt, N * K)
        report(f"Int8Linear {str(dt)[6:]} act", layers, dt, N * K)
    del q8, layers
    for group in (32, 128):
        q4 = [quantize_int4(w, group) for w in ws]
        for dt in (torch.bfloat16, torch.float32):
            layers = [Int4Linear(q, dtype=dt) for q in q4]
            nbytes = N * K // 2 + N * (K // group) * 2 * (2 if dt == torch.bfloat16 else 4)
            report(f"Int4Linear g{group} {str(dt)[6:]}", layers, dt, nbytes)
        # pre-fill alternative: dequantize to bf16 once per call, then bf16 matmul
        deq = [lambda x, q=q: F.linear(x, q.dequantize(torch.bfloat16)) for q in q4[:2]]
        x = torch.randn(256, K, dtype=torch.bfloat16)
        sec = timed(lambda f, x=x: f(x), deq, max(2, args.repeat // 2))
        print(f"{'dequant(portable)+bf16 mm g' + str(group):34s} M=256  {sec * 1e3:8.2f} ms  "
              f"{2 * 256 * N * K / sec / 1e12:6.3f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
