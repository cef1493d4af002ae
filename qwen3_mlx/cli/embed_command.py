"""`qwen3-mlx embed` and `qwen3-mlx rerank`: texts from a file or stdin to vectors or relevance scores,
as JSONL in the input's order (embed) or sorted by score (rerank)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO

import click
import numpy as np

from ..embedding.embed import embed as embed_texts
from ..embedding.rerank import rerank as rerank_documents
from ..errors import OptionError
from .display import user_errors
from .options import CONTEXT, MODEL_HELP, check_writable

CHUNK = 256  # texts per embed() call, so that the progress bar moves on a long input


def read_texts(stream: IO[str], name: str) -> list[str]:
    """One text a line, or JSONL with a "text" field (a line that starts with "{"); blank lines skipped."""
    texts = []
    for n, line in enumerate(stream, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise OptionError(f"{name}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise OptionError(f"{name}:{n}: a JSON line needs a \"text\" string")
            line = item["text"]
        texts.append(line)
    return texts


def open_input(path: str) -> list[str]:
    if path == "-":
        return read_texts(sys.stdin, "<stdin>")
    with open(path, encoding="utf-8") as f:
        return read_texts(f, path)


@click.command(context_settings=CONTEXT)
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--input", "-i", "source", default="-", show_default=True, metavar="FILE",
              help="One text a line, or JSONL with a \"text\" field; - is standard input.")
@click.option("--output", "-o", type=click.Path(path_type=Path), metavar="FILE", help="Default: standard output.")
@click.option("--instruction", metavar="TEXT", help="A query's task: each text becomes Instruct: TEXT\\nQuery:text.")
@click.option("--dimensions", type=click.IntRange(min=1), metavar="N", help="A Matryoshka size (32 to the hidden size).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "npy"]), default="jsonl", show_default=True,
              help="npy needs --output.")
@click.option("--truncate", is_flag=True, help="Cut a text over the model's context instead of refusing it.")
@user_errors
def embed(model: str, source: str, output: Path | None, instruction: str | None, dimensions: int | None,
          fmt: str, truncate: bool) -> None:
    """Embed texts with a Qwen3-Embedding checkpoint: one {"index", "embedding"} line per text."""
    if fmt == "npy" and output is None:
        raise click.UsageError("--format npy needs --output FILE (binary is not written to a terminal)")
    check_writable(output)
    texts = open_input(source)
    from ..checkpoint.loader import load

    loaded = load(model)
    chunks = [texts[i:i + CHUNK] for i in range(0, len(texts), CHUNK)]
    parts = []
    with click.progressbar(chunks, label="embedding", file=sys.stderr,
                           hidden=len(chunks) < 2 or not sys.stderr.isatty()) as bar:
        for chunk in bar:
            parts.append(np.array(embed_texts(*loaded, chunk, instruction=instruction, dimensions=dimensions,
                                              truncate=truncate)))
    vectors = np.concatenate(parts) if parts else np.zeros((0, dimensions or loaded[0].args.hidden_size), np.float32)
    if fmt == "npy":
        np.save(output, vectors)
        return
    lines = "".join(json.dumps({"index": i, "embedding": v.tolist()}) + "\n" for i, v in enumerate(vectors))
    if output is None:
        click.echo(lines, nl=False)
    else:
        output.write_text(lines, encoding="utf-8")


@click.command(context_settings=CONTEXT)
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--query", required=True, metavar="TEXT", help="What the documents are scored against.")
@click.option("--documents", required=True, metavar="FILE",
              help="One document a line, or JSONL with a \"text\" field; - is standard input.")
@click.option("--top-n", type=click.IntRange(min=1), metavar="K", help="Print the K best only.")
@click.option("--instruction", metavar="TEXT", help="The task (default: the model card's web-search one).")
@click.option("--truncate", is_flag=True, help="Cut a document over the model's context instead of refusing it.")
@user_errors
def rerank(model: str, query: str, documents: str, top_n: int | None, instruction: str | None,
           truncate: bool) -> None:
    """Score documents against a query with a Qwen3-Reranker checkpoint: {"index", "relevance_score"}
    lines, best first."""
    texts = open_input(documents)
    from ..checkpoint.loader import load

    scores = rerank_documents(*load(model), query, texts, instruction=instruction, truncate=truncate)
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_n]
    click.echo("".join(json.dumps({"index": i, "relevance_score": scores[i]}) + "\n" for i in ranked), nl=False)
