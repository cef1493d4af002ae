"""Ollama's request and response bodies (docs/api.md), as pydantic models: types only, bounds are the
mapping's and GenerationOptions'. Unknown fields are ignored, as Ollama ignores them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..openai.protocol import Tool
from ..submission.parameters import RequestBody

Think = bool | str  # true/false, or a level of the effort table ("low", "medium", "high", "max", ...)
Format = str | dict[str, Any]  # "json", or a JSON schema
KeepAlive = str | float


class Options(RequestBody):
    """The model parameters a request may set (the Modelfile's). The runner's (num_gpu, num_thread,
    use_mmap, ...) and those Ollama no longer reads are ignored, as Ollama ignores them."""

    num_predict: int | None = Field(None, description="The most tokens generated: -1 no limit, -2 up to the "
                                                      "context; both within the server's --max-tokens.")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = Field(None, description="Not implemented: only 1 is accepted.")
    seed: int | None = None
    stop: list[str] | str | None = None
    num_ctx: int | None = Field(None, description="Accepted: the context is always the model's whole.")
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = Field(None, description="Not implemented: only 0 is accepted.")
    draft_num_predict: int | None = Field(None, description="On a server that speculates: the longest draft.")


class ToolCallFunction(RequestBody):
    name: str
    arguments: dict[str, Any] | str | None = None
    index: int | None = None


class ToolCall(RequestBody):
    id: str | None = None
    function: ToolCallFunction


class Message(RequestBody):
    role: str
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class GenerationBody(RequestBody):
    """What /api/chat and /api/generate share."""

    model: str | None = None
    stream: bool | None = True
    format: Format | None = None
    options: Options | None = None
    think: Think | None = None
    keep_alive: KeepAlive | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None


class ChatRequest(GenerationBody):
    messages: list[Message] | None = None
    tools: list[Tool] | None = None


class GenerateRequest(GenerationBody):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = False
    images: list[str] | None = None


class EmbedRequest(RequestBody):
    model: str | None = None
    input: str | list[str] | None = None
    truncate: bool | None = True
    dimensions: int | None = None
    options: Options | None = None
    keep_alive: KeepAlive | None = None


class EmbeddingsRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    options: Options | None = None
    keep_alive: KeepAlive | None = None


class ShowRequest(RequestBody):
    model: str | None = None
    name: str | None = None  # the older name of `model`
    verbose: bool | None = False


# ---------------------------------------------------------------- responses (what /openapi.json describes)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Error(BaseModel):
    error: str


class Metrics(_Body):
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ChatResponse(Metrics):
    model: str
    created_at: str
    message: dict[str, Any]
    done: bool
    done_reason: str | None = None


class GenerateResponse(Metrics):
    model: str
    created_at: str
    response: str
    thinking: str | None = None
    done: bool
    done_reason: str | None = None


class EmbedResponse(_Body):
    model: str
    embeddings: list[list[float]]


class EmbeddingsResponse(_Body):
    embedding: list[float]


class Details(_Body):
    parent_model: str = ""
    format: str = "safetensors"
    family: str = "qwen3"
    families: list[str] = ["qwen3"]
    parameter_size: str
    quantization_level: str


class ModelEntry(_Body):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: Details


class TagList(_Body):
    models: list[ModelEntry]


class RunningModel(ModelEntry):
    expires_at: str
    size_vram: int
    context_length: int


class RunningList(_Body):
    models: list[RunningModel]


class ShowResponse(_Body):
    modelfile: str
    parameters: str
    template: str
    details: Details
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class Version(_Body):
    version: str
