"""Anthropic's Messages API (POST /v1/messages and /v1/messages/count_tokens), as Claude Code and the
`anthropic` SDK speak it: the request and response models, a body made into the one Submission
(params.py), and a reply made into a message, whole or as Anthropic's event stream.

    thinking {"type": "enabled", "budget_tokens": N}   our thinking budget, N (a hard limit)
    thinking {"type": "adaptive" | "between_tools"}    thinking; output_config.effort names a budget
    thinking {"type": "disabled"}                      no reasoning; absent: the server's default
    tool_choice any / tool                             calls constrained by the tool-call grammar

Unknown fields (metadata, context_management, cache_control, ...) are ignored; server tools without an
input_schema (web_search_...) are left out with a log line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import Qwen3Error
from ..generation.response import Chunk
from ..text.prompt import Prompt
from .params import (
    ApiError,
    Settings,
    Submission,
    check_model,
    check_tool_names,
    sampling_options,
    tool_constraint,
)
from .replies import Reply, new_id

log = logging.getLogger("qwen3_mlx.server")

PING_SECONDS = 5.0  # a ping event after this long without a chunk (a long prompt's prefill)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error", 529: "overloaded_error"}
STOP_REASONS = {"length": "max_tokens", "stop_string": "stop_sequence"}


def is_anthropic(path: str) -> bool:
    """Whether a path is this API's (its errors then take Anthropic's shape)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error(status: int, message: str) -> str:
    """Anthropic's error body: {"type": "error", "error": {"type", "message"}}, its type by status."""
    return json.dumps({"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}})


# ---------------------------------------------------------------- requests


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


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
    budget_tokens: Annotated[int, Field(ge=0)] | None = None
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
    max_tokens: Annotated[int, Field(ge=1)] = Field(description="The most tokens generated, thinking included; "
                                                                "lowered to the server's --max-tokens.")
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: Annotated[int, Field(ge=0, lt=1 << 64)] | None = None


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


# ---------------------------------------------------------------- a body -> the one Submission


def messages_submission(body: CountTokensRequest, settings: Settings) -> Submission:
    """The Prompt and GenerationOptions of a Messages body (or a count_tokens body: no max_tokens)."""
    check_model(body.model, settings)
    tools = _tools(body.tools) if body.tools else None
    choice = body.tool_choice.type if body.tool_choice else "auto"
    if choice == "none":
        tools = None
    name = {"any": "required", "tool": body.tool_choice.name if body.tool_choice else None}.get(choice, choice)
    if name is None:
        raise ApiError(400, 'tool_choice.name: {"type": "tool"} needs the name of the tool to call',
                       param="tool_choice")
    parallel = not (body.tool_choice and body.tool_choice.disable_parallel_tool_use)
    fmt = body.output_config.format if body.output_config else None
    constraint = tool_constraint(tools, name, parallel=parallel, schema=fmt.schema_ if fmt else None,
                                 format_param="output_config.format")
    think, fields = _thinking(body, settings)
    request = body if isinstance(body, MessagesRequest) else None
    if request is not None:
        fields.update(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k, seed=request.seed,
                      stop=request.stop_sequences)
    options = sampling_options(fields, settings, request.max_tokens if request else None, think=think)
    messages, prefill = chat_messages(body)
    prompt = Prompt(messages, tools=tools, prefill_response=prefill)
    return Submission(prompt, options.replace(**constraint))


def _thinking(body: CountTokensRequest, settings: Settings) -> tuple[bool, dict[str, Any]]:
    """(think, the budget's fields): enabled gives budget_tokens; adaptive and between_tools think (Qwen3
    thinks at every turn, tool results included) within output_config.effort's budget; disabled does not."""
    effort = body.output_config.effort if body.output_config else None
    thinking = body.thinking
    if thinking is None:
        return settings.defaults.think, {"reasoning_effort": effort}
    if thinking.type == "disabled":
        return False, {}
    if thinking.type == "enabled":
        if thinking.budget_tokens is None:
            raise ApiError(400, 'thinking.budget_tokens: {"type": "enabled"} needs budget_tokens, the most thinking '
                                'tokens (or use {"type": "adaptive"})', param="thinking")
        return True, {"thinking_budget": thinking.budget_tokens}
    return True, {"reasoning_effort": effort}


def _tools(tools: Sequence[ToolDefinition]) -> list[dict] | None:
    """Anthropic's tools in OpenAI's function format (what the template and the grammar read)."""
    out = []
    for tool in tools:
        if tool.input_schema is None and tool.type not in (None, "custom"):
            log.info("tools: %r (type %s) left out: server tools do not run here", tool.name, tool.type)
            continue
        function = {"name": tool.name, "parameters": tool.input_schema or {"type": "object"}}
        if tool.description:
            function["description"] = tool.description
        if tool.strict:
            function["strict"] = True
        out.append({"type": "function", "function": function})
    check_tool_names(out)
    return out or None


def chat_messages(body: CountTokensRequest) -> tuple[list[dict], str | None]:
    """(the messages as the chat template reads them, the prefill): `system` first; each message's
    blocks made into chat messages; a last assistant message of text alone is the answer's start."""
    messages = []
    if body.system:
        messages.append({"role": "system", "content": _text(body.system, "system")})
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
        elif m.role == "assistant":
            messages.append(_assistant(m.content, where))
        else:
            messages += _user(m.role, m.content, where)
    last = messages[-1] if messages else {}
    if last.get("role") == "assistant" and not last.get("tool_calls") and not last.get("reasoning_content"):
        messages.pop()
        return messages, last["content"] or None
    return messages, None


def _refused(block: Block, where: str) -> ApiError:
    return ApiError(400, f"{where} is type {block.type!r}; Qwen3 reads text only here: send text blocks "
                         '({"type": "text", "text": "..."})', param="messages")


def _text(content: str | list[Block], where: str) -> str:
    if isinstance(content, str):
        return content
    for j, block in enumerate(content):
        if block.type != "text" or block.text is None:
            raise _refused(block, f"{where}[{j}]")
    return "\n".join(block.text for block in content)  # type: ignore[misc]


def _assistant(blocks: list[Block], where: str) -> dict:
    text, reasoning, calls = [], [], []
    for j, block in enumerate(blocks):
        if block.type == "text" and block.text is not None:
            text.append(block.text)
        elif block.type == "thinking" and block.thinking is not None:
            reasoning.append(block.thinking)
        elif block.type == "tool_use" and block.name:
            arguments = json.dumps(block.input or {}, ensure_ascii=False)  # as the model writes them
            calls.append({"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}})
        elif block.type != "redacted_thinking":
            raise _refused(block, f"{where}.content[{j}]")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if reasoning:
        message["reasoning_content"] = "\n".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _user(role: str, blocks: list[Block], where: str) -> list[dict]:
    """Tool results become tool messages, where they stand; text blocks between them, one message each run."""
    out: list[dict] = []
    text: list[str] = []
    for j, block in enumerate(blocks):
        if block.type == "tool_result" and role == "user":
            if text:
                out.append({"role": role, "content": "\n".join(text)})
                text = []
            result = _text(block.content or "", f"{where}.content[{j}].content")
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": result})
        elif block.type == "text" and block.text is not None:
            text.append(block.text)
        else:
            raise _refused(block, f"{where}.content[{j}]")
    if text or not out:
        out.append({"role": role, "content": "\n".join(text)})
    return out


# ---------------------------------------------------------------- a reply -> a message


def signature(thinking: str) -> str:
    """An opaque signature for a thinking block (clients send it back; it is not checked)."""
    return "qwen3-mlx-" + hashlib.sha256(thinking.encode()).hexdigest()[:32]


def matched_stop(reply: Reply, stop: Sequence[str], tokenizer: Any) -> str | None:
    """The stop sequence that ended the answer: the one found right after the answer's text."""
    if reply.stats.finish_reason != "stop_string" or not stop:
        return None
    text, content = tokenizer.decode(reply.stats.token_ids), "".join(reply.content)
    found = [(text.find(content + s), -len(s), s) for s in stop if content + s in text]
    return min(found)[2] if found else stop[0]


def stop_reason(reply: Reply) -> str:
    reason = reply.stats.finish_reason or "stop"
    if reason != "length" and reply.tool_calls():
        return "tool_use"
    return STOP_REASONS.get(reason, "end_turn")


def usage(reply: Reply) -> Usage:
    """Anthropic's usage: input_tokens are the prompt's computed tokens, cache_read_input_tokens those a
    reused prefix held (their sum is the prompt); output_tokens every token of the response."""
    stats = reply.stats
    return Usage(input_tokens=stats.prompt_tokens - stats.cached_tokens, output_tokens=len(stats.token_ids),
                 cache_read_input_tokens=stats.cached_tokens)


def message(reply: Reply, model_id: str, *, stop: Sequence[str], show_thinking: bool, tokenizer: Any) -> Message:
    """The whole reply as a message: thinking (its text left out when display is "omitted"), text, tool_use."""
    content: list[ThinkingBlock | TextBlock | ToolUseBlock] = []
    reasoning = "".join(reply.reasoning)
    if reasoning:
        content.append(ThinkingBlock(thinking=reasoning if show_thinking else "", signature=signature(reasoning)))
    text = "".join(reply.content)
    if text:
        content.append(TextBlock(text=text))
    for call in reply.tool_calls() or ():
        content.append(ToolUseBlock(id=call.id, name=call.function.name, input=json.loads(call.function.arguments)))
    return Message(id=new_id("msg"), model=model_id, content=content, stop_reason=stop_reason(reply),
                   stop_sequence=matched_stop(reply, stop, tokenizer), usage=usage(reply))


def show_thinking(body: CountTokensRequest) -> bool:
    return not (body.thinking and body.thinking.display == "omitted")


# ---------------------------------------------------------------- a reply -> its events


Event = tuple[str, dict]  # (the event's name, its data)


async def with_pings(items: AsyncIterator[Chunk], seconds: float) -> AsyncIterator[Chunk | None]:
    """`items`, with a None whenever `seconds` pass without one (while a long prompt is prefilled)."""
    source = items.__aiter__()
    pending = asyncio.ensure_future(source.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=seconds)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(source.__anext__())
    finally:
        if not pending.done():
            pending.cancel()


class _Blocks:
    """The content blocks of a stream as the chunks arrive: one open at a time, closed when the kind
    changes (a thinking block closes with its signature)."""

    def __init__(self, show_thinking: bool) -> None:
        self.show_thinking, self.index, self.open, self.thinking = show_thinking, -1, None, []

    def start(self, kind: str, block: dict) -> list[Event]:
        events = self.close()
        self.index, self.open = self.index + 1, kind
        return events + [("content_block_start", {"type": "content_block_start", "index": self.index,
                                                  "content_block": block})]

    def delta(self, delta: dict) -> Event:
        return "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}

    def close(self) -> list[Event]:
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":
            events.append(self.delta({"type": "signature_delta", "signature": signature("".join(self.thinking))}))
        self.open = None
        return events + [("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def feed(self, chunk: Chunk, call: dict | None) -> list[Event]:
        events: list[Event] = []
        if call is not None:
            if call["id"]:
                events += self.start("tool_use", {"type": "tool_use", "id": call["id"], "name": call["name"],
                                                  "input": {}})
            if call["arguments"]:
                events.append(self.delta({"type": "input_json_delta", "partial_json": call["arguments"]}))
        elif chunk.text and chunk.kind == "reasoning":
            if self.open != "thinking":
                events += self.start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self.thinking.append(chunk.text)
            if self.show_thinking:
                events.append(self.delta({"type": "thinking_delta", "thinking": chunk.text}))
        elif chunk.text and chunk.kind == "answer":
            if self.open != "text":
                events += self.start("text", {"type": "text", "text": ""})
            events.append(self.delta({"type": "text_delta", "text": chunk.text}))
        return events


async def message_events(chunks: AsyncIterator[Chunk], model_id: str, *, prompt_tokens: int, stop: Sequence[str],
                         show_thinking: bool, parallel: bool, tokenizer: Any,
                         ping_seconds: float = PING_SECONDS) -> AsyncIterator[Event]:
    """Anthropic's stream: message_start, ping, each block's start, deltas and stop, message_delta
    (stop_reason, usage), message_stop; a failure is an error event."""
    reply, blocks = Reply(parallel), _Blocks(show_thinking)
    start = Message(id=new_id("msg"), model=model_id, content=[], stop_reason=None,
                    usage=Usage(input_tokens=prompt_tokens, output_tokens=0)).model_dump()
    yield "message_start", {"type": "message_start", "message": start}
    yield "ping", {"type": "ping"}
    try:
        async for chunk in with_pings(chunks, ping_seconds):
            if chunk is None:
                yield "ping", {"type": "ping"}
                continue
            for event in blocks.feed(chunk, reply.add(chunk)):
                yield event
    except ApiError as e:
        yield "error", json.loads(anthropic_error(e.status, e.message))
        return
    except Qwen3Error as e:
        yield "error", json.loads(anthropic_error(500, str(e)))
        return
    for event in blocks.close():
        yield event
    delta = {"stop_reason": stop_reason(reply), "stop_sequence": matched_stop(reply, stop, tokenizer)}
    yield "message_delta", {"type": "message_delta", "delta": delta, "usage": usage(reply).model_dump()}
    yield "message_stop", {"type": "message_stop"}
