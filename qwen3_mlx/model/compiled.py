"""The compiled decode step: one token through one `mx.compile`d graph, swapped in for Model.decode by
fast.speed_up."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from .batch_cache import BatchKVCache, BatchSlots
from .cache import KVCache, Slots
from .model import Model


class CompiledDecode:
    """Model.decode for one token on plain caches through one compiled graph: mx.compile fuses the
    many small operations a decode step is made of. The caches go in as their whole buffers
    (KVCache.buffers, seen by the graph as Slots) and come back through KVCache.commit, so the graph
    is traced again only when a buffer grows (every KVCache.step tokens). Several tokens, rotating
    caches and empty ones take the model's own path."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self._graph = mx.compile(self._decode)
        self._batch_graph = mx.compile(self._decode_batch)

    def __call__(self, ids: mx.array, cache: Sequence[KVCache]) -> mx.array:
        if ids.shape[1] == 1 and all(_plain(c, BatchKVCache) for c in cache):
            return self._batch(ids, cache)
        if ids.shape[1] != 1 or not all(_plain(c, KVCache) for c in cache):
            return Model.decode(self._model, ids, cache)
        buffers = [c.buffers(1) for c in cache]
        logits, written = self._graph(ids, mx.array(cache[0].offset, mx.int32), buffers)
        for c, (keys, values) in zip(cache, written):
            c.commit(keys, values)
        return logits

    def _batch(self, ids: mx.array, cache: Sequence[BatchKVCache]) -> mx.array:
        """One token for each row of a batch (B, 1), through the batch's graph (a graph for each
        batch size and buffer size met, kept by mx.compile)."""
        buffers = [c.buffers(1) for c in cache]
        first = cache[0].slots(*buffers[0])
        logits, written = self._batch_graph(ids, first.end, first.starts, first.offset, buffers)
        for c, (keys, values) in zip(cache, written):
            c.commit(keys, values)
        return logits

    def _decode_batch(self, ids: mx.array, end: mx.array, starts: mx.array, offset: mx.array,
                      buffers: list[tuple[mx.array, mx.array]]) -> tuple[mx.array, list[tuple[mx.array, mx.array]]]:
        slots = [BatchSlots(keys, values, end, starts, offset) for keys, values in buffers]
        logits = self._model(ids, slots)[:, -1, :]
        return logits, [(s.keys, s.values) for s in slots]

    def _decode(self, ids: mx.array, offset: mx.array,
                buffers: list[tuple[mx.array, mx.array]]) -> tuple[mx.array, list[tuple[mx.array, mx.array]]]:
        slots = [Slots(keys, values, offset) for keys, values in buffers]
        logits = self._model(ids, slots)[:, -1, :]
        return logits, [(s.keys, s.values) for s in slots]


def _plain(cache: object, kind: type) -> bool:
    """A non-empty cache of exactly this kind, unquantized: what the compiled graphs take. A quantized
    cache takes the model's own path: Slots and BatchSlots write one plain buffer per tensor, and a
    packed cache would need its new token quantized and written to three buffers, and its head kept,
    inside the graph (not done yet: on the CPU, at a 16k context, a step over an 8-bit cache runs at
    0.7x the compiled bf16 step, benchmarks/kv_bench.py run)."""
    return type(cache) is kind and cache.keys is not None and cache.quantization is None
