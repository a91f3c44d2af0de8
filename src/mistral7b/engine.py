"""The engine: a Transformer and the only owner of its KV cache (a `KVPool`).

`step` feeds each batch row its next tokens (a pre-fill chunk, or one token when decoding)
through the row's block table; rows of different lengths share one forward and only ever
see their own positions. What to feed and when (the step loop, sampling, stops) is the
scheduler's; the pool is sized here, once, from the memory budget.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence

import torch

from mistral7b.attention_plan import PAGED_MAX_T
from mistral7b.cache import BLOCK_SIZE, BlockTable, KVPool
from mistral7b.config import ModelConfig
from mistral7b.errors import InputError
from mistral7b.fused_step import FusedDecode
from mistral7b.fused_step import enabled as fused_step_enabled
from mistral7b.heap import keep_step_memory
from mistral7b.lora.layers import AdapterRows
from mistral7b.model import Transformer
from mistral7b.threads import ThreadGovernor

# Chunk length for pre-fill when the model has no window (with one, the default is W):
# bounds the (T, T + cached) attention mask and activations for long prompts.
DEFAULT_CHUNK_NO_WINDOW = 4096
# Default KV budget: this share of the memory available when the cache is first needed
# (MemAvailable on CPU, free device memory on CUDA). On CPU it is a cap, not an allocation:
# pages are committed as blocks are written.
DEFAULT_KV_SHARE_CPU = 0.5
DEFAULT_KV_SHARE_CUDA = 0.8


def available_memory(device: torch.device) -> int:
    """Bytes available for the KV cache now: free device memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def default_kv_budget(device: torch.device) -> int:
    share = DEFAULT_KV_SHARE_CUDA if device.type == "cuda" else DEFAULT_KV_SHARE_CPU
    return int(available_memory(device) * share)


