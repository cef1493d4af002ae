"""Convert a Qwen3 checkpoint to MLX: quantize, dequantize or change dtype, a block of rows at a time.

The output is mlx-lm's layout (config.json with a "quantization" block, sharded safetensors with an index), so
it loads unchanged in mlx-lm and in qwen3_mlx.loader. Source rows are read straight from the files and each
block is written at its place in the shard, so the peak memory is one block, not the model.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import shutil
import struct
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Mapping

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import OptionError, Qwen3Error
from ..files import human_size, written_atomically
from ..model.config import QUANT_DEFAULTS, QUANT_MODES, ModelArgs
from ..model.model import Model
from .foreign import foreign_format, mlx_config, translated
from .loader import (
    DTYPES,
    check_safetensors,
    dtype_name,
    load_config,
    resolve,
    weight_files,
)

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja", "generation_config.json")
EMBEDDINGS = ("model.embed_tokens", "lm_head")  # the modules that get embed_bits
# safetensors dtype -> (numpy dtype of its bytes, MLX dtype); numpy has no bfloat16, so those read as uint16.
_DTYPES = {"F32": (np.float32, mx.float32), "F16": (np.float16, mx.float16),
           "BF16": (np.uint16, mx.bfloat16), "U32": (np.uint32, mx.uint32), "U8": (np.uint8, mx.uint8)}
_ST_NAMES = {mx_dtype: name for name, (_, mx_dtype) in _DTYPES.items()}
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    bits_per_weight: float
    size_bytes: int  # the shards on disk
    seconds: float


@dataclass(frozen=True)
class _Source:
    """A tensor in a source file. Read with plain reads, not mapped: mapped pages would count as resident."""

    file: Path
    offset: int  # of its first byte in the file
    dtype: str
    shape: tuple[int, ...]

    def rows(self, start: int, stop: int) -> mx.array:
        np_dtype, mx_dtype = _DTYPES[self.dtype]
        row = math.prod(self.shape[1:])
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * row * np.dtype(np_dtype).itemsize)
            data = np.fromfile(f, np_dtype, count=(stop - start) * row)
        return mx.array(data.reshape(stop - start, *self.shape[1:])).view(mx_dtype)


@dataclass(frozen=True)
class _Job:
    """What one model parameter becomes: `fn` maps blocks of rows of `sources` to those rows of `outputs`."""

    sources: tuple[_Source, ...]
    outputs: tuple[tuple[str, mx.Dtype, tuple[int, ...]], ...]  # (name, dtype, shape)
    fn: Callable[..., tuple[mx.array, ...]]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.size for _, dtype, shape in self.outputs)


def _cast(dtype: mx.Dtype, w: mx.array) -> tuple[mx.array, ...]:
    return (w.astype(dtype),)


def _quantize(group_size: int, bits: int, dtype: mx.Dtype, w: mx.array) -> tuple[mx.array, ...]:
    # Groups run along rows, so a block of rows quantizes exactly as those rows of the whole matrix.
    return tuple(mx.quantize(w.astype(dtype), group_size, bits))


def _dequantize(group_size: int, bits: int, mode: str, dtype: mx.Dtype, w: mx.array, scales: mx.array,
                biases: mx.array | None = None) -> tuple[mx.array, ...]:
    return (mx.dequantize(w, scales, biases, group_size, bits, mode=mode).astype(dtype),)


def _copy_quantized(dtype: mx.Dtype, w: mx.array, scales: mx.array,
                    biases: mx.array | None = None) -> tuple[mx.array, ...]:
    if biases is None:  # mxfp4, nvfp4, mxfp8: the scales are 8-bit exponents, not floats; kept as they are
        return w, scales
    return w, scales.astype(dtype), biases.astype(dtype)


def convert(source: str | Path, output: str | Path, *, quantize: bool = False, bits: int = 4, group_size: int = 64,
            embed_bits: int | None = None, dtype: str | mx.Dtype | None = None, dequantize: bool = False,
            force: bool = False, weights_only: bool = False, progress: Callable[[int, int], None] | None = None,
            shard_bytes: int = 1 << 30, block_bytes: int = 32 << 20, replaced: Path | None = None,
            module_bits: Mapping[str, int] | None = None) -> ConvertResult:
    """Convert a Qwen3 checkpoint into an MLX folder that both mlx-lm and qwen3_mlx load.

    Args:
        source: a Hugging Face folder (float, one file or sharded), an MLX folder (ours or mlx-lm's, its mixed
            recipes and mxfp4, nvfp4, mxfp8 modes included), or a Hub repo id.
        output: the folder to write. It is written beside, under a hidden temporary name, and renamed at the end.
        quantize: affine-quantize each Linear and Embedding whose input size the group size divides, as mlx-lm does.
        bits, group_size: bits 2, 3, 4, 5, 6 or 8; group size 32, 64 or 128.
        embed_bits: bits of the embedding and an untied lm_head; default 8 when bits < 8 (the tied matrix is both
            the input table and the output head), else bits. config.json records it as a per-module override.
        dtype: float16, bfloat16 or float32 (a name or an mlx.core dtype), for unquantized tensors and scales.
            Default: the source's float dtype, except that a float32 source becomes bfloat16 when quantized.
        dequantize: turn a quantized MLX checkpoint back into float weights.
        force: replace an existing output; the old one is deleted only once the new one is in place.
        weights_only: allow a source without tokenizer.json; the output then holds weights and config only and
            cannot generate until tokenizer files are added.
        progress: called as progress(done, total) after each parameter is written.
        shard_bytes: the most bytes in one output file (a larger tensor gets a file of its own).
        block_bytes: the most source bytes read at once; this bounds the peak memory.
        replaced: a folder of safetensors whose tensors replace the source's (qwen3_mlx.quantize's): a float one
            rounded as any; a Linear's packed weight, scales and biases kept (an override if its format differs).
        module_bits: bits of named modules ("model.layers.0.mlp.down_proj") other than `bits`, when quantizing.

    Returns:
        The output folder, its bits per weight, the bytes of its weight files, and the seconds it took.

    Raises:
        OptionError: options that exclude each other or do not fit the source (a usage error in the CLI).
        Qwen3Error: a bad source, or one without tokenizer files; an output that exists or overlaps the source;
            no space left.
    """
    dtype = dtype_name(dtype)
    _check_options(quantize, bits, group_size, embed_bits, dequantize)
    src = resolve(source)
    start = time.perf_counter()
    out = Path(output).expanduser().absolute()
    _check_output(src, out, output, force)
    config, args = load_config(src)
    fmt, config = foreign_format(config), mlx_config(config)
    _check_source(source, src, args, quantize, dequantize and fmt is None, weights_only)  # FP8: -d is the default
    with translated(fmt, weight_files(src), DTYPES[dtype] if dtype else None) as (foreign, skip):
        sources = _read_headers(src, skip)
        dtype = dtype or _default_dtype(sources, quantize)
        for folder in (foreign, replaced):  # MLX's forms of Qwen's AWQ or FP8 layers; the caller's replacements
            sources.update(_read_headers(folder) if folder else {})
        embed_bits = embed_bits or (8 if bits < 8 else bits)
        jobs, overrides, params = _plan(src, args, sources, quantize, bits, group_size, embed_bits, DTYPES[dtype],
                                        dequantize, module_bits or {})
        if quantize:
            config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine", **overrides}
        elif dequantize:
            config.pop("quantization", None)
        total = sum(job.nbytes for job in jobs)
        _write_folder(src, out, output, _output_config(config, dtype), jobs, total, shard_bytes, block_bytes, progress)
    return ConvertResult(out, total * 8 / params, sum(f.stat().st_size for f in out.glob("*.safetensors")),
                         time.perf_counter() - start)


def _check_source(given: str | Path, src: Path, args: ModelArgs, quantize: bool, dequantize: bool,
                  weights_only: bool) -> None:
    if quantize and args.quantization:
        raise OptionError(f"{given}: is already quantized ({args.quantization['mode']}); quantize the original "
                          f"float checkpoint, or pass --dequantize")
    if dequantize and not args.quantization:
        raise OptionError(f"{given}: is not quantized; --dequantize applies to quantized MLX checkpoints")
    # Without a tokenizer the output loads but can never turn a prompt into ids: say so now, not at generate.
    if not weights_only and not (src / "tokenizer.json").is_file():
        raise Qwen3Error(f"{src}: has no tokenizer.json, so the converted model could not generate; copy "
                         f"tokenizer.json and tokenizer_config.json from the original Hugging Face checkpoint into "
                         f"it, or pass --weights-only to write the weights alone")


def _default_dtype(sources: dict[str, _Source], quantize: bool) -> str:
    """The float dtype holding most of the source's elements (packed weights and 8-bit scales not counted)."""
    counts = Counter()
    for s in sources.values():
        counts[s.dtype] += math.prod(s.shape) if s.dtype in _DTYPE_NAMES else 0
    dtype = _DTYPE_NAMES[max(_DTYPE_NAMES, key=counts.__getitem__)]
    if quantize and dtype == "float32":
        return "bfloat16"  # float32 scales cost memory and speed and buy nothing next to 4-bit weights
    return dtype


