"""Generation, in three layers:

1. TokenGenerator: token ids from the model, one step ahead (the next step's graph is built and
   queued with mx.async_eval while the host looks at the current token), with chunked prefill,
   and the two moves the thinking budget needs: feed forced tokens, roll back the last few.
2. stream_generate: text chunks tagged "reasoning" or "answer", the thinking budget, stop rules,
   token counts and timings.
3. generate: the whole result at once. The CLI (cli.py) only prints what these yield.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Mapping, Sequence

import mlx.core as mx

from .cache import KVCache
from .errors import OptionError, Qwen3Error
from .model import Model
from .sampling import default_params, make_logits_processor, make_sampler
from .tokenizer import Tokenizer

# Qwen3 technical report, section 4.3: the text that ends reasoning early when the budget runs out.
EARLY_STOP_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution "
    "based on the thinking directly now.\n</think>\n\n"
)
# What Qwen3's template writes for enable_thinking=False: an empty reasoning block.
EMPTY_THINKING_TEXT = "\n\n</think>\n\n"
DEFAULT_MAX_TOKENS = 4096
_THOUGHT_ENDS = ("\n", ".", "!", "?", "。", "！", "？", "…")

Kind = Literal["reasoning", "answer"]
Messages = Sequence[Mapping[str, object]]


# ---------------------------------------------------------------- layer 1: token ids


def extend_cache(model: Model, cache: list[KVCache], ids: Sequence[int], step_size: int = 2048,
                 progress: Callable[[int, int], None] | None = None, total: int | None = None) -> None:
    """Run `ids` through the model into `cache`, `step_size` tokens at a time, computing no logits."""
    for start in range(0, len(ids), step_size):
        model(mx.array([list(ids[start : start + step_size])], mx.int32), cache)
        mx.eval([c.keys for c in cache])
        if progress:
            progress(min(start + step_size, len(ids)), total or len(ids))


class TokenGenerator:
    """Token ids from `model`, always one step ahead of the caller."""

    def __init__(self, model: Model, cache: list[KVCache],
                 sampler: Callable[[mx.array], mx.array],
                 processor: Callable[[mx.array, mx.array], mx.array] | None = None) -> None:
        self.model, self.cache, self.sampler, self.processor = model, cache, sampler, processor
        self._history = mx.zeros((0,), mx.int32)  # every token generated or fed, kept for the penalties
        self._pending: mx.array | None = None  # (1,) the next token, being computed

    def _step(self, ids: mx.array) -> mx.array:
        logits = self.model.decode(ids[None], self.cache)  # (1, V)
        if self.processor is not None:
            logits = self.processor(logits, self._history)
        return self.sampler(logits)

    def prefill(self, ids: Sequence[int], step_size: int = 2048,
                progress: Callable[[int, int], None] | None = None) -> None:
        """Run the prompt through the model in chunks; the first token is then on its way."""
        if not ids:
            raise Qwen3Error("the prompt is empty; give some text")
        # All but the last token go through in chunks whose logits are never computed (MLX is lazy);
        # the last one alone gives the first token, so the output head runs on one position only.
        extend_cache(self.model, self.cache, ids[:-1], step_size, progress, total=len(ids))
        self._pending = self._step(mx.array(list(ids[-1:]), mx.int32))
        mx.async_eval(self._pending)
        if progress:
            progress(len(ids), len(ids))

    def next_token(self) -> int:
        """The next token; the one after it is queued before this returns."""
        y = self._pending
        self._remember(y)
        self._pending = self._step(y)
        mx.async_eval(self._pending)
        return y.item()

    def feed(self, ids: Sequence[int]) -> None:
        """Force `ids` as the next tokens (the queued token is dropped); sampling resumes after them."""
        forced = mx.array(list(ids), mx.int32)
        self._remember(forced)
        self._pending = self._step(forced)
        mx.async_eval(self._pending)

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
    inside a multi-byte character: the loop rolls back the incomplete tokens instead. So the
    reasoning holds at most `tokens` model tokens, then EARLY_STOP_TEXT (which closes it with
    </think>), then the model writes the answer. tokens=0 means no reasoning: the block is closed
    at once with EMPTY_THINKING_TEXT, as Qwen3's template does for enable_thinking=False.
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


# ---------------------------------------------------------------- layer 2: text stream


@dataclass
class GenerationStats:
    """Counts and timings. reasoning_tokens: tokens the model wrote inside <think>...</think>
    (not the tags, not forced text); answer_tokens: tokens after </think> (no end-of-turn token);
    forced_tokens: tokens the thinking budget inserted."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in a reused cache, not computed again
    reasoning_tokens: int = 0
    answer_tokens: int = 0
    forced_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    finish_reason: str | None = None  # "stop", "length", "stop_string", "interrupted"
    budget_exhausted: bool = False
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
        # The first token comes out of the prefill, so the decode rate counts the ones after it.
        steps = self.generated_tokens + self.forced_tokens - 1
        return steps / self.generation_seconds if self.generation_seconds and steps > 0 else 0.0

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


