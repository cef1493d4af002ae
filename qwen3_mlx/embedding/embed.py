"""Qwen3-Embedding's vectors: the last token's hidden state of a text closed by <|endoftext|>, cut to the
asked Matryoshka size, then L2-normalized (the model card's and sentence-transformers' recipe)."""

from __future__ import annotations

import warnings
from typing import Sequence

import mlx.core as mx

from ..errors import OptionError
from ..model.model import Model
from ..text.tokenizer import Tokenizer
from .padded import Fitted, fit, last_hidden, plan

END = "<|endoftext|>"  # Qwen3-Embedding's tokenizer closes every text with it (its post-processor)
MIN_DIMENSIONS = 32  # the model card's smallest Matryoshka size


def query(instruction: str, text: str) -> str:
    """A query as Qwen3-Embedding was trained to read it (no space after "Query:")."""
    return f"Instruct: {instruction}\nQuery:{text}"


def check_embedding_model(model: Model) -> None:
    if getattr(model, "pooling", None) is None:
        raise OptionError("this model is a causal (chat or reranker) model: embeddings need an embedding "
                          "checkpoint (Qwen3-Embedding's layout, with modules.json and last-token pooling)")


def check_dimensions(model: Model, dimensions: int | None) -> int:
    """The vector's size: the hidden size, or a Matryoshka cut of it."""
    hidden = model.args.hidden_size
    if dimensions is None:
        return hidden
    if isinstance(dimensions, bool) or not isinstance(dimensions, int):
        raise OptionError(f"dimensions={dimensions!r} must be an integer")
    if not min(MIN_DIMENSIONS, hidden) <= dimensions <= hidden:
        raise OptionError(f"dimensions={dimensions} must be from {min(MIN_DIMENSIONS, hidden)} to the model's "
                          f"hidden size {hidden}")
    return dimensions


def token_rows(tokenizer: Tokenizer, inputs: Sequence[str] | Sequence[Sequence[int]], vocab_size: int,
               instruction: str | None = None) -> list[list[int]]:
    """Each input's ids without the closing <|endoftext|>: a text encoded (behind the instruction), or a
    list of token ids as given.

    Raises:
        OptionError: an input neither a string nor a list of token ids in the vocabulary.
    """
    end = tokenizer.token_to_id(END)
    rows = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            rows.append(tokenizer.encode(query(instruction, item) if instruction is not None else item))
            continue
        if not isinstance(item, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in item):
            raise OptionError(f"input[{i}] must be a string or a list of token ids from 0 to {vocab_size - 1}")
        row = list(item)
        rows.append(row[:-1] if row and row[-1] == end else row)
    return rows


def prepare(model: Model, tokenizer: Tokenizer, inputs: Sequence[str] | Sequence[Sequence[int]],
            instruction: str | None = None, truncate: bool = False) -> Fitted:
    """The rows one pass embeds: each input's ids closed by <|endoftext|>, within the model's context."""
    rows = token_rows(tokenizer, inputs, model.args.vocab_size, instruction)
    return fit(rows, model.args.max_position_embeddings, truncate, "input",
               keep_end=[tokenizer.token_to_id(END)])


def vectors(model: Model, rows: Sequence[Sequence[int]], dimensions: int, normalize: bool = True,
            batch_size: int = 32) -> mx.array:
    """(N, dimensions) float32, in the rows' order, the rows batched by length."""
    out: list[mx.array | None] = [None] * len(rows)
    for batch in plan([len(r) for r in rows], batch_size):
        pooled = last_hidden(model, [rows[i] for i in batch]).astype(mx.float32)[:, :dimensions]
        if normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        mx.eval(pooled)
        for j, i in enumerate(batch):
            out[i] = pooled[j]
    return mx.stack(out) if out else mx.zeros((0, dimensions), mx.float32)


def embed(model: Model, tokenizer: Tokenizer, texts: Sequence[str] | Sequence[Sequence[int]], *,
          instruction: str | None = None, dimensions: int | None = None, normalize: bool = True,
          batch_size: int = 32, truncate: bool = False) -> mx.array:
    """Embed texts with a Qwen3-Embedding model, as its model card and sentence-transformers do.

    Args:
        model: an embedding model, as `load` returns for Qwen3-Embedding's layout.
        tokenizer: its tokenizer.
        texts: strings, each closed by <|endoftext|>; or lists of token ids, used as given and closed by
            <|endoftext|> unless they end with it.
        instruction: a query's task ("Given a web search query, retrieve relevant passages that answer
            the query"): the texts become "Instruct: {instruction}\\nQuery:{text}". Documents take none.
        dimensions: a Matryoshka size from 32 to the hidden size: the vector is cut, then normalized.
        normalize: L2-normalize the vectors (cosine similarity is then a dot product).
        batch_size: rows per pass; the rows are sorted by length so a pass pads little.
        truncate: cut a text over the model's context (a warning says how many were cut).

    Returns:
        (len(texts), dimensions) float32 vectors, in the texts' order.

    Raises:
        OptionError: not an embedding model; dimensions or batch_size out of range; an input of the
            wrong type; a text over the context (naming its index) unless truncate.
    """
    check_embedding_model(model)
    size = check_dimensions(model, dimensions)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OptionError(f"batch_size={batch_size!r} must be a positive integer")
    fitted = prepare(model, tokenizer, texts, instruction, truncate)
    if fitted.cut:
        warnings.warn(f"{fitted.cut} of {len(fitted.rows)} texts were cut to the model's context of "
                      f"{model.args.max_position_embeddings} tokens", stacklevel=2)
    return vectors(model, fitted.rows, size, normalize, batch_size)
