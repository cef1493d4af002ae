"""Anthropic's Messages API (POST /v1/messages and /v1/messages/count_tokens), as Claude Code and the
`anthropic` SDK speak it, mapped onto the one request path: a body made into the one Submission
(submission/reading.py), and a whole result made into a message.

    thinking {"type": "enabled", "budget_tokens": N}   our thinking budget, N (a hard limit)
    thinking {"type": "adaptive" | "between_tools"}    thinking; output_config.effort names a budget
    thinking {"type": "disabled"}                      no reasoning; absent: the server's default
    tool_choice any / tool                             calls constrained by the tool-call grammar

Unknown fields (metadata, context_management, cache_control, ...) are ignored; server tools without an
input_schema (web_search_...) are left out with a log line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ...generation.response import GenerationStats
from ...text.prompt import Prompt
from ...text.tools import ToolCall
from ..submission.reading import (
    Settings,
    Submission,
    check_choice_has_tools,
    check_conversation,
    check_model,
    check_tool_result,
    left_out,
    check_tool_names,
    sampling_options,
    tool_constraint,
)
from ..submission.refusal import ApiError, check_range
from ..submission.sealed import unseal
from .protocol import (
    Block,
    CountTokensRequest,
    MessagesRequest,
    ToolDefinition,
    Usage,
)

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


# ---------------------------------------------------------------- a body -> the one Submission


def messages_submission(body: CountTokensRequest, settings: Settings) -> Submission:
    """The Prompt and GenerationOptions of a Messages body (or a count_tokens body: no max_tokens)."""
    check_model(body.model, settings)
    tools = _tools(body.tools) if body.tools else None
    choice = body.tool_choice.type if body.tool_choice else "auto"
    if choice in ("any", "tool"):
        check_choice_has_tools(tools)
    if choice == "none":
        tools = None
    name = {"any": "required", "tool": body.tool_choice.name if body.tool_choice else None}.get(choice, choice)
    if name is None:
        raise ApiError(400, 'tool_choice.name: {"type": "tool"} needs the name of the tool to call',
                       param="tool_choice")
    parallel = parallel_calls(body)
    fmt = body.output_config.format if body.output_config else None
    constraint = tool_constraint(tools, name, parallel=parallel, schema=fmt.schema_ if fmt else None,
                                 format_param="output_config.format")
    think, fields = _thinking(body, settings)
    request = body if isinstance(body, MessagesRequest) else None
    if request is not None:
        check_range("max_tokens", request.max_tokens, 1)
        fields.update(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k, seed=request.seed,
                      stop=request.stop_sequences)
    options = sampling_options(fields, settings, request.max_tokens if request else None, think=think)
    check_range("temperature", request.temperature if request else None, 0, 1)  # after GenerationOptions' words
    check_conversation([{"role": m.role} for m in body.messages], "messages")
    messages, prefill = chat_messages(body, settings.secret_key)
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
            left_out("messages", "a server tool", tool.type)
            continue
        function = {"name": tool.name, "parameters": tool.input_schema or {"type": "object"}}
        if tool.description:
            function["description"] = tool.description
        if tool.strict:
            function["strict"] = True
        out.append({"type": "function", "function": function})
    check_tool_names(out)
    return out or None


def chat_messages(body: CountTokensRequest, key: bytes = b"") -> tuple[list[dict], str | None]:
    """(the messages as the chat template reads them, the prefill): `system` first; each message's
    blocks made into chat messages; a last assistant message of text alone is the answer's start. A
    thinking block's text is its own, else what its signature seals under `key` (display "omitted")."""
    messages: list[dict] = []
    if body.system:
        messages.append({"role": "system", "content": _text(body.system, "system")})
    calls: set[str] = set()  # the ids of the tool_use blocks so far, which a tool_result answers
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
        elif not m.content and not (m.role == "assistant" and i == len(body.messages) - 1):
            raise ApiError(400, f"{where}.content: give at least one content block (only a last assistant "
                                "message may be empty)", param="messages")
        elif m.role == "assistant":
            messages.append(_assistant(m.content, where, key))
            calls.update(call["id"] for call in messages[-1].get("tool_calls", ()))
        else:
            messages += _user(m.role, m.content, where, calls)
    last = messages[-1] if messages else {}
    if last.get("role") == "assistant" and not last.get("tool_calls") and not last.get("reasoning_content"):
        messages.pop()
        return messages, last["content"] or None
    return messages, None


