"""Key/value caches. One protocol for both kinds; a cache is a value passed to the model, one per layer.

Protocol:
    offset                  tokens seen so far (the position of the next token)
    make_mask(L)            the attention mask for the next L tokens: None, "causal" or a bool (L, S) array
    update_and_fetch(k, v)  store the new (B, H_kv, L, D) keys/values; return the keys/values to attend to
    trim(n)                 forget the last n tokens (when is_trimmable()); returns how many were dropped
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Holds every token. Grows in preallocated steps of `step` tokens and writes in place."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None  # (B, H_kv, capacity, D)
        self.values: mx.array | None = None
        self.offset = 0

    def make_mask(self, n: int) -> str | None:
        # MLX's "causal" mask is aligned to the last query, so it is right with cached keys in front.
        return "causal" if n > 1 else None

    def reserve(self, n: int, keys: mx.array, values: mx.array, capacity_limit: int | None = None) -> None:
        """Room for n more tokens; `keys` and `values` give the batch, head and dtype sizes."""
        needed = self.offset + n
        if self.keys is not None and needed <= self.keys.shape[2]:
            return
        B, H, _, D = keys.shape
        capacity = -(-needed // self.step) * self.step
        if capacity_limit is not None:
            capacity = min(capacity, capacity_limit)
        new_k = mx.zeros((B, H, capacity, D), keys.dtype)
        new_v = mx.zeros((B, H, capacity, values.shape[3]), values.dtype)
        if self.keys is not None:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.reserve(keys.shape[2], keys, values)
        start, self.offset = self.offset, self.offset + keys.shape[2]
        self.keys[..., start : self.offset, :] = keys
        self.values[..., start : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

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
        return n

    def stored(self) -> tuple[mx.array, mx.array, mx.array]:
        """(keys, values, positions) of the tokens held, in temporal order."""
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :], mx.arange(self.offset)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class Slots:
    """A KVCache as the compiled decode step sees it (fast.CompiledDecode): the whole preallocated
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
    """

    def __init__(self, max_size: int, keep: int = 0) -> None:
        if not 0 <= keep < max_size:
            raise ValueError(f"max_kv_size={max_size} must be larger than the kept prefix ({keep} tokens)")
        super().__init__()
        self.max_size, self.keep, self.window = max_size, keep, max_size - keep

    def _positions(self) -> mx.array:
        """Positions held, in temporal order."""
        if self.offset <= self.max_size:
            return mx.arange(self.offset)
        return mx.concatenate([mx.arange(self.keep), mx.arange(self.offset - self.window, self.offset)])

    def stored(self) -> tuple[mx.array, mx.array, mx.array]:
        if self.offset <= self.max_size:
            return super().stored()
        # The oldest ring entry sits right after the slot the next token will be written to.
        shift = (self.offset - self.keep) % self.window
        order = mx.concatenate([
            mx.arange(self.keep),
            self.keep + (shift + mx.arange(self.window)) % self.window,
        ])
        return self.keys[..., order, :], self.values[..., order, :], self._positions()

    def make_mask(self, n: int) -> str | mx.array | None:
        if self.offset + n <= self.max_size:
            return super().make_mask(n)
        if n == 1:
            return None  # the buffer holds exactly the kept tokens and the window
        key_pos = mx.concatenate([self._positions(), mx.arange(self.offset, self.offset + n)])[None]
        query_pos = mx.arange(self.offset, self.offset + n)[:, None]
        return (key_pos <= query_pos) & ((key_pos < self.keep) | (query_pos - key_pos < self.window))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        if self.offset + n <= self.max_size:
            self.reserve(n, keys, values, capacity_limit=self.max_size)
            return super().update_and_fetch(keys, values)
        if n == 1 and self.offset >= self.max_size:
            slot = self.keep + (self.offset - self.keep) % self.window
            self.keys[..., slot : slot + 1, :] = keys
            self.values[..., slot : slot + 1, :] = values
            self.offset += 1
            return self.keys, self.values
        # A chunk that crosses the window: attend over everything held plus the chunk (the mask
        # limits each query to its own window), then keep the prefix and the last `window` tokens.
        all_k, all_v = keys, values
        if self.keys is not None:
            old_k, old_v, _ = self.stored()
            all_k, all_v = mx.concatenate([old_k, keys], axis=2), mx.concatenate([old_v, values], axis=2)
        self.offset += n
        shift = (self.offset - self.window - self.keep) % self.window
        self.keys = mx.concatenate(
            [all_k[..., : self.keep, :], mx.roll(all_k[..., -self.window :, :], shift, axis=2)], axis=2)
        self.values = mx.concatenate(
            [all_v[..., : self.keep, :], mx.roll(all_v[..., -self.window :, :], shift, axis=2)], axis=2)
        return all_k, all_v

    def is_trimmable(self) -> bool:
        return self.offset <= self.max_size


def restore(cache: KVCache, keys: mx.array, values: mx.array, offset: int) -> None:
    """Fill an empty cache from keys/values in temporal order (as `stored()` gives them)."""
    cache.offset = offset
    if isinstance(cache, RotatingKVCache) and offset > cache.max_size:
        shift = (offset - cache.window - cache.keep) % cache.window
        k, v = keys[..., cache.keep :, :], values[..., cache.keep :, :]
        keys = mx.concatenate([keys[..., : cache.keep, :], mx.roll(k, shift, axis=2)], axis=2)
        values = mx.concatenate([values[..., : cache.keep, :], mx.roll(v, shift, axis=2)], axis=2)
    cache.keys, cache.values = keys, values


class BatchKVCache:
    """Several rows' keys and values in one tensor, so that their decode steps run as one batch.

    Rows are aligned on the right (left padding): row i's tokens are the last lengths[i] of the `end`
    columns in use, and the columns before them hold nothing and are masked out. Every row then
    writes its next token into the same column, so a step is one slice update for the whole batch
    (as in mlx-lm's BatchKVCache); per-row write positions would need a scatter per step instead.
    Rows join (`add`, a single-row cache computed on its own) and leave (`keep`) between steps;
    leaving drops the columns no remaining row uses, and the memory with them.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None  # (B, H_kv, capacity, D)
        self.values: mx.array | None = None
        self.end = 0  # columns in use
        self.lengths: list[int] = []  # tokens per row

    @property
    def offset(self) -> mx.array:
        """(B,) each row's position of its next token: what RoPE reads."""
        return mx.array(self.lengths, mx.int32)

    def make_mask(self, n: int) -> mx.array:
        """(B, 1, n, end + n): a row sees its own columns, and causally the n new ones."""
        cols = mx.arange(self.end + n)
        starts = mx.array([self.end - length for length in self.lengths])[:, None, None, None]
        mask = cols >= starts
        if n > 1:
            mask = mask & (cols <= self.end + mx.arange(n)[:, None])
        return mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        if self.end + n > self.keys.shape[2]:
            self._grow(n)
        self.keys[..., self.end : self.end + n, :] = keys
        self.values[..., self.end : self.end + n, :] = values
        self.end += n
        self.lengths = [length + n for length in self.lengths]
        return self.keys[..., : self.end, :], self.values[..., : self.end, :]

    def buffers(self, n: int = 1) -> tuple[mx.array, mx.array]:
        """The whole buffers (B, H_kv, capacity, D), with room for n more tokens: what the compiled
        decode step (fast.py) writes into, as `BatchSlots`."""
        if self.end + n > self.keys.shape[2]:
            self._grow(n)
        return self.keys, self.values

    def commit(self, keys: mx.array, values: mx.array, n: int = 1) -> None:
        """Take back the buffers from `buffers(n)` with the next n tokens written at `end`."""
        assert keys.shape == self.keys.shape and values.shape == self.values.shape
        self.keys, self.values, self.end = keys, values, self.end + n
        self.lengths = [length + n for length in self.lengths]

    def slots(self, keys: mx.array, values: mx.array) -> BatchSlots:
        """The arrays a compiled step needs, besides the buffers: where to write, where rows start."""
        starts = mx.array([self.end - length for length in self.lengths], mx.int32)
        return BatchSlots(keys, values, mx.array(self.end, mx.int32), starts, self.offset)

    def _grow(self, n: int) -> None:
        grow = -(-n // self.step) * self.step
        B, H, _, D = self.keys.shape
        self.keys = mx.concatenate([self.keys[..., : self.end, :], mx.zeros((B, H, grow, D), self.keys.dtype)], axis=2)
        self.values = mx.concatenate(
            [self.values[..., : self.end, :], mx.zeros((B, H, grow, self.values.shape[3]), self.values.dtype)], axis=2)

    def add(self, cache: KVCache) -> None:
        """Take in the row held by a single-row cache, as the batch's last row."""
        keys, values, _ = cache.stored()  # (1, H_kv, n, D)
        n = cache.offset
        if self.keys is None:
            self.keys, self.values, self.end, self.lengths = keys, values, n, [n]
            return
        old_k, old_v = self.keys[..., : self.end, :], self.values[..., : self.end, :]
        if n > self.end:  # the newcomer is longer: pad the rows there are
            old_k, old_v = _pad_left(old_k, n - self.end), _pad_left(old_v, n - self.end)
            self.end = n
        keys, values = _pad_left(keys, self.end - n), _pad_left(values, self.end - n)
        self.keys = mx.concatenate([old_k, keys], axis=0)
        self.values = mx.concatenate([old_v, values], axis=0)
        self.lengths = self.lengths + [n]

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (indices, in this order)."""
        self.lengths = [self.lengths[i] for i in rows]
        if not rows:
            self.keys = self.values = None
            self.end = 0
            return
        unused = self.end - max(self.lengths)  # leading columns no row uses any more
        index = mx.array(rows)
        self.keys = self.keys[index, :, unused : self.end, :]
        self.values = self.values[index, :, unused : self.end, :]
        self.end -= unused

    def row(self, i: int) -> tuple[mx.array, mx.array]:
        """Row i's keys and values (1, H_kv, lengths[i], D), in temporal order."""
        start = self.end - self.lengths[i]
        return self.keys[i : i + 1, :, start : self.end, :], self.values[i : i + 1, :, start : self.end, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class BatchSlots:
    """A BatchKVCache as the compiled decode step sees it: the whole buffers, the column to write
    (`end`), where each row starts and each row's position, all as arrays, so one compiled graph
    serves every step until the buffers grow or a row joins or leaves."""

    def __init__(self, keys: mx.array, values: mx.array, end: mx.array, starts: mx.array, offset: mx.array) -> None:
        self.keys, self.values, self.end, self.starts, self.offset = keys, values, end, starts, offset

    def make_mask(self, n: int) -> mx.array:
        cols = mx.arange(self.keys.shape[2])
        return (cols >= self.starts[:, None, None, None]) & (cols <= self.end)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        at = self.end.reshape(1)
        self.keys = mx.slice_update(self.keys, keys, at, axes=(2,))
        self.values = mx.slice_update(self.values, values, at, axes=(2,))
        return self.keys, self.values


def _pad_left(x: mx.array, n: int) -> mx.array:
    """x (B, H, S, D) with n zero columns in front."""
    if n == 0:
        return x
    return mx.concatenate([mx.zeros((*x.shape[:2], n, x.shape[3]), x.dtype), x], axis=2)
