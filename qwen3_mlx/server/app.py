"""The server: FastAPI routes that check a request, submit it to the engine, and format its chunks
back, whole or as server-sent events, for OpenAI's chat and text completions, Anthropic's Messages
(anthropic.py) and OpenAI's Responses (responses.py); the chat page (web/) at /.

    app = create_app(engine, model_id="Qwen3-1.7B-4bit")   # then serve it with uvicorn

The engine owns the model and batches every request (engine.py); a request whose client goes away
is cancelled at once. Reasoning goes in `reasoning_content` and `reasoning`, never in `content`. The
API key, the body's size and every error's body, in the shape of its route's API, are guard.py's.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from ..errors import Qwen3Error
from ..generation.options import DEFAULT_MAX_TOKENS, GenerationOptions
from ..generation.response import Chunk, TokenLogprob
from . import anthropic as a
from . import protocol as p
from . import responses as r
from .guard import ERROR_DOCS, Guard, add_error_handlers, error_body
from .params import (
    ApiError,
    Settings,
    Submission,
    chat_submission,
    check_model,
    completion_submission,
    prompt_tokens,
)
from .replies import (
    Reply,
    chat_completion,
    chat_logprobs,
    completion,
    dump_json,
    legacy_logprobs,
    new_id,
)

DEFAULT_MAX_BODY_BYTES = 8 << 20
WEB = Path(__file__).parent / "web"  # the chat page
_ANTHROPIC_DOCS = {status: {"model": a.ErrorResponse} for status in ERROR_DOCS}


def create_app(engine: Any, *, model_id: str, aliases: Sequence[str] = (), api_key: str | None = None,
               max_tokens_cap: int = DEFAULT_MAX_TOKENS, default_thinking_budget: int | None = None,
               cors_origin: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, ui: bool = True,
               response_store: r.ResponseStore | None = None, defaults: GenerationOptions | None = None) -> FastAPI:
    """The FastAPI app over a started engine.Engine (the caller starts and closes it).

    Setting `app.state.draining` (serve.py does, on a signal) answers every new request with a 503.

    Args:
        model_id: the name /v1/models lists and responses report; a request naming another model gets
            a 404.
        aliases: more names a request's `model` may give.
        api_key: when set, /v1/* needs `Authorization: Bearer <api_key>` (or `x-api-key: <api_key>`).
        max_tokens_cap: the most tokens a request may generate (its max_tokens is lowered to it),
            and the default when it asks for no limit.
        default_thinking_budget: the thinking budget of requests that give none.
        cors_origin: the one origin browsers may call from; None: no CORS headers.
        max_body_bytes: larger request bodies get a 413.
        ui: serve the chat page at /.
        response_store: where /v1/responses keeps stored responses (default: 256 of them, 64 MiB).
        defaults: the options of what a request leaves unset (serve's --num-draft-tokens).
    """
    settings = Settings(model_id, max_tokens_cap, default_thinking_budget, aliases=tuple(aliases),
                        defaults=defaults or GenerationOptions())
    app = FastAPI(title="qwen3-mlx", summary="An OpenAI- and Anthropic-compatible server for Qwen3 with "
                                             "reasoning, a per-request thinking budget and tool calls")
    app.state.engine, app.state.settings, app.state.created = engine, settings, int(time.time())
    app.state.draining = False
    app.state.responses = response_store or r.ResponseStore()
    add_error_handlers(app)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, state=app.state)
    if cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"])
    app.include_router(_routes())
    app.include_router(_anthropic_routes())
    app.include_router(_responses_routes())
    if ui:
        app.mount("/ui", StaticFiles(directory=WEB), name="ui")
        app.add_api_route("/", lambda: FileResponse(WEB / "index.html"), include_in_schema=False)
    return app


# ---------------------------------------------------------------- routes


def _routes() -> Any:
    from fastapi import APIRouter

    router = APIRouter()

    @router.post("/v1/chat/completions", response_model=p.ChatCompletion, responses=ERROR_DOCS)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        settings = request.app.state.settings
        handle = await _submit(request.app.state.engine, chat_submission, body, settings)
        chunks = _chunks(handle, request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _chat_events(chunks, settings.model_id, include_usage, body.logprobs, body.parallel_tool_calls,
                                  request.app.state.engine.tokenizer)
            return _sse(events)
        reply = await _collect(chunks, body.parallel_tool_calls)
        return _json(chat_completion(reply, settings.model_id, body.logprobs, request.app.state.engine.tokenizer))

    @router.post("/v1/completions", response_model=p.Completion, responses=ERROR_DOCS)
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        settings = request.app.state.settings
        handle = await _submit(request.app.state.engine, completion_submission, body, settings)
        chunks = _chunks(handle, request)
        tokenizer = request.app.state.engine.tokenizer
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_completion_events(chunks, settings.model_id, include_usage, body.logprobs is not None,
                                           tokenizer))
        reply = await _collect(chunks, True)
        return _json(completion(reply, settings.model_id, body.logprobs is not None, tokenizer))

    @router.get("/v1/models", response_model=p.ModelList, responses=ERROR_DOCS)
    async def models(request: Request) -> p.ModelList:
        return p.ModelList(data=[_model_card(request)])

    @router.get("/v1/models/{model:path}", response_model=p.ModelCard, responses=ERROR_DOCS)
    async def model(model: str, request: Request) -> p.ModelCard:
        check_model(model, request.app.state.settings)
        return _model_card(request)

    @router.get("/health", response_model=p.Health)
    async def health(request: Request) -> p.Health:
        engine = request.app.state.engine
        figures = engine.memory() if hasattr(engine, "memory") else None  # test stubs may have none
        return p.Health(model=request.app.state.settings.model_id, rows=engine.rows,
                        memory=p.MemoryFigures(**figures) if figures else None)

    return router


def _anthropic_routes() -> Any:
    from fastapi import APIRouter

    router = APIRouter()

    @router.post("/v1/messages", response_model=a.Message, responses=_ANTHROPIC_DOCS)
    async def messages(body: a.MessagesRequest, request: Request) -> Response:
        settings, engine = request.app.state.settings, request.app.state.engine
        handle = await _submit(engine, a.messages_submission, body, settings)
        chunks = _finished(_chunks(handle, request))
        parallel = not (body.tool_choice and body.tool_choice.disable_parallel_tool_use)
        stop, show = body.stop_sequences or [], a.show_thinking(body)
        if body.stream:
            return _named_sse(a.message_events(chunks, settings.model_id, prompt_tokens=handle.prompt_tokens, stop=stop,
                                               show_thinking=show, parallel=parallel, tokenizer=engine.tokenizer))
        reply = await _collect(chunks, parallel)
        return _json(a.message(reply, settings.model_id, stop=stop, show_thinking=show, tokenizer=engine.tokenizer))

    @router.post("/v1/messages/count_tokens", response_model=a.TokenCount, responses=_ANTHROPIC_DOCS)
    async def count_tokens(body: a.CountTokensRequest, request: Request) -> a.TokenCount:
        settings, tokenizer = request.app.state.settings, request.app.state.engine.tokenizer

        def count() -> int:
            return prompt_tokens(tokenizer, a.messages_submission(body, settings))

        return a.TokenCount(input_tokens=await asyncio.to_thread(count))

    return router


def _responses_routes() -> Any:
    from fastapi import APIRouter

    router = APIRouter()

    @router.post("/v1/responses", response_model=r.ResponseObject, responses=ERROR_DOCS)
    async def responses(body: r.ResponsesRequest, request: Request) -> Response:
        settings, engine, store = request.app.state.settings, request.app.state.engine, request.app.state.responses
        turn = r.turn(body, store)
        handle = await _submit(engine, r.responses_submission, turn, settings)
        chunks = _finished(_chunks(handle, request))
        if body.stream:
            return _named_sse(r.response_events(turn, chunks, settings.model_id, store))
        reply = await _collect(chunks, turn.parallel)
        return Response(json.dumps(r.finish(turn, settings.model_id, reply, r.output_items(turn, reply), store)),
                        media_type="application/json")

    @router.get("/v1/responses/{response_id}", response_model=r.ResponseObject, responses=ERROR_DOCS)
    async def stored(response_id: str, request: Request) -> Response:
        body = request.app.state.responses.get(response_id, param="response_id")[1]
        return Response(json.dumps(body), media_type="application/json")

    return router


def _model_card(request: Request) -> p.ModelCard:
    return p.ModelCard(id=request.app.state.settings.model_id, created=request.app.state.created)


async def _submit(engine: Any, submission: Callable[[Any, Settings], Submission], body: Any,
                  settings: Settings) -> Any:
    """The request made into a submission and given to the engine in a worker thread: rendering the
    template, tokenizing and compiling a grammar (the first one builds the tokenizer's grammar
    vocabulary, about a second) would otherwise hold up every other stream. It streams to this loop."""
    loop = asyncio.get_running_loop()

    def submit() -> Any:
        s = submission(body, settings)
        return engine.submit(s.prompt, s.options, loop=loop)

    return await asyncio.to_thread(submit)


async def _chunks(handle: Any, request: Request) -> AsyncIterator[Chunk]:
    """The request's chunks; its row is cancelled when the client goes away or the reader stops early."""
    finished = False

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        handle.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        async for chunk in handle:
            yield chunk
        finished = True
    finally:
        watcher.cancel()
        if not finished:
            handle.cancel()



async def _collect(chunks: AsyncIterator[Chunk], parallel_tool_calls: bool) -> Reply:
    reply = Reply(parallel_tool_calls)
    try:
        async for chunk in chunks:
            reply.add(chunk)
    except Qwen3Error as e:  # the engine failed (not the request's fault)
        raise ApiError(500, str(e), type="server_error") from None
    _check_finished(reply)
    return reply


def _check_finished(reply: Reply) -> None:
    """The shutdown's 503 when the engine cancelled the reply (a client that went away cancels its own
    too, but is no longer there to read it): never OpenAI's finish_reason, "cancelled" is not one."""
    if reply.stats.finish_reason == "cancelled":
        raise ApiError(503, "the server shut down before the reply was finished; send the request again once it "
                            "is back", type="server_error", code="shutting_down")


async def _finished(chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    """The chunks, then the shutdown's 503 if the engine cancelled the reply (see _check_finished)."""
    last = None
    async for chunk in chunks:
        last = chunk
        yield chunk
    if last is not None:
        _check_finished(Reply(stats=last.stats))


def _named_sse(events: AsyncIterator[tuple[str, dict]]) -> StreamingResponse:
    """Server-sent events with names (Anthropic's and the Responses API's): `event: <name>` and
    `data: <json>` each; the API's own events say when it failed."""

    async def lines() -> AsyncIterator[str]:
        async for name, data in events:
            yield f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------- streams


async def _chat_events(chunks: AsyncIterator[Chunk], model_id: str, include_usage: bool, logprobs: bool,
                       parallel_tool_calls: bool, tokenizer: Any) -> AsyncIterator[p.ChatCompletionChunk]:
    cid, created, reply = new_id("chatcmpl"), int(time.time()), Reply(parallel_tool_calls)

    def event(delta: p.Delta, finish: str | None = None, lp: list[TokenLogprob] | None = None,
              ) -> p.ChatCompletionChunk:
        choice = p.ChunkChoice(delta=delta, finish_reason=finish,
                               logprobs=chat_logprobs(lp, tokenizer) if logprobs and lp else None)
        return p.ChatCompletionChunk(id=cid, created=created, model=model_id, choices=[choice])

    yield event(p.Delta(role="assistant", content=""))
    async for chunk in chunks:
        call = reply.add(chunk)
        if call is not None:
            yield event(p.Delta(tool_calls=[_tool_call_delta(call)]))
        elif chunk.text and chunk.kind == "reasoning":
            yield event(p.Delta(reasoning_content=chunk.text, reasoning=chunk.text))
        elif chunk.text and chunk.kind == "answer":
            yield event(p.Delta(content=chunk.text), lp=list(chunk.logprobs))
    _check_finished(reply)
    yield event(p.Delta(), reply.finish_reason)
    if include_usage:
        yield p.ChatCompletionChunk(id=cid, created=created, model=model_id, choices=[],
                                    usage=reply.usage())


def _tool_call_delta(call: dict) -> p.ToolCallDelta:
    return p.ToolCallDelta(index=call["index"], id=call["id"], type="function" if call["id"] else None,
                           function=p.FunctionCallDelta(name=call["name"], arguments=call["arguments"] or ""))


async def _completion_events(chunks: AsyncIterator[Chunk], model_id: str, include_usage: bool, logprobs: bool,
                             tokenizer: Any) -> AsyncIterator[p.Completion]:
    cid, created, reply = new_id("cmpl"), int(time.time()), Reply()

    def event(text: str, finish: str | None = None, lp: list[TokenLogprob] | None = None,
              reasoning: str | None = None) -> p.Completion:
        choice = p.CompletionChoice(text=text, finish_reason=finish, reasoning_content=reasoning, reasoning=reasoning,
                                    logprobs=legacy_logprobs(lp, tokenizer) if logprobs and lp else None)
        return p.Completion(id=cid, created=created, model=model_id, choices=[choice])

    async for chunk in chunks:
        reply.add(chunk)
        if chunk.text and chunk.kind == "reasoning":
            yield event("", reasoning=chunk.text)
        elif chunk.text and chunk.kind == "answer":
            yield event(chunk.text, lp=list(chunk.logprobs))
    _check_finished(reply)
    yield event("", reply.finish_reason)
    if include_usage:
        yield p.Completion(id=cid, created=created, model=model_id, choices=[],
                           usage=reply.usage())


def _sse(events: AsyncIterator[Any]) -> StreamingResponse:
    """Server-sent events: `data: <json>` each, then `data: [DONE]`; a failure mid-stream is an error event."""

    async def lines() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {dump_json(event)}\n\n"
        except ApiError as e:
            yield f"data: {error_body(e.status, e.message, type=e.type, param=e.param, code=e.code)}\n\n"
        except Qwen3Error as e:
            yield f"data: {error_body(500, str(e), type='server_error')}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _json(body: p.BaseModel) -> Response:
    return Response(dump_json(body), media_type="application/json")
