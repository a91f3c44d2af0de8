"""Serving throughput and latency: aggregate generated tokens/s with 1, 4, 8, 16 concurrent
clients, and time to first token (TTFT) under that load.

    python bench/bench_server.py                         # starts `mistral7b serve -m default`
    python bench/bench_server.py -m /models/mistral-7b-int4 -t 16 --max-tokens 128
    python bench/bench_server.py --url http://127.0.0.1:8000 --api-key KEY   # a running server
    python bench/bench_server.py --random-adapters 2 --concurrency 8   # multi-LoRA serving
    python bench/bench_server.py -m m7b.Q4_0.gguf -t 2 --concurrency 1,8 --rounds 3   # 1, 8, 1, 8, ...

With adapters (--lora NAME=PATH, or --random-adapters N: rank-16 adapters on all seven
projections, written to a temporary folder), each level runs twice: every client on the base
model, then the clients spread round-robin over the base and the adapters (requests for
different adapters share the batch, each row with its own adapter).

Each client streams /v1/completions requests one after another (greedy, `ignore_eos`, so
every request generates exactly --max-tokens tokens) with its own prompt; a level runs
--requests requests per client. Every request's prompt is new to the server: it starts with
its own number ("Request 12."), after the shared preamble of --system-tokens if any, so the
prefix cache gives no level (the one-client baseline included) a prompt that an earlier
request computed. Aggregate tok/s = all generated tokens / the level's wall time. TTFT is
measured by the client: request sent -> first streamed token.
Prints a table (or JSON with --json); figures only, no assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "Describe a walk through a busy market early in the morning.",
    "List the planets of the solar system and one fact about each.",
    "Give advice to someone learning to play the piano as an adult.",
    "Summarise the water cycle for a ten-year-old.",
    "Describe the smell and sound of rain on a summer afternoon.",
    "Explain why the sky is blue in a few sentences.",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="benchmark a running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("MISTRAL7B_API_KEY"))
    p.add_argument("-m", "--model", default="default", help="model for the started server")
    p.add_argument("-t", "--threads", type=int, help="torch threads of the started server")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for the started server (repeatable), e.g. "
                        "--server-arg=--prefill-chunk=128")
    p.add_argument("--concurrency", default="1,4,8,16",
                   help="client counts to run (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=2, help="requests per client per level")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every level this many times, the levels taking turns (1, 8, 1, "
                        "8, ...: on a VM speed drifts by the minute); the table gives medians "
                        "and each round's ratio to its own one-client level")
    p.add_argument("--system-tokens", type=int, default=0, metavar="N",
                   help="put a shared preamble of about N tokens before every prompt (a "
                        "system prompt that the prefix cache can share; compare with "
                        "--server-arg=--no-prefix-cache)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve this adapter as model NAME (repeatable)")
    p.add_argument("--random-adapters", type=int, default=0, metavar="N",
                   help="write N random rank-16 adapters for the model and serve them")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p.parse_args()


def random_adapters(model: str, n: int, folder: Path) -> list[str]:
    """NAME=PATH specs of n random rank-16 adapters (all seven projections) for `model`."""
    import torch

    import mistral7b
    from mistral7b.lora import adapter_from_model, apply_lora, lora_parameters, save_peft

    specs = []
    for i in range(n):
        llm = mistral7b.load(model)
        apply_lora(llm.model, rank=16, alpha=32)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in lora_parameters(llm.model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        path = folder / f"lora{i + 1}"
        save_peft(adapter_from_model(llm.model), path, llm.config)
        specs.append(f"lora{i + 1}={path}")
    return specs


PREAMBLE = ("You are a careful assistant for a public library. Answer in plain words, cite the "
            "shelf where a reader can learn more, and never invent a book that does not exist. ")


def preamble(tokens: int) -> str:
    """About `tokens` tokens of a fixed text (English runs near 4.5 characters a token)."""
    if tokens <= 0:
        return ""
    text = PREAMBLE * (tokens * 9 // (2 * len(PREAMBLE)) + 1)
    return text[: tokens * 9 // 2] + "\n\n"


def start_server(args: argparse.Namespace, max_clients: int) -> tuple[subprocess.Popen, str]:
    log = Path(tempfile.mkstemp(prefix="bench_server_", suffix=".log")[1])
    cmd = [sys.executable, "-m", "mistral7b.cli.serve", "-m", args.model, "--port", "0",
           "--max-concurrency", str(max_clients), "--no-access-log", *args.server_arg,
           *(f"--lora={spec}" for spec in args.lora)]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    print(f"starting: {' '.join(cmd)} (log: {log})", file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.monotonic() + 900
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited:\n{log.read_text()}")
        found = re.search(r"listening on (http://\S+)", log.read_text())
        if found and url is None:
            url = found.group(1)
        if url:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not become ready")


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int,
                      model: str | None = None) -> tuple[float, int]:
    """(TTFT in s, generated tokens) of one streamed completion."""
    payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "model": model,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=payload) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return ttft or 0.0, tokens


REQUEST_NUMBERS = itertools.count(1)     # every prompt of a run its own (the docstring)


async def level(url: str, headers: dict, clients: int, requests: int, max_tokens: int,
                system: str = "", models: list[str | None] | None = None) -> dict:
    models = models or [None]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=3600,
                                 limits=limits) as client:
        async def worker(i: int) -> list[tuple[float, int]]:
            return [await one_request(
                        client, f"{system}Request {next(REQUEST_NUMBERS)}. "
                                f"{PROMPTS[(i + k) % len(PROMPTS)]}",
                        max_tokens, models[i % len(models)])
                    for k in range(requests)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients)))
                   for r in rs]
        wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    return {"clients": clients, "models": "+".join(m or "base" for m in models),
            "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))]}


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc = None
    url = args.url
    workdir = tempfile.TemporaryDirectory(prefix="bench_server_")
    if args.random_adapters:
        args.lora += random_adapters(args.model, args.random_adapters, Path(workdir.name))
    mixes: list[list[str | None]] = [[None]]
    if args.lora:
        mixes.append([None, *(spec.split("=", 1)[0] for spec in args.lora)])
    if url is None:
        proc, url = start_server(args, max(levels))
    try:
        asyncio.run(level(url, headers, 1, 1, 8))                     # warm-up
        for mix in mixes[1:]:
            asyncio.run(level(url, headers, len(mix), 1, 8, models=mix))
        rows = []
        for r in range(args.rounds):
            for c in levels:
                for mix in mixes:
                    rows.append({"round": r, **asyncio.run(level(
                        url, headers, c, args.requests, args.max_tokens,
                        preamble(args.system_tokens), mix))})
                    print(f"  round {r + 1}: {c} client(s) on {rows[-1]['models']}: "
                          f"{rows[-1]['tok_s']:.1f} tok/s", file=sys.stderr)
    finally:
        workdir.cleanup()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    report(args, url, rows)


def report(args: argparse.Namespace, url: str, rows: list[dict]) -> None:
    """Each level's medians over the rounds, its ratio to the one-client level of the same
    round (their median), and every round's ratio."""
    base = {r["round"]: r["tok_s"] for r in rows if r["clients"] == 1 and r["models"] == "base"}
    table: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        table.setdefault((r["clients"], r["models"]), []).append(r)
    if args.json:
        print(json.dumps({"url": url, "model": args.model if args.url is None else None,
                          "max_tokens": args.max_tokens, "levels": rows}, indent=2))
        return
    print(f"model: {args.model if args.url is None else url} | {args.max_tokens} tokens per "
          f"request | {args.requests} requests per client | {args.rounds} round(s), medians")
    print("| clients | models | requests | generated tok | wall s | aggregate tok/s | vs 1 client "
          "| TTFT p50 s | TTFT p90 s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    ratios = {}
    for (clients, models), runs in table.items():
        med = {k: statistics.median(r[k] for r in runs)
               for k in ("requests", "tokens", "wall_s", "tok_s", "ttft_p50_s", "ttft_p90_s")}
        ratios[clients, models] = [r["tok_s"] / base[r["round"]] for r in runs
                                   if r["round"] in base]
        speedup = f"{statistics.median(ratios[clients, models]):.2f}x" if base else "-"
        print(f"| {clients} | {models} | {med['requests']:.0f} | {med['tokens']:.0f} "
              f"| {med['wall_s']:.1f} | {med['tok_s']:.1f} | {speedup} | {med['ttft_p50_s']:.3f} "
              f"| {med['ttft_p90_s']:.3f} |")
    if args.rounds > 1 and base:
        print("each round's ratio to its one-client level: " + "; ".join(
            f"{clients} on {models}: " + ", ".join(f"{x:.2f}x" for x in values)
            for (clients, models), values in ratios.items() if clients != 1 or models != "base"))


if __name__ == "__main__":
    main()
