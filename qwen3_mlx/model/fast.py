"""Module swaps that make the plain Qwen3 model (model.py) fast, and its compiled decode step.

`speed_up(model)` replaces modules with faster ones that keep the same interface, so the model's
`__call__`s never ask which they have (as mlx-lm's `shard()` swaps in sharded layers):

- everywhere: q/k/v and gate/up fused, one matmul each, their weights concatenated along the
  output dimension (quantized ones too, when their bits, group size and mode agree);
- on the CPU only: MLX's CPU backend runs a matmul on one thread and each stream on a thread of its
  own, so large matmuls are split by output rows across one stream per core (`RowSplit`), a large
  MLP is cut along its intermediate size into one block per stream (`SplitMLP`), and one query
  attends through one matmul per KV head (`CPUAttention`);
- `model.decode` becomes `CompiledDecode`: one token through one `mx.compile`d graph.

The parameter names change (qkv_proj, gate_up_proj, blocks, layer): save weights before, never after.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import AllToShardedLinear, QuantizedAllToShardedLinear

from .compiled import CompiledDecode
from .kv_quant import Packed, quantized_attention
from .model import MLP, Attention, Mask, Model

# A matmul is split across CPU threads when it costs at least this many bf16 weights' worth: on the
# 2-core test machine, handing a block to another thread costs about 50-150 us and a bf16 matmul of
# 2**18 weights about 200 us; a quantized matmul costs about 8 times as much per weight on the CPU
# (the tiny shape of benchmarks/bench.py: its 393k-weight gate/up pays in bf16, its 262k head does not
# matter either way, and in 4 bits every matmul pays).
SPLIT_MIN_COST = 1 << 18
QUANTIZED_COST = 8
# Layers whose output rows are computed apart from each other, so that they can be fused side by side
# and split by rows: plain ones, and the all-to-sharded ones of parallel.py (a rank's whole heads,
# computed locally). The sharded-to-all ones end in an all_sum and are neither.
LOCAL_LINEARS = (nn.Linear, nn.QuantizedLinear, AllToShardedLinear, QuantizedAllToShardedLinear)


# ---------------------------------------------------------------- fused projections


class FusedAttention(Attention):
    """Attention whose queries, keys and values come out of one layer, qkv_proj."""

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        q_end = self.n_heads * self.head_dim
        k_end = q_end + self.n_kv_heads * self.head_dim
        q, k, v = _outputs(self.qkv_proj, x, [q_end, k_end, k_end + self.n_kv_heads * self.head_dim])
        return q, k, v


class CPUAttention(Attention):
    """For one query on the CPU, one matmul per KV head whose rows are its group's queries: MLX's CPU
    attention broadcasts each KV head to its group instead, and this is 1.5x faster with the same
    numbers (scores in the input dtype, softmax in float32). Several queries keep mx.fast's kernel."""

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Mask) -> mx.array:
        B, H, L, D = q.shape
        if isinstance(k, Packed):  # a quantized cache: in float32, where MLX's CPU quantized matmuls are fast
            return quantized_attention(q, k, v, self.scale, mask, mx.float32)
        if L > 1:
            return super().attend(q, k, v, mask)
        scores = (q.reshape(B, k.shape[1], -1, D) * self.scale) @ k.swapaxes(-1, -2)  # (B, H_kv, H / H_kv, S)
        if isinstance(mask, mx.array):
            scores = mx.where(mask, scores, -mx.inf)
        weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype)
        return (weights @ v).reshape(B, H, 1, D)


class FusedCPUAttention(FusedAttention, CPUAttention):
    """Both of the above."""


class FusedMLP(nn.Module):
    """down(silu(gate) * up), gate and up computed by one layer, gate_up_proj."""

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj

    def __call__(self, x: mx.array) -> mx.array:
        n = self.gate_up_proj["weight"].shape[0] // 2
        gate, up = _outputs(self.gate_up_proj, x, [n, 2 * n])
        return self.down_proj(nn.silu(gate) * up)


# ---------------------------------------------------------------- CPU threads


