"""A reply's end, as every API reads it: the whole result gathered from the chunks, the shutdown's 503
for a reply the engine cancelled, the tool calls a request may take, and fresh ids."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ...errors import Qwen3Error
from ...generation.job import collect
from ...generation.response import Chunk, GenerationResult, GenerationStats
from ...text.tools import ToolCall, ToolCallDelta
from .refusal import ApiError


def check_finished(stats: GenerationStats) -> None:
    """The shutdown's 503 when the engine cancelled the reply (a client that went away cancels its own
    too, but is no longer there to read it): never an API's finish reason, "cancelled" is none."""
    if stats.finish_reason == "cancelled":
        raise ApiError(503, "the server shut down before the reply was finished; send the request again once it "
                            "is back", type="server_error", code="shutting_down")


async def gather(chunks: AsyncIterator[Chunk]) -> GenerationResult:
    """The whole reply; the engine's failure (not the request's fault) is a 500, a cancel the shutdown's 503."""
    return (await gather_chunks(chunks))[0]


async def gather_chunks(chunks: AsyncIterator[Chunk]) -> tuple[GenerationResult, list[Chunk]]:
    """(the whole reply, its chunks): a whole reply built from the chunks as its stream is carries what the
    stream carried (a call the cap cut, say). Failures as gather()'s."""
    seen = []
    try:
        async for chunk in chunks:
            seen.append(chunk)
    except Qwen3Error as e:
        raise ApiError(500, str(e), type="server_error") from None
    result = collect(iter(seen))
    check_finished(result.stats)
    return result, seen


def tool_calls(stats: GenerationStats, parallel: bool) -> list[ToolCall]:
    """The answer's complete calls, as the library parsed them (a call announced while streaming, then
    found malformed, is not one); the first alone when the request forbids parallel calls."""
    return stats.tool_calls[: None if parallel else 1]


def call_delta(chunk: Chunk, parallel: bool) -> ToolCallDelta | None:
    """The chunk's piece of a call, if it is one the request takes (the first call alone, unless parallel)."""
    delta = chunk.tool_call if chunk.kind == "tool_call" else None
    if delta is None or (delta.index > 0 and not parallel):
        return None
    return delta


@dataclass(frozen=True)
class StreamedCall:
    """A call as a stream carried it: `arguments` its JSON text, whole or, for a call the cap cut
    (`complete` false), as far as it got."""

    id: str
    name: str
    arguments: str
    complete: bool


def streamed_calls(seen: list[Chunk], parallel: bool) -> list[StreamedCall]:
    """The calls the chunks `seen` carried, in order: a complete one's arguments as the library parsed
    them, a cut one's text so far."""
    complete = {call.id: call for call in tool_calls(seen[-1].stats, parallel)} if seen else {}
    started: list[tuple[str, str]] = []
    text: dict[str, list[str]] = {}
    for chunk in seen:
        delta = call_delta(chunk, parallel)
        if delta is not None and delta.id:
            started.append((delta.id, delta.name or ""))
            text[delta.id] = []
        if delta is not None and delta.arguments and started:
            text[started[-1][0]].append(delta.arguments)
    return [StreamedCall(cid, name, complete[cid].arguments_json, True) if cid in complete
            else StreamedCall(cid, name, "".join(text[cid]), False) for cid, name in started]


def new_id(prefix: str) -> str:
    """A fresh id under its API's official prefix ("msg_", "resp_", "chatcmpl-", ...)."""
    return prefix + uuid.uuid4().hex
