"""Key/value caches of one row. One protocol for every kind; a cache is a value passed to the model, one per layer.

Protocol:
    offset                  tokens seen so far (the position of the next token)
    make_mask(L)            the attention mask for the next L tokens: None, "causal" or a bool (L, S) array
    update_and_fetch(k, v)  store the new (B, H_kv, L, D) keys/values; return the keys/values to attend to
    trim(n)                 forget the last n tokens (when is_trimmable()); returns how many were dropped

Quantization is a property of any of them (KVQuantization, kv_quant.py): given one, a cache stores
what it is given packed, and hands back Packed keys and values with their full-precision head; its
masks are then pairs (the head's, the packed part's), each None or a bool array.

Batches of rows have caches of their own, on the same protocol (batch_cache.py).
"""

from __future__ import annotations

import mlx.core as mx

from .kv_quant import (
    KVQuantization,
    Packed,
    Stored,
    columns,
    concatenate,
    length,
    nbytes,
    stored_map,
    write,
)

Mask = str | mx.array | tuple | None


def _explicit(mask: Mask, n: int, S: int) -> mx.array | None:
    """A mask as None or a bool array: "causal" for the last n of S keys made (n, S)."""
    if isinstance(mask, str):
        return mx.arange(S)[None] <= (S - n + mx.arange(n))[:, None]
    return mask


