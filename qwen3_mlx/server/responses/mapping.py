"""OpenAI's Responses API (POST /v1/responses), as Codex CLI and the `openai` SDK's
`client.responses.create` speak it, mapped onto the one request path: input items made into the
one Submission (submission/reading.py), and a result made into output items and the response's body
(stored, when asked, in store.py's ResponseStore).

Input items: messages (user, assistant, system, developer), function_call, function_call_output and
reasoning (its text, or our `encrypted_content`, the reasoning sealed by submission/sealed.py, read
back); the API's other items are left out with a log line, an unknown type refused. Function tools are
offered to the model; a namespace tool's functions under "namespace.name" (mapped back as the call's
`namespace` and `name`); tool types that cannot run here (web_search, ...) are left out with a log
line, once per type.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...generation.response import GenerationStats
from ...text.prompt import Prompt
from ..submission.outcome import new_id
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
from ..submission.sealed import seal, unseal
from .protocol import ResponseObject, ResponsesRequest, TextConfig
from .store import ResponseStore

# The API's other input items: calls of tools that do not run here and their outputs, references. Left out
# with a log line; a type outside the API is refused.
OTHER_ITEMS = frozenset({
    "file_search_call", "computer_call", "computer_call_output", "web_search_call", "image_generation_call",
    "code_interpreter_call", "local_shell_call", "local_shell_call_output", "shell_call", "shell_call_output",
    "apply_patch_call", "apply_patch_call_output", "mcp_list_tools", "mcp_approval_request", "mcp_approval_response",
    "mcp_call", "custom_tool_call", "custom_tool_call_output", "item_reference", "compaction"})


# ---------------------------------------------------------------- a body -> the one Submission


@dataclass
class Turn:
    """One request as the mapping reads it: its id, the conversation's items, the tools' names."""

    body: ResponsesRequest
    items: list[dict]  # the whole conversation's input items (a stored one's first)
    stored: int = 0  # how many of them a stored response gave
    key: bytes = b""  # what seals the reasoning's encrypted_content (the server's secret key)
    names: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # the model's name -> (namespace, name)
    id: str = field(default_factory=lambda: new_id("resp_"))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def parallel(self) -> bool:
        return self.body.parallel_tool_calls is not False

    @property
    def encrypted(self) -> bool:
        return "reasoning.encrypted_content" in (self.body.include or ())


def turn(body: ResponsesRequest, store: ResponseStore, key: bytes = b"") -> Turn:
    """The request with its conversation: a stored response's first, when it continues one; `key` seals
    and unseals its reasoning's encrypted_content."""
    items = [{"type": "message", "role": "user", "content": body.input}] if isinstance(body.input, str) \
        else list(body.input)
    stored = store.get(body.previous_response_id)[0] if body.previous_response_id else []
    return Turn(body, stored + items, stored=len(stored), key=key)


def responses_submission(t: Turn, settings: Settings) -> Submission:
    """The Prompt and GenerationOptions of a Responses request."""
    body = t.body
    check_model(body.model or None, settings)
    tools, t.names = offered_tools(body.tools or [])
    choice = _choice(body.tool_choice, t.names)
    if choice not in ("auto", "none"):
        check_choice_has_tools(tools)
    if choice == "none":
        tools = None
    constraint = tool_constraint(tools, choice, parallel=t.parallel, schema=_schema(body.text),
                                 format_param="text.format")
    effort = body.reasoning.effort if body.reasoning else None
    fields = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                  thinking_budget=body.thinking_budget, reasoning_effort=effort)
    check_range("max_output_tokens", body.max_output_tokens, 1)
    options = sampling_options(fields, settings, body.max_output_tokens, think=settings.defaults.think)
    messages = input_messages(t.items, {name: q for q, name in t.names.items()}, first=t.stored, key=t.key)
    check_conversation(messages, "input")
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
    return Submission(Prompt(messages, tools=tools), options.replace(**constraint))


