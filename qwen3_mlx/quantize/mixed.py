"""Bits per Linear chosen by measured sensitivity, for a target size in bits per weight.

Sensitivity, as mlx-lm's dynamic_quant measures it: with every Linear rounded to the low width, the
gradient g of KL(float model || quantized model) on the calibration samples, and for each Linear the
first-order drop in KL were it at the high width instead, g . (W_low - W_high). Linears are raised to the
high width in order of that drop per extra byte until the next would pass the target. The size is
counted as the converter counts it: packed weights, a scale and a bias per group in the output's dtype,
the embedding (and an untied head) at their own bits, everything else in the dtype, over all parameters.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import OptionError
from ..model.model import Model
from .capture import LINEARS, fits, kl_divergence, logits, submodule
from .rounding import rounded

EMBEDDINGS = ("model.embed_tokens", "lm_head")


def linears(model: Model, group_size: int) -> dict[str, nn.Linear]:
    """The decoder layers' Linears the converter quantizes, by module name."""
    return {f"model.layers.{n}.{name}": submodule(layer, name) for n, layer in enumerate(model.layers)
            for name in LINEARS if fits(submodule(layer, name), group_size)}


def sensitivities(model: Model, samples: mx.array, low: int, high: int, group_size: int,
                  dtype: mx.Dtype = mx.float32, batch: int = 4,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Each Linear's first-order drop in KL to the float model were it at `high` bits instead of `low`,
    with all others at `low`."""
    modules = linears(model, group_size)
    floats = {name: linear.weight for name, linear in modules.items()}
    for name, linear in modules.items():
        linear.weight = rounded(floats[name], low, group_size, dtype)
    model.freeze()
    for linear in modules.values():
        linear.unfreeze(keys=["weight"])

    def loss(reference: mx.array, inputs: mx.array) -> mx.array:
        return kl_divergence(reference, model(inputs).astype(mx.float32)).mean()

    grads: dict[str, mx.array] = {}
    try:
        for start in range(0, samples.shape[0], batch):
            chunk = samples[start:start + batch]
            with_float = {name: linear.weight for name, linear in modules.items()}
            for name, linear in modules.items():
                linear.weight = floats[name]
            reference = logits(model, chunk, batch)
            for name, linear in modules.items():
                linear.weight = with_float[name]
            _, g = nn.value_and_grad(model, loss)(reference, chunk)
            for path, value in tree_flatten(g):
                grads[path] = grads.get(path, 0) + value
            mx.eval(grads)
            if progress is not None:
                progress(min(start + batch, samples.shape[0]), samples.shape[0])
    finally:
        for name, linear in modules.items():
            linear.weight = floats[name]
        model.unfreeze()
    return {name: (grads[f"{name}.weight"] * (rounded(floats[name], low, group_size, dtype)
                                              - rounded(floats[name], high, group_size, dtype))).sum().item()
            for name in modules}


def quantized_bytes(rows: int, cols: int, bits: int, group_size: int, dtype: mx.Dtype) -> int:
    return rows * cols * bits // 8 + 2 * rows * (cols // group_size) * dtype.size


def model_bytes(model: Model, module_bits: dict[str, int], bits: int, embed_bits: int, group_size: int,
                dtype: mx.Dtype) -> tuple[int, int]:
    """(bytes, parameters) of the model as the converter would write it."""
    total, params = 0, 0
    for path, p in tree_flatten(model.parameters()):
        module, leaf = path.rsplit(".", 1)
        params += p.size
        if leaf == "weight" and p.ndim == 2 and p.shape[1] % group_size == 0:
            b = embed_bits if module in EMBEDDINGS else module_bits.get(module, bits)
            total += quantized_bytes(*p.shape, b, group_size, dtype)
        else:
            total += p.size * dtype.size
    return total, params


def choose_bits(model: Model, sensitivity: dict[str, float], target_bpw: float, low: int, high: int,
                embed_bits: int, group_size: int, dtype: mx.Dtype) -> dict[str, int]:
    """The modules raised to `high` bits (the rest stay at `low`): most KL saved per extra byte first,
    while the model stays within `target_bpw`.

    Raises:
        OptionError: the target lies outside [all low, all high]'s bits per weight.
    """
    modules = linears(model, group_size)
    size, params = model_bytes(model, {}, low, embed_bits, group_size, dtype)
    top, _ = model_bytes(model, {}, high, embed_bits, group_size, dtype)
    if not size * 8 / params <= target_bpw <= top * 8 / params:
        raise OptionError(f"--target-bpw {target_bpw} is outside {size * 8 / params:.3f} .. {top * 8 / params:.3f}, "
                          f"the sizes of all Linears at {low} and at {high} bits; give a target between them")
    extra = {name: quantized_bytes(*m.weight.shape, high, group_size, dtype)
             - quantized_bytes(*m.weight.shape, low, group_size, dtype) for name, m in modules.items()}
    chosen = {}
    for name in sorted(modules, key=lambda n: -sensitivity[n] / extra[n]):
        if (size + extra[name]) * 8 / params > target_bpw:
            continue  # a smaller module may still fit
        size += extra[name]
        chosen[name] = high
    return chosen
