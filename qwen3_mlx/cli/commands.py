"""`qwen3-mlx` command line: thin click front ends over the library.

Exit codes: 0 success, 1 runtime error (one line on stderr), 2 usage error, 4 a structured answer
(--json-schema, --regex, --grammar) cut by a limit before it was complete, 130 interrupted.
Short options follow mlx_lm.generate's: -p prompt, -m max tokens; --model has no short form.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from ..collectives import WATCHDOG_SECONDS
from ..errors import OptionError, Qwen3Error
from ..files import human_size
from ..generation.options import DEFAULT_MAX_BATCH, GenerationOptions

DEFAULT_MODEL = "mlx-community/Qwen3-1.7B-4bit"
CONTEXT = {"help_option_names": ["-h", "--help"]}
MODEL_HELP = "Checkpoint folder or Hub repo id (no short option: -m is --max-tokens, as in mlx_lm)."


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into one line on stderr (exit 1) and Ctrl-C into exit 130, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OptionError as e:
            raise click.UsageError(str(e)) from None
        except (Qwen3Error, OSError) as e:
            click.echo(f"error: {describe(e)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def describe(e: Exception) -> str:
    """One line for an error; an OSError (a path the user gave could not be written) names the path."""
    if isinstance(e, OSError) and not isinstance(e, Qwen3Error) and e.filename:
        return f"{e.filename}: {e.strerror or e}; check the path"
    return str(e)


version = click.version_option(package_name="qwen3-mlx", message="qwen3-mlx %(version)s")


@click.group(context_settings=CONTEXT)
@version
def main() -> None:
    """Run Qwen3 models with MLX: convert, generate, chat."""
    if any(os.environ.get(name, "0") != "0" for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        from ..distributed.engine import launched_rank, quiet

        quiet(launched_rank())  # a launched rank other than 0: its error lines only, even for a usage error


# ---------------------------------------------------------------- the generation options, written once


@dataclass(frozen=True)
class Display:
    """How a response is printed (not how it is generated)."""

    hide_thinking: bool = False
    verbose: bool = False


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


DEFAULTS = GenerationOptions()  # the defaults shown in --help are the library's

GENERATION_OPTIONS = [
    click.option("--think/--no-think", default=DEFAULTS.think, show_default=True,
                 help="Qwen3's thinking mode (the template's enable_thinking); it also picks the sampling defaults."),
    click.option("--thinking-budget", type=click.IntRange(min=0), metavar="N",
                 help="Most reasoning tokens, then the reasoning is closed early; 0 = no reasoning."),
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
    click.option("--max-kv-size", type=click.IntRange(min=1), metavar="N",
                 help="A rotating cache of N tokens that keeps the system prompt; memory stays bounded."),
    click.option("--prefill-step-size", type=click.IntRange(min=1), default=DEFAULTS.prefill_step_size,
                 show_default=True,
                 help="Prompt tokens computed per step; smaller lowers peak memory."),
    click.option("--kv-bits", type=click.Choice(["4", "8"]), callback=int_choice,
                 help="Store the KV cache in 8 or 4 bits (about 0.53x / 0.28x of bf16); 8 is close to exact, "
                      "4 loses quality on models with outlier key channels. Default: the model's dtype."),
    click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default=str(DEFAULTS.kv_group_size),
                 show_default=True, callback=int_choice,
                 help="With --kv-bits: elements per quantization group (a scale and a bias each)."),
    click.option("--quantized-kv-start", type=click.IntRange(min=0), default=DEFAULTS.quantized_kv_start,
                 show_default=True, metavar="N",
                 help="With --kv-bits: the first N positions are also kept in full precision."),
    click.option("--draft-model", metavar="MODEL",
                 help="Speculative decoding with this smaller model of the same family (folder or Hub id) drafting "
                      "tokens the model checks in one pass; the output is the model's own."),
    click.option("--prompt-lookup", is_flag=True,
                 help="Speculative decoding that drafts what followed the last words earlier in the prompt or the "
                      "text (editing, quoting, code); costs nothing when nothing matches."),
    click.option("--num-draft-tokens", type=click.IntRange(min=0), default=DEFAULTS.num_draft_tokens,
                 show_default=True, metavar="K",
                 help="With --draft-model or --prompt-lookup: the longest draft (adapted up to it); 0 turns it off."),
    click.option("--hide-thinking", is_flag=True, help="Do not print the reasoning."),
    click.option("--verbose", "-v", is_flag=True, help="Print token counts, speeds and memory on stderr."),
]


def generation_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add GENERATION_OPTIONS to a command, which receives them as two values: `options`
    (a GenerationOptions) and `display` (a Display)."""

    @functools.wraps(command)
    def collect(*args: Any, **kwargs: Any) -> Any:
        kwargs["options"], kwargs["display"] = _collect(kwargs)
        return command(*args, **kwargs)

    for option in reversed(GENERATION_OPTIONS):
        collect = option(collect)
    return collect