class Engine:
    """Runs a Transformer through a paged KV cache."""

    def __init__(self, model: Transformer, config: ModelConfig,
                 kv_cache_memory: int | None = None, kv_block_size: int = BLOCK_SIZE) -> None:
        if kv_cache_memory is not None and kv_cache_memory <= 0:
            raise InputError(f"kv_cache_memory must be a positive number of bytes, got "
                             f"{kv_cache_memory}")
        self.model = model
        self.config = config
        self.kv_cache_memory = kv_cache_memory
        self.kv_block_size = kv_block_size
        self._pool: KVPool | None = None
        # what makes the pool (tensor parallel: one mirrored on every rank, tp_model.py)
        self.pool_type: Callable[..., KVPool] = KVPool
        self._weights_stamp: int | None = None
        # Decode thread count chosen by measurement (threads.py) on the CPU, unless the user
        # fixed it (OMP_NUM_THREADS, or the CLI's -t, which turns this off).
        self.adaptive_threads = "OMP_NUM_THREADS" not in os.environ
        self._governor: ThreadGovernor | None = None
        # which served LoRA adapter each row of a step uses (lora.multi.add_served_adapter)
        self.adapter_rows = AdapterRows()
        # decode steps through the fused C++ step where it applies (fused_step.py)
        self.use_fused_step = fused_step_enabled()
        self._fused: FusedDecode | None = None
        self._fused_tried = False

    @property
    def device(self) -> torch.device:
        return self.model.table_device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.table_dtype

    @property
    def pool(self) -> KVPool:
        """The KV cache, made on first use with the budget (`kv_cache_memory` or a share of
        the memory available then)."""
        if self._pool is None:
            budget = self.kv_cache_memory or default_kv_budget(self.device)
            for attempt in range(5):
                try:
                    self._pool = self._new_pool(budget)
                    break
                except InputError:
                    # The default is a share of what looked free; where the system will not
                    # reserve that much (strict overcommit, a busy GPU), take less.
                    if self.kv_cache_memory is not None or attempt == 4:
                        raise
                    budget //= 2
        assert self._pool is not None
        return self._pool

    @property
    def pool_made(self) -> bool:
        """Whether the pool exists yet (`pool` makes it, taking its budget then)."""
        return self._pool is not None

    def _new_pool(self, budget: int) -> KVPool:
        # Normal tensors even when first needed inside a step: inference tensors could not be
        # written outside inference mode (reuse copies a partial block, tests fill it).
        with torch.inference_mode(False):
            return self.pool_type(self.config, budget, dtype=self.dtype, device=self.device,
                                  block_size=self.kv_block_size)

    def governor(self) -> ThreadGovernor | None:
        """The decode-step thread governor (made with the thread count torch has the first
        time), or None where threads are fixed or the model is not on the CPU."""
        if not self.adaptive_threads or self.device.type != "cpu":
            return None
        if self._governor is None:
            self._governor = ThreadGovernor(torch.get_num_threads())
        return self._governor

    def forget_stale_prefixes(self) -> None:
        """Drop the cached prefixes if the weights changed since they were computed (a LoRA
        applied or merged, a training step, a module swapped): their KV would be wrong.
        Each tensor's version counter moves with every in-place change; ids catch swaps."""
        stamp = 0
        for t in itertools.chain(self.model.parameters(), self.model.buffers()):
            try:
                version = t._version
            except RuntimeError:        # an inference tensor: it cannot change in place
                version = 0
            stamp = hash((stamp, id(t), version))
        if stamp != self._weights_stamp and self._pool is not None:
            self._pool.clear_prefixes()
        self._weights_stamp = stamp
        if self._fused is None:     # look again: what kept it off (a hook, a wrapper) may be gone
            self._fused_tried = False

    def default_chunk(self) -> int:
        return self.config.sliding_window or DEFAULT_CHUNK_NO_WINDOW

    def check_ids(self, ids: Sequence[int]) -> None:
        vocab = self.config.vocab_size
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            raise InputError(f"token id(s) {bad[:5]} are outside the vocabulary [0, {vocab})")

    # ------------------------------------------------------------------ steps

    @torch.inference_mode()
    def step(self, tables: list[BlockTable], chunks: list[list[int]],
             all_logits: bool = False, adapters: list[int] | None = None) -> torch.Tensor:
        """Feed chunks[b] (non-empty) to tables[b] in one forward; row b uses served adapter
        slot adapters[b] (0 or None: the base weights).

        Returns float32 logits of each row's last token (B, V), or with all_logits of every
        token (B, T, V) where row b's positions >= len(chunks[b]) are padding. Raises
        KVCacheFull (nothing changed) when the pool has no room for the new tokens.
        """
        n_new = [len(c) for c in chunks]
        if not chunks or min(n_new) < 1:
            raise ValueError("every row of a step needs at least one token")
        T = max(n_new)
        tokens = torch.zeros(len(chunks), T, dtype=torch.long)
        for b, chunk in enumerate(chunks):
            tokens[b, : len(chunk)] = torch.as_tensor(chunk, dtype=torch.long)
        if self.device.type == "cpu":
            keep_step_memory()      # no page faults for the temporaries of every step (heap.py)
        tokens = tokens.to(self.device)
        pool = self.pool
        plan, positions = pool.plan(tables, n_new)
        try:
            self.adapter_rows.set(adapters, self.device)
            forward: Callable[..., torch.Tensor] = self.model
            if T <= PAGED_MAX_T and pool.paged is not None and not (adapters and any(adapters)):
                forward = self.fused_step() or self.model    # the same numbers, faster
            if all_logits:
                out = forward(tokens, positions, pool, plan)
            else:
                last = torch.tensor(n_new, device=self.device)[:, None] - 1
                out = forward(tokens, positions, pool, plan, logits_index=last)[:, 0]
        except BaseException:
            # The forward did not finish: what these tokens wrote is unusable.
            for t, n in zip(tables, n_new):
                t.length -= n
            raise
        finally:
            self.adapter_rows.clear()
        return out

    def fused_step(self) -> FusedDecode | None:
        """The one-call decode step (fused_step.py) for this model as it is now, or None
        where it does not apply; rebuilt after a module or parameter swap."""
        if not self.use_fused_step:
            return None
        if self._fused is not None and not self._fused.current():
            self._fused, self._fused_tried = None, False
        if not self._fused_tried:
            self._fused = FusedDecode.build(self.model)
            self._fused_tried = True
        return self._fused

    @torch.inference_mode()
    def logits(self, ids: Sequence[int], chunk_size: int | None = None) -> torch.Tensor:
        """Float32 logits (len(ids), V) computed through the cache, chunk_size tokens a step."""
        ids = list(ids)
        if not ids:
            raise InputError("logits() needs at least one token id")
        self.check_ids(ids)
        chunk = chunk_size or self.default_chunk()
        if chunk < 1:
            raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
        table = BlockTable()
        try:
            parts = [self.step([table], [ids[s: s + chunk]], all_logits=True)[0]
                     for s in range(0, len(ids), chunk)]
        finally:
            self.pool.release(table)
        return torch.cat(parts)
