"""AWQ (Lin et al. 2023; mit-han-lab llm-awq auto_scale.py and auto_clip.py): the input channels that
carry large activations are scaled up in the weights before rounding (and the scale divided out of the
operation before them, so the float model is unchanged), then each group's range is clipped.

Per decoder layer, on the float model's activations:
- scales, searched for the Linears that share an input: q/k/v after input_layernorm (measured on the
  attention's output), gate/up after post_attention_layernorm (on the MLP's output), down after up_proj
  (on down's output), and o after v_proj when they have the same width (no grouped KV heads). For a
  ratio r in 0, 1/n_grid, ..: s = mean|x|^r per input channel, normalized by sqrt(max s * min s); the
  weights become round(W s) / s; the ratio whose block output is nearest the float one wins.
- clipping, for every Linear but q and k (whose errors the softmax magnifies): each group's range
  shrunk to p * max|w| for p in 1, 1 - 1/n_grid, .. 0.5, the p that keeps the group's share of the
  output nearest wins, group by group.
If the layer's output is then further from the float one than plain rounding's, the layer is left as it
was. The result is float weights: the converter rounds them as it rounds any.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..model.model import DecoderLayer, Model
from .capture import LINEARS, embedded, fits, layer_inputs, run_layer, submodule
from .rounding import rounded

Progress = Callable[[int, int], None]
Block = Callable[[mx.array], mx.array]


def scale_candidates(x: mx.array, n_grid: int) -> list[mx.array]:
    """The scales tried for inputs x (..., in): mean|x|^r for r = i / n_grid, normalized."""
    mean = mx.abs(x.reshape(-1, x.shape[-1]).astype(mx.float32)).mean(axis=0)
    out = []
    for i in range(n_grid):
        s = mx.maximum(mean ** (i / n_grid), 1e-4)
        out.append(s / mx.sqrt(s.max() * s.min()))
    return out


def search_scale(block: Block, linears: Sequence[nn.Linear], x: mx.array, bits: Sequence[int], group_size: int,
                 dtype: mx.Dtype, n_grid: int = 20) -> tuple[mx.array, list[float]]:
    """The scale (in,) whose rounded weights keep block(x) nearest its float output, and each
    candidate's error (mean squared difference of the outputs)."""
    reference = block(x)
    originals = [linear.weight for linear in linears]
    errors, candidates = [], scale_candidates(x, n_grid)
    for s in candidates:
        for linear, w, b in zip(linears, originals, bits):
            linear.weight = rounded(w * s, b, group_size, dtype) / s
        errors.append(mx.mean((block(x) - reference) ** 2).item())
    for linear, w in zip(linears, originals):
        linear.weight = w
    return candidates[min(range(len(errors)), key=errors.__getitem__)], errors


