"""The model's passes over one request's cache: extend it with ids (no logits), prefill a prompt in
chunks, step (the draw after some ids), and the one rule for how much of a cache a prompt reuses."""

from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx

from ..device import generation_stream
from ..errors import Qwen3Error
from ..model.cache import KVCache
from ..model.model import Model
from .picker import Draw, Picker
from .prompt_cache import reusable

__all__ = ["Progress", "extend_cache", "prefill", "reuse_cache", "step"]

Progress = Callable[[int, int], None]


def extend_cache(model: Model, cache: list[KVCache], ids: Sequence[int], step_size: int = 2048) -> None:
    """Run `ids` through the model into `cache`, `step_size` tokens at a time, computing no logits."""
    for start in range(0, len(ids), step_size):
        with generation_stream():
            model(mx.array([list(ids[start : start + step_size])], mx.int32), cache)
            mx.eval([c.keys for c in cache])


def prefill(model: Model, cache: list[KVCache], picker: Picker, ids: Sequence[int], step_size: int = 2048,
            progress: Progress | None = None) -> Draw:
    """Run a prompt through the model in chunks; returns the first token's draw, on its way.
    `progress(done, total)` is called once per chunk."""
    if not ids:
        raise Qwen3Error("the prompt is empty; give some text")
    # All but the last token go through in chunks whose logits are never computed (MLX is lazy);
    # the last one alone gives the first token, so the output head runs on one position only.
    for start in range(0, len(ids) - 1, step_size):
        extend_cache(model, cache, ids[start : min(start + step_size, len(ids) - 1)], step_size)
        if progress and start + step_size < len(ids):
            progress(start + step_size, len(ids))
    draw = step(model, cache, picker, mx.array(list(ids[-1:]), mx.int32), remember=False)
    if progress:
        progress(len(ids), len(ids))
    return draw


def step(model: Model, cache: list[KVCache], picker: Picker, ids: mx.array, remember: bool = True) -> Draw:
    """The draw after ids (L,), which the cache takes in; queued, not waited for."""
    with generation_stream():
        logits = model.decode(ids[None], cache)  # (1, V)
        if picker.grammar is not None:
            # The mask needs the token before on the host: start the model now, so that it computes
            # while remember() waits for that token and the mask is filled.
            mx.async_eval(logits)
        if remember:
            picker.remember(ids)
        draw = picker.draw(logits)
    mx.async_eval(draw.arrays())
    return draw


def reuse_cache(cache: list[KVCache], held: Sequence[int], prompt_ids: Sequence[int]) -> int:
    """Trim `cache`, which holds the tokens `held`, to what `prompt_ids` can reuse of it (the rule of
    prompt_cache.reusable); returns how many prompt tokens it then holds."""
    cached = reusable(held, prompt_ids)
    for c in cache:
        if c.offset > cached:
            c.trim(c.offset - cached)
    return cached