def _output_config(config: dict, dtype: str) -> dict:
    """config.json of the output: mlx-lm writes its quantization block under both names (HF reads the second)."""
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "quantization_config")}
    config["torch_dtype"] = dtype
    if "dtype" in config:  # transformers >= 5 writes this name instead
        config["dtype"] = dtype
    if "quantization" in config:
        config["quantization_config"] = config["quantization"]
    return dict(sorted(config.items()))


def _write_folder(src: Path, out: Path, given: str | Path, config: dict, jobs: list[_Job], total: int,
                  shard_bytes: int, block_bytes: int, progress: Callable[[int, int], None] | None) -> None:
    """Write the output under a temporary name beside it and rename it into place; on any failure (Ctrl-C
    included) leave nothing behind, not even the parent folders made for it."""
    created = [p for p in out.parents if not p.exists()]  # innermost first
    free = shutil.disk_usage(next(p for p in out.parents if p.exists())).free
    if free < total:
        raise Qwen3Error(f"{given}: no space left: it needs {human_size(total)}, {human_size(free)} are free")
    try:
        with written_atomically(out) as tmp:
            tmp.mkdir(parents=True)
            _write(src, tmp, config, jobs, shard_bytes, block_bytes, progress)
    except BaseException as e:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise Qwen3Error(f"{given}: no space left on the device after part of its {human_size(total)}; "
                             f"free some space and convert again") from None
        raise


