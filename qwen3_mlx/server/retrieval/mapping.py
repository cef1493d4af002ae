"""Retrieval bodies to the embedding sub-package's rows and back: the inputs checked and refused as 400s
naming the item, the vectors as floats or base64, the scores sorted."""

from __future__ import annotations

import base64
import time
import uuid

import numpy as np

from ...embedding.embed import check_dimensions, check_embedding_model, prepare, vectors
from ...embedding.rerank import check_reranker
from ...embedding.rerank import prepare as prepare_pairs
from ...embedding.rerank import scores
from ...errors import OptionError
from ...model.model import Model
from ...text.tokenizer import Tokenizer
from . import protocol as p

MAX_INPUTS = 2048  # OpenAI's limit on one embeddings request's list
MAX_DOCUMENTS = 1000  # Cohere's limit on one rerank request's documents


def embedding_inputs(body: p.EmbeddingRequest) -> list[str] | list[list[int]]:
    """The request's input as a list of texts or of token-id lists, checked.

    Raises:
        OptionError: an empty list, an empty text or token list, more than MAX_INPUTS items.
    """
    items = body.input
    if isinstance(items, str):
        items = [items]
    elif items and all(isinstance(t, int) for t in items):
        items = [items]
    if not items:
        raise OptionError("input must not be empty: give a string, a list of strings or of token ids")
    if len(items) > MAX_INPUTS:
        raise OptionError(f"input has {len(items)} items; at most {MAX_INPUTS} in one request")
    for i, item in enumerate(items):
        if len(item) == 0:
            raise OptionError(f"input[{i}] is empty; every text or token list needs at least one token")
    return items


def embed_body(model: Model, tokenizer: Tokenizer, body: p.EmbeddingRequest, name: str) -> p.EmbeddingList:
    """The vectors of an embeddings request (the caller holds the model)."""
    check_embedding_model(model)
    size = check_dimensions(model, body.dimensions)
    fitted = prepare(model, tokenizer, embedding_inputs(body))
    out = np.array(vectors(model, fitted.rows, size))
    data = [p.Embedding(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode()
                        if body.encoding_format == "base64" else v.tolist()) for i, v in enumerate(out)]
    return p.EmbeddingList(data=data, model=name, usage=p.EmbeddingUsage(prompt_tokens=fitted.tokens,
                                                                         total_tokens=fitted.tokens))


def documents(body: p.RerankRequest) -> list[str]:
    if not body.documents:
        raise OptionError("documents must not be empty")
    if len(body.documents) > MAX_DOCUMENTS:
        raise OptionError(f"documents has {len(body.documents)} items; at most {MAX_DOCUMENTS} in one request")
    if body.top_n is not None and body.top_n < 1:
        raise OptionError(f"top_n={body.top_n} must be at least 1")
    return [d if isinstance(d, str) else d.text for d in body.documents]


def rerank_body(model: Model, tokenizer: Tokenizer, body: p.RerankRequest, name: str) -> p.RerankResponse:
    """The documents' relevance, best first (the caller holds the model)."""
    check_reranker(model)
    texts = documents(body)
    fitted = prepare_pairs(model, tokenizer, body.query, texts, body.instruction)
    got = scores(model, tokenizer, fitted.rows)
    ranked = sorted(range(len(got)), key=lambda i: -got[i])[: body.top_n]
    results = [p.RerankResult(index=i, relevance_score=got[i],
                              document=p.DocumentText(text=texts[i]) if body.return_documents else None)
               for i in ranked]
    return p.RerankResponse(id=f"rerank-{uuid.uuid4().hex}", model=name, results=results,
                            usage=p.RerankUsage(total_tokens=fitted.tokens))


def score_body(model: Model, tokenizer: Tokenizer, body: p.ScoreRequest, name: str) -> p.ScoreResponse:
    """vLLM's /score: text_1 against every text_2, or pair by pair when both are lists of one length."""
    check_reranker(model)
    first = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    second = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    if not first or not second:
        raise OptionError("text_1 and text_2 must not be empty")
    if len(first) != 1 and len(first) != len(second):
        raise OptionError(f"text_1 has {len(first)} items and text_2 {len(second)}: give one text_1, or as "
                          f"many as text_2")
    if len(second) > MAX_DOCUMENTS:
        raise OptionError(f"text_2 has {len(second)} items; at most {MAX_DOCUMENTS} in one request")
    queries = first * len(second) if len(first) == 1 else first
    rows = [prepare_pairs(model, tokenizer, q, [d]).rows[0] for q, d in zip(queries, second)]
    got = scores(model, tokenizer, rows)
    tokens = sum(len(r) for r in rows)
    return p.ScoreResponse(id=f"score-{uuid.uuid4().hex}", created=int(time.time()), model=name,
                           data=[p.Score(index=i, score=s) for i, s in enumerate(got)],
                           usage=p.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
