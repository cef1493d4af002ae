"""`qwen3-mlx chat`: a conversation at the terminal, its /commands, and how its input is read."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import OptionError, Qwen3Error
from ..generation.options import GenerationOptions
from .display import Display, describe, print_response, print_stats, show_warning, user_errors
from .options import CONTEXT, check_writable, generation_options, model_option, parallel_options, start_ranks, version

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


def run_command(session: Any, line: str) -> bool:
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


@click.command(context_settings=CONTEXT)
@model_option
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
    warnings.showwarning = show_warning
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
                    if not run_command(session, line):
                        break
                    continue
                text = line.strip()[1:] if line.lstrip().startswith("//") else line
                print_response(session.send(text), display, exit_on_interrupt=ranks.launched)
            except (Qwen3Error, OSError) as e:  # a bad command or file: say so (rank 0: all met it) and go on
                if ranks.leader:
                    click.echo(f"error: {describe(e)}", err=True)