def build_prompt(tokenizer: Tokenizer, prompt: str | Messages, *, system: str | None = None,
                 think: bool = True, raw: bool = False, tools: list[dict] | None = None) -> str:
    """The text the model reads: the chat template applied to `prompt`, or `prompt` itself when raw."""
    if raw:
        if not isinstance(prompt, str):
            raise Qwen3Error("raw mode takes a string prompt, not a list of messages")
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, enable_thinking=think)


def encode_prompt(tokenizer: Tokenizer, prompt: str | Messages | Sequence[int], *, system: str | None = None,
                  think: bool = True, raw: bool = False,
                  tools: list[dict] | None = None) -> tuple[list[int], bool]:
    """(prompt token ids, whether the model is asked to think). Token ids pass through as they are."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt), think
    thinking = think if raw else thinking_requested(prompt, think)  # type: ignore[arg-type]
    text = build_prompt(tokenizer, prompt, system=system, think=think, raw=raw, tools=tools)  # type: ignore[arg-type]
    return tokenizer.encode(text), thinking


def thinking_requested(prompt: str | Messages, think: bool) -> bool:
    """Qwen3's mode: enable_thinking, unless the last user turn says /no_think (the soft switch)."""
    if not think:
        return False
    text = prompt if isinstance(prompt, str) else next(
        (str(m.get("content", "")) for m in reversed(prompt) if m.get("role") == "user"), "")
    return text.rfind("/no_think") <= text.rfind("/think")


def system_prefix_length(tokenizer: Tokenizer, prompt_ids: Sequence[int], system: str | None) -> int:
    """Tokens of the system turn at the start of the prompt (what a rotating cache keeps); else 4,
    the attention sinks of StreamingLLM."""
    if system is not None:
        head = tokenizer.encode(tokenizer.apply_chat_template(
            [{"role": "system", "content": system}], add_generation_prompt=False))
        if list(prompt_ids[: len(head)]) == head:
            return len(head)
    return min(4, len(prompt_ids))


def make_prompt_cache(model: Model, tokenizer: Tokenizer, prompt_ids: Sequence[int], system: str | None,
                      max_kv_size: int | None, keep: int | None = None) -> list[KVCache]:
    """A plain cache, or a rotating one of max_kv_size tokens that keeps the system turn."""
    if max_kv_size is None:
        return model.make_cache()
    if keep is None:
        keep = system_prefix_length(tokenizer, prompt_ids, system)
    if max_kv_size <= keep:
        what = "the system prompt" if system is not None else "the first tokens, kept as attention sinks"
        raise OptionError(f"max_kv_size={max_kv_size} must be larger than the kept prefix ({keep} tokens: {what}); "
                          f"raise it{' or shorten the system prompt' if system is not None else ''}")
    return model.make_cache(max_kv_size, keep)