def _collect(values: dict[str, Any]) -> tuple[GenerationOptions, Display]:
    """Take the generation options out of a command's keyword arguments (the names are the dataclasses' fields)."""
    fields = {f.name: values.pop(f.name) for f in dataclasses.fields(GenerationOptions) if f.name in values}
    display = Display(**{f.name: values.pop(f.name) for f in dataclasses.fields(Display)})
    fields["stop"] = fields["stop"] + values.pop("extra_eos_token")
    template = values.pop("chat_template_config")
    if template is not None:
        fields["think"] = template.get("enable_thinking", fields["think"])
    return GenerationOptions(**fields), display


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
        from ..distributed.engine import ParallelOptions

        kwargs["parallel"] = ParallelOptions(kwargs.pop("parallel"), kwargs.pop("layers_per_rank"),
                                             kwargs.pop("watchdog"))
        return command(*args, **kwargs)

    for option in reversed(PARALLEL_OPTIONS):
        collect = option(collect)
    return collect


def start_ranks(parallel: Any, draft_model: str | None = None, prompt_cache: Path | None = None) -> Any:
    """This process's place in a launched job (distributed.Ranks); what does not go with --parallel is
    refused in one line: a cache file (it would hold one rank's part of the cache), a draft model in a
    pipeline (a stage's receive waits on no earlier step, so a draft's k steps, evaluated together,
    could cross between the ranks)."""
    from ..distributed.engine import Ranks

    if parallel.mode is not None and prompt_cache is not None:
        raise click.UsageError("--prompt-cache does not go with --parallel: each rank holds only its part of the "
                               "cache; leave it out")
    check_parallel_draft(parallel, draft_model)
    return Ranks.start(parallel)


def check_parallel_draft(parallel: Any, draft_model: str | None) -> None:
    if parallel.mode == "pipeline" and draft_model is not None:
        raise click.UsageError("--draft-model does not go with --parallel pipeline: its steps would wait on each "
                               "other across the ranks; use --parallel tensor, or --prompt-lookup")


# ---------------------------------------------------------------- printing a response


def print_stats(stats: Any) -> None:
    computed = stats.prompt_tokens - stats.cached_tokens
    click.echo(
        f"prompt: {stats.prompt_tokens} tokens ({stats.cached_tokens} cached), "
        f"{computed} computed at {stats.prompt_tps:.1f} tok/s\n"
        f"reasoning: {stats.reasoning_tokens} tokens, answer: {stats.answer_tokens} tokens"
        f"{f', forced: {stats.forced_tokens}' if stats.forced_tokens else ''}"
        f"{' (thinking budget reached)' if stats.budget_exhausted else ''}\n"
        f"generation: {stats.generation_tps:.1f} tok/s, time to first token: {stats.time_to_first_token:.2f} s\n"
        f"{speculation(stats.drafted_tokens, stats.accepted_tokens)}"
        f"peak memory: {stats.peak_memory_gb:.2f} GB, finish: {stats.finish_reason}",
        err=True,
    )


def speculation(drafted: int, accepted: int) -> str:
    """The speculative figures' line, when there were drafts."""
    if not drafted:
        return ""
    return f"speculative: {accepted} of {drafted} drafted tokens accepted ({accepted / drafted:.0%})\n"


class ResponsePrinter:
    """Prints chunks as they come. On a terminal the reasoning is dimmed; when stdout is not a terminal
    (a pipe, a file) dimming is invisible, so the reasoning is written as `<think>\\n...\\n</think>\\n\\n`
    before the answer, as Qwen3 itself writes it, and a script can split the two."""

    def __init__(self, hide_thinking: bool) -> None:
        self.hide, self.kind = hide_thinking, None
        self.terminal = sys.stdout.isatty()

    def __call__(self, kind: str, text: str) -> None:
        if not text or (kind == "reasoning" and self.hide):
            return
        if kind != self.kind:
            if kind == "reasoning" and not self.terminal:
                click.echo("<think>\n", nl=False)
            elif self.kind == "reasoning":
                self.close_reasoning()
                click.echo("\n\n", nl=False)
            self.kind = kind
        click.echo(click.style(text, dim=True) if kind == "reasoning" and self.terminal else text, nl=False)

    def close_reasoning(self) -> None:
        if self.kind == "reasoning" and not self.terminal:
            click.echo("\n</think>", nl=False)
        self.kind = None

    def end(self) -> None:
        self.close_reasoning()
        click.echo()


