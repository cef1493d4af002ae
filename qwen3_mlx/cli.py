"""`qwen3-mlx` command line: thin click front ends over the library.

Exit codes: 0 success, 1 runtime error (one line on stderr), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from .errors import Qwen3Error

DEFAULT_MODEL = "mlx-community/Qwen3-1.7B-4bit"


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into one line on stderr (exit 1) and Ctrl-C into exit 130, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
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
