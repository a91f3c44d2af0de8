"""Timing one engine's pre-fill and greedy decode the same way in every bench script."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def time_generation(prefill: Callable[[list[int]], int], decode: Callable[[int], int],
                    ids: list[int], gen_tokens: int, repeat: int,
                    warmup: int = 0) -> list[tuple[float, float, list[int]]]:
    """`warmup` untimed runs, then per run (pre-fill tok/s, decode tok/s, greedy tokens):
    pre-fill of `ids` gives the first token, then gen_tokens - 1 decode steps."""
    runs = []
    for i in range(warmup + repeat):
        t = time.perf_counter()
        tok = prefill(ids)
        pre = time.perf_counter() - t
        t = time.perf_counter()
        tokens = [tok]
        for _ in range(gen_tokens - 1):
            tok = decode(tok)
            tokens.append(tok)
        dec = time.perf_counter() - t
        if i >= warmup:
            runs.append((len(ids) / pre, (gen_tokens - 1) / dec, tokens))
    return runs


def engine_steps(llm: Any) -> tuple[Callable[[list[int]], int], Callable[[int], int]]:
    """(pre-fill, decode) over a loaded mistral7b LLM's engine, greedy, one forward each;
    a pre-fill starts a fresh sequence (the previous one's blocks given back)."""
    from mistral7b.cache import BlockTable

    engine = llm.engine
    state: dict[str, Any] = {}

    def prefill(ids: list[int]) -> int:
        if "table" in state:
            engine.pool.release(state["table"])
        state["table"] = BlockTable()
        return int(engine.step([state["table"]], [ids])[0].argmax())

    def decode(tok: int) -> int:
        return int(engine.step([state["table"]], [[tok]])[0].argmax())

    return prefill, decode
