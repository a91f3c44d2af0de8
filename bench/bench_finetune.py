"""Fine-tuning throughput and memory: LoRA vs QLoRA (int8 / int4 frozen base), each in a fresh
process, on the embedded default model (or -m PATH).

    python bench/bench_finetune.py [-m default] [--steps 6] [--batch-size 4] [--seq-len 128]

Modes: lora (float base), lora+ckpt (activation checkpointing), qlora-int8 / qlora-int4
(lora.FrozenQuantLinear base), quant-int8 (mistral7b.quant's Int8Linear base, as
load(quant="int8") builds it). Per mode it prints training tokens/s (real tokens, padding excluded; the first step is a
warm-up and not counted), the resident memory of the model once it is ready to train, and the
peak resident memory *during training* (the kernel's high-water mark reset after set-up via
/proc/self/clear_refs, so the float weights that QLoRA quantizes away at load do not count),
plus ru_maxrss for the whole process. Data: synthetic chat examples of ~60-100 tokens, packed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MODES = {
    "lora": {},
    "lora+ckpt": {"grad_checkpoint": True},
    "qlora-int8": {"qlora": 8},
    "qlora-int4": {"qlora": 4},
    "quant-int8": {"quant": "int8"},   # base from mistral7b.quant (what load(quant="int8") builds)
}

CHILD = r"""
import gc, json, resource, sys, time
import torch
import mistral7b
from mistral7b.finetune import Record, TrainConfig, Trainer, tokenize

model, device, dtype, steps, batch, seq_len, threads, extra = sys.argv[1:9]
if int(threads):
    torch.set_num_threads(int(threads))
extra = json.loads(extra)
quant = extra.pop("quant", None)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024          # MiB
    return float("nan")

llm = mistral7b.load(model, device=device or None, dtype=dtype or None)
if quant:
    from mistral7b.quant import quantize_model
    quantize_model(llm.model, quant)
topics = ["the moon", "rivers", "bread", "chess", "volcanoes", "owls", "trains", "tea"]
records = [Record(i + 1, messages=[
    {"role": "user", "content": f"Tell me two facts about {t}, please, in one sentence."},
    {"role": "assistant", "content": f"Here are two facts about {t}: it is well known, and "
                                     f"people have studied {t} for a very long time."}])
    for i, t in enumerate(topics * 4)]
examples, _ = tokenize(records, llm.tokenizer, max_len=int(seq_len))
config = TrainConfig(steps=int(steps) + 1, lr=1e-4, batch_size=int(batch), seq_len=int(seq_len),
                     rank=16, alpha=32, **extra)
trainer = Trainer(llm, config, "/tmp/bench_finetune_out", progress=False)
gc.collect()
ready = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:   # reset the peak (VmHWM) to the current RSS
    f.write("5")
if torch.cuda.is_available() and llm.engine.device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
total = config.steps
trainer.train_step(examples, total)              # warm-up step
tokens, t0 = trainer.tokens, time.perf_counter()
for _ in range(int(steps)):
    trainer.train_step(examples, total)
seconds = time.perf_counter() - t0
out = {"tokens_per_s": (trainer.tokens - tokens) / seconds, "ready_rss_mib": ready,
       "train_peak_rss_mib": status("VmHWM:"),
       "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "tokens_per_step": (trainer.tokens - tokens) / int(steps),
       "device": str(llm.engine.device), "dtype": str(llm.engine.dtype)}
if torch.cuda.is_available() and llm.engine.device.type == "cuda":
    out["train_peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="default")
    ap.add_argument("--device", default="")
    ap.add_argument("--dtype", default="")
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    ap.add_argument("--modes", default=",".join(MODES), help="subset of " + ",".join(MODES))
    args = ap.parse_args()
    rows = []
    for mode in args.modes.split(","):
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, args.model, args.device, args.dtype, str(args.steps),
             str(args.batch_size), str(args.seq_len), str(args.threads),
             json.dumps(MODES[mode])],
            capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"{mode}: failed\n{proc.stderr[-2000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((mode, result))
        print(json.dumps({"mode": mode, **result}), file=sys.stderr)
    print(f"model {args.model}, batch {args.batch_size} x seq {args.seq_len} (packed), "
          f"LoRA rank 16 on wq,wk,wv,wo,w1,w2,w3, {rows[0][1]['device']} {rows[0][1]['dtype']}")
    cuda = "train_peak_cuda_mib" in rows[0][1]
    head = f"{'mode':<12}{'tok/s':>8}{'ready RSS':>12}{'train peak RSS':>16}" + \
        (f"{'peak CUDA':>12}" if cuda else "")
    print(head)
    for mode, r in rows:
        line = (f"{mode:<12}{r['tokens_per_s']:>8.1f}{r['ready_rss_mib']:>9.0f} MiB"
                f"{r['train_peak_rss_mib']:>12.0f} MiB")
        if cuda:
            line += f"{r['train_peak_cuda_mib']:>8.0f} MiB"
        print(line)


if __name__ == "__main__":
    main()
