"""Generate a response with a Qwen3 model: `python generate.py --prompt "..."` (see --help)."""

from qwen3_mlx.cli.generate_command import generate

if __name__ == "__main__":
    generate()
