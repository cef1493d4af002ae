"""One memory ceiling for a process that serves many requests: what its memory holds, bounded above.

MLX allocates an operation's output when it schedules the operation, not when it runs it, and a
forward pass is scheduled whole before much of it has run: so the bound of a pass's activations here
counts every layer's intermediates at once. The scheduler (batch.py) adds the weights, the batch's KV
cache at its worst case, one layer's arrays more (a row joining, leaving or the cache growing replaces
one layer's arrays at a time), the cache of the prompt being computed, and the prefix store.

MLX's own mx.set_memory_limit does not back this up: on the CPU (MLX 0.32), a limit below what a
graph would take makes the evaluation wait forever rather than fail; and on Metal it is a guideline
that waits for running work, then allocates anyway. The ceiling is kept by admission instead.
"""

from __future__ import annotations

import math

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import MemoryLimitError
from ..files import human_size
from ..model.batch_cache import BatchKVCache
from ..model.kv_quant import KVQuantization

DEFAULT_SHARE = 0.75  # of the device's memory: what the ceiling is by default


def default_memory_limit() -> int:
    """75% of the memory the device should use: Metal's recommended working set, elsewhere MLX's
    memory limit (the machine's RAM on the CPU)."""
    recommended = mx.device_info().get("max_recommended_working_set_size")
    return int(DEFAULT_SHARE * (recommended or mx.get_memory_limit()))


def weight_bytes(model: object) -> int:
    """Bytes of a model's parameters (a draft model's count apart); 0 for a stub that has none."""
    parameters = getattr(model, "parameters", None)
    return sum(v.nbytes for _, v in tree_flatten(parameters())) if parameters else 0


def forward_bytes(model: object, tokens: int, context: int, rows: int = 1) -> int:
    """An upper bound of one forward pass's activations: `rows` rows of `tokens` tokens each, over
    `context` keys. Every layer's intermediates at once, in float32 at most (the residual stream,
    norms, projections, queries/keys/values before and after their norms and RoPE, the attention's
    output, the MLP's gate, up and product), a layer's attention scores and their softmax in float32,
    and the logits of each row's last token, with the draw's float32 copies of them."""
    a = model.args
    heads, kv_heads, dim = a.num_attention_heads, a.num_key_value_heads, a.head_dim
    per_token = 8 * a.hidden_size + 3 * (heads + 2 * kv_heads) * dim + 2 * heads * dim + 4 * a.intermediate_size
    layers = rows * tokens * per_token * a.num_hidden_layers
    scores = 2 * rows * heads * tokens * context
    logits = 4 * rows * a.vocab_size
    return 4 * (layers + scores + logits)


class MemoryPlan:
    """What a batch may take at its worst, against two ceilings: `limit` over everything the process
    holds (None: none), `kv_memory` over the batch's KV cache alone (a finer bound; None: none).

    Rows are left-padded to the longest, so the batch's cache at its worst is rows x (the longest
    worst case, prompt + response, or max_kv_size for a rotating cache, plus a growth step) x bytes per
    token (packed ones when quantized, with each row's full-precision head).

    Speculative decoding (`draft`: the draft model, or None) adds the draft's weights and a draft
    cache per row that holds the whole text, and makes a decode step a pass of `width` positions a row
    (1 + the longest draft or forced text, which Scheduler.check raises as requests come)."""

    def __init__(self, model: object, *, limit: int | None = None, kv_memory: int | None = None,
                 quantization: KVQuantization | None = None, max_kv_size: int | None = None,
                 draft: object | None = None) -> None:
        self.model, self.limit, self.kv_memory, self.quantization = model, limit, kv_memory, quantization
        self.max_kv_size = max_kv_size
        self.weights = weight_bytes(model) + weight_bytes(draft) if limit is not None else 0
        self.draft_per_token = draft.kv_bytes_per_token() if draft is not None else 0
        self.width = 1
        self.per_token = model.kv_bytes_per_token()
        self.layers = len(model.layers)

    def kv(self, rows: int, most_tokens: int) -> int:
        """The KV cache of `rows` rows of at most `most_tokens` tokens, at its worst."""
        drafts = rows * (most_tokens + BatchKVCache.step) * self.draft_per_token
        return drafts + self._kv(rows, most_tokens)

    def _kv(self, rows: int, most_tokens: int) -> int:
        if self.max_kv_size is not None:
            most_tokens = min(most_tokens, self.max_kv_size)
        q, tokens = self.quantization, most_tokens + BatchKVCache.step
        if q is None:
            return rows * tokens * self.per_token
        packed = q.bytes_per_token(self.per_token, self.model.dtype.size)
        return rows * math.ceil(tokens * packed + min(q.start, most_tokens) * self.per_token)

    def need(self, rows: int, longest: int, prompt: int, chunk: int, newcomers: int = 1) -> int:
        """Everything but the prefix store, at its worst, for a batch of `rows` rows of at most `longest`
        tokens (the newcomers among them) while `newcomers` prompts of at most `prompt` tokens are
        computed `chunk` tokens at a time in one pass: the weights, the batch's cache and one layer of
        it more (a join, a leave or a growth replaces one layer's arrays at a time), the prompts' own
        caches, a prefill pass's activations and a decode step's. Several newcomers' pass also holds
        their keys and values padded and stacked (prefill.py): twice, as they are padded, then stacked."""
        kv, prompts = self.kv(rows, longest), self.kv(newcomers, prompt)
        stacked = 2 * prompts if newcomers > 1 else 0
        return (self.weights + kv + -(-kv // self.layers) + prompts + stacked
                + forward_bytes(self.model, chunk, longest, newcomers) + forward_bytes(self.model, self.width, longest, rows))

    def check(self, most_tokens: int, prompt: int, chunk: int) -> None:
        """Refuse a request that could never fit, even alone.

        Raises:
            MemoryLimitError: the numbers, and what to change.
        """
        kv = self.kv(1, most_tokens)
        if self.kv_memory is not None and kv > self.kv_memory:
            raise MemoryLimitError(
                f"the request needs up to {most_tokens} tokens of KV cache ({human_size(kv)}) but the KV budget is "
                f"{human_size(self.kv_memory)}; lower max_tokens (or the thinking budget), or raise kv_memory")
        need = self.need(1, most_tokens, prompt, chunk)
        if self.limit is not None and need > self.limit:
            raise MemoryLimitError(
                f"the request needs up to {human_size(need)} alone (weights {human_size(self.weights)}, KV cache of "
                f"{most_tokens} tokens {human_size(need - self.weights - self._activations(1, most_tokens, chunk))}, "
                f"activations {human_size(self._activations(1, most_tokens, chunk))}) but the memory limit is "
                f"{human_size(self.limit)}; lower max_tokens (or the thinking budget), or raise memory_limit")

    def room(self, rows: int, longest: int, prompt: int, chunk: int, newcomers: int = 1) -> int | None:
        """The bytes the prefix store may keep beside such a batch (see need()): negative when the batch
        does not fit even without it, or its cache passes kv_memory; None when there is no limit."""
        if self.kv_memory is not None and self.kv(rows, longest) > self.kv_memory:
            return -1
        return None if self.limit is None else self.limit - self.need(rows, longest, prompt, chunk, newcomers)

    def _activations(self, rows: int, longest: int, chunk: int) -> int:
        return forward_bytes(self.model, chunk, longest) + forward_bytes(self.model, self.width, longest, rows)