class KVCache:
    """Holds every token. Grows in preallocated steps of `step` tokens and writes in place."""

    step = 256

    def __init__(self, quantization: KVQuantization | None = None) -> None:
        self.keys: Stored | None = None  # (B, H_kv, capacity, D), or packed
        self.values: Stored | None = None
        self.offset = 0
        self.quantization = quantization
        # A quantized cache's first head_size positions in full precision: (B, H_kv, <= head_size, D) each.
        self.head: tuple[mx.array, mx.array] | None = None

    @property
    def head_size(self) -> int:
        return self.quantization.start if self.quantization is not None else 0

    def make_mask(self, n: int) -> Mask:
        # MLX's "causal" mask is aligned to the last query, so it is right with cached keys in front.
        return self._split(n, "causal" if n > 1 else None, self.offset + n)

    def _split(self, n: int, mask: Mask, S: int) -> Mask:
        """A quantized cache's masks (the head's, the packed part's) from the mask of its S stored
        columns after the update: the head holds positions [0, h), so their columns are masked out,
        and the rest is read from the packed part. A column below h is position p in every layout."""
        if self.quantization is None:
            return mask
        h = self.head_size
        body = _explicit(mask, n, S)
        if h:
            body = (mx.arange(S) >= h)[None] if body is None else body & (mx.arange(S) >= h)
        held = min(self.offset + n, h)
        head = None if n == 1 or not held else mx.arange(held)[None] <= (self.offset + mx.arange(n))[:, None]
        return head, body

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Stored, Stored]:
        q = self.quantization
        if q is None:
            return self._store(keys, values)
        self._hold_head(keys, values)
        k, v = self._store(q.pack(keys), q.pack(values))
        return self._with_head(k, v)

    def _hold_head(self, keys: mx.array, values: mx.array) -> None:
        """Keep the full-precision copy of the new tokens at positions below head_size."""
        take = min(self.offset + keys.shape[2], self.head_size) - self.offset
        if take <= 0:
            return
        new = keys[..., :take, :], values[..., :take, :]
        if self.head is not None:
            new = tuple(mx.concatenate([old[..., : self.offset, :], x], axis=2) for old, x in zip(self.head, new))
        self.head = new

    def _with_head(self, k: Stored, v: Stored) -> tuple[Stored, Stored]:
        if self.head is None:
            return k, v
        return k._replace(head=self.head[0]), v._replace(head=self.head[1])

    def reserve(self, n: int, keys: Stored, values: Stored, capacity_limit: int | None = None) -> None:
        """Room for n more tokens; `keys` and `values` give the batch, head and dtype sizes."""
        needed = self.offset + n
        if self.keys is not None and needed <= length(self.keys):
            return
        capacity = -(-needed // self.step) * self.step
        if capacity_limit is not None:
            capacity = min(capacity, capacity_limit)

        def zeros(a: mx.array) -> mx.array:
            return mx.zeros((a.shape[0], a.shape[1], capacity, a.shape[3]), a.dtype)

        new_k, new_v = stored_map(zeros, keys), stored_map(zeros, values)
        if self.keys is not None:
            write(new_k, columns(self.keys, 0, self.offset), 0)
            write(new_v, columns(self.values, 0, self.offset), 0)
        self.keys, self.values = new_k, new_v

    def _store(self, keys: Stored, values: Stored) -> tuple[Stored, Stored]:
        self.reserve(length(keys), keys, values)
        start, self.offset = self.offset, self.offset + length(keys)
        write(self.keys, keys, start)
        write(self.values, values, start)
        return columns(self.keys, 0, self.offset), columns(self.values, 0, self.offset)

    def buffers(self, n: int = 1) -> tuple[mx.array, mx.array]:
        """The whole preallocated key and value buffers (B, H_kv, capacity, D), with room for n more
        tokens: what the compiled decode step (fast.py) writes into, as `Slots`."""
        self.reserve(n, self.keys, self.values)
        return self.keys, self.values

    def commit(self, keys: mx.array, values: mx.array, n: int = 1) -> None:
        """Take back the buffers from `buffers(n)` with the next n tokens written after `offset`."""
        assert keys.shape == self.keys.shape and values.shape == self.values.shape
        self.keys, self.values, self.offset = keys, values, self.offset + n

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        if self.head is not None:
            held = min(self.offset, self.head_size)
            self.head = tuple(x[..., :held, :] for x in self.head) if held else None
        return n

    def stored(self) -> tuple[Stored, Stored, mx.array]:
        """(keys, values, positions) of the tokens held, in temporal order (packed ones with their head)."""
        k, v = self._with_head(columns(self.keys, 0, self.offset), columns(self.values, 0, self.offset))
        return k, v, mx.arange(self.offset)

    @property
    def nbytes(self) -> int:
        return nbytes(self.keys) + nbytes(self.values) + sum(x.nbytes for x in self.head or ())


class Slots:
    """A KVCache as the compiled decode step sees it (compiled.CompiledDecode): the whole preallocated
    buffer (KVCache.buffers) and the position as an array, so one compiled graph serves every step
    until the buffer grows. Writes one token at `offset`; attends to the slots up to it (the ones
    after hold nothing yet); the caller hands the buffers back with KVCache.commit."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array) -> None:
        self.keys, self.values, self.offset = keys, values, offset

    def make_mask(self, n: int) -> mx.array:
        return mx.arange(self.keys.shape[2]) <= self.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        at = self.offset.reshape(1)
        self.keys = mx.slice_update(self.keys, keys, at, axes=(2,))
        self.values = mx.slice_update(self.values, values, at, axes=(2,))
        return self.keys, self.values


class RotatingKVCache(KVCache):
    """Keeps the first `keep` tokens (the system prompt) and a sliding window of the most recent ones.

    A query at position t attends to positions [0, keep) and (t - window, t], where
    window = max_size - keep. Storage never exceeds max_size tokens: slots [0, keep) hold the kept
    tokens, and position p >= keep lives in ring slot keep + (p - keep) % window once the ring is full.

    Once the ring has wrapped, a store has overwritten what it replaced, so trim() cannot take it back
    unless `rollback` is set (speculative decoding sets it): then a store of several tokens that passes
    the window keeps the arrays it replaced, and the tokens it stored, until the next store, and trim()
    takes back up to that many tokens by restoring them and storing the tokens kept again (the arrays
    of one cache more held between two steps). A one-token store is not taken back.
    """

    def __init__(self, max_size: int, keep: int = 0, quantization: KVQuantization | None = None) -> None:
        if not 0 <= keep < max_size:
            raise ValueError(f"max_kv_size={max_size} must be larger than the kept prefix ({keep} tokens)")
        super().__init__(quantization)
        self.max_size, self.keep, self.window = max_size, keep, max_size - keep
        self.rollback = False
        self._undo: tuple | None = None  # (keys, values, offset) before the latest store, and what it stored

    @property
    def head_size(self) -> int:
        """Only kept tokens stay in full precision too: those that rotate out are packed alone."""
        return min(super().head_size, self.keep)

    def _positions(self) -> mx.array:
        """Positions held, in temporal order."""
        if self.offset <= self.max_size:
            return mx.arange(self.offset)
        return mx.concatenate([mx.arange(self.keep), mx.arange(self.offset - self.window, self.offset)])

    def stored(self) -> tuple[Stored, Stored, mx.array]:
        if self.offset <= self.max_size:
            return super().stored()
        # The oldest ring entry sits right after the slot the next token will be written to.
        shift = (self.offset - self.keep) % self.window
        order = mx.concatenate([
            mx.arange(self.keep),
            self.keep + (shift + mx.arange(self.window)) % self.window,
        ])
        k, v = self._with_head(*(stored_map(lambda a: a[..., order, :], x) for x in (self.keys, self.values)))
        return k, v, self._positions()

    def make_mask(self, n: int) -> Mask:
        if self.offset + n <= self.max_size:
            return super().make_mask(n)
        held = min(self.offset, self.max_size)
        if n == 1:
            # the buffer holds exactly the kept tokens and the window
            return self._split(n, None, self.max_size)
        key_pos = mx.concatenate([self._positions(), mx.arange(self.offset, self.offset + n)])[None]
        query_pos = mx.arange(self.offset, self.offset + n)[:, None]
        mask = (key_pos <= query_pos) & ((key_pos < self.keep) | (query_pos - key_pos < self.window))
        return self._split(n, mask, held + n)

    def _store(self, keys: Stored, values: Stored) -> tuple[Stored, Stored]:
        n = length(keys)
        self._undo = None
        if self.offset + n <= self.max_size:
            self.reserve(n, keys, values, capacity_limit=self.max_size)
            return super()._store(keys, values)
        if n == 1 and self.offset >= self.max_size:
            slot = self.keep + (self.offset - self.keep) % self.window
            write(self.keys, keys, slot)
            write(self.values, values, slot)
            self.offset += 1
            return self.keys, self.values
        # A chunk that crosses the window: attend over everything held plus the chunk (the mask
        # limits each query to its own window), then keep the prefix and the last `window` tokens.
        all_k, all_v = keys, values
        if self.rollback:
            self._undo = (self.keys, self.values, self.offset, keys, values)
        if self.keys is not None:
            old_k, old_v = self._temporal()
            all_k, all_v = concatenate([old_k, keys]), concatenate([old_v, values])
        self.offset += n
        self.keys, self.values = (_ring(x, self.keep, self.window, self.offset) for x in (all_k, all_v))
        return all_k, all_v

    def _temporal(self) -> tuple[Stored, Stored]:
        """The stored keys and values in temporal order (without the head)."""
        k, v, _ = self.stored()
        return (k._replace(head=None), v._replace(head=None)) if isinstance(k, Packed) else (k, v)

    def is_trimmable(self) -> bool:
        return self.offset <= self.max_size or self._undo is not None

    def trim(self, n: int) -> int:
        if self.offset <= self.max_size or not n:
            return super().trim(n)
        if self._undo is None or n > length(self._undo[3]):
            raise ValueError(f"internal: a rotating cache past its window takes back at most its latest store "
                             f"(with rollback set); asked for {n}")
        self.keys, self.values, self.offset, keys, values = self._undo
        kept = length(keys) - n
        if kept:
            self._store(columns(keys, 0, kept), columns(values, 0, kept))
        return n


def _ring(x: Stored, keep: int, window: int, offset: int) -> Stored:
    """The kept prefix and the last `window` of x (temporal order, `offset` tokens seen), the window
    rolled so that position p >= keep sits in slot keep + (p - keep) % window."""
    shift = (offset - window - keep) % window
    window_part = stored_map(lambda a: mx.roll(a, shift, axis=2), columns(x, length(x) - window))
    return concatenate([columns(x, 0, keep), window_part])


def restore(cache: KVCache, keys: Stored, values: Stored, offset: int) -> None:
    """Fill an empty cache from keys/values in temporal order (as `stored()` gives them, packed ones
    for a quantized cache)."""
    if (cache.quantization is not None) != isinstance(keys, Packed):
        raise ValueError("internal: packed keys go to a quantized cache, and only there")
    cache.offset = offset
    if isinstance(keys, Packed):
        held = min(offset, cache.head_size)
        if held and (keys.head is None or keys.head.shape[2] < held):
            raise ValueError(f"internal: a quantized cache keeps {held} positions in full precision; "
                             f"these keys have {0 if keys.head is None else keys.head.shape[2]}")
        cache.head = (keys.head[..., :held, :], values.head[..., :held, :]) if held else None
        keys, values = keys._replace(head=None), values._replace(head=None)
    if isinstance(cache, RotatingKVCache) and offset > cache.max_size:
        keys, values = (_ring(x, cache.keep, cache.window, offset) for x in (keys, values))
    cache.keys, cache.values = keys, values