def _starts_in_reasoning(tokenizer: Tokenizer, ids: Sequence[int]) -> bool:
    """A prompt that ends inside an open <think> block (e.g. Qwen3-2507 thinking templates)."""
    start, end = tokenizer.think_start_id, tokenizer.think_end_id
    if start is None or start not in ids:
        return False
    last = len(ids) - 1 - list(reversed(ids)).index(start)
    return end not in ids[last:]


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | Messages | Sequence[int],
    *,
    system: str | None = None,
    think: bool = True,
    thinking_budget: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    presence_penalty: float | None = None,
    repetition_penalty: float | None = None,
    logit_bias: Mapping[int, float] | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    max_kv_size: int | None = None,
    keep: int | None = None,
    prefill_step_size: int = 2048,
    raw: bool = False,
    tools: list[dict] | None = None,
    cache: list[KVCache] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[Chunk]:
    """Generate a response and yield it as text chunks tagged "reasoning" or "answer".

    Args:
        prompt: a user message, a list of chat messages, or token ids (used as they are).
        system: a system prompt (replaces any system message in `prompt`).
        think: Qwen3's enable_thinking. "/no_think" in the last user message also selects the
            non-thinking sampling defaults, as Qwen's model card advises.
        thinking_budget: the most tokens the reasoning may have (see ThinkingBudget); None for no limit.
        max_tokens: the most answer tokens. Without a thinking budget the reasoning counts against it
            too; with one, the reasoning is bounded by the budget and the answer has max_tokens of its own.
        temp, top_p, top_k, min_p: sampling; None takes Qwen's defaults for the mode, then
            generation_config.json. temp 0 is greedy decoding.
        presence_penalty, repetition_penalty, logit_bias: over all generated tokens.
        stop: strings that end the answer (not included in it).
        seed: makes sampling repeatable.
        max_kv_size: use a rotating cache of this many tokens that keeps the first `keep` tokens
            (default: the system turn) and a window of the latest.
        prefill_step_size: prompt tokens per prefill chunk.
        raw: `prompt` is the exact text to complete; no chat template.
        tools: tool definitions passed to the chat template.
        cache: a cache holding a prefix of the prompt's tokens (reused; only the rest is computed).
        progress: called with (tokens done, total) during prefill.

    Yields:
        Chunk(text, kind, token, stats); `stats` is one object updated as the run goes on, so it is
        final once the iterator ends (or at any point, if the caller stops early).

    Raises:
        Qwen3Error: an empty prompt, an invalid option, or a prompt longer than the context.
    """
    if max_tokens < 0:
        raise OptionError(f"max_tokens must be >= 0, got {max_tokens}")
    if prefill_step_size < 1:
        raise OptionError(f"prefill_step_size must be >= 1, got {prefill_step_size}")
    budget = ThinkingBudget(thinking_budget) if thinking_budget is not None else None
    prompt_ids, thinking = encode_prompt(tokenizer, prompt, system=system, think=think, raw=raw, tools=tools)
    if not prompt_ids:
        raise Qwen3Error("the prompt is empty; give some text")
    context = model.args.max_position_embeddings
    if max_kv_size is None and cache is None and len(prompt_ids) > context:
        raise Qwen3Error(
            f"the prompt has {len(prompt_ids)} tokens but the model's context is {context} "
            f"(max_position_embeddings); shorten it, or pass --max-kv-size to use a rotating cache")

    params = default_params(thinking and (budget is None or budget.tokens > 0),
                            getattr(tokenizer, "generation_config", None), temperature=temp, top_p=top_p,
                            top_k=top_k, min_p=min_p, presence_penalty=presence_penalty,
                            repetition_penalty=repetition_penalty, logit_bias=logit_bias)
    if params.temperature == 0 and thinking:
        warnings.warn("greedy decoding (temp 0) in thinking mode can repeat endlessly; "
                      "Qwen recommends temp 0.6, top-p 0.95, top-k 20", stacklevel=2)
    if seed is not None:
        mx.random.seed(seed)

    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    if cache is None:
        cache = make_prompt_cache(model, tokenizer, prompt_ids, system, max_kv_size, keep)
    gen = TokenGenerator(model, cache, make_sampler(params, tokenizer.vocab_size),
                         make_logits_processor(params, model.args.vocab_size))
    cached = min(cache[0].offset, len(prompt_ids) - 1)
    if cache[0].offset > cached:
        for c in cache:
            c.trim(c.offset - cached)  # at least one prompt token must run to give the first logits
    stats.cached_tokens = cached
    mx.reset_peak_memory()
    start = time.perf_counter()
    gen.prefill(prompt_ids[cached:], prefill_step_size, progress)
    yield from _stream(gen, tokenizer, budget, max_tokens, stop, stats,
                       _starts_in_reasoning(tokenizer, prompt_ids), start)


class _NewlineTrim:
    """Qwen3's template strips the newlines around the reasoning and before the answer; so does the stream."""

    def __init__(self, hold_trailing: bool) -> None:
        self.started, self.hold, self.tail = False, hold_trailing, ""

    def __call__(self, text: str) -> str:
        if not self.started:
            text = text.lstrip("\n")
            if not text:
                return ""
            self.started = True
        if not self.hold:
            return text
        text = self.tail + text
        kept = text.rstrip("\n")
        self.tail = text[len(kept):]
        return kept


