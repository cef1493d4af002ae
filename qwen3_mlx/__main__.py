"""`python -m qwen3_mlx ...`: the same commands as `qwen3-mlx`."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="qwen3-mlx")
