"""The single-stream loop, in three layers (the batch loop, batch.py, sits beside it; both start from
job.py's Job, run passes.py's passes and draw with picker.py's Picker):

1. TokenGenerator: token ids from the model, one step ahead (the next step's graph is built and
   queued with mx.async_eval while the host looks at the current token), with chunked prefill,
   and forced tokens fed in one pass (the thinking budget's early-stop text).
2. stream_generate: text chunks tagged "reasoning" or "answer", read by a Response (response.py):
   the parts, the thinking budget's cut, the stop rules, the counts and timings.
3. generate: the whole result at once. The CLI (cli.py) only prints what these yield.

A request is a Prompt (prompt.py) and GenerationOptions; the keyword arguments (system=, raw=,
tools=, prefill_response=, and the options' fields) are a thin layer over the two.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import mlx.core as mx

from ..model.cache import KVCache, RotatingKVCache
from ..model.model import Model
from ..text.prompt import Messages, Prompt
from ..text.tokenizer import Tokenizer
from .caches import new_cache
from .options import GenerationOptions
from .passes import Progress, prefill, reuse_cache, step
from .picker import Draw, Picker
from .proposers import make_proposer
from .job import collect, prepare
from .response import (
    EARLY_STOP_TEXT,
    Chunk,
    GenerationResult,
    GenerationStats,
    Response,
    ThinkingBudget,
    TokenLogprob,
)
from .verification import SpeculativeGenerator

__all__ = [
    "EARLY_STOP_TEXT",
    "Chunk",
    "GenerationResult",
    "GenerationStats",
    "Prompt",
    "ThinkingBudget",
    "TokenGenerator",
    "TokenLogprob",
    "generate",
    "stream_generate",
]
PromptLike = Prompt | str | Messages | Sequence[int]


# ---------------------------------------------------------------- layer 1: token ids


class TokenGenerator:
    """Token ids from `model` for one request, always one step ahead of the caller.

    Args:
        model: anything with `decode(ids (1, L) int32, cache) -> logits (1, V)`.
        cache: the per-layer caches the model reads and extends.
        picker: how the request draws its tokens.
    """

    def __init__(self, model: Model, cache: list[KVCache], picker: Picker) -> None:
        self.model, self.cache, self.picker = model, cache, picker
        self._pending: Draw | None = None  # the next token, being computed

    def prefill(self, ids: Sequence[int], step_size: int = 2048, progress: Progress | None = None) -> None:
        """Run the prompt through the model (see `prefill`); the first token is then on its way."""
        self._pending = prefill(self.model, self.cache, self.picker, ids, step_size, progress)

    def next_token(self) -> tuple[int, TokenLogprob | None]:
        """The next token (and its log-probabilities, when asked for); the one after it is queued
        before this returns."""
        draw = self._pending
        self._pending = step(self.model, self.cache, self.picker, draw.token)
        return draw.read()

    def feed(self, ids: Sequence[int]) -> None:
        """Force `ids` as the next tokens, in one pass (the queued token is dropped); sampling resumes after them."""
        self._pending = step(self.model, self.cache, self.picker, mx.array(list(ids), mx.int32))


def feed_forced(gen: TokenGenerator | SpeculativeGenerator, response: Response) -> Iterator[Chunk]:
    """Feed what the response forces in now (the thinking budget's text), in one pass, and read it."""
    forced = response.take_forced()
    if forced:
        gen.feed(forced)
        response.clock.fed()
        for token in forced:
            yield from response.read(token, forced=True)


def run(gen: TokenGenerator, response: Response) -> Iterator[Chunk]:
    """Draw tokens into the response until it ends (but for its last chunk)."""
    while True:
        yield from feed_forced(gen, response)
        if not response.may_draw():
            return
        token, logprob = gen.next_token()
        response.clock.drawn()
        yield from response.read(token, logprob=logprob)


def run_speculative(gen: SpeculativeGenerator, response: Response) -> Iterator[Chunk]:
    """As `run`, several tokens a step: each is read as the plain loop would read it, and those after
    the response ends, or forces text in, are taken back, so every limit acts at the same token."""
    stats = response.stats
    while True:
        yield from feed_forced(gen, response)
        if not response.may_draw():
            return
        tokens, used = gen.next_tokens(), 0
        for token, logprob in tokens:
            if used and not response.may_draw():
                break
            used += 1
            response.clock.drawn()
            yield from response.read(token, logprob=logprob)
        gen.keep(used)
        stats.drafted_tokens, stats.accepted_tokens = gen.drafted, gen.accepted


# ---------------------------------------------------------------- the API


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: PromptLike,
    options: GenerationOptions | None = None,
    *,
    system: str | None = None,
    raw: bool = False,
    tools: list[dict] | None = None,
    prefill_response: str | None = None,
    keep: int | None = None,
    cache: list[KVCache] | None = None,
    progress: Progress | None = None,
    draft_model: Model | None = None,
    **kwargs: Any,
) -> Iterator[Chunk]:
    """Generate a response and yield it as text chunks tagged "reasoning" or "answer".

    Args:
        prompt: a Prompt; or its content (a user message, a list of chat messages, or token ids),
            with its other parts as the keywords system, raw, tools and prefill_response (see Prompt).
        options: the GenerationOptions (think, thinking_budget, max_tokens, sampling, stop, seed, ...).
        keep: with a rotating cache (options.max_kv_size), the tokens it always keeps (default: the
            system turn, else 4).
        cache: a cache holding a prefix of the prompt's tokens (reused; only the rest is computed).
            It is used as it is: options.max_kv_size only shapes a new cache.
        progress: called with (tokens done, total) once per prefill chunk.
        draft_model: a smaller model of the same family (from `load()`) that drafts tokens for
            speculative decoding (options.num_draft_tokens, the longest draft; see verification.py).
        **kwargs: GenerationOptions fields, which override those of `options` (the keyword API:
            `stream_generate(model, tok, "q", max_tokens=5, thinking_budget=3)`).

    Every token the model draws counts toward a limit (see GenerationOptions.max_tokens). Without a
    rotating cache, prompt and response never exceed the model's context (max_position_embeddings):
    the response ends there with finish_reason "length". max_tokens=0 computes nothing.

    Yields:
        Chunk(text, kind, token, stats); `stats` is one object updated as the run goes on, so it is
        final once the iterator ends (or at any point, if the caller stops early).

    Raises:
        OptionError: an invalid option, or a prompt token id outside the model's vocabulary.
        Qwen3Error: an empty prompt; ContextLengthError: a prompt longer than the context.
    """
    opts = GenerationOptions.of(options, **kwargs)
    request = Prompt.of(prompt, system=system, raw=raw, tools=tools, prefill_response=prefill_response)
    rotating = isinstance(cache[0], RotatingKVCache) if cache is not None else opts.max_kv_size is not None
    job = prepare(model, tokenizer, request, opts, rotating=rotating)
    response, stats = job.response, job.response.stats
    if response.limits.allow_nothing:  # compute nothing
        yield Chunk("", "answer", None, stats)
        return
    if cache is None:
        cache = new_cache(model, tokenizer, job.prompt_ids, request.system, opts, keep)
    ids = job.prompt_ids
    stats.cached_tokens = reuse_cache(cache, ids[: cache[0].offset], ids)  # it holds a prefix of them
    proposer = make_proposer(model, opts, draft_model)
    if proposer is not None and rotating:  # drafts rejected after the window has wrapped are taken back
        for c in cache:
            c.rollback = True
    if proposer is None:
        gen: TokenGenerator | SpeculativeGenerator = TokenGenerator(model, cache, job.draws)
    else:
        gen = SpeculativeGenerator(model, cache, job.draws, proposer, opts.num_draft_tokens, job.prompt_ids)
    response.clock.restart()
    mx.reset_peak_memory()
    try:
        gen.prefill(job.prompt_ids[stats.cached_tokens :], opts.prefill_step_size, progress)
        yield from run(gen, response) if proposer is None else run_speculative(gen, response)
    except KeyboardInterrupt:
        stats.finish_reason = "interrupted"
        raise
    finally:
        response.clock.stop()
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
    yield from response.last_chunks()


def generate(model: Model, tokenizer: Tokenizer, prompt: PromptLike, options: GenerationOptions | None = None, **kwargs: Any) -> GenerationResult:
    """Generate a whole response; takes the arguments of stream_generate.

    Returns:
        GenerationResult with .reasoning, .content, .text, .token_ids and .stats.

    Raises:
        OptionError, Qwen3Error: as stream_generate.
    """
    return collect(stream_generate(model, tokenizer, prompt, options, **kwargs))
