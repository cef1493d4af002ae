"""The Qwen3 dense transformer, with Hugging Face parameter names."""

from __future__ import annotations

import copy
import math
import os
from functools import cache, partial
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, RotatingKVCache, Slots
from .config import ModelArgs, Yarn


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

    def __call__(self, x: mx.array, offset: int) -> mx.array:
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


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: str | mx.array | None) -> mx.array:
    """Queries (B, H, L, D) over keys and values (B, H_kv, S, D), grouped KV heads included.

    mx.fast's fused kernel, except for one query on the CPU: there MLX builds attention from general
    operations that broadcast each KV head to its group of query heads, and one matmul per KV head
    whose rows are the group's queries is 1.5x faster with the same numbers (scores in the input
    dtype, softmax in float32).
    """
    B, H, L, D = q.shape
    if L > 1 or mx.default_device() != mx.cpu:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    scores = (q.reshape(B, k.shape[1], -1, D) * scale) @ k.swapaxes(-1, -2)  # (B, H_kv, H / H_kv, S)
    if isinstance(mask, mx.array):
        scores = mx.where(mask, scores, -mx.inf)
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype)
    return (weights @ v).reshape(B, H, 1, D)


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

    def __call__(self, x: mx.array, mask: str | mx.array | None, cache: KVCache | None) -> mx.array:
        B, L, _ = x.shape
        if "qkv_proj" in self:  # fused by Model.fuse
            q_end, k_end = self.n_heads * self.head_dim, (self.n_heads + self.n_kv_heads) * self.head_dim
            q, k, v = _outputs(self.qkv_proj, x, [q_end, k_end, k_end + self.n_kv_heads * self.head_dim])
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # QK-norm over head_dim on (B, L, H, D), then to (B, H, L, D) for RoPE and attention.
        q = self.q_norm(q.reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(k.reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def fuse(self) -> None:
        fused = _concat_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if "blocks" in self:  # split by Model.fuse: each stream computes a block's share of the output
            outs = []
            for block, stream in zip(self.blocks, self._streams):
                with mx.stream(stream):
                    outs.append(_swiglu(block["gate_up_proj"], block["down_proj"], x))
            return sum(outs[1:], outs[0])
        if "gate_up_proj" in self:  # fused by Model.fuse
            return _swiglu(self.gate_up_proj, self.down_proj, x)
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))

    def fuse(self) -> None:
        fused = _concat_linears([self.gate_proj, self.up_proj])
        if fused is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def split(self, streams: Sequence[mx.Stream]) -> None:
        """Instead of fuse(), cut the MLP along its intermediate dimension into one block per stream: a
        block holds its share of the gate and up rows (as one layer) and of the down columns, and its
        output is a partial sum of the MLP's. Two hand-offs between threads for three matmuls, where
        splitting each would take six."""
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        width = gate["weight"].shape[0]
        unit = getattr(down, "group_size", 32)  # block edges on quantization group boundaries
        step = -(-width // (len(streams) * unit)) * unit
        self.blocks = [{
            "gate_up_proj": _concat_linears([_slice(gate, start, stop, 0), _slice(up, start, stop, 0)]),
            "down_proj": _slice(down, start, stop, 1),
        } for start, stop in ((a, min(a + step, width)) for a in range(0, width, step))]
        self._streams = tuple(streams[: len(self.blocks)])
        del self.gate_proj, self.up_proj, self.down_proj


def _swiglu(gate_up: nn.Module, down: nn.Module, x: mx.array) -> mx.array:
    """down(silu(gate) * up), gate and up fused in one layer."""
    n = gate_up["weight"].shape[0] // 2  # never a RowSplit: a gate/up worth splitting splits the MLP instead
    gate, up = _outputs(gate_up, x, [n, 2 * n])
    return down(nn.silu(gate) * up)


def _concat_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer whose output is the given layers' outputs side by side: their weights (and scales,
    biases) concatenated along the output dimension. None when they differ in kind or quantization."""
    if not _concatenable(layers):
        return None
    first = layers[0]
    for name in first.keys():  # weight, bias; scales, biases when quantized: all (out, ...)
        first[name] = mx.concatenate([m[name] for m in layers], axis=0)
    return first


def _concatenable(layers: list[nn.Module]) -> bool:
    def kind(m: nn.Module) -> tuple:
        return (type(m), getattr(m, "group_size", None), getattr(m, "bits", None), getattr(m, "mode", None),
                sorted(m.keys()))

    return type(layers[0]) in (nn.Linear, nn.QuantizedLinear) and all(kind(m) == kind(layers[0]) for m in layers)


# A matmul is split across CPU threads when it costs at least this many bf16 weights' worth: on the
# 2-core test machine, handing a block to another thread costs about 50-150 us and a bf16 matmul of
# 2**18 weights about 200 us; a quantized matmul costs about 8 times as much per weight on the CPU
# (the tiny shape of benchmarks/bench.py: its 393k-weight gate/up pays in bf16, its 262k head does not
# matter either way, and in 4 bits every matmul pays).
SPLIT_MIN_COST = 1 << 18
QUANTIZED_COST = 8


class RowSplit(nn.Module):
    """`layer` (a linear layer, or an embedding used as the output head) computed in blocks of its
    output rows, one block per stream, all at once.

    MLX's CPU backend runs each stream on a thread of its own and a matmul on one thread, so this is
    how a matmul uses more than one core. The blocks are slices of the weights, not copies.
    """

    def __init__(self, layer: nn.Module, streams: Sequence[mx.Stream]) -> None:
        super().__init__()
        self.layer = layer
        self._streams = tuple(streams)

    def __call__(self, x: mx.array) -> mx.array:
        return self.rows(x, 0, self.layer["weight"].shape[0])

    def rows(self, x: mx.array, start: int, stop: int) -> mx.array:
        """Output features [start, stop)."""
        step = -(-(stop - start) // len(self._streams))
        outs = []
        for first, stream in zip(range(start, stop, step), self._streams):
            with mx.stream(stream):
                outs.append(_linear_rows(self.layer, x, first, min(first + step, stop)))
        return mx.concatenate(outs, axis=-1)


def _outputs(layer: nn.Module, x: mx.array, ends: list[int]) -> list[mx.array]:
    """A fused layer's outputs [0, ends[0]), [ends[0], ends[1]), ...: for one token, one matmul split
    in parts; for more, one matmul per part on a view of the weights, so that each part has a buffer of
    its own, freed once used, rather than all being views of one that lives until the last is used (a
    prefill then needs no more memory than with the layers apart)."""
    if x.shape[-2] == 1:
        return mx.split(layer(x), ends[:-1], axis=-1)
    rows = layer.rows if isinstance(layer, RowSplit) else partial(_linear_rows, layer)
    return [rows(x, start, stop) for start, stop in zip([0] + ends[:-1], ends)]


def _linear_rows(layer: nn.Module, x: mx.array, start: int, stop: int) -> mx.array:
    """Output features [start, stop) of an nn.Linear, nn.QuantizedLinear or (Quantized)Embedding.as_linear."""
    w = layer["weight"][start:stop]
    if "scales" in layer:
        biases = layer["biases"][start:stop] if "biases" in layer else None
        y = mx.quantized_matmul(x, w, layer["scales"][start:stop], biases, transpose=True,
                                group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    else:
        y = x @ w.T
    return y + layer["bias"][start:stop] if "bias" in layer else y


def _cost(layer: nn.Module) -> int:
    rows, cols = layer["weight"].shape
    if "scales" in layer:  # cols are packed: count the inputs from the groups
        return rows * layer["scales"].shape[1] * layer.group_size * QUANTIZED_COST
    return rows * cols


@cache
def cpu_streams(n: int) -> tuple[mx.Stream, ...]:
    """n CPU streams, the default one first; made once per process, as each new stream is a thread
    that lives as long as the process."""
    return (mx.default_stream(mx.cpu),) + tuple(mx.new_stream(mx.cpu) for _ in range(n - 1))


def cpu_threads() -> int:
    """How many threads the CPU matmuls get: the cores this process may use, at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 4)


