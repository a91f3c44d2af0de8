"""A generation's outputs gathered for the caller: `CompletionBuilder` collects one
sequence's outputs into its Completion, `TextStream` hands out the text deltas as they come
(LLM.stream / stream_chat) and sets `.completion` at the end."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator

from mistral7b.request import Output
from mistral7b.sampling import SamplingParams
from mistral7b.sequence import Completion, TokenLogprob


class CompletionBuilder:
    """Collects one sequence's outputs into its Completion."""

    def __init__(self, prompt_tokens: int, logprobs: bool) -> None:
        self.prompt_tokens = prompt_tokens
        self.want_logprobs = logprobs
        self.text: list[str] = []
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.cached_tokens = 0

    def add(self, out: Output) -> None:
        self.text.append(out.text)
        if out.token_id is not None:
            self.ids.append(out.token_id)
        if out.logprob is not None:
            self.logprobs.append(out.logprob)
        self.cached_tokens = out.cached_tokens
        if out.finish_reason:
            self.finish_reason = out.finish_reason

    @property
    def completion(self) -> Completion:
        return Completion("".join(self.text), self.ids, self.finish_reason or "length",
                          self.prompt_tokens,
                          self.logprobs if self.want_logprobs else None,
                          self.cached_tokens)


class TextStream:
    """An iterator of text deltas; `.completion` is set when the generation has finished."""

    def __init__(self, events: Generator[tuple[int, Output], None, None], prompt_tokens: int,
                 params: SamplingParams,
                 on_done: Callable[[Completion], None] | None = None) -> None:
        self._events = events
        self._builder = CompletionBuilder(prompt_tokens, params.logprobs)
        self._on_done = on_done
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        for _, out in self._events:
            self._builder.add(out)
            if out.finish_reason:
                self.completion = self._builder.completion
                if self._on_done is not None:
                    self._on_done(self.completion)
            if out.text:
                return out.text
        raise StopIteration

    def close(self) -> None:
        """Stop generating (frees the cache); safe to call at any time."""
        self._events.close()
