"""Ollama's /api/chat and /api/generate mapped onto the one request path: a body read into a Submission
(submission/reading.py's rules) and a whole result written as Ollama's body.

    think true | false                     thinking on or off, within the server's budget
    think "low" | "medium" | "high" | ...  thinking within that level's budget (REASONING_EFFORTS)
    options.num_predict                    max_tokens; -1 (no limit) and -2 (up to the context): --max-tokens
    options.repeat_penalty                 repetition_penalty; the other options keep their names
    format "json" | {schema}               the answer constrained (the structured-output path)
    tools                                  OpenAI's function format, as Ollama takes it

Names follow Ollama's tags: `qwen3` and `qwen3:latest` are one model. What the server cannot do (images,
a suffix, a template, the deprecated context) is refused in Ollama's error shape, saying what to do instead.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from ...generation.options import REASONING_EFFORTS
from ...generation.response import GenerationResult, GenerationStats, TokenLogprob
from ...text.prompt import Prompt
from ...text.structured import response_format_schema
from ...text.tools import ToolCall
from ...errors import OptionError
from ..submission.outcome import tool_calls
from ..submission.reading import Settings, Submission, check_tool_names, sampling_options, tool_constraint
from ..submission.refusal import ApiError, check_range, unsupported
from . import protocol as p

ROLES = ("system", "user", "assistant", "tool")
TEXT_ONLY = "this server's Qwen3 models read text only; describe the image in words instead"


def is_ollama(path: str) -> bool:
    """Whether a path is this API's (its errors then take Ollama's shape: {"error": "..."})."""
    return path.startswith("/api/")


def ollama_error(message: str) -> str:
    return json.dumps({"error": message})


# ---------------------------------------------------------------- names with Ollama's tags


def tagged(name: str) -> str:
    """A name as /api/tags lists it: with its tag, `:latest` when it has none."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def check_name(name: str | None, settings: Settings) -> None:
    """A 400 for no name (Ollama's rule), a 404 unless `name` is one the server answers to, tag or not."""
    if not name:
        raise ApiError(400, "model is required: give the model's name (GET /api/tags lists it)", param="model")
    if tagged(name) not in {tagged(n) for n in (settings.model_id, *settings.aliases)}:
        raise ApiError(404, f"model {name!r} not found; this server serves {tagged(settings.model_id)!r} "
                            "(GET /api/tags); it pulls nothing", param="model", code="model_not_found")


# ---------------------------------------------------------------- a body -> the one Submission


def chat_submission(body: p.ChatRequest, settings: Settings) -> Submission:
    """The Prompt and GenerationOptions of an /api/chat body with messages."""
    check_name(body.model, settings)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    check_tool_names(tools or ())
    options = _options(body, settings, think=None)
    constraint = tool_constraint(tools, "auto", parallel=True, schema=_schema(body.format), format_param="format")
    return Submission(Prompt(chat_messages(body.messages or []), tools=tools), options.replace(**constraint))


def generate_submission(body: p.GenerateRequest, settings: Settings) -> Submission:
    """The Prompt and GenerationOptions of an /api/generate body with a prompt: a user message (and the
    system's) through the chat template, or with raw the text as it is (no thinking of its own)."""
    check_name(body.model, settings)
    if body.images:
        raise unsupported("images", TEXT_ONLY)
    if body.suffix:
        raise unsupported("suffix", "Qwen3 has no fill-in-the-middle mode here; leave it empty")
    if body.template:
        raise unsupported("template", "the chat template is the checkpoint's; send the whole prompt with "
                                      "raw=true instead")
    if body.context:
        raise unsupported("context", "Ollama deprecated it; send the conversation as messages to /api/chat")
    if body.raw and body.system:
        raise unsupported("system", "a raw prompt has no template to put it in; write it into the prompt")
    options = _options(body, settings, think=False if body.raw else None)
    constraint = tool_constraint(None, "auto", parallel=True, schema=_schema(body.format), format_param="format")
    prompt = Prompt(body.prompt or "", raw=True) if body.raw else Prompt(body.prompt or "", system=body.system or None)
    return Submission(prompt, options.replace(**constraint))


def _options(body: p.GenerationBody, settings: Settings, think: bool | None) -> Any:
    """GenerationOptions by the one rule (sampling_options): the think field, then the options'."""
    thinks, fields = thinking(body.think, settings)
    o = body.options or p.Options()
    if o.typical_p is not None and o.typical_p != 1:
        raise unsupported("options.typical_p", "not implemented; use top_p or min_p")
    if o.frequency_penalty:
        raise unsupported("options.frequency_penalty", "not implemented; use presence_penalty or repeat_penalty")
    fields.update(temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p, seed=o.seed,
                  stop=o.stop, presence_penalty=o.presence_penalty, repetition_penalty=o.repeat_penalty,
                  num_draft_tokens=o.draft_num_predict)
    options = sampling_options(fields, settings, num_predict(o.num_predict), think=thinks if think is None else think)
    check_range("options.draft_num_predict", o.draft_num_predict, 0, 64)
    check_range("top_logprobs", body.top_logprobs, 0, 20)
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
    return options.replace(logprobs=(body.top_logprobs or 0) if body.logprobs else None)


