"""MLX's affine quantization as plain steps: a group's grid (scale and bias), a weight's integer levels
on it, the levels packed as MLX packs them, and the weight they stand for.

A weight (rows, cols) is cut into groups of `group_size` columns; each row of a group has one scale and
one bias, w ~ scale * level + bias with level in 0 .. 2**bits - 1. The grid is mx.quantize's own (so a
group rounded here equals mx.quantize's result), taken in the output's dtype: the scales and biases are
stored in it, and the levels are chosen for the stored grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class Quantized:
    """One Linear's weight as the converter writes it: packed levels (rows, cols * bits / 32) uint32 and
    the scales and biases (rows, cols / group_size)."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int


def grid(w: mx.array, bits: int, group_size: int, dtype: mx.Dtype = mx.float32) -> tuple[mx.array, mx.array]:
    """(scales, biases) of w's groups, (rows, cols / group_size) in float32, as `dtype` stores them."""
    _, scales, biases = mx.quantize(w.astype(mx.float32), group_size, bits)
    return scales.astype(dtype).astype(mx.float32), biases.astype(dtype).astype(mx.float32)


def levels(w: mx.array, scales: mx.array, biases: mx.array, bits: int) -> mx.array:
    """The nearest level of each weight on its group's grid; w (rows, cols), scales and biases
    (rows, groups)."""
    group_size = w.shape[-1] // scales.shape[-1]
    s, b = (mx.repeat(x, group_size, axis=-1) for x in (scales, biases))
    return mx.clip(mx.round((w - b) / s), 0, 2**bits - 1)


def rounded(w: mx.array, bits: int, group_size: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """w rounded to its nearest grid points (the weight a plain `convert -q` stores), in float32."""
    scales, biases = grid(w, bits, group_size, dtype)
    return dequantized(levels(w, scales, biases, bits), scales, biases)


def dequantized(q: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    group_size = q.shape[-1] // scales.shape[-1]
    return q * mx.repeat(scales, group_size, axis=-1) + mx.repeat(biases, group_size, axis=-1)


def pack(q: mx.array, bits: int) -> mx.array:
    """Levels (rows, cols) packed as MLX packs them: one little-endian bit stream per row, `bits` bits a
    level, cut into uint32 words (so 3-, 5- and 6-bit levels cross words)."""
    q = np.asarray(q, dtype=np.uint64)
    rows, cols = q.shape
    stream = np.zeros((rows, cols * bits), np.uint8)  # bit k of level j at j * bits + k
    for k in range(bits):
        stream[:, k::bits] = (q >> np.uint64(k)) & np.uint64(1)
    words = stream.reshape(rows, -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
    return mx.array(words.sum(-1).astype(np.uint32))


def quantized(q: mx.array, scales: mx.array, biases: mx.array, bits: int) -> Quantized:
    return Quantized(pack(q, bits), scales, biases, bits, q.shape[-1] // scales.shape[-1])