def _slice(layer: nn.Module, start: int, stop: int, axis: int) -> nn.Module:
    """A copy of a linear layer keeping its output features (axis 0) or input features (axis 1, for a
    layer without bias; quantized, at group boundaries) [start, stop)."""
    part = copy.copy(layer)
    inputs = layer["scales"].shape[1] * layer.group_size if "scales" in layer else layer["weight"].shape[1]
    for name, value in layer.items():
        if axis == 0:
            part[name] = value[start:stop]
        else:  # packed weights and per-group scales hold their inputs in proportion
            cols = value.shape[1]
            part[name] = mx.contiguous(value[:, cols * start // inputs : cols * stop // inputs])
    return part


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: str | mx.array | None, cache: KVCache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: Sequence[KVCache] | None) -> mx.array:
        h = self.embed_tokens(inputs)
        mask = cache[0].make_mask(h.shape[1]) if cache else ("causal" if h.shape[1] > 1 else None)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cache[i] if cache else None)
        return self.norm(h)


class Model(nn.Module):
    """Qwen3ForCausalLM: token ids (B, L) -> logits (B, L, vocab_size)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self._decode_graph = None  # Model.step's compiled decode, made on first use
        self.model = Qwen3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Sequence[KVCache] | None = None) -> mx.array:
        h = self.model(inputs, cache)
        if "_head" in self:  # split across CPU threads by fuse()
            return self._head(h)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def decode(self, ids: mx.array, cache: list[KVCache]) -> mx.array:
        """Logits (1, vocab_size) of the last of ids (1, L); the cache takes them in."""
        return self.step(ids, cache)

    def step(self, ids: mx.array, cache: list[KVCache]) -> mx.array:
        """Logits (1, vocab_size) of the last of ids (1, L), which follow the tokens in `cache`;
        the cache takes them in.

        One token on a plain cache that holds something goes through a compiled graph (mx.compile
        fuses the many small operations a decode step is made of), traced again only when the
        cache's buffer grows; anything else goes through __call__."""
        if ids.shape[1] != 1 or not all(type(c) is KVCache and c.keys is not None for c in cache):
            return self(ids, cache)[:, -1, :]
        if self._decode_graph is None:
            self._decode_graph = mx.compile(self._decode)
        for c in cache:
            c.reserve(1, c.keys, c.values)
        logits, buffers = self._decode_graph(ids, mx.array(cache[0].offset, mx.int32),
                                             [(c.keys, c.values) for c in cache])
        for c, (keys, values) in zip(cache, buffers):
            c.keys, c.values, c.offset = keys, values, c.offset + 1
        return logits

    def _decode(self, ids: mx.array, offset: mx.array,
                buffers: list[tuple[mx.array, mx.array]]) -> tuple[mx.array, list[tuple[mx.array, mx.array]]]:
        slots = [Slots(k, v, offset) for k, v in buffers]
        logits = self(ids, slots)[:, -1, :]
        return logits, [(s.keys, s.values) for s in slots]

    def make_cache(self, max_kv_size: int | None = None, keep: int = 0) -> list[KVCache]:
        """One cache per layer: a plain KVCache, or a RotatingKVCache when max_kv_size is given."""
        if max_kv_size is None:
            return [KVCache() for _ in self.model.layers]
        return [RotatingKVCache(max_kv_size, keep) for _ in self.model.layers]

    def fuse(self, threads: int | None = None) -> "Model":
        """Make the loaded model fast to run: compute q/k/v and gate/up as one matmul each, their
        weights concatenated along the output dimension (quantized ones too, when their bits and
        group size agree); and on the CPU, split each large matmul by output rows, and a large MLP
        along its intermediate size, across `threads` streams (default: cpu_threads(); on a GPU
        nothing is split). Call after loading the Hugging
        Face-named weights; the parameter names change, so save weights before, never after."""
        if mx.default_device() != mx.cpu:
            threads = 1
        elif threads is None:
            threads = cpu_threads()
        streams = cpu_streams(threads)
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.fuse()
            gate_up = [mlp.gate_proj, mlp.up_proj]
            if threads > 1 and 2 * _cost(mlp.gate_proj) >= SPLIT_MIN_COST and _concatenable(gate_up):
                mlp.split(streams)
            else:
                mlp.fuse()
            for block in (attn, mlp):
                for name, child in list(block.children().items()):
                    big = isinstance(child, (nn.Linear, nn.QuantizedLinear)) and _cost(child) >= SPLIT_MIN_COST
                    if threads > 1 and big:
                        block[name] = RowSplit(child, streams)
                mx.eval(block.parameters())  # one block at a time: the old arrays go as the new ones come
        head = self.model.embed_tokens if self.args.tie_word_embeddings else self.lm_head
        if threads > 1 and _cost(head) >= SPLIT_MIN_COST:
            self._head = RowSplit(head, streams)  # "_": out of parameters(), which have the head by its own name
        return self

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers
