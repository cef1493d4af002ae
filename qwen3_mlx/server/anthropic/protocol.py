"""Anthropic's Messages API (POST /v1/messages and /v1/messages/count_tokens): the request and
response bodies, as pydantic models (the reading is mapping.py's, the stream events.py's)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _In(BaseModel):
    """A request body's part: types only (a value's bounds are GenerationOptions' or the mapping's)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Block(_In):
    """A content block sent in: text, thinking, redacted_thinking, tool_use, tool_result (or an image,
    refused). One lenient model: each type's fields are checked where the block is read."""

    type: str
    text: str | None = None
    thinking: str | None = None
    signature: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[Block] | None = None
    is_error: bool | None = None


class InMessage(_In):
    role: Literal["user", "assistant", "system"]  # Claude Code sends system messages inside `messages`
    content: str | list[Block]


class ToolDefinition(_In):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom" or none: a tool the model calls; others are Anthropic's server tools
    strict: bool | None = None


class ToolChoice(_In):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(_In):
    type: Literal["enabled", "adaptive", "disabled", "between_tools"]
    budget_tokens: int | None = None
    display: Literal["summarized", "omitted"] | None = None


class OutputFormat(_In):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_In):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class CountTokensRequest(_In):
    model: str
    messages: list[InMessage] = Field(min_length=1)
    system: str | list[Block] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(description="The most tokens generated, thinking included; "
                                                                "lowered to the server's --max-tokens.")
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None


# ---------------------------------------------------------------- responses


class _Out(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)


class Usage(_Out):
    input_tokens: int  # the prompt's tokens computed for this request (those read from a cache apart)
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class TextBlock(_Out):
    type: Literal["text"] = "text"
    text: str
    citations: None = None


class ThinkingBlock(_Out):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str


class ToolUseBlock(_Out):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class Message(_Out):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ThinkingBlock | TextBlock | ToolUseBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(_Out):
    input_tokens: int


class ErrorDetail(_Out):
    type: str
    message: str


class ErrorResponse(_Out):
    type: Literal["error"] = "error"
    error: ErrorDetail
