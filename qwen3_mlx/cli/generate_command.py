"""`qwen3-mlx generate`: one prompt streamed to the terminal, or a --prompts-file's prompts batched."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import Qwen3Error
from ..generation.options import EngineOptions, GenerationOptions
from .display import (
    Display,
    prefill_progress,
    print_batch_stats,
    print_response,
    show_warning,
    user_errors,
)
from .options import (
    CONTEXT,
    MAX_BATCH,
    adapter_option,
    check_writable,
    generation_options,
    model_option,
    parallel_options,
    start_ranks,
    version,
)


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


def check_one_source(prompt: str | None, prompts_file: Path | None, output: Path | None,
                     prompt_cache: Path | None, prefill_response: str | None) -> None:
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


def check_complete(stats: Any, options: GenerationOptions) -> None:
    """A structured answer cut by a limit may not match its schema: say so, and exit 4."""
    constrained = next((f"--{name.replace('_', '-')}" for name in ("json_schema", "regex", "grammar")
                        if getattr(options, name) is not None), None)
    if constrained and stats is not None and stats.finish_reason == "length":
        click.echo(f"error: the answer was cut at {len(stats.token_ids)} tokens before it was complete, so it may "
                   f"not match {constrained}; raise --max-tokens (-m)", err=True)
        sys.exit(4)


# ---------------------------------------------------------------- one prompt, or a file of them


def generate_one(model: str, parts: tuple[str, str | None, bool, str | None], prompt_cache: Path | None,
                 draft_model: str | None, ranks: Any, options: GenerationOptions, display: Display,
                 adapter_path: str | None = None) -> None:
    """One prompt (its text, system, raw, prefill_response), streamed; its cache reused from and saved
    to `prompt_cache` when given."""
    import warnings

    from ..distributed.wire import request_json
    from ..generation.prompt_cache import CachedPrompt
    from ..generation.single import stream_generate
    from ..text.prompt import Prompt

    text, system, raw, prefill_response = parts
    check_writable(prompt_cache)
    loaded, tokenizer = ranks.load(model, adapter_path)
    draft = ranks.load_draft(draft_model, tokenizer)
    cached = CachedPrompt.open(loaded, tokenizer, Prompt(text, system=system, raw=raw,
                                                         prefill_response=prefill_response), options, prompt_cache)
    ranks.agree("the prompt's token ids and options", request_json(Prompt(cached.prompt.content), options))
    chunks = stream_generate(ranks.watched(loaded), tokenizer, cached.prompt, cached.options, cache=cached.cache,
                             progress=prefill_progress(options.prefill_step_size), draft_model=ranks.watched(draft))
    warnings.showwarning = show_warning
    with ranks.steps():
        stats = print_response(chunks, display)
    if not cached.save(loaded):
        click.echo(f"warning: {prompt_cache} not saved: the rotating cache has moved past the prompt", err=True)
    check_complete(stats, options)


def generate_batch(model: str, path: Path, output: Path | None, engine: EngineOptions, system: str | None, raw: bool,
                   options: GenerationOptions, display: Display, ranks: Any, draft_model: str | None = None,
                   adapter_path: str | None = None) -> None:
    """--prompts-file: every request checked before any is generated, then all of them batched (each
    drafting with --draft-model or --prompt-lookup), the results written in input order (under
    mlx.launch, by rank 0)."""
    import time
    import warnings

    from ..distributed.batch import batch_generate_across
    from ..distributed.wire import request_json
    from ..generation.batch_check import check_requests
    from .prompts_file import read_batch_file, result_record, write_jsonl

    batch = read_batch_file(path, options, system, raw=raw, model=model)
    if raw and batch.format != "text":
        raise click.UsageError(f"--raw takes a text file of prompts; {path} holds {batch.format} JSON lines, "
                               "whose messages need the chat template")
    output = output if ranks.leader else None  # rank 0 alone writes the results
    check_writable(output)
    loaded, tokenizer = ranks.load(model, adapter_path)
    draft = ranks.load_draft(draft_model, tokenizer)
    check_requests(loaded, tokenizer, [(f"{path}:{r.line}", r.prompt, r.options) for r in batch.requests])
    ranks.agree(f"{path}'s requests", [request_json(r.prompt, r.options) for r in batch.requests])
    warnings.showwarning = show_warning
    start = time.perf_counter()
    with click.progressbar(length=len(batch.requests), label="generating", file=sys.stderr, show_pos=True) as bar:
        # Prompts go in chunks of --prefill-step-size (their options'), 256 tokens between two decode
        # steps (EngineOptions' default prefill_budget), as the server computes them.
        results = batch_generate_across(ranks, loaded, tokenizer, [r.prompt for r in batch.requests],
                                        [r.options for r in batch.requests], engine_options=engine,
                                        progress=lambda done, total: bar.update(done - bar.pos), draft_model=draft)
    if results is None:  # a rank other than 0: rank 0 writes them
        return
    seconds = time.perf_counter() - start
    records = [result_record(batch.format, i, request, result, tokenizer, hide_reasoning=display.hide_thinking)
               for i, (request, result) in enumerate(zip(batch.requests, results))]
    write_jsonl(records, output, lambda text: click.echo(text, nl=False))
    if display.verbose:
        print_batch_stats(results, seconds)


# ---------------------------------------------------------------- the command


@click.command(context_settings=CONTEXT)
@model_option
@click.option("--prompt", "-p", help='The prompt; "-" reads standard input. Must not be empty. Not with --prompts-file.')
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
              help="Run many prompts, batched: a text file (one prompt a line), JSON lines of chat messages with "
                   "per-line options, or OpenAI batch JSON lines. Writes one JSON result a line, in input order.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="With --prompts-file: write the results to FILE (complete or not at all), not standard output.")
@MAX_BATCH
@click.option("--system", "--system-prompt", "-s",
              help="System prompt (not with --raw); with --prompts-file, of every prompt without one of its own.")
@click.option("--raw", "--ignore-chat-template", is_flag=True,
              help="Complete the prompt as is, without the chat template.")
@click.option("--prefill-response", metavar="TEXT",
              help="The response begins with TEXT (not printed again); the model continues it.")
@click.option("--prompt-cache", "--prompt-cache-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Reuse the cache of the prompt's shared prefix saved in this file, and save this prompt's.")
@adapter_option
@user_errors
@generation_options
@parallel_options
@version
def generate(model: str, prompt: str | None, prompts_file: Path | None, output: Path | None, max_batch: int,
             system: str | None, raw: bool, prefill_response: str | None, prompt_cache: Path | None,
             adapter_path: str | None, draft_model: str | None, parallel: Any, options: GenerationOptions,
             display: Display) -> None:
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
    check_raw(raw, system, prefill_response)
    check_one_source(prompt, prompts_file, output, prompt_cache, prefill_response)
    ranks = start_ranks(parallel, draft_model, prompt_cache)
    if prompts_file is not None:
        generate_batch(model, prompts_file, output, EngineOptions(max_batch=max_batch), system, raw, options, display,
                       ranks, draft_model, adapter_path)
        return
    # Under mlx.launch rank 0 reads stdin, up to an empty line (the launcher's pipe never ends), for every rank.
    text = ranks.from_leader(functools.partial(read_prompt, prompt, ranks.launched))
    generate_one(model, (text, system, raw, prefill_response), prompt_cache, draft_model, ranks, options, display,
                 adapter_path)
