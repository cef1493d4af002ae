"""The optimizer and its learning-rate schedule from the options, as mlx_lm.lora builds them (its
lr_schedule {name, arguments, warmup} and optimizer_config), and the memory a run plans for."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..errors import MemoryLimitError, OptionError
from ..files import human_size
from ..generation.memory import default_memory_limit, weight_bytes
from .options import TrainingOptions

CLASSES = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD, "adafactor": optim.Adafactor,
           "muon": optim.Muon}
# Arrays of optimizer state per trainable weight (Adam's two moments; SGD's momentum, kept when set).
STATE_COPIES = {"adam": 2, "adamw": 2, "sgd": 1, "adafactor": 1, "muon": 1}


def schedule(options: TrainingOptions, steps: int):
    """The learning rate, or a schedule: lr_schedule's function of (learning_rate, *arguments), after a
    linear warmup from 0 of `warmup` steps when asked (mlx-lm's build_schedule)."""
    if options.lr_schedule is None:
        return options.learning_rate
    arguments = options.lr_schedule_arguments or ((steps,) if options.lr_schedule == "cosine_decay" else ())
    try:
        main = getattr(optim.schedulers, options.lr_schedule)(options.learning_rate, *arguments)
    except TypeError as e:
        raise OptionError(f"lr_schedule={options.lr_schedule!r} with arguments {list(arguments)}: {e}") from None
    if not options.warmup:
        return main
    warmup = optim.schedulers.linear_schedule(0.0, options.learning_rate, options.warmup)
    return optim.schedulers.join_schedules([warmup, main], [options.warmup + 1])


def build_optimizer(options: TrainingOptions, steps: int) -> optim.Optimizer:
    try:
        return CLASSES[options.optimizer](learning_rate=schedule(options, steps), **options.optimizer_config)
    except TypeError as e:
        raise OptionError(f"optimizer_config for {options.optimizer}: {e}") from None


def check_memory(model: nn.Module, options: TrainingOptions, rows: int, longest: int) -> int:
    """The bytes a step plans for (weights, trainable copies, optimizer state, the activations of the
    longest batch kept for the backward pass), checked against the ceiling before step 1.

    Raises:
        MemoryLimitError: the plan does not fit, with its numbers and the options that would make it fit.
    """
    a = model.args
    weights = weight_bytes(model)
    trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    state = trainable * (2 + STATE_COPIES[options.optimizer])  # the gradients, a kept copy, the state
    tokens = rows * longest
    layers = len(model.layers) if not options.grad_checkpoint else 1
    per_token = 8 * a.hidden_size + 3 * (a.num_attention_heads + 2 * a.num_key_value_heads) * a.head_dim \
        + 4 * a.intermediate_size
    kept = tokens * a.hidden_size * len(model.layers) if options.grad_checkpoint else 0
    activations = 4 * (tokens * per_token * layers + kept + 2 * rows * a.num_attention_heads * longest * longest
                       + 3 * tokens * a.vocab_size)
    need = weights + state + activations
    limit = options.memory_limit or default_memory_limit()
    if need > limit:
        hint = "--grad-checkpoint, " if not options.grad_checkpoint else ""
        raise MemoryLimitError(
            f"a step needs about {human_size(need)} (weights {human_size(weights)}, adapters' gradients and "
            f"optimizer state {human_size(state)}, activations of the longest batch, {rows} x {longest} tokens, "
            f"{human_size(activations)}) but the memory limit is {human_size(limit)}; use {hint}a smaller "
            f"--batch-size or --max-seq-length, or raise --memory-limit")
    return need


def learning_rate(optimizer: optim.Optimizer) -> float:
    rate = optimizer.learning_rate
    return rate.item() if isinstance(rate, mx.array) else float(rate)
