"""The OpenAI-compatible server: FastAPI routes that check a request, submit it to the engine, and
format its chunks back, whole or as server-sent events.

    app = create_app(engine, model_id="Qwen3-1.7B-4bit")   # then serve it with uvicorn

The engine owns the model and batches every request (engine.py); a request whose client goes away
is cancelled at once. Reasoning goes in `reasoning_content` and `reasoning`, never in `content`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine import EngineClosed, EngineFull
from ..errors import ContextLengthError, MemoryLimitError, Qwen3Error
from ..response import Chunk, TokenLogprob
from . import protocol as p
from .replies import Reply, chat_completion, chat_logprobs, completion, dump_json, legacy_logprobs, new_id
from .params import (
    ApiError,
    validation_problem,
    Settings,
    Submission,
    chat_submission,
    check_model,
    completion_submission,
)

log = logging.getLogger("qwen3_mlx.server")

DEFAULT_MAX_BODY_BYTES = 8 << 20
RETRY_AFTER_SECONDS = 1  # the Retry-After of a 429 (the queue is full)
_ERRORS = {400: p.ErrorResponse, 401: p.ErrorResponse, 404: p.ErrorResponse, 413: p.ErrorResponse,
           429: p.ErrorResponse, 503: p.ErrorResponse}
_ERROR_DOCS = {status: {"model": model} for status, model in _ERRORS.items()}


def create_app(engine: Any, *, model_id: str, aliases: Sequence[str] = (), api_key: str | None = None,
               max_tokens_cap: int = 4096, default_thinking_budget: int | None = None,
               cors_origin: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app over a started engine.Engine (the caller starts and closes it).

    Setting `app.state.draining` (serve.py does, on a signal) answers every new request with a 503.

    Args:
        model_id: the name /v1/models lists and responses report; a request naming another model gets
            a 404.
        aliases: more names a request's `model` may give.
        api_key: when set, /v1/* needs `Authorization: Bearer <api_key>`.
        max_tokens_cap: the most tokens a request may generate (its max_tokens is lowered to it),
            and the default when it asks for no limit.
        default_thinking_budget: the thinking budget of requests that give none.
        cors_origin: the one origin browsers may call from; None: no CORS headers.
        max_body_bytes: larger request bodies get a 413.
    """
    settings = Settings(model_id, max_tokens_cap, default_thinking_budget, aliases=tuple(aliases))
    app = FastAPI(title="qwen3-mlx", summary="An OpenAI-compatible server for Qwen3 with reasoning, "
                                             "a per-request thinking budget and tool calls")
    app.state.engine, app.state.settings, app.state.created = engine, settings, int(time.time())
    app.state.draining = False
    _add_error_handlers(app)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, state=app.state)
    if cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"])
    app.include_router(_routes())
    return app


# ---------------------------------------------------------------- routes


def _routes() -> Any:
    from fastapi import APIRouter

    router = APIRouter()

    @router.post("/v1/chat/completions", response_model=p.ChatCompletion, responses=_ERROR_DOCS)
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

    @router.post("/v1/completions", response_model=p.Completion, responses=_ERROR_DOCS)
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

    @router.get("/v1/models", response_model=p.ModelList, responses=_ERROR_DOCS)
    async def models(request: Request) -> p.ModelList:
        return p.ModelList(data=[_model_card(request)])

    @router.get("/v1/models/{model:path}", response_model=p.ModelCard, responses=_ERROR_DOCS)
    async def model(model: str, request: Request) -> p.ModelCard:
        check_model(model, request.app.state.settings)
        return _model_card(request)

    @router.get("/health", response_model=p.Health)
    async def health(request: Request) -> p.Health:
        return p.Health(model=request.app.state.settings.model_id, rows=request.app.state.engine.rows)

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
            yield f"data: {_error_body(e.status, e.message, type=e.type, param=e.param, code=e.code)}\n\n"
        except Qwen3Error as e:
            yield f"data: {_error_body(500, str(e), type='server_error')}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _json(body: p.BaseModel) -> Response:
    return Response(dump_json(body), media_type="application/json")


# ---------------------------------------------------------------- errors


def _error_body(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                code: str | None = None) -> str:
    return p.ErrorResponse(error=p.ErrorDetail(message=message, type=type, param=param, code=code)).model_dump_json()


