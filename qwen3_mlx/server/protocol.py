"""The OpenAI-compatible API's request and response bodies, as pydantic models (the serving logic is app.py's).

Requests ignore parameter names they do not know (clients send many); a known parameter whose value
the server cannot honour is refused by app.py with a 400 that names it. Bounds that JSON alone can
break (NaN, a negative token count) are checked here, so that /openapi.json states them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

Count = Annotated[int, Field(ge=1)]
Probability = Annotated[float, Field(ge=0, le=1)]
Seed = Annotated[int, Field(ge=0, lt=1 << 64)]  # MLX's random key takes an unsigned 64-bit seed
Budget = Annotated[int, Field(ge=0)]


class _Request(BaseModel):
    """A request body. An explicit null on an optional field means "not given" (OpenAI's SDKs and proxies
    send null for fields they leave unset), so a field typed `X | None` with another default never holds
    None: the type says, in /openapi.json, that null is accepted."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        optional = {key for name, f in cls.model_fields.items() if not f.is_required() for key in (name, f.alias)}
        return {key: value for key, value in data.items() if value is not None or key not in optional}


class _Body(BaseModel):
    """A response body: every field is sent, null when empty, as OpenAI sends it."""

    model_config = ConfigDict(allow_inf_nan=False)


# ---------------------------------------------------------------- requests


class StreamOptions(_Request):
    include_usage: bool | None = False


class FunctionDefinition(_Request):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(None, description="With tool_choice 'auto', calls of this tool are constrained to "
                                                  "its parameters schema (with 'required' or a name, every call is).")


class Tool(_Request):
    type: Literal["function"] | None = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] | None = "function"
    function: NamedFunction


class ContentPart(_Request):
    type: str
    text: str | None = None


class ToolCallFunction(_Request):
    name: str
    arguments: str | dict[str, Any] | None = ""


class MessageToolCall(_Request):
    id: str | None = None
    type: Literal["function"] | None = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    """A message sent in: system, user, assistant (maybe with tool_calls) or tool (a tool's result)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # the template may read more (e.g. name)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class JsonSchemaFormat(_Request):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)

    name: str = Field(min_length=1)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema the answer is valid "
                                                                           "against; unset: any JSON object.")
    strict: bool | None = Field(None, description="Ignored: the answer always follows the schema.")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] | None = "text"
    json_schema: JsonSchemaFormat | None = None


class SamplingParameters(_Request):
    """What chat and text completions share."""

    model: str | None = None
    max_tokens: Count | None = Field(None, description="The most tokens generated, reasoning and forced text "
                                                       "included; capped by the server's --max-tokens.")
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = Field(None, description="0 or -1: no top-k filter.")
    min_p: Probability | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = Field(
        None, description="Not implemented: only 0 is accepted; use presence_penalty or repetition_penalty.")
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Count | None = 1
    thinking_budget: Budget | None = Field(None, description="The most reasoning tokens (0: no reasoning).")
    thinking_budget_tokens: Budget | None = Field(None, description="llama.cpp's name for thinking_budget.")
    thinking_token_budget: Budget | None = Field(None, description="vLLM's name for thinking_budget.")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="A thinking budget by name (options.REASONING_EFFORTS): none 0, minimal 256, low 1024, "
                          "medium 4096, high 16384, xhigh 32768, max no limit.")
    num_draft_tokens: Annotated[int, Field(ge=0, le=64)] | None = Field(
        None, description="On a server that speculates (serve --draft-model or --prompt-lookup): the longest draft "
                          "for this request; 0: none.")


class ChatCompletionRequest(SamplingParameters):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = Field(None, description="OpenAI's newer name for max_tokens (wins).")
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='Template variables; Qwen3\'s reads enable_thinking: {"enable_thinking": false}.')


class CompletionRequest(SamplingParameters):
    prompt: str | list[Annotated[int, Field(ge=0)]] | list[str] | list[list[Annotated[int, Field(ge=0)]]]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: Count | None = None


# ---------------------------------------------------------------- responses


class PromptTokensDetails(_Body):
    cached_tokens: int = 0


class CompletionTokensDetails(_Body):
    reasoning_tokens: int = 0
    accepted_prediction_tokens: int = 0  # speculative decoding's drafts kept
    rejected_prediction_tokens: int = 0  # and those the model did not keep


class Usage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class TopLogprob(_Body):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Body):
    content: list[TokenLogprob]
    refusal: list[TokenLogprob] | None = None


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Body):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the same text, under the name other servers use


class ChatChoice(_Body):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


def _now() -> int:
    return int(time.time())


class ChatCompletion(_Body):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    service_tier: str | None = None
    system_fingerprint: str | None = None


class FunctionCallDelta(_Body):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Body):
    """A fragment of a streamed call: id, type and name come with its first fragment only, and are left out
    (not null) after it, as OpenAI does: clients that merge fragments (the openai SDK's stream helper
    among them) would take a null type or name as the call's new value."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: Any) -> dict:
        data = handler(self)
        data["function"] = {k: v for k, v in data["function"].items() if v is not None}
        return {k: v for k, v in data.items() if v is not None}


class Delta(_Body):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChunkChoice(_Body):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Body):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # in the last chunk alone, with stream_options.include_usage
    service_tier: str | None = None
    system_fingerprint: str | None = None


class LegacyLogprobs(_Body):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Body):
    index: int = 0
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None
    reasoning_content: str | None = None
    reasoning: str | None = None


class Completion(_Body):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(_Body):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen3-mlx"


class ModelList(_Body):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class MemoryFigures(_Body):
    """Bytes: the server's ceiling (--memory-limit), MLX's memory in use and at its peak, the KV caches
    held now, and the prefix store."""

    limit: int
    active: int
    peak: int
    kv: int
    prefix_store: int


class Health(_Body):
    status: Literal["ok"] = "ok"
    model: str
    rows: int
    memory: MemoryFigures | None = None


class ErrorDetail(_Body):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Body):
    error: ErrorDetail