def offered_tools(tools: Sequence[dict]) -> tuple[list[dict] | None, dict[str, tuple[str | None, str]]]:
    """(function tools in OpenAI's chat format, the model's name of each -> (namespace, name))."""
    out, names = [], {}
    for i, tool in enumerate(tools):
        kind = tool.get("type", "function")
        nested = tool.get("tools") if kind == "namespace" else [tool]
        if kind not in ("function", "namespace") or not isinstance(nested, list):
            left_out("responses", "a tool", kind)
            continue
        namespace = tool.get("name") if kind == "namespace" else None
        for j, function in enumerate(nested):
            if not isinstance(function, dict) or function.get("type", "function") != "function":
                left_out("responses", "a namespace's tool", function.get("type") if isinstance(function, dict)
                         else type(function).__name__)
                continue
            if not isinstance(function.get("name"), str) or not function["name"]:
                raise ApiError(400, f"tools[{i}]{f'.tools[{j}]' if namespace else ''}.name: a function tool needs "
                                    "a name", param="tools")
            name = f"{namespace}.{function['name']}" if namespace else function["name"]
            names[name] = (namespace, function["name"])
            spec = {"name": name, "parameters": function.get("parameters") or {"type": "object"}}
            spec.update({k: function[k] for k in ("description", "strict") if function.get(k)})
            out.append({"type": "function", "function": spec})
    check_tool_names(out)
    return out or None, names


def _choice(choice: str | dict | None, names: dict[str, tuple[str | None, str]]) -> str:
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        wanted = (choice.get("namespace"), choice["name"])
        return next((q for q, name in names.items() if name == wanted), choice["name"])
    raise ApiError(400, f"tool_choice: {json.dumps(choice)[:80]} cannot be honoured here; give \"auto\", \"none\", "
                        '"required" or {"type": "function", "name": ...}', param="tool_choice")


def _schema(text: TextConfig | None) -> dict | None:
    fmt = text.format if text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.schema_ is None:
        raise ApiError(400, 'text.format.schema: a "json_schema" format needs its schema (or use {"type": '
                            '"json_object"})', param="text.format.schema")
    return fmt.schema_


# ---------------------------------------------------------------- input items -> chat messages


def input_messages(items: Sequence[Any], qualified: dict[tuple[str | None, str], str], first: int = 0,
                   key: bytes = b"") -> list[dict]:
    """The conversation's items as the chat template reads them: a reasoning item (its text, or what its
    encrypted_content seals under `key`) goes with the assistant message or calls after it; consecutive
    calls are one assistant message. The request's own items start at `first` (a stored conversation's
    come before)."""
    messages: list[dict] = []
    reasoning: str | None = None
    calls: set[str] = set()  # the call_ids of the function calls so far, which an output answers
    for i, item in enumerate(items):
        where = f"input[{i - first}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where}: an item is an object with a type; got {type(item).__name__}", param="input")
        kind = item.get("type", "message")
        if kind == "reasoning":
            reasoning = _reasoning_text(item, key)
        elif kind == "message" and item.get("role") != "assistant":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("user", "system"):
                raise ApiError(400, f"{where}.role: {item.get('role')!r} is not user, assistant, system or developer",
                               param="input")
            messages.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
        elif kind in ("message", "function_call"):
            last = messages[-1] if messages else {}
            if kind == "message" or last.get("role") != "assistant":
                last = {"role": "assistant", "content": ""}
                messages.append(last)
            if reasoning is not None:
                last["reasoning_content"], reasoning = reasoning, None
            if kind == "message":
                last["content"] = _content(item.get("content"), f"{where}.content")
            else:
                last.setdefault("tool_calls", []).append(_call(item, where, qualified))
                calls.add(item.get("call_id"))
        elif kind == "function_call_output":
            check_tool_result(f"{where}.call_id", item.get("call_id"), calls)
            output = item.get("output")
            text = output if isinstance(output, str) else _content(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        elif kind in OTHER_ITEMS:
            left_out("responses", "an input item", kind)
        else:
            raise ApiError(400, f"{where}.type: unknown item type {json.dumps(kind)[:80]}", param=f"{where}.type")
    return messages


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}: give text or a list of {{\"type\": \"input_text\", \"text\": ...}} parts",
                       param="input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text", "summary_text", "reasoning_text") \
                or not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}[{j}] is type {kind!r}; Qwen3 reads text parts only: "
                                '{"type": "input_text", "text": "..."}', param="input")
        texts.append(part["text"])
    return "".join(texts)


