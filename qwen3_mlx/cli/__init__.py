"""The `qwen3-mlx` commands: click options declared once (options.py), what they print (display.py), one
module per command (generate, chat, convert, serve), the group (commands.py), and the --prompts-file
formats. Parses, calls the library, prints.
"""

from .commands import main

__all__ = ["main"]
