"""`qwen3-mlx` command line: thin click front ends over the library.

Exit codes: 0 success, 1 runtime error (one line on stderr), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
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


def stream_to_terminal(chunks: Any, hide_thinking: bool, verbose: bool, exit_on_interrupt: bool = True) -> Any:
    """Print chunks as they come, the reasoning dimmed (or hidden), then the figures if asked.

    Ctrl-C stops the answer: what came so far stays printed, the figures follow, then exit 130
    (or, in a chat, the next prompt).
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
        chunks.close()  # runs the generator's clean-up now, not whenever it is collected
        click.echo()
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
@click.option("--prompt-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="Reuse the cache of the prompt's shared prefix saved in this file, and save this prompt's.")
@sampling_options
@user_errors
def generate(model: str, prompt: str, system: str | None, raw: bool, stop: tuple[str, ...],
             prompt_cache: Path | None, think: bool,
             thinking_budget: int | None, max_tokens: int, temp: float | None, top_p: float | None,
             top_k: int | None, min_p: float | None, presence_penalty: float | None,
             repetition_penalty: float | None, seed: int | None, max_kv_size: int | None,
             prefill_step_size: int, hide_thinking: bool, verbose: bool) -> None:
    """Generate a response to one prompt."""
    import warnings

    from .chat import open_prompt_cache, save_prompt_cache
    from .generation import encode_prompt, stream_generate
    from .loader import load

    text = read_prompt(prompt)
    loaded, tokenizer = load(model)
    ids, thinking = encode_prompt(tokenizer, text, system=system, think=think, raw=raw)
    cache = None
    if prompt_cache is not None and ids:
        cache = open_prompt_cache(prompt_cache, loaded, tokenizer, ids, system, max_kv_size)
    chunks = stream_generate(
        loaded, tokenizer, ids or text, system=system, raw=raw, stop=stop, think=thinking,
        thinking_budget=thinking_budget, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
        presence_penalty=presence_penalty, repetition_penalty=repetition_penalty, seed=seed, cache=cache,
        max_kv_size=max_kv_size, prefill_step_size=prefill_step_size, progress=prefill_progress(prefill_step_size))
    warnings.showwarning = _show_warning
    stream_to_terminal(chunks, hide_thinking, verbose)
    if cache is not None and not save_prompt_cache(prompt_cache, cache, ids, loaded):
        click.echo(f"warning: {prompt_cache} not saved: the rotating cache has moved past the prompt", err=True)


# ---------------------------------------------------------------- chat

CHAT_HELP = """commands:
  /think, /no_think   switch thinking on or off (Qwen3's soft switch, sent with your next message)
  /budget N|off       limit the reasoning to N tokens
  /system TEXT        set the system prompt (empty to remove it)
  /reset              start a new conversation
  /save FILE          save the conversation and its cache
  /load FILE          load a saved conversation (from the same model)
  /stats              figures of the last answer
  /quit               leave (Ctrl-D too); Ctrl-C stops an answer"""


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
        if arg == "off":
            session.options["thinking_budget"] = None
        elif arg.isdigit():
            session.options["thinking_budget"] = int(arg)
        else:
            raise OptionError(f"/budget takes a number of tokens >= 0 or 'off', got {arg!r}")
        click.echo(f"thinking budget: {session.options['thinking_budget'] if arg != 'off' else 'off'}", err=True)
    elif name == "/system":
        session.set_system(arg)
        click.echo("system prompt set" if arg else "system prompt removed", err=True)
    elif name == "/reset":
        session.reset()
        click.echo("new conversation", err=True)
    elif name in ("/save", "/load"):
        if not arg:
            raise OptionError(f"{name} needs a file name")
        (session.save if name == "/save" else session.load)(Path(arg).expanduser())
        click.echo(f"{'saved' if name == '/save' else 'loaded'} {len(session.messages)} messages, "
                   f"{len(session.cached)} cached tokens: {arg}", err=True)
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


@main.command()
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True, help="Checkpoint folder or Hub repo id.")
@click.option("--system", "-s", help="System prompt.")
@sampling_options
@user_errors
def chat(model: str, system: str | None, think: bool, thinking_budget: int | None, max_tokens: int,
         temp: float | None, top_p: float | None, top_k: int | None, min_p: float | None,
         presence_penalty: float | None, repetition_penalty: float | None, seed: int | None,
         max_kv_size: int | None, prefill_step_size: int, hide_thinking: bool, verbose: bool) -> None:
    """Chat with the model; the KV cache is reused from turn to turn. /help lists the commands."""
    import warnings

    from .chat import ChatSession
    from .loader import load

    loaded, tokenizer = load(model)
    session = ChatSession(loaded, tokenizer, system=system, think=think, thinking_budget=thinking_budget,
                          max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                          presence_penalty=presence_penalty, repetition_penalty=repetition_penalty, seed=seed,
                          max_kv_size=max_kv_size, prefill_step_size=prefill_step_size)
    warnings.showwarning = _show_warning
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"chatting with {model}; /help for commands, /quit to leave", err=True)
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            word = line.split()[0]
            # "/no_think" alone is a command; followed by text it is a message carrying the soft switch.
            if word.startswith("/") and (word not in ("/think", "/no_think") or line.strip() == word):
                if not chat_command(session, line):
                    break
                continue
            stream_to_terminal(session.send(line), hide_thinking, verbose, exit_on_interrupt=False)
        except Qwen3Error as e:  # a bad command or file: say so and go on chatting
            click.echo(f"error: {e}", err=True)


# ---------------------------------------------------------------- convert


@main.command()
@click.argument("source")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--quantize", "-q", is_flag=True, help="Quantize Linear and Embedding weights (affine, as mlx-lm).")
@click.option("--bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default="4", show_default=True)
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--embed-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]),
              help="Bits of the embedding / lm_head. Default: 8 when --bits is below 8, else --bits.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Dtype of unquantized tensors and scales. Default: the source's (bfloat16 for a float32 source "
                   "being quantized).")
@click.option("--dequantize", is_flag=True, help="Turn a quantized MLX checkpoint back into float weights.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@user_errors
def convert(source: str, output: Path, quantize: bool, bits: str, group_size: str, embed_bits: str | None,
            dtype: str | None, dequantize: bool, force: bool) -> None:
    """Convert SOURCE (a Hugging Face or MLX folder, or a Hub repo id) into an MLX folder OUTPUT."""
    from click.core import ParameterSource

    from .converter import convert as convert_checkpoint

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
                                    dequantize=dequantize, force=force, progress=show)
    finally:
        if bar is not None:
            bar.render_finish()
    click.echo(f"wrote {output}: {result.bits_per_weight:.2f} bits per weight, "
               f"{result.size_bytes / 1e9:.2f} GB in {result.seconds:.1f} s")
