"""Ollama's stream: a reply's chunks as NDJSON objects (one JSON object a line), `done: false` for each
piece of thinking or answer, the complete tool calls in one object once the answer is parsed, then the
last object with `done: true`, the reason, the counts and the durations. A failure once the stream has
begun is a line {"error": "..."}, as Ollama writes it."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from ...errors import Qwen3Error
from ...generation.response import Chunk, GenerationStats
from ..submission.outcome import check_finished, tool_calls
from ..submission.refusal import ApiError
from .mapping import created_at, final, ollama_error, wire_calls, wire_logprobs


async def ndjson(chunks: AsyncIterator[Chunk], model: str, started: float, *, chat: bool, logprobs: bool,
                 tokenizer: Any) -> AsyncIterator[str]:
    """The lines of /api/chat's (chat) or /api/generate's stream; `started`: the request's time.perf_counter()."""
    try:
        async for obj in _objects(chunks, model, started, chat=chat, logprobs=logprobs, tokenizer=tokenizer):
            yield json.dumps(obj, ensure_ascii=False) + "\n"
    except ApiError as e:
        yield ollama_error(e.message) + "\n"
    except Qwen3Error as e:
        yield ollama_error(str(e)) + "\n"


async def _objects(chunks: AsyncIterator[Chunk], model: str, started: float, *, chat: bool, logprobs: bool,
                   tokenizer: Any) -> AsyncIterator[dict]:
    stats = GenerationStats()

    def piece(content: str = "", thinking: str | None = None, **extra: Any) -> dict:
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            message.update(extra.pop("message", {}))
            body = {"message": message}
        else:
            body = {"response": content, **({"thinking": thinking} if thinking else {})}
        return {"model": model, "created_at": created_at(), **body, "done": False, **extra}

    async for chunk in chunks:
        stats = chunk.stats
        if chunk.text and chunk.kind == "reasoning":
            yield piece(thinking=chunk.text)
        elif chunk.text and chunk.kind == "answer":
            extra = {"logprobs": wire_logprobs(list(chunk.logprobs), tokenizer)} if logprobs else {}
            yield piece(chunk.text, **extra)
    check_finished(stats)
    calls = tool_calls(stats, True)
    if calls and chat:
        yield piece(message={"tool_calls": wire_calls(calls)})
    last = piece()
    last.update(final(stats, time.perf_counter() - started))
    yield last