def _error(status: int, message: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Response:
    return Response(_error_body(status, message, **kwargs), status_code=status, media_type="application/json",
                    headers=headers)


def _validation_message(exc: RequestValidationError, content_type: str) -> tuple[str, str | None]:
    """The first problem, as `param: what is wrong` (params.validation_problem); a body that is not an
    object because it was not sent as JSON (curl -d sends a form's content type) is told what to send."""
    message, param = validation_problem(exc.errors())
    if message == "the body must be a JSON object" and "json" not in content_type:
        message = ("the body must be JSON, sent with Content-Type: application/json (it came as "
                   f"{content_type or 'no content type'})")
    return message, param


# The library's name for a request parameter, where it differs.
_LIBRARY_NAMES = {"json_schema": "response_format", "temp": "temperature", "max_total_tokens": "max_tokens"}
_PARAMETERS = set(p.ChatCompletionRequest.model_fields) | set(p.CompletionRequest.model_fields)


def _param_of(message: str) -> str | None:
    """The request parameter a library error is about: its messages start with the option's name
    ("logit_bias: token id 999999 is outside ...", "messages[0].content[0] is type 'image_url' ...")."""
    name = re.match(r"[a-z_]+", message)
    param = _LIBRARY_NAMES.get(name.group(), name.group()) if name else None
    return param if param in _PARAMETERS else None


def _prompt_param(request: Request) -> str:
    return "prompt" if request.url.path == "/v1/completions" else "messages"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc, request.headers.get("content-type", ""))
        return _error(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return _error(404, f"no route {request.method} {request.url.path}; see /docs", code="not_found")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(EngineFull)
    async def full(request: Request, exc: EngineFull) -> Response:
        return _error(429, str(exc), headers={"Retry-After": str(RETRY_AFTER_SECONDS)}, type="rate_limit_error",
                      code="queue_full")

    @app.exception_handler(EngineClosed)
    async def closed(request: Request, exc: EngineClosed) -> Response:
        return _error(503, str(exc), type="server_error", code="shutting_down")

    @app.exception_handler(ContextLengthError)
    async def too_long(request: Request, exc: ContextLengthError) -> Response:
        return _error(400, str(exc), param=_prompt_param(request), code="context_length_exceeded")

    @app.exception_handler(MemoryLimitError)
    async def too_large(request: Request, exc: MemoryLimitError) -> Response:
        return _error(400, f"{exc} (the KV budget is the server's --kv-memory)", param="max_tokens",
                      code="kv_memory_exceeded")

    @app.exception_handler(Qwen3Error)
    async def bad_request(request: Request, exc: Qwen3Error) -> Response:
        return _error(400, str(exc), param=_param_of(str(exc)))

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError) -> Response:
        return _error(400, "the body is nested too deeply")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal server error (logged on the server)", type="server_error")


# ---------------------------------------------------------------- the API key and the body's size


class Guard:
    """ASGI middleware: while `state.draining`, every request is a 503; a missing or wrong API key on /v1/*
    is a 401 (compared in constant time); a body over `max_body_bytes` is a 413, checked before the app
    reads it."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, state: Any) -> None:
        self.app, self.max_body_bytes, self.state = app, max_body_bytes, state
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.state.draining:
            return await self._refuse(send, 503, "the server is shutting down and takes no new requests; send the "
                                                 "request again once it is back", type="server_error",
                                      code="shutting_down")
        guarded = self.key is not None and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS"
        if guarded and not self._authorized(scope):
            return await self._refuse(send, 401, "invalid or missing API key: send Authorization: Bearer <key>",
                                      code="invalid_api_key")
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await self._refuse(send, 413, self._too_large())
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            body.append(message)
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return await self._refuse(send, 413, self._too_large())
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, scope: dict) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    def _too_large(self) -> str:
        return f"the request body is over {self.max_body_bytes} bytes"

    @staticmethod
    async def _refuse(send: Any, status: int, message: str, code: str | None = None,
                      type: str = "invalid_request_error") -> None:
        body = _error_body(status, message, type=type, code=code).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[dict], receive: Any) -> Any:
    """A receive() that gives `messages` first, then the client's (its disconnect)."""
    pending = list(messages)

    async def replay() -> dict:
        return pending.pop(0) if pending else await receive()

    return replay

