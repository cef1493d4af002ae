"""OpenAI's Responses API (POST /v1/responses), as Codex CLI and the `openai` SDK's
`client.responses.create` speak it: the request and response models, input items made into the one
Submission (params.py), a reply made into output items, whole or as the documented event stream,
and the store of finished responses that `previous_response_id` continues.

Input items: messages (user, assistant, system, developer), function_call, function_call_output and
reasoning (its text, or our `encrypted_content`, read back). Function tools are offered to the model;
a namespace tool's functions under "namespace.name" (mapped back as the call's `namespace` and `name`);
tool types that cannot run here (web_search, ...) are left out with a log line.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
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

ENCRYPTED_PREFIX = "qwen3-mlx:"  # our encrypted_content: the reasoning's text, base64-encoded


# ---------------------------------------------------------------- requests


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


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
    max_output_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="The most tokens generated, reasoning included; lowered to the server's --max-tokens.")
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=1 << 64)] | None = None
    thinking_budget: Annotated[int, Field(ge=0)] | None = Field(None, description="The most reasoning tokens.")
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


# ---------------------------------------------------------------- the store of finished responses


class ResponseStore:
    """Finished responses kept for `previous_response_id`, in memory: the most recently used first out
    when there are more than `max_count` or they take more than `max_bytes` (their JSON). An evicted id
    is remembered (up to 16 times `max_count` of them), so that a request naming it is told why."""

    def __init__(self, max_count: int = 256, max_bytes: int = 64 << 20) -> None:
        self.max_count, self.max_bytes = max_count, max_bytes
        self._entries: OrderedDict[str, tuple[list[dict], dict, int]] = OrderedDict()
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, rid: str, items: list[dict], body: dict) -> None:
        """Keep a response: the conversation it ends (input items, then its output) and its body."""
        size = len(json.dumps(items)) + len(json.dumps(body))
        with self._lock:
            self._entries[rid] = (items, body, size)
            self._bytes += size
            while self._entries and (len(self._entries) > self.max_count or self._bytes > self.max_bytes):
                old, (_, _, old_size) = self._entries.popitem(last=False)
                self._bytes -= old_size
                self._evicted[old] = None
                log.info("responses: %s evicted from the store (%d kept, %d bytes)", old, len(self._entries),
                         self._bytes)
            while len(self._evicted) > 16 * self.max_count:
                self._evicted.popitem(last=False)

    def get(self, rid: str, param: str = "previous_response_id") -> tuple[list[dict], dict]:
        """(the conversation, the body) of a stored response.

        Raises:
            ApiError: a 404 for an id never stored here, or one evicted since (the message says which).
        """
        with self._lock:
            if rid in self._entries:
                self._entries.move_to_end(rid)
                items, body, _ = self._entries[rid]
                return items, body
            evicted = rid in self._evicted
        if evicted:
            raise ApiError(404, f"{param}: the response {rid!r} was evicted from the server's in-memory store (it "
                                f"keeps {self.max_count} responses, {self.max_bytes} bytes); send the whole "
                                "conversation as input", param=param, code="response_evicted")
        raise ApiError(404, f"{param}: no response {rid!r} is stored here (responses sent with store=false, or "
                            "before the server started, are not); send the whole conversation as input",
                       param=param, code="not_found")


# ---------------------------------------------------------------- a body -> the one Submission


@dataclass
class Turn:
    """One request as the mapping reads it: its id, the conversation's items, the tools' names."""

    body: ResponsesRequest
    items: list[dict]  # the whole conversation's input items (a stored one's first)
    names: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # the model's name -> (namespace, name)
    id: str = field(default_factory=lambda: new_id("resp"))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def parallel(self) -> bool:
        return self.body.parallel_tool_calls is not False

    @property
    def encrypted(self) -> bool:
        return "reasoning.encrypted_content" in (self.body.include or ())


def turn(body: ResponsesRequest, store: ResponseStore) -> Turn:
    """The request with its conversation: a stored response's first, when it continues one."""
    items = [{"type": "message", "role": "user", "content": body.input}] if isinstance(body.input, str) \
        else list(body.input)
    if body.previous_response_id:
        items = store.get(body.previous_response_id)[0] + items
    return Turn(body, items)