def _call(item: dict, where: str, qualified: dict[tuple[str | None, str], str]) -> dict:
    name, arguments = item.get("name"), item.get("arguments", "{}")
    if not isinstance(name, str) or not isinstance(arguments, str):
        raise ApiError(400, f"{where}: a function_call needs a name and its arguments as a JSON string",
                       param="input")
    namespace = item.get("namespace")
    name = qualified.get((namespace, name), f"{namespace}.{name}" if namespace else name)
    return {"id": item.get("call_id"), "type": "function", "function": {"name": name, "arguments": arguments}}


def _reasoning_text(item: dict, key: bytes) -> str | None:
    """A reasoning item's text: its content, else what our encrypted_content seals (another server's, or
    one altered, is not ours to read, and is dropped)."""
    content = item.get("content")
    if isinstance(content, list) and content:
        return _content(content, "reasoning.content")
    return unseal(item.get("encrypted_content"), key)


# ---------------------------------------------------------------- a reply -> output items and the response


def reasoning_item(t: Turn, text: str, status: str = "completed") -> dict:
    item = {"id": new_id("rs_"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}
    if t.encrypted:
        item["encrypted_content"] = seal(text, t.key)
    return item


def message_item(text: str, status: str = "completed") -> dict:
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "status": status,
            "content": [text_part(text)]}


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(t: Turn, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    namespace, plain = t.names.get(name, (None, name))
    item = {"id": new_id("fc_"), "type": "function_call", "call_id": call_id, "name": plain, "arguments": arguments,
            "status": status}
    if namespace:
        item["namespace"] = namespace
    return item


def usage(stats: GenerationStats) -> dict:
    """The one rule of usage (openai/mapping.usage's): output_tokens counts every token of the response."""
    output = len(stats.token_ids)
    return {"input_tokens": stats.prompt_tokens, "input_tokens_details": {"cached_tokens": stats.cached_tokens},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": stats.reasoning_tokens},
            "total_tokens": stats.prompt_tokens + output}


def response_object(t: Turn, model_id: str, status: str, output: list[dict], stats: GenerationStats | None = None,
                    error: dict | None = None) -> dict:
    """The response's body: the request's settings echoed, the output, status and usage."""
    body = t.body
    fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else None
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return ResponseObject(
        id=t.id, created_at=t.created, status=status, error=error, incomplete_details=incomplete,
        instructions=body.instructions, max_output_tokens=body.max_output_tokens, model=model_id, output=output,
        parallel_tool_calls=t.parallel, previous_response_id=body.previous_response_id,
        reasoning={"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
        store=body.store is not False, temperature=body.temperature, text={"format": fmt or {"type": "text"}},
        tool_choice=body.tool_choice or "auto", tools=body.tools or [], top_p=body.top_p,
        usage=usage(stats) if stats else None, metadata=body.metadata or {}).model_dump()


def status(stats: GenerationStats) -> str:
    return "incomplete" if stats.finish_reason == "length" else "completed"


def finish(t: Turn, model_id: str, stats: GenerationStats, output: list[dict], store: ResponseStore) -> dict:
    """The finished response's body, stored (with its conversation) unless store is false."""
    body = response_object(t, model_id, status(stats), output, stats)
    if t.body.store is not False:
        store.put(t.id, t.items + output, body)
    return body
