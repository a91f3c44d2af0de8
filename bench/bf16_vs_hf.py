"""7B bf16 on the CPU: mistral7b against HF transformers on the same HF checkpoint.

    python bench/write_random_checkpoint.py /data/m7b-hf --format hf
    python bench/bf16_vs_hf.py /data/m7b-hf -t 2 --repeat 3

Each engine runs in its own process (two 14.5 GB models do not fit side by side in 24 GB):
load in bf16, then `--repeat` times a pre-fill of `--prompt-tokens` random ids and
`--gen-tokens` greedy tokens, one forward per token with the engine's own KV cache
(transformers: `past_key_values` / `DynamicCache`, as `generate` uses it). Medians, and
ours / HF ratios, are printed; `--json` prints them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gen_timing import engine_steps, time_generation


def _ours(path: str):
    import mistral7b

    llm = mistral7b.load(path, dtype="bfloat16", device="cpu")
    return engine_steps(llm)


def _hf(path: str):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model.eval()
    state = {}

    @torch.inference_mode()
    def prefill(ids):
        state["cache"] = DynamicCache()
        out = model(torch.tensor([ids]), past_key_values=state["cache"], use_cache=True)
        return int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def decode(tok):
        out = model(torch.tensor([[tok]]), past_key_values=state["cache"], use_cache=True)
        return int(out.logits[0, -1].argmax())

    return prefill, decode


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    prefill, decode = (_ours if args.worker == "mistral7b" else _hf)(args.path)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (args.prompt_tokens,), generator=g).tolist()
    runs = time_generation(prefill, decode, ids, args.gen_tokens, args.repeat)
    peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return {"load_s": load_s, "prefill_tps": statistics.median(r[0] for r in runs),
            "decode_tps": statistics.median(r[1] for r in runs), "peak_rss_gb": peak / 1e9,
            "tokens": runs[0][2][:16]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", choices=["mistral7b", "transformers"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = {}
    for engine in ("mistral7b", "transformers"):
        cmd = [sys.executable, __file__, args.path, "-t", str(args.threads), "--prompt-tokens",
               str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--repeat",
               str(args.repeat), "--worker", engine]
        print(f"[bench] {engine}", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[engine] = json.loads(out.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(results))
        return
    ours, hf = results["mistral7b"], results["transformers"]
    print(f"{args.path} bf16 threads={args.threads} prompt={args.prompt_tokens} "
          f"gen={args.gen_tokens} repeat={args.repeat} (medians)")
    print(f"{'':24}{'mistral7b':>12}{'transformers':>14}{'ratio':>8}")
    for key, label in (("prefill_tps", "prefill tok/s"), ("decode_tps", "decode tok/s"),
                       ("peak_rss_gb", "peak RSS GB"), ("load_s", "load s")):
        print(f"{label:24}{ours[key]:>12.2f}{hf[key]:>14.2f}{ours[key] / hf[key]:>7.2f}x")
    print(f"greedy tokens agree: {ours['tokens'] == hf['tokens']} "
          f"(ours {ours['tokens'][:8]}, transformers {hf['tokens'][:8]})")


if __name__ == "__main__":
    main()
