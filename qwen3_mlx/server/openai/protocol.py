"""OpenAI's chat and text completions: the request and response bodies, as pydantic models (the
sampling parameters they share are submission/parameters.py's; the reading is mapping.py's).

Requests ignore parameter names they do not know (clients send many); a known parameter whose value
the server cannot honour is refused by mapping.py with a 400 that names it.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from ..submission.parameters import RequestBody, SamplingParameters


class _Body(BaseModel):
    """A response body: every field is sent, null when empty, as OpenAI sends it."""

    model_config = ConfigDict(allow_inf_nan=False)


# ---------------------------------------------------------------- requests


class FunctionDefinition(RequestBody):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(None, description="With tool_choice 'auto', calls of this tool are constrained to "
                                                  "its parameters schema (with 'required' or a name, every call is).")


class Tool(RequestBody):
    type: Literal["function"] | None = "function"
    function: FunctionDefinition


class NamedFunction(RequestBody):
    name: str


class NamedToolChoice(RequestBody):
    type: Literal["function"] | None = "function"
    function: NamedFunction


class ContentPart(RequestBody):
    type: str
    text: str | None = None


class ToolCallFunction(RequestBody):
    name: str
    arguments: str | dict[str, Any] | None = ""


class MessageToolCall(RequestBody):
    id: str | None = None
    type: Literal["function"] | None = "function"
    function: ToolCallFunction


class ChatMessage(RequestBody):
    """A message sent in: system, user, assistant (maybe with tool_calls) or tool (a tool's result)."""

    model_config = ConfigDict(extra="allow")  # the template may read more (e.g. name)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class JsonSchemaFormat(RequestBody):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema the answer is valid "
                                                                           "against; unset: any JSON object.")
    strict: bool | None = Field(None, description="Ignored: the answer always follows the schema.")


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"] | None = "text"
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingParameters):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens (wins).")
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='Template variables; Qwen3\'s reads enable_thinking: {"enable_thinking": false}.')


class CompletionRequest(SamplingParameters):
    prompt: str | list[Annotated[int, Field(ge=0)]] | list[str] | list[list[Annotated[int, Field(ge=0)]]]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


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
