"""The life of one server: loading, serving, draining, closed.

`/health` answers 503 until `install` has run (the model loads in a background thread after
the socket is bound, so a client can poll), then 200; after `drain` (SIGTERM) it is 503 again
and the scheduler admits nothing new.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from mistral7b.errors import InputError
from mistral7b.scheduler import Scheduler
from mistral7b.server.errors import APIError
from mistral7b.server.metrics import Metrics
from mistral7b.server.serving import Serving
from mistral7b.server.settings import ServerSettings

if TYPE_CHECKING:
    from mistral7b.api import LLM

log = logging.getLogger("mistral7b.server")


class ServerState:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics(lambda: self.scheduler)
        self.llm: LLM | None = None
        self.scheduler: Scheduler | None = None
        self.serving: Serving | None = None
        self.load_error: str | None = None
        self.draining = False
        self.stop_server: Callable[[], None] = lambda: None   # set by the runner

    def install(self, llm: LLM) -> None:
        """Put a loaded model behind the API: build its scheduler and start the step loop."""
        if llm.tokenizer is None:
            raise InputError(f"{llm.path}: the model has no tokenizer; the server needs one")
        trained = llm.config.max_seq_len
        max_len = self.settings.max_model_len or trained
        if max_len > trained:
            raise InputError(f"--max-model-len {max_len} is more than the model's context "
                             f"({trained} tokens)")
        scheduler = Scheduler(llm.engine, stop_ids=llm.tokenizer.stop_ids,
                              new_decoder=llm.tokenizer.decoder,
                              max_concurrency=self.settings.max_concurrency,
                              max_queue=self.settings.max_queue, max_model_len=max_len,
                              prefill_chunk=self.settings.prefill_chunk,
                              prefix_cache=self.settings.prefix_cache,
                              speculate=llm.speculate, draft=llm.draft)
        pool = scheduler.pool
        log.info("KV cache: budget %.2f GiB (%d tokens at %d KiB each; --kv-cache-memory), "
                 "taken as sequences advance; up to %d sequences together",
                 pool.nbytes / 2**30, pool.capacity_blocks * pool.block_size,
                 pool.slot_bytes // 1024, self.settings.max_concurrency)
        if llm.draft is not None and llm.speculate:
            log.info("speculative decoding: %s drafts %d tokens a step", llm.draft.name,
                     llm.speculate)
        self.llm = llm
        self.serving = Serving.build(llm, scheduler, self.settings, self.metrics, max_len)
        self.scheduler = scheduler
        scheduler.start()
        if self.draining:      # SIGTERM arrived while loading
            scheduler.drain(0.0)

    def require(self) -> Serving:
        """The serving layer, or a 503 while loading / shutting down."""
        retry = {"Retry-After": str(self.settings.retry_after)}
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.serving is None:
            if self.load_error is not None:
                raise APIError(503, f"the model failed to load: {self.load_error}",
                               code="model_load_failed")
            raise APIError(503, "the model is still loading; retry shortly",
                           code="model_loading", headers=retry)
        return self.serving

    def drain(self) -> None:
        """Stop admitting; in-flight requests get settings.shutdown_grace seconds."""
        self.draining = True
        if self.scheduler is not None:
            self.scheduler.drain(self.settings.shutdown_grace)

    def close(self) -> None:
        self.draining = True
        if self.scheduler is not None:
            self.scheduler.close(timeout=30.0)
