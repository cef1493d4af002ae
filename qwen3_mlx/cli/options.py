"""The commands' click options, each declared once: the generation options (generate, chat), the
engine's (generate --prompts-file, serve), the cache's and the drafting ones (all three commands),
and the split over ranks (mlx.launch). Each group arrives in its command as one typed value."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import click

from ..collectives import WATCHDOG_SECONDS
from ..errors import Qwen3Error
from ..generation.options import EngineOptions, GenerationOptions
from .display import Display

DEFAULT_MODEL = "mlx-community/Qwen3-1.7B-4bit"
CONTEXT = {"help_option_names": ["-h", "--help"]}
DEFAULTS, ENGINE_DEFAULTS = GenerationOptions(), EngineOptions()  # the defaults --help shows are the library's

version = click.version_option(package_name="qwen3-mlx", message="qwen3-mlx %(version)s")
MODEL_HELP = "Checkpoint folder or Hub repo id (no short option: -m is --max-tokens, as in mlx_lm)."
model_option = click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
adapter_option = click.option("--adapter-path", metavar="FOLDER",
                              help="Apply this adapter (qwen3-mlx train's or mlx_lm.lora's folder) to the model.")


# ---------------------------------------------------------------- reading values


def parse_template_config(ctx: click.Context, param: click.Parameter, value: str | None) -> dict | None:
    """--chat-template-config: a JSON object of template variables; Qwen3's template reads enable_thinking."""
    if value is None:
        return None
    try:
        config = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON ({e.msg} at {e.pos})") from None
    if not isinstance(config, dict) or set(config) - {"enable_thinking"}:
        raise click.BadParameter('expected a JSON object with enable_thinking only, e.g. {"enable_thinking": false}; '
                                 "Qwen3's template reads no other variable")
    if not isinstance(config.get("enable_thinking", True), bool):
        raise click.BadParameter("enable_thinking must be true or false")
    return config


def read_text_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> str | None:
    """A FILE option's text (--grammar: a Lark or GBNF grammar)."""
    if value is None:
        return None
    try:
        return value.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"{value}: {e.strerror if isinstance(e, OSError) else e}") from None


def read_json_schema(ctx: click.Context, param: click.Parameter, value: Path | None) -> dict | None:
    """--json-schema FILE: the file's JSON object (what it means is checked by llguidance, later)."""
    text = read_text_file(ctx, param, value)
    if text is None:
        return None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"{value}: not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise click.BadParameter(f"{value}: a JSON schema is an object ({{...}}), got {type(schema).__name__}")
    return schema