def print_response(chunks: Iterator[Any], display: Display, exit_on_interrupt: bool = True) -> Any:
    """Print a response, then the figures if asked; returns the final stats.

    Ctrl-C stops the answer: what came so far stays printed, the figures follow, then exit 130
    (or, in a chat, the next prompt).
    """
    printer, stats = ResponsePrinter(display.hide_thinking), None
    try:
        for chunk in chunks:
            stats = chunk.stats
            printer(chunk.kind, chunk.text)
    except KeyboardInterrupt:
        chunks.close()  # type: ignore[attr-defined]  # runs the generator's clean-up now, not when collected
        printer.end()
        if stats is not None:
            stats.finish_reason = "interrupted"
            print_stats(stats)
        click.echo("interrupted", err=True)
        if exit_on_interrupt:
            # Leave at once: nothing is left to save, and MLX's queued step need not be waited for.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return stats
    printer.end()
    if display.verbose and stats is not None:
        print_stats(stats)
    return stats


def _show_warning(message: Any, *args: Any, **kwargs: Any) -> None:
    click.echo(f"warning: {message}", err=True)


def prefill_progress(step: int) -> Callable[[int, int], None]:
    """A line per prefill chunk (rewritten in place), for prompts of more than one chunk."""

    def show(done: int, total: int) -> None:
        if total > step:
            click.echo(f"\rprefill {done}/{total} tokens", err=True, nl=done == total)

    return show


# ---------------------------------------------------------------- generate


