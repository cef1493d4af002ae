"""The retrieval endpoints' pydantic models: OpenAI's embeddings, the shared rerank shape, vLLM's score."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class EmbeddingRequest(BaseModel):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: the float32 bytes, little-endian


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class DocumentText(BaseModel):
    text: str


class RerankRequest(BaseModel):
    query: str
    documents: list[str | DocumentText]
    model: str | None = None
    top_n: int | None = None
    return_documents: bool = False
    instruction: str | None = None  # Qwen3-Reranker's task; the card's web-search one by default


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: DocumentText | None = None


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage


class ScoreRequest(BaseModel):
    text_1: str | list[str]
    text_2: str | list[str]
    model: str | None = None


class Score(BaseModel):
    object: Literal["score"] = "score"
    index: int
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[Score]
    usage: EmbeddingUsage
