"""Perplexity over sliding windows: each window scores only the tokens it is the first to reach, so
every token but a text's first is scored exactly once, with up to `context` tokens before it.

The windows of a text of n ids, stride S, context C: window k scores the targets kS+1 .. (k+1)S (those
that exist and are scored), reading the C ids before its last target (fewer at the start). With S = C
the windows lie side by side; a smaller S gives each new token at least C - S + 1 tokens before it, at
C/S times the work. The result is exp of the plain mean over scored tokens (transformers' guide averages
its windows' means, which weights tokens slightly differently when S < C). Texts are scored apart: no
window reaches across two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import mlx.core as mx

from ..errors import OptionError, Qwen3Error
from ..model.model import LanguageModel
from ..text.tokenizer import Tokenizer
from .documents import Document, Text, make_document

Progress = Callable[[int, int], None]  # (windows done, windows in all)


@dataclass(frozen=True)
class Perplexity:
    """A perplexity and what it is made of.

    perplexity: exp(nll).
    nll: the mean negative log-likelihood of the scored tokens, in nats.
    tokens: how many tokens were scored.
    """

    perplexity: float
    nll: float
    tokens: int


@dataclass(frozen=True)
class Window:
    """ids[start:stop] read by the model; position j predicts ids[start + j + 1], counted when counts[j]."""

    inputs: list[int]
    targets: list[int]
    counts: list[bool]


def perplexity(model: LanguageModel, tokenizer: Tokenizer, texts: Sequence[Text], *, context: int = 2048,
               stride: int | None = None, batch_size: int = 1, progress: Progress | None = None) -> Perplexity:
    """The perplexity of `model` on `texts`.

    Args:
        texts: raw texts, each scored whole; conversations (lists of chat messages), of which only
            the assistant turns are scored, as the chat template writes them; or token ids, scored whole.
        context: the most tokens a window reads; each token is scored with up to `context` before it.
        stride: how far a window moves, 1..context (default: context, windows side by side).
        batch_size: windows computed together (padded on the right, which the causal mask hides).
        progress: called with (windows done, windows in all) after each batch.

    Returns:
        Perplexity: exp of the mean negative log-likelihood over every scored token.

    Raises:
        OptionError: a bound is out of range, or a token id is outside the model's vocabulary.
        Qwen3Error: there is nothing to score (every text shorter than two tokens).
    """
    stride = context if stride is None else stride
    if context < 1 or batch_size < 1 or not 1 <= stride <= context:
        raise OptionError(f"context={context}, stride={stride}, batch_size={batch_size}: context and batch_size "
                          "must be >= 1 and stride between 1 and context")
    documents = [make_document(tokenizer, text) for text in texts]
    for document in documents:
        check_ids(document.ids, model.args.vocab_size)
    total, tokens = total_nll(model, documents, context, stride, batch_size, progress)
    if tokens == 0:
        raise Qwen3Error("nothing to score: every text is shorter than two tokens (or its assistant turns empty)")
    return Perplexity(math.exp(total / tokens), total / tokens, tokens)


def total_nll(model: LanguageModel, documents: Sequence[Document], context: int, stride: int, batch_size: int,
              progress: Progress | None = None) -> tuple[float, int]:
    """(the summed negative log-likelihood, the tokens scored) of the documents' windows."""
    windows = [w for document in documents for w in slide(document, context, stride)]
    total, tokens = 0.0, 0
    for done in range(0, len(windows), batch_size):
        batch = windows[done:done + batch_size]
        total += batch_nll(model, batch)
        tokens += sum(sum(w.counts) for w in batch)
        if progress is not None:
            progress(min(done + batch_size, len(windows)), len(windows))
    return total, tokens


def slide(document: Document, context: int, stride: int) -> Iterator[Window]:
    """The windows over one document that score at least one token."""
    ids, scored = document.ids, document.scored
    for first in range(1, len(ids), stride):  # the window's first new target
        last = min(first + stride - 1, len(ids) - 1)
        start = max(0, last - context)
        counts = [scored[t] and t >= first for t in range(start + 1, last + 1)]
        if any(counts):
            yield Window(ids[start:last], ids[start + 1:last + 1], counts)


def batch_nll(model: LanguageModel, windows: Sequence[Window]) -> float:
    """The summed negative log-likelihood of the windows' counted targets."""
    width = max(len(w.inputs) for w in windows)
    pad = [width - len(w.inputs) for w in windows]
    inputs = mx.array([w.inputs + [0] * p for w, p in zip(windows, pad)])  # (B, L)
    targets = mx.array([w.targets + [0] * p for w, p in zip(windows, pad)])  # (B, L)
    counts = mx.array([w.counts + [False] * p for w, p in zip(windows, pad)])  # (B, L)
    logits = model(inputs).astype(mx.float32)  # (B, L, vocab)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = mx.where(counts, mx.logsumexp(logits, axis=-1) - picked, 0.0)
    return float(nll.sum().item())


def check_ids(ids: Sequence[int], vocab_size: int) -> None:
    outside = [t for t in ids if not 0 <= t < vocab_size]
    if outside:
        raise OptionError(f"token id {outside[0]} is outside the model's vocabulary [0, {vocab_size}); give ids (and a "
                          "tokenizer) that belong to this model")