def int_choice(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A click.Choice of numbers, as the number."""
    return None if value is None else int(value)


def check_writable(path: Path | None) -> None:
    """Fail before the run, not after it, when a file cannot be written where the user asked."""
    if path is not None and not path.parent.is_dir():
        raise Qwen3Error(f"{path}: the folder {path.parent} does not exist; create it or choose another path")


# ---------------------------------------------------------------- shared by several commands

THINKING_BUDGET = click.option("--thinking-budget", type=click.IntRange(min=0), metavar="N",
                               help="Most reasoning tokens, then the reasoning is closed early; 0 = no reasoning "
                                    "(serve: of a request that gives none).")
MAX_BATCH = click.option("--max-batch", type=click.IntRange(min=1), default=ENGINE_DEFAULTS.max_batch,
                         show_default=True, help="Most requests decoded together (generate: with --prompts-file); "
                                                 "the others wait their turn.")
CACHE_OPTIONS = [
    click.option("--max-kv-size", type=click.IntRange(min=1), metavar="N",
                 help="A rotating cache of N tokens that keeps the system prompt; memory stays bounded (serve: "
                      "every request's, so a conversation may run past the context)."),
    click.option("--kv-bits", type=click.Choice(["4", "8"]), callback=int_choice,
                 help="Store the KV cache in 8 or 4 bits (about 0.53x / 0.28x of bf16); 8 is close to exact, "
                      "4 loses quality on models with outlier key channels. Default: the model's dtype."),
    click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default=str(DEFAULTS.kv_group_size),
                 show_default=True, callback=int_choice,
                 help="With --kv-bits: elements per quantization group (a scale and a bias each)."),
    click.option("--quantized-kv-start", type=click.IntRange(min=0), default=DEFAULTS.quantized_kv_start,
                 show_default=True, metavar="N",
                 help="With --kv-bits: the first N positions are also kept in full precision."),
]
DRAFT_OPTIONS = [
    click.option("--draft-model", metavar="MODEL",
                 help="Speculative decoding with this smaller model of the same family (folder or Hub id) drafting "
                      "tokens the model checks in one pass; the output is the model's own."),
    click.option("--prompt-lookup", is_flag=True,
                 help="Speculative decoding that drafts what followed the last words earlier in the prompt or the "
                      "text (editing, quoting, code); costs nothing when nothing matches."),
    click.option("--num-draft-tokens", type=click.IntRange(min=0), default=DEFAULTS.num_draft_tokens,
                 show_default=True, metavar="K",
                 help="With --draft-model or --prompt-lookup: the longest draft (adapted up to it); 0 turns it off "
                      "(serve: of a request that gives none)."),
]


def add_options(options: list[Callable[..., Any]], command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` with `options`, listed in --help in their order."""
    for option in reversed(options):
        command = option(command)
    return command


# ---------------------------------------------------------------- generation (generate, chat)

GENERATION_OPTIONS = [
    click.option("--think/--no-think", default=DEFAULTS.think, show_default=True,
                 help="Qwen3's thinking mode (the template's enable_thinking); it also picks the sampling defaults."),
    THINKING_BUDGET,
    click.option("--max-tokens", "-m", type=click.IntRange(min=0), default=DEFAULTS.max_tokens,
                 show_default=True,
                 help="Most answer tokens (with no --thinking-budget: reasoning and answer together)."),
    click.option("--temp", type=click.FloatRange(min=0),
                 help="Temperature; 0 is greedy. Default: Qwen's for the mode (thinking 0.6, non-thinking 0.7)."),
    click.option("--top-p", type=click.FloatRange(0, 1, min_open=True),
                 help="Nucleus sampling. Default: Qwen's for the mode (thinking 0.95, non-thinking 0.8)."),
    click.option("--top-k", type=click.IntRange(min=0),
                 help="Keep the k likeliest tokens; 0 switches it off. Default: Qwen's, 20 in both modes."),
    click.option("--min-p", type=click.FloatRange(0, 1),
                 help="Drop tokens below min-p x the top probability. Default: Qwen's, 0 in both modes."),
    click.option("--presence-penalty", type=float, help="Subtracted from the logit of every token generated so far."),
    click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True),
                 help="Shrinks the logits of tokens generated so far (positive ones divided, negative multiplied); "
                      "1 is none."),
    click.option("--seed", type=int, help="Makes sampling repeatable."),
    click.option("--stop", multiple=True, metavar="TEXT", help="Text that ends the answer, not printed (repeatable)."),
    click.option("--extra-eos-token", multiple=True, metavar="TEXT",
                 help="mlx_lm's name: another end of the answer, taken as --stop TEXT (repeatable)."),
    click.option("--chat-template-config", callback=parse_template_config, metavar="JSON",
                 help='mlx_lm\'s template variables, e.g. {"enable_thinking": false} (the same as --no-think).'),
    click.option("--json-schema", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
                 callback=read_json_schema,
                 help="The answer is JSON valid against the schema in FILE (after any reasoning)."),
    click.option("--regex", metavar="TEXT", help="The answer matches this regular expression (Rust syntax)."),
    click.option("--grammar", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
                 callback=read_text_file,
                 help="The answer matches the grammar in FILE: Lark (rule start) or llama.cpp's GBNF (rule root)."),
    CACHE_OPTIONS[0],
    click.option("--prefill-step-size", type=click.IntRange(min=1), default=DEFAULTS.prefill_step_size,
                 show_default=True,
                 help="Prompt tokens computed per step; smaller lowers peak memory."),
    *CACHE_OPTIONS[1:],
    *DRAFT_OPTIONS,
    click.option("--hide-thinking", is_flag=True, help="Do not print the reasoning."),
    click.option("--verbose", "-v", is_flag=True, help="Print token counts, speeds and memory on stderr."),
]


