"""Log-probabilities in OpenAI's two shapes: the legacy completions lists and chat's content."""

from __future__ import annotations

from mistral7b.sequence import TokenLogprob
from mistral7b.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from mistral7b.tokenizer.base import Tokenizer


class LogprobFormatter:
    """Token ids -> their text (cached: a server decodes the same ids again and again)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self._token_text: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tok.decode([token_id])
        return text

    def completion(self, prompt: list[int], entries: list[TokenLogprob | None],
                   offset: int = 0) -> CompletionLogprobs:
        """OpenAI's legacy logprobs: parallel lists over (echoed prompt +) generated tokens.

        With an echoed prompt, `prompt` holds its ids and `entries` starts with their
        prompt logprobs (entry 0 None: the first token has no context).
        """
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        # only the first prompt entry is None: generated tokens always have their logprob
        ids = list(prompt) + [e.token_id for e in entries[len(prompt):] if e is not None]
        for token_id, entry in zip(ids, entries):
            text = self.token_text(token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if entry is None:
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(entry.logprob)
            top = {self.token_text(i): lp for i, lp in entry.top}
            top.setdefault(text, entry.logprob)
            tops.append(top)
        return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops,
                                  text_offset=offsets)

    def chat(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        content = []
        for e in entries:
            text = self.token_text(e.token_id)
            top = [TopLogprob(token=self.token_text(i), logprob=lp,
                              bytes=list(self.token_text(i).encode()))
                   for i, lp in e.top]
            content.append(ChatTokenLogprob(token=text, logprob=e.logprob,
                                            bytes=list(text.encode()), top_logprobs=top))
        return ChatLogprobs(content=content)
