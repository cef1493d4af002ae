"""OpenAI's stream: a reply's chunks as chat.completion.chunk or text_completion events, and their
server-sent-event lines (`data: <json>` each, then `data: [DONE]`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from ...errors import Qwen3Error
from ...generation.response import Chunk, GenerationStats, TokenLogprob
from ...text.tools import ToolCallDelta
from ..submission.outcome import call_delta, check_finished, new_id, tool_calls
from ..submission.refusal import ApiError
from . import protocol as p
from .mapping import (
    chat_logprobs,
    dump_json,
    error_json,
    finish_reason,
    legacy_logprobs,
    usage,
)


async def chat_events(chunks: AsyncIterator[Chunk], model_id: str, *, include_usage: bool, logprobs: bool,
                      parallel: bool, tokenizer: Any) -> AsyncIterator[p.ChatCompletionChunk]:
    """The role first, then reasoning, answer and tool-call deltas, the finish reason, and the usage when asked."""
    cid, created, stats = new_id("chatcmpl-"), int(time.time()), GenerationStats()

    def event(delta: p.Delta, finish: str | None = None, lp: list[TokenLogprob] | None = None,
              ) -> p.ChatCompletionChunk:
        choice = p.ChunkChoice(delta=delta, finish_reason=finish,
                               logprobs=chat_logprobs(lp, tokenizer) if logprobs and lp else None)
        return p.ChatCompletionChunk(id=cid, created=created, model=model_id, choices=[choice])

    yield event(p.Delta(role="assistant", content=""))
    async for chunk in chunks:
        stats, call = chunk.stats, call_delta(chunk, parallel)
        if call is not None:
            yield event(p.Delta(tool_calls=[_tool_call_delta(call)]))
        elif chunk.text and chunk.kind == "reasoning":
            yield event(p.Delta(reasoning_content=chunk.text, reasoning=chunk.text))
        elif chunk.text and chunk.kind == "answer":
            yield event(p.Delta(content=chunk.text), lp=list(chunk.logprobs))
    check_finished(stats)
    yield event(p.Delta(), finish_reason(stats, tool_calls(stats, parallel)))
    if include_usage:
        yield p.ChatCompletionChunk(id=cid, created=created, model=model_id, choices=[], usage=usage(stats))


def _tool_call_delta(call: ToolCallDelta) -> p.ToolCallDelta:
    return p.ToolCallDelta(index=call.index, id=call.id, type="function" if call.id else None,
                           function=p.FunctionCallDelta(name=call.name, arguments=call.arguments or ""))


async def completion_events(chunks: AsyncIterator[Chunk], model_id: str, *, include_usage: bool, logprobs: bool,
                            tokenizer: Any) -> AsyncIterator[p.Completion]:
    """Reasoning and text deltas, the finish reason, and the usage when asked."""
    cid, created, stats = new_id("cmpl-"), int(time.time()), GenerationStats()

    def event(text: str, finish: str | None = None, lp: list[TokenLogprob] | None = None,
              reasoning: str | None = None) -> p.Completion:
        choice = p.CompletionChoice(text=text, finish_reason=finish, reasoning_content=reasoning, reasoning=reasoning,
                                    logprobs=legacy_logprobs(lp, tokenizer) if logprobs and lp else None)
        return p.Completion(id=cid, created=created, model=model_id, choices=[choice])

    async for chunk in chunks:
        stats = chunk.stats
        if chunk.text and chunk.kind == "reasoning":
            yield event("", reasoning=chunk.text)
        elif chunk.text and chunk.kind == "answer":
            yield event(chunk.text, lp=list(chunk.logprobs))
    check_finished(stats)
    yield event("", finish_reason(stats, stats.tool_calls))
    if include_usage:
        yield p.Completion(id=cid, created=created, model=model_id, choices=[], usage=usage(stats))


async def sse_lines(events: AsyncIterator[p.BaseModel]) -> AsyncIterator[str]:
    """Server-sent events: `data: <json>` each, then `data: [DONE]`; a failure mid-stream is an error event."""
    try:
        async for event in events:
            yield f"data: {dump_json(event)}\n\n"
    except ApiError as e:
        yield f"data: {error_json(e.message, type=e.type, param=e.param, code=e.code)}\n\n"
    except Qwen3Error as e:
        yield f"data: {error_json(str(e), type='server_error')}\n\n"
    yield "data: [DONE]\n\n"
