"""The `qwen3-mlx` commands: click options declared once, the commands, and the --prompts-file formats.
Parses, calls the library, prints.
"""

from .commands import main

__all__ = ["main"]
