"""Adapters folded into the model's weights, and the fused model written as a checkpoint folder that
mlx-lm and our loader read unchanged.

Onto a quantized base, each adapted layer is dequantized, the delta added and the sum quantized again as
the layer was; where that would round most of the delta away (mlx-lm #1172: a small delta under the
quantization step), the layer stays float instead, and fuse says which (model/lora.py's loses_delta).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..checkpoint.adapters import fuse_adapters, load_adapters
from ..errors import Qwen3Error
from ..files import written_atomically

# The folder's files besides the weights and config.json that a checkpoint carries over (tokenizer,
# template, generation defaults).
CARRIED = ("*.txt", "*.jinja", "tokenizer*.json", "special_tokens_map.json", "generation_config.json",
           "vocab.json", "added_tokens.json")


def fuse(model: nn.Module, adapter_path: str | Path | None = None, *, dequantize: bool = False) -> list[str]:
    """Fold adapters into `model` in place: those of `adapter_path` (an adapter folder, applied first),
    or those already on it.

    Args:
        model: a model from load(path, for_training=True) (or one train() adapted).
        adapter_path: ours or mlx_lm.lora's adapter folder.
        dequantize: write float layers where the base was quantized.

    Returns:
        The layers over a quantized base kept float because quantizing again would lose the adapter.
    """
    if adapter_path is not None:
        load_adapters(model, Path(adapter_path))
    kept = fuse_adapters(model, dequantize)
    mx.eval(model.parameters())
    return kept


def save_model(model: nn.Module, source: Path, out: Path) -> Path:
    """Write `model` (plain, checkpoint-named) as a folder: model.safetensors, source's config.json (its
    quantization block kept while a layer is still quantized) and tokenizer files. Whole or not at all."""
    source, out = Path(source), Path(out)
    if out.exists() and out.resolve() == source.resolve():
        raise Qwen3Error(f"{out}: is the base model's folder; give another --save-path")
    if not hasattr(model.layers[0].self_attn, "q_proj"):
        raise Qwen3Error("the model has its fast swaps; load it with for_training=True before saving it")
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    weights = dict(tree_flatten(model.parameters()))
    if not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()) \
            and not any(k.endswith(".scales") for k in weights):
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    with written_atomically(out) as tmp:
        tmp.mkdir(parents=True)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, {"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        for pattern in CARRIED:
            for f in source.glob(pattern):
                if f.is_file() and not (tmp / f.name).exists():
                    shutil.copy(f, tmp / f.name)
    return out
