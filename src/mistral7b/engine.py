"""The engine: the only owner of the KV cache. Chunked pre-fill, decode steps, ragged batches,
sampling and stop handling for `generate` / `stream`.

A step feeds each batch row its next tokens (a pre-fill chunk, or one token when decoding);
rows of different lengths share one forward and only ever see their own cache row.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mistral7b.cache import KVCache
from mistral7b.config import ModelConfig
from mistral7b.errors import InputError
from mistral7b.model import Transformer
from mistral7b.sampling import (
    SamplingParams,
    TokenHistory,
    make_generator,
    sample_batch,
    token_logprobs,
)
from mistral7b.stops import StopMatcher

if TYPE_CHECKING:
    from mistral7b.tokenizer.base import IncrementalDecoder

# Chunk length for pre-fill when the model has no window (with one, the default is W):
# bounds the (T, T + cached) attention mask and activations for long prompts.
DEFAULT_CHUNK_NO_WINDOW = 4096


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    """One finished sequence. `token_ids` are the generated ids (EOS excluded)."""

    text: str
    token_ids: list[int]
    finish_reason: str                       # "stop" (EOS or stop string) | "length"
    prompt_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerationStats:
    """Timings of the last generate/stream call, for the CLI's summary on stderr."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # The first generated token comes out of pre-fill; decode steps make the rest.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Event:
    """What one step did to one sequence: new text, and the finish reason when it ended."""

    index: int
    text: str
    token_id: int | None
    finish_reason: str | None = None
    completion: Completion | None = None   # set on the event that finishes the sequence


@dataclass
class SequenceState:
    """Generation state of one sequence (one cache row): prompt, sampling, output, stops.

    `index` is the cache row. The engine's generate() and the server's scheduler both drive
    sequences through `accept`, so EOS, stop strings and max_tokens behave the same in both.
    """

    index: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    decoder: IncrementalDecoder         # the tokenizer's, one per sequence
    max_tokens: int
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    fed: int = 0                        # prompt tokens already in the cache
    finish_reason: str | None = None
    stops: StopMatcher = field(init=False)

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.params.stop)

    def accept(self, token: int, logits_row: torch.Tensor) -> Event:
        """Take a sampled token: update text, stop strings, EOS and length; return the event."""
        if self.params.logprobs:
            lp, top = token_logprobs(logits_row, token, self.params.top_logprobs)
            self.logprobs.append(TokenLogprob(token, lp, top))
        eos = token in self.stop_ids and not self.params.ignore_eos
        if eos:
            text = self.decoder.flush()
        else:
            self.output.append(token)
            text = self.decoder.push(token)
            if len(self.output) >= self.max_tokens:
                text += self.decoder.flush()
        delta, stopped = self.stops.push(text)
        if stopped or eos:
            self.finish_reason = "stop"
        elif len(self.output) >= self.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason and not stopped:
            delta += self.stops.flush()
        self.text.append(delta)
        event = Event(self.index, delta, None if eos else token, self.finish_reason)
        if self.finish_reason:
            event.completion = self.completion()
        return event

    def completion(self) -> Completion:
        return Completion("".join(self.text), list(self.output), self.finish_reason or "length",
                          len(self.prompt), self.logprobs if self.params.logprobs else None)