def search_clip(w: mx.array, x: mx.array, bits: int, group_size: int, dtype: mx.Dtype, n_grid: int = 20,
                max_shrink: float = 0.5, tokens: int = 512, rows: int = 256) -> mx.array:
    """w (out, in) with each group clipped to the range that keeps x_g . w_g (the group's share of each
    output, over up to `tokens` of the inputs x) nearest its float value."""
    x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    x = x[:: max(1, -(-x.shape[0] // tokens))].reshape(-1, x.shape[-1] // group_size, group_size)  # (T, G, g)
    clipped = []
    for start in range(0, w.shape[0], rows):
        block = w[start:start + rows].astype(mx.float32).reshape(-1, x.shape[1], group_size)  # (o, G, g)
        reference = mx.einsum("tdg,odg->tod", x, block)
        top = mx.abs(block).max(axis=-1, keepdims=True)
        best, best_error = top, mx.full(top.shape[:2], mx.inf)
        for i in range(int(max_shrink * n_grid)):
            limit = top * (1 - i / n_grid)
            q = rounded(mx.clip(block, -limit, limit).reshape(block.shape[0], -1), bits, group_size, dtype)
            error = ((mx.einsum("tdg,odg->tod", x, q.reshape(block.shape)) - reference) ** 2).mean(axis=0)
            better = error < best_error
            best, best_error = mx.where(better[..., None], limit, best), mx.where(better, error, best_error)
            mx.eval(best, best_error)
        clipped.append(mx.clip(block, -best, best).reshape(block.shape[0], -1))
    return mx.concatenate(clipped, axis=0).astype(w.dtype)


def awq_layer(layer: DecoderLayer, x: mx.array, bits: Mapping[str, int], group_size: int, dtype: mx.Dtype,
              n_grid: int, batch: int) -> None:
    """Scale and clip one layer's weights in place, searched on its input x (N, L, hidden)."""
    inputs = layer_inputs(layer, x, LINEARS, batch)
    attn, mlp = layer.self_attn, layer.mlp
    groups = [(layer.input_layernorm, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               lambda h: attn(h, "causal", None)),
              (layer.post_attention_layernorm, ("mlp.gate_proj", "mlp.up_proj"), mlp),
              (mlp.up_proj, ("mlp.down_proj",), mlp.down_proj)]
    if attn.v_proj.weight.shape[0] == attn.o_proj.weight.shape[1]:
        groups.append((attn.v_proj, ("self_attn.o_proj",), attn.o_proj))
    for before, names, block in groups:
        linears = [submodule(layer, name) for name in names]
        if not all(fits(linear, group_size) for linear in linears):
            continue  # left in float by the converter: nothing to protect
        s, _ = search_scale(block, linears, inputs[names[0]], [bits[n] for n in names], group_size, dtype, n_grid)
        if isinstance(before, nn.RMSNorm):
            before.weight = before.weight / s
        else:  # the Linear before: its output channels are the next one's input channels
            before.weight = before.weight / s[:, None]
        for linear, name in zip(linears, names):
            linear.weight = linear.weight * s
            inputs[name] = inputs[name] / s
    for name in LINEARS:
        if name not in ("self_attn.q_proj", "self_attn.k_proj") and fits(submodule(layer, name), group_size):
            linear = submodule(layer, name)
            linear.weight = search_clip(linear.weight, inputs[name], bits[name], group_size, dtype, n_grid)


def awq(model: Model, samples: mx.array, bits: int, group_size: int, dtype: mx.Dtype = mx.float32,
        module_bits: Mapping[str, int] | None = None, n_grid: int = 20, batch: int = 8,
        progress: Progress | None = None) -> dict[str, mx.array]:
    """Every decoder layer scaled and clipped by AWQ on the calibration samples (N, L), in place.

    Returns the layers' parameters by name (float: the converter rounds them); `module_bits` gives a
    module other bits than `bits`.
    """
    module_bits = module_bits or {}
    x = embedded(model, samples)
    for n, layer in enumerate(model.layers):
        layer_bits = {name: module_bits.get(f"model.layers.{n}.{name}", bits) for name in LINEARS}
        reference = run_layer(layer, x, batch)
        original = layer.parameters()
        plain = rounded_error(layer, x, reference, layer_bits, group_size, dtype, batch)
        awq_layer(layer, x, layer_bits, group_size, dtype, n_grid, batch)
        if rounded_error(layer, x, reference, layer_bits, group_size, dtype, batch) > plain:
            layer.update(original)  # rounding alone did better on this layer
        x = reference
        if progress is not None:
            progress(n + 1, len(model.layers))
    return {f"model.layers.{n}.{name}": p for n, layer in enumerate(model.layers)
            for name, p in tree_flatten(layer.parameters())}


def rounded_error(layer: DecoderLayer, x: mx.array, reference: mx.array, bits: Mapping[str, int], group_size: int,
                  dtype: mx.Dtype, batch: int) -> float:
    """The mean squared difference from `reference` of the layer's output with its Linears rounded."""
    weights = {name: submodule(layer, name).weight for name in LINEARS if fits(submodule(layer, name), group_size)}
    for name, w in weights.items():
        submodule(layer, name).weight = rounded(w, bits[name], group_size, dtype).astype(w.dtype)
    error = mx.mean((run_layer(layer, x, batch) - reference) ** 2).item()
    for name, w in weights.items():
        submodule(layer, name).weight = w
    return error
