"""Load a Qwen3 checkpoint: a Hugging Face folder, an MLX folder (ours or mlx-lm's), or a Hub repo id."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..collectives import join, sync_random_state
from ..device import WIRED_LIMIT
from ..errors import ConfigError, OptionError, Qwen3Error
from ..model.config import ModelArgs
from ..model.fast import speed_up
from ..model.model import Model
from ..model.parallel import MODES, shard
from ..text.tokenizer import Tokenizer
from .adapters import load_adapters
from .foreign import foreign_format, mlx_config, translate
from .sampling_defaults import default_params, validate

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# Bytes per element of the safetensors dtypes a Qwen3 checkpoint may hold.
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1}
_MAX_HEADER = 100 * 2**20  # a header larger than this is corrupt, not a real checkpoint
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.")  # an embedding checkpoint (Qwen3Model) has no "model."


@dataclass(frozen=True)
class Pooling:
    """An embedding checkpoint's sentence-transformers modules (modules.json): how its last hidden states
    become one vector, and the instruction prompts it names (config_sentence_transformers.json)."""

    mode: str  # "lasttoken": Qwen3-Embedding was trained on the hidden state of its closing <|endoftext|>
    normalize: bool  # a Normalize module follows the pooling
    prompts: dict[str, str]


def read_pooling(path: Path) -> Pooling | None:
    """The sentence-transformers layout of an embedding checkpoint, or None where the folder has none."""
    if not (path / "modules.json").exists():
        return None
    modules = read_json(path / "modules.json")
    types = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules if isinstance(m, dict)} \
        if isinstance(modules, list) else {}
    if "Pooling" not in types:
        raise Qwen3Error(f"{path / 'modules.json'}: names no Pooling module; it is not an embedding checkpoint's")
    file = path / types["Pooling"] / "config.json"
    config = read_json(file)
    mode = config.get("pooling_mode") or ("lasttoken" if config.get("pooling_mode_lasttoken") else None)
    if mode != "lasttoken":
        raise Qwen3Error(f"{file}: pools by {mode or 'a mode other than lasttoken'}; Qwen3-Embedding pools by the "
                         f"last token (pooling_mode_lasttoken), the only pooling this loader takes")
    extra = path / "config_sentence_transformers.json"
    prompts = read_json(extra).get("prompts") or {} if extra.exists() else {}
    return Pooling(mode, "Normalize" in types, {str(k): str(v) for k, v in prompts.items()})


def resolve(path_or_repo: str | Path) -> Path:
    """A local folder as is, or a Hub repo id downloaded (or found in the cache) via huggingface_hub."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise Qwen3Error(f"{path}: is a file; pass the checkpoint folder that holds config.json")
    name = str(path_or_repo)
    if not _REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise Qwen3Error(f"{name}: no such folder; pass a checkpoint folder or a Hub repo id like Qwen/Qwen3-1.7B")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(  # */config.json: sentence-transformers' 1_Pooling/config.json
            name, allow_patterns=["*.json", "*/config.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]))
    except HFValidationError as e:
        raise Qwen3Error(f"{name}: not a valid Hub repo id ({e})") from None
    except Exception as e:  # offline, unknown repo, gated, network: all end the same way for a user
        if constants.HF_HUB_OFFLINE:
            raise Qwen3Error(f"{name}: no local folder of that name, and not in the Hugging Face cache while "
                             f"HF_HUB_OFFLINE is set; download it once online, or pass a local folder") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Qwen3Error(
            f"{name}: no local folder of that name, and the Hub download failed ({reason}); "
            f"check the repo id and your connection, or pass a local folder"
        ) from None


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise Qwen3Error(f"{path}: not found; is this a Qwen3 checkpoint folder?") from None
    except OSError as e:
        raise Qwen3Error(f"{path}: could not be read ({e.strerror or e}); check that it is a readable file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Qwen3Error(f"{path}: not valid JSON ({e}); the file is corrupt, download it again") from None


def load_config(path: Path) -> tuple[dict, ModelArgs]:
    config = read_json(path / "config.json")
    try:
        return config, ModelArgs.from_dict(mlx_config(config))  # Qwen's AWQ and FP8 read as MLX's formats
    except ConfigError as e:
        raise ConfigError(str(e).replace("config.json", str(path / "config.json"), 1)) from None


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise Qwen3Error(f"{index}: has no 'weight_map' object; the file is corrupt, download it again")
        files = sorted({path / name for name in weight_map.values()})
        for f in files:
            if not f.exists():
                raise Qwen3Error(f"{f}: listed in {index.name} but missing; the download is incomplete")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise Qwen3Error(f"{path}: no *.safetensors weights found (only safetensors are loaded, never pickles)")
    return files


def check_safetensors(file: Path) -> dict[str, dict]:
    """Validate a safetensors header against the file size before anything large is allocated."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise Qwen3Error(f"{file}: truncated ({size} bytes); download it again")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise Qwen3Error(f"{file}: header claims {n} bytes but the file has {size}; "
                                 f"the file is corrupt or truncated, download it again")
            raw = f.read(n)
    except OSError as e:
        raise Qwen3Error(f"{file}: could not be read ({e.strerror or e}); check that it is a readable file") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Qwen3Error(f"{file}: header is not valid JSON; the file is corrupt, download it again") from None
    if not isinstance(header, dict):
        raise Qwen3Error(f"{file}: header is not a JSON object; the file is corrupt")
    data_size = size - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise Qwen3Error(f"{file}: __metadata__ is not an object of strings; the file is corrupt")
            continue
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in _ST_SIZES
              and isinstance(info.get("shape"), list) and isinstance(info.get("data_offsets"), list)
              and len(info["data_offsets"]) == 2
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
              and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"]))
        if not ok:
            raise Qwen3Error(f"{file}: tensor {name!r} has a malformed header entry; the file is corrupt")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data_size:
            raise Qwen3Error(
                f"{file}: tensor {name!r} lies at bytes {begin}..{end} but the data has {data_size}; "
                f"the file is truncated, download it again")
        if end - begin != math.prod(info["shape"]) * _ST_SIZES[info["dtype"]]:
            raise Qwen3Error(f"{file}: tensor {name!r} has {end - begin} bytes for shape {info['shape']} "
                             f"{info['dtype']}; the file is corrupt")
        tensors[name] = info
    return tensors


def read_weights(files: list[Path]) -> dict[str, mx.array]:
    """The tensors of already-checked weight files, loaded lazily by MLX."""
    weights: dict[str, mx.array] = {}
    for file in files:
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError) as e:
            raise Qwen3Error(f"{file}: could not be read ({e})") from None
    return weights


def _quantize(folder: Path, model: Model, q: dict, weights: dict[str, mx.array]) -> None:
    """Swap in quantized layers as mlx-lm does: a layer named in the block takes its entry (false: stays
    float), another with scales among the weights takes the block's own group size, bits and mode."""
    default = {key: q[key] for key in ("group_size", "bits", "mode")}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized"):  # an override on, say, a norm: mlx-lm's loader fails on it
            return False
        entry = q.get(path, f"{path}.scales" in weights)
        if entry is False:
            return False
        entry = default if entry is True else entry
        inputs = module.weight.shape[-1]
        if inputs % entry["group_size"]:
            where = f"quantization.{path}" if path in q else "quantization"
            raise Qwen3Error(f"{folder / 'config.json'}: {where}.group_size={entry['group_size']} does not divide "
                             f"{path}'s input size {inputs}; the block disagrees with the weights")
        return dict(entry)  # a copy: nn.quantize may edit it

    nn.quantize(model, class_predicate=predicate)


def dtype_name(dtype: str | mx.Dtype | None) -> str | None:
    """The name in DTYPES of a dtype option given by name ("bfloat16") or as an MLX dtype (mx.bfloat16).

    Raises:
        OptionError: any other value.
    """
    if dtype is None:
        return None
    for name, value in DTYPES.items():
        if dtype == name or (isinstance(dtype, mx.Dtype) and dtype == value):
            return name
    raise OptionError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}, as a name or an mlx.core dtype")


def load_model(path: Path, dtype: str | mx.Dtype | None = None,
               swap: Callable[[Model], object] | None = None) -> Model:
    """Build the model from config.json and load its weights, checking every tensor's name and shape;
    `swap` (e.g. fast.speed_up) is called with the model before its weights are read."""
    cast = DTYPES.get(dtype_name(dtype))
    config, args = load_config(path)
    # Checked before the model is built: building 10**9 layers from a corrupt config would never end.
    files = weight_files(path)
    layers = {int(m.group(1)) for f in files for name in check_safetensors(f) if (m := _LAYER.match(name))}
    if args.num_hidden_layers != max(layers, default=-1) + 1:
        raise Qwen3Error(f"{path / 'config.json'}: num_hidden_layers={args.num_hidden_layers} but the weights hold "
                         f"{max(layers, default=-1) + 1} layers; the config and the weights do not belong together")
    weights = {k: v for k, v in read_weights(files).items() if "rotary_emb.inv_freq" not in k}
    if (fmt := foreign_format(config)) is not None:
        weights = translate(fmt, weights, cast or fmt.dtype)
    pooling = read_pooling(path) if "lm_head.weight" not in weights else None
    if pooling is not None:  # Qwen3Model's weights (no head, maybe no "model."), whatever config.json's flag says
        weights = {k if k.startswith("model.") else f"model.{k}": v for k, v in weights.items()}
        args = replace(args, tie_word_embeddings=True)
    model = Model(args)
    model.pooling = pooling  # an embedding model's (embedding/embed.py reads it); None: a causal model
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # some exports store the tied head twice
    if args.quantization:
        if not any(k.endswith(".scales") for k in weights):
            q = args.quantization
            raise Qwen3Error(f"{path / 'config.json'}: has a quantization block (bits {q['bits']}, group_size "
                             f"{q['group_size']}) but the weights are not quantized; remove the block")
        _quantize(path, model, args.quantization, weights)
    _check_weights(path, args, dict(tree_flatten(model.parameters())), weights)
    if cast is not None:
        weights = {k: v.astype(cast) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if swap is not None:  # before the weights are read (mx.load is lazy): they go from the files straight into place
        swap(model)
    mx.eval(model.parameters())
    model.eval()
    return model


def _check_weights(path: Path, args: ModelArgs, expected: dict[str, mx.array], weights: dict[str, mx.array]) -> None:
    """Every parameter the model expects, and no other, with its shape and kind of dtype."""
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        hint = ""
        if any(k.endswith((".scales", ".biases")) for k in missing):
            hint = " (config.json's quantization block names layers the weights do not quantize)"
        raise Qwen3Error(f"{path}: weight {missing[0]!r} is missing{hint}; {len(missing)} missing in all")
    if extra:
        hint = ""
        if any(k.endswith(".scales") for k in extra):
            hint = " (the weights are quantized but config.json has no matching quantization block)"
        raise Qwen3Error(f"{path}: unexpected weight {extra[0]!r}{hint}; {len(extra)} unexpected in all")
    for name, param in expected.items():
        got = weights[name]
        if got.shape != param.shape:
            hint = ""
            if name.endswith((".weight", ".scales", ".biases")) and args.quantization and f"{name.rsplit('.', 1)[0]}.scales" in weights:
                hint = "; config.json's quantization bits/group_size disagree with the weights"
            raise Qwen3Error(f"{path}: weight {name!r} has shape {tuple(got.shape)}, expected {tuple(param.shape)}{hint}")
        got_dtype = str(got.dtype).removeprefix("mlx.core.")
        if mx.issubdtype(param.dtype, mx.floating):
            if not mx.issubdtype(got.dtype, mx.floating):
                raise Qwen3Error(f"{path}: weight {name!r} has dtype {got_dtype}, expected a float type")
        elif got.dtype != param.dtype:  # packed weights (uint32); the scales of mxfp4, nvfp4, mxfp8 (uint8)
            kind = "packed quantized" if param.dtype == mx.uint32 else "quantization scales"
            raise Qwen3Error(f"{path}: weight {name!r} has dtype {got_dtype}, expected "
                             f"{str(param.dtype).removeprefix('mlx.core.')} ({kind})")


def load(path_or_repo: str | Path, dtype: str | mx.Dtype | None = None, parallel: str | None = None,
         group: mx.distributed.Group | None = None,
         layers_per_rank: Sequence[float] | None = None, *, adapter_path: str | Path | None = None,
         for_training: bool = False) -> tuple[Model, Tokenizer]:
    """Load a Qwen3 model and its tokenizer.

    Args:
        path_or_repo: a local checkpoint folder (Hugging Face layout, or MLX as written by our converter
            or by `mlx_lm convert`), or a Hugging Face Hub repo id.
        dtype: cast floating weights to float16, bfloat16 or float32, given by name or as an mlx.core dtype
            (default: as stored).
        parallel: in a process started by mlx.launch, "tensor" or "pipeline": this rank loads, and reads,
            only its part of the model (parallel.shard), and seeds its random state as rank 0's
            (collectives.sync_random_state). Every rank of the group must call load alike.
        group: the ranks to shard over (default: collectives.join(), all of the job's).
        layers_per_rank: pipeline only: each rank's share of the layers (parallel.layer_split).
        adapter_path: an adapter folder (adapters.safetensors + adapter_config.json, ours or mlx_lm.lora's)
            applied to the model as LoRA/DoRA layers (checkpoint/adapters.py), or a full fine-tune's layers.
        for_training: the plain model, without the fast swaps (its projections apart, named as in the
            checkpoint), as train() needs it.

    Returns:
        (model, tokenizer)

    Raises:
        OptionError: dtype is none of the three; a bad parallel option, or one the model cannot take.
        Qwen3Error: the folder, a file, a key or a tensor is missing or wrong; the message says which;
            the distributed backend could not start.
    """
    dtype_name(dtype)  # a bad option fails before a Hub download
    if parallel not in (None, *MODES):
        raise OptionError(f"parallel={parallel!r} must be None, 'tensor' or 'pipeline'")
    if parallel is not None and adapter_path is not None:
        raise OptionError("adapter_path with parallel is not supported yet; fuse the adapter first "
                          "(qwen3-mlx fuse) and load the fused model")
    if parallel is None and (group is not None or layers_per_rank is not None):
        raise OptionError("group and layers_per_rank need parallel='tensor' or 'pipeline'")
    if parallel is not None:
        group = group or join()
        if group.size() == 1:
            raise OptionError(f"parallel={parallel!r} needs 2 or more ranks, and this process is alone; start "
                              f"every rank with mlx.launch (e.g. mlx.launch -n 2 -- CMD)")
    path = resolve(path_or_repo)

    def swap(model: Model) -> None:
        if adapter_path is not None:  # on the checkpoint's names, before the fast swaps fuse them
            load_adapters(model, Path(adapter_path))
        if for_training:
            return
        if parallel is not None:  # first: the fusion then joins each rank's own heads
            shard(model, group, parallel, layers_per_rank)
        speed_up(model)

    model = load_model(path, dtype, swap=swap)
    if parallel is not None:
        sync_random_state(group)
    WIRED_LIMIT.hold(model)
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.generation_config is not None:
        check_generation_config(path / "generation_config.json", tokenizer.generation_config)
    return model, tokenizer


def check_generation_config(file: Path, config: Any) -> None:
    """The sampling values of generation_config.json, checked when loaded rather than mid-generation."""
    if not isinstance(config, dict):
        raise Qwen3Error(f"{file}: must hold a JSON object; fix it or remove the file")
    for key in ("temperature", "top_p", "top_k", "min_p"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise Qwen3Error(f"{file}: {key}={value!r} must be a number; fix it or remove the file")
    try:
        validate(default_params(True, config))
    except OptionError as e:
        raise Qwen3Error(f"{file}: {e}; fix it or remove the file") from None
