"""Caches of many rows decoded together (batch.py): the same protocol as cache.py's, every row's keys
and values in one tensor, so that a decode step runs as one batch.

- BatchKVCache: rows right-aligned (left-padded), each holding every token it has seen.
- BatchRotatingKVCache: each row keeping its first tokens (its system prompt) and a window of its
  latest ones, as RotatingKVCache keeps one row: one window size for all rows. Without a window
  (max_size None) it keeps every token: the cache of a speculative batch, whose rows each take back
  their own number of tokens (trim_rows).
- BatchSlots: a BatchKVCache as the compiled decode step (fast.py) sees it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .cache import KVCache, Mask, RotatingKVCache
from .kv_quant import (
    KVQuantization,
    Packed,
    Stored,
    columns,
    concatenate,
    length,
    nbytes,
    pad_left,
    stored_map,
    write,
)


class BatchKVCache:
    """Several rows' keys and values in one tensor, so that their decode steps run as one batch.

    Rows are aligned on the right (left padding): row i's tokens are the last lengths[i] of the `end`
    columns in use, and the columns before them hold nothing and are masked out. Every row then
    writes its next token into the same column, so a step is one slice update for the whole batch
    (as in mlx-lm's BatchKVCache); per-row write positions would need a scatter per step instead.
    Rows join (`add`, a single-row cache computed on its own) and leave (`keep`) between steps;
    leaving drops the columns no remaining row uses, and the memory with them.

    Quantized, it also holds each row's first `start` positions in full precision, in a head whose
    column p is position p of every row (written by a masked select while a row is that short).
    """

    step = 256

    def __init__(self, quantization: KVQuantization | None = None) -> None:
        self.keys: Stored | None = None  # (B, H_kv, capacity, D), or packed
        self.values: Stored | None = None
        self.end = 0  # columns in use
        self.lengths: list[int] = []  # tokens per row
        self.quantization = quantization
        self.head: tuple[mx.array, mx.array] | None = None  # (B, H_kv, head_size, D) each

    @property
    def head_size(self) -> int:
        return self.quantization.start if self.quantization is not None else 0

    @property
    def offset(self) -> mx.array:
        """(B,) each row's position of its next token: what RoPE reads."""
        return mx.array(self.lengths, mx.int32)

    def make_mask(self, n: int) -> Mask:
        """(B, 1, n, end + n): a row sees its own columns, and causally the n new ones."""
        cols = mx.arange(self.end + n)
        starts = mx.array([self.end - length for length in self.lengths])[:, None, None, None]
        mask = cols >= starts
        if n > 1:
            mask = mask & (cols <= self.end + mx.arange(n)[:, None])
        return self._split(n, mask, starts)

    def _split(self, n: int, mask: mx.array, starts: mx.array) -> Mask:
        """A quantized batch's masks (the head's, the packed part's): a row's first h positions are read
        from the head, so its columns for them are masked out of the packed part."""
        h = self.head_size
        if self.quantization is None:
            return mask
        if not h:
            return None, mask
        query_pos = mx.array(self.lengths)[:, None, None, None] + mx.arange(n)[:, None]  # (B, 1, n, 1)
        return mx.arange(h) <= query_pos, mask & (mx.arange(mask.shape[-1]) >= starts + h)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Stored, Stored]:
        q = self.quantization
        if q is not None:
            self._hold_head(keys, values)
            keys, values = q.pack(keys), q.pack(values)
        n = length(keys)
        self.ready(n)
        write(self.keys, keys, self.end)
        write(self.values, values, self.end)
        self.end += n
        self.lengths = [length + n for length in self.lengths]
        k, v = columns(self.keys, 0, self.end), columns(self.values, 0, self.end)
        if self.head is not None:
            k, v = k._replace(head=self.head[0]), v._replace(head=self.head[1])
        return k, v

    def _hold_head(self, keys: mx.array, values: mx.array) -> None:
        """Row i's new tokens at positions lengths[i] + j below head_size go into its head."""
        h, n = self.head_size, keys.shape[2]
        if not h or min(self.lengths) >= h:
            return
        lengths = mx.array(self.lengths)[:, None]
        cols = mx.arange(h)[None]
        index = mx.clip(cols - lengths, 0, n - 1)[:, None, :, None]  # (B, 1, h, 1): which new token
        new = ((cols >= lengths) & (cols < lengths + n))[:, None, :, None]
        self.head = tuple(
            mx.where(new, mx.take_along_axis(x, mx.broadcast_to(index, (*x.shape[:2], h, x.shape[3])), axis=2), old)
            for x, old in zip((keys, values), self.head))

    def needs_room(self, n: int) -> bool:
        """Whether n more tokens take a new buffer (ready(n) makes it)."""
        return self.keys is not None and self.end + n > length(self.keys)

    def ready(self, n: int) -> None:
        """Room for n more tokens in every row: the buffers grown by whole steps when they are full."""
        if self.needs_room(n):
            self._grow(n)

    def buffers(self, n: int = 1) -> tuple[mx.array, mx.array]:
        """The whole buffers (B, H_kv, capacity, D), with room for n more tokens: what the compiled
        decode step (fast.py) writes into, as `BatchSlots`."""
        self.ready(n)
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

        def grown(a: mx.array) -> mx.array:
            return mx.concatenate([a[..., : self.end, :], mx.zeros((*a.shape[:2], grow, a.shape[3]), a.dtype)], axis=2)

        self.keys, self.values = stored_map(grown, self.keys), stored_map(grown, self.values)

    def add(self, cache: KVCache) -> None:
        """Take in the row held by a single-row cache, as the batch's last row."""
        keys, values, _ = cache.stored()  # (1, H_kv, n, D), or packed with its head
        self._join(keys, values, cache.offset, cache.offset)

    def _join(self, keys: Stored, values: Stored, held: int, seen: int, head: int | None = None) -> None:
        """A row of `held` columns (temporal order) that has seen `seen` tokens, as the last row; packed,
        with at least `head` positions in full precision (default: as many as this cache keeps)."""
        if isinstance(keys, Packed):
            self._add_head(keys.head, values.head, min(seen, self.head_size) if head is None else head)
            keys, values = keys._replace(head=None), values._replace(head=None)
        if self.keys is None:
            self.keys, self.values, self.end, self.lengths = keys, values, held, [seen]
            return
        old_k, old_v = columns(self.keys, 0, self.end), columns(self.values, 0, self.end)
        if held > self.end:  # the newcomer is longer: pad the rows there are
            old_k, old_v = pad_left(old_k, held - self.end), pad_left(old_v, held - self.end)
            self.end = held
        keys, values = pad_left(keys, self.end - held), pad_left(values, self.end - held)
        self.keys, self.values = concatenate([old_k, keys], axis=0), concatenate([old_v, values], axis=0)
        self.lengths = self.lengths + [seen]

    def _add_head(self, keys: mx.array | None, values: mx.array | None, needed: int) -> None:
        """The row's full-precision head (its first `needed` positions at least), padded to head_size."""
        h = self.head_size
        if not h:
            return
        if keys is None or keys.shape[2] < needed:
            raise ValueError("internal: a row joins a quantized batch without its full-precision head")
        n = min(keys.shape[2], h)
        new = [mx.pad(x[..., :h, :], [(0, 0), (0, 0), (0, h - n), (0, 0)]) for x in (keys, values)]
        self.head = tuple(new) if self.head is None else tuple(
            mx.concatenate([old, x], axis=0) for old, x in zip(self.head, new))

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (indices, in this order)."""
        if not rows:
            self.keys = self.values = self.head = None
            self.end, self.lengths = 0, []
            return
        unused = self._unused(rows)  # leading columns no row uses any more
        self.lengths = [self.lengths[i] for i in rows]
        index = mx.array(rows)
        self.keys, self.values = (stored_map(lambda a: a[index, :, unused : self.end, :], x)
                                  for x in (self.keys, self.values))
        if self.head is not None:
            self.head = tuple(x[index] for x in self.head)
        self.end -= unused

    def _unused(self, rows: list[int]) -> int:
        return self.end - max(self.held(i) for i in rows)

    def held(self, i: int) -> int:
        """Columns row i holds: every token it has seen, in this cache."""
        return self.lengths[i]

    def storable(self, i: int) -> bool:
        """Whether row(i) is a whole prefix, for the prefix store: every token from the first."""
        return True

    def row(self, i: int) -> tuple[Stored, Stored]:
        """Row i's keys and values (1, H_kv, held(i), D), in temporal order (packed with its head)."""
        cols = self._row_columns(i)
        k, v = (stored_map(lambda a: a[i : i + 1, :, cols, :], x) for x in (self.keys, self.values))
        if self.head is not None:
            held = min(self.lengths[i], self.head_size)
            k, v = (x._replace(head=head[i : i + 1, :, :held, :]) for x, head in zip((k, v), self.head))
        return k, v

    def _row_columns(self, i: int) -> slice | mx.array:
        """The columns holding row i's tokens, in temporal order."""
        return slice(self.end - self.held(i), self.end)

    @property
    def nbytes(self) -> int:
        return nbytes(self.keys) + nbytes(self.values) + sum(x.nbytes for x in self.head or ())


