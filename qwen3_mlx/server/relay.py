"""A request's way to the engine and back to its route: the submission made in a worker thread, the
chunks read until the client goes away (its row then cancelled), and the HTTP responses that carry
them, whole or as server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..generation.response import Chunk
from .submission.reading import Settings, Submission

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def submit(engine: Any, submission: Callable[[Any, Settings], Submission], body: Any,
                 settings: Settings) -> Any:
    """The request made into a submission and given to the engine in a worker thread: rendering the
    template, tokenizing and compiling a grammar (the first one builds the tokenizer's grammar
    vocabulary, about a second) would otherwise hold up every other stream. It streams to this loop."""
    loop = asyncio.get_running_loop()

    def run() -> Any:
        s = submission(body, settings)
        return engine.submit(s.prompt, s.options, loop=loop)

    return await asyncio.to_thread(run)


async def chunks(handle: Any, request: Request) -> AsyncIterator[Chunk]:
    """The request's chunks; its row is cancelled when the client goes away or the reader stops early."""
    finished = False

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        handle.cancel()

    watcher = asyncio.ensure_future(watch())
    metrics = getattr(request.app.state, "metrics", None)  # metrics.py's, unless --no-metrics
    stream = handle if metrics is None else metrics.watch(handle, request.state.started)
    try:
        async for chunk in stream:
            yield chunk
        finished = True
    finally:
        watcher.cancel()
        if not finished:
            handle.cancel()


def sse(lines: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events, each already written as its lines."""
    return StreamingResponse(lines, media_type="text/event-stream", headers=_SSE_HEADERS)


def named_sse(events: AsyncIterator[tuple[str, dict]]) -> StreamingResponse:
    """Server-sent events with names (Anthropic's and the Responses API's): `event: <name>` and
    `data: <json>` each; the API's own events say when it failed."""

    async def lines() -> AsyncIterator[str]:
        async for name, data in events:
            yield f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    return sse(lines())


def json_response(text: str) -> Response:
    return Response(text, media_type="application/json")
