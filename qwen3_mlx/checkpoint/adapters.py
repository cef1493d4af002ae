"""Adapters on a model and in files: LoRA/DoRA swapped into chosen layers, mlx-lm's adapter folder
(adapters.safetensors + adapter_config.json) written and read, and the adapters fused back in.

The folder is mlx-lm's format both ways: its adapter_config.json names fine_tune_type, num_layers and
lora_parameters {rank, scale, dropout, keys}; the tensors are named by their path in the model
(model.layers.N.self_attn.q_proj.lora_a, ...), or for full fine-tuning the layers' own weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import Qwen3Error
from ..files import written_atomically
from ..model.lora import ADAPTERS, DoRALinear, LoRALinear

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj")
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")
# The order mlx-lm's Qwen3 layer lists its projections in (named_modules: the last defined first): A is
# drawn in it, so that a seed gives mlx_lm.lora's adapters.
DRAW_ORDER = ("mlp.up_proj", "mlp.down_proj", "mlp.gate_proj", "self_attn.o_proj", "self_attn.v_proj",
              "self_attn.k_proj", "self_attn.q_proj")


@dataclass(frozen=True)
class AdapterConfig:
    """adapter_config.json: what was adapted and how."""

    fine_tune_type: str = "lora"
    num_layers: int = 16
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    keys: tuple[str, ...] = PROJECTIONS

    def to_json(self) -> dict:
        return {"fine_tune_type": self.fine_tune_type, "num_layers": self.num_layers,
                "lora_parameters": {"rank": self.rank, "scale": self.scale, "dropout": self.dropout,
                                    "keys": list(self.keys)}}


def chosen_layers(model: nn.Module, num_layers: int) -> list[nn.Module]:
    """The last num_layers decoder layers (-1: all), as mlx-lm picks them."""
    if num_layers > len(model.layers):
        raise Qwen3Error(f"num_layers={num_layers} but the model has {len(model.layers)} layers; give at most "
                         f"{len(model.layers)}, or -1 for all")
    return model.layers[-max(num_layers, 0):]


def apply_adapters(model: nn.Module, config: AdapterConfig) -> None:
    """Swap LoRA or DoRA layers in for the projections config.keys of the chosen layers, each built from
    its base (frozen or not as it was); A is drawn from MLX's global key in mlx-lm's order, so a seed
    gives mlx_lm.lora's initial adapters. Full fine-tuning swaps nothing."""
    if config.fine_tune_type == "full":
        return
    kind = DoRALinear if config.fine_tune_type == "dora" else LoRALinear
    for layer in chosen_layers(model, config.num_layers):
        swaps = []
        modules = dict(layer.named_modules())
        for name in sorted(config.keys, key=lambda k: DRAW_ORDER.index(k) if k in DRAW_ORDER else -1):
            module = modules.get(name)
            if module is None:
                raise Qwen3Error(f"lora key {name!r} names no module of a decoder layer; give mlx-lm's key paths "
                                 f"({', '.join(PROJECTIONS)})")
            if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
                raise Qwen3Error(f"{name} is a {type(module).__name__}; adapters go on plain or quantized linear "
                                 f"layers (load the model without speed-ups to train it)")
            swaps.append((name, kind.from_base(module, config.rank, config.scale, config.dropout)))
        layer.update_modules(tree_unflatten(swaps))


def adapter_weights(model: nn.Module, fine_tune_type: str) -> dict[str, mx.array]:
    """What an adapter file holds: the adapters' own arrays, or for full fine-tuning the trainable ones."""
    if fine_tune_type == "full":
        return dict(tree_flatten(model.trainable_parameters()))
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}


