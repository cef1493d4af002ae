"""Sampling: pure filters over logits, and the two factories the generation loop calls.

Everything returned by the factories stays on the device (no `.item()`), so decode steps can overlap
with `mx.async_eval`. Filter semantics match Hugging Face's Top-K/Top-P/Min-P warpers exactly.
"""

import math
from collections.abc import Callable

import mlx.core as mx

from ..checkpoint.sampling_defaults import SamplingParams, validate
from ..errors import OptionError

_NEG_INF = float("-inf")

# (logits (B, V), a random key or None) -> token ids (B,)
Sampler = Callable[[mx.array, mx.array | None], mx.array]


# ---- filters: (B, V) -> (B, V), removed entries set to -inf --------------------------------------
# Each takes logits or logprobs alike (softmax is shift-invariant) and renormalises over what earlier
# filters left, as HF does when it chains its warpers.


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens, and every token tied with the k-th (as HF's TopKLogitsWarper)."""
    k = min(k, logprobs.shape[-1])
    kth = mx.min(mx.topk(logprobs, k, axis=-1), axis=-1, keepdims=True)
    return mx.where(logprobs < kth, _NEG_INF, logprobs)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability sums to >= p (at least one).

    Same arithmetic as HF's TopPLogitsWarper: ascending sort, drop while the cumulative sum <= 1 - p.
    Ties at the boundary are split by sort order.
    """
    order = mx.argsort(logprobs, axis=-1)  # (B, V) ascending
    cumulative = mx.cumsum(mx.softmax(mx.take_along_axis(logprobs, order, axis=-1), axis=-1), axis=-1)
    # the last sorted entry is the most likely token: never dropped, even when rounding says so
    is_last = mx.arange(logprobs.shape[-1]) == logprobs.shape[-1] - 1
    drop_sorted = (cumulative <= 1 - p) & ~is_last
    drop = mx.put_along_axis(mx.zeros_like(drop_sorted), order, drop_sorted, axis=-1)
    return mx.where(drop, _NEG_INF, logprobs)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Drop tokens whose probability is below min_p times the top token's (as HF's MinPLogitsWarper)."""
    probs = mx.softmax(logprobs, axis=-1)
    threshold = min_p * mx.max(probs, axis=-1, keepdims=True)
    return mx.where(probs < threshold, _NEG_INF, logprobs)


def warp_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Divide by temperature (> 0), then apply top-k, top-p and min-p, in that order (HF's order).

    Returns float32 logits (B, V) whose softmax is the distribution `make_sampler` draws from.
    """
    logits = logits.astype(mx.float32) / params.temperature
    if params.top_k > 0:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = apply_top_p(logits, params.top_p)
    if params.min_p > 0.0:
        logits = apply_min_p(logits, params.min_p)
    return logits


# ---- factories -------------------------------------------------------------------------------------


def make_sampler(params: SamplingParams, vocab_limit: int | None) -> Sampler:
    """Build the function that turns the last position's logits into the next token id.

    Order: drop ids >= vocab_limit, divide by temperature, then top-k, top-p, min-p, then draw with
    mx.random.categorical from `key` (MLX's global random state when None). Temperature comes first
    and the filters follow in that order because that is what transformers does, so Qwen's
    recommended values mean here what they mean there. Ids past the tokenizer's vocabulary (the
    embedding is padded: 151936 rows for 151669 tokens) are cut off by slicing, so neither greedy
    nor sampled decoding can emit them.

    Args:
        params: the sampling parameters; temperature 0 means argmax.
        vocab_limit: the tokenizer's vocabulary size, or None to allow every column.

    Returns:
        sampler(logits (B, V) of any float dtype, key) -> token ids (B,) int32, lazily evaluated. A
        request draws from a key of its own (mx.random.key(seed), split at every step), so what it
        draws does not depend on whatever else the process samples; greedy decoding ignores the key.

    Raises:
        OptionError: a parameter is out of range.
        ValueError: vocab_limit < 1 (a tokenizer without tokens).
    """
    validate(params)
    if vocab_limit is not None and vocab_limit < 1:
        raise ValueError(f"vocab_limit must be >= 1, got {vocab_limit}")

    def sampler(logits: mx.array, key: mx.array | None = None) -> mx.array:
        logits = logits[..., :vocab_limit]  # (B, min(V, vocab_limit)): later ids cannot be drawn
        if params.temperature == 0:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        return mx.random.categorical(warp_logits(logits, params), axis=-1, key=key).astype(mx.int32)

    return sampler


def make_logits_processor(
    params: SamplingParams, vocab_size: int
) -> Callable[[mx.array, mx.array], mx.array] | None:
    """Build the function that applies penalties and logit bias before sampling, or None if none is set.

    The penalties look at every token generated so far (not a window, not the prompt). Repetition
    penalty is applied before presence penalty (the order vLLM uses), and logit bias last, so a bias
    is an exact offset whatever the history.

    Args:
        params: the sampling parameters.
        vocab_size: the width of the logits (the embedding's rows); logit_bias ids must be below it.

    Returns:
        process(logits (1, V), generated ids (n,) int32) -> float32 logits (1, V) (in their own dtype
        when the only change is banning tokens with a -inf bias), or None.

    Raises:
        OptionError: a parameter is out of range, or a logit_bias id is >= vocab_size.
    """
    validate(params)
    presence, repetition, bias = params.presence_penalty, params.repetition_penalty, params.logit_bias or {}
    penalties = presence != 0.0 or repetition != 1.0
    if not penalties and not bias:
        return None
    for token in bias:
        if token >= vocab_size:
            msg = f"logit_bias: token id {token} is outside the vocabulary (size {vocab_size})"
            raise OptionError(msg)
    ids, values = mx.array(list(bias), mx.int32), mx.array(list(bias.values()), mx.float32)

    # Banning tokens (-inf) is exact in any dtype, so it alone does not need a float32 copy of the row.
    in_float32 = penalties or any(math.isfinite(v) for v in bias.values())

    def process(logits: mx.array, tokens: mx.array) -> mx.array:
        if in_float32:
            logits = logits.astype(mx.float32)
        if penalties:
            # (V,) scatter on the device; a repeated id only raises its count, `> 0` makes it count once
            seen = mx.zeros((logits.shape[-1],), mx.int32).at[tokens].add(1) > 0
            if repetition != 1.0:
                penalised = mx.where(logits < 0, logits * repetition, logits / repetition)
                logits = mx.where(seen, penalised, logits)
            if presence != 0.0:
                logits = logits - presence * seen
        if bias:  # at the biased ids only: no row as wide as the vocabulary
            logits = logits.at[:, ids].add(values.astype(logits.dtype))
        return logits

    return process
