"""`qwen3-mlx train` (mlx_lm.lora's options and YAML config, plus ours) and `qwen3-mlx fuse`, over
training.loop.train and training.fuse."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from .options import CONTEXT

# mlx_lm.lora's options that take a value, by their YAML key; ours besides.
VALUE_KEYS = ("model", "data", "fine_tune_type", "optimizer", "num_layers", "batch_size", "iters", "val_batches",
              "learning_rate", "steps_per_report", "steps_per_eval", "resume_adapter_file", "adapter_path",
              "save_every", "test_batches", "max_seq_length", "grad_accumulation_steps", "seed", "rank", "scale",
              "dropout", "lora_keys", "epochs", "lr_schedule", "warmup", "memory_limit")
FLAG_KEYS = ("train", "mask_prompt", "test", "grad_checkpoint")


def read_config(path: Path) -> dict[str, Any]:
    """An mlx_lm.lora YAML config, its nested keys (lora_parameters, lr_schedule) flattened to options."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise click.UsageError(f"{path}: could not be read as YAML ({e})") from None
    if not isinstance(raw, dict):
        raise click.UsageError(f"{path}: must hold a mapping of options")
    values = dict(raw)
    lora = values.pop("lora_parameters", None) or {}
    for key in ("rank", "scale", "dropout"):
        if key in lora:
            values.setdefault(key, lora[key])
    if lora.get("keys"):
        values.setdefault("lora_keys", ",".join(lora["keys"]))
    schedule = values.pop("lr_schedule", None)
    if isinstance(schedule, dict):
        values["lr_schedule"] = schedule.get("name")
        arguments = list(schedule.get("arguments") or [])
        if arguments:
            values.setdefault("learning_rate", arguments[0])
            values["lr_schedule_arguments"] = tuple(arguments[1:])
        values.setdefault("warmup", schedule.get("warmup", 0))
    return values


def training_options(values: dict[str, Any]) -> Any:
    from ..training.options import TrainingOptions

    keys = values.get("lora_keys")
    optimizer = values.get("optimizer") or "adam"
    config = (values.get("optimizer_config") or {}).get(optimizer, {})
    memory = values.get("memory_limit")
    fields = {k: values[k] for k in ("fine_tune_type", "num_layers", "rank", "scale", "dropout", "learning_rate",
                                     "batch_size", "iters", "epochs", "max_seq_length", "grad_accumulation_steps",
                                     "seed", "steps_per_report", "steps_per_eval", "val_batches", "save_every",
                                     "warmup", "lr_schedule", "lr_schedule_arguments") if values.get(k) is not None}
    return TrainingOptions(**fields, optimizer=optimizer, optimizer_config=dict(config),
                           lora_keys=tuple(keys.split(",")) if keys else None,
                           mask_prompt=bool(values.get("mask_prompt")),
                           grad_checkpoint=bool(values.get("grad_checkpoint")),
                           adapter_path=Path(values.get("adapter_path") or "adapters"),
                           resume_adapter_file=Path(values["resume_adapter_file"]) if values.get("resume_adapter_file")
                           else None, memory_limit=int(memory * 1e9) if memory else None)


def print_report(report: Any) -> None:
    parts = [f"step {report.step}/{report.iters}"]
    if report.val_loss is not None:
        parts.append(f"val loss {report.val_loss:.3f}")
    if report.train_loss is not None:
        parts += [f"train loss {report.train_loss:.3f}", f"lr {report.learning_rate:.3g}",
                  f"{report.tokens_per_second:.0f} tok/s", f"peak {report.peak_memory / 1e9:.2f} GB"]
    if report.saved is not None:
        parts.append(f"saved {report.saved}")
    click.echo(", ".join(parts), err=True)


