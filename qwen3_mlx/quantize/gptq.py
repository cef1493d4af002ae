"""GPTQ (Frantar et al. 2022; IST-DASLab gptq/gptq.py): each Linear's weight quantized column by column,
every column's rounding error spread over the columns not yet quantized, weighted by the inverse Hessian
of the Linear's inputs (H = X^T X), so the output X W^T moves as little as it can.

The pass is sequential: a layer's Linears are quantized in the order their inputs arise (q/k/v, o,
gate/up, down), each on inputs computed with the Linears before it already quantized, and the next layer
sees this layer's quantized output; the error is fed forward. Columns go in their natural order (no
act-order: the groups' grids then stay contiguous, as the MLX format needs). A group's grid is taken from
its columns as updated when the group is reached, as mlx-lm's gptq does.
"""

from __future__ import annotations

from typing import Callable, Mapping

import mlx.core as mx
import numpy as np

from ..model.model import Model
from .capture import STEPS, embedded, fits, layer_inputs, run_layer, submodule
from .rounding import Quantized, dequantized, grid, quantized

Progress = Callable[[int, int], None]  # (layers done, layers in all)


def hessian(x: mx.array) -> np.ndarray:
    """X^T X / tokens of the inputs x (..., in), in float64."""
    x = np.asarray(x.reshape(-1, x.shape[-1]).astype(mx.float32), dtype=np.float64)
    return x.T @ x / max(1, x.shape[0])


def inverse_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """U, upper triangular, with U^T U = (H + damp * mean(diag H) * I)^-1. Row k of U, divided by U[k, k],
    is the update that quantizing column k makes to the columns after it, once the columns before k are
    fixed (the Cholesky form of the OBS update: no inverse recomputed per column)."""
    h = h.copy()
    dead = np.diag(h) == 0  # an input that is always zero: its column cannot matter
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T


def gptq_weight(w: mx.array, h: np.ndarray, bits: int, group_size: int, dtype: mx.Dtype = mx.float32,
                damp: float = 0.01) -> tuple[mx.array, mx.array, mx.array]:
    """A weight (rows, cols) quantized by GPTQ against the inputs' Hessian h (cols, cols): its levels
    (rows, cols), scales and biases (rows, cols / group_size), the grid as `dtype` stores it."""
    u = inverse_factor(h, damp).astype(np.float32)
    w = np.array(w.astype(mx.float32))
    w[:, np.diag(h) == 0] = 0.0
    q = np.zeros_like(w)
    all_scales, all_biases = [], []
    for i in range(0, w.shape[1], group_size):
        j = i + group_size
        scales, biases = (np.array(a) for a in grid(mx.array(w[:, i:j]), bits, group_size, dtype))
        all_scales.append(scales)
        all_biases.append(biases)
        s, b = scales[:, 0], biases[:, 0]
        err = np.zeros((w.shape[0], group_size), np.float32)
        for k in range(i, j):
            q[:, k] = np.clip(np.round((w[:, k] - b) / s), 0, 2**bits - 1)
            err[:, k - i] = (w[:, k] - (q[:, k] * s + b)) / u[k, k]
            w[:, k:j] -= np.outer(err[:, k - i], u[k, k:j])
        w[:, j:] -= err @ u[i:j, j:]  # the group's errors reach the later groups at once
    return mx.array(q), mx.array(np.concatenate(all_scales, 1)), mx.array(np.concatenate(all_biases, 1))


def gptq(model: Model, samples: mx.array, bits: int, group_size: int, dtype: mx.Dtype = mx.float32,
         module_bits: Mapping[str, int] | None = None, damp: float = 0.01, batch: int = 8,
         progress: Progress | None = None) -> dict[str, Quantized]:
    """Every decoder layer's Linears quantized by GPTQ on the calibration samples (N, L).

    Returns the quantized weights by module name ("model.layers.0.self_attn.q_proj"); `module_bits`
    gives a module other bits than `bits`. The model's Linears are left holding the weights those stand
    for, so it computes as the quantized model does.
    """
    module_bits = module_bits or {}
    x = embedded(model, samples)
    out: dict[str, Quantized] = {}
    for n, layer in enumerate(model.layers):
        for names in STEPS:
            names = [name for name in names if fits(submodule(layer, name), group_size)]
            if not names:
                continue
            h = hessian(layer_inputs(layer, x, names[:1], batch)[names[0]])
            for name in names:
                linear, module = submodule(layer, name), f"model.layers.{n}.{name}"
                b = module_bits.get(module, bits)
                q, scales, biases = gptq_weight(linear.weight, h, b, group_size, dtype, damp)
                linear.weight = dequantized(q, scales, biases).astype(linear.weight.dtype)
                out[module] = quantized(q, scales, biases, b)
        x = run_layer(layer, x, batch)
        if progress is not None:
            progress(n + 1, len(model.layers))
    return out