def read_prompt(prompt: str, until_empty_line: bool = False) -> str:
    """The prompt text; "-" reads standard input, which must be UTF-8: to its end, or `until_empty_line`
    (under mlx.launch, whose pipe to a rank never ends). An empty prompt is refused."""
    text = prompt
    if prompt == "-":
        data = read_until_empty_line() if until_empty_line else sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Qwen3Error(f"stdin: not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                             f"pipe UTF-8 text") from None
    if not text.strip():  # the same rule with and without --raw, and in chat: nothing is sent
        raise Qwen3Error("the prompt is empty; give some text")
    return text


def read_until_empty_line() -> bytes:
    """Standard input up to its first empty line, or its end."""
    lines = []
    while (line := sys.stdin.buffer.readline()).strip(b"\r\n"):
        lines.append(line)
    return b"".join(lines)


def check_raw(raw: bool, system: str | None, prefill_response: str | None) -> None:
    """--raw sends the prompt as it is: options that only the chat template can apply are refused, not dropped."""
    if not raw:
        return
    ctx = click.get_current_context()
    given = [f"--{name.replace('_', '-')}" for name, value in
             (("system", system), ("prefill_response", prefill_response)) if value is not None]
    if ctx.params.get("chat_template_config") is not None:
        given.append("--chat-template-config")
    if given:
        raise click.UsageError(f"{given[0]} needs the chat template, which --raw skips; "
                               f"write it into the raw prompt instead")


def check_writable(path: Path | None) -> None:
    """Fail before the run, not after it, when a file cannot be written where the user asked."""
    if path is not None and not path.parent.is_dir():
        raise Qwen3Error(f"{path}: the folder {path.parent} does not exist; create it or choose another path")


def check_one_source(prompt: str | None, prompts_file: Path | None, output: Path | None,
                     prompt_cache: Path | None, prefill_response: str | None, options: GenerationOptions) -> None:
    """One prompt (-p) or a file of them, and only the options that apply to it."""
    if prompt is not None and prompts_file is not None:
        raise click.UsageError("-p/--prompt and --prompts-file exclude each other; give one")
    if prompt is None and prompts_file is None:
        raise click.UsageError("give a prompt: -p/--prompt TEXT, or --prompts-file FILE")
    ctx = click.get_current_context()
    if prompts_file is None:
        from click.core import ParameterSource

        given = [name for name, value in (("--output", output is not None),
                 ("--max-batch", ctx.get_parameter_source("max_batch") == ParameterSource.COMMANDLINE)) if value]
        if given:
            raise click.UsageError(f"{given[0]} applies only with --prompts-file")
        return
    refused = [(name, why) for name, value, why in (
        ("--prompt-cache", prompt_cache, "a cache file holds one prompt"),
        ("--prefill-response", prefill_response, "it is for one prompt")) if value is not None]
    if refused:
        raise click.UsageError(f"{refused[0][0]} does not go with --prompts-file: {refused[0][1]}")


def generate_batch(model: str, path: Path, output: Path | None, max_batch: int, system: str | None, raw: bool,
                   options: GenerationOptions, display: Display, ranks: Any, draft_model: str | None = None) -> None:
    """--prompts-file: every request checked before any is generated, then all of them batched (each
    drafting with --draft-model or --prompt-lookup), the results written in input order (under
    mlx.launch, by rank 0)."""
    import time
    import warnings

    from ..distributed.engine import request_json
    from .prompts_file import read_batch_file, result_record, write_jsonl

    batch = read_batch_file(path, options, system, raw=raw, model=model)
    if raw and batch.format != "text":
        raise click.UsageError(f"--raw takes a text file of prompts; {path} holds {batch.format} JSON lines, "
                               "whose messages need the chat template")
    output = output if ranks.leader else None  # rank 0 alone writes the results
    check_writable(output)
    loaded, tokenizer = ranks.load(model)
    draft = ranks.load_draft(draft_model, tokenizer)
    check_batch_requests(loaded, tokenizer, batch.requests, path)
    ranks.agree(f"{path}'s requests", [request_json(r.prompt, r.options) for r in batch.requests])
    warnings.showwarning = _show_warning
    start = time.perf_counter()
    with click.progressbar(length=len(batch.requests), label="generating", file=sys.stderr, show_pos=True) as bar:
        # Prompts go in chunks of --prefill-step-size (their options'), 256 tokens between two decode
        # steps (the scheduler's default prefill_budget), as the server computes them.
        results = ranks.batch_generate(loaded, tokenizer, [r.prompt for r in batch.requests],
                                       [r.options for r in batch.requests], max_batch=max_batch,
                                       progress=lambda done, total: bar.update(done - bar.pos), draft_model=draft)
    if results is None:  # a rank other than 0: rank 0 writes them
        return
    seconds = time.perf_counter() - start
    records = [result_record(batch.format, i, request, result, tokenizer, hide_reasoning=display.hide_thinking)
               for i, (request, result) in enumerate(zip(batch.requests, results))]
    write_jsonl(records, output, lambda text: click.echo(text, nl=False))
    if display.verbose:
        print_batch_stats(results, seconds)


def check_batch_requests(model: Any, tokenizer: Any, requests: list, path: Path) -> None:
    """Prepare every request as batch_generate will (its prompt encoded and fitted to the context, its
    sampling checked), so that a bad one is named by its line before anything runs."""
    import warnings

    from ..generation.request import prepare

    with warnings.catch_warnings():  # batch_generate gives them, once
        warnings.simplefilter("ignore")
        for request in requests:
            try:
                prepare(model, tokenizer, request.prompt, request.options)
            except Qwen3Error as e:
                raise Qwen3Error(f"{path}:{request.line}: {e}") from None


def print_batch_stats(results: list, seconds: float) -> None:
    prompt = sum(r.stats.prompt_tokens for r in results)
    cached = sum(r.stats.cached_tokens for r in results)
    generated = sum(len(r.token_ids) for r in results)
    click.echo(f"{len(results)} responses in {seconds:.1f} s; prompts: {prompt} tokens ({cached} cached); "
               f"generated: {generated} tokens, {generated / seconds if seconds else 0:.1f} tok/s in all", err=True)
    drafted, accepted = sum(r.stats.drafted_tokens for r in results), sum(r.stats.accepted_tokens for r in results)
    click.echo(speculation(drafted, accepted), err=True, nl=False)


@main.command(context_settings=CONTEXT)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--prompt", "-p", help='The prompt; "-" reads standard input. Must not be empty. Not with --prompts-file.')
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
              help="Run many prompts, batched: a text file (one prompt a line), JSON lines of chat messages with "
                   "per-line options, or OpenAI batch JSON lines. Writes one JSON result a line, in input order.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="With --prompts-file: write the results to FILE (complete or not at all), not standard output.")
@click.option("--max-batch", type=click.IntRange(min=1), default=DEFAULT_MAX_BATCH, show_default=True,
              help="With --prompts-file: most prompts decoded together.")
@click.option("--system", "--system-prompt", "-s",
              help="System prompt (not with --raw); with --prompts-file, of every prompt without one of its own.")
@click.option("--raw", "--ignore-chat-template", is_flag=True,
              help="Complete the prompt as is, without the chat template.")
@click.option("--prefill-response", metavar="TEXT",
              help="The response begins with TEXT (not printed again); the model continues it.")
@click.option("--prompt-cache", "--prompt-cache-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Reuse the cache of the prompt's shared prefix saved in this file, and save this prompt's.")
@user_errors
@generation_options
@parallel_options
@version
def generate(model: str, prompt: str | None, prompts_file: Path | None, output: Path | None, max_batch: int,
             system: str | None, raw: bool, prefill_response: str | None, prompt_cache: Path | None,
             draft_model: str | None, parallel: Any, options: GenerationOptions, display: Display) -> None:
    """Generate a response to one prompt, or to each of a file's (--prompts-file).

    On a terminal the reasoning is dimmed; piped, it comes first inside <think> ... </think>.

    \b
    --prompts-file FILE: its first non-empty line sets the file's format:
    - {"messages": [...], ...}: chat JSON lines; a line may carry
      "custom_id" and generation options by their field names
      ("max_tokens", "temp", "thinking_budget", ...), which override
      the command line's
    - {"custom_id": ..., "body": {...}}: OpenAI's batch input, as vLLM's
      run_batch reads it; the results are OpenAI's batch output lines
    - anything else: a text file, each non-empty line a prompt
    \b
    A bad line stops the run before anything is generated (exit 1):
      error: FILE:LINE: the problem
    Results, one JSON object a line, in input order (text and chat):
      {"index", "custom_id" (if given), "reasoning", "content",
       "finish_reason", "budget_exhausted", "usage": {...}}
    A progress bar goes to standard error.
    """
    import warnings

    from ..distributed.engine import request_json
    from ..generation.prompt_cache import open_prompt_cache, save_prompt_cache
    from ..generation.single import stream_generate
    from ..text.prompt import Prompt, encode_prompt

    check_raw(raw, system, prefill_response)
    check_one_source(prompt, prompts_file, output, prompt_cache, prefill_response, options)
    ranks = start_ranks(parallel, draft_model, prompt_cache)
    if prompts_file is not None:
        generate_batch(model, prompts_file, output, max_batch, system, raw, options, display, ranks, draft_model)
        return
    # Under mlx.launch rank 0 reads stdin, up to an empty line (the launcher's pipe never ends), for every rank.
    text = ranks.from_leader(functools.partial(read_prompt, prompt, ranks.launched))
    check_writable(prompt_cache)
    loaded, tokenizer = ranks.load(model)
    draft = ranks.load_draft(draft_model, tokenizer)
    # The ids are what the prompt cache is matched against; the prefill is part of them.
    ids, thinking = encode_prompt(tokenizer, Prompt(text, system=system, raw=raw, prefill_response=prefill_response),
                                  think=options.think)
    ranks.agree("the prompt's token ids and options", request_json(Prompt(ids), options))
    cache = None
    if prompt_cache is not None:
        cache = open_prompt_cache(prompt_cache, loaded, tokenizer, ids, system, options.max_kv_size,
                                  options.kv_quantization)
    chunks = stream_generate(ranks.watched(loaded), tokenizer, Prompt(ids, system=system),
                             options.replace(think=thinking), cache=cache,
                             progress=prefill_progress(options.prefill_step_size), draft_model=ranks.watched(draft))
    warnings.showwarning = _show_warning
    with ranks.steps():
        stats = print_response(chunks, display)
    if cache is not None and not save_prompt_cache(prompt_cache, cache, ids, loaded):
        click.echo(f"warning: {prompt_cache} not saved: the rotating cache has moved past the prompt", err=True)
    check_complete(stats, options)


def check_complete(stats: Any, options: GenerationOptions) -> None:
    """A structured answer cut by a limit may not match its schema: say so, and exit 4."""
    constrained = next((f"--{name.replace('_', '-')}" for name in ("json_schema", "regex", "grammar")
                        if getattr(options, name) is not None), None)
    if constrained and stats is not None and stats.finish_reason == "length":
        click.echo(f"error: the answer was cut at {len(stats.token_ids)} tokens before it was complete, so it may "
                   f"not match {constrained}; raise --max-tokens (-m)", err=True)
        sys.exit(4)


# ---------------------------------------------------------------- chat

CHAT_HELP = """commands:
  /think, /no_think   switch thinking on or off (Qwen3's soft switch, sent with your next message)
  /budget N|off       limit the reasoning to N tokens
  /system TEXT        set the system prompt (empty to remove it)
  /reset              start a new conversation
  /save FILE          save the conversation and its cache
  /load FILE          load a saved conversation (from the same model)
  /stats              figures of the last answer
  /help               this list
  /exit, /quit        leave (Ctrl-D too); Ctrl-C stops an answer
input:
  a line ending in \\ continues on the next line (a message of several lines)
  //text              sends /text as a message"""


def chat_command(session: Any, line: str) -> bool:
    """Run one /command; False when the chat should end."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/bye"):
        return False
    if name in ("/think", "/no_think"):
        session.set_thinking(name == "/think")
        click.echo(f"thinking {'on' if name == '/think' else 'off'}", err=True)
    elif name == "/budget":
        if arg != "off" and not arg.isdigit():
            raise OptionError(f"/budget takes a number of tokens >= 0 or 'off', got {arg!r}")
        session.set_budget(None if arg == "off" else int(arg))
        click.echo(f"thinking budget: {arg}", err=True)
    elif name == "/system":
        session.set_system(arg)
        click.echo("system prompt set" if arg else "system prompt removed", err=True)
    elif name == "/reset":
        session.reset()
        click.echo("new conversation", err=True)
    elif name in ("/save", "/load"):
        save_or_load(session, name, arg)
    elif name == "/stats":
        if session.last is None:
            click.echo("no answer yet", err=True)
        else:
            print_stats(session.last)
    elif name == "/help":
        click.echo(CHAT_HELP, err=True)
    else:
        raise OptionError(f"unknown command {name}; /help lists them")
    return True


def save_or_load(session: Any, name: str, arg: str) -> None:
    if not arg:
        raise OptionError(f"{name} needs a file name")
    path = Path(arg).expanduser()
    if name == "/load":
        session.load(path)
        click.echo(f"loaded {len(session.messages)} messages, {len(session.cached)} cached tokens: {arg}", err=True)
        return
    check_writable(path)
    saved = session.save(path)
    held = f"{saved.held} cached tokens" if saved.held == saved.tokens else (
        f"{saved.held} of {saved.tokens} tokens cached (the rotating cache keeps the start and the latest)")
    click.echo(f"saved {len(session.messages)} messages, {held}: {arg}", err=True)


def read_message(interactive: bool) -> str | None:
    """The next message or command, None at the end of input. A line ending in a backslash continues
    on the next one, so a message can hold several lines."""
    lines: list[str] = []
    while True:
        if interactive:
            try:
                line = input("... " if lines else ">>> ")
            except EOFError:
                line = None
        else:
            line = sys.stdin.readline() or None
        if line is None:
            return "\n".join(lines) if lines else None
        line = line.rstrip("\n")
        if not line.endswith("\\"):
            return "\n".join(lines + [line])
        lines.append(line[:-1])


def is_command(line: str) -> bool:
    """A line starting with / is a command, except //text (the message /text) and a soft switch
    followed by text ("/no_think what is 2+2?" is a message carrying Qwen3's switch)."""
    word = line.split()[0]
    if not word.startswith("/") or word.startswith("//"):
        return False
    return word not in ("/think", "/no_think") or line.strip() == word


@main.command(context_settings=CONTEXT)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--system", "--system-prompt", "-s", help="System prompt (/system changes it).")
@user_errors
@generation_options
@parallel_options
@version
def chat(model: str, system: str | None, draft_model: str | None, parallel: Any, options: GenerationOptions,
         display: Display) -> None:
    """Chat with the model; the KV cache is reused from turn to turn. /help lists the commands.

    A line ending in \\ continues the message on the next line; //text sends /text.
    Under mlx.launch (--parallel), rank 0 reads the lines and hands each to every rank; /save and /load
    are refused there, and Ctrl-C ends the chat.
    """
    import warnings

    from ..generation.chat import ChatSession

    ranks = start_ranks(parallel, draft_model)
    loaded, tokenizer = ranks.load(model)
    session = ChatSession(ranks.watched(loaded), tokenizer, options, system=system,
                          draft_model=ranks.watched(ranks.load_draft(draft_model, tokenizer)))
    warnings.showwarning = _show_warning
    interactive = sys.stdin.isatty() and not ranks.launched
    if interactive:
        try:  # line editing and history for input(); absent on some platforms, where input() still works
            import readline  # noqa: F401
        except ImportError:
            pass
        click.echo(f"chatting with {model}; /help for commands, /exit to leave", err=True)
    while (line := ranks.from_leader(functools.partial(read_message, interactive))) is not None:
        if not line.strip():  # an empty line sends nothing, as an empty prompt is refused everywhere
            continue
        # Under the launcher: a lost rank ends the chat (the steps' error, outside the try); so does Ctrl-C,
        # as every rank must stop alike.
        with ranks.steps():
            try:
                if is_command(line):
                    if ranks.launched and line.split()[0] in ("/save", "/load"):
                        raise OptionError(f"{line.split()[0]} does not go with --parallel: each rank holds only "
                                          f"its part of the cache")
                    if not chat_command(session, line):
                        break
                    continue
                text = line.strip()[1:] if line.lstrip().startswith("//") else line
                print_response(session.send(text), display, exit_on_interrupt=ranks.launched)
            except (Qwen3Error, OSError) as e:  # a bad command or file: say so (rank 0: all met it) and go on
                if ranks.leader:
                    click.echo(f"error: {describe(e)}", err=True)


# ---------------------------------------------------------------- convert


def one_of(argument: Any, option: Any, names: str) -> Any:
    """SOURCE / OUTPUT may also be given as mlx_lm's --hf-path / --mlx-path: exactly one of each pair."""
    if argument is not None and option is not None:
        raise click.UsageError(f"{names}: give one of them, not both")
    if argument is None and option is None:
        raise click.UsageError(f"{names}: one of them is required")
    return argument if argument is not None else option


BITS = click.Choice(["2", "3", "4", "5", "6", "8"])


@main.command(context_settings=CONTEXT)
@click.argument("source", required=False)
@click.argument("output", required=False, type=click.Path(path_type=Path))
@click.option("--hf-path", "--model", metavar="SOURCE", help="mlx_lm's name for SOURCE.")
@click.option("--mlx-path", type=click.Path(path_type=Path), metavar="OUTPUT", help="mlx_lm's name for OUTPUT.")
@click.option("--quantize", "-q", is_flag=True, help="Quantize Linear and Embedding weights (affine, as mlx-lm).")
@click.option("--bits", "--q-bits", type=BITS, default="4", show_default=True, help="Bits per quantized weight.")
@click.option("--group-size", "--q-group-size", type=click.Choice(["32", "64", "128"]), default="64",
              show_default=True, help="Weights sharing one scale and bias.")
@click.option("--embed-bits", type=BITS,
              help="Bits of the embedding / lm_head. Default: 8 when --bits is below 8, else --bits.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Dtype of unquantized tensors and scales. Default: the source's (bfloat16 for a float32 source "
                   "being quantized).")
@click.option("--dequantize", "-d", is_flag=True, help="Turn a quantized MLX checkpoint back into float weights.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--weights-only", is_flag=True,
              help="Allow a SOURCE without tokenizer.json: OUTPUT then holds the weights and config only.")
@user_errors
@version
def convert(source: str | None, output: Path | None, hf_path: str | None, mlx_path: Path | None, quantize: bool,
            bits: str, group_size: str, embed_bits: str | None, dtype: str | None, dequantize: bool,
            force: bool, weights_only: bool) -> None:
    """Convert SOURCE (a Hugging Face or MLX folder, or a Hub repo id) into an MLX folder OUTPUT."""
    from click.core import ParameterSource

    from ..checkpoint.converter import convert as convert_checkpoint

    source = one_of(source, hf_path, "SOURCE or --hf-path")
    output = one_of(output, mlx_path, "OUTPUT or --mlx-path")
    ctx = click.get_current_context()
    for name in ("bits", "group_size"):
        if not quantize and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            raise click.UsageError(f"--{name.replace('_', '-')} applies only with --quantize")

    bar = None

    def show(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # the total is known once the source has been read
            bar = click.progressbar(length=total, label="converting", file=sys.stderr)
        bar.update(done - bar.pos)

    try:
        result = convert_checkpoint(source, output, quantize=quantize, bits=int(bits), group_size=int(group_size),
                                    embed_bits=int(embed_bits) if embed_bits else None, dtype=dtype,
                                    dequantize=dequantize, force=force, weights_only=weights_only, progress=show)
    finally:
        if bar is not None:
            bar.render_finish()
    click.echo(f"wrote {output}: {result.bits_per_weight:.2f} bits per weight, "
               f"{human_size(result.size_bytes)} in {result.seconds:.1f} s")


# ---------------------------------------------------------------- serve


@main.command(context_settings=CONTEXT)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 opens it to the network (set --api-key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on; a busy one fails at once (exit 1), before the model loads.")
@click.option("--served-model-name", "served_model_names", multiple=True, metavar="NAME",
              help="A name requests may give as `model` (repeatable); the first is the one responses report. "
                   "Default: --model as given.")
@click.option("--api-key", envvar="QWEN3_MLX_API_KEY", metavar="KEY",
              help="Require `Authorization: Bearer KEY` on /v1/* (also read from QWEN3_MLX_API_KEY).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most requests decoded together; the others wait in a queue.")
@click.option("--memory-limit", type=click.FloatRange(min=0, min_open=True), metavar="GB",
              help="Most memory the server may take in all: weights, KV caches at their worst, prompt cache and "
                   "activations; a request waits until it fits, and one that never could is refused. "
                   "Default: 75% of the device's.")
@click.option("--kv-memory", type=click.FloatRange(min=0, min_open=True), metavar="GB",
              help="A finer bound on the batch's KV cache alone, within --memory-limit. Default: none.")
@click.option("--prompt-cache-gb", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Memory for caches of recent prompts, reused by requests that share a prefix (0: none).")
@click.option("--kv-bits", type=click.Choice(["4", "8"]), callback=int_choice,
              help="Store every request's KV cache in 8 or 4 bits (about 0.53x / 0.28x of bf16). "
                   "Default: the model's dtype.")
@click.option("--max-kv-size", type=click.IntRange(min=1), metavar="N",
              help="Every request's cache a rotating one of N tokens that keeps its system prompt: a conversation "
                   "may then run past the context, its memory bounded.")
@click.option("--thinking-budget", type=click.IntRange(min=0), metavar="N",
              help="Default thinking budget of requests that give none.")
@click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=DEFAULTS.max_tokens, show_default=True,
              help="Most tokens a request may generate, reasoning included (larger max_tokens are lowered to it); "
                   "also the default.")
@click.option("--cors-origin", metavar="ORIGIN", help="Allow browsers on ORIGIN to call the API (CORS is off without).")
@click.option("--grace", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="SECONDS",
              help="After SIGTERM or Ctrl-C, how long running requests may take to finish before they are cancelled.")
@click.option("--no-ui", is_flag=True, help="Do not serve the chat page at / (the APIs alone).")
@click.option("--draft-model", metavar="MODEL",
              help="Speculative decoding for every request: this smaller model of the same family (folder or Hub id) "
                   "drafts tokens the model checks in one pass; the output is the model's own.")
@click.option("--prompt-lookup", is_flag=True,
              help="Speculative decoding for every request by drafting what followed the last words earlier in its "
                   "prompt or text; costs nothing when nothing matches.")
@click.option("--num-draft-tokens", type=click.IntRange(min=0), default=DEFAULTS.num_draft_tokens, show_default=True,
              metavar="K", help="With --draft-model or --prompt-lookup: the longest draft of a request that gives no "
                                "num_draft_tokens of its own (0: none).")
@user_errors
@parallel_options
@version
def serve(model: str, host: str, port: int, served_model_names: tuple[str, ...], api_key: str | None,
          max_batch: int, memory_limit: float | None, kv_memory: float | None, prompt_cache_gb: float,
          kv_bits: int | None, max_kv_size: int | None, thinking_budget: int | None, max_tokens: int,
          cors_origin: str | None, grace: float, no_ui: bool, draft_model: str | None, prompt_lookup: bool,
          num_draft_tokens: int, parallel: Any) -> None:
    """Serve the model over HTTP: OpenAI's API (/v1/chat/completions, /v1/completions, /v1/responses,
    /v1/models), Anthropic's (/v1/messages), /health, and a chat page at / (--no-ui: none); /docs
    describes it. Needs the serve extra: pip install "qwen3-mlx[serve]".

    SIGTERM or Ctrl-C stops admitting (new requests get a 503) and lets running requests finish
    (--grace; a second signal cancels them: they end with an error), then exits 0 (SIGTERM) or
    130 (Ctrl-C).

    Under mlx.launch (--parallel) rank 0 serves, every rank computes; a rank lost ends the requests in
    flight with an error, then the server (exit 1). --kv-memory and --prompt-cache-gb are then per rank.
    """
    check_parallel_draft(parallel, draft_model)
    try:
        from ..server.serve import serve as run_server
    except ImportError as e:  # FastAPI or uvicorn missing
        raise Qwen3Error(f"serve needs the serve extra ({e.name} is not installed): "
                         f'pip install "qwen3-mlx[serve]"') from None
    run_server(model, host=host, port=port, served_model_names=served_model_names, api_key=api_key,
               max_batch=max_batch, kv_memory=int(kv_memory * 1e9) if kv_memory else None,
               memory_limit=int(memory_limit * 1e9) if memory_limit else None, max_kv_size=max_kv_size,
               prompt_cache_bytes=int(prompt_cache_gb * 1e9), kv_bits=kv_bits, thinking_budget=thinking_budget,
               max_tokens=max_tokens, cors_origin=cors_origin, grace=grace, parallel=parallel, ui=not no_ui,
               draft_model=draft_model, prompt_lookup=prompt_lookup, num_draft_tokens=num_draft_tokens)
