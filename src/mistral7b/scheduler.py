"""The one step loop: continuous batching over the engine's paged KV cache, for every surface.

The server submits `GenerationRequest`s and runs the loop on a thread (`start`), so torch work
never blocks the asyncio event loop; `LLM.generate` / `stream` / `chat` drive the very same
loop without a thread (`batch.run_batch`). The request side (queue, thread, cancellation, timeouts,
draining, how a request ends) is `queueing.RequestQueue`; this module is what a step does. Every choice of a request (`n` of them) is one
`Sequence` with its own block table. At each step boundary the loop:

    1. drops cancelled requests and fails expired ones (their blocks go back to the pool);
    2. admits waiting sequences, first come first served, while a row (`max_concurrency`)
       and memory are free: a new prompt first takes the longest cached prefix of its
       tokens (`KVPool.reuse`), then needs blocks for the rest plus one of headroom for
       each running sequence; one that does not fit waits;
    3. decodes: one forward feeds every decoding sequence its last token (B_d x 1), or with
       `speculate` its last token and a draft, verified at once: a prompt-lookup draft
       (speculate.py) or, given a `draft` model, that model's greedy guesses (draft.py);
    4. pre-fills: one forward feeds waiting prompts their next chunk (B_p x T), up to
       `prefill_budget` prompt tokens per step, so running streams are never starved;
    5. samples each row with its own parameters and generator (one place, `_sample`, which
       also isolates a bad row; a row under a grammar, structured output, first has its
       logits masked to what its `constrain.Constraint` allows next) and hands every row's
       output to its request's `emit`.

Decode rows and pre-fill rows go through separate `Engine.step` calls because a step pads
every row to its longest chunk: 8 decode rows beside one 128-token chunk would compute
9 x 128 tokens instead of 8 + 128. Measured on SmolLM2-135M, one CPU thread: separate calls
0.41 s per step, merged 3.2 s; even 16-token chunks merged cost 2.5x the separate calls.

Prompt chunks start at fixed offsets (multiples of `prefill_chunk` after the reused prefix),
so a prompt is cut the same way alone or under load.

The `n` choices of a request are pre-filled once: choice 0 runs the prompt; when its last
prompt token is fed, the others fork its table (full blocks shared, the partial one copied)
and sample their first token from the same logits. When the pool runs out of blocks in the
middle of a step, the most recently admitted sequence is preempted: its blocks go back
(full ones stay cached, so taking them again is cheap) and it waits at the head of the queue
to be re-filled from its tokens, which continues it exactly where it stopped.

Failures stay with their request: NaN/inf logits fail the rows that produced them
(`NonFiniteLogitsError.rows`), any other exception in a step fails the requests of that step,
and the loop goes on. Every request ends with exactly one of: a final `Output` per choice
(`finish_reason` set), or one `Output` with `error` set. A cancelled request ends silently.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from mistral7b.cache import KVCacheFull
from mistral7b.engine import Engine
from mistral7b.errors import InputError
from mistral7b.queueing import THROUGHPUT_WINDOW_S, ChoiceSeq, RequestQueue
from mistral7b.request import GenerationRequest, Output, RequestFailed
from mistral7b.sampling import NonFiniteLogitsError, make_generator, sample_batch
from mistral7b.sequence import GenerationStats, Sequence, prompt_logprobs
from mistral7b.speculate import check_speculate, propose, verify

if TYPE_CHECKING:
    from mistral7b.draft import DraftModel
    from mistral7b.tokenizer.base import IncrementalDecoder

log = logging.getLogger("mistral7b.scheduler")

DEFAULT_PREFILL_CHUNK = 256


class KVCacheTooSmall(InputError):
    """A request that can never fit the KV cache budget (HTTP 400)."""


class Scheduler(RequestQueue):
    """Owns the step loop over an engine's KV pool (and, for the server, its thread).

    `stop_ids` and `new_decoder` come from the tokenizer (EOS/end-of-turn ids; a fresh
    streaming detokenizer per choice).
    """

    def __init__(self, engine: Engine, *, stop_ids: frozenset[int],
                 new_decoder: Callable[[], IncrementalDecoder], max_concurrency: int = 8,
                 max_queue: int = 64, max_model_len: int,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefill_budget: int | None = None, prefix_cache: bool = True,
                 speculate: int = 0, draft: DraftModel | None = None) -> None:
        if max_concurrency < 1 or max_queue < 0 or max_model_len < 2 or prefill_chunk < 1:
            raise ValueError("max_concurrency >= 1, max_queue >= 0, max_model_len >= 2 and "
                             "prefill_chunk >= 1 are required")
        super().__init__(max_concurrency=max_concurrency, max_queue=max_queue)
        self.engine = engine
        self.pool = engine.pool
        self.stop_ids = stop_ids
        self.new_decoder = new_decoder
        self.max_model_len = max_model_len
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget or prefill_chunk
        self.prefix_cache = prefix_cache
        self.speculate = check_speculate(speculate)   # draft tokens per decode step (0: off)
        self.draft = draft          # the draft model, or None: prompt lookup
        self._order = itertools.count()
        # figures for /metrics and the CLI, written by the loop only
        self.stats = GenerationStats()
        self.preemptions = 0
        self.steps = 0
        self._t0 = time.perf_counter()

    # Lifetime figures for /metrics: the scheduler's own stats (run_batch gives each call a
    # scheduler of its own, so there they are the call's).
    @property
    def generated_tokens(self) -> int:
        return self.stats.generated_tokens

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens computed by pre-fill (not taken from the prefix cache)."""
        return self.stats.prefill_tokens

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens taken from the prefix cache."""
        return self.stats.cached_tokens

    def submit(self, req: GenerationRequest) -> None:
        """Queue a request; raises QueueFullError, ShuttingDownError, or KVCacheTooSmall when
        even the whole KV budget could not hold it (nothing is queued)."""
        if not req.prompt or len(req.prompt) + max(req.max_tokens, 1) > self.max_model_len + 1:
            raise ValueError("prompt + max_tokens exceed max_model_len")
        need = self.pool.blocks_for(len(req.prompt) + req.max_tokens)
        if need > self.pool.capacity_blocks:
            per_token = self.pool.slot_bytes
            raise KVCacheTooSmall(
                f"the prompt ({len(req.prompt)} tokens) and max_tokens ({req.max_tokens}) need "
                f"{need * self.pool.block_bytes / 2**20:.0f} MiB of KV cache "
                f"({per_token // 1024} KiB per token) but its budget is "
                f"{self.pool.nbytes / 2**20:.0f} MiB: raise --kv-cache-memory "
                f"(kv_cache_memory= in Python) or ask for fewer tokens")
        super().submit(req)

    @torch.inference_mode()
    def _iteration(self) -> None:
        self._reap()
        self._admit()
        self._sample_forks()
        decode = [s for s in self._running if s.seq.decoding]
        if decode:
            t0 = time.perf_counter()
            drafts = self._draft(decode)
            if any(drafts):
                self._speculative_decode(decode, drafts)
            else:
                decode, logits = self._step(decode, [s.seq.pending(1) for s in decode])
                if logits is not None:
                    self._sample(decode, logits)
            elapsed = time.perf_counter() - t0
            self.stats.decode_seconds += elapsed
            governor = self.engine.governor()
            if governor is not None:
                governor.record(elapsed)   # the thread count for the next steps
        self._reap()            # cancellations that arrived during the decode step
        prefill = self._pick_prefill()
        if prefill:
            t0 = time.perf_counter()
            self._prefill(prefill)
            self.stats.prefill_seconds += time.perf_counter() - t0

    def _draft(self, rows: list[ChoiceSeq]) -> list[list[int]]:
        """Draft tokens for each decoding row, the draft model's or else by prompt lookup; at
        most what the row may still emit, less the token the step samples anyway."""
        room = [min(self.speculate, s.seq.max_tokens - len(s.seq.output) - 1) for s in rows]
        if self.draft is not None:
            return self.draft.propose([s.seq for s in rows], room)
        return [propose(s.seq.tokens, n) if n > 0 else [] for s, n in zip(rows, room)]

    def _speculative_decode(self, seqs: list[ChoiceSeq], drafts: list[list[int]]) -> None:
        """Feed each row its last token and its draft in one step, then emit tokens position
        by position while they match the draft (speculate.py's verification rule)."""
        draft_of = {id(s): d for s, d in zip(seqs, drafts)}
        seqs, logits = self._step(seqs, [s.seq.pending(1) + d for s, d in zip(seqs, drafts)],
                                  all_logits=True)
        if logits is None:
            return
        drafts = [draft_of[id(s)] for s in seqs]
        x_at = {id(s): s.seq.fed - 1 - len(d) for s, d in zip(seqs, drafts)}  # position of x
        kept = verify(seqs, drafts, logits, self._sample,
                      lambda s, n: self.pool.truncate(s.seq.table, x_at[id(s)] + n))
        self.stats.draft_tokens += sum(map(len, drafts))
        self.stats.accepted_tokens += sum(kept)
        if self.draft is not None:      # rows that ended were released already
            for s, n in zip(seqs, kept):
                self.draft.accept(s.seq, n)

    def _free(self, s: ChoiceSeq) -> None:
        self.pool.release(s.seq.table, s.seq.tokens)
        if self.draft is not None:
            self.draft.release(s.seq)

    def _admit(self) -> None:
        """Forks and preempted sequences first, then new requests, while rows and memory
        allow (see the module docstring, step 2)."""
        while self._ready and self._free_rows() > 0:
            s = self._ready[0]
            if not s.seq.table.blocks:      # preempted, or a fork that found no block
                s.first_logits = None       # re-filled from its tokens, then sampled
                self.pool.reuse(s.seq.table, s.seq.tokens)
            if not self._fits(s.seq):
                self.pool.release(s.seq.table)
                return
            self._ready.popleft()
            s.order = next(self._order)
            self._running.append(s)
        while self._free_rows() > 0:
            with self._cond:
                if not self._waiting:
                    return
                req = self._waiting[0]
            params = req.params[0]
            seq = Sequence(req.prompt, params, self.stop_ids, self.new_decoder(),
                           max(req.max_tokens, 1), make_generator(params.seed),
                           constraint=req.grammar.constraint() if req.grammar else None)
            seq.table.salt = self.engine.adapter_rows.salts[req.adapter]
            # scoring needs the logits of every prompt position
            reuse = self.prefix_cache and req.prompt_logprobs is None
            scoring = req.prompt_logprobs is not None
            if reuse:
                seq.cached_tokens = self.pool.reuse(seq.table, seq.tokens)
            if not self._fits(seq):
                self.pool.release(seq.table)
                return                  # wait for memory to come back
            with self._cond:
                if req.cancelled or not self._waiting or self._waiting[0] is not req:
                    self.pool.release(seq.table)
                    continue
                self._waiting.popleft()
                req._admitted = 1
            self.stats.cached_tokens += seq.cached_tokens
            self.stats.prompt_tokens += len(req.prompt)
            self._running.append(ChoiceSeq(req, 0, seq, next(self._order),
                                      [None] if scoring else None))

    def _fits(self, seq: Sequence) -> bool:
        """Blocks for the rest of its tokens, and one of headroom per running sequence. Alone
        anything fits: submit() refused what the whole pool cannot hold, and cached prefixes
        are evicted as blocks are taken."""
        if not self._running:
            return True
        held = sum(1 for b in seq.table.blocks if b > 0)
        need = max(self.pool.blocks_for(len(seq.tokens) + 1) - held, 1)
        return self.pool.available_blocks >= need + len(self._running)

    def _pick_prefill(self) -> list[ChoiceSeq]:
        """Pre-filling rows in admission order, up to prefill_budget tokens (at least one row)."""
        picked: list[ChoiceSeq] = []
        total = 0
        for s in self._running:
            if s.seq.decoding or s.seq.n_pending == 0:
                continue
            n = min(self._chunk_len(s), s.seq.n_pending)
            if picked and total + n > self.prefill_budget:
                break
            picked.append(s)
            total += n
        return picked

    def _chunk_len(self, s: ChoiceSeq) -> int:
        """Up to the next multiple of prefill_chunk after the reused prefix."""
        start = s.seq.cached_tokens
        return self.prefill_chunk - (s.seq.fed - start) % self.prefill_chunk

    def _prefill(self, seqs: list[ChoiceSeq]) -> None:
        if self.prefix_cache:           # what other rows computed since this one was admitted
            for s in seqs:
                if not s.scoring and not s.seq.output:
                    gained = self.pool.reuse(s.seq.table, s.seq.tokens)
                    s.seq.cached_tokens += gained
                    self.stats.cached_tokens += gained
        chunks = [s.seq.pending(self._chunk_len(s)) for s in seqs]
        plain = [i for i, s in enumerate(seqs) if not s.scoring]
        last: dict[int, torch.Tensor] = {}
        if plain:
            kept, logits = self._step([seqs[i] for i in plain], [chunks[i] for i in plain])
            if logits is not None:
                index = {id(s): i for i, s in enumerate(seqs)}
                last.update({index[id(s)]: logits[j] for j, s in enumerate(kept)})
        for i, s in enumerate(seqs):
            if s.prompt_lps is not None and not s.req.done:   # needs every position's logits
                fed = s.seq.fed
                _, logits = self._step([s], [chunks[i]], all_logits=True)
                if logits is None:
                    continue
                try:
                    s.prompt_lps.extend(prompt_logprobs(logits[0], s.seq.prompt, fed,
                                                        s.req.prompt_logprobs or 0))
                except NonFiniteLogitsError as exc:
                    self._fail(s.req, RequestFailed("model", str(exc)))
                    continue
                last[i] = logits[0, -1]
        done = []
        for i, s in enumerate(seqs):
            if i not in last or s.req.done:
                continue
            self.stats.prefill_tokens += len(chunks[i])
            if s.seq.n_pending == 0:
                done.append(i)
        sampled = []
        for i in done:
            s = seqs[i]
            if s.scoring and s.choice == 0 and not s.seq.output:
                s.req.emit(Output(s.choice, prompt_logprobs=s.prompt_lps))
                s.prompt_lps = None
            if s.req.max_tokens == 0:   # scoring only: nothing to generate
                self._finish(s, Output(s.choice, finish_reason="length"))
                continue
            if s.choice == 0 and not s.seq.output and s.req.n > 1:
                self._fork(s, last[i])
            sampled.append(i)
        if sampled:
            self._sample([seqs[i] for i in sampled], torch.stack([last[i] for i in sampled]))

    def _fork(self, s: ChoiceSeq, logits_row: torch.Tensor) -> None:
        """Choices 1..n-1 of s's request start from s's pre-filled prompt (module docstring)."""
        req = s.req
        for choice in range(1, req.n):
            params = req.params[choice]
            seq = Sequence(req.prompt, params, self.stop_ids, self.new_decoder(),
                           max(req.max_tokens, 1), make_generator(params.seed),
                           cached_tokens=s.seq.cached_tokens,
                           constraint=req.grammar.constraint() if req.grammar else None)
            seq.table.salt = s.seq.table.salt
            try:
                seq.table = self.pool.fork(s.seq.table)
            except KVCacheFull:
                pass                       # re-filled from its tokens when admitted
            self._ready.append(ChoiceSeq(req, choice, seq, -1, first_logits=logits_row.clone()))
        req._admitted = req.n

    def _sample_forks(self) -> None:
        """Admitted forks sample their first token from the logits of the shared prompt."""
        forks = [s for s in self._running if s.first_logits is not None]
        for s in forks:
            if s.seq.n_pending:            # its fork failed: it is re-filled instead
                s.first_logits = None
        logits = [s.first_logits for s in forks if s.first_logits is not None]
        forks = [s for s in forks if s.first_logits is not None]
        if forks:
            rows = torch.stack(logits)
            for s in forks:
                s.first_logits = None
            self._sample(forks, rows)

    def _step(self, seqs: list[ChoiceSeq], chunks: list[list[int]], all_logits: bool = False
              ) -> tuple[list[ChoiceSeq], torch.Tensor | None]:
        """One forward; on KVCacheFull preempt the newest sequences until it fits. Returns
        the sequences that were stepped (a preempted one is left out) and their logits."""
        while True:
            t0 = time.perf_counter()
            adapters = [s.req.adapter for s in seqs]     # served LoRA slot per row
            extra = {"adapters": adapters} if any(adapters) else {}
            try:
                logits = self.engine.step([s.seq.table for s in seqs], chunks,
                                          all_logits=all_logits, **extra)
            except KVCacheFull:
                victim = self._preempt()
                if victim is None:
                    for s in seqs:
                        self._fail(s.req, RequestFailed("model", _KV_FULL))
                    return [], None
                keep = [i for i, s in enumerate(seqs) if s is not victim]
                if not keep:
                    return [], None
                seqs, chunks = [seqs[i] for i in keep], [chunks[i] for i in keep]
                continue
            except Exception as exc:
                log.exception("model step failed for %d row(s)", len(seqs))
                for s in seqs:
                    self._fail(s.req, RequestFailed("internal", f"the model step failed: {exc}"))
                return [], None
            if log.isEnabledFor(logging.DEBUG):
                log.debug("step: %d row(s), %d token(s), padded to %d, %.3f s", len(seqs),
                          sum(map(len, chunks)), max(map(len, chunks)),
                          time.perf_counter() - t0)
            for s in seqs:
                self.pool.register(s.seq.table, s.seq.tokens)
            self.steps += 1
            return seqs, logits

    def _preempt(self) -> ChoiceSeq | None:
        """Free the blocks of the most recently admitted sequence (not a scoring one)."""
        if len(self._running) < 2:
            return None             # alone, it cannot make room for itself
        victim = max((s for s in self._running if not s.scoring), key=lambda s: s.order,
                     default=None)
        if victim is None:
            return None
        self._running.remove(victim)
        self._free(victim)
        self._ready.appendleft(victim)
        self.preemptions += 1
        log.info("KV cache full: preempted a sequence of %d tokens (it resumes later)",
                 len(victim.seq.tokens))
        return victim

    def _masked(self, seqs: list[ChoiceSeq], live: list[int], logits: torch.Tensor
                ) -> torch.Tensor:
        """logits[live], with each constrained row masked to what its grammar allows (a copy:
        log-probabilities are reported from the model's own logits)."""
        rows = logits[live]
        for j, i in enumerate(live):
            constraint = seqs[i].seq.constraint
            if constraint is None or seqs[i].req.done:
                continue
            t0 = time.perf_counter()
            try:
                constraint.mask_(rows[j])
            except Exception as exc:
                log.exception("the grammar mask failed")
                self._fail(seqs[i].req, RequestFailed("internal", str(exc)))
            self.stats.mask_seconds += time.perf_counter() - t0
            self.stats.masked_tokens += 1
        return rows

    def _sample(self, seqs: list[ChoiceSeq], logits: torch.Tensor) -> None:
        live = [i for i, s in enumerate(seqs) if not s.req.done]
        tokens: list[int] = []
        rows = self._masked(seqs, live, logits)
        while live:
            keep = [j for j, i in enumerate(live) if not seqs[i].req.done]
            if len(keep) < len(live):          # a mask or a bad row failed its request
                rows, live = rows[keep], [live[j] for j in keep]
                if not live:
                    break
            try:
                tokens = sample_batch(
                    rows, [seqs[i].seq.params for i in live],
                    [seqs[i].seq.generator for i in live],
                    [seqs[i].seq.history() for i in live])
                break
            except NonFiniteLogitsError as exc:
                for j in exc.rows:
                    self._fail(seqs[live[j]].req, RequestFailed("model", str(exc)))
            except Exception as exc:
                log.exception("sampling failed")
                for i in live:
                    self._fail(seqs[i].req, RequestFailed("internal", f"sampling failed: {exc}"))
                return
        now = time.monotonic()
        for i, token in zip(live, tokens):
            s = seqs[i]
            if s.req.done:     # another choice of its request failed in this loop
                continue
            try:
                event = s.seq.accept(token, logits[i])
            except Exception as exc:
                log.exception("accepting a token failed")
                self._fail(s.req, RequestFailed("internal", f"decoding failed: {exc}"))
                continue
            self.stats.generated_tokens += 1
            if self.stats.first_token_seconds is None:
                self.stats.first_token_seconds = time.perf_counter() - self._t0
            lp = None
            if s.seq.params.logprobs and event.token_id is not None:
                lp = s.seq.logprobs[-1]
            out = Output(s.choice, event.text, event.token_id, lp, event.finish_reason,
                         len(s.seq.output), cached_tokens=s.seq.cached_tokens)
            if event.finish_reason:
                self._finish(s, out)
            else:
                s.req.emit(out)
        if tokens:
            self._recent.append((now, len(tokens)))
            while self._recent and now - self._recent[0][0] > THROUGHPUT_WINDOW_S:
                self._recent.popleft()

_KV_FULL = ("the KV cache is full even with this request alone: raise --kv-cache-memory "
            "(kv_cache_memory= in Python) or shorten the request")
