"""Module swaps that shard the plain Qwen3 model (model.py) over the ranks of an mx.distributed group.

`shard(model, group, parallel)` replaces modules, as fast.py does, so model.py never asks about ranks:

- "tensor": in every layer q/k/v and gate/up become mlx.nn's all-to-sharded layers and o_proj and
  down_proj sharded-to-all ones (an all_sum each), so a rank keeps n_heads/N query heads,
  n_kv_heads/N KV heads and intermediate_size/N of the MLP: two all_sums of (B, L, hidden) a layer.
  The embedding and the head are cut by vocabulary (when N divides it; else replicated): an all_sum
  of (B, L, hidden) after the lookup and an all_gather of (B, L, V/N) logits a step.
- "pipeline": rank r keeps a run of consecutive layers (`PipelineStage`); the first stage embeds the
  tokens, the others receive the activations (B, L, hidden) from the rank before, and the last
  applies the final norm and the head, whose logits reach every rank through one all_sum (zeros
  elsewhere, `PipelineHead`). One send a stage and one all_sum of (B, L, vocab) a step.

Either way every rank computes the same logits, so with `sync_random_state` every rank draws the same
token. Each rank's caches hold only its heads or its layers: model.layers, model.make_cache() and
model.args describe this rank's part (the checkpoint's own config stays in model.sharding.args).

Shard after the weights are loaded lazily and before they are evaluated (loader.load does), then
apply fast.speed_up: each rank reads only its part (a whole tensor at a time, as mx.load reads them:
the embedding's part is cut and evaluated at once, before any layer is read), and the fusion joins
the sharded q/k/v and gate/up of a rank, which are whole heads.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_map

from ..errors import OptionError
from .cache import KVCache
from .config import ModelArgs
from .model import Model, Qwen3Model

MODES = ("tensor", "pipeline")


@dataclass(frozen=True)
class Sharding:
    """What part of the model this rank holds: its mode, its group, the checkpoint's config and the
    layers it keeps (all of them in tensor mode)."""

    mode: str
    group: mx.distributed.Group
    args: ModelArgs
    layers: range

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()


def shard(model: Model, group: mx.distributed.Group, parallel: str = "tensor",
          layers_per_rank: Sequence[float] | None = None) -> Model:
    """Shard `model` over `group`, in place (see the module docstring).

    Args:
        parallel: "tensor" or "pipeline".
        layers_per_rank: pipeline only: each rank's share of the layers, in rank order, as layer counts
            (10, 18) or any proportions (1, 2), e.g. each rank's memory; default an even split.

    Returns:
        the same model; a group of one leaves it as it is.

    Raises:
        OptionError: an unknown mode, a group size the heads or the MLP cannot be divided by, shares
            that are not one positive number per rank or leave a rank without a layer; a model
            already fused by fast.speed_up, or already sharded.
    """
    if parallel not in MODES:
        raise OptionError(f"parallel={parallel!r} must be 'tensor' or 'pipeline'")
    if layers_per_rank is not None and parallel != "pipeline":
        raise OptionError("layers_per_rank applies to parallel='pipeline' only; leave it out for 'tensor'")
    if group.size() == 1:
        return model
    if "q_proj" not in model.layers[0].self_attn or hasattr(model, "sharding"):
        raise OptionError("shard() takes the plain model once, before fast.speed_up fuses it; use "
                          "load(path, parallel=...), or loader.load_model(path, swap=...) shard then speed_up")
    args = model.args
    if parallel == "tensor":
        _shard_tensor(model, group)
        layers = range(args.num_hidden_layers)
    else:
        layers = layer_split(args.num_hidden_layers, group.size(), layers_per_rank)[group.rank()]
        _shard_pipeline(model, group, layers)
    model.sharding = Sharding(parallel, group, args, layers)
    return model


# ---------------------------------------------------------------- tensor parallelism


def _shard_tensor(model: Model, group: mx.distributed.Group) -> None:
    n = group.size()
    _check_tensor(model, n)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):  # rows are whole heads, rank r's are the r-th N-th
            attn[name] = shard_linear(attn[name], "all-to-sharded", group=group)
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.n_heads //= n
        attn.n_kv_heads //= n
        for name in ("gate_proj", "up_proj"):
            mlp[name] = shard_linear(mlp[name], "all-to-sharded", group=group)
        mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
    args = model.args
    if args.vocab_size % n == 0:  # else replicated
        inner = model.model
        inner.embed_tokens = ShardedEmbedding(inner.embed_tokens, group)
        if not args.tie_word_embeddings:
            model.lm_head = GatheredHead(shard_linear(model.lm_head, "all-to-sharded", group=group), group)
    model.args = dataclasses.replace(args, num_attention_heads=args.num_attention_heads // n,
                                     num_key_value_heads=args.num_key_value_heads // n)


class ShardedEmbedding(nn.Module):
    """An embedding cut by vocabulary: rank r holds rows [r V/N, (r+1) V/N). A lookup takes each id's
    row on the rank that holds it, zeros elsewhere, and an all_sum gives every rank the rows; as the
    tied head, each rank's logits of its rows are all_gathered."""

    def __init__(self, embedding: nn.Module, group: mx.distributed.Group) -> None:
        super().__init__()
        rows = embedding.weight.shape[0] // group.size()
        self._start, self._rows, self._group = group.rank() * rows, rows, group
        part = copy.copy(embedding)
        for name, value in embedding.items():  # weight; scales and biases when quantized: all (V, ...)
            part[name] = mx.contiguous(value[self._start : self._start + rows])
        # Evaluated now, one table at a time, while the layers are still unread: the whole table is
        # read to cut it, and would otherwise be read when every layer is in memory.
        mx.eval(part.parameters())
        self.embedding = part

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self._start
        held = (local >= 0) & (local < self._rows)
        h = self.embedding(mx.where(held, local, 0))  # (B, L, hidden)
        return mx.distributed.all_sum(mx.where(held[..., None], h, 0), group=self._group)

    def as_linear(self, x: mx.array) -> mx.array:
        return _gather_vocab(self.embedding.as_linear(x), self._group)


