"""LoRA and DoRA layers: module swaps built from a base linear layer (`from_base`), plain or quantized
(QLoRA: the base stays packed and frozen), and folded back into one layer (`fuse`).

Parameter names and shapes are mlx-lm's (lora_a (in, r), lora_b (r, out), DoRA's magnitude m (out,)),
so adapter files pass between the two unchanged.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

# A fused quantized layer keeps float weights unless quantizing it again errs by at most this share of
# the adapter's delta (mlx-lm #1172: a delta near or under the quantization step is rounded away).
KEPT_DELTA = 0.9


def input_dims(linear: nn.Module) -> int:
    """The input features of a plain or quantized linear layer (packed weights hold 32 / bits per word)."""
    cols = linear.weight.shape[1]
    return cols * 32 // linear.bits if isinstance(linear, nn.QuantizedLinear) else cols


def dequantized(linear: nn.Module) -> mx.array:
    """The weight (out, in) of a linear layer, dequantized when packed."""
    if not isinstance(linear, nn.QuantizedLinear):
        return linear.weight
    return mx.dequantize(linear.weight, linear.scales, linear.get("biases"), group_size=linear.group_size,
                         bits=linear.bits, mode=linear.mode)


def _initial_a(linear: nn.Module, rank: int) -> mx.array:
    # mlx-lm builds a throwaway nn.Linear before drawing A: one draw of the global key skipped here (its
    # values, lazily never computed), so the same seed gives the same A as mlx_lm.lora.
    mx.random.uniform(shape=(1,))
    bound = 1 / math.sqrt(input_dims(linear))
    return mx.random.uniform(low=-bound, high=bound, shape=(input_dims(linear), rank))


class LoRALinear(nn.Module):
    """y = linear(x) + scale * (dropout(x) @ lora_a) @ lora_b."""

    @classmethod
    def from_base(cls, linear: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0) -> LoRALinear:
        """An adapter around `linear` (frozen as given): A drawn as mlx-lm draws it, B zero, so it starts
        as the base layer."""
        out = linear.weight.shape[0]
        return cls(linear, _initial_a(linear, rank), mx.zeros((rank, out)), scale, dropout)

    def __init__(self, linear: nn.Module, lora_a: mx.array, lora_b: mx.array, scale: float, dropout: float) -> None:
        super().__init__()
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.lora_a, self.lora_b = lora_a, lora_b

    def delta(self) -> mx.array:
        """The adapter's change to the weight, (out, in)."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def __call__(self, x: mx.array) -> mx.array:
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return self.linear(x) + (self.scale * z).astype(x.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """One layer with the delta added to the weight; a quantized base is quantized again as it was,
        unless dequantize, or unless that would round the delta away (then it stays float: loses_delta)."""
        weight = dequantized(self.linear)
        return _fused(self.linear, weight + self.delta().astype(weight.dtype), dequantize)


class DoRALinear(nn.Module):
    """y = m / ||W + scale B^T A^T||_row * (x W^T + scale (dropout(x) A) B) + bias, the norm held
    constant in the gradient (as DoRA's paper, PEFT and mlx-lm)."""

    @classmethod
    def from_base(cls, linear: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0) -> DoRALinear:
        """An adapter around `linear`: A and B as LoRA's, m the rows' norms, so it starts as the base."""
        out = linear.weight.shape[0]
        lora_a = _initial_a(linear, rank)
        m = mx.linalg.norm(dequantized(linear).astype(mx.float32), axis=1)
        return cls(linear, lora_a, mx.zeros((rank, out)), m, scale, dropout)

    def __init__(self, linear: nn.Module, lora_a: mx.array, lora_b: mx.array, m: mx.array, scale: float,
                 dropout: float) -> None:
        super().__init__()
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.lora_a, self.lora_b, self.m = lora_a, lora_b, m

    def delta(self) -> mx.array:
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def __call__(self, x: mx.array) -> mx.array:
        w = dequantized(self.linear)  # a quantized base: one layer's float weight at a time
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        out = x @ w.T + (self.scale * z).astype(x.dtype)
        norm = mx.stop_gradient(mx.linalg.norm(w + self.delta().astype(w.dtype), axis=1))
        out = (self.m / norm).astype(x.dtype) * out
        return out + self.linear.bias if "bias" in self.linear else out

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = dequantized(self.linear)
        adapted = weight + self.delta().astype(weight.dtype)
        adapted = (self.m / mx.linalg.norm(adapted, axis=1))[:, None].astype(weight.dtype) * adapted
        return _fused(self.linear, adapted, dequantize)


ADAPTERS = (LoRALinear, DoRALinear)


def _fused(base: nn.Module, weight: mx.array, dequantize: bool) -> nn.Module:
    out, cols = weight.shape
    fused = nn.Linear(cols, out, bias="bias" in base)
    fused.weight = weight
    if "bias" in base:
        fused.bias = base.bias
    if not isinstance(base, nn.QuantizedLinear) or dequantize:
        return fused
    packed = nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, mode=base.mode)
    return fused if loses_delta(base, packed, weight) else packed


def loses_delta(base: nn.Module, packed: nn.Module, weight: mx.array) -> bool:
    """Whether re-quantizing the fused weight keeps less than KEPT_DELTA of the change from the base."""
    wanted = weight - dequantized(base)
    kept = dequantized(packed) - dequantized(base)
    size = mx.linalg.norm(wanted.astype(mx.float32))
    error = mx.linalg.norm((kept - wanted).astype(mx.float32))
    return size.item() > 0 and error.item() > (1 - KEPT_DELTA) * size.item()
