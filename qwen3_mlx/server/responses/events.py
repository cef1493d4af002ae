"""The Responses API's documented event stream: response.created and response.in_progress, each
output item's added, delta and done events, then response.completed or response.incomplete (or
response.failed), every event numbered."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from ...errors import Qwen3Error
from ...generation.response import Chunk, GenerationStats
from ..submission.outcome import call_delta, check_finished, new_id, tool_calls
from ..submission.refusal import ApiError
from .mapping import (
    Turn,
    call_item,
    finish,
    message_item,
    reasoning_item,
    response_object,
    text_part,
)
from .store import ResponseStore

Event = tuple[str, dict]  # (the event's name, its data)


class _Items:
    """The output items of a stream as the chunks arrive: one open at a time, each with its added,
    delta, done events; `sequence` numbers every event of the stream."""

    def __init__(self, t: Turn) -> None:
        self.t, self.output, self.sequence = t, [], 0
        self.stats = GenerationStats()
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
            part = {"type": "reasoning_text", "text": ""} if item["type"] == "reasoning" else text_part("")
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

    def close(self, last: bool = False) -> list[Event]:
        """The open item's done events: a call the parser did not find complete is "incomplete", and so is
        the `last` item when the cap cut the reply. The parser's complete calls are known at the reply's
        end: a call that another follows is complete when its arguments are a JSON object."""
        if self.open is None:
            return []
        item, text = self.open, "".join(self.text)
        if item["type"] == "function_call":
            complete = {c.id: c.arguments_json for c in tool_calls(self.stats, self.t.parallel)} if last \
                else {item["call_id"]: text} if _is_object(text) else {}
            done = call_item(self.t, item["call_id"], self.call_name, complete.get(item["call_id"], text),
                             "completed" if item["call_id"] in complete else "incomplete")
            events = [self.event("response.function_call_arguments.done", **self._where(), name=item["name"],
                                 arguments=done["arguments"])]
        else:
            cut = "incomplete" if last and self.stats.finish_reason == "length" else "completed"
            done = reasoning_item(self.t, text, cut) if item["type"] == "reasoning" else message_item(text, cut)
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

    def end(self) -> list[Event]:
        """The last item's done events, and an empty message's when the reply had no item."""
        events = self.close(last=True)
        if not self.output:
            events += self.start({**message_item("", "in_progress"), "content": []}) + self.close(last=True)
        return events

    def feed(self, chunk: Chunk) -> list[Event]:
        self.stats, call = chunk.stats, call_delta(chunk, self.t.parallel)
        kind = "function_call" if call is not None else {"reasoning": "reasoning", "answer": "message"}.get(chunk.kind)
        events: list[Event] = []
        if call is not None and call.id:
            events += self.close()  # the previous call, under its own name
            self.call_name = call.name
            events += self.start({**call_item(self.t, call.id, call.name, "", "in_progress")})
        elif kind in ("reasoning", "message") and chunk.text and (self.open or {}).get("type") != kind:
            first = {"id": new_id("rs_"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"} \
                if kind == "reasoning" else {**message_item("", "in_progress"), "content": []}
            events += self.start(first)
        text = call.arguments if call is not None else chunk.text
        if text and kind is not None and self.open is not None:
            events.append(self.delta(text))
        return events


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def whole_output(t: Turn, seen: list[Chunk]) -> list[dict]:
    """A whole reply's output items: those its stream would carry (the items of the chunks `seen`)."""
    items = _Items(t)
    for chunk in seen:
        items.feed(chunk)
    items.end()
    return items.output


async def response_events(t: Turn, chunks: AsyncIterator[Chunk], model_id: str,
                          store: ResponseStore) -> AsyncIterator[Event]:
    """The documented stream: response.created, response.in_progress, each item's events, then
    response.completed or response.incomplete; a failure is response.failed."""
    items = _Items(t)
    yield items.event("response.created", response=response_object(t, model_id, "in_progress", []))
    yield items.event("response.in_progress", response=response_object(t, model_id, "in_progress", []))
    try:
        async for chunk in chunks:
            for event in items.feed(chunk):
                yield event
        check_finished(items.stats)
    except (ApiError, Qwen3Error) as e:
        code = e.code if isinstance(e, ApiError) and e.code else "server_error"
        message = e.message if isinstance(e, ApiError) else str(e)
        failed = response_object(t, model_id, "failed", items.output, error={"code": code, "message": message})
        yield items.event("response.failed", response=failed)
        return
    for event in items.end():
        yield event
    body = finish(t, model_id, items.stats, items.output, store)
    yield items.event(f"response.{body['status']}", response=body)