def responses_submission(t: Turn, settings: Settings) -> Submission:
    """The Prompt and GenerationOptions of a Responses request."""
    body = t.body
    check_model(body.model or None, settings)
    tools, t.names = offered_tools(body.tools or [])
    choice = _choice(body.tool_choice, t.names)
    if choice == "none":
        tools = None
    constraint = tool_constraint(tools, choice, parallel=t.parallel, schema=_schema(body.text),
                                 format_param="text.format")
    effort = body.reasoning.effort if body.reasoning else None
    fields = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                  thinking_budget=body.thinking_budget, reasoning_effort=effort)
    options = sampling_options(fields, settings, body.max_output_tokens, think=settings.defaults.think)
    messages = input_messages(t.items, {name: q for q, name in t.names.items()})
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
            log.info("tools[%d]: type %r left out: it does not run here", i, kind)
            continue
        namespace = tool.get("name") if kind == "namespace" else None
        for j, function in enumerate(nested):
            if not isinstance(function, dict) or function.get("type", "function") != "function":
                log.info("tools[%d]: a %r tool left out: it does not run here", i, function.get("type"))
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
    return fmt.schema_ or {"type": "object"}


# ---------------------------------------------------------------- input items -> chat messages


def input_messages(items: Sequence[Any], qualified: dict[tuple[str | None, str], str]) -> list[dict]:
    """The conversation's items as the chat template reads them: a reasoning item goes with the
    assistant message or calls after it; consecutive calls are one assistant message."""
    messages: list[dict] = []
    reasoning: str | None = None
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where}: an item is an object with a type; got {type(item).__name__}", param="input")
        kind = item.get("type", "message")
        if kind == "reasoning":
            reasoning = _reasoning_text(item)
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
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _content(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        else:
            log.info("%s: a %r item left out: it means nothing to this model", where, kind)
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


def _reasoning_text(item: dict) -> str | None:
    """A reasoning item's text: its content, else our encrypted_content (another server's is not ours
    to read, and is dropped)."""
    content = item.get("content")
    if isinstance(content, list) and content:
        return _content(content, "reasoning.content")
    encrypted = item.get("encrypted_content")
    if isinstance(encrypted, str) and encrypted.startswith(ENCRYPTED_PREFIX):
        try:
            return base64.b64decode(encrypted[len(ENCRYPTED_PREFIX):], validate=True).decode()
        except ValueError:
            pass
    return None


def encrypt(reasoning: str) -> str:
    return ENCRYPTED_PREFIX + base64.b64encode(reasoning.encode()).decode()


# ---------------------------------------------------------------- a reply -> output items and the response


def _reasoning_item(t: Turn, text: str, status: str = "completed") -> dict:
    item = {"id": new_id("rs"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}
    if t.encrypted:
        item["encrypted_content"] = encrypt(text)
    return item


def _message_item(text: str, status: str = "completed") -> dict:
    return {"id": new_id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": [_text_part(text)]}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(t: Turn, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    namespace, plain = t.names.get(name, (None, name))
    item = {"id": new_id("fc"), "type": "function_call", "call_id": call_id, "name": plain, "arguments": arguments,
            "status": status}
    if namespace:
        item["namespace"] = namespace
    return item


def output_items(t: Turn, reply: Reply) -> list[dict]:
    """A whole reply's items: reasoning, the message (when it has text), the complete calls."""
    items = []
    reasoning, text = "".join(reply.reasoning), "".join(reply.content)
    if reasoning:
        items.append(_reasoning_item(t, reasoning))
    if text or not reply.tool_calls():
        items.append(_message_item(text))
    items += [_call_item(t, c.id, c.function.name, c.function.arguments) for c in reply.tool_calls() or ()]
    return items


def usage(reply: Reply) -> dict:
    """completion's one rule (replies.usage): output_tokens counts every token of the response."""
    stats = reply.stats
    output = len(stats.token_ids)
    return {"input_tokens": stats.prompt_tokens, "input_tokens_details": {"cached_tokens": stats.cached_tokens},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": stats.reasoning_tokens},
            "total_tokens": stats.prompt_tokens + output}


def response_object(t: Turn, model_id: str, status: str, output: list[dict], reply: Reply | None = None,
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
        usage=usage(reply) if reply else None, metadata=body.metadata or {}).model_dump()


def status(reply: Reply) -> str:
    return "incomplete" if reply.stats.finish_reason == "length" else "completed"


def finish(t: Turn, model_id: str, reply: Reply, output: list[dict], store: ResponseStore) -> dict:
    """The finished response's body, stored (with its conversation) unless store is false."""
    body = response_object(t, model_id, status(reply), output, reply)
    if t.body.store is not False:
        store.put(t.id, t.items + output, body)
    return body


# ---------------------------------------------------------------- a reply -> its events


Event = tuple[str, dict]


class _Items:
    """The output items of a stream as the chunks arrive: one open at a time, each with its added,
    delta, done events; `sequence` numbers every event of the stream."""

    def __init__(self, t: Turn, reply: Reply) -> None:
        self.t, self.reply, self.output, self.sequence = t, reply, [], 0
        self.open: dict | None = None
        self.text: list[str] = []
        self.call_name = ""  # the open call's name as the model wrote it

    def event(self, kind: str, **data: Any) -> Event:
        self.sequence += 1
        return kind, {"type": kind, "sequence_number": self.sequence - 1, **data}

    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.output)}

    def start(self, item: dict) -> list[Event]:
        events = self.close()
        self.open, self.text = item, []
        events.append(self.event("response.output_item.added", output_index=len(self.output), item=item))
        if item["type"] != "function_call":
            part = {"type": "reasoning_text", "text": ""} if item["type"] == "reasoning" else _text_part("")
            events.append(self.event("response.content_part.added", **self._where(), content_index=0, part=part))
        return events

    def delta(self, text: str) -> Event:
        self.text.append(text)
        kind = {"reasoning": "response.reasoning_text.delta", "message": "response.output_text.delta",
                "function_call": "response.function_call_arguments.delta"}[self.open["type"]]
        extra = {} if self.open["type"] == "function_call" else {"content_index": 0}
        if self.open["type"] == "message":
            extra["logprobs"] = []
        return self.event(kind, **self._where(), **extra, delta=text)

    def close(self) -> list[Event]:
        """The open item's done events (a call the parser did not find complete is "incomplete")."""
        if self.open is None:
            return []
        item, text = self.open, "".join(self.text)
        if item["type"] == "function_call":
            complete = {c.id: c.function.arguments for c in self.reply.tool_calls() or ()}
            done = _call_item(self.t, item["call_id"], self.call_name, complete.get(item["call_id"], text),
                              "completed" if item["call_id"] in complete else "incomplete")
            events = [self.event("response.function_call_arguments.done", **self._where(), name=item["name"],
                                 arguments=done["arguments"])]
        else:
            done = _reasoning_item(self.t, text) if item["type"] == "reasoning" else _message_item(text)
            kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
            part = done["content"][0]
            events = [self.event(f"response.{kind}.done", **self._where(), content_index=0, text=text,
                                 **({"logprobs": []} if kind == "output_text" else {})),
                      self.event("response.content_part.done", **self._where(), content_index=0, part=part)]
        done["id"] = item["id"]
        events.append(self.event("response.output_item.done", output_index=len(self.output), item=done))
        self.output.append(done)
        self.open = None
        return events

    def feed(self, chunk: Chunk, call: dict | None) -> list[Event]:
        kind = "function_call" if call is not None else {"reasoning": "reasoning", "answer": "message"}.get(chunk.kind)
        events: list[Event] = []
        if call is not None and call["id"]:
            events += self.close()  # the previous call, under its own name
            self.call_name = call["name"]
            events += self.start({**_call_item(self.t, call["id"], call["name"], "", "in_progress")})
        elif kind in ("reasoning", "message") and chunk.text and (self.open or {}).get("type") != kind:
            first = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"} \
                if kind == "reasoning" else {**_message_item("", "in_progress"), "content": []}
            events += self.start(first)
        text = call["arguments"] if call is not None else chunk.text
        if text and kind is not None and self.open is not None:
            events.append(self.delta(text))
        return events


async def response_events(t: Turn, chunks: AsyncIterator[Chunk], model_id: str,
                          store: ResponseStore) -> AsyncIterator[Event]:
    """The documented stream: response.created, response.in_progress, each item's events, then
    response.completed or response.incomplete; a failure is response.failed."""
    reply = Reply(t.parallel)
    items = _Items(t, reply)
    yield items.event("response.created", response=response_object(t, model_id, "in_progress", []))
    yield items.event("response.in_progress", response=response_object(t, model_id, "in_progress", []))
    try:
        async for chunk in chunks:
            for event in items.feed(chunk, reply.add(chunk)):
                yield event
    except (ApiError, Qwen3Error) as e:
        code = e.code if isinstance(e, ApiError) and e.code else "server_error"
        message = e.message if isinstance(e, ApiError) else str(e)
        failed = response_object(t, model_id, "failed", items.output, error={"code": code, "message": message})
        yield items.event("response.failed", response=failed)
        return
    for event in items.close():
        yield event
    if not items.output:
        for event in items.start({**_message_item("", "in_progress"), "content": []}) + items.close():
            yield event
    body = finish(t, model_id, reply, items.output, store)
    yield items.event(f"response.{body['status']}", response=body)
