"""Anthropic's event stream: a reply's chunks as content blocks (thinking, text, tool_use), each with
its start, deltas and stop, between message_start and message_stop; pings while a long prompt is
prefilled."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from pydantic_core import from_json

from ...errors import Qwen3Error
from ...generation.response import Chunk, GenerationStats
from ...text.tools import ToolCallDelta
from ..submission.outcome import call_delta, check_finished, new_id, tool_calls
from ..submission.refusal import ApiError
from ..submission.sealed import seal
from .mapping import anthropic_error, stop_reason, tool_use_id, usage
from .protocol import Message, Usage

PING_SECONDS = 5.0  # a ping event after this long without a chunk (a long prompt's prefill)

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
    changes (a thinking block closes with its signature: the reasoning sealed under `key`, which a
    client sends back, display "omitted" or not). `content`: the blocks as a client that reads the
    stream puts them together (a whole reply's, tool_use inputs apart)."""

    def __init__(self, show_thinking: bool, key: bytes) -> None:
        self.show_thinking, self.key, self.index, self.open, self.thinking = show_thinking, key, -1, None, []
        self.content: list[dict] = []

    def start(self, kind: str, block: dict) -> list[Event]:
        events = self.close()
        self.index, self.open = self.index + 1, kind
        self.content.append({**block, "partial_json": ""} if kind == "tool_use" else dict(block))
        return events + [("content_block_start", {"type": "content_block_start", "index": self.index,
                                                  "content_block": block})]

    def delta(self, delta: dict) -> Event:
        block = self.content[self.index]
        for key, field in (("text", "text"), ("thinking", "thinking"), ("partial_json", "partial_json"),
                           ("signature", "signature")):
            if key in delta:
                block[field] += delta[key]
        return "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}

    def close(self) -> list[Event]:
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":
            events.append(self.delta({"type": "signature_delta", "signature": seal("".join(self.thinking), self.key)}))
        self.open = None
        return events + [("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def feed(self, chunk: Chunk, call: ToolCallDelta | None) -> list[Event]:
        events: list[Event] = []
        if call is not None:
            if call.id:
                events += self.start("tool_use", {"type": "tool_use", "id": tool_use_id(call.id), "name": call.name,
                                                  "input": {}})
            if call.arguments:
                events.append(self.delta({"type": "input_json_delta", "partial_json": call.arguments}))
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


def whole_message(seen: list[Chunk], stats: GenerationStats, model_id: str, *, show_thinking: bool,
                  parallel: bool, secret_key: bytes) -> Message:
    """A whole reply's message: the blocks its stream would carry (those of the chunks `seen`); a
    tool_use's input, its parsed arguments, or for a call the cap cut, its JSON so far read as the SDKs
    read a stream's (partially, the unfinished value left out)."""
    blocks = _Blocks(show_thinking, secret_key)
    for chunk in seen:
        blocks.feed(chunk, call_delta(chunk, parallel))
    blocks.close()
    complete = {tool_use_id(c.id): c.arguments for c in tool_calls(stats, parallel)}
    for block in blocks.content:
        if block["type"] == "tool_use":
            text = block.pop("partial_json")
            block["input"] = complete.get(block["id"]) or (from_json(text, allow_partial=True) if text else {})
    return Message(id=new_id("msg_"), model=model_id, content=blocks.content,
                   stop_reason=stop_reason(stats, tool_calls(stats, parallel)), stop_sequence=stats.stop_string,
                   usage=usage(stats))


async def message_events(chunks: AsyncIterator[Chunk], model_id: str, *, prompt_tokens: int, show_thinking: bool,
                         parallel: bool, secret_key: bytes, ping_seconds: float = PING_SECONDS) -> AsyncIterator[Event]:
    """Anthropic's stream: message_start, ping, each block's start, deltas and stop, message_delta
    (stop_reason, usage), message_stop; a failure is an error event."""
    blocks, stats = _Blocks(show_thinking, secret_key), GenerationStats()
    start = Message(id=new_id("msg_"), model=model_id, content=[], stop_reason=None,
                    usage=Usage(input_tokens=prompt_tokens, output_tokens=0)).model_dump()
    yield "message_start", {"type": "message_start", "message": start}
    yield "ping", {"type": "ping"}
    try:
        async for chunk in with_pings(chunks, ping_seconds):
            if chunk is None:
                yield "ping", {"type": "ping"}
                continue
            stats = chunk.stats
            for event in blocks.feed(chunk, call_delta(chunk, parallel)):
                yield event
        check_finished(stats)
    except ApiError as e:
        yield "error", json.loads(anthropic_error(e.status, e.message))
        return
    except Qwen3Error as e:
        yield "error", json.loads(anthropic_error(500, str(e)))
        return
    for event in blocks.close():
        yield event
    delta = {"stop_reason": stop_reason(stats, tool_calls(stats, parallel)), "stop_sequence": stats.stop_string}
    yield "message_delta", {"type": "message_delta", "delta": delta, "usage": usage(stats).model_dump()}
    yield "message_stop", {"type": "message_stop"}
