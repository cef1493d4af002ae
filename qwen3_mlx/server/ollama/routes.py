"""Ollama's routes that need no engine stream: the version, the model's listings (/api/tags, /api/ps,
/api/show), embeddings (/api/embed, and /api/embeddings before it) through the retrieval path, and
the routes a served checkpoint cannot honour (pulling, pushing, creating, copying, deleting models),
refused saying what to do instead. /api/chat and /api/generate stream, so they are app.py's."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from fastapi import APIRouter, Request

from ..retrieval import protocol as rp
from ..retrieval.mapping import embed_body
from ..submission.refusal import ApiError
from . import catalog
from . import protocol as p
from .mapping import check_name, nanoseconds

ERROR_DOCS = {status: {"model": p.Error} for status in (400, 401, 404, 413, 429, 503)}

# What a server over checkpoint folders cannot do, and what to do instead.
_REFUSED = {
    ("POST", "/api/pull"): "this server pulls nothing from Ollama's registry; download a Qwen3 checkpoint (qwen3-mlx "
                           "reads Hub ids and folders) and serve it: qwen3-mlx serve --model PATH",
    ("POST", "/api/push"): "this server pushes nothing; share the checkpoint folder itself",
    ("POST", "/api/create"): "this server makes no models; convert one with qwen3-mlx convert and serve it",
    ("POST", "/api/copy"): "a served model's names are serve's --served-model-name; restart with the name you want",
    ("DELETE", "/api/delete"): "the served model goes when the server stops; delete its folder yourself",
    ("POST", "/api/blobs/{digest}"): "this server takes no blobs; serve a checkpoint folder with qwen3-mlx serve",
}


def ollama_routes(lock: threading.Lock) -> APIRouter:
    """`lock`: held by every pass of the model outside the engine (the retrieval routes hold it too)."""
    router = APIRouter(responses=ERROR_DOCS)

    @router.get("/api/version", response_model=p.Version)
    async def version() -> p.Version:
        return p.Version(version=catalog.OLLAMA_VERSION)

    @router.get("/api/tags", response_model=p.TagList)
    async def tags(request: Request) -> p.TagList:
        return p.TagList(models=[catalog.entry(request.app.state.engine.model, *_served(request))])

    @router.get("/api/ps", response_model=p.RunningList)
    async def ps(request: Request) -> p.RunningList:
        return p.RunningList(models=[catalog.running(request.app.state.engine.model, *_served(request))])

    @router.post("/api/show", response_model=p.ShowResponse)
    async def show(body: p.ShowRequest, request: Request) -> p.ShowResponse:
        check_name(body.model or body.name, request.app.state.settings)
        engine = request.app.state.engine
        return catalog.show(engine.model, engine.tokenizer, *_served(request))

    async def vectors(request: Request, name: str | None, texts: Any, dimensions: int | None) -> Any:
        settings, engine = request.app.state.settings, request.app.state.engine
        check_name(name, settings)
        if texts in (None, "", []):
            raise ApiError(400, "input: give a text or a list of texts to embed", param="input")
        asked = rp.EmbeddingRequest(input=texts, dimensions=dimensions)

        def locked() -> Any:
            with lock:
                return embed_body(engine.model, engine.tokenizer, asked, settings.model_id)

        return await asyncio.to_thread(locked)

    @router.post("/api/embed", response_model=p.EmbedResponse)
    async def embed(body: p.EmbedRequest, request: Request) -> p.EmbedResponse:
        started = time.perf_counter()
        got = await vectors(request, body.model, body.input, body.dimensions)
        return p.EmbedResponse(model=body.model, embeddings=[d.embedding for d in got.data],
                               total_duration=nanoseconds(time.perf_counter() - started), load_duration=0,
                               prompt_eval_count=got.usage.prompt_tokens)

    @router.post("/api/embeddings", response_model=p.EmbeddingsResponse)
    async def embeddings(body: p.EmbeddingsRequest, request: Request) -> p.EmbeddingsResponse:
        got = await vectors(request, body.model, body.prompt, None)
        return p.EmbeddingsResponse(embedding=got.data[0].embedding)

    for (method, path), instead in _REFUSED.items():
        router.add_api_route(path, _refusal(instead), methods=[method], include_in_schema=False)
    return router


def _served(request: Request) -> tuple[str, int]:
    return request.app.state.settings.model_id, request.app.state.created


def _refusal(instead: str) -> Any:
    async def refuse() -> None:
        raise ApiError(400, instead)

    return refuse
