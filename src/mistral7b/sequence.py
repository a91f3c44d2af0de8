"""One sequence being generated, and what it produces: tokens, text deltas, a Completion.

A `Sequence` owns its progress: its tokens (the prompt, then each sampled token), how many
of them are in the cache (`fed`, its block table's length), its sampling state, its stop
strings and its text. The scheduler asks it what to feed next and hands it each sampled
token; no other module edits its fields. A token is sampled whenever every token is fed,
so pre-fill, decode and a re-fill after preemption are one rule:

    tokens:  p0 p1 p2 p3 | o0 o1        fed = 5: feed [o1], then sample o2
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mistral7b.cache import BlockTable
from mistral7b.constrain import Constraint
from mistral7b.sampling import NonFiniteLogitsError, SamplingParams, TokenHistory, token_logprobs
from mistral7b.stops import StopMatcher
from mistral7b.tools import ToolCall

if TYPE_CHECKING:
    from mistral7b.tokenizer.base import IncrementalDecoder


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    """One finished sequence. `token_ids` are the generated ids (EOS excluded).

    A chat answer that called tools has them in `tool_calls` (its `text` is what came before
    the calls) and finish reason "tool_calls".
    """

    text: str
    token_ids: list[int]
    finish_reason: str                       # "stop" (EOS or stop string) | "length" | "tool_calls"
    prompt_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    cached_tokens: int = 0                   # prompt tokens reused from the prefix cache
    tool_calls: list[ToolCall] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerationStats:
    """What the last generate/stream/chat call did, for the CLI's summary on stderr.

    `prompt_tokens` counts every prompt token; `cached_tokens` of them came from the prefix
    cache and `prefill_tokens` were computed.
    """

    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    first_token_seconds: float | None = None     # from the call to its first token
    draft_tokens: int = 0                        # speculative tokens proposed ...
    accepted_tokens: int = 0                     # ... and accepted (speculate.py)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0
    mask_seconds: float = 0.0                    # computing structured-output masks
    masked_tokens: int = 0                       # tokens sampled under a grammar mask

    @property
    def prompt_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # The first generated token comes out of pre-fill; decode steps make the rest.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Event:
    """What one step did to one sequence: new text, and the finish reason when it ended."""

    text: str
    token_id: int | None                    # None when the sampled token was EOS
    finish_reason: str | None = None


@dataclass(eq=False)
class Sequence:
    """Generation state of one sequence: prompt, sampling, output, stops, cache table."""

    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    decoder: IncrementalDecoder
    max_tokens: int
    generator: torch.Generator | None = None
    table: BlockTable = field(default_factory=BlockTable)
    output: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0                  # prompt tokens taken from the prefix cache
    constraint: Constraint | None = None    # structured output: the grammar's state
    stops: StopMatcher = field(init=False)
    _tokens: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.params.stop)
        self._tokens = list(self.prompt)

    @property
    def tokens(self) -> list[int]:
        """Prompt then output (a view: do not modify)."""
        return self._tokens

    @property
    def fed(self) -> int:
        return self.table.length

    @property
    def n_pending(self) -> int:
        """Tokens not in the cache yet (the last sampled token, or a prompt's rest)."""
        return len(self._tokens) - self.table.length

    @property
    def prompt_done(self) -> bool:
        return self.table.length >= len(self.prompt)

    @property
    def decoding(self) -> bool:
        """One token to feed after a sampled one: a decode step, not a pre-fill."""
        return bool(self.output) and self.n_pending == 1

    def pending(self, limit: int) -> list[int]:
        return self._tokens[self.fed: self.fed + limit]

    def history(self) -> TokenHistory | None:
        return TokenHistory(self.prompt, self.output) if self.params.has_penalties else None

    def accept(self, token: int, logits_row: torch.Tensor) -> Event:
        """Take a sampled token: update text, stop strings, EOS and length; return the event."""
        if self.params.logprobs:
            lp, top = token_logprobs(logits_row, token, self.params.top_logprobs)
            self.logprobs.append(TokenLogprob(token, lp, top))
        eos = token in self.stop_ids and not self.params.ignore_eos
        complete = False          # the grammar allows nothing more: end without an EOS step
        if self.constraint is not None:
            self.constraint.advance(token)
            complete = not eos and self.constraint.stopped
        if eos:
            text = self.decoder.flush()
        else:
            self.output.append(token)
            self._tokens.append(token)
            text = self.decoder.push(token)
            if len(self.output) >= self.max_tokens or complete:
                text += self.decoder.flush()
        delta, stopped = self.stops.push(text)
        if stopped or eos or complete:
            self.finish_reason = "stop"
        elif len(self.output) >= self.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason and not stopped:
            delta += self.stops.flush()
        self.text.append(delta)
        return Event(delta, None if eos else token, self.finish_reason)

    def completion(self) -> Completion:
        return Completion("".join(self.text), list(self.output), self.finish_reason or "length",
                          len(self.prompt), self.logprobs if self.params.logprobs else None,
                          self.cached_tokens)


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], fed: int,
                    top_n: int) -> list[TokenLogprob]:
    """Log-probabilities of the prompt tokens a chunk predicts: logits (T, V) of positions
    fed .. fed+T-1, where position t predicts token t + 1. Raises NonFiniteLogitsError."""
    targets = prompt[fed + 1: fed + logits.shape[0] + 1]
    if not targets:
        return []
    lp = torch.log_softmax(logits[: len(targets)].float(), dim=-1)          # (t, V)
    if not bool(torch.isfinite(lp.amax(dim=-1)).all()):
        raise NonFiniteLogitsError([0])
    chosen = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()
    if top_n:
        values, ids = lp.topk(min(top_n, lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in targets]
    return [TokenLogprob(t, c, top) for t, c, top in zip(targets, chosen, tops)]
