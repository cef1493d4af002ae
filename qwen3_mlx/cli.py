"""`qwen3-mlx` command line: thin click front ends over the library.

Exit codes: 0 success, 1 runtime error (one line on stderr), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from .errors import OptionError, Qwen3Error

DEFAULT_MODEL = "mlx-community/Qwen3-1.7B-4bit"


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into one line on stderr (exit 1) and Ctrl-C into exit 130, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OptionError as e:
            raise click.UsageError(str(e)) from None
        except Qwen3Error as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group()
def main() -> None:
    """Run Qwen3 models with MLX: convert, generate, chat."""


# ---------------------------------------------------------------- generate


def read_prompt(prompt: str) -> str:
    """The prompt text; "-" reads standard input, which must be UTF-8."""
    if prompt != "-":
        return prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Qwen3Error(f"stdin: not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                         f"pipe UTF-8 text") from None


def print_stats(stats: Any) -> None:
    click.echo(
        f"prompt: {stats.prompt_tokens} tokens ({stats.cached_tokens} cached), {stats.prompt_tps:.1f} tok/s\n"
        f"reasoning: {stats.reasoning_tokens} tokens, answer: {stats.answer_tokens} tokens"
        f"{f', forced: {stats.forced_tokens}' if stats.forced_tokens else ''}"
        f"{' (thinking budget reached)' if stats.budget_exhausted else ''}\n"
        f"generation: {stats.generation_tps:.1f} tok/s, time to first token: {stats.time_to_first_token:.2f} s\n"
        f"peak memory: {stats.peak_memory_gb:.2f} GB, finish: {stats.finish_reason}",
        err=True,
    )


def stream_to_terminal(chunks: Any, hide_thinking: bool, verbose: bool) -> Any:
    """Print chunks as they come, the reasoning dimmed (or hidden), then the figures if asked.

    Ctrl-C stops the answer: what came so far stays printed, the figures follow, exit 130.
    """
    stats, kind = None, None
    try:
        for chunk in chunks:
            stats = chunk.stats
            if not chunk.text or (chunk.kind == "reasoning" and hide_thinking):
                continue
            if kind == "reasoning" and chunk.kind == "answer":
                click.echo("\n")
            kind = chunk.kind
            click.echo(click.style(chunk.text, dim=True) if kind == "reasoning" else chunk.text, nl=False)
    except KeyboardInterrupt:
        click.echo()
        if stats is not None:
            print_stats(stats)
        click.echo("interrupted", err=True)
        sys.exit(130)
    click.echo()
    if verbose and stats is not None:
        print_stats(stats)
    return stats


def _show_warning(message: Any, *args: Any, **kwargs: Any) -> None:
    click.echo(f"warning: {message}", err=True)


def prefill_progress(step: int) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        if total > step:
            click.echo(f"\rprefill {done}/{total} tokens", err=True, nl=done == total)

    return show


def sampling_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--think/--no-think", default=True, show_default=True, help="Qwen3 thinking mode (enable_thinking)."),
        click.option("--thinking-budget", type=click.IntRange(min=0), help="Most reasoning tokens; 0 = no reasoning."),
        click.option("--max-tokens", type=click.IntRange(min=0), default=4096, show_default=True,
                     help="Most answer tokens (with no budget: reasoning and answer together)."),
        click.option("--temp", type=click.FloatRange(min=0), help="Temperature; 0 is greedy. Default: Qwen's for the mode."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True)),
        click.option("--top-k", type=click.IntRange(min=0), help="0 switches it off."),
        click.option("--min-p", type=click.FloatRange(0, 1)),
        click.option("--presence-penalty", type=float),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True)),
        click.option("--seed", type=int, help="Makes sampling repeatable."),
        click.option("--max-kv-size", type=click.IntRange(min=1), help="Rotating cache of this many tokens."),
        click.option("--prefill-step-size", type=click.IntRange(min=1), default=2048, show_default=True),
        click.option("--hide-thinking", is_flag=True, help="Do not print the reasoning."),
        click.option("--verbose", "-v", is_flag=True, help="Print token counts, speeds and memory."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True, help="Checkpoint folder or Hub repo id.")
@click.option("--prompt", "-p", required=True, help='The prompt; "-" reads standard input.')
@click.option("--system", "-s", help="System prompt.")
@click.option("--raw", is_flag=True, help="Complete the prompt as is, without the chat template.")
@click.option("--stop", multiple=True, help="A string that ends the answer (repeatable).")
@sampling_options
@user_errors
def generate(model: str, prompt: str, system: str | None, raw: bool, stop: tuple[str, ...], think: bool,
             thinking_budget: int | None, max_tokens: int, temp: float | None, top_p: float | None,
             top_k: int | None, min_p: float | None, presence_penalty: float | None,
             repetition_penalty: float | None, seed: int | None, max_kv_size: int | None,
             prefill_step_size: int, hide_thinking: bool, verbose: bool) -> None:
    """Generate a response to one prompt."""
    import warnings

    from .generation import stream_generate
    from .loader import load

    text = read_prompt(prompt)
    loaded, tokenizer = load(model)
    chunks = stream_generate(
        loaded, tokenizer, text, system=system, raw=raw, stop=stop, think=think, thinking_budget=thinking_budget,
        max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
        presence_penalty=presence_penalty, repetition_penalty=repetition_penalty, seed=seed,
        max_kv_size=max_kv_size, prefill_step_size=prefill_step_size, progress=prefill_progress(prefill_step_size))
    warnings.showwarning = _show_warning
    stream_to_terminal(chunks, hide_thinking, verbose)
