"""DWQ, distilled weight quantization (as mlx-lm's mlx_lm/quant/dwq.py): the quantized model's scales and
biases trained so that its output distribution matches the float model's, KL(float || quantized) on the
calibration samples, while the packed levels stay as rounding (or GPTQ) chose them.

The student is the model as the converter writes it: each Linear whose input width is a whole number of
groups quantized at its bits, the embedding (and an untied head) at the embedding's bits, every tensor
in the output's dtype; the modules left untrained hold the weights their levels stand for, as float. The grids of the modules below 8 bits are trained (mlx-lm leaves 8-bit ones, which
lose little, as they are) in float32, the forward pass seeing them as the output's dtype stores them (the
cast passes the gradient straight through), so what is trained is what is written. One sample in eight
is held out: the KL on it is measured before training and after each epoch, and the best of those grids
is kept, so the result is never worse on it than where it started.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from ..checkpoint.converter import EMBEDDINGS
from ..model.model import Model
from ..training.optimizers import build_optimizer, learning_rate
from ..training.options import TrainingOptions, TrainingReport
from .capture import kl_divergence, logits
from .rounding import Quantized

TRAINED = ("scales", "biases")


@dataclass(frozen=True)
class DWQResult:
    """What a run did: its steps and the held-out KL (nats per token) it started from and kept."""

    steps: int
    initial_kl: float | None  # None: too few samples to hold any out
    final_kl: float | None


def quantized_student(model: Model, bits: int, group_size: int, embed_bits: int, dtype: mx.Dtype,
                      module_bits: Mapping[str, int] | None = None,
                      replaced: Mapping[str, Quantized] | None = None) -> Model:
    """A quantized copy of the float `model`, as the converter would write it, in float32.

    `module_bits` gives a module other bits than `bits`; `replaced` (GPTQ's) gives a module its levels
    and grid in place of rounding's.
    """
    module_bits, replaced = module_bits or {}, replaced or {}
    student = Model(model.args)
    student.update(model.parameters())
    student.set_dtype(dtype)

    def chosen(path: str, module: nn.Module) -> dict | bool:
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        b = embed_bits if path in EMBEDDINGS else module_bits.get(path, bits)
        return {"group_size": group_size, "bits": b}

    nn.quantize(student, class_predicate=chosen)
    for path, module in student.named_modules():
        if path in replaced:
            q = replaced[path]
            module.update({"weight": q.weight, "scales": q.scales.astype(dtype), "biases": q.biases.astype(dtype)})
    trained = trainable_modules(student)
    kept = [(path, as_float(m)) for path, m in student.named_modules() if hasattr(m, "scales") and path not in trained]
    student.update_modules(tree_unflatten(kept))
    student.set_dtype(mx.float32)
    return student


def as_float(module: nn.Module) -> nn.Module:
    """A quantized Linear or Embedding that DWQ leaves as it is, as a float one holding the weights its levels
    stand for: the same function, computed with float matmuls (the quantized ones are slow on a CPU)."""
    w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
    if isinstance(module, nn.QuantizedEmbedding):
        out = nn.Embedding(*w.shape)
    else:
        out = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
        if "bias" in module:
            out.bias = module.bias
    out.weight = w
    return out


def trainable_modules(student: Model) -> dict[str, nn.Module]:
    """The quantized modules whose grids DWQ trains (affine, below 8 bits), by name."""
    return {path: m for path, m in student.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and m.mode == "affine" and m.bits < 8}


def written(student: Model, dtype: mx.Dtype) -> dict[str, mx.array]:
    """The trained modules' tensors as the converter takes them: packed weight, scales, biases."""
    return {f"{path}.{leaf}": getattr(m, leaf).astype(dtype) if leaf in TRAINED else m.weight
            for path, m in trainable_modules(student).items() for leaf in ("weight", *TRAINED)}


def dwq(student: Model, teacher: Model, samples: mx.array, options: TrainingOptions, dtype: mx.Dtype = mx.float32,
        temperature: float = 1.0, on_report: Callable[[TrainingReport], None] | None = None) -> DWQResult:
    """Train the student's scales and biases (trainable_modules') to match the teacher's output distribution
    on the calibration samples (N, L), in place.

    Args:
        student: quantized_student's model; its packed weights and every other tensor stay as they are.
        teacher: the float model.
        options: the run's optimizer, learning rate (and schedule), batch size, epochs or iters, seed and
            steps_per_report, as `qwen3-mlx train` reads them.
        dtype: the dtype the grids are written in (the forward pass sees them rounded to it).
        temperature: both distributions' logits divided by it in the training loss (mlx-lm's default is 2);
            the held-out KL is measured at 1.
        on_report: called with a TrainingReport (train_loss: the KL) every steps_per_report steps and at
            each held-out measurement.
    """
    held = samples.shape[0] // 8 if samples.shape[0] >= 8 else min(1, samples.shape[0] - 1)
    train, valid = samples[:samples.shape[0] - held], samples[samples.shape[0] - held:]
    per_epoch = -(-train.shape[0] // options.batch_size)
    iters = options.epochs * per_epoch if options.epochs is not None else options.iters
    optimizer = build_optimizer(options, iters)
    student.freeze()
    for module in trainable_modules(student).values():
        module.unfreeze(keys=list(TRAINED), recurse=False)
    params = tree_map(lambda p: p.astype(mx.float32), student.trainable_parameters())

    def as_stored(tree):
        return tree_map(lambda p: p.astype(dtype).astype(mx.float32), tree)

    def loss(params, x: mx.array, target: mx.array) -> mx.array:
        student.update(as_stored(params))
        return kl_divergence(target / temperature, student(x).astype(mx.float32) / temperature).mean()

    def held_out(params) -> float | None:
        if not held:
            return None
        student.update(as_stored(params))
        return kl_divergence(logits(teacher, valid, options.batch_size), logits(student, valid,
                                                                                 options.batch_size)).mean().item()

    reports = _Reports(optimizer, iters, options.steps_per_report, on_report)
    best = (held_out(params), params)
    initial = best[0]
    reports.held_out(0, initial)
    step_grad = mx.value_and_grad(loss)
    for step in range(iters):
        epoch, i = divmod(step, per_epoch)
        if i == 0:
            order = np.random.default_rng(options.seed + epoch).permutation(train.shape[0])
        x = train[mx.array(order[i * options.batch_size:(i + 1) * options.batch_size])]
        target = mx.stop_gradient(teacher(x).astype(mx.float32))
        value, grads = step_grad(params, x, target)
        params = optimizer.apply_gradients(grads, params)
        mx.eval(value, params, optimizer.state)
        reports.step(step + 1, value.item(), x.size)
        if held and (i == per_epoch - 1 or step == iters - 1):
            kl = held_out(params)
            reports.held_out(step + 1, kl)
            best = min(best, (kl, params), key=lambda b: b[0])
    student.update(as_stored(best[1]))
    student.unfreeze()
    return DWQResult(iters, initial, best[0])


class _Reports:
    """TrainingReports for on_report: a training step's (every `every` steps, the mean KL since the last
    one) and a held-out measurement's."""

    def __init__(self, optimizer, iters: int, every: int, on_report: Callable[[TrainingReport], None] | None):
        self.optimizer, self.iters, self.every, self.on_report = optimizer, iters, every, on_report
        self.window: list[float] = []
        self.tokens, self.trained, self.tic = 0, 0, time.perf_counter()

    def step(self, step: int, kl: float, tokens: int) -> None:
        self.window.append(kl)
        self.tokens, self.trained = self.tokens + tokens, self.trained + tokens
        if step % self.every == 0 or step == self.iters:
            seconds = max(time.perf_counter() - self.tic, 1e-9)
            self._send(step, train_loss=sum(self.window) / len(self.window), tokens_per_second=self.tokens / seconds)
            self.window, self.tokens, self.tic = [], 0, time.perf_counter()

    def held_out(self, step: int, kl: float | None) -> None:
        if kl is not None:
            self._send(step, val_loss=kl)

    def _send(self, step: int, **values) -> None:
        if self.on_report is not None:
            self.on_report(TrainingReport(step, self.iters, learning_rate=learning_rate(self.optimizer),
                                          trained_tokens=self.trained, peak_memory=mx.get_peak_memory(), **values))