@click.command(context_settings=CONTEXT)
@click.option("--model", help="The base checkpoint: a folder or a Hub repo id.")
@click.option("--train", is_flag=True, default=None, help="Train (the default unless --test alone is given).")
@click.option("--data", help="A folder with train.jsonl (valid.jsonl, test.jsonl), or one JSONL file to train on.")
@click.option("--fine-tune-type", type=click.Choice(["lora", "dora", "full"]), help="Default lora.")
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd", "adafactor", "muon"]), help="Default adam.")
@click.option("--mask-prompt", is_flag=True, default=None, help="Train on the assistant's tokens only.")
@click.option("--num-layers", type=int, help="Adapt the last N layers (default 16; -1: all).")
@click.option("--batch-size", type=int, help="Default 4.")
@click.option("--iters", type=int, help="Steps to train (default 1000).")
@click.option("--epochs", type=int, help="In place of --iters: passes over the training data.")
@click.option("--val-batches", type=int, help="Validation batches (default 25; -1: all).")
@click.option("--learning-rate", type=float, help="Default 1e-5.")
@click.option("--lr-schedule", help="An mlx.optimizers schedule: cosine_decay, linear_schedule, ...")
@click.option("--warmup", type=int, help="Linear warmup steps before the schedule.")
@click.option("--steps-per-report", type=int, help="Default 10.")
@click.option("--steps-per-eval", type=int, help="Default 200.")
@click.option("--resume-adapter-file", help="Resume from these adapters (and the optimizer state beside them).")
@click.option("--adapter-path", help="Where the adapters are saved (default adapters).")
@click.option("--save-every", type=int, help="Save every N steps (default 100).")
@click.option("--test", is_flag=True, default=None, help="Report the test set's loss and perplexity.")
@click.option("--test-batches", type=int, help="Test batches (default 500; -1: all).")
@click.option("--max-seq-length", type=int, help="Longer examples are cut (default 2048).")
@click.option("--config", "-c", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An mlx_lm.lora YAML config; options given here win over it.")
@click.option("--grad-checkpoint", is_flag=True, default=None, help="Recompute activations to save memory.")
@click.option("--grad-accumulation-steps", type=int, help="Default 1.")
@click.option("--seed", type=int, help="Default 0.")
@click.option("--rank", type=int, help="LoRA rank (default 8).")
@click.option("--scale", type=float, help="LoRA scale (default 20).")
@click.option("--dropout", type=float, help="LoRA dropout (default 0).")
@click.option("--lora-keys", help="Comma-separated key paths (default all seven projections).")
@click.option("--memory-limit", type=float, metavar="GB", help="The ceiling a step must fit under.")
def train(**given: Any) -> None:
    """Fine-tune a model: LoRA, DoRA (over a float or quantized base) or whole layers, as mlx_lm.lora."""
    from ..checkpoint.loader import load
    from ..errors import Qwen3Error
    from ..training.data import find_splits, load_split
    from ..training.loop import evaluate, train as run

    config = given.pop("config")
    values = {**(read_config(config) if config else {}), **{k: v for k, v in given.items() if v not in (None, False)}}
    if not values.get("model") or not values.get("data"):
        raise click.UsageError("give --model and --data (or both in --config)")
    try:
        options = training_options(values)
        model, tokenizer = load(values["model"], for_training=True)
        splits = find_splits(Path(values["data"]))
        test_only = values.get("test") and not values.get("train") and "train" not in splits
        if not test_only:
            if "train" not in splits:
                raise Qwen3Error(f"{values['data']}: has no train.jsonl")
            result = run(model, tokenizer, splits["train"], splits.get("valid"), options=options,
                         on_report=print_report)
            click.echo(f"trained {result.steps} steps in {result.seconds:.1f} s; adapters in {result.adapter_file}",
                       err=True)
            if result.truncated:
                click.echo(f"warning: {result.truncated} examples were longer than --max-seq-length "
                           f"{options.max_seq_length} and were cut", err=True)
        if values.get("test"):
            test = load_split(splits.get("test"), tokenizer, options.mask_prompt)
            if not test:
                raise Qwen3Error(f"{values['data']}: has no test.jsonl for --test")
            loss = evaluate(model, test, options, values.get("test_batches") or 500)
            click.echo(f"test loss {loss:.3f}, test ppl {math.exp(loss):.3f}")
    except (Qwen3Error, ValueError) as e:
        raise click.ClickException(str(e)) from None


@click.command(context_settings=CONTEXT)
@click.option("--model", required=True, help="The base checkpoint: a folder or a Hub repo id.")
@click.option("--adapter-path", default="adapters", show_default=True, help="The adapter folder.")
@click.option("--save-path", default="fused_model", show_default=True, help="Where the fused model goes.")
@click.option("--de-quantize", "--dequantize", "dequantize", is_flag=True, help="Write float layers over a quantized base.")
def fuse(model: str, adapter_path: str, save_path: str, dequantize: bool) -> None:
    """Fold an adapter into its base model and save the result (mlx_lm.fuse's options)."""
    from ..checkpoint.loader import load, resolve
    from ..errors import Qwen3Error
    from ..training.fuse import fuse as fuse_model, save_model

    try:
        loaded, _ = load(model, for_training=True)
        kept = fuse_model(loaded, adapter_path, dequantize=dequantize)
        out = save_model(loaded, resolve(model), Path(save_path))
    except (Qwen3Error, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if kept:
        click.echo(f"kept {len(kept)} layers in float ({kept[0]}, ...): quantized again they would lose the "
                   f"adapter's change (it is smaller than the quantization step)", err=True)
    click.echo(f"fused model saved to {out}", err=True)
