"""Qwen's own quantized checkpoints on the Hub (AutoAWQ's int4, fine-grained FP8) read into MLX's formats.

AWQ (quantization_config quant_method "awq", version "gemm"): each Linear holds `qweight` (in, out/8) and
`qzeros` (in/group, out/8), int32 words of eight 4-bit values in AutoAWQ's interleaved order, and `scales`
(in/group, out); w[o, i] = (q[i, o] - zero[i // group, o]) * scale[i // group, o]. The groups run along the
input, as MLX's do, so a layer becomes MLX's affine format (w = scale * q + bias) with bias = -scale * zero:
exact with float32 scales and biases, the bias rounded once in float16 or bfloat16.

FP8 (quant_method "fp8"): each Linear holds `weight` float8_e4m3fn (out, in) and `weight_scale_inv`
(ceil(out / block_out), ceil(in / block_in)); w = fp8 * scale_inv over each block, computed in float32 and
rounded once to the dtype, as transformers dequantizes it. The model then runs in that float dtype (activations
are not quantized to FP8 as the "dynamic" scheme does on a GPU that has FP8 matmuls).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import mlx.core as mx

from ..errors import ConfigError, Qwen3Error

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ puts column 8c + AWQ_ORDER[k] at bits 4k..4k+3 of word c
AWQ_GROUP_SIZES = (32, 64, 128)  # those of MLX's affine format
_FLOATS = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


@dataclass(frozen=True)
class Foreign:
    """The quantization a checkpoint's quantization_config names, as far as reading it needs."""

    method: str  # "awq" or "fp8"
    group_size: int = 0  # awq: inputs sharing a scale and a zero
    block: tuple[int, int] | None = None  # fp8: (out, in) of a block; None: one scale for the matrix
    dtype: mx.Dtype = mx.bfloat16  # the checkpoint's float dtype (torch_dtype), what FP8 dequantizes to

    def parts(self, module: str) -> tuple[str, ...]:
        leaves = ("qweight", "qzeros", "scales") if self.method == "awq" else ("weight", "weight_scale_inv")
        return tuple(f"{module}.{leaf}" for leaf in leaves)

    @property
    def marker(self) -> str:
        """The suffix of the tensor only a quantized module holds."""
        return ".qweight" if self.method == "awq" else ".weight_scale_inv"


def foreign_format(config: Mapping) -> Foreign | None:
    """The AWQ or FP8 format config.json's quantization_config names, checked; None for any other config.

    Raises:
        ConfigError: an AWQ or FP8 block this reader cannot take exactly (say which key).
    """
    if not isinstance(config, Mapping):
        return None  # ModelArgs.from_dict refuses it in its words
    q = config.get("quantization_config")
    if "quantization" in config or not isinstance(q, Mapping) or q.get("quant_method") not in ("awq", "fp8"):
        return None
    name = config.get("torch_dtype") or config.get("dtype")
    dtype = _FLOATS.get(name, mx.bfloat16) if isinstance(name, str) else mx.bfloat16
    if q["quant_method"] == "fp8":
        if q.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"config.json: quantization_config.fmt={q['fmt']!r} is not supported; FP8 "
                              f"checkpoints are read in e4m3 (float8_e4m3fn) only")
        block = q.get("weight_block_size")
        if block is not None and not (isinstance(block, list) and len(block) == 2
                                      and all(type(b) is int and b > 0 for b in block)):
            raise ConfigError(f"config.json: quantization_config.weight_block_size={block!r} must be two "
                              f"positive integers, [out, in]")
        return Foreign("fp8", block=tuple(block) if block else None, dtype=dtype)
    checks = (("bits", q.get("bits", q.get("w_bit")), (4,)),
              ("version", str(q.get("version", "gemm")).lower(), ("gemm",)),
              ("zero_point", q.get("zero_point", True), (True,)),
              ("group_size", q.get("group_size", q.get("q_group_size")), AWQ_GROUP_SIZES))
    for key, value, allowed in checks:
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ConfigError(f"config.json: quantization_config.{key}={value!r} is not supported; AWQ checkpoints "
                              f"are read with {key} {' or '.join(map(str, allowed))} (AutoAWQ's GEMM layout, "
                              f"groups MLX's affine format has)")
    return Foreign("awq", group_size=checks[3][1], dtype=dtype)