class GatheredHead(nn.Module):
    """An untied head whose rows (the vocabulary) are sharded: each rank's logits, all_gathered."""

    def __init__(self, head: nn.Module, group: mx.distributed.Group) -> None:
        super().__init__()
        self.head, self._group = head, group

    def __call__(self, x: mx.array) -> mx.array:
        return _gather_vocab(self.head(x), self._group)


def _gather_vocab(logits: mx.array, group: mx.distributed.Group) -> mx.array:
    """(B, L, V/N) on each rank -> (B, L, V), rank 0's part first."""
    parts = mx.distributed.all_gather(logits, group=group)  # (N * B, L, V/N)
    return parts.reshape(group.size(), *logits.shape).moveaxis(0, -2).reshape(*logits.shape[:-1], -1)


def _check_tensor(model: Model, n: int) -> None:
    """The heads and the MLP divide by n; quantized, each rank's inputs of o_proj and down_proj are
    whole quantization groups. Rank r's query heads then use exactly rank r's KV heads."""
    args = model.args
    for key in ("num_key_value_heads", "num_attention_heads", "intermediate_size"):
        value = getattr(args, key)
        if value % n:
            sizes = ", ".join(str(d) for d in range(2, value + 1) if value % d == 0 and d <= 16)
            raise OptionError(f"parallel='tensor' over {n} ranks: {key}={value} is not divisible by {n}; "
                              f"use a group of {sizes or 'one'} ranks, or parallel='pipeline'")
    layer = model.layers[0]
    for name, proj in (("self_attn.o_proj", layer.self_attn.o_proj), ("mlp.down_proj", layer.mlp.down_proj)):
        group_size = getattr(proj, "group_size", None)
        inputs = proj.weight.shape[1] * 32 // proj.bits if group_size else proj.weight.shape[1]
        if group_size and (inputs // n) % group_size:
            raise OptionError(f"parallel='tensor' over {n} ranks: {name}'s {inputs // n} inputs per rank are not "
                              f"whole quantization groups of {group_size}; use fewer ranks, a smaller "
                              f"group_size, or parallel='pipeline'")


# ---------------------------------------------------------------- pipeline parallelism


def layer_split(n_layers: int, ranks: int, shares: Sequence[float] | None = None) -> list[range]:
    """Each rank's layers, consecutive, rank 0 first: in proportion to `shares` (largest remainders
    first; counts that add up to n_layers are kept as they are), or as even as they go."""
    if shares is None:
        shares = [1.0] * ranks
    shares = list(shares)
    if len(shares) != ranks or not all(isinstance(s, (int, float)) and s > 0 for s in shares):
        raise OptionError(f"layers_per_rank={tuple(shares)} must give one positive number per rank ({ranks})")
    exact = [n_layers * s / sum(shares) for s in shares]
    counts = [int(e) for e in exact]
    for i in sorted(range(ranks), key=lambda i: (counts[i] - exact[i], i))[: n_layers - sum(counts)]:
        counts[i] += 1
    if min(counts) == 0:
        raise OptionError(f"layers_per_rank={tuple(shares)} leaves a rank without any of the {n_layers} layers; "
                          f"give every rank a larger share, or use fewer ranks")
    starts = [sum(counts[:r]) for r in range(ranks)]
    return [range(start, start + count) for start, count in zip(starts, counts)]


class PipelineStage(nn.Module):
    """Qwen3Model's part on one rank: layers `layers` of the model; the first stage embeds the tokens,
    the others receive the activations from the rank before; the last applies the final norm, the
    others send their output to the rank after (and return it, as the send's array)."""

    def __init__(self, inner: Qwen3Model, group: mx.distributed.Group, layers: range, dtype: mx.Dtype,
                 embed_tokens: nn.Module | None) -> None:
        super().__init__()
        self.layers = inner.layers[layers.start : layers.stop]
        if embed_tokens is not None:
            self.embed_tokens = embed_tokens
        self._group, self._dtype, self._hidden = group, dtype, inner.norm.weight.shape[0]
        self._first, self._last = group.rank() == 0, group.rank() == group.size() - 1
        self.norm = inner.norm  # applied by the last stage; every stage keeps it (hidden weights) for Model.dtype

    def __call__(self, inputs: mx.array, cache: Sequence[KVCache] | None) -> mx.array:
        rank = self._group.rank()
        if self._first:
            h = self.embed_tokens(inputs)  # (B, L, hidden)
        else:
            h = mx.distributed.recv((*inputs.shape, self._hidden), self._dtype, rank - 1, group=self._group)
        mask = cache[0].make_mask(h.shape[1]) if cache else ("causal" if h.shape[1] > 1 else None)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cache[i] if cache else None)
        if self._last:
            return self.norm(h)
        h = mx.distributed.send(h.astype(self._dtype), rank + 1, group=self._group)
        if cache:
            # A prefill evaluates the caches, not the logits (request.extend_cache): the send must
            # happen then too, or the next rank waits for it forever. Keys: an array, or a quantized
            # cache's tuple of them.
            cache[-1].keys = tree_map(lambda a: mx.depends(a, h) if isinstance(a, mx.array) else a, cache[-1].keys)
        return h


