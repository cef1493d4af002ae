"""Keys and values stored in 8 or 4 bits, and attention over them.

A quantized cache (cache.py, given a KVQuantization) stores each new token's keys and values with
mx.quantize along the head dimension: per (row, KV head, position), D / group_size groups of
`bits`-bit integers with a scale and a bias each (mlx-lm's QuantizedKVCache layout). In bf16 that is
0.53x the bytes at 8 bits and 0.28x at 4 bits (group size 64). The first `start` positions are also
kept in full precision (Packed.head), and attention reads them from there: attention sinks and the
start of a system prompt, which many queries weigh heavily, keep their exact values. (mlx-lm's
--quantized-kv-start is another thing: its whole cache stays in full precision until it holds that
many tokens, then all of it is quantized.)

Attention (quantized_attention) over a quantized cache, two ways:
- up to FEW_QUERIES queries (a decode step): the packed keys and values read as they are, through
  mx.quantized_matmul; the scores, (H, L, S), are small;
- a prompt chunk: this layer's keys and values dequantized once and mx.fast's attention run over
  them in blocks of queries whose scores take at most SCORES_BYTES, each block evaluated before the
  next is built, so that neither the (L, S) score matrix nor every layer's dequantized copy is ever
  whole in memory. Measured on the CPU (benchmarks/kv_bench.py attention), quantized matmuls in bf16
  run 6x slower than this there, and on a GPU mx.fast's attention is a fused kernel.
MLX has no fused quantized attention kernel yet; mlx-lm materialises the whole (L, S) score matrix
of a chunk, which at a 16k context makes its 4-bit cache's peak higher than bf16's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import mlx.core as mx

from ..errors import OptionError

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)  # what mx.quantize takes
FEW_QUERIES = 16  # up to this many queries (a decode step, a speculative check) read the packed cache itself
SCORES_BYTES = 1 << 24  # a longer chunk's attention goes in blocks of queries whose scores take at most this


@dataclass(frozen=True)
class KVQuantization:
    """How a cache stores keys and values: `bits` per element in groups of `group_size` along the head
    dimension, the first `start` positions also kept in full precision."""

    bits: int = 8
    group_size: int = 64
    start: int = 0

    def __str__(self) -> str:
        return f"kv_bits={self.bits}, kv_group_size={self.group_size}, quantized_kv_start={self.start}"

    @staticmethod
    def describe(quantization: KVQuantization | None) -> str:
        """How messages name a cache's kind."""
        return "the model's dtype (no kv_bits)" if quantization is None else str(quantization)

    def pack(self, x: mx.array) -> Packed:
        """x (B, H, L, D) quantized along D."""
        return Packed(*mx.quantize(x, self.group_size, self.bits))

    def check(self, head_dim: int) -> None:
        """Raises OptionError when the model's heads cannot be split in groups of group_size."""
        if head_dim % self.group_size:
            raise OptionError(f"kv_group_size={self.group_size} does not divide the model's head_dim={head_dim}; "
                             f"choose one of {', '.join(str(g) for g in KV_GROUP_SIZES if head_dim % g == 0) or 'none'}")

    def bytes_per_token(self, full: int, dtype_size: int) -> float:
        """Bytes a token takes in the packed cache, when it takes `full` bytes in the model's dtype (the
        full-precision head apart): bits / 8 per element, and a scale and a bias per group."""
        per_element = self.bits / 8 + 2 * dtype_size / self.group_size
        return full * per_element / dtype_size


class Packed(NamedTuple):
    """A quantized tensor whose axis 2 is time, as mx.quantize makes it, and a full-precision copy of
    its first positions (None without one). In a cache of one row, or in a row's stored form, head
    column p is position p; in a batch, head[i, :, p] is row i's position p."""

    data: mx.array  # (B, H, S, D * bits / 32) uint32
    scales: mx.array  # (B, H, S, D / group_size)
    biases: mx.array  # (B, H, S, D / group_size)
    head: mx.array | None = None  # (B, H, h, D)

    def map(self, fn: Callable[..., mx.array], *others: Packed) -> Packed:
        """fn applied to data, scales and biases (with the same part of each of `others`); the head kept."""
        return Packed(*(fn(*parts) for parts in zip(self[:3], *(o[:3] for o in others))), self.head)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self if a is not None)


