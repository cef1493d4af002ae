"""What Ollama's model routes say about the served model: /api/tags' entry, /api/show's details,
model_info and capabilities, /api/ps' running entry, read from the loaded model and its tokenizer."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from mlx.utils import tree_flatten

from ...model.config import ModelArgs
from . import protocol as p
from .mapping import tagged

# The Ollama release whose docs/api.md these routes follow; clients compare it with the least they need.
OLLAMA_VERSION = "0.12.0"
FOREVER = "9999-12-31T23:59:59Z"  # /api/ps' expiry of a model kept for the server's life
# generation_config.json's sampling defaults by their Modelfile names
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "repetition_penalty": "repeat_penalty"}


def parameter_count(args: ModelArgs) -> int:
    """The model's parameters as its config counts them (a quantized weight counts as the float one)."""
    hidden, head, layers = args.hidden_size, args.head_dim, args.num_hidden_layers
    attention = hidden * head * (2 * args.num_attention_heads + 2 * args.num_key_value_heads) + 2 * head
    mlp = 3 * hidden * args.intermediate_size
    embeddings = args.vocab_size * hidden * (1 if args.tie_word_embeddings else 2)
    return embeddings + layers * (attention + mlp + 2 * hidden) + hidden


def _size_label(count: int) -> str:
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"


def _quantization(model: Any) -> str:
    quantization = model.args.quantization
    if quantization:
        return f"Q{quantization.get('bits', 4)}"
    dtype = next(v.dtype for _, v in tree_flatten(model.parameters()))
    return str(dtype).rsplit(".", 1)[-1].upper().replace("FLOAT", "F")


def weight_bytes(model: Any) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def is_embedding(model: Any) -> bool:
    return getattr(model, "pooling", None) is not None


def capabilities(model: Any, tokenizer: Any) -> list[str]:
    """Ollama's names for what the model does: an embedding model embeds; a chat model completes,
    thinks (when its vocabulary has <think>) and calls tools (when its template takes them)."""
    if is_embedding(model):
        return ["embedding"]
    out = ["completion"]
    if "tools" in (tokenizer.chat_template or ""):
        out.append("tools")
    if tokenizer.think_start_id is not None:
        out.append("thinking")
    return out


def _time(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def _details(model: Any) -> p.Details:
    return p.Details(parameter_size=_size_label(parameter_count(model.args)), quantization_level=_quantization(model))


def entry(model: Any, name: str, created: int) -> p.ModelEntry:
    """The model as /api/tags lists it."""
    digest = hashlib.sha256(json.dumps([name, repr(model.args)]).encode()).hexdigest()
    return p.ModelEntry(name=tagged(name), model=tagged(name), modified_at=_time(created), size=weight_bytes(model),
                        digest=digest, details=_details(model))


def running(model: Any, name: str, created: int) -> p.RunningModel:
    """The model as /api/ps lists it: loaded for the server's life, in the unified memory."""
    listed = entry(model, name, created)
    return p.RunningModel(**listed.model_dump(), expires_at=FOREVER, size_vram=listed.size,
                          context_length=model.args.max_position_embeddings)


def show(model: Any, tokenizer: Any, name: str, created: int) -> p.ShowResponse:
    """/api/show's body: the details, model_info with the context length, the capabilities, the chat
    template and the checkpoint's sampling defaults as Modelfile parameters."""
    args: ModelArgs = model.args
    defaults = tokenizer.generation_config or {}
    given = {name: defaults[key] for key, name in _SAMPLING.items() if key in defaults}
    parameters = "\n".join(f"{name:<30} {value}" for name, value in given.items())
    info = {"general.architecture": "qwen3", "general.parameter_count": parameter_count(args),
            "qwen3.context_length": args.max_position_embeddings, "qwen3.embedding_length": args.hidden_size,
            "qwen3.block_count": args.num_hidden_layers, "qwen3.feed_forward_length": args.intermediate_size,
            "qwen3.attention.head_count": args.num_attention_heads,
            "qwen3.attention.head_count_kv": args.num_key_value_heads, "qwen3.attention.key_length": args.head_dim,
            "qwen3.attention.value_length": args.head_dim, "qwen3.rope.freq_base": args.rope_theta,
            "qwen3.attention.layer_norm_rms_epsilon": args.rms_norm_eps}
    modelfile = f"# Served by qwen3-mlx\nFROM {tagged(name)}\n" + "".join(
        f"PARAMETER {name} {value}\n" for name, value in given.items())
    return p.ShowResponse(modelfile=modelfile, parameters=parameters, template=tokenizer.chat_template or "",
                          details=_details(model), model_info=info, capabilities=capabilities(model, tokenizer),
                          modified_at=_time(created))
