"""The training loop: a pure loss, its gradients by value_and_grad, the optimizer step, validation,
reports, and the adapters saved as it goes (with the optimizer's state, so a resumed run equals one
that never stopped)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..checkpoint.adapters import ADAPTER_FILE, AdapterConfig, apply_adapters, chosen_layers, save_adapters
from ..errors import Qwen3Error
from ..files import written_atomically
from ..model.model import DecoderLayer
from ..text.tokenizer import Tokenizer
from .batches import Batch, fixed_batches, iterate_batches, make_batch, truncated
from .data import Example, load_split
from .optimizers import build_optimizer, check_memory, learning_rate
from .options import TrainingOptions, TrainingReport, TrainingResult

STATE_FILE = "training_state.safetensors"  # beside the adapters: the optimizer's state and the step


def loss(model: nn.Module, ids: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over the trained targets of a batch, and how many there are.
    ids (B, L) int; mask (B, L - 1), 1 where ids[:, 1:] is trained (as transformers' labels not -100)."""
    logits = model(ids[:, :-1])
    ce = nn.losses.cross_entropy(logits, ids[:, 1:]) * mask
    tokens = mask.sum()
    return ce.astype(mx.float32).sum() / tokens, tokens


def evaluate(model: nn.Module, examples: Sequence[Example], options: TrainingOptions, batches: int) -> float:
    """The mean loss per trained token over a fixed seeded choice of `batches` batches (-1: all)."""
    total, count = mx.array(0.0), mx.array(0.0)
    for group in fixed_batches(examples, options.batch_size, batches, options.seed):
        b = make_batch([examples[i] for i in group], options.max_seq_length)
        value, tokens = loss(model, b.ids, b.mask)
        total, count = total + value * tokens, count + tokens
        mx.eval(total, count)
    return (total / count).item()


class Checkpointed(DecoderLayer):
    """A decoder layer that keeps only its input for the backward pass and computes the rest again."""

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        def inner(params, x):
            self.update(params)
            return DecoderLayer.__call__(self, x, mask, cache)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)


def prepare(model: nn.Module, options: TrainingOptions) -> AdapterConfig:
    """Freeze the model and make the chosen part trainable: adapters swapped in, or whole layers."""
    if not hasattr(model.layers[0].self_attn, "q_proj"):
        raise Qwen3Error("the model was loaded with its fast swaps (fused projections); load it with "
                         "load(path, for_training=True) to train it")
    config = AdapterConfig(options.fine_tune_type, options.num_layers, options.rank, options.scale,
                           options.dropout, options.keys)
    model.freeze()
    if options.fine_tune_type == "full":
        for layer in chosen_layers(model, options.num_layers):
            if any(isinstance(m, nn.QuantizedLinear) for _, m in layer.named_modules()):
                raise Qwen3Error("full fine-tuning needs float weights; this model is quantized: train a LoRA or "
                                 "DoRA adapter on it (QLoRA), or convert it to float first")
            layer.unfreeze()
    else:
        apply_adapters(model, config)
    if options.grad_checkpoint:
        for layer in model.layers:
            layer.__class__ = Checkpointed
    return config


@dataclass
class _Run:
    """What the loop carries between steps."""

    model: nn.Module
    options: TrainingOptions
    config: AdapterConfig
    optimizer: object
    step: int = 0
    losses: list = None
    val_losses: dict = None
    trained_tokens: int = 0
    adapter_file: Path | None = None

    def save(self, extra: bool = False) -> Path | None:
        folder = self.options.adapter_path
        if folder is None:
            return None
        self.adapter_file = save_adapters(self.model, folder, self.config)
        if extra:
            save_adapters(self.model, folder, self.config, f"{self.step:07d}_{ADAPTER_FILE}")
        state = dict(tree_flatten(self.optimizer.state))
        with written_atomically(Path(folder) / STATE_FILE, suffix=".safetensors") as tmp:
            mx.save_safetensors(str(tmp), state, {"step": str(self.step)})
        return self.adapter_file


def resume(run: _Run, file: Path) -> None:
    """The weights of an adapters file (mlx-lm's resume), and when the file saved beside it is there,
    the optimizer's state and the step."""
    try:
        run.model.load_weights(str(file), strict=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise Qwen3Error(f"{file}: could not be loaded as adapters of this model ({e})") from None
    state_file = Path(file).parent / STATE_FILE
    if state_file.exists():
        state, meta = mx.load(str(state_file), return_metadata=True)
        run.optimizer.state = tree_unflatten(list(state.items()))
        run.step = int(meta.get("step", 0))


def train(model: nn.Module, tokenizer: Tokenizer, train: Path | Sequence[dict] | Sequence[Example],
          valid: Path | Sequence[dict] | Sequence[Example] | None = None, *, options: TrainingOptions,
          on_report: Callable[[TrainingReport], None] | None = None) -> TrainingResult:
    """Fine-tune `model` in place: LoRA or DoRA adapters (over a float or a quantized base), or whole layers.

    Args:
        model: a model from load(path, for_training=True) (its projections apart, as the checkpoint
            names them).
        tokenizer: its tokenizer (the chat template renders chat lines).
        train, valid: a JSONL file in one of mlx-lm's formats, its lines as dicts, or examples.
        options: TrainingOptions; its fields are `qwen3-mlx train`'s options.
        on_report: called with a TrainingReport every steps_per_report steps and at each validation.

    Returns:
        TrainingResult: the losses by step, validation losses, the adapters file written.

    Raises:
        Qwen3Error: a bad data line (FILE:LINE: what is wrong), a non-finite loss (the step and the batch's
            lines; the last good adapters kept), Ctrl-C (the last step's adapters saved, and how to resume).
        MemoryLimitError: the longest batch's step would not fit under options.memory_limit.
    """
    train_set = _examples(train, tokenizer, options)
    valid_set = _examples(valid, tokenizer, options)
    if not train_set:
        raise Qwen3Error("the training set is empty")
    mx.random.seed(options.seed)
    config = prepare(model, options)
    longest = min(max(len(e) for e in train_set), options.max_seq_length)
    check_memory(model, options, min(options.batch_size, len(train_set)), -(-longest // 32) * 32)
    per_epoch = -(-len(train_set) // options.batch_size)
    iters = options.epochs * per_epoch if options.epochs is not None else options.iters
    run = _Run(model, options, config, build_optimizer(options, iters), losses=[], val_losses={})
    if options.resume_adapter_file is not None:
        resume(run, options.resume_adapter_file)
    start = time.perf_counter()
    model.train()
    try:
        _loop(run, train_set, valid_set, iters, on_report)
    except KeyboardInterrupt:
        saved = run.save()
        where = f"; resume with --resume-adapter-file {saved}" if saved else ""
        raise Qwen3Error(f"interrupted after step {run.step}{where}") from None
    finally:
        model.eval()
        if options.grad_checkpoint:
            for layer in model.layers:
                layer.__class__ = DecoderLayer
    return TrainingResult(iters, run.losses, run.val_losses, run.trained_tokens, time.perf_counter() - start,
                          mx.get_peak_memory(), run.adapter_file, truncated(train_set, options.max_seq_length))


def _examples(source, tokenizer: Tokenizer, options: TrainingOptions) -> list[Example]:
    if source is not None and not isinstance(source, (str, Path)) and source and isinstance(source[0], Example):
        return list(source)
    return load_split(source, tokenizer, options.mask_prompt)


def _loop(run: _Run, train_set: list[Example], valid_set: list[Example], iters: int,
          on_report: Callable[[TrainingReport], None] | None) -> None:
    model, options, optimizer = run.model, run.options, run.optimizer
    state = [model.state, mx.random.state]
    value_and_grad = nn.value_and_grad(model, loss)
    step_grad = mx.compile(lambda ids, mask: value_and_grad(model, ids, mask), inputs=state, outputs=state)
    batches = iterate_batches(train_set, options.batch_size, options.max_seq_length, options.seed)
    batches = islice(batches, run.step, None)  # a resumed run draws its batches where it stopped
    window, tokens, seconds, accumulated = [], 0, 0.0, None

    def report(**values) -> None:
        if on_report is not None:
            on_report(TrainingReport(run.step, iters, learning_rate=learning_rate(optimizer),
                                     trained_tokens=run.trained_tokens, peak_memory=mx.get_peak_memory(), **values))

    for batch in batches:
        if run.step >= iters:
            break
        if valid_set and (run.step == 0 or run.step % options.steps_per_eval == 0):
            run.val_losses[run.step] = evaluate(model, valid_set, options, options.val_batches)
            model.train()
            report(val_loss=run.val_losses[run.step])
        tic = time.perf_counter()
        mx.random.seed(options.seed * 1_000_003 + run.step)  # dropout's draws: the same in a resumed run
        (value, count), grads = step_grad(batch.ids, batch.mask)
        mx.eval(value, count, grads)
        _check_finite(run, value.item(), batch)
        accumulated = grads if accumulated is None else tree_map(mx.add, accumulated, grads)
        if (run.step + 1) % options.grad_accumulation_steps == 0:
            if options.grad_accumulation_steps > 1:
                accumulated = tree_map(lambda g: g / options.grad_accumulation_steps, accumulated)
            optimizer.update(model, accumulated)
            accumulated = None
        mx.eval(model.parameters(), optimizer.state)
        run.step += 1
        seconds += time.perf_counter() - tic
        run.losses.append(value.item())
        window.append(value.item())
        tokens += int(count.item())
        run.trained_tokens += int(count.item())
        saved = run.save(extra=True) if run.step % options.save_every == 0 else None
        if run.step % options.steps_per_report == 0 or run.step == iters or saved:
            report(train_loss=sum(window) / len(window), tokens_per_second=tokens / seconds, saved=saved)
            window, tokens, seconds = [], 0, 0.0
    if valid_set and run.step not in run.val_losses:
        run.val_losses[run.step] = evaluate(model, valid_set, options, options.val_batches)
        report(val_loss=run.val_losses[run.step])
    run.save()


def _check_finite(run: _Run, value: float, batch: Batch) -> None:
    if math.isfinite(value):
        return
    saved = run.save()  # the adapters of the last good step: this step's update was not applied
    kept = f"; the adapters of step {run.step} are kept in {saved}" if saved else ""
    raise Qwen3Error(f"step {run.step + 1}: the loss is {value} on the batch of {', '.join(batch.where[:3])}; "
                     f"lower --learning-rate, or look at those lines{kept}")