def _refused(block: Block, where: str) -> ApiError:
    return ApiError(400, f"{where} is type {block.type!r}; Qwen3 reads text only here: send text blocks "
                         '({"type": "text", "text": "..."})', param="messages")


def _check_text(block: Block, where: str) -> None:
    if not block.text:
        raise ApiError(400, f"{where}.text: a text block must hold some text", param="messages")


def _text(content: str | list[Block], where: str) -> str:
    if isinstance(content, str):
        return content
    for j, block in enumerate(content):
        if block.type != "text" or block.text is None:
            raise _refused(block, f"{where}[{j}]")
    return "\n".join(block.text for block in content)  # type: ignore[misc]


def _assistant(blocks: list[Block], where: str, key: bytes) -> dict:
    text, reasoning, calls = [], [], []
    for j, block in enumerate(blocks):
        if block.type == "text" and block.text is not None:
            _check_text(block, f"{where}.content[{j}]")
            text.append(block.text)
        elif block.type == "thinking":
            thinking = block.thinking or unseal(block.signature, key)  # another server's, or altered: None
            if thinking:
                reasoning.append(thinking)
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


def _user(role: str, blocks: list[Block], where: str, calls: set[str]) -> list[dict]:
    """Tool results (each answering one of `calls`) become tool messages, where they stand; text blocks
    between them, one message each run."""
    out: list[dict] = []
    text: list[str] = []
    for j, block in enumerate(blocks):
        if block.type == "tool_result" and role == "user":
            check_tool_result(f"{where}.content[{j}].tool_use_id", block.tool_use_id, calls)
            if text:
                out.append({"role": role, "content": "\n".join(text)})
                text = []
            result = _text(block.content or "", f"{where}.content[{j}].content")
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": result})
        elif block.type == "text" and block.text is not None:
            _check_text(block, f"{where}.content[{j}]")
            text.append(block.text)
        else:
            raise _refused(block, f"{where}.content[{j}]")
    if text or not out:
        out.append({"role": role, "content": "\n".join(text)})
    return out


# ---------------------------------------------------------------- a result -> a message


def tool_use_id(call_id: str) -> str:
    """A call's id under Anthropic's prefix ("toolu_"; the parser writes OpenAI's "call_")."""
    return "toolu_" + call_id.removeprefix("call_")


def stop_reason(stats: GenerationStats, calls: list[ToolCall]) -> str:
    reason = stats.finish_reason or "stop"
    if reason != "length" and calls:
        return "tool_use"
    return STOP_REASONS.get(reason, "end_turn")


def usage(stats: GenerationStats) -> Usage:
    """Anthropic's usage: input_tokens are the prompt's computed tokens, cache_read_input_tokens those a
    reused prefix held (their sum is the prompt); output_tokens every token of the response."""
    return Usage(input_tokens=stats.prompt_tokens - stats.cached_tokens, output_tokens=len(stats.token_ids),
                 cache_read_input_tokens=stats.cached_tokens)


def show_thinking(body: CountTokensRequest) -> bool:
    return not (body.thinking and body.thinking.display == "omitted")




def parallel_calls(body: CountTokensRequest) -> bool:
    """Whether the reply may hold several calls (unless tool_choice.disable_parallel_tool_use)."""
    return not (body.tool_choice and body.tool_choice.disable_parallel_tool_use)