def mlx_config(config: Mapping) -> dict:
    """config.json as MLX reads the checkpoint once translated: AWQ's block becomes mlx-lm's quantization
    block (4 bits, its group size, affine); FP8's is dropped (the weights become float)."""
    fmt = foreign_format(config)
    if fmt is None:
        return config
    config = dict(config)
    del config["quantization_config"]
    if fmt.method == "awq":
        config["quantization"] = {"group_size": fmt.group_size, "bits": 4, "mode": "affine"}
    return config


def consumed(fmt: Foreign, names: Iterable[str]) -> set[str]:
    """The tensors among `names` that translate() replaces: every part of each quantized module."""
    return {part for n in names if n.endswith(fmt.marker) for part in fmt.parts(n[: -len(fmt.marker)])}


def translate(fmt: Foreign, weights: Mapping[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """The weights with each quantized module in MLX's form: AWQ's as weight/scales/biases (the scales and
    biases in `dtype`), FP8's as a float weight in `dtype`. Lazy: nothing is computed until evaluated."""
    replaced = consumed(fmt, weights)
    out = {k: v for k, v in weights.items() if k not in replaced}
    for name in weights:
        if not name.endswith(fmt.marker):
            continue
        module = name[: -len(fmt.marker)]
        missing = [p for p in fmt.parts(module) if p not in weights]
        if missing:
            raise Qwen3Error(f"{module}: has {name.rsplit('.', 1)[-1]} but no {missing[0].rsplit('.', 1)[-1]}; "
                             f"the {fmt.method.upper()} checkpoint is incomplete, download it again")
        parts = [weights[p] for p in fmt.parts(module)]
        if fmt.method == "awq":
            w, scales, biases = awq_to_affine(module, *parts, fmt.group_size, dtype)
            out.update({f"{module}.weight": w, f"{module}.scales": scales, f"{module}.biases": biases})
        else:
            out[f"{module}.weight"] = fp8_to_float(module, *parts, fmt.block, dtype)
    return out


def awq_to_affine(module: str, qweight: mx.array, qzeros: mx.array, scales: mx.array, group_size: int,
                  dtype: mx.Dtype) -> tuple[mx.array, mx.array, mx.array]:
    """One AutoAWQ GEMM layer as MLX's (packed weight (out, in/8), scales, biases (out, in/group))."""
    inputs, outputs = qweight.shape[0], scales.shape[-1]
    groups = inputs // group_size
    expected = ((inputs, outputs // 8), (groups, outputs // 8), (groups, outputs))
    got = tuple(tuple(a.shape) for a in (qweight, qzeros, scales))
    if (inputs % group_size or outputs % 8 or got != expected or qweight.dtype not in (mx.int32, mx.uint32)
            or qzeros.dtype != qweight.dtype or not mx.issubdtype(scales.dtype, mx.floating)):
        raise Qwen3Error(f"{module}: AWQ qweight/qzeros/scales are {list(got)} {qweight.dtype}/{qzeros.dtype}/"
                         f"{scales.dtype}, expected {list(expected)} int32/int32/float for group_size {group_size}")
    q = _unpack_awq(qweight).T  # (out, in)
    zeros = _unpack_awq(qzeros).T.astype(mx.float32)  # (out, groups)
    s = scales.T.astype(mx.float32)
    return _pack_mlx(q), s.astype(dtype), (-s * zeros).astype(dtype)  # -s * zero: exact in float32


def _unpack_awq(packed: mx.array) -> mx.array:
    """(rows, cols/8) words in AutoAWQ's order -> (rows, cols) uint32 values, column order."""
    shifts = mx.array([4 * AWQ_ORDER.index(j) for j in range(8)], dtype=mx.uint32)  # where column 8c + j lies
    values = (packed.view(mx.uint32)[..., None] >> shifts) & 0xF  # (rows, cols/8, 8)
    return values.reshape(packed.shape[0], -1)


def _pack_mlx(q: mx.array) -> mx.array:
    """(rows, cols) 4-bit values -> (rows, cols/8) uint32, value j of a word at bits 4j, as mx.quantize packs."""
    shifts = mx.arange(0, 32, 4, dtype=mx.uint32)
    return (q.reshape(q.shape[0], -1, 8) << shifts).sum(axis=-1).astype(mx.uint32)  # disjoint bits: sum == or


def fp8_to_float(module: str, weight: mx.array, scale_inv: mx.array, block: tuple[int, int] | None,
                 dtype: mx.Dtype) -> mx.array:
    """One FP8 layer's weight (uint8 bytes of float8_e4m3fn) times its block scales, in `dtype`."""
    rows, cols = weight.shape if weight.ndim == 2 else (0, 0)
    bo, bi = block or (rows, cols)
    expected = (math.ceil(rows / bo), math.ceil(cols / bi)) if rows else ()
    if weight.dtype != mx.uint8 or weight.ndim != 2 or scale_inv.size != math.prod(expected):
        raise Qwen3Error(f"{module}: FP8 weight {tuple(weight.shape)} {weight.dtype} with weight_scale_inv "
                         f"{tuple(scale_inv.shape)}, expected a 2-D F8_E4M3 weight and {expected} block scales")
    s = scale_inv.astype(mx.float32).reshape(expected)
    s = mx.repeat(mx.repeat(s, bo, axis=0)[:rows], bi, axis=1)[:, :cols]  # (out, in): each block's scale
    return (mx.from_fp8(weight, dtype=mx.float32) * s).astype(dtype)


@contextlib.contextmanager
def translated(fmt: Foreign | None, files: list[Path], dtype: mx.Dtype | None) -> Iterator[tuple[Path | None, set]]:
    """A temporary folder holding the quantized modules of `files` in MLX's forms (write_mlx), and the names of the
    source tensors it replaces; (None, no names) for a checkpoint in neither format."""
    if fmt is None:
        yield None, set()
        return
    with tempfile.TemporaryDirectory(prefix="qwen3-mlx-convert-") as folder:
        yield Path(folder), write_mlx(fmt, files, dtype or fmt.dtype, Path(folder))


def write_mlx(fmt: Foreign, files: list[Path], dtype: mx.Dtype, folder: Path, file_bytes: int = 256 << 20) -> set[str]:
    """translate() the quantized modules of `files` into safetensors files in `folder`, a few modules at a
    time. AWQ's scales and biases are written in float32 (exact: the converter rounds them to its dtype), FP8's
    weights in `dtype`. Returns the names of the source tensors replaced."""
    weights: dict[str, mx.array] = {}
    for file in files:  # mx.load is lazy: a module's parts may lie in different shards
        weights.update(mx.load(str(file)))
    modules = sorted(n[: -len(fmt.marker)] for n in weights if n.endswith(fmt.marker))
    batch: dict[str, mx.array] = {}
    for i, module in enumerate(modules):
        parts = {p: weights[p] for p in fmt.parts(module) if p in weights}
        batch.update(translate(fmt, {**parts, module + fmt.marker: weights[module + fmt.marker]},
                               mx.float32 if fmt.method == "awq" else dtype))
        if sum(a.nbytes for a in batch.values()) >= file_bytes or i == len(modules) - 1:
            mx.save_safetensors(str(folder / f"part-{i:05d}.safetensors"), batch, metadata={"format": "mlx"})
            batch = {}
    return consumed(fmt, weights)