Stored = mx.array | Packed  # what a cache holds: keys or values in the model's dtype, or packed


def stored_map(fn: Callable[..., mx.array], x: Stored, *others: Stored) -> Stored:
    """fn over an array, or over each part of a Packed (its head kept)."""
    return x.map(fn, *others) if isinstance(x, Packed) else fn(x, *others)


def write(dst: Stored, src: Stored, start: int) -> None:
    """Write src's columns into dst's from `start` on (axis 2), in place."""
    for d, s in zip(dst[:3] if isinstance(dst, Packed) else (dst,), src[:3] if isinstance(src, Packed) else (src,)):
        d[..., start : start + s.shape[2], :] = s


def length(x: Stored) -> int:
    """Positions along axis 2 (time)."""
    return (x.data if isinstance(x, Packed) else x).shape[2]


def columns(x: Stored, start: int, stop: int | None = None) -> Stored:
    """Positions [start, stop) along axis 2 (the head kept)."""
    return stored_map(lambda a: a[..., start:stop, :], x)


def concatenate(xs: list[Stored], axis: int = 2) -> Stored:
    return stored_map(lambda *parts: mx.concatenate(parts, axis=axis), *xs)


def pad_left(x: Stored, n: int) -> Stored:
    """x (B, H, S, D) with n zero columns in front."""
    if n == 0:
        return x
    return stored_map(lambda a: mx.concatenate([mx.zeros((*a.shape[:2], n, a.shape[3]), a.dtype), a], axis=2), x)


def prefix(x: Stored, n: int) -> Stored:
    """The first n positions of a row's stored form (time in order), its head included."""
    if not isinstance(x, Packed):
        return x[..., :n, :]
    head = x.head[..., :n, :] if x.head is not None else None
    return x.map(lambda a: a[..., :n, :])._replace(head=head)


def nbytes(x: Stored | None) -> int:
    return 0 if x is None else x.nbytes


# ---------------------------------------------------------------- attention


def quantized_attention(q: mx.array, keys: Packed, values: Packed, scale: float,
                        mask: tuple[mx.array | None, mx.array | None], dtype: mx.Dtype | None = None) -> mx.array:
    """Queries q (B, H, L, D) over packed keys and values (B, H_kv, S, ...) and their full-precision
    heads; `mask` is (the head's, the packed part's), each None (all visible) or a bool array
    (L, S) or (B, 1, L, S). `dtype`: what the products are computed in (default the queries'; the
    CPU's attention, fast.CPUAttention, asks for float32, in which MLX's CPU quantized matmuls run
    7x faster than in bf16). Returns (B, H, L, D) in the queries' dtype."""
    compute = dtype or q.dtype
    if compute != q.dtype:
        keys, values = (_as(x, compute) for x in (keys, values))
    read = _read_packed if q.shape[2] <= FEW_QUERIES else _read_dequantized
    return read(q.astype(compute), keys, values, scale, mask).astype(q.dtype)