def generation_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add GENERATION_OPTIONS to a command, which receives them as two values: `options`
    (a GenerationOptions) and `display` (a Display), and --draft-model as `draft_model`."""

    @functools.wraps(command)
    def collect(*args: Any, **kwargs: Any) -> Any:
        kwargs["options"], kwargs["display"] = collect_generation(kwargs)
        return command(*args, **kwargs)

    return add_options(GENERATION_OPTIONS, collect)


def collect_generation(values: dict[str, Any]) -> tuple[GenerationOptions, Display]:
    """Take the generation options out of a command's keyword arguments (the names are the dataclasses' fields)."""
    fields = {f.name: values.pop(f.name) for f in dataclasses.fields(GenerationOptions) if f.name in values}
    display = Display(**{f.name: values.pop(f.name) for f in dataclasses.fields(Display)})
    fields["stop"] = fields["stop"] + values.pop("extra_eos_token")
    template = values.pop("chat_template_config")
    if template is not None:
        fields["think"] = template.get("enable_thinking", fields["think"])
    return GenerationOptions(**fields), display


# ---------------------------------------------------------------- the engine (serve)

ENGINE_OPTIONS = [
    MAX_BATCH,
    click.option("--memory-limit", type=click.FloatRange(min=0, min_open=True), metavar="GB",
                 help="Most memory the server may take in all: weights, KV caches at their worst, prompt cache and "
                      "activations; a request waits until it fits, and one that never could is refused. "
                      "Default: 75% of the device's."),
    click.option("--kv-memory", type=click.FloatRange(min=0, min_open=True), metavar="GB",
                 help="A finer bound on the batch's KV cache alone, within --memory-limit. Default: none."),
    click.option("--prompt-cache-gb", type=click.FloatRange(min=0), default=ENGINE_DEFAULTS.prefix_store_bytes / 1e9,
                 show_default=True,
                 help="Memory for caches of recent prompts, reused by requests that share a prefix (0: none)."),
    *CACHE_OPTIONS,
]


def engine_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ENGINE_OPTIONS and DRAFT_OPTIONS to a command, which receives the engine's as one value,
    `engine` (an EngineOptions: --prompt-lookup drafts for every request), and `draft_model` and
    `num_draft_tokens` as they are."""

    @functools.wraps(command)
    def collect(*args: Any, **kwargs: Any) -> Any:
        gigabytes = {name: kwargs.pop(name) for name in ("memory_limit", "kv_memory", "prompt_cache_gb")}
        fields = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(EngineOptions) if f.name in kwargs}
        kwargs["engine"] = EngineOptions(
            **fields, memory_limit=bytes_of(gigabytes["memory_limit"]), kv_memory=bytes_of(gigabytes["kv_memory"]),
            prefix_store_bytes=int(gigabytes["prompt_cache_gb"] * 1e9))
        return command(*args, **kwargs)

    return add_options([*ENGINE_OPTIONS, *DRAFT_OPTIONS], collect)


def bytes_of(gigabytes: float | None) -> int | None:
    return int(gigabytes * 1e9) if gigabytes else None


# ---------------------------------------------------------------- across several Macs (mlx.launch)


def parse_shares(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    """--layers-per-rank 10,18: one positive number a rank."""
    if value is None:
        return None
    try:
        shares = tuple(float(v) if "." in v else int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: one number a rank, separated by commas, e.g. 10,18") from None
    if min(shares) <= 0:
        raise click.BadParameter(f"{value!r}: every rank's share must be > 0")
    return shares


PARALLEL_OPTIONS = [
    click.option("--parallel", type=click.Choice(["tensor", "pipeline"]),
                 help="Under mlx.launch: split the model over the ranks, each loading its part; rank 0 writes the "
                      "output. tensor: 1/N of every layer (faster over a low-latency link); pipeline: a run of "
                      "layers each (pools memory over any link)."),
    click.option("--layers-per-rank", callback=parse_shares, metavar="N,N,...",
                 help="With --parallel pipeline: each rank's layers (10,18) or shares of them (1,2). Default: even."),
    click.option("--watchdog", type=click.FloatRange(min=0, min_open=True), default=WATCHDOG_SECONDS,
                 show_default=True, metavar="SECONDS",
                 help="With --parallel: a rank that waits this long on the others ends the run (exit 1), naming "
                      "itself; loading may wait up to 10 minutes."),
]


def parallel_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add PARALLEL_OPTIONS to a command, which receives them as one value: `parallel`
    (a distributed.ParallelOptions)."""

    @functools.wraps(command)
    def collect(*args: Any, **kwargs: Any) -> Any:
        from ..distributed.ranks import ParallelOptions

        kwargs["parallel"] = ParallelOptions(kwargs.pop("parallel"), kwargs.pop("layers_per_rank"),
                                             kwargs.pop("watchdog"))
        return command(*args, **kwargs)

    return add_options(PARALLEL_OPTIONS, collect)


def start_ranks(parallel: Any, draft_model: str | None = None, prompt_cache: Path | None = None) -> Any:
    """This process's place in a launched job (distributed.Ranks); what does not go with --parallel is
    refused in one line: a cache file (it would hold one rank's part of the cache), a draft model in a
    pipeline (a stage's receive waits on no earlier step, so a draft's k steps, evaluated together,
    could cross between the ranks)."""
    from ..distributed.ranks import Ranks

    if parallel.mode is not None and prompt_cache is not None:
        raise click.UsageError("--prompt-cache does not go with --parallel: each rank holds only its part of the "
                               "cache; leave it out")
    check_parallel_draft(parallel, draft_model)
    return Ranks.start(parallel)


def check_parallel_draft(parallel: Any, draft_model: str | None) -> None:
    if parallel.mode == "pipeline" and draft_model is not None:
        raise click.UsageError("--draft-model does not go with --parallel pipeline: its steps would wait on each "
                               "other across the ranks; use --parallel tensor, or --prompt-lookup")