class Engine:
    """Runs a Transformer through a rolling KV cache."""

    def __init__(self, model: Transformer, config: ModelConfig) -> None:
        self.model = model
        self.config = config
        self.stats = GenerationStats()

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_embeddings.weight.dtype

    def default_chunk(self) -> int:
        return self.config.sliding_window or DEFAULT_CHUNK_NO_WINDOW

    def new_cache(self, n_rows: int, max_seq_len: int) -> KVCache:
        return KVCache(self.config, n_rows, max_seq_len, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ steps

    @torch.inference_mode()
    def step(self, cache: KVCache, rows: list[int], chunks: list[list[int]],
             all_logits: bool = False) -> torch.Tensor:
        """Feed chunks[b] (non-empty) to cache row rows[b] in one forward.

        Returns float32 logits of each row's last token (B, V), or with all_logits of every
        token (B, T, V) where row b's positions >= len(chunks[b]) are padding.
        """
        n_new = [len(c) for c in chunks]
        if min(n_new) < 1:
            raise ValueError("every row of a step needs at least one token")
        T = max(n_new)
        tokens = torch.zeros(len(chunks), T, dtype=torch.long)
        for b, chunk in enumerate(chunks):
            tokens[b, : len(chunk)] = torch.as_tensor(chunk, dtype=torch.long)
        tokens = tokens.to(self.device)
        plan, positions = cache.plan(rows, n_new)
        if all_logits:
            return self.model(tokens, positions, cache, plan)
        last = torch.tensor(n_new, device=self.device)[:, None] - 1
        return self.model(tokens, positions, cache, plan, logits_index=last)[:, 0]

    def check_ids(self, ids: Sequence[int]) -> None:
        vocab = self.config.vocab_size
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            raise InputError(f"token id(s) {bad[:5]} are outside the vocabulary [0, {vocab})")

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
        cache = self.new_cache(1, len(ids))
        parts = [self.step(cache, [0], [ids[s: s + chunk]], all_logits=True)[0]
                 for s in range(0, len(ids), chunk)]
        return torch.cat(parts)

    # -------------------------------------------------------------- generation

    def generate(self, prompts: list[list[int]], params: list[SamplingParams], *,
                 stop_ids: frozenset[int], decoders: list[IncrementalDecoder],
                 max_context: int | None = None,
                 chunk_size: int | None = None) -> Generator[Event, None, None]:
        """Generate for a ragged batch; yields an Event per sequence per step.

        Each sequence stops on its own EOS / stop string / max_tokens; a finished sequence
        leaves the batch, so the others' steps get cheaper. `max_context` caps prompt +
        generated tokens (default: the model's max_seq_len).
        """
        context = max_context or self.config.max_seq_len
        seqs = []
        for i, (prompt, p, dec) in enumerate(zip(prompts, params, decoders)):
            if not prompt:
                raise InputError(f"prompt {i} is empty: give at least one token")
            self.check_ids(prompt)
            if len(prompt) >= context:
                raise InputError(f"prompt {i} has {len(prompt)} tokens but the context is "
                                 f"{context}: shorten the prompt or raise the context size")
            max_tokens = min(p.max_tokens, context - len(prompt))
            seqs.append(SequenceState(i, list(prompt), p, stop_ids, dec, max_tokens,
                                  make_generator(p.seed)))
        longest = max(len(s.prompt) + s.max_tokens for s in seqs)
        cache = self.new_cache(len(seqs), longest)
        chunk = chunk_size or self.default_chunk()
        self.stats = stats = GenerationStats(prompt_tokens=sum(len(s.prompt) for s in seqs))
        yield from self._run(cache, seqs, chunk, stats)

    @torch.inference_mode()
    def _run(self, cache: KVCache, seqs: list[SequenceState], chunk: int,
             stats: GenerationStats) -> Iterator[Event]:
        # Only model time is counted: the clock stops while the caller handles each event.
        # Pre-fill: every row advances by up to `chunk` prompt tokens per step; a row whose
        # prompt completes in a step gets its first token sampled from that step's logits.
        pending = list(seqs)
        while pending:
            t0 = time.perf_counter()
            chunks = [s.prompt[s.fed: s.fed + chunk] for s in pending]
            logits = self.step(cache, [s.index for s in pending], chunks)
            done = []
            for s, c, row in zip(pending, chunks, logits):
                s.fed += len(c)
                if s.fed == len(s.prompt):
                    done.append((s, row))
            pending = [s for s in pending if s.fed < len(s.prompt)]
            events = []
            if done:
                events = self._sample([s for s, _ in done],
                                      torch.stack([r for _, r in done]), stats)
            stats.prefill_seconds += time.perf_counter() - t0
            yield from events
        active = [s for s in seqs if s.finish_reason is None]
        while active:
            t0 = time.perf_counter()
            logits = self.step(cache, [s.index for s in active], [[s.output[-1]] for s in active])
            events = self._sample(active, logits, stats)
            stats.decode_seconds += time.perf_counter() - t0
            yield from events
            active = [s for s in active if s.finish_reason is None]

    def _sample(self, seqs: list[SequenceState], logits: torch.Tensor,
                stats: GenerationStats) -> list[Event]:
        histories = [TokenHistory(s.prompt, s.output) if s.params.has_penalties else None
                     for s in seqs]
        tokens = sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs],
                              histories)
        stats.generated_tokens += len(seqs)
        return [s.accept(token, row) for s, token, row in zip(seqs, tokens, logits)]
