"""POST /tokenize and /detokenize (vLLM's extension): the ids the server would compute."""

from __future__ import annotations

from mistral7b.server.errors import bad_request
from mistral7b.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from mistral7b.server.serving.base import ServingBase


class ServingTokenization(ServingBase):
    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.models.check(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            ids = self.chat_ids(body.messages, body.add_generation_prompt)
        else:
            assert body.prompt is not None  # exactly one of the two, checked above
            ids = self.tok.encode(body.prompt, bos=body.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.max_model_len)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.models.check(body.model)
        self.check_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tok.decode(body.tokens))