def _stream(gen: TokenGenerator, tokenizer: Tokenizer, budget: ThinkingBudget | None, max_tokens: int,
            stop: Sequence[str], stats: GenerationStats, reasoning: bool, start: float) -> Iterator[Chunk]:
    kind: Kind = "reasoning" if reasoning else "answer"
    detok = tokenizer.detokenizer()
    trim = _NewlineTrim(hold_trailing=reasoning)
    held = ""  # answer text held back while it could be the start of a stop string
    forced: list[int] = []  # forced tokens still to be reported
    answer_limit = max_tokens if budget is not None else None
    first = True
    stats.finish_reason = "length"
    try:
        if kind == "reasoning" and budget is not None and budget.tokens == 0:
            forced = tokenizer.encode(budget.close_text())
            gen.feed(forced)
        while True:
            if forced:
                token, was_forced = forced.pop(0), True
            else:
                if (stats.answer_tokens if answer_limit is not None else stats.generated_tokens) >= max_tokens:
                    break
                token, was_forced = gen.next_token(), False
            if first:
                stats.prompt_seconds = time.perf_counter() - start
                first = False
            stats.token_ids.append(token)
            if token in tokenizer.eos_token_ids:
                stats.finish_reason = "stop"
                break
            if token == tokenizer.think_start_id:
                kind, trim = "reasoning", _NewlineTrim(hold_trailing=True)
                if budget is not None and budget.tokens == 0:
                    forced = tokenizer.encode(budget.close_text())
                    gen.feed(forced)
                continue
            if token == tokenizer.think_end_id:
                if kind == "reasoning":
                    text = trim(detok.flush())
                    if text:
                        yield Chunk(text, kind, None, stats)
                    detok = tokenizer.detokenizer()
                kind, trim = "answer", _NewlineTrim(hold_trailing=False)
                stats.forced_tokens += was_forced
                continue
            stats.forced_tokens += was_forced
            if kind == "reasoning" and not was_forced:
                stats.reasoning_tokens += 1
            elif kind == "answer" and not was_forced:
                stats.answer_tokens += 1
            text = trim(detok.add(token))
            if kind == "reasoning":
                if text:
                    yield Chunk(text, kind, token, stats)
                if budget is not None and not was_forced and not forced:
                    cut = not detok.holding and budget.should_stop(stats.reasoning_tokens, detok.text)
                    if not cut and stats.reasoning_tokens >= budget.tokens and gen.can_roll_back():
                        # Out of budget inside a multi-byte character: take its first tokens back.
                        gen.roll_back(detok.holding)
                        stats.reasoning_tokens -= detok.holding
                        del stats.token_ids[-detok.holding :]
                        detok.drop_held()
                        cut = True
                    if cut:
                        stats.budget_exhausted = True
                        forced = tokenizer.encode(budget.close_text())
                        gen.feed(forced)
                continue
            held += text
            if stop:
                cut = min((i for i in (held.find(s) for s in stop) if i >= 0), default=-1)
                if cut >= 0:
                    if held[:cut]:
                        yield Chunk(held[:cut], kind, token, stats)
                    held, stats.finish_reason = "", "stop_string"
                    break
                safe = len(held) - _longest_stop_prefix(held, stop)
            else:
                safe = len(held)
            if safe > 0:
                yield Chunk(held[:safe], kind, token, stats)
                held = held[safe:]
    except KeyboardInterrupt:
        stats.finish_reason = "interrupted"
        raise
    finally:
        stats.generation_seconds = time.perf_counter() - start - stats.prompt_seconds
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
    # Always a last chunk (maybe empty), so a caller sees the final stats even for an empty response.
    yield Chunk(held + trim(detok.flush()), kind, None, stats)


def _longest_stop_prefix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that starts some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# ---------------------------------------------------------------- layer 3: whole result


def generate(model: Model, tokenizer: Tokenizer, prompt: str | Messages | Sequence[int],
             **options: object) -> GenerationResult:
    """Generate a whole response; takes the options of stream_generate.

    Returns:
        GenerationResult with .reasoning, .content, .text, .token_ids and .stats.
    """
    reasoning: list[str] = []
    content: list[str] = []
    stats = GenerationStats()
    for chunk in stream_generate(model, tokenizer, prompt, **options):  # type: ignore[arg-type]
        (reasoning if chunk.kind == "reasoning" else content).append(chunk.text)
        stats = chunk.stats
    return GenerationResult("".join(reasoning), "".join(content), stats.token_ids, stats)