def _check_options(quantize: bool, bits: int, group_size: int, embed_bits: int | None, dequantize: bool) -> None:
    if quantize and dequantize:
        raise OptionError("--quantize and --dequantize exclude each other; pick one")
    if embed_bits is not None and not quantize:
        raise OptionError("--embed-bits applies only with --quantize")
    for name, value, allowed in (("bits", bits, BITS), ("group-size", group_size, GROUP_SIZES),
                                 ("embed-bits", embed_bits, BITS)):
        if value is not None and value not in allowed:
            raise OptionError(f"--{name}={value!r} must be one of {', '.join(map(str, allowed))}")


def _check_output(src: Path, out: Path, given: str | Path, force: bool) -> None:
    src, target = src.resolve(), out.resolve()
    if target == src or src in target.parents:
        raise Qwen3Error(f"{given}: is inside the source folder {src}; write the output somewhere else")
    if target in src.parents:
        raise Qwen3Error(f"{given}: holds the source folder {src}; write the output somewhere else")
    if (out.exists() or out.is_symlink()) and not force:
        raise Qwen3Error(f"{given}: already exists; pass --force to replace it")


def _read_headers(path: Path, skip: Collection[str] = ()) -> dict[str, _Source]:
    sources = {}
    for file in weight_files(path):
        header = check_safetensors(file)
        with open(file, "rb") as f:
            data = 8 + struct.unpack("<Q", f.read(8))[0]
        for name, info in header.items():
            if "rotary_emb.inv_freq" in name or name in skip:  # RoPE's table (old exports); what fmt translates
                continue
            if info["dtype"] not in _DTYPES:
                raise Qwen3Error(f"{file}: tensor {name!r} has dtype {info['dtype']}; a Qwen3 checkpoint holds "
                                 f"F32, F16 or BF16 tensors, and U32 and U8 ones when quantized")
            sources[name] = _Source(file, data + info["data_offsets"][0], info["dtype"], tuple(info["shape"]))
    return sources


