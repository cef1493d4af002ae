"""Qwen3 model configuration, named after the keys of a Hugging Face config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen3",)
# The quantization formats MLX runs on every device, the CPU included: mode -> (group sizes, bits).
QUANT_MODES = {
    "affine": ((32, 64, 128), (2, 3, 4, 5, 6, 8)),
    "mxfp4": ((32,), (4,)),
    "nvfp4": ((16,), (4,)),
    "mxfp8": ((32,), (8,)),
}
# What MLX takes when an entry's group size or bits is null or absent, as mlx-lm's mixed recipes
# (--quant-predicate mixed_3_6 without --q-group-size) write them.
QUANT_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
_QUANT_KEYS = ("group_size", "bits", "mode", "quantize_input", "global_scale")
_MAX_INT = 2**31 - 1  # MLX array dimensions are 32-bit


def _int(d: Mapping[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    value = d.get(key, default)
    if value is None:
        raise ConfigError(f"config.json: missing required key {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config.json: {key}={value!r} must be an integer")
    if value < minimum:
        raise ConfigError(f"config.json: {key}={value} must be >= {minimum}")
    if value > _MAX_INT:
        raise ConfigError(f"config.json: {key}={value} is too large (at most {_MAX_INT})")
    return value


def _float(d: Mapping[str, Any], key: str, default: float | None = None, positive: bool = True) -> float:
    value = d.get(key, default)
    if value is None:
        raise ConfigError(f"config.json: missing required key {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"config.json: {key}={value!r} must be a finite number")
    if positive and value <= 0:
        raise ConfigError(f"config.json: {key}={value} must be > 0")
    return float(value)


def _bool(d: Mapping[str, Any], key: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"config.json: {key}={value!r} must be true or false")
    return value


@dataclass(frozen=True)
class Yarn:
    """YaRN context extension (rope_scaling with rope_type "yarn")."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelArgs:
    """The Qwen3 dense architecture; every field is a config.json key."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    rope_scaling: Yarn | None = None
    # mlx-lm's quantization block, completed: {"group_size", "bits", "mode", "<module path>": {...} | bool, ...}
    quantization: Mapping[str, Any] | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelArgs":
        """Build from a config.json dict; unknown keys are ignored, bad values raise ConfigError."""
        if not isinstance(d, Mapping):
            raise ConfigError("config.json: must hold a JSON object")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json: model_type={model_type!r} is not supported; "
                f"qwen3-mlx runs the dense Qwen3 family (model_type 'qwen3') only"
            )
        hidden, heads, kv_heads, head_dim = _attention_shape(d)
        rope_theta, yarn = _rope(d)
        return cls(
            hidden_size=hidden,
            num_hidden_layers=_int(d, "num_hidden_layers"),
            intermediate_size=_int(d, "intermediate_size"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=_int(d, "vocab_size"),
            rms_norm_eps=_float(d, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            max_position_embeddings=_int(d, "max_position_embeddings", 40960),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", True),
            attention_bias=_bool(d, "attention_bias", False),
            rope_scaling=yarn,
            quantization=_quantization(d),
        )


def _attention_shape(d: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """hidden_size, num_attention_heads, num_key_value_heads and head_dim, checked against each other."""
    heads = _int(d, "num_attention_heads")
    kv_heads = _int(d, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ConfigError(f"config.json: num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}")
    hidden = _int(d, "hidden_size")
    head_dim = d.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"config.json: head_dim is missing and hidden_size={hidden} "
                              f"is not divisible by num_attention_heads={heads}")
        head_dim = hidden // heads
    head_dim = _int({"head_dim": head_dim}, "head_dim")
    if head_dim % 2:
        raise ConfigError(f"config.json: head_dim={head_dim} must be even for rotary embeddings")
    if heads * head_dim > _MAX_INT:
        raise ConfigError(f"config.json: num_attention_heads={heads} times head_dim={head_dim} is too large "
                          f"(at most {_MAX_INT})")
    return hidden, heads, kv_heads, head_dim


def _rope(d: Mapping[str, Any]) -> tuple[float, Yarn | None]:
    """rope_theta and the YaRN settings, if any."""
    # transformers >= 5 writes rope_parameters; older files write rope_theta and rope_scaling.
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise ConfigError(f"config.json: rope_scaling={rope!r} must be an object or null")
    theta_source = rope if "rope_theta" in rope else d
    rope_theta = _float(theta_source, "rope_theta", 1_000_000.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("default", None):
        return rope_theta, None
    if rope_type != "yarn":
        raise ConfigError(f"config.json: rope_scaling type {rope_type!r} is not supported; use 'yarn' or remove it")
    yarn = _parse_yarn(rope, d)
    if rope_theta <= 1:  # YaRN divides by log(rope_theta)
        raise ConfigError(f"config.json: rope_theta={rope_theta} must be > 1 with rope_scaling of type 'yarn'")
    return rope_theta, yarn


def _parse_yarn(rope: Mapping[str, Any], d: Mapping[str, Any]) -> Yarn:
    original = rope.get("original_max_position_embeddings")
    if original is None:
        raise ConfigError("config.json: rope_scaling of type 'yarn' needs 'original_max_position_embeddings'")
    original = _int({"original_max_position_embeddings": original}, "original_max_position_embeddings")
    if rope.get("factor") is None:
        # transformers derives the factor from the two context lengths when it is absent.
        factor = _int(d, "max_position_embeddings", 40960) / original
    else:
        factor = _float(rope, "factor")
    optional = {}
    for key in ("attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow"):
        if rope.get(key) is not None:
            optional[key] = _float(rope, key, positive=key not in ("mscale", "mscale_all_dim"))
    # transformers treats a zero or missing beta as its default ("or 32").
    for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        if not optional.get(key):
            optional[key] = default
        # YaRN takes log(original_max_position_embeddings / (2π beta)).
        if not 0 < original / (2 * math.pi * optional[key]) < math.inf:
            raise ConfigError(f"config.json: rope_scaling.{key}={optional[key]} is out of range")
    mscale_all_dim = optional.get("mscale_all_dim")
    if optional.get("mscale") and mscale_all_dim and factor > 1 and 0.1 * mscale_all_dim * math.log(factor) + 1 == 0:
        raise ConfigError(f"config.json: rope_scaling.mscale_all_dim={mscale_all_dim} makes YaRN's attention "
                          f"scale divide by zero")
    return Yarn(factor=factor, original_max_position_embeddings=original,
                truncate=_bool(rope, "truncate", True), **optional)


def _quantization(d: Mapping[str, Any]) -> dict | None:
    """mlx-lm's quantization block with every entry complete: {"group_size", "bits", "mode", "<module path>":
    {"group_size", "bits", "mode"} | bool, ...}, a null or absent group size or bits being MLX's default."""
    q = d.get("quantization")
    if q is None:
        hf_block = d.get("quantization_config")
        if isinstance(hf_block, Mapping) and "quant_method" in hf_block:
            method = hf_block["quant_method"]
            raise ConfigError(f"config.json: quantization_config.quant_method={method!r} is not supported; "
                              f"convert the unquantized checkpoint with `qwen3-mlx convert -q` instead")
        return None
    if not isinstance(q, Mapping):
        raise ConfigError(f"config.json: quantization={q!r} must be an object")
    block: dict[str, Any] = _quant_entry("quantization", q)
    for key, value in q.items():
        if key in _QUANT_KEYS:
            continue
        if isinstance(value, Mapping):
            block[key] = _quant_entry(f"quantization.{key}", value)
        elif isinstance(value, bool):
            block[key] = value
        else:
            raise ConfigError(f"config.json: quantization.{key}={value!r} must be an object or false")
    return block


def _quant_entry(where: str, entry: Mapping[str, Any]) -> dict:
    mode = entry.get("mode") or "affine"
    if not isinstance(mode, str) or mode not in QUANT_MODES:
        raise ConfigError(f"config.json: {where}.mode={mode!r} is not supported; use one of {', '.join(QUANT_MODES)}")
    resolved = {"group_size": entry.get("group_size"), "bits": entry.get("bits"), "mode": mode}
    with_mode = "" if mode == "affine" else f" with mode {mode!r}"
    for key, allowed, default in zip(("group_size", "bits"), QUANT_MODES[mode], QUANT_DEFAULTS[mode]):
        value = resolved[key]
        if value is None:
            resolved[key] = default
        elif type(value) is not int or value not in allowed:
            choices = f"one of {', '.join(map(str, allowed))}" if len(allowed) > 1 else str(allowed[0])
            raise ConfigError(f"config.json: {where}.{key}={value!r} must be {choices}{with_mode}")
    for key in ("quantize_input", "global_scale"):  # mlx-lm writes neither for a dense model
        if entry.get(key):
            raise ConfigError(f"config.json: {where}.{key}={entry[key]!r} is not supported; convert the "
                              f"unquantized checkpoint again without it")
    return resolved
