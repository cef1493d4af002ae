"""The server's routes: each checks a request, submits it to the engine (relay.py) and answers with its
API's body, whole or as its event stream: OpenAI's chat and text completions (openai/), Anthropic's
Messages (anthropic/) and OpenAI's Responses (responses/); the chat page (web/) at /.

    app = create_app(engine, ServerSettings(("Qwen3-1.7B-4bit",)))   # then serve it with uvicorn

The engine owns the model and batches every request (generation/engine.py); a request whose client
goes away is cancelled at once. Reasoning goes in `reasoning_content` and `reasoning`, never in
`content`. The API key, the body's size and every error's body, in the shape of its route's API, are
guard.py's.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from .anthropic import mapping as am
from .anthropic import protocol as ap
from .anthropic.events import message_events, whole_message
from .guard import ERROR_DOCS, Guard, add_error_handlers
from .metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from .ollama import mapping as olm
from .ollama import protocol as olp
from .ollama.events import ndjson
from .ollama.routes import ERROR_DOCS as OLLAMA_ERROR_DOCS
from .ollama.routes import ollama_routes
from .openai import mapping as om
from .openai import protocol as op
from .openai.events import chat_events, completion_events, sse_lines
from .relay import chunks, json_response, named_sse, sse, submit
from .responses import mapping as rm
from .responses import protocol as rp
from .responses.events import response_events, whole_output
from .responses.store import ResponseStore
from .retrieval.routes import retrieval_routes
from .settings import ServerSettings
from .submission.outcome import gather, gather_chunks, streamed_calls
from .submission.reading import check_model, prompt_tokens

WEB = Path(__file__).parent / "web"  # the chat page
_ANTHROPIC_DOCS = {status: {"model": ap.ErrorResponse} for status in ERROR_DOCS}


def create_app(engine: Any, settings: ServerSettings, *, response_store: ResponseStore | None = None) -> FastAPI:
    """The FastAPI app over a started generation.Engine (the caller starts and closes it), as `serve` builds it.

    Setting `app.state.draining` (serve.py does, on a signal) answers every new request with a 503.

    Args:
        settings: serve's options that shape the app (names, key, caps, the page).
        response_store: where /v1/responses keeps stored responses (default: 256 of them, 64 MiB).
    """
    app = FastAPI(title="qwen3-mlx", summary="An OpenAI- and Anthropic-compatible server for Qwen3 with "
                                             "reasoning, a per-request thinking budget and tool calls")
    app.state.engine, app.state.settings, app.state.created = engine, settings.requests, int(time.time())
    app.state.draining = False
    app.state.responses = response_store or ResponseStore()
    add_error_handlers(app)
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes, state=app.state)
    if settings.cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=[settings.cors_origin],
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])
    app.include_router(_openai_routes())
    app.include_router(_anthropic_routes())
    app.include_router(_responses_routes())
    if settings.metrics:  # outside the Guard, so that its refusals are counted too
        app.state.metrics = Metrics(engine, settings.model_names[0])
        app.add_middleware(MetricsMiddleware, metrics=app.state.metrics,
                           paths=lambda: [*app.openapi()["paths"], "/metrics"])
        app.add_api_route("/metrics", lambda: Response(app.state.metrics.exposition(), media_type=CONTENT_TYPE),
                          include_in_schema=False)
    lock = threading.Lock()  # held by every pass of the model outside the engine
    app.include_router(retrieval_routes(lock), responses=ERROR_DOCS)
    app.include_router(ollama_routes(lock))
    app.include_router(_ollama_routes())
    if settings.ui:
        app.mount("/ui", StaticFiles(directory=WEB), name="ui")
    app.add_api_route("/", _root(settings.ui), methods=["GET", "HEAD"], include_in_schema=False)
    return app


def _root(ui: bool) -> Any:
    """GET /: the chat page to a browser; to Ollama's clients, which probe it, "Ollama is running"."""

    async def root(request: Request) -> Response:
        if ui and "text/html" in request.headers.get("accept", ""):
            return FileResponse(WEB / "index.html")
        return PlainTextResponse("Ollama is running")

    return root


def _openai_routes() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions", response_model=op.ChatCompletion, responses=ERROR_DOCS)
    async def chat_completions(body: op.ChatCompletionRequest, request: Request) -> Response:
        settings, engine = request.app.state.settings, request.app.state.engine
        handle = await submit(engine, om.chat_submission, body, settings)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = chat_events(chunks(handle, request), settings.model_id, include_usage=include_usage,
                                    logprobs=body.logprobs, parallel=body.parallel_tool_calls,
                                    tokenizer=engine.tokenizer)
            return sse(sse_lines(events))
        result, seen = await gather_chunks(chunks(handle, request))
        return json_response(om.dump_json(om.chat_completion(
            result, settings.model_id, logprobs=body.logprobs, parallel=body.parallel_tool_calls,
            tokenizer=engine.tokenizer, streamed=streamed_calls(seen, body.parallel_tool_calls))))

    @router.post("/v1/completions", response_model=op.Completion, responses=ERROR_DOCS)
    async def completions(body: op.CompletionRequest, request: Request) -> Response:
        settings, engine = request.app.state.settings, request.app.state.engine
        handle = await submit(engine, om.completion_submission, body, settings)
        logprobs = body.logprobs is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse(sse_lines(completion_events(chunks(handle, request), settings.model_id,
                                                         include_usage=include_usage, logprobs=logprobs,
                                                         tokenizer=engine.tokenizer)))
        result = await gather(chunks(handle, request))
        return json_response(om.dump_json(om.completion(result, settings.model_id, logprobs=logprobs,
                                                        tokenizer=engine.tokenizer)))

    @router.get("/v1/models", response_model=op.ModelList, responses=ERROR_DOCS)
    async def models(request: Request) -> op.ModelList:
        return op.ModelList(data=[_model_card(request)])

    @router.get("/v1/models/{model:path}", response_model=op.ModelCard, responses=ERROR_DOCS)
    async def model(model: str, request: Request) -> op.ModelCard:
        check_model(model, request.app.state.settings)
        return _model_card(request)

    @router.get("/health", response_model=op.Health)
    async def health(request: Request) -> op.Health:
        engine = request.app.state.engine
        figures = engine.memory() if hasattr(engine, "memory") else None  # test stubs may have none
        return op.Health(model=request.app.state.settings.model_id, rows=engine.rows,
                         memory=op.MemoryFigures(**figures) if figures else None)

    return router


def _model_card(request: Request) -> op.ModelCard:
    return op.ModelCard(id=request.app.state.settings.model_id, created=request.app.state.created)


def _ollama_routes() -> APIRouter:
    """Ollama's /api/chat and /api/generate (its other routes are ollama/routes.py's): NDJSON streams, or
    one object with "stream": false; no messages or prompt loads the model (it is loaded)."""
    router = APIRouter(responses=OLLAMA_ERROR_DOCS)

    @router.post("/api/chat", response_model=olp.ChatResponse)
    async def chat(body: olp.ChatRequest, request: Request) -> Response:
        if not body.messages:
            olm.check_name(body.model, request.app.state.settings)
            return json_response(json.dumps(olm.loaded_body(body.model, chat=True)))
        return await _ollama_reply(body, request, olm.chat_submission, chat=True)

    @router.post("/api/generate", response_model=olp.GenerateResponse)
    async def generate(body: olp.GenerateRequest, request: Request) -> Response:
        if not body.prompt:
            olm.check_name(body.model, request.app.state.settings)
            return json_response(json.dumps(olm.loaded_body(body.model, chat=False)))
        return await _ollama_reply(body, request, olm.generate_submission, chat=False)

    return router


async def _ollama_reply(body: Any, request: Request, submission: Any, *, chat: bool) -> Response:
    settings, engine, started = request.app.state.settings, request.app.state.engine, time.perf_counter()
    handle = await submit(engine, submission, body, settings)
    logprobs, name = bool(body.logprobs), body.model
    if body.stream:
        lines = ndjson(chunks(handle, request), name, started, chat=chat, logprobs=logprobs, tokenizer=engine.tokenizer)
        return StreamingResponse(lines, media_type="application/x-ndjson")
    result = await gather(chunks(handle, request))
    write = olm.chat_body if chat else olm.generate_body
    seconds = time.perf_counter() - started
    return json_response(json.dumps(write(result, name, seconds, logprobs=logprobs, tokenizer=engine.tokenizer)))


def _anthropic_routes() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/messages", response_model=ap.Message, responses=_ANTHROPIC_DOCS)
    async def messages(body: ap.MessagesRequest, request: Request) -> Response:
        settings, engine = request.app.state.settings, request.app.state.engine
        handle = await submit(engine, am.messages_submission, body, settings)
        parallel, show = am.parallel_calls(body), am.show_thinking(body)
        if body.stream:
            return named_sse(message_events(chunks(handle, request), settings.model_id,
                                            prompt_tokens=handle.prompt_tokens, show_thinking=show, parallel=parallel,
                                            secret_key=settings.secret_key))
        result, seen = await gather_chunks(chunks(handle, request))
        message = whole_message(seen, result.stats, settings.model_id, show_thinking=show, parallel=parallel,
                                secret_key=settings.secret_key)
        return json_response(message.model_dump_json())

    @router.post("/v1/messages/count_tokens", response_model=ap.TokenCount, responses=_ANTHROPIC_DOCS)
    async def count_tokens(body: ap.CountTokensRequest, request: Request) -> ap.TokenCount:
        settings, tokenizer = request.app.state.settings, request.app.state.engine.tokenizer

        def count() -> int:
            return prompt_tokens(tokenizer, am.messages_submission(body, settings))

        return ap.TokenCount(input_tokens=await asyncio.to_thread(count))

    return router


def _responses_routes() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/responses", response_model=rp.ResponseObject, responses=ERROR_DOCS)
    async def responses(body: rp.ResponsesRequest, request: Request) -> Response:
        settings, engine, store = request.app.state.settings, request.app.state.engine, request.app.state.responses
        turn = rm.turn(body, store, settings.secret_key)
        handle = await submit(engine, rm.responses_submission, turn, settings)
        if body.stream:
            return named_sse(response_events(turn, chunks(handle, request), settings.model_id, store))
        result, seen = await gather_chunks(chunks(handle, request))
        output = whole_output(turn, seen)
        return json_response(json.dumps(rm.finish(turn, settings.model_id, result.stats, output, store)))

    @router.get("/v1/responses/{response_id}", response_model=rp.ResponseObject, responses=ERROR_DOCS)
    async def stored(response_id: str, request: Request) -> Response:
        body = request.app.state.responses.get(response_id, param="response_id")[1]
        return json_response(json.dumps(body))

    return router
