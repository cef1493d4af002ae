"""The Qwen3 dense transformer, plain, with Hugging Face parameter names.

Token ids (B, L) in, logits (B, L, vocab_size) out. The cache is an argument (cache.py), never
module state. Speed-ups (fused projections, CPU threads, a compiled decode step) live in fast.py and
replace these modules whole; nothing here asks which modules it has.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, RotatingKVCache
from .config import ModelArgs, Yarn
from .kv_quant import KVQuantization, Packed, quantized_attention

Mask = str | mx.array | tuple | None  # None, "causal", a bool (L, S) array; a pair for a quantized cache


class RoPE(nn.Module):
    """Rotary embedding (non-traditional, i.e. rotate-half), with YaRN when the config asks for it."""

    def __init__(self, dims: int, base: float, yarn: Yarn | None) -> None:
        super().__init__()
        self.dims = dims
        self.base: float | None = base
        self.scale = 1.0  # YaRN's attention factor, applied to q and k as HF applies it to cos and sin
        if yarn is not None:
            self.base = None
            self._freqs = _yarn_periods(dims, base, yarn)
            self.scale = yarn.attention_factor or _yarn_mscale(yarn)

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        if self.base is not None:
            return mx.fast.rope(x, self.dims, traditional=False, base=self.base, scale=1.0, offset=offset)
        if self.scale != 1.0:
            x = x * self.scale
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset,
                            freqs=self._freqs)


def _yarn_mscale(yarn: Yarn) -> float:
    def get(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if yarn.mscale and yarn.mscale_all_dim:
        return get(yarn.factor, yarn.mscale) / get(yarn.factor, yarn.mscale_all_dim)
    return get(yarn.factor)


def _yarn_periods(dims: int, base: float, yarn: Yarn) -> mx.array:
    """Per-pair rotation periods (1 / inverse frequency), as transformers' _compute_yarn_parameters."""

    def correction_dim(rotations: float) -> float:
        return dims * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 where the pair keeps its original frequency
    inv_freq = 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))
    inv_freq = inv_freq / yarn.factor * (1 - extrapolation) + inv_freq * extrapolation
    return 1.0 / inv_freq


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = self.head_dim**-0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.rope = RoPE(self.head_dim, args.rope_theta, args.rope_scaling)

    def __call__(self, x: mx.array, mask: Mask, cache: KVCache | None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.project(x)
        # QK-norm over head_dim on (B, L, H, D), then to (B, H, L, D) for RoPE and attention.
        q = self.q_norm(q.reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(k.reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = self.attend(q, k, v, mask)  # (B, H, L, D)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values (B, L, H * D) of x (B, L, hidden)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q: mx.array, k: mx.array | Packed, v: mx.array | Packed, mask: Mask) -> mx.array:
        """Queries (B, H, L, D) over keys and values (B, H_kv, S, D); SDPA handles the grouped KV heads.
        A quantized cache's keys and values are packed: kv_quant reads them as they are."""
        if isinstance(k, Packed):
            return quantized_attention(q, k, v, self.scale, mask)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Mask, cache: KVCache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: Sequence[KVCache] | None) -> mx.array:
        h = self.embed_tokens(inputs)  # (B, L, hidden)
        mask = cache[0].make_mask(h.shape[1]) if cache else ("causal" if h.shape[1] > 1 else None)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cache[i] if cache else None)
        return self.norm(h)


class Model(nn.Module):
    """Qwen3ForCausalLM: token ids (B, L) -> logits (B, L, vocab_size)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Qwen3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Sequence[KVCache] | None = None) -> mx.array:
        h = self.model(inputs, cache)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def decode(self, ids: mx.array, cache: Sequence[KVCache]) -> mx.array:
        """Logits (B, vocab_size) of the last of ids (B, L), which follow the tokens in `cache`; the
        cache takes them in. (fast.speed_up puts a compiled version of this in its place.)"""
        return self(ids, cache)[:, -1, :]

    def make_cache(self, max_kv_size: int | None = None, keep: int = 0,
                   quantization: KVQuantization | None = None) -> list[KVCache]:
        """One cache per layer: a plain KVCache, or a RotatingKVCache when max_kv_size is given; either
        stores its keys and values packed when given a quantization (kv_quant.py).

        Raises:
            OptionError: the quantization's group size does not divide head_dim.
        """
        if quantization is not None:
            quantization.check(self.args.head_dim)
        if max_kv_size is None:
            return [KVCache(quantization) for _ in self.model.layers]
        return [RotatingKVCache(max_kv_size, keep, quantization) for _ in self.model.layers]

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    @property
    def dtype(self) -> mx.Dtype:
        """The activations' dtype (and so the KV cache's), quantized weights or not: the norms'."""
        return self.model.norm.weight.dtype

    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one token takes in the caches of all of this model's layers."""
        a = self.args
        return 2 * len(self.layers) * a.num_key_value_heads * a.head_dim * self.dtype.size


class LanguageModel(Protocol):
    """What the generation loops need of a model; Model is one, and so is a test's stub."""

    args: ModelArgs

    def __call__(self, inputs: mx.array, cache: Sequence[KVCache] | None = None) -> mx.array: ...

    def decode(self, ids: mx.array, cache: Sequence[KVCache]) -> mx.array: ...

    def make_cache(self, max_kv_size: int | None = None, keep: int = 0,
                   quantization: KVQuantization | None = None) -> list[KVCache]: ...

    @property
    def layers(self) -> Sequence[nn.Module]: ...

    @property
    def dtype(self) -> mx.Dtype: ...

    def kv_bytes_per_token(self) -> int: ...
