"""The processes `mistral7b bench` measures in (bench.py runs them): one engine each, or the
machine's read bandwidth.

A worker loads once, prints `{"ready": ...}` and then answers one line of JSON per line it
reads on stdin: `run` does one timed repeat (an engine: a pre-fill of the prompt ids in one
step, then greedy decode steps; the machine: `torch.sum` over 1 GiB), `end` prints the
figures of the whole process (peak RSS, which decode step ran, the first tokens) and exits.
So bench.py can alternate the engines repeat by repeat, each in a process of its own (its
peak RSS its own). Under torchrun (`--tp`) rank 0 alone takes the commands; the other ranks
follow its model calls.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from typing import Any

from mistral7b.cli import common

MACHINE = "machine"     # the worker that measures read bandwidth


def serve(args: argparse.Namespace) -> None:
    """A worker's life (the module docstring): load, then a reply per command."""
    from mistral7b.distributed.runtime import is_worker_rank

    if is_worker_rank():    # tensor parallel: inside load() it runs rank 0's calls until rank
        _load(args)         # 0 exits (distributed/tp_model.py); rank 0 alone takes commands
        return
    t0 = time.perf_counter()
    if args.worker == MACHINE:
        repeat, finish = _machine(args.threads)
    else:
        repeat, finish = _engine(args)
    _say({"ready": {"load_s": time.perf_counter() - t0}})
    while _next_command() == "run":
        _say({"run": repeat()})
    _say({"end": finish()})


def _next_command() -> str:
    """The next line of stdin ('end' at its end)."""
    return sys.stdin.readline().strip() or "end"


def _say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def _machine(threads: int | None):
    """GB/s of `torch.sum` over 1 GiB of float32 (median of 7, after one warm-up), per run."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    x = torch.ones(1 << 28)
    x.sum()

    def repeat() -> dict[str, Any]:
        runs = []
        for _ in range(7):
            t = time.perf_counter()
            x.sum()
            runs.append(time.perf_counter() - t)
        return {"read_gbs": x.numel() * 4 / statistics.median(runs) / 1e9}

    return repeat, dict


def _engine(args: argparse.Namespace):
    vocab, reset, prefill, decode, weight_bytes, about = (
        _llama_cpp(args) if args.worker == "llama.cpp" else _ours(args))
    ids = prompt_ids(args.prompt_tokens, vocab, args.seed)
    tokens: list[int] = []

    def repeat() -> dict[str, Any]:
        reset()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        tok = prefill(ids)
        ttft = time.perf_counter() - t
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        tokens[:] = [tok]
        t = time.perf_counter()
        for _ in range(args.gen_tokens - 1):
            tok = decode(tok)
            tokens.append(tok)
        dec = time.perf_counter() - t
        return {"prefill_tps": len(ids) / ttft, "ttft_s": ttft,
                "decode_tps": (args.gen_tokens - 1) / dec if dec else 0.0,
                "prefill_page_faults": faults}

    def finish() -> dict[str, Any]:
        return {"engine": args.worker, "model": str(args.model), "quant": args.quant,
                "threads": args.threads, **about(), "weight_bytes": weight_bytes,
                "peak_rss_gb": _peak_rss() / 1e9, "tokens": tokens[:16]}

    return repeat, finish


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]  # 0-2: unk/bos/eos in both vocabs


def _peak_rss() -> int:
    """VmHWM where there is /proc: Linux copies ru_maxrss from the parent at fork."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load(args: argparse.Namespace) -> Any:
    import torch

    import mistral7b

    if args.threads:
        torch.set_num_threads(args.threads)
    return mistral7b.load(args.model, device=args.device, dtype=args.dtype,
                          quant=None if args.quant == "none" else args.quant,
                          **({"tp": tp} if (tp := common.tensor_parallel(args)) else {}))


def _ours(args: argparse.Namespace):
    from mistral7b.cache import BlockTable
    from mistral7b.engine import Engine

    llm = _load(args)
    model, config = llm.model, llm.config
    engine = Engine(model, config)
    engine.pool_type = llm.engine.pool_type     # tensor parallel: the pool on every rank
    # decode steps pick their thread count up to -t by measurement, as generate/serve do
    engine.adaptive_threads = True
    governor = engine.governor()
    state: dict[str, Any] = {"table": BlockTable()}

    def reset() -> None:
        engine.pool.release(state["table"])

    def prefill(ids: list[int]) -> int:
        return int(engine.step([state["table"]], [ids])[0].argmax())

    def decode(tok: int) -> int:
        if governor is None:
            return int(engine.step([state["table"]], [[tok]])[0].argmax())
        with governor.timed():
            return int(engine.step([state["table"]], [[tok]])[0].argmax())

    def about() -> dict[str, Any]:
        # which decode step ran: the fused C++ step (fused_step.py) or the eager modules;
        # which kernels: ours on AVX-512 or AVX2 (native.py), or PyTorch's
        from mistral7b.kernels import native

        ops = native.ops() if engine.device.type == "cpu" else None
        return {"decode_step": "fused" if engine.fused_step() is not None else "eager",
                "kernels": ops.isa() if ops is not None else "torch"}

    return config.vocab_size, reset, prefill, decode, _weight_bytes(model), about


def _weight_bytes(model: Any) -> int:
    """Bytes a decode step reads: every parameter and buffer but the embedding table (one
    row of it)."""
    tables = [*model.tok_embeddings.parameters(), *model.tok_embeddings.buffers()]
    seen = {t.data_ptr() for t in tables}
    total = sum(t[0].nbytes for t in tables)
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total


def _llama_cpp(args: argparse.Namespace):
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(args.model), n_ctx=args.prompt_tokens + args.gen_tokens + 8,
                n_batch=max(512, args.prompt_tokens), n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)

    n_vocab = llm.n_vocab()

    def reset() -> None:
        llm.reset()  # the next eval drops the cached positions from n_tokens on

    def last() -> int:
        # Llama.eval no longer copies logits out (sampling moved into llama.cpp): read the
        # last token's row straight from the context.
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(row, shape=(n_vocab,)).argmax())

    def prefill(ids: list[int]) -> int:
        llm.eval(ids)
        return last()

    def decode(tok: int) -> int:
        llm.eval([tok])
        return last()

    return n_vocab, reset, prefill, decode, _gguf_weight_bytes(str(args.model)), dict


def _gguf_weight_bytes(path: str) -> int:
    """The same figure for llama.cpp from the file: every tensor but the embedding table."""
    from pathlib import Path

    from mistral7b.weights.gguf_parse import open_gguf

    _, header = open_gguf(Path(path))
    total = 0
    for name, info in header.tensors.items():
        total += info.n_bytes // info.dims[-1] if name == "token_embd.weight" else info.n_bytes
    return total
