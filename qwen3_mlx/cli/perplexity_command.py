"""`qwen3-mlx perplexity`: a model's perplexity on a data file, over sliding windows."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .display import user_errors
from .options import CONTEXT, model_option, version


@click.command(context_settings=CONTEXT)
@model_option
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True, metavar="FILE",
              help='A text file (scored whole), or JSON lines of {"text": ...} or chat {"messages": [...]} '
                   "(only the assistant turns scored).")
@click.option("--context", type=click.IntRange(min=1), default=2048, show_default=True, metavar="N",
              help="The most tokens a window reads: each token is scored with up to N tokens before it.")
@click.option("--stride", type=click.IntRange(min=1), metavar="S",
              help="How far a window moves (at most --context); each window scores only its S new tokens. "
                   "Smaller gives each token more context, at context/S times the work. Default: --context.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, metavar="B",
              help="Windows computed together.")
@user_errors
@version
def perplexity(model: str, data: Path, context: int, stride: int | None, batch_size: int) -> None:
    """Print the perplexity of --model on --data: exp of the mean negative log-likelihood of every token
    scored (each once), as `perplexity P (nll N over T tokens)`."""
    from ..checkpoint.loader import load
    from ..errors import OptionError
    from ..evaluation.documents import read_texts
    from ..evaluation.perplexity import perplexity as measure

    if stride is not None and stride > context:
        raise OptionError(f"--stride {stride} is larger than --context {context}: tokens between windows would "
                          "go unscored; give a stride of at most the context")
    texts = read_texts(data)
    loaded, tokenizer = load(model)
    bar = None

    def show(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # the windows are counted once the texts are tokenized
            bar = click.progressbar(length=total, label="scoring", file=sys.stderr, show_pos=True)
        bar.update(done - bar.pos)

    try:
        result = measure(loaded, tokenizer, texts, context=context, stride=stride, batch_size=batch_size,
                         progress=show)
    finally:
        if bar is not None:
            bar.render_finish()
    click.echo(f"perplexity {result.perplexity:.4f} (nll {result.nll:.4f} over {result.tokens} tokens)")
