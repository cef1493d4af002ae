"""Batch files for `qwen3-mlx generate --prompts-file`: three formats read into requests, results
written as JSON lines.

- text: every non-empty line is a prompt (the user message).
- chat: JSON lines {"messages": [...], "custom_id"?: "...", <option>: value, ...}, where an option is a
  GenerationOptions field (max_kv_size and prefill_step_size apart, which belong to the whole run).
- openai: OpenAI's Batch API input, which vLLM's run_batch reads: {"custom_id": "...", "method":
  "POST", "url": "/v1/chat/completions", "body": {"messages": [...], "max_tokens": ..., ...}}.

The format is the file's, decided by its first non-empty line: a JSON object makes it JSON lines
(chat, or openai when the object has "custom_id" and "body"), anything else a text file. A bad line
is one Qwen3Error, "FILE:LINE: the problem; what to do", raised before anything is generated.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import OptionError, Qwen3Error
from .options import GenerationOptions
from .prompt import Messages
from .response import GenerationResult
from .structured import response_format_schema
from .tokenizer import checked_messages

FORMATS = ("text", "chat", "openai")
# Options of the whole run, not of one line: a batch has no rotating cache, and prefills in steps of its own.
RUN_OPTIONS = ("max_kv_size", "prefill_step_size")
LINE_OPTIONS = tuple(f.name for f in fields(GenerationOptions) if f.name not in RUN_OPTIONS)
_FLOATS = ("temp", "top_p", "min_p", "presence_penalty", "repetition_penalty")
CHAT_URL = "/v1/chat/completions"
_NAMES = {"chat": ("a chat request", "chat requests"), "openai": ("an OpenAI batch request", "OpenAI batch requests")}


@dataclass(frozen=True)
class BatchRequest:
    """One prompt of a batch file, with the options it runs with."""

    line: int  # where it is in the file, from 1
    prompt: str | Messages
    options: GenerationOptions
    custom_id: str | None = None
    model: str | None = None  # an OpenAI body's, echoed in its response


@dataclass(frozen=True)
class BatchFile:
    format: str  # one of FORMATS
    requests: list[BatchRequest]


class LineError(Exception):
    """A problem with one line; read_batch_lines adds the file and the line number."""


# ---------------------------------------------------------------- reading


def read_batch_file(path: Path, base: GenerationOptions, system: str | None = None) -> BatchFile:
    """The requests of a batch file; `base` (the command line's options) is what a line leaves unset.

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
    return read_batch_lines(text.splitlines(), base, str(path), system)


def read_batch_lines(lines: Iterable[str], base: GenerationOptions, name: str = "<prompts>",
                     system: str | None = None) -> BatchFile:
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
    for n, line in numbered:
        try:
            requests.append(_request(fmt, n, line, base, system))
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


def _request(fmt: str, n: int, line: str, base: GenerationOptions, system: str | None) -> BatchRequest:
    if fmt == "text":
        return BatchRequest(n, _with_system(line, system), base)
    obj = _json_object(line)
    if _json_format(obj) != fmt:
        one, many = _NAMES[_json_format(obj)][0], _NAMES[fmt][1]
        raise LineError(f"{one} in a file of {many} (as its first line is); use one format a file")
    if fmt == "chat":
        return _chat_request(n, obj, base, system)
    return _openai_request(n, obj, base, system)


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
        hint = " (a rotating cache is not for a batch)" if unknown[0] == "max_kv_size" else ""
        raise LineError(f"unknown key {unknown[0]!r}{hint}; a chat line takes messages, custom_id and the options "
                        f"{', '.join(LINE_OPTIONS)}")
    messages = checked_messages(obj["messages"])
    options = {k: _option(k, v) for k, v in obj.items() if k in LINE_OPTIONS}
    return BatchRequest(n, _with_system(messages, system), base.replace(**options), _custom_id(obj))


def _option(name: str, value: Any) -> Any:
    """A JSON value as the option's type; GenerationOptions and the sampler check the ranges."""
    if name == "think" and not isinstance(value, bool):
        raise LineError(f"think={value!r} must be true or false")
    if name in _FLOATS and value is not None and not _is_number(value):
        raise LineError(f"{name}={value!r} must be a number")
    if name == "stop":
        stop = [value] if isinstance(value, str) else value if isinstance(value, list) else None
        if value is not None and (stop is None or not all(isinstance(s, str) for s in stop)):
            raise LineError(f"stop={value!r} must be a string or a list of strings")
        return tuple(stop or ())
    if name == "logit_bias":
        return _logit_bias(value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
        if not _is_number(b) and b != -math.inf:
            raise LineError(f"logit_bias: the bias of token {key} must be a number, got {b!r}")
        bias[int(key)] = float(b)
    return bias


# ---------------------------------------------------------------- OpenAI batch lines

# body key -> GenerationOptions field, for the keys that map one to one
_OPENAI_NAMES = {"temperature": "temp", "top_p": "top_p", "min_p": "min_p", "presence_penalty": "presence_penalty",
                 "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop",
                 "logit_bias": "logit_bias", "thinking_budget": "thinking_budget"}


def _openai_request(n: int, obj: dict, base: GenerationOptions, system: str | None) -> BatchRequest:
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
    _refuse_unsupported(body)
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise LineError("body.messages: give a non-empty list of messages")
    messages = [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
                for m in body["messages"]]
    try:
        messages = checked_messages(messages)
    except OptionError as e:
        raise LineError(f"body.{e}") from None
    options = {field: _option(field, body[key]) for key, field in _OPENAI_NAMES.items() if key in body}
    top_k = body.get("top_k")
    if top_k is not None:
        options["top_k"] = 0 if top_k == -1 else top_k  # vLLM's -1: no top-k filter
    most = body.get("max_completion_tokens", body.get("max_tokens"))
    if most is not None:  # OpenAI's count: every generated token, reasoning and forced text included
        options["max_tokens"] = options["max_total_tokens"] = most
    if body.get("logprobs"):
        options["logprobs"] = body.get("top_logprobs") or 0
    think = (body.get("chat_template_kwargs") or {}).get("enable_thinking")
    if think is not None:
        options["think"] = _option("think", think)
    try:
        schema = response_format_schema(body.get("response_format"))
    except OptionError as e:
        raise LineError(f"body.{e}") from None
    if schema is not None:
        options["json_schema"] = schema
    try:
        opts = base.replace(**options)
    except OptionError as e:
        raise LineError(f"body: {e}") from None
    model = body.get("model")
    return BatchRequest(n, _with_system(messages, system), opts, custom_id, model if isinstance(model, str) else None)


def _refuse_unsupported(body: dict) -> None:
    """A body value that would change the response but cannot be honoured here is refused, not dropped."""
    if body.get("stream"):
        raise LineError("body.stream: a batch response is not streamed; leave it false")
    if body.get("n", 1) != 1:
        raise LineError(f"body.n={body['n']}: one choice per request; write {body['n']} requests")
    if body.get("frequency_penalty"):
        raise LineError("body.frequency_penalty: not implemented; use presence_penalty or repetition_penalty")
    if body.get("tools") or body.get("functions"):
        raise LineError("body.tools: tool calling is not run from a batch file; use the server")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise LineError("body.tool_choice: tool calling is not run from a batch file; use the server")


# ---------------------------------------------------------------- writing


def result_record(fmt: str, index: int, request: BatchRequest, result: GenerationResult, *, model: str,
                  token_text: Callable[[int], str], hide_reasoning: bool = False) -> dict:
    """One output line: OpenAI's batch output shape for an openai file, else ours (see plain_record)."""
    if fmt == "openai":
        return openai_record(request, result, model=request.model or model, token_text=token_text,
                             hide_reasoning=hide_reasoning)
    return plain_record(index, request, result, hide_reasoning)


def plain_record(index: int, request: BatchRequest, result: GenerationResult, hide_reasoning: bool = False) -> dict:
    """{"index", "custom_id"?, "reasoning", "content", "finish_reason", "budget_exhausted", "usage", "logprobs"?}."""
    s = result.stats
    record: dict[str, Any] = {"index": index}
    if request.custom_id is not None:
        record["custom_id"] = request.custom_id
    if not hide_reasoning:
        record["reasoning"] = result.reasoning
    record.update(content=result.content, finish_reason=s.finish_reason, budget_exhausted=s.budget_exhausted,
                  usage={"prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens,
                         "reasoning_tokens": s.reasoning_tokens, "answer_tokens": s.answer_tokens,
                         "forced_tokens": s.forced_tokens, "completion_tokens": len(result.token_ids)})
    if request.options.logprobs is not None:
        record["logprobs"] = [{"token": p.token, "logprob": p.logprob, "top": [list(t) for t in p.top]}
                              for p in result.logprobs]
    return record


def openai_record(request: BatchRequest, result: GenerationResult, *, model: str,
                  token_text: Callable[[int], str], hide_reasoning: bool = False) -> dict:
    """OpenAI's batch output line: {"id", "custom_id", "response": {"status_code": 200, "request_id",
    "body": a chat.completion}, "error": null}."""
    s = result.stats
    message: dict[str, Any] = {"role": "assistant", "content": result.content}
    if result.reasoning and not hide_reasoning:
        message["reasoning_content"] = result.reasoning
    logprobs = None
    if request.options.logprobs is not None:
        logprobs = {"content": [{**_token(p.token, p.logprob, token_text),
                                 "top_logprobs": [_token(t, lp, token_text) for t, lp in p.top]}
                                for p in result.logprobs]}
    finish = "length" if s.finish_reason == "length" else "stop"
    completion = len(result.token_ids)
    request_id = uuid.uuid4().hex
    body = {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}],
            "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": completion,
                      "total_tokens": s.prompt_tokens + completion,
                      "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
                      "completion_tokens_details": {"reasoning_tokens": s.reasoning_tokens}}}
    return {"id": f"batch_req_{request_id}", "custom_id": request.custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def _token(token: int, logprob: float, token_text: Callable[[int], str]) -> dict:
    text = token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def write_jsonl(records: Sequence[dict], path: Path | None, write: Callable[[str], Any]) -> None:
    """The records as JSON lines, to `path` atomically (a temporary file beside it, renamed when
    complete: never a half-written file) or, with no path, through `write`."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path is None:
        write(text)
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
