"""Convert a Qwen3 checkpoint to MLX: `python convert.py SOURCE OUTPUT [-q] ...` (see --help)."""

from qwen3_mlx.cli.convert_command import convert

if __name__ == "__main__":
    convert()