class PipelineHead(nn.Module):
    """The output head of a pipeline: the last stage's `head` (a linear layer, or the tied embedding's
    as_linear) gives the logits, every other rank zeros of their shape, and one all_sum hands the
    last stage's logits to every rank."""

    def __init__(self, head: nn.Module | None, group: mx.distributed.Group, vocab_size: int, tied: bool) -> None:
        super().__init__()
        if head is not None:
            self.head = head
        self._group, self._vocab, self._tied = group, vocab_size, tied

    def __call__(self, h: mx.array) -> mx.array:
        if "head" in self:
            logits = (self.head.as_linear(h) if self._tied else self.head(h)).astype(h.dtype)
        else:  # h is what this stage sent: the zeros wait for the send, so one evaluation does both
            logits = mx.depends(mx.zeros((*h.shape[:-1], self._vocab), h.dtype), h)
        return mx.distributed.all_sum(logits, group=self._group)


class StageEmbedding(nn.Module):
    """A tied embedding in a pipeline: looked up by the first stage, used as the head by the last (via
    its PipelineHead); a stage that does neither holds no weights."""

    def __init__(self, embedding: nn.Module | None, head: PipelineHead) -> None:
        super().__init__()
        if embedding is not None:
            self.embedding = embedding
        self.head = head

    def __call__(self, ids: mx.array) -> mx.array:
        return self.embedding(ids)

    def as_linear(self, h: mx.array) -> mx.array:
        return self.head(h)


def _shard_pipeline(model: Model, group: mx.distributed.Group, layers: range) -> None:
    inner, args = model.model, model.args
    first, last = group.rank() == 0, group.rank() == group.size() - 1
    embed, dtype = inner.embed_tokens, inner.norm.weight.dtype  # what the layers compute in (as Model.dtype)
    if args.tie_word_embeddings:
        head = PipelineHead(embed if last else None, group, args.vocab_size, tied=True)
        embed_tokens = StageEmbedding(embed if first else None, head)
    else:
        model.lm_head = PipelineHead(model.lm_head if last else None, group, args.vocab_size, tied=False)
        embed_tokens = embed if first else None
    model.model = PipelineStage(inner, group, layers, dtype, embed_tokens)
    model.args = dataclasses.replace(args, num_hidden_layers=len(layers))