class RowSplit(nn.Module):
    """`layer` (a linear layer, or an embedding used as the output head) computed in blocks of its
    output rows, one block per thread, all at once, for inputs of at least `min_rows` rows (tokens:
    a matmul costs more with more of them, so a small layer pays to split for a batch, not for one
    token). The blocks are slices of the weights, not copies."""

    def __init__(self, layer: nn.Module, streams: Sequence[mx.ThreadLocalStream], min_rows: int = 1) -> None:
        super().__init__()
        self.layer = layer
        self._streams = tuple(streams)  # "_": not a parameter
        self._min_rows = min_rows

    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] < self._min_rows:
            return self.layer(x)
        return self.rows(x, 0, self.layer["weight"].shape[0])

    def rows(self, x: mx.array, start: int, stop: int) -> mx.array:
        """Output features [start, stop)."""
        step = -(-(stop - start) // (len(self._streams) + 1))
        work = [functools.partial(_linear_rows, self.layer, x, a, min(a + step, stop)) for a in range(start, stop, step)]
        return mx.concatenate(_in_parallel(self._streams, work), axis=-1)


class RowSplitEmbedding(RowSplit):
    """A tied embedding: lookups whole, its use as the output head (as_linear) split by rows."""

    def __call__(self, ids: mx.array) -> mx.array:
        return self.layer(ids)

    def as_linear(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] < self._min_rows:
            return self.layer.as_linear(x)
        return self.rows(x, 0, self.layer["weight"].shape[0])


class SplitMLP(nn.Module):
    """The MLP cut along its intermediate size into one block per thread: a block holds its share of
    the gate and up rows and of the down columns, and its output is a partial sum of the MLP's. Two
    hand-offs between threads for three matmuls, where splitting each would take six."""

    def __init__(self, blocks: list[FusedMLP], streams: Sequence[mx.ThreadLocalStream]) -> None:
        super().__init__()
        self.blocks = blocks
        self._streams = tuple(streams)

    def __call__(self, x: mx.array) -> mx.array:
        outs = _in_parallel(self._streams, [functools.partial(block, x) for block in self.blocks])
        return sum(outs[1:], outs[0])


def _in_parallel(streams: Sequence[mx.ThreadLocalStream], work: list[Callable[[], mx.array]]) -> list[mx.array]:
    """work[0] on the caller's stream, work[i] on streams[i - 1]: each on a thread of its own."""
    outs = [work[0]()]
    for fn, stream in zip(work[1:], streams):
        with mx.stream(stream):
            outs.append(fn())
    return outs


@functools.cache
def _extra_cpu_streams(n: int) -> tuple[mx.ThreadLocalStream, ...]:
    """n CPU streams besides the caller's. Thread-local, so that any thread can run the model: in each
    thread that uses one, MLX makes a stream (a thread) of its own, which lives as long as the process;
    hence made once per process."""
    return tuple(mx.new_thread_local_stream(mx.cpu) for _ in range(n))


def cpu_threads() -> int:
    """How many threads the CPU matmuls get: the cores this process may use, shared with the other
    ranks of a launched job on this host (local_ranks), at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores // local_ranks(), 4))


def local_ranks() -> int:
    """How many ranks of a job started by mlx.launch run on this host: those its ring hostfile
    (MLX_HOSTFILE, a JSON list of each rank's "ip:port" list; MLX_RANK is this rank) lists under an IP
    of this rank's. 1 outside such a job, and under JACCL or MPI (a rank per machine)."""
    path, rank = os.environ.get("MLX_HOSTFILE"), os.environ.get("MLX_RANK")
    if not path or rank is None:
        return 1
    try:
        with open(path, encoding="utf-8") as f:
            hosts = [{address.rsplit(":", 1)[0] for address in rank_addresses} for rank_addresses in json.load(f)]
        return sum(1 for ips in hosts if ips & hosts[int(rank)])
    except (OSError, ValueError, TypeError, AttributeError, IndexError):
        return 1


# ---------------------------------------------------------------- the swaps


def speed_up(model: Model, threads: int | None = None, split_min_cost: int = SPLIT_MIN_COST,
             quantized_cost: int = QUANTIZED_COST) -> Model:
    """Swap in the fast modules (see the module docstring). Call after loading the Hugging Face-named
    weights and before evaluating them (mx.load is lazy): they then go from the files straight into
    their fused places, one layer's worth at a time.

    Args:
        threads: CPU threads to split large matmuls across; default cpu_threads() when the default
            device is the CPU, else 1 (on a GPU nothing is split).
        split_min_cost: a matmul is split from this many bf16 weights' worth of work.
        quantized_cost: how many bf16 weights a quantized weight counts for.

    Returns:
        the same model, changed in place.
    """
    on_cpu = mx.default_device() == mx.cpu
    if threads is None:
        threads = cpu_threads() if on_cpu else 1
    streams = _extra_cpu_streams(threads - 1)

    def worth_splitting(cost: int) -> bool:
        return threads > 1 and cost >= split_min_cost

    def split(layer: nn.Module) -> nn.Module:
        if not isinstance(layer, LOCAL_LINEARS) or threads == 1:
            return layer
        rows = _rows_worth_splitting(_cost(layer, quantized_cost), split_min_cost)
        return RowSplit(layer, streams, rows) if rows is not None else layer

    for layer in model.layers:
        layer.self_attn = _fast_attention(layer.self_attn, on_cpu, split)
        mx.eval(layer.self_attn.parameters())  # one block at a time: the old arrays go as the new ones come
        mlp = layer.mlp
        local = isinstance(mlp.down_proj, (nn.Linear, nn.QuantizedLinear))  # a sharded MLP's blocks would each all_sum
        if (local and _concatenable([mlp.gate_proj, mlp.up_proj])  # an adapter's layer (lora.py) is neither
                and worth_splitting(2 * _cost(mlp.gate_proj, quantized_cost))):
            layer.mlp = _split_mlp(mlp, threads, streams)
        else:
            layer.mlp = _fast_mlp(mlp, split)
        mx.eval(layer.mlp.parameters())
    if model.args.tie_word_embeddings:
        embed = model.model.get("embed_tokens")  # a pipeline stage's may be none, or not an embedding (parallel.py)
        rows = None
        if isinstance(embed, (nn.Embedding, nn.QuantizedEmbedding)):
            rows = _rows_worth_splitting(_cost(embed, quantized_cost), split_min_cost)
        if threads > 1 and rows is not None:
            model.model.embed_tokens = RowSplitEmbedding(embed, streams, rows)
    else:
        model.lm_head = split(model.lm_head)
    model.decode = CompiledDecode(model)  # in place of the method, on this model only
    return model


def _fast_attention(attn: Attention, on_cpu: bool, split: Callable[[nn.Module], nn.Module]) -> Attention:
    qkv = _concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    kind = {(True, True): FusedCPUAttention, (True, False): FusedAttention,
            (False, True): CPUAttention, (False, False): Attention}[(qkv is not None, on_cpu)]
    projections = {"qkv_proj": qkv} if qkv is not None else {n: attn[n] for n in ("q_proj", "k_proj", "v_proj")}
    fast = _swap(kind, attn, drop=("q_proj", "k_proj", "v_proj"))
    for name, layer in {**projections, "o_proj": attn.o_proj}.items():
        fast[name] = split(layer)
    return fast


def _fast_mlp(mlp: MLP, split: Callable[[nn.Module], nn.Module]) -> nn.Module:
    gate_up = _concat_linears([mlp.gate_proj, mlp.up_proj])
    if gate_up is None:  # gate and up quantized differently (mlx-lm's mixed recipes): kept apart
        for name in ("gate_proj", "up_proj", "down_proj"):
            mlp[name] = split(mlp[name])
        return mlp
    # Not split: a gate/up worth splitting splits the whole MLP instead (speed_up).
    return FusedMLP(gate_up, split(mlp.down_proj))


def _split_mlp(mlp: MLP, threads: int, streams: Sequence[mx.ThreadLocalStream]) -> SplitMLP:
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    width = gate["weight"].shape[0]
    unit = getattr(down, "group_size", 32)  # block edges on quantization group boundaries
    step = -(-width // (threads * unit)) * unit
    blocks = [FusedMLP(_concat_linears([_slice(gate, a, b, 0), _slice(up, a, b, 0)]), _slice(down, a, b, 1))
              for a, b in ((a, min(a + step, width)) for a in range(0, width, step))]
    return SplitMLP(blocks, streams[: len(blocks) - 1])


def _swap(kind: type, old: nn.Module, drop: Sequence[str] = ()) -> nn.Module:
    """A module of class `kind` with `old`'s attributes and children, less those named in `drop`."""
    new = kind.__new__(kind)
    nn.Module.__init__(new)
    new.__dict__.update(old.__dict__)  # sizes, scale, training flags
    for name, child in old.items():
        if name not in drop:
            new[name] = child
    return new


# ---------------------------------------------------------------- weights


def _concat_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer whose output is the given layers' outputs side by side: their weights (and scales,
    biases) concatenated along the output dimension. None when they differ in kind or quantization.
    The first layer is reused for it."""
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

    return type(layers[0]) in LOCAL_LINEARS and all(kind(m) == kind(layers[0]) for m in layers)


def _outputs(layer: nn.Module, x: mx.array, ends: list[int]) -> list[mx.array]:
    """A fused layer's outputs [0, ends[0]), [ends[0], ends[1]), ...: for one token, one matmul split
    in parts; for more, one matmul per part on a view of the weights, so that each part has a buffer of
    its own, freed once used, rather than all being views of one that lives until the last is used (a
    prefill then needs no more memory than with the layers apart)."""
    if x.shape[-2] == 1:
        return mx.split(layer(x), ends[:-1], axis=-1)
    rows = layer.rows if isinstance(layer, RowSplit) else functools.partial(_linear_rows, layer)
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


# On the 2-core test machine a bf16 matmul of 8 rows costs about 4 times one row's (the CPU is
# compute-bound): a matmul of M rows counts for 1 + (M - 1) * 3 / 7 of one row's cost.
_MAX_ROWS = 64  # a layer that would not pay to split at this many rows is never split


def _rows_worth_splitting(cost: int, min_cost: int) -> int | None:
    """The fewest input rows from which a matmul of `cost` pays to split; None if not up to _MAX_ROWS."""
    if cost >= min_cost:
        return 1
    rows = math.ceil(1 + (min_cost / cost - 1) * 7 / 3)
    return rows if rows <= _MAX_ROWS else None


def _cost(layer: nn.Module, quantized_cost: int) -> int:
    rows, cols = layer["weight"].shape
    if "scales" in layer:  # cols are packed: count the inputs from the groups
        return rows * layer["scales"].shape[1] * layer.group_size * quantized_cost
    return rows * cols


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
