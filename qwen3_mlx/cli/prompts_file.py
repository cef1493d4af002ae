"""Batch files for `qwen3-mlx generate --prompts-file`: three formats read into requests, results
written as JSON lines.

- text: every non-empty line is a prompt (the user message).
- chat: JSON lines {"messages": [...], "custom_id"?: "...", <option>: value, ...}, where an option is a
  GenerationOptions field (LINE_OPTIONS: every field but the RUN_OPTIONS, which belong to the run).
- openai: OpenAI's Batch API input, which vLLM's run_batch reads: {"custom_id": "...", "method":
  "POST", "url": "/v1/chat/completions", "body": {"messages": [...], "max_tokens": ..., ...}}.

The format is the file's, decided by its first non-empty line: a JSON object makes it JSON lines
(chat, or openai when the object has "custom_id" and "body"), anything else a text file. A bad line
is one Qwen3Error, "FILE:LINE: the problem; what to do", raised before anything is generated.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import OptionError, Qwen3Error
from ..files import written_atomically
from ..generation.options import GenerationOptions
from ..generation.response import GenerationResult
from ..text.prompt import Messages, Prompt
from ..text.tokenizer import checked_messages

FORMATS = ("text", "chat", "openai")
# The rule: an option is a line's unless it is a property of the batch or of its shared cache (the
# cache's kind and size, how prompts are computed into it); those are RUN_OPTIONS, set on the command
# line for every line. A new GenerationOptions field is a line option unless it is added here.
RUN_OPTIONS = ("max_kv_size", "prefill_step_size", "kv_bits", "kv_group_size", "quantized_kv_start")
LINE_OPTIONS = tuple(f.name for f in fields(GenerationOptions) if f.name not in RUN_OPTIONS)
CHAT_URL = "/v1/chat/completions"
_NAMES = {"chat": ("a chat request", "chat requests"), "openai": ("an OpenAI batch request", "OpenAI batch requests")}


@dataclass(frozen=True)
class BatchRequest:
    """One prompt of a batch file, with the options it runs with."""

    line: int  # where it is in the file, from 1
    prompt: Prompt
    options: GenerationOptions
    custom_id: str | None = None
    model: str | None = None  # an OpenAI body's, echoed in its response
    body: dict | None = field(default=None, compare=False)  # an OpenAI line's body, for its response's shape


@dataclass(frozen=True)
class BatchFile:
    format: str  # one of FORMATS
    requests: list[BatchRequest]


class LineError(Exception):
    """A problem with one line; read_batch_lines adds the file and the line number."""


# ---------------------------------------------------------------- reading


def read_batch_file(path: Path, base: GenerationOptions, system: str | None = None, *, raw: bool = False,
                    model: str = "") -> BatchFile:
    """The requests of a batch file; `base` (the command line's options) is what a line leaves unset,
    `raw`: a text file's lines are completed as they are; `model`: the model OpenAI lines may name.

    Raises:
        Qwen3Error: "FILE:LINE: problem" for the first bad line, a file that is not UTF-8, or one with no prompt.
        OSError: the file cannot be read.
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise Qwen3Error(f"{path}:{line}: not valid UTF-8 (byte {data[e.start]:#04x}); save the file as UTF-8") from None
    return read_batch_lines(text.splitlines(), base, str(path), system, raw=raw, model=model)


def read_batch_lines(lines: Iterable[str], base: GenerationOptions, name: str = "<prompts>",
                     system: str | None = None, *, raw: bool = False, model: str = "") -> BatchFile:
    """As read_batch_file, from the file's lines; `name` is the file's name in errors. `system` is the
    system message of every prompt that has none of its own."""
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise Qwen3Error(f"{name}: no prompts; write one prompt a line, or one JSON request a line")
    first_line, first = numbered[0]
    fmt = "text"
    if first.lstrip().startswith("{"):
        try:
            fmt = _json_format(_json_object(first))
        except LineError as e:
            raise Qwen3Error(f"{name}:{first_line}: {e}") from None
    requests = []
    context = _Context(base, system, raw, model)
    for n, line in numbered:
        try:
            requests.append(_request(fmt, n, line, context))
        except (LineError, OptionError) as e:
            raise Qwen3Error(f"{name}:{n}: {e}") from None
    ids = [r.custom_id for r in requests if r.custom_id is not None]
    if len(set(ids)) < len(ids):
        twice = next(r for r in requests if r.custom_id is not None and ids.count(r.custom_id) > 1)
        raise Qwen3Error(f"{name}: custom_id {twice.custom_id!r} is used twice; each request needs its own")
    return BatchFile(fmt, requests)


def _json_object(line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise LineError(f"not JSON ({e.msg}, column {e.colno}); this is a JSON lines file (its first request is "
                        "a JSON object), so every line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise LineError(f"a JSON {type(obj).__name__}, not an object; write one request object a line")
    return obj


def _json_format(obj: dict) -> str:
    if "custom_id" in obj and "body" in obj:
        return "openai"
    if "messages" in obj:
        return "chat"
    raise LineError('a JSON object with neither "messages" (a chat request) nor "custom_id" and "body" '
                    "(an OpenAI batch request)")


@dataclass(frozen=True)
class _Context:
    """What the command line gives every line."""

    base: GenerationOptions
    system: str | None
    raw: bool
    model: str


def _request(fmt: str, n: int, line: str, context: _Context) -> BatchRequest:
    if fmt == "text":
        if context.raw:
            return BatchRequest(n, Prompt(line, raw=True), context.base)
        return BatchRequest(n, Prompt(_with_system(line, context.system)), context.base)
    obj = _json_object(line)
    if _json_format(obj) != fmt:
        one, many = _NAMES[_json_format(obj)][0], _NAMES[fmt][1]
        raise LineError(f"{one} in a file of {many} (as its first line is); use one format a file")
    if fmt == "chat":
        return _chat_request(n, obj, context.base, context.system)
    return _openai_request(n, obj, context)


def _with_system(prompt: str | Messages, system: str | None) -> str | Messages:
    """A prompt with the command line's system message, unless it has one of its own."""
    if system is None:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if any(m.get("role") == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]


def _custom_id(obj: dict) -> str | None:
    value = obj.get("custom_id")
    if value is not None and not isinstance(value, str):
        raise LineError(f"custom_id={value!r} must be a string")
    return value


# ---------------------------------------------------------------- chat lines


def _chat_request(n: int, obj: dict, base: GenerationOptions, system: str | None) -> BatchRequest:
    unknown = sorted(set(obj) - {"messages", "custom_id", *LINE_OPTIONS})
    if unknown:
        hint = f" (the whole run's: --{unknown[0].replace('_', '-')})" if unknown[0] in RUN_OPTIONS else ""
        raise LineError(f"unknown key {unknown[0]!r}{hint}; a chat line takes messages, custom_id and the options "
                        f"{', '.join(LINE_OPTIONS)}")
    messages = checked_messages(_developer_as_system(obj["messages"]))
    options = {k: _option(k, v) for k, v in obj.items() if k in LINE_OPTIONS}
    return BatchRequest(n, Prompt(_with_system(messages, system)), base.replace(**options), _custom_id(obj))


def _developer_as_system(messages: Any) -> Any:
    """OpenAI's "developer" role is a system message, as the server reads it."""
    if not isinstance(messages, list):
        return messages
    return [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in messages]


def _option(name: str, value: Any) -> Any:
    """A JSON value as the option's type; GenerationOptions checks the numbers' types and ranges."""
    if name == "think" and not isinstance(value, bool):
        raise LineError(f"think={value!r} must be true or false")
    if name == "stop":
        stop = [value] if isinstance(value, str) else value if isinstance(value, list) else None
        if value is not None and (stop is None or not all(isinstance(s, str) for s in stop)):
            raise LineError(f"stop={value!r} must be a string or a list of strings")
        return tuple(stop or ())
    if name == "logit_bias":
        return _logit_bias(value)
    return value


def _logit_bias(value: Any) -> dict[int, float] | None:
    """OpenAI's {"token id": bias}."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise LineError(f'logit_bias={value!r} must be an object {{"token id": bias}}')
    bias = {}
    for key, b in value.items():
        if not (key.isascii() and key.isdecimal()):
            raise LineError(f"logit_bias: key {key!r} is not a token id (a decimal integer)")
        if isinstance(b, bool) or not isinstance(b, (int, float)):  # its range is GenerationOptions' to check
            raise LineError(f"logit_bias: the bias of token {key} must be a number, got {b!r}")
        bias[int(key)] = float(b)
    return bias


# ---------------------------------------------------------------- OpenAI batch lines


def _openai_request(n: int, obj: dict, context: _Context) -> BatchRequest:
    """The envelope checked here; the body read as the server reads the same body sent to CHAT_URL
    (server.submission.reading: its budgets, caps, defaults and refusals), with the command line's options as
    the defaults and its --max-tokens as the cap."""
    from ..server.openai.mapping import (
        chat_body_submission,  # pydantic only, no FastAPI
    )
    from ..server.submission.reading import Settings
    from ..server.submission.refusal import ApiError

    custom_id = _custom_id(obj)
    if not custom_id:
        raise LineError("custom_id: give each request a non-empty string, to find its response by")
    if obj.get("method", "POST") != "POST":
        raise LineError(f"method={obj['method']!r}; a batch request is a POST")
    url = obj.get("url", CHAT_URL)
    if url != CHAT_URL:
        raise LineError(f"url={url!r}: only {CHAT_URL} requests are run here")
    body = obj["body"]
    if not isinstance(body, dict):
        raise LineError(f"body is a {type(body).__name__}; give a chat completion request object")
    if body.get("stream"):
        raise LineError("body.stream: a batch response is not streamed; leave it false")
    model = body.get("model") if isinstance(body.get("model"), str) and body.get("model") else context.model
    base = context.base
    settings = Settings(model, base.max_tokens, base.thinking_budget, defaults=base)
    try:
        submission = chat_body_submission(body, settings)
    except ApiError as e:
        raise LineError(f"body.{e.message}") from None
    prompt = submission.prompt
    prompt = Prompt(_with_system(prompt.content, context.system), tools=prompt.tools)  # type: ignore[arg-type]
    return BatchRequest(n, prompt, submission.options, custom_id, model, body)


# ---------------------------------------------------------------- writing


def result_record(fmt: str, index: int, request: BatchRequest, result: GenerationResult, tokenizer: Any, *,
                  hide_reasoning: bool = False) -> dict:
    """One output line: OpenAI's batch output shape for an openai file, else ours (see plain_record)."""
    if fmt == "openai":
        return openai_record(request, result, tokenizer, hide_reasoning=hide_reasoning)
    return plain_record(index, request, result, tokenizer, hide_reasoning)


def plain_record(index: int, request: BatchRequest, result: GenerationResult, tokenizer: Any,
                 hide_reasoning: bool = False) -> dict:
    """{"index", "custom_id"?, "reasoning", "content", "finish_reason", "budget_exhausted", "usage", "logprobs"?};
    usage as the server counts it (server.openai.mapping.usage), with our per-part counts beside."""
    from ..server.openai.mapping import usage

    s = result.stats
    record: dict[str, Any] = {"index": index}
    if request.custom_id is not None:
        record["custom_id"] = request.custom_id
    if not hide_reasoning:
        record["reasoning"] = result.reasoning
    record.update(content=result.content, finish_reason=s.finish_reason, budget_exhausted=s.budget_exhausted,
                  usage={"prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens,
                         "reasoning_tokens": s.reasoning_tokens, "answer_tokens": s.answer_tokens,
                         "forced_tokens": s.forced_tokens, "completion_tokens": usage(s).completion_tokens})
    if request.options.logprobs is not None:
        record["logprobs"] = [{"token": p.token, "logprob": p.logprob, "top": [list(t) for t in p.top]}
                              for p in result.logprobs]
    return record


def openai_record(request: BatchRequest, result: GenerationResult, tokenizer: Any, *,
                  hide_reasoning: bool = False) -> dict:
    """OpenAI's batch output line: {"id", "custom_id", "response": {"status_code": 200, "request_id",
    "body": the chat.completion the server would answer}, "error": null}."""
    from ..server.openai.mapping import chat_completion, dump_json

    body = request.body or {}
    shown = replace(result, reasoning="") if hide_reasoning else result
    completion = chat_completion(shown, request.model or "", logprobs=bool(body.get("logprobs")),
                                 parallel=body.get("parallel_tool_calls") is not False, tokenizer=tokenizer)
    request_id = completion.id.removeprefix("chatcmpl-")
    return {"id": f"batch_req_{request_id}", "custom_id": request.custom_id,
            "response": {"status_code": 200, "request_id": request_id,
                         "body": json.loads(dump_json(completion))}, "error": None}


def write_jsonl(records: Sequence[dict], path: Path | None, write: Callable[[str], Any]) -> None:
    """The records as JSON lines, to `path` whole or not at all (files.written_atomically) or, with no
    path, through `write`."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path is None:
        write(text)
        return
    with written_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
