"""`qwen3-mlx`: the group of commands (generate, chat, convert, serve, perplexity, eval), thin click front
ends over the library.

Exit codes: 0 success, 1 runtime error (one line on stderr), 2 usage error, 4 a structured answer
(--json-schema, --regex, --grammar) cut by a limit before it was complete, 130 interrupted.
Short options follow mlx_lm.generate's: -p prompt, -m max tokens; --model has no short form.
"""

from __future__ import annotations

import os

import click

from .chat_command import chat
from .convert_command import convert
from .embed_command import embed, rerank
from .eval_command import evaluate
from .generate_command import generate
from .options import CONTEXT, version
from .perplexity_command import perplexity
from .serve_command import serve
from .train_command import fuse, train


@click.group(context_settings=CONTEXT)
@version
def main() -> None:
    """Run Qwen3 models with MLX: convert, generate, chat."""
    if any(os.environ.get(name, "0") != "0" for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        from ..distributed.launch import launched_rank, quiet

        quiet(launched_rank())  # a launched rank other than 0: its error lines only, even for a usage error


for command in (generate, chat, convert, serve, perplexity, evaluate, embed, rerank, train, fuse):
    main.add_command(command)
