"""OpenAI's Responses API (POST /v1/responses): the request and response bodies, as pydantic models
(output items are dicts of the documented shapes, built by mapping.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _In(BaseModel):
    """A request body's part: types only (a value's bounds are GenerationOptions' or the mapping's)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Reasoning(_In):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: str | None = None  # accepted; the reasoning's own text is sent, never a summary


class TextFormat(_In):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_In):
    format: TextFormat | None = None


class ResponsesRequest(_In):
    model: str | None = None
    input: str | list[dict[str, Any]] = Field(description="A user message, or items: message, function_call, "
                                                          "function_call_output, reasoning.")
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: int | None = Field(
        None, description="The most tokens generated, reasoning included; lowered to the server's --max-tokens.")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    thinking_budget: int | None = Field(None, description="The most reasoning tokens.")
    text: TextConfig | None = None
    include: list[str] | None = None
    store: bool | None = None
    stream: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None


class ResponseObject(BaseModel):
    """A response; output items are dicts of the documented shapes (reasoning, message, function_call)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[dict[str, Any]]
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    reasoning: dict[str, Any]
    store: bool
    temperature: float | None = None
    text: dict[str, Any]
    tool_choice: Any
    tools: list[dict[str, Any]]
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: dict[str, Any] | None = None
    user: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
