"""Rows of token ids of different lengths through the model in one pass: left padding, each row's own
positions, a mask that hides the padding; the rows planned into batches by length under a token budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

from ..errors import OptionError
from ..model.model import Model

# Padded tokens one pass may hold (rows x longest row): attention's scores grow with its square per row,
# so a pass of long rows holds few of them.
TOKEN_BUDGET = 8192


class Padding:
    """A one-pass stand-in for a layer's cache (model.cache's protocol): positions start at 0 at each
    row's first real token, and the mask hides the padding on the left."""

    def __init__(self, pads: Sequence[int], width: int) -> None:
        self.pads = mx.array(pads, mx.int32)
        self.width = width

    @property
    def offset(self) -> mx.array:
        return -self.pads  # (B,): a row's first real token sits at position 0, as when it runs alone

    def make_mask(self, n: int) -> mx.array:
        """(B, 1, n, n): causal over real tokens; a padding query sees itself only, so no row of the
        softmax is empty (an empty one is NaN, and 0 * NaN would reach the real rows)."""
        cols, rows = mx.arange(n), mx.arange(n)[:, None]
        real = cols >= self.pads[:, None, None, None]
        return ((cols <= rows) & real) | (cols == rows)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values


def last_hidden(model: Model, rows: Sequence[Sequence[int]]) -> mx.array:
    """(B, hidden): the final norm's output at each row's last token, the rows left-padded into one pass."""
    width = max(len(r) for r in rows)
    pads = [width - len(r) for r in rows]
    ids = mx.array([[0] * p + list(r) for p, r in zip(pads, rows)], mx.int32)  # (B, L)
    caches = [Padding(pads, width)] * len(model.layers)
    return model.model(ids, caches)[:, -1, :]


def plan(lengths: Sequence[int], batch_size: int, budget: int = TOKEN_BUDGET) -> list[list[int]]:
    """Indices of the rows in batches of at most batch_size, shortest first (little padding), each
    within `budget` padded tokens unless one row alone is longer."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and lengths[i] * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@dataclass(frozen=True)
class Fitted:
    """Rows cut or checked to the context: the rows, how many were cut, their tokens in all."""

    rows: list[list[int]]
    cut: int

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)


def fit(rows: list[list[int]], context: int, truncate: bool, what: str,
        keep_end: Sequence[int] = (), keep_start: Sequence[int] = ()) -> Fitted:
    """Each row within `context` tokens: refused naming its index, or (truncate) cut at its end, before
    the `keep_end` ids that close every row and after the `keep_start` ids that open it.

    Raises:
        OptionError: a row over the context and truncate is False.
    """
    fixed = len(keep_start) + len(keep_end)
    out, cut = [], 0
    for i, row in enumerate(rows):
        n = fixed + len(row)
        if n > context:
            if not truncate:
                raise OptionError(f"{what}[{i}] has {n} tokens, over the model's context of {context}; "
                                  f"shorten it, or pass truncate=True to cut it")
            row, cut = row[: max(context - fixed, 0)], cut + 1
        out.append([*keep_start, *row, *keep_end])
    return Fitted(out, cut)