class BatchRotatingKVCache(BatchKVCache):
    """A batch whose rows each keep their first keeps[i] tokens (the system prompt) and a window of their
    last max_size - keeps[i], as RotatingKVCache keeps one row: one max_size for all rows.

    Rows are right-aligned as in BatchKVCache, but once a row has rotated its columns no longer hold
    consecutive positions: `positions` (B, end), on the host, says which position each column holds (-1:
    none), and the masks follow it. When the buffers are full, each row's columns that no query will
    see again are dropped and the rest packed to the right (ready()), so a row never takes more than
    max_size + step columns. A query at position t sees keys p <= t with p < keep or t - p < window,
    exactly as the single-row cache's attention does.

    Without a window (max_size None) every row keeps all its tokens. Rows then take back their own
    number of latest tokens (`trim_rows`, what speculative decoding rejected): their columns are
    marked empty (-1) and masked out, and dropped when the buffers are next packed, so a step stays one
    slice update for the whole batch and a row's rollback copies nothing.
    """

    def __init__(self, max_size: int | None, quantization: KVQuantization | None = None) -> None:
        super().__init__(quantization)
        self.max_size = max_size
        self.keeps: list[int] = []
        self.positions = np.zeros((0, 0), np.int64)  # (B, end)

    def make_mask(self, n: int) -> Mask:
        """(B, 1, n, end + n) from the positions; quantized, (the head's, the packed part's)."""
        self.ready(n)
        queries = np.array(self.lengths)[:, None, None] + np.arange(n)[:, None]  # (B, n, 1)
        keys = np.concatenate([self.positions, queries[:, :, 0]], axis=1)[:, None, :]  # (B, 1, end + n)
        keep = np.array(self.keeps)[:, None, None]
        visible = (keys >= 0) & (keys <= queries) & ((keys < keep) | self._in_window(queries - keys, keep))
        if self.quantization is None:
            return mx.array(visible)[:, None]
        h = np.minimum(self.head_size, keep)  # a row's kept positions read from its head
        head = np.arange(self.head_size)[None, None]
        head_mask = mx.array((head < h) & (head <= queries))[:, None] if self.head_size else None
        return head_mask, mx.array(visible & (keys >= h))[:, None]

    def _in_window(self, distance: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Whether a key `distance` positions before a query is within the query's window."""
        if self.max_size is None:
            return np.ones(np.broadcast_shapes(distance.shape, keep.shape), bool)
        return distance < self.max_size - keep

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Stored, Stored]:
        n = keys.shape[2]
        self.ready(n)
        new = np.array(self.lengths)[:, None] + np.arange(n)
        fetched = super().update_and_fetch(keys, values)
        self.positions = np.concatenate([self.positions, new], axis=1)
        return fetched

    def ready(self, n: int) -> None:
        """Room for n more tokens: each row's columns still to be seen (kept, or within the window of
        its next query) packed to the right of new buffers with room for n more, by whole steps."""
        if not self.needs_room(n):
            return
        p, seen = self.positions, np.array(self.lengths)[:, None]
        keep = np.array(self.keeps)[:, None]
        needed = (p >= 0) & ((p < keep) | self._in_window(seen - p, keep))
        width = int(needed.sum(axis=1).max())
        capacity = -(-(width + n) // self.step) * self.step
        index, positions = np.zeros((len(p), width), np.int32), np.full((len(p), width), -1)
        for i, row in enumerate(needed):
            cols = np.flatnonzero(row)
            index[i, width - len(cols) :], positions[i, width - len(cols) :] = cols, p[i, cols]
        index = mx.array(index)[:, None, :, None]

        def packed(a: mx.array) -> mx.array:
            kept = mx.take_along_axis(a, mx.broadcast_to(index, (a.shape[0], a.shape[1], width, a.shape[3])), axis=2)
            return mx.concatenate([kept, mx.zeros((*a.shape[:2], capacity - width, a.shape[3]), a.dtype)], axis=2)

        self.keys, self.values = stored_map(packed, self.keys), stored_map(packed, self.values)
        self.positions, self.end = positions, width

    def add(self, cache: KVCache) -> None:
        """Take in the row held by a single-row cache, as the last row: a rotating one of this max_size,
        or (without a window) a plain one."""
        max_size = cache.max_size if isinstance(cache, RotatingKVCache) else None
        if max_size != self.max_size:
            raise ValueError(f"internal: a row of max_kv_size {max_size} joins a batch of {self.max_size}")
        keep = cache.keep if isinstance(cache, RotatingKVCache) else EVERY_TOKEN
        keys, values, positions = cache.stored()
        held, end = positions.size, self.end
        self._join(keys, values, held, cache.offset, min(cache.offset, self.head_size, keep))
        rows = np.full((len(self.lengths), self.end), -1)
        rows[:-1, self.end - end :] = self.positions
        rows[-1, self.end - held :] = np.array(positions)
        self.positions, self.keeps = rows, self.keeps + [keep]

    def trim_rows(self, counts: list[int]) -> None:
        """Row i forgets its latest counts[i] tokens (it takes the next ones from there)."""
        lengths = np.array(self.lengths) - np.array(counts)
        self.positions = np.where(self.positions >= lengths[:, None], -1, self.positions)
        self.lengths = lengths.tolist()

    def keep(self, rows: list[int]) -> None:
        end = self.end
        super().keep(rows)
        self.positions = self.positions[rows, end - self.end :] if rows else np.zeros((0, 0), np.int64)
        self.keeps = [self.keeps[i] for i in rows]

    def _unused(self, rows: list[int]) -> int:
        used = (self.positions[rows] >= 0).any(axis=0)
        return int(used.argmax()) if used.any() else self.end

    def held(self, i: int) -> int:
        """Columns row i holds: fewer than the tokens it has seen once it has rotated."""
        return int((self.positions[i] >= 0).sum())

    def _row_columns(self, i: int) -> slice | mx.array:
        """Its columns that hold a position: a speculative batch's row may have empty ones between them."""
        cols = np.flatnonzero(self.positions[i] >= 0)
        if cols.size and cols[-1] - cols[0] + 1 == cols.size and cols[-1] == self.end - 1:
            return slice(int(cols[0]), self.end)
        return mx.array(cols)

    def storable(self, i: int) -> bool:
        """Not once it has dropped a token, nor when its head holds less than it would alone (its
        kept prefix shorter than quantized_kv_start)."""
        return self.held(i) == self.lengths[i] and self.keeps[i] >= min(self.lengths[i], self.head_size)


EVERY_TOKEN = 2**62  # a row's `keep` when nothing rotates out


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
