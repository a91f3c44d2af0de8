"""The OpenAI wire format: pydantic v2 models of requests and responses, OpenAI field names.

Requests are validated strictly (a string is not a number, `true` is not 1): every failure
becomes a 400 in OpenAI's error shape (see app.py). Unknown fields are ignored, as vLLM
does, so clients that send newer OpenAI fields keep working. Fields we cannot honour
(`suffix`, image content parts) are refused by the serving layer, never silently dropped.
Extensions that vLLM and llama.cpp also accept: `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`; structured output beyond OpenAI's: response_format types "regex" and "grammar"
(Lark), and vLLM's `guided_json` / `guided_regex` / `guided_grammar` fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mistral7b.errors import InputError
from mistral7b.sampling_params import MAX_TOP_LOGPROBS
from mistral7b.tokenizer.base import check_strings as _check_strings

MAX_STOP_STRINGS = 16

Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]


# Why a choice ended: EOS or a stop string, max_tokens / the context, or calls to tools.
FinishReason = Literal["stop", "length", "tool_calls"]

class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: Any, info: ValidationInfo) -> Any:
        """Every string of a request is valid Unicode (a JSON "\\ud800" escape is valid
        JSON but no text): a 400 naming the field, by the tokenizer's own rule."""
        try:
            _check_strings(value, info.field_name or "value")
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return value


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -------------------------------------------------------------------------------- errors


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


# ------------------------------------------------------------------------------ requests


class StreamOptions(_Request):
    include_usage: bool = False


class JSONSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's three types, plus our "regex" and "grammar" (a Lark grammar, llguidance's
    dialect) extensions."""

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: JSONSchemaFormat | None = None
    regex: str | None = None
    grammar: str | None = None


class SamplingFields(_Request):
    """What completions and chat share. `None` means "the default" everywhere."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None          # -1 or 0: off
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None     # vLLM's names for the same
    guided_regex: str | None = None
    guided_grammar: str | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt`: a string, a list of strings (a batch), token ids, or a
    list of token-id lists. `echo` + `logprobs` + `max_tokens: 0` scores a prompt, which is
    how lm-evaluation-harness's local-completions backend computes log-likelihoods."""

    prompt: (str | Annotated[list[str], Field(min_length=1)]
             | Annotated[list[int], Field(min_length=1)]
             | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)])
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None


class ContentPart(_Request):
    """One part of a message's content. Only "text" is read; the serving layer answers
    other types (image_url, input_audio, file) with a clear 400."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class TextPart(_Request):
    """OpenAI's text input object (/v1/moderations)."""

    type: Literal["text"]
    text: str


class FunctionCallIn(_Request):
    name: str
    arguments: str | dict[str, Any]


class ToolCallIn(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    safe_prompt: bool = False       # Mistral's API: the guardrail system prompt goes first


class TokenizeRequest(_Request):
    """POST /tokenize: a prompt, or chat messages (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    tools: list[ToolDef] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ----------------------------------------------------------------------------- responses


class PromptTokensDetails(_Response):
    cached_tokens: int = 0          # prompt tokens whose KV came from the prefix cache


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class FunctionCallOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionDelta(_Response):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mistral7b"
    max_model_len: int | None = None
    parent: str | None = None       # a served LoRA adapter: the base model it runs on


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Response):
    prompt: str


class VersionResponse(_Response):
    version: str


# --------------------------------------------------------------------------- moderations


class ModerationRequest(_Request):
    """POST /v1/moderations: one text, a list of texts, or OpenAI's text input objects."""

    input: str | Annotated[list[str], Field(min_length=1)] \
        | Annotated[list[TextPart], Field(min_length=1)]
    model: str | None = None


class ModerationResult(_Response):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]


class ModerationResponse(_Response):
    id: str
    model: str
    results: list[ModerationResult]
