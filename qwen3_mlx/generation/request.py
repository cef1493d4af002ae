"""One request's toolkit, shared by the single-stream loop (generation.py) and the batch loop
(batch.py), which sit side by side above it:

- prepare: a Prompt and GenerationOptions made into a Job (its prompt's ids checked, the Response its
  tokens go to, the DrawState it draws with); computes nothing.
- DrawState: how one request draws a token (its processors over its own tokens, its sampler, its
  key, its grammar, its log-probabilities); a row of a batch draws with its own.
- extend_cache, prefill, step: the model's passes for one request's cache.
- reuse_cache: the one rule for how much of a cache a prompt can reuse; collect: chunks into a result.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import mlx.core as mx

from ..checkpoint.sampling_defaults import SamplingParams, default_params
from ..device import generation_stream
from ..errors import ContextLengthError, Qwen3Error
from ..model.cache import KVCache
from ..model.model import Model
from ..text.prompt import Prompt, check_prompt_ids, encode_prompt, starts_in_reasoning
from ..text.structured import GrammarState, constraint_state
from ..text.tokenizer import Tokenizer
from .options import GenerationOptions
from .prompt_cache import reusable
from .response import (
    Chunk,
    GenerationResult,
    GenerationStats,
    Limits,
    Response,
    ThinkingBudget,
    TokenLogprob,
)
from .sampling import Sampler, make_logits_processor, make_sampler

__all__ = ["Draw", "DrawState", "Job", "Prompt", "collect", "extend_cache", "prefill", "prepare", "reuse_cache",
           "step"]

Progress = Callable[[int, int], None]
Processor = Callable[[mx.array, mx.array], mx.array]


# ---------------------------------------------------------------- drawing a token


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


class DrawState:
    """How one request draws a token, and what that depends on: its logits processors over the
    tokens it has been fed since the prompt, its sampler, its random key (from its seed, split at
    every draw; without a seed, MLX's global random state), its grammar, and the log-probabilities it
    reports. A row of a batch draws with its own, so that its tokens never depend on the rows beside
    it. Its arrays are made at the first draw, in the thread that runs the model (an engine prepares
    requests in its callers' threads)."""

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

    @property
    def argmax_only(self) -> bool:
        """Its draw is the argmax of the logits over its vocabulary and nothing else: greedy, with no
        processor, grammar or log-probabilities (a speculative batch reads such rows' tokens at once)."""
        p = self.params
        return (p is not None and p.temperature == 0 and self.processor is None and self.grammar is None
                and self.logprobs is None)

    def remember(self, ids: mx.array) -> None:
        if self.processor is not None:
            self.history = ids if self.history is None else mx.concatenate([self.history, ids])
        if self.grammar is not None:
            for token in ids.tolist():
                self.grammar.advance(token)

    def next_key(self) -> mx.array | None:
        """The key of the next draw: the request's own, split once a draw; None without a seed (MLX's
        global random state)."""
        if self.seed is None:
            return None
        self.key, key = mx.random.split(self.key if self.key is not None else mx.random.key(self.seed))
        return key

    def draw(self, logits: mx.array) -> Draw:
        """The next token of logits (1, V), queued, not waited for."""
        if self.processor is not None:
            history = self.history if self.history is not None else mx.zeros((0,), mx.int32)
            logits = self.processor(logits, history)
        if self.grammar is not None:  # after every other processor
            logits = self.grammar.mask(logits)
        token = self.sampler(logits, self.next_key())
        if self.logprobs is None:
            return Draw(token)
        logits = logits[:, : self.vocab_limit].astype(mx.float32)
        logprobs = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]  # (V,)
        k = min(self.logprobs, logprobs.shape[0])
        top = mx.argpartition(-logprobs, k - 1)[:k] if k else mx.zeros((0,), mx.int32)
        return Draw(token, (logprobs[token], top, logprobs[top]))


def make_draw_state(tokenizer: Tokenizer, model: Model, opts: GenerationOptions, thinking: bool) -> DrawState:
    """How a request draws: the options' sampler and logits processor, with the mode's defaults and
    generation_config's, its seed's key, its log-probabilities."""
    params = default_params(thinking, tokenizer.generation_config, temperature=opts.temp, top_p=opts.top_p,
                            top_k=opts.top_k, min_p=opts.min_p, presence_penalty=opts.presence_penalty,
                            repetition_penalty=opts.repetition_penalty, logit_bias=opts.logit_bias)
    if params.temperature == 0 and thinking:
        warnings.warn("greedy decoding (temp 0) in thinking mode can repeat endlessly; "
                      "Qwen recommends temp 0.6, top-p 0.95, top-k 20", stacklevel=4)
    return DrawState(make_sampler(params, tokenizer.vocab_size), make_logits_processor(params, model.args.vocab_size),
                     opts.seed, opts.logprobs, tokenizer.vocab_size, params=params)


# ---------------------------------------------------------------- the model's passes


def extend_cache(model: Model, cache: list[KVCache], ids: Sequence[int], step_size: int = 2048) -> None:
    """Run `ids` through the model into `cache`, `step_size` tokens at a time, computing no logits."""
    for start in range(0, len(ids), step_size):
        with generation_stream():
            model(mx.array([list(ids[start : start + step_size])], mx.int32), cache)
            mx.eval([c.keys for c in cache])


def prefill(model: Model, cache: list[KVCache], state: DrawState, ids: Sequence[int], step_size: int = 2048,
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
    draw = step(model, cache, state, mx.array(list(ids[-1:]), mx.int32), remember=False)
    if progress:
        progress(len(ids), len(ids))
    return draw


def step(model: Model, cache: list[KVCache], state: DrawState, ids: mx.array, remember: bool = True) -> Draw:
    """The draw after ids (L,), which the cache takes in; queued, not waited for."""
    with generation_stream():
        logits = model.decode(ids[None], cache)  # (1, V)
        if state.grammar is not None:
            # The mask needs the token before on the host: start the model now, so that it computes
            # while remember() waits for that token and the mask is filled.
            mx.async_eval(logits)
        if remember:
            state.remember(ids)
        draw = state.draw(logits)
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


# ---------------------------------------------------------------- a request made ready


@dataclass
class Job:
    """One request made ready to run: its prompt's ids, the response its tokens go to, how it draws,
    and the Prompt it was prepared from (what distributed.py hands to the other ranks)."""

    prompt_ids: list[int]
    options: GenerationOptions
    response: Response
    draws: DrawState
    prompt: Prompt | None = None

    def forced_tokens(self) -> int:
        """The most tokens its response forces in at once: the thinking budget's early-stop text."""
        budget = self.response.budget
        return len(self.response.tokenizer.encode(budget.close_text())) if self.response.limits.budgeted else 0

    def most_tokens(self) -> int:
        """The most tokens its cache may hold: the prompt and the longest response the limits allow."""
        limits, budget = self.response.limits, self.response.budget
        if limits.budgeted:  # <think>, the reasoning, the early-stop text, then the answer and its end
            response = 1 + budget.tokens + self.forced_tokens() + limits.max_tokens + 1
        else:
            response = limits.max_tokens
        caps = [response] + [cap for cap in (limits.room, limits.max_total) if cap is not None]
        return len(self.prompt_ids) + min(caps)


def prepare(model: Model, tokenizer: Tokenizer, prompt: Prompt, opts: GenerationOptions, *,
            rotating: bool = False) -> Job:
    """Encode and check a request (see generation.stream_generate for the errors); computes nothing.
    `rotating`: its cache is a rotating one, so the context does not bound the response."""
    budget = ThinkingBudget(opts.thinking_budget) if opts.thinking_budget is not None else None
    prompt_ids, thinking = encode_prompt(tokenizer, prompt, think=opts.think)
    check_prompt_ids(prompt_ids, model.args.vocab_size)
    room = None if rotating else context_room(model.args.max_position_embeddings, len(prompt_ids))
    limits = Limits(opts.max_tokens, budget is not None, room, opts.max_total_tokens)
    draws = make_draw_state(tokenizer, model, opts, thinking and (budget is None or budget.tokens > 0))
    in_reasoning = starts_in_reasoning(tokenizer, prompt_ids)
    if any(c is not None for c in (opts.json_schema, opts.regex, opts.grammar)):
        draws.grammar = constraint_state(tokenizer, model.args.vocab_size, json_schema=opts.json_schema,
                                         regex=opts.regex, grammar=opts.grammar, thinking=thinking,
                                         in_reasoning=in_reasoning)
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    response = Response(tokenizer, budget, limits, opts.stop, stats, in_reasoning, tools=bool(prompt.tools))
    return Job(list(prompt_ids), opts, response, draws, prompt)


def context_room(context: int, prompt_tokens: int) -> int:
    """How many response tokens fit after the prompt in the model's context (max_position_embeddings).

    Raises:
        ContextLengthError: the prompt alone does not fit.
    """
    if prompt_tokens > context:
        raise ContextLengthError(
            f"the prompt has {prompt_tokens} tokens but the model's context is {context} "
            f"(max_position_embeddings); shorten it, or use a rotating cache (--max-kv-size, max_kv_size in the API)")
    return context - prompt_tokens


def collect(chunks: Iterator[Chunk]) -> GenerationResult:
    """The result the chunks of one response make up."""
    reasoning: list[str] = []
    content: list[str] = []
    logprobs: list[TokenLogprob] = []
    answer_logprobs: list[TokenLogprob] = []
    stats = GenerationStats()
    for chunk in chunks:
        if chunk.kind != "tool_call":
            (reasoning if chunk.kind == "reasoning" else content).append(chunk.text)
        logprobs.extend(chunk.logprobs)
        if chunk.kind == "answer":
            answer_logprobs.extend(chunk.logprobs)
        stats = chunk.stats
    return GenerationResult("".join(reasoning), "".join(content), stats.token_ids, stats, logprobs,
                            list(stats.tool_calls), answer_logprobs)
