"""`LLM.generate` / `stream` / `chat` on the caller's thread: the server's step loop
(scheduler.py), every prompt of the call admitted at once, outputs yielded as they come."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

import torch

from mistral7b.engine import Engine
from mistral7b.errors import InputError
from mistral7b.request import GenerationRequest, Output
from mistral7b.scheduler import Scheduler
from mistral7b.sequence import GenerationStats

if TYPE_CHECKING:
    from mistral7b.draft import DraftModel
    from mistral7b.grammar import Grammar
    from mistral7b.tokenizer.base import IncrementalDecoder


def run_batch(engine: Engine, prompts: list[list[int]], params: list, *,
              stop_ids: frozenset[int], new_decoder: Callable[[], IncrementalDecoder],
              max_context: int | None = None, chunk_size: int | None = None,
              stats: GenerationStats | None = None, grammar: Grammar | None = None,
              speculate: int = 0, adapter: int = 0, draft: DraftModel | None = None
              ) -> Generator[tuple[int, Output], None, None]:
    """Generate for a ragged batch on the caller's thread: the same loop the server runs,
    every prompt admitted at once. Yields (prompt index, Output) as they come; raises the
    first failure. Closing the iterator stops the batch and frees its blocks. `grammar`
    (structured output) constrains every prompt's completion; `draft` drafts for
    `speculate` instead of prompt lookup (draft.py)."""
    context = max_context or engine.config.max_seq_len
    requests: list[GenerationRequest] = []
    outputs: collections.deque[tuple[int, Output]] = collections.deque()
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        if not prompt:
            raise InputError(f"prompt {i} is empty: give at least one token")
        engine.check_ids(prompt)
        if len(prompt) >= context:
            raise InputError(f"prompt {i} has {len(prompt)} tokens but the context is "
                             f"{context}: shorten the prompt or raise the context size")
        max_tokens = min(p.max_tokens, context - len(prompt))
        requests.append(GenerationRequest(list(prompt), [p], functools.partial(
            lambda i, out: outputs.append((i, out)), i), max_tokens, grammar=grammar,
            adapter=adapter))
    chunk = chunk_size or engine.default_chunk()
    if chunk < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    engine.forget_stale_prefixes()
    sched = Scheduler(engine, stop_ids=stop_ids, new_decoder=new_decoder,
                      max_concurrency=len(requests), max_queue=len(requests),
                      max_model_len=context, prefill_chunk=chunk,
                      prefill_budget=chunk * len(requests), speculate=speculate,
                      draft=draft)
    if stats is not None:
        sched.stats = stats
    for req in requests:
        sched.submit(req)
    governor = engine.governor()
    saved_threads = torch.get_num_threads()
    if governor is not None:    # its choice holds for our steps only: restored on return
        torch.set_num_threads(governor.threads)
    try:
        while not all(r.done for r in requests):
            sched.run_once()
            while outputs:
                i, out = outputs.popleft()
                if out.error is not None:
                    raise out.error
                yield i, out
    finally:
        sched.abort()
        torch.set_num_threads(saved_threads)
