"""`qwen3-mlx convert`: a Hugging Face or MLX checkpoint into an MLX folder, quantized or not."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..files import human_size
from .display import user_errors
from .options import CONTEXT, version


def one_of(argument: Any, option: Any, names: str) -> Any:
    """SOURCE / OUTPUT may also be given as mlx_lm's --hf-path / --mlx-path: exactly one of each pair."""
    if argument is not None and option is not None:
        raise click.UsageError(f"{names}: give one of them, not both")
    if argument is None and option is None:
        raise click.UsageError(f"{names}: one of them is required")
    return argument if argument is not None else option


BITS = click.Choice(["2", "3", "4", "5", "6", "8"])


@click.command(context_settings=CONTEXT)
@click.argument("source", required=False)
@click.argument("output", required=False, type=click.Path(path_type=Path))
@click.option("--hf-path", "--model", metavar="SOURCE", help="mlx_lm's name for SOURCE.")
@click.option("--mlx-path", type=click.Path(path_type=Path), metavar="OUTPUT", help="mlx_lm's name for OUTPUT.")
@click.option("--quantize", "-q", is_flag=True, help="Quantize Linear and Embedding weights (affine, as mlx-lm).")
@click.option("--bits", "--q-bits", type=BITS, default="4", show_default=True, help="Bits per quantized weight.")
@click.option("--group-size", "--q-group-size", type=click.Choice(["32", "64", "128"]), default="64",
              show_default=True, help="Weights sharing one scale and bias.")
@click.option("--embed-bits", type=BITS,
              help="Bits of the embedding / lm_head. Default: 8 when --bits is below 8, else --bits.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Dtype of unquantized tensors and scales. Default: the source's (bfloat16 for a float32 source "
                   "being quantized).")
@click.option("--dequantize", "-d", is_flag=True, help="Turn a quantized MLX checkpoint back into float weights.")
@click.option("--method", metavar="M",
              help="Quantize with calibration text (implies --quantize): gptq, awq, dwq or mixed, or several in "
                   "this order: mixed, then gptq or awq, then dwq (mixed,gptq,dwq: the bits chosen by mixed, each "
                   "layer quantized by gptq, the scales and biases then trained by dwq).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
              help='--method\'s local calibration text: a text file, or JSON lines of {"text": ...} or chat '
                   '{"messages": [...]}.')
@click.option("--calibration-samples", type=click.IntRange(min=1), default=64, show_default=True, metavar="N",
              help="Pieces of --calibration used.")
@click.option("--calibration-length", type=click.IntRange(min=2), default=512, show_default=True, metavar="L",
              help="Tokens a piece.")
@click.option("--target-bpw", type=click.FloatRange(min=0, min_open=True), metavar="B",
              help="mixed: the size to reach, in bits per weight as this command reports it.")
@click.option("--low-bits", type=BITS, help="mixed: the low width (default --bits).")
@click.option("--high-bits", type=BITS, help="mixed: the high width (default the low width + 1).")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True,
              metavar="LR", help="dwq: Adam's learning rate for the scales and biases.")
@click.option("--epochs", type=click.IntRange(min=1), default=4, show_default=True, metavar="E",
              help="dwq: passes over the calibration samples (one in eight held out to keep the best pass).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--weights-only", is_flag=True,
              help="Allow a SOURCE without tokenizer.json: OUTPUT then holds the weights and config only.")
@user_errors
@version
def convert(source: str | None, output: Path | None, hf_path: str | None, mlx_path: Path | None, quantize: bool,
            bits: str, group_size: str, embed_bits: str | None, dtype: str | None, dequantize: bool,
            method: str | None, calibration: Path | None, calibration_samples: int, calibration_length: int,
            target_bpw: float | None, low_bits: str | None, high_bits: str | None, learning_rate: float, epochs: int,
            force: bool, weights_only: bool) -> None:
    """Convert SOURCE (a Hugging Face or MLX folder, or a Hub repo id) into an MLX folder OUTPUT."""
    from click.core import ParameterSource

    from ..checkpoint.converter import convert as convert_checkpoint

    source = one_of(source, hf_path, "SOURCE or --hf-path")
    output = one_of(output, mlx_path, "OUTPUT or --mlx-path")
    ctx = click.get_current_context()
    for name in ("bits", "group_size"):
        if not (quantize or method) and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            raise click.UsageError(f"--{name.replace('_', '-')} applies only with --quantize")
    if (method is None) != (calibration is None):
        raise click.UsageError("--method and --calibration FILE go together")
    for name in ("learning_rate", "epochs"):
        if "dwq" not in (method or "").split(",") and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            raise click.UsageError(f"--{name.replace('_', '-')} applies only with --method dwq")
    if method and (dequantize or weights_only):
        raise click.UsageError("--method quantizes a float checkpoint with its tokenizer: drop --dequantize and "
                               "--weights-only")

    bars: dict[str, Any] = {}

    def show(stage: str, done: int, total: int) -> None:
        if stage not in bars:  # the total is known once the source has been read
            for bar in bars.values():
                bar.render_finish()
            bars[stage] = click.progressbar(length=total, label=stage, file=sys.stderr, show_pos=True)
        bars[stage].update(done - bars[stage].pos)

    try:
        if method:
            from dataclasses import replace

            from ..quantize.calibrated import DWQ_OPTIONS, quantize_checkpoint

            result = quantize_checkpoint(
                source, output, method.split(","), calibration, samples=calibration_samples,
                length=calibration_length, bits=int(low_bits or bits), group_size=int(group_size),
                embed_bits=int(embed_bits) if embed_bits else None, dtype=dtype, target_bpw=target_bpw,
                high_bits=int(high_bits) if high_bits else None, force=force, progress=show,
                training=replace(DWQ_OPTIONS, learning_rate=learning_rate, epochs=epochs))
        else:
            result = convert_checkpoint(source, output, quantize=quantize, bits=int(bits), group_size=int(group_size),
                                        embed_bits=int(embed_bits) if embed_bits else None, dtype=dtype,
                                        dequantize=dequantize, force=force, weights_only=weights_only,
                                        progress=lambda done, total: show("converting", done, total))
    finally:
        for bar in bars.values():
            bar.render_finish()
    click.echo(f"wrote {output}: {result.bits_per_weight:.2f} bits per weight, "
               f"{human_size(result.size_bytes)} in {result.seconds:.1f} s")
