"""POST /v1/completions: text or token-id prompts (batches too), echo, legacy logprobs."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from mistral7b.request import choice_params
from mistral7b.sequence import TokenLogprob
from mistral7b.server.errors import bad_request
from mistral7b.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FinishReason,
)
from mistral7b.server.serving.base import (
    DONE_EVENT,
    Choice,
    ServingBase,
    accumulate,
    event,
    finish_reason,
    json_response,
    usage,
)
from mistral7b.server.serving.bridge import Job, collect, sse


class ServingCompletions(ServingBase):
    async def create(self, body: CompletionRequest, request: Request) -> Response:
        adapter = self.models.check(body.model)
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of must equal n (or be left out)", "best_of")
        if body.max_tokens == 0 and not body.echo:
            raise bad_request("max_tokens must be >= 1 (0 only with echo, to score a prompt)",
                              "max_tokens")
        self.check_n(body.n)
        prompts = self._prompts(body.prompt)
        if len(prompts) * body.n > self.settings.max_queue + self.settings.max_concurrency:
            raise bad_request(f"{len(prompts)} prompts x n={body.n} is more than this server "
                              "can queue; send fewer prompts per request", "prompt")
        for _, text in prompts:
            await self.moderations.check_input(text, "prompt")
        want_prompt_lps = body.echo and body.logprobs is not None
        job = self.new_job(self.grammar(body))
        skipped: set[int] = set()
        for k, (ids, _) in enumerate(prompts):
            max_tokens = self.budget(len(ids), body.max_tokens, "prompt")
            if max_tokens == 0 and not want_prompt_lps:
                skipped.add(k)          # echo without logprobs or tokens: nothing to compute
                continue
            params = self.sampling_params(body, max_tokens, logprobs=body.logprobs is not None,
                                          top_logprobs=body.logprobs or 0)
            job.add(ids, choice_params(params, body.n), max_tokens,
                    body.logprobs if want_prompt_lps else None, adapter=adapter)
        request_ids = [k for k in range(len(prompts)) if k not in skipped]
        job.submit()
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return sse(self._stream(job, body, prompts, request_ids, rid, created), job,
                       self.metrics, self.settings.sse_keepalive)
        choices = {(k, j): Choice() for k in range(len(prompts)) for j in range(body.n)}
        prompt_lps: dict[int, list[TokenLogprob | None]] = {}
        async for k, out in self.moderations.screen(collect(job, request, self.metrics)):
            k = request_ids[k]
            if out.prompt_logprobs is not None:
                prompt_lps[k] = out.prompt_logprobs
            else:
                accumulate(choices[k, out.choice], out)
        result = []
        for (k, j), c in choices.items():
            ids, text = prompts[k]
            if k in skipped:
                c.finish_reason = "length"
            lps = None
            out_text = "".join(c.text)
            if body.logprobs is not None:
                entries = (prompt_lps.get(k, []) if body.echo else []) + c.logprobs
                lps = self.logprobs.completion(ids if body.echo else [], entries)
            if body.echo:
                out_text = text + out_text
            result.append(CompletionChoice(index=k * body.n + j, text=out_text, logprobs=lps,
                                           finish_reason=c.finish_reason))
        use = usage(sum(len(ids) for ids, _ in prompts),
                    sum(c.completion_tokens for c in choices.values()), _cached(choices))
        self.record(job, choices.values())
        return json_response(CompletionResponse(id=rid, created=created,
                                                model=self.settings.model_name,
                                                choices=result, usage=use))

    async def _stream(self, job: Job, body: CompletionRequest,
                      prompts: list[tuple[list[int], str]], request_ids: list[int],
                      rid: str, created: int) -> AsyncIterator[str]:
        def chunk(index: int, text: str, lps: CompletionLogprobs | None = None,
                  finish: FinishReason | None = None) -> str:
            choice = CompletionChoice(index=index, text=text, logprobs=lps, finish_reason=finish)
            return event(CompletionResponse(id=rid, created=created,
                                            model=self.settings.model_name, choices=[choice]))

        n = body.n
        choices = {(k, j): Choice() for k in range(len(prompts)) for j in range(n)}
        offsets = dict.fromkeys(choices, 0)
        for k in range(len(prompts)):
            if k not in request_ids:     # echo of a prompt with max_tokens 0: done already
                for j in range(n):
                    yield chunk(k * n + j, prompts[k][1], None, "length")
        for k in request_ids:             # echo: the prompt first, once its logprobs are known
            if body.echo and body.logprobs is None:
                for j in range(n):
                    yield chunk(k * n + j, prompts[k][1])
                    offsets[k, j] = len(prompts[k][1])
        async for k, out in self.moderations.screen(job.outputs()):
            k = request_ids[k]
            if out.prompt_logprobs is not None:
                ids, text = prompts[k]
                prompt_lps = self.logprobs.completion(ids, out.prompt_logprobs)
                for j in range(n):
                    yield chunk(k * n + j, text, prompt_lps)
                    offsets[k, j] = len(text)
                continue
            c = choices[k, out.choice]
            accumulate(c, out)
            lps: CompletionLogprobs | None = None
            if body.logprobs is not None and out.logprob is not None:
                lps = self.logprobs.completion([], [out.logprob], offsets[k, out.choice])
            offsets[k, out.choice] += len(out.text)
            if out.text or out.finish_reason or lps is not None:
                yield chunk(k * n + out.choice, out.text, lps,
                            finish_reason(out.finish_reason))
        self.record(job, choices.values())
        if body.stream_options is not None and body.stream_options.include_usage:
            use = usage(sum(len(ids) for ids, _ in prompts),
                        sum(c.completion_tokens for c in choices.values()), _cached(choices))
            yield event(CompletionResponse(id=rid, created=created,
                                           model=self.settings.model_name, choices=[],
                                           usage=use),
                        job.timings(use.prompt_tokens, _cached(choices), use.completion_tokens))
        yield DONE_EVENT

    def _prompts(self, prompt: Any) -> list[tuple[list[int], str]]:
        """[(token ids, text to echo)] of a completions prompt (a batch of one or more)."""
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = self.tok.encode(p, bos=True)
                text = p
            else:
                self.check_ids(p, "prompt")
                ids, text = list(p), self.tok.decode(p)
            if not ids:
                raise bad_request("the prompt is empty", "prompt")
            out.append((ids, text))
        return out


def _cached(choices: dict[tuple[int, int], Choice]) -> int:
    """Prompt tokens taken from the prefix cache, once per prompt (its n choices share it)."""
    per_prompt: dict[int, int] = {}
    for (k, _), c in choices.items():
        per_prompt[k] = max(per_prompt.get(k, 0), c.cached_tokens)
    return sum(per_prompt.values())
