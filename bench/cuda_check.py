"""One command for a CUDA machine: the `cuda` tests, then TP=1 pre-fill / decode tok/s of
mistral7b (bf16, int4) beside HF transformers (bf16) on the same checkpoint, in one run.

    python bench/cuda_check.py                      # random 7B written to a temp folder
    python bench/cuda_check.py --model /data/m7b-hf --skip-tests
    python bench/cuda_check.py --model DIR --device cpu --skip-tests   # a dry run, no GPU

Needs the dev install (`pip install -e .[dev,server]`) and one GPU. With no --model, a
random-weight Mistral-7B-shaped HF checkpoint is written first (bench/write_random_checkpoint.py,
14.5 GB in bf16, ~1-2 min). Each engine runs in its own process (one 7B model at a time on the
GPU): load, one warm-up, then `--repeat` times a pre-fill of `--prompt-tokens` random ids and
`--gen-tokens` greedy tokens, each token one forward through the engine's own KV cache
(transformers: DynamicCache, as its generate() uses). Medians are printed; every token's
argmax is read back, so the timings include the one host sync per step that generation needs.
Budget on one H200: under 8 minutes with the 7B (tests ~2 min, writing ~1.5 min, 3 loads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from gen_timing import engine_steps, time_generation

ENGINES = ("mistral7b-bf16", "mistral7b-int4", "transformers-bf16")


def _ours(path: str, quant: str | None, device: str):
    sys.path.insert(0, str(ROOT / "src"))
    import mistral7b

    llm = mistral7b.load(path, device=device, dtype="bfloat16", quant=quant)
    return engine_steps(llm)


def _hf(path: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    state: dict = {}

    @torch.inference_mode()
    def prefill(ids):
        state["cache"] = DynamicCache()
        out = model(torch.tensor([ids], device=device), past_key_values=state["cache"],
                    use_cache=True)
        return int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def decode(tok):
        out = model(torch.tensor([[tok]], device=device), past_key_values=state["cache"],
                    use_cache=True)
        return int(out.logits[0, -1].argmax())

    return prefill, decode


def worker(args: argparse.Namespace) -> dict:
    import torch

    cuda = args.device == "cuda"
    t0 = time.perf_counter()
    if args.worker == "transformers-bf16":
        prefill, decode = _hf(args.model, args.device)
    else:
        prefill, decode = _ours(args.model, "int4" if args.worker.endswith("int4") else None,
                                args.device)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(3, vocab, (args.prompt_tokens,), generator=g).tolist()
    runs = time_generation(prefill, decode, ids, args.gen_tokens, args.repeat, warmup=1)
    return {"load_s": load_s, "prefill_tps": statistics.median(r[0] for r in runs),
            "decode_tps": statistics.median(r[1] for r in runs),
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0,
            "tokens": runs[0][2][:16], "gpu": torch.cuda.get_device_name() if cuda else "cpu"}


def run_tests() -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "cuda")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
    tail = [line for line in proc.stdout.splitlines() if line.strip()]
    return f"{tail[-1] if tail else 'no output'} (exit {proc.returncode})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="an HF checkpoint folder (default: write a random one)")
    p.add_argument("--preset", default="mistral-7b-v0.1",
                   help="config of the random checkpoint (bench/write_random_checkpoint.py)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cuda", help="cuda (cpu: a dry run of this script)")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    t_start = time.perf_counter()
    tests = "skipped" if args.skip_tests else run_tests()
    with tempfile.TemporaryDirectory(prefix="cuda_check_") as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "random-hf")
            print(f"[cuda_check] writing a random {args.preset} checkpoint", file=sys.stderr)
            subprocess.run([sys.executable, str(ROOT / "bench" / "write_random_checkpoint.py"),
                            model, "--format", "hf", "--preset", args.preset], check=True)
        results = {}
        for engine in ENGINES:
            print(f"[cuda_check] {engine}", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--model", model, "--prompt-tokens",
                   str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--repeat",
                   str(args.repeat), "--device", args.device, "--worker", engine]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                results[engine] = {"error": proc.stderr.strip().splitlines()[-1:]}
                print(proc.stderr[-3000:], file=sys.stderr)
            else:
                results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    total = time.perf_counter() - t_start
    if args.json:
        print(json.dumps({"tests": tests, "engines": results, "seconds": round(total, 1)}))
        return
    gpu = next((r["gpu"] for r in results.values() if "gpu" in r), "?")
    print(f"cuda tests: {tests}")
    print(f"{gpu}, {model if args.model else 'random ' + args.preset}, "
          f"prompt={args.prompt_tokens} gen={args.gen_tokens} repeat={args.repeat} (medians), "
          f"{total:.0f} s in all")
    print(f"{'engine':20}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak GPU GB':>13}"
          f"{'load s':>8}")
    for engine, r in results.items():
        if "error" in r:
            print(f"{engine:20} failed: {r['error']}")
            continue
        print(f"{engine:20}{r['prefill_tps']:>15.1f}{r['decode_tps']:>14.1f}"
              f"{r['peak_gpu_gb']:>13.2f}{r['load_s']:>8.1f}")
    ours, hf = results.get("mistral7b-bf16", {}), results.get("transformers-bf16", {})
    if "tokens" in ours and "tokens" in hf:
        print(f"bf16 greedy tokens agree with transformers: {ours['tokens'] == hf['tokens']}")


if __name__ == "__main__":
    main()
