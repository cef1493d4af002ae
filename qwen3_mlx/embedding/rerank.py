"""Qwen3-Reranker's relevance: the chance of "yes" against "no" at the last position of the model card's
prompt (its transformers recipe: system text, <Instruct>/<Query>/<Document> lines, an empty think block)."""

from __future__ import annotations

import warnings
from typing import Sequence

import mlx.core as mx

from ..errors import OptionError
from ..model.model import Model
from ..text.tokenizer import Tokenizer
from .padded import Fitted, fit, last_hidden, plan

SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
          'Note that the answer can only be "yes" or "no".')
PREFIX = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def pair(instruction: str, query: str, document: str) -> str:
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def check_reranker(model: Model) -> None:
    if getattr(model, "pooling", None) is not None:
        raise OptionError("this model is an embedding model: reranking needs a causal checkpoint such as "
                          "Qwen3-Reranker (its yes/no head)")


def prepare(model: Model, tokenizer: Tokenizer, query: str, documents: Sequence[str],
            instruction: str | None = None, truncate: bool = False) -> Fitted:
    """One row per document: the prefix, the pair and the suffix, each encoded apart as the card does;
    a pair over the context cut at its end (the card's right truncation) or refused.

    Raises:
        OptionError: the query or a document not a string; a pair over the context unless truncate.
    """
    if not isinstance(query, str):
        raise OptionError(f"query must be a string, not {type(query).__name__}")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise OptionError(f"documents[{i}] must be a string, not {type(doc).__name__}")
    task = DEFAULT_INSTRUCTION if instruction is None else instruction
    rows = [tokenizer.encode(pair(task, query, doc)) for doc in documents]
    return fit(rows, model.args.max_position_embeddings, truncate, "documents",
               keep_end=tokenizer.encode(SUFFIX), keep_start=tokenizer.encode(PREFIX))


def scores(model: Model, tokenizer: Tokenizer, rows: Sequence[Sequence[int]], batch_size: int = 32) -> list[float]:
    """softmax([no, yes])[yes] at each row's last position, in the rows' order."""
    yes, no = tokenizer.token_to_id("yes"), tokenizer.token_to_id("no")
    head = model.model.embed_tokens.as_linear if model.args.tie_word_embeddings else model.lm_head
    out = [0.0] * len(rows)
    for batch in plan([len(r) for r in rows], batch_size):
        logits = head(last_hidden(model, [rows[i] for i in batch])).astype(mx.float32)  # (B, vocab)
        p = mx.sigmoid(logits[:, yes] - logits[:, no])  # the two-way softmax's "yes"
        for i, s in zip(batch, p.tolist()):
            out[i] = s
    return out


def rerank(model: Model, tokenizer: Tokenizer, query: str, documents: Sequence[str], *,
           instruction: str | None = None, batch_size: int = 32, truncate: bool = False) -> list[float]:
    """Score documents against a query with a Qwen3-Reranker model, as its model card does.

    Args:
        model: a causal model (Qwen3-Reranker), as `load` returns it.
        tokenizer: its tokenizer.
        query: the query.
        documents: the texts to score.
        instruction: the task (default: the card's web-search instruction).
        batch_size: rows per pass, sorted by length.
        truncate: cut a pair over the model's context at its end (a warning says how many were cut).

    Returns:
        One relevance score in [0, 1] per document, in the documents' order.

    Raises:
        OptionError: an embedding model; a bad batch_size; a query or document not a string; a pair over
            the context (naming the document's index) unless truncate.
    """
    check_reranker(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OptionError(f"batch_size={batch_size!r} must be a positive integer")
    fitted = prepare(model, tokenizer, query, documents, instruction, truncate)
    if fitted.cut:
        warnings.warn(f"{fitted.cut} of {len(fitted.rows)} documents were cut to the model's context of "
                      f"{model.args.max_position_embeddings} tokens", stacklevel=2)
    return scores(model, tokenizer, fitted.rows, batch_size)