def num_predict(value: int | None) -> int | None:
    """Ollama's num_predict as max_tokens: -1 (no limit), -2 (up to the context) and 0 (unset) are the
    server's --max-tokens, which also bounds the context's room."""
    if value is not None and value < -2:
        raise ApiError(400, f"options.num_predict must be a count of tokens, -1 (no limit) or -2 (up to the "
                            f"context), got {value}", param="options.num_predict")
    return value if value and value > 0 else None


def thinking(think: p.Think | None, settings: Settings) -> tuple[bool, dict[str, Any]]:
    """(think, the budget's fields): true or false; a level names its budget in the one effort table."""
    if think is None:
        return settings.defaults.think, {}
    if isinstance(think, bool):
        return think, {}
    if think in REASONING_EFFORTS:
        return True, {"reasoning_effort": think}
    levels = ", ".join(f'"{name}"' for name in REASONING_EFFORTS)
    raise ApiError(400, f"think: give true, false or a level ({levels}), got {think!r}", param="think")


def _schema(fmt: p.Format | None) -> dict | None:
    """The answer's JSON schema: "json" any object, an object a schema."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return dict(response_format_schema({"type": "json_object"}))
    if not isinstance(fmt, dict):
        raise ApiError(400, f'format: give "json" or a JSON schema (an object), got {fmt!r}', param="format")
    try:
        return dict(response_format_schema({"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}))
    except OptionError as e:
        raise ApiError(400, str(e).replace("response_format", "format"), param="format") from None


def chat_messages(messages: list[p.Message]) -> list[dict]:
    """The messages as the chat template reads them: Ollama's thinking is the reasoning, a tool call's
    arguments an object (or its JSON), a tool's result named by tool_name."""
    if not messages:
        raise ApiError(400, "messages: give at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        role = m.role.lower()
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}",
                           param=f"messages[{i}].role")
        if m.images:
            raise unsupported(f"messages[{i}].images", TEXT_ONLY)
        message: dict[str, Any] = {"role": role, "content": m.content or ""}
        if m.thinking and role == "assistant":
            message["reasoning_content"] = m.thinking
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": c.function.arguments or {}}} for c in m.tool_calls]
        if role == "tool" and m.tool_name:
            message["name"] = m.tool_name
        if role == "tool" and m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    if not any(m["role"] in ("user", "tool") for m in out):
        raise ApiError(400, "messages: the conversation must hold a user message", param="messages")
    return out


# ---------------------------------------------------------------- a result -> its body


def created_at() -> str:
    """Now, as Ollama writes times (RFC 3339, UTC)."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def nanoseconds(seconds: float) -> int:
    return int(seconds * 1e9)


def done_reason(stats: GenerationStats) -> str:
    """Ollama's: "length" when the cap cut the reply, else "stop" (after tool calls too)."""
    return "length" if stats.finish_reason == "length" else "stop"


def final(stats: GenerationStats, seconds: float) -> dict[str, Any]:
    """The last object's fields: done, the reason, the counts (as our OpenAI route's usage counts them:
    every prompt token, every generated token) and the durations in nanoseconds."""
    return {"done": True, "done_reason": done_reason(stats), "total_duration": nanoseconds(seconds),
            "load_duration": 0, "prompt_eval_count": stats.prompt_tokens,
            "prompt_eval_duration": nanoseconds(stats.prompt_seconds), "eval_count": len(stats.token_ids),
            "eval_duration": nanoseconds(stats.generation_seconds)}


def wire_calls(calls: list[ToolCall], start: int = 0) -> list[dict]:
    """Tool calls as Ollama writes them: the arguments an object."""
    return [{"id": c.id, "function": {"index": start + i, "name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(calls)]


def wire_logprobs(logprobs: list[TokenLogprob], tokenizer: Any) -> list[dict]:
    def one(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**one(lp.token, lp.logprob), "top_logprobs": [one(t, v) for t, v in lp.top]} for lp in logprobs]


def chat_body(result: GenerationResult, model: str, seconds: float, *, logprobs: bool, tokenizer: Any) -> dict:
    """The /api/chat body of a whole result."""
    message: dict[str, Any] = {"role": "assistant", "content": result.content}
    if result.reasoning:
        message["thinking"] = result.reasoning
    calls = tool_calls(result.stats, True)
    if calls:
        message["tool_calls"] = wire_calls(calls)
    body = {"model": model, "created_at": created_at(), "message": message, **final(result.stats, seconds)}
    if logprobs:
        body["logprobs"] = wire_logprobs(result.content_logprobs, tokenizer)
    return body


def generate_body(result: GenerationResult, model: str, seconds: float, *, logprobs: bool, tokenizer: Any) -> dict:
    """The /api/generate body of a whole result."""
    body = {"model": model, "created_at": created_at(), "response": result.content, **final(result.stats, seconds)}
    if result.reasoning:
        body["thinking"] = result.reasoning
    if logprobs:
        body["logprobs"] = wire_logprobs(result.content_logprobs, tokenizer)
    return body


def loaded_body(model: str, chat: bool) -> dict:
    """The answer to a request with no messages or prompt: Ollama's "load the model" (it is loaded)."""
    start = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    return {"model": model, "created_at": created_at(), **start, "done": True, "done_reason": "load"}
