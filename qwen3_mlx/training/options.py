"""What a training run is asked (TrainingOptions) and what it tells (TrainingReport, TrainingResult).

TrainingOptions' fields are `qwen3-mlx train`'s long options in snake case, with mlx_lm.lora's defaults,
so the same command line trains the same thing; their bounds are checked once, here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OptionError

FINE_TUNE_TYPES = ("lora", "dora", "full")
OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor", "muon")
LR_SCHEDULES = ("cosine_decay", "linear_schedule", "exponential_decay", "step_decay")
# mlx-lm's key paths of a decoder layer's seven projections, the default set.
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj")


@dataclass(frozen=True)
class TrainingOptions:
    """The options of one run; each is `qwen3-mlx train`'s option of the same name (--num-layers ...).

    Defaults are mlx_lm.lora's: LoRA of rank 8, scale 20, dropout 0 on every projection of the last 16
    layers, Adam at 1e-5, batches of 4 up to 2048 tokens, 1000 iterations.
    """

    fine_tune_type: str = "lora"
    num_layers: int = 16  # the last N decoder layers; -1: all
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    lora_keys: tuple[str, ...] | None = None  # mlx-lm's key paths inside a layer; None: every projection
    mask_prompt: bool = False
    optimizer: str = "adam"
    optimizer_config: dict = field(default_factory=dict)  # keyword arguments of the mlx.optimizers class
    learning_rate: float = 1e-5
    lr_schedule: str | None = None  # an mlx.optimizers.schedulers name; arguments below
    lr_schedule_arguments: tuple = ()  # after the learning rate: cosine_decay's steps (default iters), ...
    warmup: int = 0
    batch_size: int = 4
    iters: int = 1000
    epochs: int | None = None  # in place of iters: this many passes over the training batches
    max_seq_length: int = 2048
    grad_accumulation_steps: int = 1
    grad_checkpoint: bool = False
    seed: int = 0
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25  # -1: the whole validation set
    save_every: int = 100
    adapter_path: Path | None = None  # where adapters.safetensors and adapter_config.json go; None: not saved
    resume_adapter_file: Path | None = None
    memory_limit: int | None = None  # bytes; None: the engine's default ceiling

    def __post_init__(self) -> None:
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise OptionError(f"fine_tune_type={self.fine_tune_type!r} must be one of {', '.join(FINE_TUNE_TYPES)}")
        if self.optimizer not in OPTIMIZERS:
            raise OptionError(f"optimizer={self.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            raise OptionError(f"lr_schedule={self.lr_schedule!r} must be one of {', '.join(LR_SCHEDULES)}")
        for name in ("rank", "batch_size", "iters", "max_seq_length", "grad_accumulation_steps",
                     "steps_per_report", "steps_per_eval", "save_every"):
            _at_least(name, getattr(self, name), 1)
        _at_least("warmup", self.warmup, 0)
        if self.epochs is not None:
            _at_least("epochs", self.epochs, 1)
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or self.num_layers < -1 \
                or self.num_layers == 0:
            raise OptionError(f"num_layers={self.num_layers!r} must be a positive integer, or -1 for all layers")
        for name in ("val_batches",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
                raise OptionError(f"{name}={value!r} must be a positive integer, or -1 for the whole set")
        for name in ("scale", "learning_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise OptionError(f"{name}={value!r} must be a finite number")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise OptionError(f"dropout={self.dropout!r} must be a number in [0, 1)")
        if self.lora_keys is not None:
            unknown = [k for k in self.lora_keys if k not in PROJECTIONS]
            if unknown or not self.lora_keys:
                raise OptionError(f"lora_keys={','.join(self.lora_keys)!r}: {unknown[0] if unknown else 'empty'} is "
                                  f"not one of a layer's projections ({','.join(PROJECTIONS)})")
        if self.memory_limit is not None:
            _at_least("memory_limit", self.memory_limit, 1)

    @property
    def keys(self) -> tuple[str, ...]:
        """The key paths adapted in each chosen layer."""
        return self.lora_keys if self.lora_keys is not None else PROJECTIONS

    def lora_parameters(self) -> dict:
        """adapter_config.json's lora_parameters, as mlx-lm writes and reads them."""
        return {"rank": self.rank, "scale": self.scale, "dropout": self.dropout, "keys": list(self.keys)}


def _at_least(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise OptionError(f"{name}={value!r} must be an integer >= {low}")


@dataclass(frozen=True)
class TrainingReport:
    """One report of a run (every steps_per_report steps, and at each validation): what on_report gets."""

    step: int
    iters: int
    train_loss: float | None = None  # the mean over the steps since the last report
    val_loss: float | None = None
    learning_rate: float = 0.0
    tokens_per_second: float = 0.0
    trained_tokens: int = 0
    peak_memory: int = 0  # bytes
    saved: Path | None = None  # the adapters file written at this step, if any


@dataclass(frozen=True)
class TrainingResult:
    """What train() returns: the losses by step (bit for bit the same for a seeded run on the CPU)."""

    steps: int
    losses: list[float]  # each step's training loss
    val_losses: dict[int, float]  # step -> validation loss (step 0: before training)
    trained_tokens: int
    seconds: float
    peak_memory: int
    adapter_file: Path | None
    truncated: int  # examples cut to max_seq_length
