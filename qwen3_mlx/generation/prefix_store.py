"""The prefix store: keys and values of token sequences computed before, kept in memory for requests
that begin the same way (the engine's and the server's), bounded in bytes."""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx

from ..model.cache import KVCache, restore
from ..model.kv_quant import Packed, Stored, prefix, stored_map

from .prompt_cache import reusable


class PrefixStore:
    """Keys and values of token sequences computed before, for requests that begin the same way (a
    client re-sending its growing conversation, a system prompt many requests share). Bounded in
    bytes; the least recently used sequence goes first, and `evict` gives memory back on demand (the
    engine's memory ceiling). The stored arrays are copies, never written to: a cache filled from them
    grows into buffers of its own. A quantized cache's entries are stored packed, as it holds them,
    and counted in packed bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], list[tuple[Stored, Stored]]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: list[int], cache: list[KVCache]) -> tuple[list[KVCache], int]:
        """Fill the empty `cache` with the longest stored prefix of `ids` (but never all of them: the
        last token must run to give the first draw's logits); returns it and how many tokens it holds."""
        best, n = None, 0
        for key in self._entries:
            common = reusable(key, ids)
            if common > n:
                best, n = key, common
        if best is None:
            return cache, 0
        self._entries.move_to_end(best)
        head = getattr(self._entries[best][0][0], "head", None)
        if head is not None and head.shape[2] < min(n, cache[0].head_size):
            n = head.shape[2]  # reused only as far as its full-precision head reaches
        if n == 0:
            return cache, 0
        for c, (keys, values) in zip(cache, self._entries[best]):
            restore(c, prefix(keys, n), prefix(values, n), n)
        return cache, n

    def store(self, ids: list[int], cache: list[KVCache], room: int | None = None) -> None:
        """Keep a copy of what `cache` holds (the first `cache[0].offset` of `ids`), unless it has
        rotated (its tokens are no longer a prefix); see store_arrays for `room`."""
        if cache[0].is_trimmable():
            self.store_arrays(ids[: cache[0].offset], [c.stored()[:2] for c in cache], room)

    def store_arrays(self, ids: list[int], keys_values: list[tuple[Stored, Stored]], room: int | None = None) -> None:
        """Keep copies of per-layer keys and values (1, H_kv, len(ids), D), or packed ones, of `ids`.
        `room`: the bytes the store may hold now, if fewer than max_bytes (a memory ceiling's share);
        older entries go first to make room, before the copies are made."""
        key = tuple(ids)
        size = sum(k.nbytes + v.nbytes for k, v in keys_values)
        cap = self.max_bytes if room is None else min(self.max_bytes, room)
        if not key or size > cap:
            return
        longer = next((old for old in self._entries if old[: len(key)] == key), None)
        if longer is not None:  # held already, within a longer sequence
            self._entries.move_to_end(longer)
            return
        for old in [old for old in self._entries if key[: len(old)] == old]:  # prefixes of this one: superseded
            self._drop(old)
        self.evict(cap - size)
        copies = [(_copy(k), _copy(v)) for k, v in keys_values]
        mx.eval(copies)
        self._entries[key] = copies
        self.nbytes += size

    def evict(self, max_bytes: int) -> int:
        """Drop the least recently used entries until at most `max_bytes` are held; returns the bytes freed."""
        before = self.nbytes
        while self.nbytes > max_bytes:
            self._drop(next(iter(self._entries)))
        return before - self.nbytes

    def _drop(self, key: tuple[int, ...]) -> None:
        self.nbytes -= sum(k.nbytes + v.nbytes for k, v in self._entries.pop(key))


def _copy(x: Stored) -> Stored:
    copied = stored_map(mx.contiguous, x)
    if isinstance(x, Packed) and x.head is not None:
        copied = copied._replace(head=mx.contiguous(x.head))
    return copied
