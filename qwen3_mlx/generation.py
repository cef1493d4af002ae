"""Generation, in three layers:

1. TokenGenerator: token ids from the model, one step ahead (the next step's graph is built and
   queued with mx.async_eval while the host looks at the current token), with chunked prefill,
   and forced tokens fed in one pass (the thinking budget's early-stop text). Sampling holds one
   request's way of drawing a token, shared with the rows of a batch (batch.py).
2. stream_generate: text chunks tagged "reasoning" or "answer", read by a Response (response.py):
   the parts, the thinking budget's cut, the stop rules, the counts and timings.
3. generate: the whole result at once. The CLI (cli.py) only prints what these yield.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx

from .cache import KVCache, RotatingKVCache
from .device import generation_stream
from .errors import Qwen3Error
from .model import Model
from .options import GenerationOptions
from .prompt import (
    Messages,
    check_prompt_ids,
    encode_prompt,
    make_prompt_cache,
    starts_in_reasoning,
)
from .response import (
    EARLY_STOP_TEXT,
    Chunk,
    GenerationResult,
    GenerationStats,
    Limits,
    Response,
    ThinkingBudget,
    TokenLogprob,
)
from .sampling import (
    Sampler,
    SamplingParams,
    default_params,
    make_logits_processor,
    make_sampler,
)
from .structured import GrammarState, constraint_state
from .tokenizer import Tokenizer

__all__ = [
    "EARLY_STOP_TEXT",
    "Chunk",
    "GenerationResult",
    "GenerationStats",
    "Sampling",
    "ThinkingBudget",
    "TokenGenerator",
    "TokenLogprob",
    "extend_cache",
    "generate",
    "stream_generate",
]

Progress = Callable[[int, int], None]
Processor = Callable[[mx.array, mx.array], mx.array]


# ---------------------------------------------------------------- layer 1: token ids


@dataclass
class Draw:
    """A drawn token, on the device until read: (1,) its id; with log-probabilities asked for, (1,)
    its log-probability and (k,) the ids and log-probabilities of the k most likely tokens."""

    token: mx.array
    logprobs: tuple[mx.array, mx.array, mx.array] | None = None

    def arrays(self) -> list[mx.array]:
        return [self.token, *(self.logprobs or ())]

    def read(self) -> tuple[int, TokenLogprob | None]:
        """The token id, and its TokenLogprob when asked for (waits for the device)."""
        token = self.token.item()
        if self.logprobs is None:
            return token, None
        chosen, top_ids, top_values = (a.tolist() for a in self.logprobs)
        top = sorted(zip(top_ids, top_values), key=lambda pair: -pair[1])
        return token, TokenLogprob(token, chosen[0], tuple(top))


class Sampling:
    """One request's way of drawing a token: its logits processors over the tokens it has been fed
    since the prompt, its sampler, its random key (from its seed, split at every draw; without a
    seed, MLX's global random state), and the log-probabilities it reports. A row of a batch draws
    with its own, so that its tokens never depend on the rows beside it. Its arrays are made at the
    first draw, in the thread that runs the model (an engine prepares requests in its callers' threads)."""

    def __init__(self, sampler: Sampler, processor: Processor | None = None, seed: int | None = None,
                 logprobs: int | None = None, vocab_limit: int | None = None,
                 grammar: GrammarState | None = None, params: SamplingParams | None = None) -> None:
        self.sampler, self.processor, self.seed = sampler, processor, seed
        self.logprobs, self.vocab_limit = logprobs, vocab_limit
        # Structured output: the mask needs the tokens so far on the host, so a constrained request
        # reads each token before its next draw is built; step() starts the model's step first, so the
        # mask is filled while it computes (benchmarks/structured_bench.py measures what is left).
        self.grammar = grammar
        self.params = params  # what sampler and processor were made from, if known
        self.key: mx.array | None = None
        self.history: mx.array | None = None  # every token fed after the prompt, for the penalties

    def shared_key(self) -> tuple | None:
        """Rows of a batch whose draws are the same function of their own logits alone may draw
        together, in one operation: the same parameters, no penalties over their own tokens, no key
        of their own (or greedy), no grammar, no log-probabilities. Their key; None for the others."""
        p = self.params
        if p is None or self.grammar is not None or self.logprobs is not None:
            return None
        if p.presence_penalty != 0.0 or p.repetition_penalty != 1.0 or (self.seed is not None and p.temperature != 0):
            return None
        bias = tuple(sorted((p.logit_bias or {}).items()))
        return (p.temperature, p.top_p, p.top_k, p.min_p, bias, self.vocab_limit)

    def remember(self, ids: mx.array) -> None:
        if self.processor is not None:
            self.history = ids if self.history is None else mx.concatenate([self.history, ids])
        if self.grammar is not None:
            for token in ids.tolist():
                self.grammar.advance(token)

    def draw(self, logits: mx.array) -> Draw:
        """The next token of logits (1, V), queued, not waited for."""
        if self.processor is not None:
            history = self.history if self.history is not None else mx.zeros((0,), mx.int32)
            logits = self.processor(logits, history)
        if self.grammar is not None:  # after every other processor
            logits = self.grammar.mask(logits)
        key = None
        if self.seed is not None:
            self.key, key = mx.random.split(self.key if self.key is not None else mx.random.key(self.seed))
        token = self.sampler(logits, key)
        if self.logprobs is None:
            return Draw(token)
        logits = logits[:, : self.vocab_limit].astype(mx.float32)
        logprobs = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]  # (V,)
        k = min(self.logprobs, logprobs.shape[0])
        top = mx.argpartition(-logprobs, k - 1)[:k] if k else mx.zeros((0,), mx.int32)
        return Draw(token, (logprobs[token], top, logprobs[top]))


def extend_cache(model: Model, cache: list[KVCache], ids: Sequence[int], step_size: int = 2048) -> None:
    """Run `ids` through the model into `cache`, `step_size` tokens at a time, computing no logits."""
    for start in range(0, len(ids), step_size):
        with generation_stream():
            model(mx.array([list(ids[start : start + step_size])], mx.int32), cache)
            mx.eval([c.keys for c in cache])


def prefill(model: Model, cache: list[KVCache], sampling: Sampling, ids: Sequence[int], step_size: int = 2048,
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
    draw = step(model, cache, sampling, mx.array(list(ids[-1:]), mx.int32), remember=False)
    if progress:
        progress(len(ids), len(ids))
    return draw


def step(model: Model, cache: list[KVCache], sampling: Sampling, ids: mx.array, remember: bool = True) -> Draw:
    """The draw after ids (L,), which the cache takes in; queued, not waited for."""
    with generation_stream():
        logits = model.decode(ids[None], cache)  # (1, V)
        if sampling.grammar is not None:
            # The mask needs the token before on the host: start the model now, so that it computes
            # while remember() waits for that token and the mask is filled.
            mx.async_eval(logits)
        if remember:
            sampling.remember(ids)
        draw = sampling.draw(logits)
    mx.async_eval(draw.arrays())
    return draw


class TokenGenerator:
    """Token ids from `model` for one request, always one step ahead of the caller.

    Args:
        model: anything with `decode(ids (1, L) int32, cache) -> logits (1, V)`.
        cache: the per-layer caches the model reads and extends.
        sampling: how the request draws its tokens.
    """

    def __init__(self, model: Model, cache: list[KVCache], sampling: Sampling) -> None:
        self.model, self.cache, self.sampling = model, cache, sampling
        self._pending: Draw | None = None  # the next token, being computed

    def prefill(self, ids: Sequence[int], step_size: int = 2048, progress: Progress | None = None) -> None:
        """Run the prompt through the model (see `prefill`); the first token is then on its way."""
        self._pending = prefill(self.model, self.cache, self.sampling, ids, step_size, progress)

    def next_token(self) -> tuple[int, TokenLogprob | None]:
        """The next token (and its log-probabilities, when asked for); the one after it is queued
        before this returns."""
        draw = self._pending
        self._pending = step(self.model, self.cache, self.sampling, draw.token)
        return draw.read()

    def feed(self, ids: Sequence[int]) -> None:
        """Force `ids` as the next tokens, in one pass (the queued token is dropped); sampling resumes after them."""
        self._pending = step(self.model, self.cache, self.sampling, mx.array(list(ids), mx.int32))


def run(gen: TokenGenerator, response: Response) -> Iterator[Chunk]:
    """Draw tokens into the response until it ends (but for its last chunk)."""
    while True:
        forced = response.take_forced()
        if forced:
            gen.feed(forced)
            response.clock.fed()
            for token in forced:
                yield from response.read(token, forced=True)
        if not response.may_draw():
            return
        token, logprob = gen.next_token()
        response.clock.drawn()
        yield from response.read(token, logprob=logprob)


# ---------------------------------------------------------------- prompts


def _context_room(model: Model, prompt_ids: Sequence[int], rotating: bool) -> int | None:
    """How many response tokens fit after the prompt in the model's context; None with a rotating cache."""
    if rotating:
        return None
    context = model.args.max_position_embeddings
    if len(prompt_ids) > context:
        raise Qwen3Error(
            f"the prompt has {len(prompt_ids)} tokens but the model's context is {context} "
            f"(max_position_embeddings); shorten it, or use a rotating cache (--max-kv-size, max_kv_size in the API)")
    return context - len(prompt_ids)


def _reuse_cache(cache: list[KVCache], prompt_ids: Sequence[int]) -> int:
    """How many prompt tokens a given cache holds (it holds a prefix of the prompt): at least the
    last prompt token must run again to give the first token's logits, so the cache is trimmed to that."""
    cached = min(cache[0].offset, len(prompt_ids) - 1)
    for c in cache:
        if c.offset > cached:
            c.trim(c.offset - cached)
    return cached


# ---------------------------------------------------------------- the API


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | Messages | Sequence[int],
    options: GenerationOptions | None = None,
    *,
    system: str | None = None,
    raw: bool = False,
    tools: list[dict] | None = None,
    prefill_response: str | None = None,
    keep: int | None = None,
    cache: list[KVCache] | None = None,
    progress: Progress | None = None,
    **kwargs: Any,
) -> Iterator[Chunk]:
    """Generate a response and yield it as text chunks tagged "reasoning" or "answer".

    Args:
        prompt: a user message, a list of chat messages, or token ids (used as they are).
        options: the GenerationOptions (think, thinking_budget, max_tokens, sampling, stop, seed, ...).
        system: a system prompt (replaces any system message in `prompt`).
        raw: `prompt` is the exact text to complete; no chat template.
        tools: tool definitions passed to the chat template.
        prefill_response: the start of the response, which the model continues (not yielded). It is
            reasoning when it starts with <think> or the template has opened the block; otherwise it
            is the answer, after an empty reasoning block (the template's, or one put in), so the
            model answers without reasoning. After raw text or token ids it is appended as it is.
        keep: with a rotating cache (options.max_kv_size), the tokens it always keeps (default: the
            system turn, else 4).
        cache: a cache holding a prefix of the prompt's tokens (reused; only the rest is computed).
            It is used as it is: options.max_kv_size only shapes a new cache.
        progress: called with (tokens done, total) once per prefill chunk.
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
        Qwen3Error: an empty prompt, or a prompt longer than the context.
    """
    opts = GenerationOptions.of(options, **kwargs)
    rotating = isinstance(cache[0], RotatingKVCache) if cache is not None else opts.max_kv_size is not None
    job = prepare(model, tokenizer, prompt, opts, system=system, raw=raw, tools=tools,
                  prefill_response=prefill_response, rotating=rotating)
    response, stats = job.response, job.response.stats
    if response.limits.allow_nothing:  # compute nothing
        yield Chunk("", "answer", None, stats)
        return
    if cache is None:
        cache = make_prompt_cache(model, tokenizer, job.prompt_ids, system, opts.max_kv_size, keep)
    stats.cached_tokens = _reuse_cache(cache, job.prompt_ids)
    gen = TokenGenerator(model, cache, job.sampling)
    response.clock.restart()
    mx.reset_peak_memory()
    try:
        gen.prefill(job.prompt_ids[stats.cached_tokens :], opts.prefill_step_size, progress)
        yield from run(gen, response)
    except KeyboardInterrupt:
        stats.finish_reason = "interrupted"
        raise
    finally:
        response.clock.stop()
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
    yield from response.last_chunks()


@dataclass
class Job:
    """One request made ready to run: its prompt's ids, the response its tokens go to, how it draws."""

    prompt_ids: list[int]
    options: GenerationOptions
    response: Response
    sampling: Sampling

    def most_tokens(self) -> int:
        """The most tokens its cache may hold: the prompt and the longest response the limits allow."""
        limits, budget = self.response.limits, self.response.budget
        if limits.budgeted:  # <think>, the reasoning, the early-stop text, then the answer and its end
            close = len(self.response.tokenizer.encode(budget.close_text()))
            response = 1 + budget.tokens + budget.overrun + close + limits.max_tokens + 1
        else:
            response = limits.max_tokens
        caps = [response] + [cap for cap in (limits.room, limits.max_total) if cap is not None]
        return len(self.prompt_ids) + min(caps)


def prepare(model: Model, tokenizer: Tokenizer, prompt: str | Messages | Sequence[int], opts: GenerationOptions,
            *, system: str | None = None, raw: bool = False, tools: list[dict] | None = None,
            prefill_response: str | None = None, rotating: bool = False) -> Job:
    """Encode and check a request (see stream_generate for the arguments and errors); computes nothing."""
    budget = ThinkingBudget(opts.thinking_budget) if opts.thinking_budget is not None else None
    prompt_ids, thinking = encode_prompt(tokenizer, prompt, system=system, think=opts.think, raw=raw, tools=tools,
                                         prefill_response=prefill_response)
    check_prompt_ids(prompt_ids, model.args.vocab_size)
    limits = Limits(opts.max_tokens, budget is not None, _context_room(model, prompt_ids, rotating), opts.max_total_tokens)
    sampling = make_sampling(tokenizer, model, opts, thinking and (budget is None or budget.tokens > 0))
    in_reasoning = starts_in_reasoning(tokenizer, prompt_ids)
    if any(c is not None for c in (opts.json_schema, opts.regex, opts.grammar)):
        sampling.grammar = constraint_state(tokenizer, model.args.vocab_size, json_schema=opts.json_schema,
                                            regex=opts.regex, grammar=opts.grammar, thinking=thinking,
                                            in_reasoning=in_reasoning)
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    response = Response(tokenizer, budget, limits, opts.stop, stats, in_reasoning, tools=bool(tools))
    return Job(list(prompt_ids), opts, response, sampling)


def make_sampling(tokenizer: Tokenizer, model: Model, opts: GenerationOptions, thinking: bool) -> Sampling:
    """How a request draws: the options' sampler and logits processor, with the mode's defaults and
    generation_config's, its seed's key, its log-probabilities."""
    params = default_params(thinking, tokenizer.generation_config, temperature=opts.temp, top_p=opts.top_p,
                            top_k=opts.top_k, min_p=opts.min_p, presence_penalty=opts.presence_penalty,
                            repetition_penalty=opts.repetition_penalty, logit_bias=opts.logit_bias)
    if params.temperature == 0 and thinking:
        warnings.warn("greedy decoding (temp 0) in thinking mode can repeat endlessly; "
                      "Qwen recommends temp 0.6, top-p 0.95, top-k 20", stacklevel=3)
    return Sampling(make_sampler(params, tokenizer.vocab_size), make_logits_processor(params, model.args.vocab_size),
                    opts.seed, opts.logprobs, tokenizer.vocab_size, params=params)


def generate(model: Model, tokenizer: Tokenizer, prompt: str | Messages | Sequence[int],
             options: GenerationOptions | None = None, **kwargs: Any) -> GenerationResult:
    """Generate a whole response; takes the arguments of stream_generate.

    Returns:
        GenerationResult with .reasoning, .content, .text, .token_ids and .stats.

    Raises:
        OptionError, Qwen3Error: as stream_generate.
    """
    return collect(stream_generate(model, tokenizer, prompt, options, **kwargs))


def collect(chunks: Iterator[Chunk]) -> GenerationResult:
    """The result the chunks of one response make up."""
    reasoning: list[str] = []
    content: list[str] = []
    logprobs: list[TokenLogprob] = []
    stats = GenerationStats()
    for chunk in chunks:
        if chunk.kind != "tool_call":
            (reasoning if chunk.kind == "reasoning" else content).append(chunk.text)
        logprobs.extend(chunk.logprobs)
        stats = chunk.stats
    return GenerationResult("".join(reasoning), "".join(content), stats.token_ids, stats, logprobs,
                            list(stats.tool_calls))