def _read_packed(q: mx.array, keys: Packed, values: Packed, scale: float,
                 mask: tuple[mx.array | None, mx.array | None]) -> mx.array:
    """A few queries (a decode step) read the packed keys and values as they are, through
    mx.quantized_matmul: the cache's bytes are read once, and nothing is dequantized."""
    B, H, L, D = q.shape
    H_kv = keys.data.shape[1]
    bits, group_size = _format(keys, D)
    head_mask, body_mask = (_grouped(m) for m in mask)
    q = (q * scale).reshape(B, H_kv, H // H_kv, L, D)

    def matmul(x: mx.array, w: Packed, transpose: bool) -> mx.array:
        return mx.quantized_matmul(x, *(a[:, :, None] for a in w[:3]), transpose=transpose,
                                   group_size=group_size, bits=bits)

    scores = [_masked(matmul(q, keys, True), body_mask)]  # (B, H_kv, G, L, S_packed)
    if keys.head is not None:
        scores.insert(0, _masked(q @ keys.head[:, :, None].swapaxes(-1, -2), head_mask))
    weights = mx.softmax(mx.concatenate(scores, axis=-1).astype(mx.float32), axis=-1).astype(q.dtype)
    if keys.head is None:
        out = matmul(weights, values, False)
    else:
        h = keys.head.shape[2]
        out = weights[..., :h] @ values.head[:, :, None] + matmul(weights[..., h:], values, False)
    return out.reshape(B, H, L, D)


def _read_dequantized(q: mx.array, keys: Packed, values: Packed, scale: float,
                      mask: tuple[mx.array | None, mx.array | None]) -> mx.array:
    """A prompt chunk: this layer's keys and values dequantized once, into the queries' dtype, and
    mx.fast's attention over them (a fused kernel on a GPU) in blocks of queries whose scores take at
    most SCORES_BYTES. Each block is evaluated before the next is built: MLX allocates a buffer when
    it schedules an operation, not when it runs it, so lazily they would all be in memory at once
    (and the dequantized copy is freed before the next layer makes its own)."""
    B, H, L, D = q.shape
    k, v = (_dequantized(x, D, q.dtype) for x in (keys, values))
    full = _joined(*mask, 0 if keys.head is None else keys.head.shape[2], keys.data.shape[2])
    rows = max(1, SCORES_BYTES // (B * H * k.shape[2] * 4))
    outs = []
    for a in range(0, L, rows):
        outs.append(mx.fast.scaled_dot_product_attention(q[..., a : a + rows, :], k, v, scale=scale,
                                                         mask=_rows(full, a, rows)))
        if rows < L:
            mx.eval(outs[-1])
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def _as(x: Packed, dtype: mx.Dtype) -> Packed:
    """x's scales, biases and head in `dtype` (the packed words as they are)."""
    head = None if x.head is None else x.head.astype(dtype)
    return Packed(x.data, x.scales.astype(dtype), x.biases.astype(dtype), head)


def _format(x: Packed, D: int) -> tuple[int, int]:
    """(bits, group_size) of x, whose elements are D wide."""
    return x.data.shape[-1] * 32 // D, D // x.scales.shape[-1]


def _dequantized(x: Packed, D: int, dtype: mx.Dtype) -> mx.array:
    """x's head and packed part as one (B, H, S, D) array of `dtype`."""
    bits, group_size = _format(x, D)
    body = mx.dequantize(*x[:3], group_size=group_size, bits=bits).astype(dtype)
    return body if x.head is None else mx.concatenate([x.head.astype(dtype), body], axis=2)


def _joined(head: mx.array | None, body: mx.array | None, h: int, S: int) -> mx.array | None:
    """One mask over [head columns, packed columns]: a part left None is all visible."""
    if head is None and body is None or not h:
        return body
    shape = (body if body is not None else head).shape[:-1]
    if head is not None and body is not None:
        shape = mx.broadcast_shapes(head.shape[:-1], body.shape[:-1])
    head = mx.ones((*shape, h), mx.bool_) if head is None else mx.broadcast_to(head, (*shape, h))
    body = mx.ones((*shape, S), mx.bool_) if body is None else mx.broadcast_to(body, (*shape, S))
    return mx.concatenate([head, body], axis=-1)


def _grouped(mask: mx.array | None) -> mx.array | None:
    """A (B, 1, L, S) mask made (B, 1, 1, L, S), to broadcast over the query groups of a KV head."""
    return mask[:, :, None] if mask is not None and mask.ndim == 4 else mask


def _rows(mask: mx.array | None, start: int, n: int) -> mx.array | None:
    """The mask of queries [start, start + n) (one that has a single row applies to all)."""
    return mask if mask is None or mask.shape[-2] == 1 else mask[..., start : start + n, :]


def _masked(scores: mx.array, mask: mx.array | None) -> mx.array:
    return scores if mask is None else mx.where(mask, scores, -mx.inf)