def _quantized(name: str, shape: tuple[int, ...], bits: int, group_size: int, dtype: mx.Dtype,
               mode: str = "affine") -> tuple:
    """(name, dtype, shape) of the packed weight and its scales (and biases, in affine mode)."""
    module, (rows, cols) = name.rsplit(".", 1)[0], shape
    grouped = (rows, cols // group_size)
    packed = (name, mx.uint32, (rows, cols * bits // 32))
    if mode != "affine":  # one 8-bit shared exponent per group, no biases
        return packed, (f"{module}.scales", mx.uint8, grouped)
    return packed, (f"{module}.scales", dtype, grouped), (f"{module}.biases", dtype, grouped)


def _quantized_job(path: Path, name: str, shape: tuple[int, ...], sources: dict[str, _Source], dtype: mx.Dtype,
                   dequantize: bool) -> _Job:
    """Copy (or dequantize) a quantized source weight, its format read from the shapes as mlx-lm reads it:
    only affine has float scales and biases; each mode with 8-bit scales has one group size and bits."""
    module = name.rsplit(".", 1)[0]
    parts = tuple(sources.pop(f"{module}.{p}") for p in ("weight", "scales", "biases") if f"{module}.{p}" in sources)
    if len(parts) < 2:
        raise Qwen3Error(f"{path}: {module} has scales but no weight; the checkpoint is corrupt")
    group, bits = shape[1] // max(1, parts[1].shape[-1]), parts[0].shape[-1] * 32 // shape[1]
    if parts[1].dtype != "U8":
        mode = "affine"
    else:
        mode = next((m for m, format in QUANT_DEFAULTS.items() if m != "affine" and format == (group, bits)), None)
    groups, allowed_bits = QUANT_MODES.get(mode, ((), ()))
    outputs = _quantized(name, shape, bits, group, dtype, mode) if group in groups and bits in allowed_bits else ()
    if [s.shape for s in parts] != [o[2] for o in outputs]:
        raise Qwen3Error(f"{path}: {module} has quantized shapes {[s.shape for s in parts]} and {parts[1].dtype} "
                         f"scales that fit no quantization format for a {shape} weight; the checkpoint is corrupt")
    if dequantize:
        return _Job(parts, ((name, dtype, shape),), functools.partial(_dequantize, group, bits, mode, dtype))
    return _Job(parts, outputs, functools.partial(_copy_quantized, dtype))


def _plan(path: Path, args: ModelArgs, sources: dict[str, _Source], quantize: bool, bits: int, group_size: int,
          embed_bits: int, dtype: mx.Dtype, dequantize: bool,
          module_bits: Mapping[str, int]) -> tuple[list[_Job], dict, int]:
    """A job for each model parameter, checked against the model's names and shapes; mlx-lm's per-module
    overrides; the number of parameters. The source is quantized where it has scales, float elsewhere."""
    model = Model(args)  # its parameters stay lazy: only their shapes are read
    quantizable = {name for name, m in model.named_modules() if hasattr(m, "to_quantized")}
    sources = dict(sources)
    if args.tie_word_embeddings:  # some exports store the tied head twice
        for part in ("weight", "scales", "biases"):
            sources.pop(f"lm_head.{part}", None)
    jobs, overrides, params = [], {}, 0
    for name, param in tree_flatten(model.parameters()):
        params += param.size
        module, leaf = name.rsplit(".", 1)
        shape = tuple(param.shape)
        if leaf == "weight" and module in quantizable and f"{module}.scales" in sources:
            own = shape[1] // sources[f"{module}.scales"].shape[-1], sources[name].shape[-1] * 32 // shape[1]
            if quantize and own != (group_size, bits):  # a learned quantization's format, not the default
                overrides[module] = {"group_size": own[0], "bits": own[1], "mode": "affine"}
            jobs.append(_quantized_job(path, name, shape, sources, dtype, dequantize))
            continue
        src = sources.pop(name, None)
        if src is None:
            raise Qwen3Error(f"{path}: weight {name!r} is missing; is this a whole dense Qwen3 checkpoint?")
        if src.shape != shape or src.dtype not in _DTYPE_NAMES:
            raise Qwen3Error(f"{path}: weight {name!r} is {src.dtype} {src.shape}, expected a float {shape}")
        if quantize and leaf == "weight" and module in quantizable and shape[-1] % group_size == 0:
            b = embed_bits if module in EMBEDDINGS else module_bits.get(module, bits)
            if b != bits:
                overrides[module] = {"group_size": group_size, "bits": b, "mode": "affine"}
            jobs.append(_Job((src,), _quantized(name, shape, b, group_size, dtype),
                             functools.partial(_quantize, group_size, b, dtype)))
        else:
            jobs.append(_Job((src,), ((name, dtype, shape),), functools.partial(_cast, dtype)))
    if sources:
        extra = sorted(sources)
        raise Qwen3Error(f"{path}: unexpected weight {extra[0]!r} ({len(extra)} in all); "
                         f"is this a dense Qwen3 checkpoint?")
    return jobs, overrides, params


def _write(src: Path, dst: Path, config: dict, jobs: list[_Job], shard_bytes: int, block_bytes: int,
           progress: Callable[[int, int], None] | None) -> None:
    shards: list[list[_Job]] = []
    size = 0
    for job in jobs:
        if not shards or size + job.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job.nbytes
    done, weight_map = 0, {}

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(jobs))

    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        weight_map.update((name, file) for job in shard for name, _, _ in job.outputs)
        _write_shard(dst / file, shard, block_bytes, tick)
    index = {"metadata": {"total_size": sum(job.nbytes for job in jobs)},
             "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    (dst / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _write_shard(file: Path, jobs: list[_Job], block_bytes: int, tick: Callable[[], None]) -> None:
    """A safetensors file: the header first (the shapes are known before any data), then block after block."""
    header: dict = {"__metadata__": {"format": "mlx"}}
    offsets, end = {}, 0
    for name, dtype, shape in (t for job in jobs for t in job.outputs):
        offsets[name], end = end, end + math.prod(shape) * dtype.size
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offsets[name], end]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the tensor data 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        data = 8 + len(raw)
        for job in jobs:
            rows = job.sources[0].shape[0]
            row_bytes = max(math.prod(s.shape[1:]) * _DTYPES[s.dtype][1].size for s in job.sources)
            step = max(1, block_bytes // row_bytes)
            for first in range(0, rows, step):
                blocks = job.fn(*(s.rows(first, min(rows, first + step)) for s in job.sources))
                mx.eval(blocks)
                for (name, dtype, shape), block in zip(job.outputs, blocks):
                    f.seek(data + offsets[name] + first * math.prod(shape[1:]) * dtype.size)
                    f.write(memoryview(block))
            tick()
