"""Generation, in three layers:

1. TokenGenerator: token ids from the model, one step ahead (the next step's graph is built and
   queued with mx.async_eval while the host looks at the current token), with chunked prefill,
   and the two moves the thinking budget needs: feed forced tokens, roll back the last few.
2. stream_generate: text chunks tagged "reasoning" or "answer". One response (_Response) consults
   small parts, each with one job: _Limits (when no more tokens may be drawn), ThinkingBudget and
   _budget_ends_reasoning (where the reasoning is cut), _PartText (text of the reasoning or the
   answer, with the template's newlines trimmed), _StopStrings (answer text held back while it may
   start a stop string) and _Clock (time to first token and the decode rate).
3. generate: the whole result at once. The CLI (cli.py) only prints what these yield.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import mlx.core as mx

from .cache import KVCache, RotatingKVCache
from .device import generation_stream
from .errors import OptionError, Qwen3Error
from .model import Model
from .options import GenerationOptions
from .prompt import (
    EMPTY_THINKING_TEXT,
    Messages,
    check_prompt_ids,
    encode_prompt,
    make_prompt_cache,
    starts_in_reasoning,
)
from .sampling import Sampler, default_params, make_logits_processor, make_sampler
from .tokenizer import StreamDetokenizer, Tokenizer

# Qwen3 technical report, section 4.3: the text that ends reasoning early when the budget runs out.
EARLY_STOP_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution "
    "based on the thinking directly now.\n</think>\n\n"
)
_THOUGHT_ENDS = ("\n", ".", "!", "?", "。", "！", "？", "…")

Kind = Literal["reasoning", "answer"]
Progress = Callable[[int, int], None]
Processor = Callable[[mx.array, mx.array], mx.array]


# ---------------------------------------------------------------- layer 1: token ids


def extend_cache(model: Model, cache: list[KVCache], ids: Sequence[int], step_size: int = 2048) -> None:
    """Run `ids` through the model into `cache`, `step_size` tokens at a time, computing no logits."""
    for start in range(0, len(ids), step_size):
        with generation_stream():
            model(mx.array([list(ids[start : start + step_size])], mx.int32), cache)
            mx.eval([c.keys for c in cache])


class TokenGenerator:
    """Token ids from `model`, always one step ahead of the caller.

    Args:
        model: anything with `decode(ids (1, L) int32, cache) -> logits (1, V)`.
        cache: the per-layer caches the model reads and extends.
        sampler: `sampler(logits, key) -> ids (1,)` (sampling.make_sampler).
        processor: `processor(logits, generated ids) -> logits`, or None (make_logits_processor).
        key: this request's random key, split at every draw; None draws from MLX's global state.
    """

    def __init__(self, model: Model, cache: list[KVCache], sampler: Sampler,
                 processor: Processor | None = None, key: mx.array | None = None) -> None:
        self.model, self.cache, self.sampler, self.processor = model, cache, sampler, processor
        self._key = key
        self._history = mx.zeros((0,), mx.int32)  # every token generated or fed, kept for the penalties
        self._pending: mx.array | None = None  # (1,) the next token, being computed

    def _step(self, ids: mx.array) -> mx.array:
        """The token (1,) after ids (L,), which the cache takes in; queued, not waited for."""
        with generation_stream():
            logits = self.model.decode(ids[None], self.cache)  # (1, V)
            if self.processor is not None:
                logits = self.processor(logits, self._history)
            key = None
            if self._key is not None:
                self._key, key = mx.random.split(self._key)
            token = self.sampler(logits, key)
        mx.async_eval(token)
        return token

    def prefill(self, ids: Sequence[int], step_size: int = 2048, progress: Progress | None = None) -> None:
        """Run the prompt through the model in chunks; the first token is then on its way.
        `progress(done, total)` is called once per chunk."""
        if not ids:
            raise Qwen3Error("the prompt is empty; give some text")
        # All but the last token go through in chunks whose logits are never computed (MLX is lazy);
        # the last one alone gives the first token, so the output head runs on one position only.
        for start in range(0, len(ids) - 1, step_size):
            extend_cache(self.model, self.cache, ids[start : min(start + step_size, len(ids) - 1)], step_size)
            if progress and start + step_size < len(ids):
                progress(start + step_size, len(ids))
        self._pending = self._step(mx.array(list(ids[-1:]), mx.int32))
        if progress:
            progress(len(ids), len(ids))

    def next_token(self) -> int:
        """The next token; the one after it is queued before this returns."""
        token = self._pending
        self._remember(token)
        self._pending = self._step(token)
        return token.item()

    def feed(self, ids: Sequence[int]) -> None:
        """Force `ids` as the next tokens, in one pass (the queued token is dropped); sampling resumes after them."""
        forced = mx.array(list(ids), mx.int32)
        self._remember(forced)
        self._pending = self._step(forced)

    def _remember(self, ids: mx.array) -> None:
        if self.processor is not None:
            self._history = mx.concatenate([self._history, ids])

    def can_roll_back(self) -> bool:
        return all(c.is_trimmable() for c in self.cache)

    def roll_back(self, n: int) -> None:
        """Forget the last n tokens returned; call feed() next."""
        for c in self.cache:
            c.trim(n)
        self._history = self._history[: max(self._history.shape[0] - n, 0)]


# ---------------------------------------------------------------- the thinking budget


@dataclass(frozen=True)
class ThinkingBudget:
    """When to end the reasoning early.

    `tokens` counts the tokens the model writes after <think> (the <think> token itself and the
    forced early-stop text are not counted). From `tokens - grace` on, the reasoning is cut as soon
    as its text ends a line or a sentence; at `tokens` it is cut in any case. A cut never falls
    inside a multi-byte character: the loop rolls back the incomplete tokens instead (unless a
    rotating cache has moved past them). So the reasoning holds at most `tokens` model tokens, then
    EARLY_STOP_TEXT (which closes it with </think>), then the model writes the answer. tokens=0
    means no reasoning: the block is closed at once with EMPTY_THINKING_TEXT, as Qwen3's template
    does for enable_thinking=False.
    """

    tokens: int
    grace: int = 32

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise OptionError(f"thinking_budget must be >= 0, got {self.tokens}")

    def should_stop(self, count: int, text: str) -> bool:
        """Whether to stop after `count` reasoning tokens whose text (at a character boundary) is `text`."""
        if count >= self.tokens:
            return True
        return count >= self.tokens - min(self.grace, self.tokens // 4) and text.rstrip(" ").endswith(_THOUGHT_ENDS)

    def close_text(self) -> str:
        return EMPTY_THINKING_TEXT if self.tokens == 0 else EARLY_STOP_TEXT


def _budget_ends_reasoning(budget: ThinkingBudget, stats: GenerationStats, detok: StreamDetokenizer,
                           gen: TokenGenerator) -> bool:
    """Whether the budget ends the reasoning after the token just read. Out of budget inside a
    multi-byte character, the character's first tokens are taken back first, so that the cut falls
    before it; a cache that cannot forget them (rotated) gets the cut there all the same."""
    if not detok.holding:
        return budget.should_stop(stats.reasoning_tokens, detok.text)
    if stats.reasoning_tokens < budget.tokens:
        return False
    if gen.can_roll_back():
        n = detok.holding
        gen.roll_back(n)
        detok.drop_held()
        stats.reasoning_tokens -= n
        del stats.token_ids[-n:]
    return True


# ---------------------------------------------------------------- layer 2: text stream


@dataclass
class GenerationStats:
    """Counts and timings. reasoning_tokens: tokens the model wrote inside <think>...</think>
    (not the tags, not forced text); answer_tokens: tokens after it (no end-of-turn token);
    forced_tokens: tokens the thinking budget inserted; sampled_tokens: every token the model drew
    (tags, end of turn and tokens later taken back included)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in a reused cache, not computed again
    reasoning_tokens: int = 0
    answer_tokens: int = 0
    forced_tokens: int = 0
    sampled_tokens: int = 0
    # The decode rate's share: tokens drawn by one-token steps and the time between them. The first
    # token after the prefill, and after forced tokens are fed in one pass, come out of multi-token
    # passes: neither they nor the passes' time count.
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0  # from the first token to the end
    finish_reason: str | None = None  # "stop", "length", "stop_string", "interrupted"
    budget_exhausted: bool = False  # the thinking budget ended the reasoning
    peak_memory_gb: float = 0.0
    token_ids: list[int] = field(default_factory=list)  # the response as run through the model, forced tokens too

    @property
    def generated_tokens(self) -> int:
        return self.reasoning_tokens + self.answer_tokens

    @property
    def prompt_tps(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        """The decode rate: tokens drawn one step at a time over the time they took."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def time_to_first_token(self) -> float:
        return self.prompt_seconds


@dataclass
class Chunk:
    """A piece of streamed text. `stats` is the run's live statistics object."""

    text: str
    kind: Kind
    token: int | None
    stats: GenerationStats = field(repr=False)


@dataclass
class GenerationResult:
    """What generate() returns: the reasoning and the answer apart, with counts and timings."""

    reasoning: str
    content: str
    token_ids: list[int]
    stats: GenerationStats

    @property
    def text(self) -> str:
        """The whole response as the model wrote it, reasoning in <think> tags."""
        if not self.reasoning and not self.stats.reasoning_tokens:
            return self.content
        return f"<think>{self.reasoning}</think>{self.content}"


@dataclass(frozen=True)
class _Limits:
    """When no more tokens may be drawn. Every drawn token counts toward a limit: without a thinking
    budget, `max_tokens` counts them all, <think> and </think> included; with one, the budget bounds
    the reasoning (_budget_ends_reasoning) and `max_tokens` the answer. `room`: the response tokens,
    forced ones included, that fit in the model's context after the prompt; None with a rotating cache."""

    max_tokens: int
    budgeted: bool
    room: int | None

    def reached(self, stats: GenerationStats, part: Kind) -> bool:
        if self.room is not None and len(stats.token_ids) >= self.room:
            return True
        if not self.budgeted:
            return stats.sampled_tokens >= self.max_tokens
        return part == "answer" and stats.answer_tokens >= self.max_tokens

    def fit(self, stats: GenerationStats, ids: list[int]) -> list[int]:
        """The first of `ids` that fit in the context after the response so far."""
        return ids if self.room is None else ids[: max(self.room - len(stats.token_ids), 0)]


class _Clock:
    """Timings: the time to the first token, the decode rate's share (see GenerationStats), the total."""

    def __init__(self, stats: GenerationStats) -> None:
        self.stats = stats
        self.start = self.last = time.perf_counter()
        self.after_pass = True  # the next token comes out of a multi-token pass: the prefill, first

    def drawn(self) -> None:
        """A token has been drawn."""
        now, s = time.perf_counter(), self.stats
        if s.sampled_tokens == 0:
            s.prompt_seconds = now - self.start
        elif not self.after_pass:
            s.decode_tokens += 1
            s.decode_seconds += now - self.last
        s.sampled_tokens += 1
        self.last, self.after_pass = now, False

    def fed(self) -> None:
        """Forced tokens were fed: the next token comes out of their pass."""
        self.after_pass = True

    def stop(self) -> None:
        self.stats.generation_seconds = time.perf_counter() - self.start - self.stats.prompt_seconds


class _PartText:
    """The text of one part of the response (the reasoning or the answer), released as its characters
    complete. Qwen3's template strips the newlines around the reasoning and before the answer; so does
    this: leading newlines are dropped, and the reasoning's trailing ones are held until more text follows."""

    def __init__(self, tokenizer: Tokenizer, kind: Kind) -> None:
        self.detok = tokenizer.detokenizer()
        self.hold_trailing = kind == "reasoning"
        self.started = False
        self.tail = ""  # trailing newlines held back

    def add(self, token: int) -> str:
        return self._trim(self.detok.add(token))

    def flush(self) -> str:
        """What is left at the end of the part (an incomplete character as U+FFFD; held newlines dropped)."""
        return self._trim(self.detok.flush())

    def _trim(self, text: str) -> str:
        if not self.started:
            text = text.lstrip("\n")
            if not text:
                return ""
            self.started = True
        if not self.hold_trailing:
            return text
        text = self.tail + text
        kept = text.rstrip("\n")
        self.tail = text[len(kept):]
        return kept


class _StopStrings:
    """Answer text, held back while it could be the start of a stop string; `found` once one appears."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop, self.held, self.found = tuple(stop), "", False

    def push(self, text: str) -> str:
        """The text that can be shown now; none of it from a stop string on."""
        text = self.held + text
        at = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if at >= 0:
            self.held, self.found = "", True
            return text[:at]
        safe = len(text) - _longest_stop_prefix(text, self.stop)
        self.held = text[safe:]
        return text[:safe]

    def finish(self, text: str) -> str:
        """The last text: what was held, unless it starts a stop string."""
        shown = self.push(text)
        shown, self.held = shown + self.held, ""
        return shown


def _longest_stop_prefix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that starts some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class _Response:
    """One response as its tokens arrive: which part it is in, what is shown, and when it ends.

    A reasoning block opens only with the response's first token (<think>), or in the prompt; after
    that <think> is text like any other, and so is </think> outside the reasoning.
    """

    def __init__(self, gen: TokenGenerator, tokenizer: Tokenizer, budget: ThinkingBudget | None,
                 limits: _Limits, stop: Sequence[str], stats: GenerationStats, reasoning: bool) -> None:
        self.gen, self.tokenizer, self.budget, self.limits, self.stats = gen, tokenizer, budget, limits, stats
        self.part: Kind = "reasoning" if reasoning else "answer"
        self.text = _PartText(tokenizer, self.part)
        self.stops = _StopStrings(stop)
        self.clock = _Clock(stats)
        self.forced: list[int] = []  # fed tokens still to be read
        self.first = True  # no token read yet

    def tokens(self) -> Iterator[Chunk]:
        """The response's chunks, but for the last one (last_chunk)."""
        self.stats.finish_reason = "length"
        if self.part == "reasoning":
            self._consult_budget()  # a budget of 0 closes the block at once
        while (drawn := self._next()) is not None:
            token, forced = drawn
            self.stats.token_ids.append(token)
            if token in self.tokenizer.eos_token_ids:
                self.stats.finish_reason = "stop"
                return
            yield from self._read(token, forced)
            if self.stops.found:
                self.stats.finish_reason = "stop_string"
                return

    def last_chunk(self) -> Chunk:
        """Always one (maybe empty), so that a caller sees the final stats even for an empty response."""
        if self.stops.found:
            return Chunk("", self.part, None, self.stats)
        text = self.text.flush()
        if self.part == "answer":
            text = self.stops.finish(text)
        return Chunk(text, self.part, None, self.stats)

    def _next(self) -> tuple[int, bool] | None:
        """(the next token, whether it was forced); None once the limits allow no more."""
        if self.forced:
            return self.forced.pop(0), True
        if self.limits.reached(self.stats, self.part):
            return None
        token = self.gen.next_token()
        self.clock.drawn()
        return token, False

    def _read(self, token: int, forced: bool) -> Iterator[Chunk]:
        first, self.first = self.first, False
        self.stats.forced_tokens += forced
        if first and token == self.tokenizer.think_start_id and self.part == "answer":
            yield from self._begin("reasoning")
            self._consult_budget()
            return
        if token == self.tokenizer.think_end_id and self.part == "reasoning":
            yield from self._begin("answer")
            return
        if not forced:
            if self.part == "reasoning":
                self.stats.reasoning_tokens += 1
            else:
                self.stats.answer_tokens += 1
        text = self.text.add(token)
        if self.part == "answer":
            text = self.stops.push(text)
        if text:
            yield Chunk(text, self.part, token, self.stats)
        if self.part == "reasoning" and not forced:
            self._consult_budget()

    def _begin(self, part: Kind) -> Iterator[Chunk]:
        """End the current part's text and begin `part`'s."""
        rest = self.text.flush()
        if rest:
            yield Chunk(rest, self.part, None, self.stats)
        self.part, self.text = part, _PartText(self.tokenizer, part)

    def _consult_budget(self) -> None:
        if self.budget is None or not _budget_ends_reasoning(self.budget, self.stats, self.text.detok, self.gen):
            return
        self.stats.budget_exhausted = True
        self.forced = self.limits.fit(self.stats, self.tokenizer.encode(self.budget.close_text()))
        if self.forced:  # else the context is full, and the limits end the response
            self.gen.feed(self.forced)
            self.clock.fed()


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
    budget = ThinkingBudget(opts.thinking_budget) if opts.thinking_budget is not None else None
    prompt_ids, thinking = encode_prompt(tokenizer, prompt, system=system, think=opts.think, raw=raw, tools=tools,
                                         prefill_response=prefill_response)
    check_prompt_ids(prompt_ids, model.args.vocab_size)
    rotating = isinstance(cache[0], RotatingKVCache) if cache is not None else opts.max_kv_size is not None
    limits = _Limits(opts.max_tokens, budget is not None, _context_room(model, prompt_ids, rotating))
    sampler, processor = _sampling(tokenizer, model, opts, thinking and (budget is None or budget.tokens > 0))
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    if opts.max_tokens == 0 or limits.room == 0:  # nothing may be generated: compute nothing
        stats.finish_reason = "length"
        yield Chunk("", "answer", None, stats)
        return
    if cache is None:
        cache = make_prompt_cache(model, tokenizer, prompt_ids, system, opts.max_kv_size, keep)
    stats.cached_tokens = _reuse_cache(cache, prompt_ids)
    key = mx.random.key(opts.seed) if opts.seed is not None else None
    gen = TokenGenerator(model, cache, sampler, processor, key)
    response = _Response(gen, tokenizer, budget, limits, opts.stop, stats, starts_in_reasoning(tokenizer, prompt_ids))
    mx.reset_peak_memory()
    try:
        gen.prefill(prompt_ids[stats.cached_tokens :], opts.prefill_step_size, progress)
        yield from response.tokens()
    except KeyboardInterrupt:
        stats.finish_reason = "interrupted"
        raise
    finally:
        response.clock.stop()
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
    yield response.last_chunk()


def _sampling(tokenizer: Tokenizer, model: Model, opts: GenerationOptions,
              thinking: bool) -> tuple[Sampler, Processor | None]:
    """The sampler and logits processor of the options, with the mode's defaults and generation_config's."""
    params = default_params(thinking, tokenizer.generation_config, temperature=opts.temp, top_p=opts.top_p,
                            top_k=opts.top_k, min_p=opts.min_p, presence_penalty=opts.presence_penalty,
                            repetition_penalty=opts.repetition_penalty, logit_bias=opts.logit_bias)
    if params.temperature == 0 and thinking:
        warnings.warn("greedy decoding (temp 0) in thinking mode can repeat endlessly; "
                      "Qwen recommends temp 0.6, top-p 0.95, top-k 20", stacklevel=3)
    return make_sampler(params, tokenizer.vocab_size), make_logits_processor(params, model.args.vocab_size)


def generate(model: Model, tokenizer: Tokenizer, prompt: str | Messages | Sequence[int],
             options: GenerationOptions | None = None, **kwargs: Any) -> GenerationResult:
    """Generate a whole response; takes the arguments of stream_generate.

    Returns:
        GenerationResult with .reasoning, .content, .text, .token_ids and .stats.

    Raises:
        OptionError, Qwen3Error: as stream_generate.
    """
    reasoning: list[str] = []
    content: list[str] = []
    stats = GenerationStats()
    for chunk in stream_generate(model, tokenizer, prompt, options, **kwargs):
        (reasoning if chunk.kind == "reasoning" else content).append(chunk.text)
        stats = chunk.stats
    return GenerationResult("".join(reasoning), "".join(content), stats.token_ids, stats)
