"""What the commands print: a response as it streams, its figures, warnings, and errors as one line."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import click

from ..errors import OptionError, Qwen3Error


@dataclass(frozen=True)
class Display:
    """How a response is printed (not how it is generated)."""

    hide_thinking: bool = False
    verbose: bool = False


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


def show_warning(message: Any, *args: Any, **kwargs: Any) -> None:
    """warnings.showwarning for the commands: one line on stderr."""
    click.echo(f"warning: {message}", err=True)


# ---------------------------------------------------------------- figures


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


def print_batch_stats(results: list, seconds: float) -> None:
    prompt = sum(r.stats.prompt_tokens for r in results)
    cached = sum(r.stats.cached_tokens for r in results)
    generated = sum(len(r.token_ids) for r in results)
    click.echo(f"{len(results)} responses in {seconds:.1f} s; prompts: {prompt} tokens ({cached} cached); "
               f"generated: {generated} tokens, {generated / seconds if seconds else 0:.1f} tok/s in all", err=True)
    drafted, accepted = sum(r.stats.drafted_tokens for r in results), sum(r.stats.accepted_tokens for r in results)
    click.echo(speculation(drafted, accepted), err=True, nl=False)


def prefill_progress(step: int) -> Callable[[int, int], None]:
    """A line per prefill chunk (rewritten in place), for prompts of more than one chunk."""

    def show(done: int, total: int) -> None:
        if total > step:
            click.echo(f"\rprefill {done}/{total} tokens", err=True, nl=done == total)

    return show


# ---------------------------------------------------------------- a response


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