def save_adapters(model: nn.Module, folder: Path, config: AdapterConfig, file: str = ADAPTER_FILE) -> Path:
    """Write the adapter folder, each file whole or not at all. Returns the tensors' file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model, config.fine_tune_type)
    mx.eval(weights)
    path = folder / file
    with written_atomically(path, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), weights)
    with written_atomically(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config.to_json(), indent=2), encoding="utf-8")
    return path


def read_config(folder: Path) -> AdapterConfig:
    """adapter_config.json of an adapter folder, mlx-lm's keys checked."""
    file = Path(folder) / CONFIG_FILE
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Qwen3Error(f"{file}: not found; pass the folder that holds {ADAPTER_FILE} and {CONFIG_FILE}") from None
    except (OSError, ValueError) as e:
        raise Qwen3Error(f"{file}: could not be read as JSON ({e})") from None
    if not isinstance(raw, dict):
        raise Qwen3Error(f"{file}: must hold a JSON object")
    kind = raw.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora", "full"):
        raise Qwen3Error(f"{file}: fine_tune_type={kind!r} must be lora, dora or full")
    layers = raw.get("num_layers")
    if not isinstance(layers, int) or isinstance(layers, bool):
        raise Qwen3Error(f"{file}: num_layers={layers!r} must be an integer")
    lora = raw.get("lora_parameters") or {}
    if kind != "full" and not (isinstance(lora, dict) and "rank" in lora and "scale" in lora):
        hint = " (PEFT's lora_alpha is not mlx-lm's scale)" if isinstance(lora, dict) and "alpha" in lora else ""
        raise Qwen3Error(f"{file}: lora_parameters must hold rank and scale, mlx-lm's names{hint}")
    keys = lora.get("keys") or PROJECTIONS
    return AdapterConfig(kind, layers, int(lora.get("rank", 8)), float(lora.get("scale", 20.0)),
                         float(lora.get("dropout", 0.0)), tuple(keys))


def load_adapters(model: nn.Module, folder: Path, file: str | Path | None = None) -> AdapterConfig:
    """Apply the adapters of an mlx-lm adapter folder to `model` and load their weights; every tensor
    must name an adapter parameter of this model with its shape, and every adapter must be given.

    Raises:
        Qwen3Error: a missing or malformed file; a tensor of another shape or name (another model's
            adapter, or another rank or layer layout), in one line naming it.
    """
    folder = Path(folder)
    config = read_config(folder)
    path = Path(file) if file is not None else folder / ADAPTER_FILE
    try:
        weights = mx.load(str(path))
    except (OSError, RuntimeError, ValueError) as e:
        raise Qwen3Error(f"{path}: could not be read ({e}); pass a folder written by qwen3-mlx train or "
                         f"mlx_lm.lora") from None
    apply_adapters(model, config)
    check_weights(path, model, config.fine_tune_type, weights)
    model.load_weights(list(weights.items()), strict=False)
    return config


def check_weights(path: Path, model: nn.Module, fine_tune_type: str, weights: dict[str, mx.array]) -> None:
    params = dict(tree_flatten(model.parameters()))
    if fine_tune_type == "full":
        expected = {k: params[k] for k in weights if k in params}
    else:
        expected = {k: v for k, v in params.items() if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise Qwen3Error(f"{path}: tensor {extra[0]!r} is not an adapter parameter of this model ({len(extra)} "
                         f"such); the adapter was trained on another model or layer layout")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise Qwen3Error(f"{path}: adapter parameter {missing[0]!r} is missing ({len(missing)} in all); "
                         f"adapter_config.json disagrees with the tensors")
    for name, w in weights.items():
        if w.shape != expected[name].shape:
            raise Qwen3Error(f"{path}: tensor {name!r} has shape {tuple(w.shape)}, this model's is "
                             f"{tuple(expected[name].shape)}; the adapter belongs to another model or rank")


def fuse_adapters(model: nn.Module, dequantize: bool = False) -> list[str]:
    """Replace every adapter by its fused layer, in place. Returns the layers over a quantized base left
    in float because quantizing again would round the adapter's delta away (model.lora.loses_delta)."""
    fused, kept_float = [], []
    for name, module in model.named_modules():
        if isinstance(module, ADAPTERS):
            layer = module.fuse(dequantize)
            if isinstance(module.linear, nn.QuantizedLinear) and not dequantize \
                    and not isinstance(layer, nn.QuantizedLinear):
                kept_float.append(name)
            fused.append((name, layer))
    if fused:
        model.update_modules(tree_unflatten(fused))
    return kept_float


def adapted_layers(model: nn.Module) -> Sequence[str]:
    """The names of the modules that are adapters."""
    return [name for name, module in model.named_modules() if isinstance(module, ADAPTERS)]
