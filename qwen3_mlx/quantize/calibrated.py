"""A checkpoint quantized with calibration text: the float model loaded, its Linears measured (mixed),
quantized (gptq) or scaled and clipped (awq) on samples of a local file, the grids of the result trained
against the float model (dwq), and the result written by the converter, so the output is any
`convert -q` output: mlx-lm's format, loaded by both.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx

from ..checkpoint.converter import ConvertResult, convert
from ..checkpoint.loader import DTYPES, load_config, load_model, resolve
from ..errors import OptionError
from ..evaluation.documents import read_texts
from ..model.model import Model
from ..text.tokenizer import Tokenizer
from ..training.options import TrainingOptions, TrainingReport
from .awq import awq
from .calibration import calibration_samples
from .dwq import dwq, quantized_student, written
from .gptq import gptq
from .mixed import choose_bits, sensitivities
from .rounding import Quantized

METHODS = ("mixed", "gptq", "awq", "dwq")
Progress = Callable[[str, int, int], None]  # (stage, done, total)
# dwq's run when none is given: Adam as mlx-lm's dwq builds it, at a rate above its 1e-6 because a run here
# sees tens of samples where mlx-lm's sees thousands, several times each.
DWQ_OPTIONS = TrainingOptions(learning_rate=1e-5, epochs=4, batch_size=4, optimizer_config={"bias_correction": True},
                              steps_per_report=1)


def check_methods(methods: Sequence[str]) -> None:
    """In this order, each at most once: mixed, then gptq or awq, then dwq; at least one."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise OptionError(f"--method {','.join(methods)}: {unknown[0]!r} is not one of {', '.join(METHODS)}")
    rank = {"mixed": 0, "gptq": 1, "awq": 1, "dwq": 2}
    if not methods or any(rank[a] >= rank[b] for a, b in zip(methods, methods[1:])):
        raise OptionError(f"--method {','.join(methods)}: give one method, or in this order mixed, then gptq or awq, "
                          "then dwq (mixed,gptq,dwq: the bits chosen by mixed, each layer quantized by gptq, "
                          "its scales and biases then trained by dwq)")


def quantize_checkpoint(source: str | Path, output: str | Path, methods: Sequence[str], calibration: Path, *,
                        samples: int = 128, length: int = 512, bits: int = 4, group_size: int = 64,
                        embed_bits: int | None = None, dtype: str | None = None, target_bpw: float | None = None,
                        high_bits: int | None = None, training: TrainingOptions | None = None, force: bool = False,
                        progress: Progress | None = None) -> ConvertResult:
    """Quantize a float Qwen3 checkpoint with calibration text into an MLX folder.

    Args:
        methods: in this order, each at most once: "mixed", then "gptq" or "awq", then "dwq".
        calibration: a local text file, or JSON lines of {"text": ...} or chat {"messages": [...]}.
        samples, length: up to `samples` pieces of `length` tokens of it.
        bits, group_size, embed_bits, dtype, force: as convert's; with mixed, `bits` is the low width.
        target_bpw, high_bits: mixed's size goal in bits per weight (as convert reports it) and its high
            width (default bits + 1).
        training: dwq's run (its optimizer, learning rate, epochs, batch size, seed); default DWQ_OPTIONS.
        progress: called as progress(stage, done, total).

    Returns:
        convert's result for the output folder.

    Raises:
        OptionError: a bad method list, a target outside the two widths' sizes, a quantized source.
        Qwen3Error: a bad source or calibration file (one line naming it).
    """
    check_methods(methods)
    if ("mixed" in methods) != (target_bpw is not None) or (high_bits and "mixed" not in methods):
        raise OptionError("--target-bpw (and --high-bits) go with --method mixed, and mixed needs --target-bpw")
    texts = read_texts(Path(calibration))  # a bad line fails before the model is read
    path = resolve(source)
    if load_config(path)[1].quantization:
        raise OptionError(f"{source}: is already quantized; quantize the original float checkpoint")
    model = load_model(path)
    out_dtype = DTYPES[dtype] if dtype else (mx.bfloat16 if model.dtype == mx.float32 else model.dtype)
    model.set_dtype(mx.float32)
    data = calibration_samples(Path(calibration), texts, Tokenizer.from_dir(path), samples, length)

    def stage(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else lambda done, total: progress(name, done, total)

    module_bits = {}
    if "mixed" in methods:
        high = high_bits or bits + 1
        sens = sensitivities(model, data, bits, high, group_size, out_dtype, progress=stage("sensitivity"))
        module_bits = choose_bits(model, sens, target_bpw, bits, high, embed_bits or 8, group_size, out_dtype)
    tensors: dict[str, mx.array] = {}
    grids: dict[str, Quantized] = {}
    if "gptq" in methods:
        grids = gptq(model, data, bits, group_size, out_dtype, module_bits, progress=stage("gptq"))
        for module, q in grids.items():
            tensors.update({f"{module}.weight": q.weight, f"{module}.scales": q.scales, f"{module}.biases": q.biases})
    elif "awq" in methods:
        tensors = {name: p.astype(out_dtype) for name, p in awq(model, data, bits, group_size, out_dtype, module_bits,
                                                               progress=stage("awq")).items()}
    if "dwq" in methods:
        teacher = load_model(path) if {"gptq", "awq"} & set(methods) else model  # which gptq and awq changed
        teacher.set_dtype(mx.float32)
        student = quantized_student(model, bits, group_size, embed_bits or 8, out_dtype, module_bits, grids)
        tensors.update(distilled(student, teacher, data, training or DWQ_OPTIONS, out_dtype, stage("dwq")))
    out = Path(output).expanduser().absolute()
    with tempfile.TemporaryDirectory(dir=next(p for p in out.parents if p.exists())) as replaced:
        if tensors:
            mx.save_safetensors(str(Path(replaced) / "replaced.safetensors"), tensors)
        return convert(path, output, quantize=True, bits=bits, group_size=group_size, embed_bits=embed_bits,
                       dtype=dtype or str(out_dtype).removeprefix("mlx.core."), force=force,
                       progress=stage("writing"), replaced=Path(replaced) if tensors else None,
                       module_bits=module_bits)


def distilled(student: Model, teacher: Model, data: mx.array, options: TrainingOptions, dtype: mx.Dtype,
              progress: Callable[[int, int], None] | None) -> dict[str, mx.array]:
    """The student's grids trained by dwq, as the converter's replacing tensors; progress by training step."""
    def report(r: TrainingReport) -> None:
        if progress is not None and r.train_loss is not None:
            progress(r.step, r.iters)

    dwq(student, teacher, data, options, dtype, on_report=report)
    return written(student, dtype)
