"""What a caller hands the scheduler and gets back: requests, per-step outputs, failures."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mistral7b.errors import Mistral7BError
from mistral7b.grammar import Grammar
from mistral7b.sampling import SamplingParams
from mistral7b.sequence import TokenLogprob

_SEED_SPAN = 2**64


class QueueFullError(Mistral7BError):
    """The waiting queue holds max_queue requests: try again later (HTTP 503)."""


class ShuttingDownError(Mistral7BError):
    """The scheduler no longer admits requests (HTTP 503)."""


class RequestFailed(Mistral7BError):
    """A request that could not finish. kind: "timeout" | "shutdown" | "model" | "internal"."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


def failure(kind: str) -> RequestFailed:
    messages = {
        "timeout": "the request took longer than the server's timeout",
        "shutdown": "the server is shutting down",
    }
    return RequestFailed(kind, messages[kind])


@dataclass
class Output:
    """What one step did for one choice of a request, as handed to `emit`.

    `logprob` is the generated token's (only when the request asked for logprobs);
    `prompt_logprobs` arrives once, before any token, when the request asked for them:
    entry i is prompt token i's log-probability given tokens 0..i-1 (entry 0 is None).
    `cached_tokens`: prompt tokens taken from the prefix cache instead of computed.
    """

    choice: int
    text: str = ""
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: RequestFailed | None = None
    cached_tokens: int = 0


@dataclass(eq=False)
class GenerationRequest:
    """One API request: a prompt and one SamplingParams per choice (n = len(params)).

    max_tokens is already clamped to the context left; 0 means "score the prompt only" (with
    prompt_logprobs set). `emit` is called from the scheduler thread and must not block.
    """

    prompt: list[int]
    params: list[SamplingParams]
    emit: Callable[[Output], None]
    max_tokens: int
    prompt_logprobs: int | None = None     # top-n per prompt position, None = not wanted
    timeout: float | None = None           # seconds from submission
    adapter: int = 0                       # served LoRA adapter slot (0 = the base weights)
    arrival: float = field(default_factory=time.monotonic)
    grammar: Grammar | None = None         # structured output: each choice follows it
    cancelled: bool = False
    done: bool = False
    _admitted: int = 0                     # choices that have started
    _open: int = 0                         # choices not finished yet

    @property
    def n(self) -> int:
        return len(self.params)

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.arrival > self.timeout


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n copies of params; choice i of a seeded request uses seed + i (wrapped to 64 bits)."""
    if params.seed is None:
        return [params] * n
    out = []
    for i in range(n):
        seed = params.seed + i
        if seed >= _SEED_SPAN:
            seed -= _SEED_SPAN
        out.append(dataclasses.replace(params, seed=seed))
    return out
