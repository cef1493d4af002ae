"""Several newcomers' prompt chunks computed in one forward pass (batch.py's Scheduler), each row on its
own single-row cache, so that every cache ends holding what the same chunk computed alone leaves in it
(plain, rotating or quantized alike) and the row joins the batch as one computed alone does.

Rows are padded on the right: row i's n_i tokens are the first of the pass's L, and the S_i keys and
values its own cache hands back are the first of the S columns every row attends over, the padding
after them masked out. Padding on the right keeps each real score and product in the same place of
its reductions as alone (what comes after adds exact zeros), so that on the CPU in float32 a row's
caches are bitwise those of the chunk alone. (Not quite in one case: rotating quantized rows whose
full-precision heads differ in length, kept prefixes shorter than quantized_kv_start, where a
shorter head's padding sits before its packed part.) A padding query sees every column (one that
sees none would be NaN); its keys and values never reach a row's cache.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from ..device import generation_stream
from ..model.cache import KVCache, Mask, RotatingKVCache
from ..model.kv_quant import FEW_QUERIES, Packed, Stored, length, stored_map
from ..model.model import Model


def extend_caches(model: Model, caches: Sequence[list[KVCache]], chunks: Sequence[Sequence[int]]) -> None:
    """Run chunks[i] (at least one token each) through the model into caches[i], computing no logits:
    in one pass of len(chunks) rows, or one for each way attention takes (below)."""
    # Attention takes another way for one query (fast.CPUAttention) and for a few over a quantized
    # cache (kv_quant.FEW_QUERIES): a row goes the way it would alone, in a pass of rows that do.
    quantized = caches[0][0].quantization is not None
    ways: dict[tuple[bool, bool], list[int]] = {}
    for i, chunk in enumerate(chunks):
        ways.setdefault((len(chunk) == 1, quantized and len(chunk) <= FEW_QUERIES), []).append(i)
    for rows in ways.values():
        _pass(model, [caches[i] for i in rows], [chunks[i] for i in rows])


def _pass(model: Model, caches: Sequence[list[KVCache]], chunks: Sequence[Sequence[int]]) -> None:
    width = max(len(c) for c in chunks)
    ids = mx.array([list(c) + [0] * (width - len(c)) for c in chunks], mx.int32)  # (B, L)
    layers = [Stacked([cache[j] for cache in caches], [len(c) for c in chunks]) for j in range(len(caches[0]))]
    with generation_stream():
        model(ids, layers)
        mx.eval([c.keys for cache in caches for c in cache])


class Stacked:
    """One layer's single-row caches as one cache of B rows, for one pass of `lengths[i]` new tokens in
    row i (the pass's L is the longest): the cache protocol the model reads (offset, make_mask,
    update_and_fetch)."""

    def __init__(self, caches: list[KVCache], lengths: list[int]) -> None:
        self.caches, self.lengths, self.width = caches, lengths, max(lengths)
        self.quantization = caches[0].quantization

    @property
    def keys(self) -> list[Stored | None]:
        """Each row's keys: what a pipeline stage makes depend on its send (parallel.py), so that
        evaluating the rows' caches sends too."""
        return [c.keys for c in self.caches]

    @keys.setter
    def keys(self, keys: list[Stored | None]) -> None:
        for c, k in zip(self.caches, keys):
            c.keys = k

    @property
    def offset(self) -> mx.array:
        """(B,) each row's position of its first new token: its padding follows its tokens."""
        return mx.array([c.offset for c in self.caches], mx.int32)

    def make_mask(self, n: int) -> Mask:
        """(B, 1, L, S) what each row's own cache would mask, padded; a quantized cache's pair of them
        (its full-precision head's, its packed part's)."""
        assert n == self.width
        fetched = [_fetched(c, m) for c, m in zip(self.caches, self.lengths)]
        masks = [c.make_mask(m) for c, m in zip(self.caches, self.lengths)]
        if self.quantization is None:
            return self._padded(masks, fetched)
        heads = [min(c.offset + m, c.head_size) for c, m in zip(self.caches, self.lengths)]
        head = self._padded([m[0] for m in masks], heads) if max(heads) else None
        return head, self._padded([m[1] for m in masks], fetched)

    def _padded(self, masks: list[mx.array | str | None], widths: list[int]) -> mx.array:
        S, rows = max(widths), []
        for mask, n, width in zip(masks, self.lengths, widths):
            visible = mx.broadcast_to(_explicit(mask, n, width), (n, width))
            visible = mx.pad(visible, [(0, 0), (0, S - width)], constant_values=False)
            rows.append(mx.concatenate([visible, mx.ones((self.width - n, S), mx.bool_)]))
        return mx.stack(rows)[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Stored, Stored]:
        """Row i's first lengths[i] keys and values (B, H_kv, L, D) into its own cache; every row's
        fetched keys and values padded to the longest and stacked."""
        fetched = [c.update_and_fetch(keys[i : i + 1, :, :n], values[i : i + 1, :, :n])
                   for i, (c, n) in enumerate(zip(self.caches, self.lengths))]
        return _stack([k for k, _ in fetched]), _stack([v for _, v in fetched])


def _fetched(cache: KVCache, n: int) -> int:
    """Columns cache.update_and_fetch hands back for n new tokens: those it holds and the new ones."""
    if isinstance(cache, RotatingKVCache) and cache.offset + n > cache.max_size:
        if n == 1 and cache.offset >= cache.max_size:
            return cache.max_size  # its whole ring, the new token written in place
        return min(cache.offset, cache.max_size) + n
    return cache.offset + n


def _explicit(mask: mx.array | str | None, n: int, S: int) -> mx.array:
    """A row's mask as a bool array that broadcasts to (n, S)."""
    if mask is None:
        return mx.ones((1, S), mx.bool_)
    if isinstance(mask, str):  # "causal": the n queries are the last of the S columns
        return mx.arange(S)[None] <= (S - n + mx.arange(n))[:, None]
    return mask


def _stack(xs: list[Stored]) -> Stored:
    """Rows (1, H, S_i, D), packed ones with their heads (1, H, h_i, D), padded with zeros on the
    right of time to the longest and stacked: (B, H, S, D)."""
    S = max(length(x) for x in xs)
    body = stored_map(lambda *parts: mx.concatenate([_pad(a, S) for a in parts]), *xs)
    if not isinstance(body, Packed):
        return body
    h = max((x.head.shape[2] for x in xs if x.head is not None), default=0)
    if not h:
        return body._replace(head=None)
    like = next(x.head for x in xs if x.head is not None)
    heads = [_pad(x.head if x.head is not None else mx.zeros((*like.shape[:2], 0, like.shape[3]), like.dtype), h)
             for x in xs]
    return body._replace(head=mx.concatenate(heads))


def _pad(a: mx.array, S: int) -> mx.array:
    return a if a.shape[2] == S else mx.pad(a, [(0, 0), (0, 0), (0, S - a.shape[2]), (0, 0)])
