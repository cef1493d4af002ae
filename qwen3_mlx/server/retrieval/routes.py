"""The retrieval routes. A pass runs in a worker thread under one lock, a whole request at a time (the
engine's generation batches do not take these rows yet), the model read from the engine."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable

from fastapi import APIRouter, Request

from ..submission.reading import check_model
from . import mapping as m
from . import protocol as p


def retrieval_routes(lock: threading.Lock) -> APIRouter:
    """`lock`: held by every pass of the model outside the engine (Ollama's embeddings hold it too)."""
    router = APIRouter()

    async def run(request: Request, body: Any, answer: Callable[..., Any]) -> Any:
        settings, engine = request.app.state.settings, request.app.state.engine
        check_model(body.model, settings)

        def locked() -> Any:
            with lock:
                return answer(engine.model, engine.tokenizer, body, settings.model_id)

        return await asyncio.to_thread(locked)

    @router.post("/v1/embeddings", response_model=p.EmbeddingList)
    async def embeddings(body: p.EmbeddingRequest, request: Request) -> p.EmbeddingList:
        return await run(request, body, m.embed_body)

    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        @router.post(path, response_model=p.RerankResponse)
        async def rerank(body: p.RerankRequest, request: Request) -> p.RerankResponse:
            return await run(request, body, m.rerank_body)

    @router.post("/score", response_model=p.ScoreResponse)
    async def score(body: p.ScoreRequest, request: Request) -> p.ScoreResponse:
        return await run(request, body, m.score_body)

    return router
