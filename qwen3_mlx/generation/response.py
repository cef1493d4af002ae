"""One response as its tokens arrive: which part it is in (reasoning or answer), the text shown, the
thinking budget's cut, the stop rules, the counts and the timings.

`Response` is fed the tokens one at a time by a loop that draws them (generation.TokenGenerator for
one request, batch_decode.BatchGenerator for rows of a batch) and tells that loop what to feed next when the
thinking budget forces text in. It consults small parts, each with one job: Limits (when no more
tokens may be drawn), ThinkingBudget (where the reasoning is cut), PartText (text of the reasoning or
the answer, with the template's newlines trimmed), StopStrings (stops.py: answer text held back while
it may start a stop string) and Clock (time to first token and the decode rate).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..errors import OptionError
from ..text.prompt import EMPTY_THINKING_TEXT
from ..text.tokenizer import Tokenizer
from ..text.tools import ToolCall, ToolCallDelta, ToolCallParser
from .stops import StopStrings

# Qwen3 technical report, section 4.3: the text that ends reasoning early when the budget runs out.
EARLY_STOP_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution "
    "based on the thinking directly now.\n</think>\n\n"
)
_THOUGHT_ENDS = ("\n", ".", "!", "?", "。", "！", "？", "…")

Kind = Literal["reasoning", "answer", "tool_call"]


@dataclass(frozen=True)
class ThinkingBudget:
    """When to end the reasoning early.

    `tokens` counts the tokens the model writes after <think> (the <think> token itself and the
    forced early-stop text are not counted): the reasoning never holds more. From `tokens - grace`
    on, it is cut as soon as its text ends a line or a sentence; at `tokens` it is cut in any case,
    then EARLY_STOP_TEXT (which closes it with </think>) is fed, and the model writes the answer. A
    cut inside a multi-byte character drops that character's bytes from the reasoning's text (its
    tokens stay in the response's ids and in the cache): the text never shows U+FFFD for it. The
    rule never takes a token back, so a row of a batch is cut exactly as the same request alone.
    tokens=0 means no reasoning: the block is closed at once with EMPTY_THINKING_TEXT, as Qwen3's
    template does for enable_thinking=False.
    """

    tokens: int
    grace: int = 32

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise OptionError(f"thinking_budget must be >= 0, got {self.tokens}")

    def should_stop(self, count: int, text: str) -> bool:
        """Whether to stop after `count` reasoning tokens whose text is `text`."""
        if count >= self.tokens:
            return True
        return count >= self.tokens - min(self.grace, self.tokens // 4) and text.rstrip(" ").endswith(_THOUGHT_ENDS)

    def close_text(self) -> str:
        return EMPTY_THINKING_TEXT if self.tokens == 0 else EARLY_STOP_TEXT


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
    stop_string: str | None = None  # the stop string that ended the answer (finish_reason "stop_string")
    budget_exhausted: bool = False  # the thinking budget ended the reasoning
    peak_memory_gb: float = 0.0
    drafted_tokens: int = 0  # speculative decoding: tokens proposed and checked by the target
    accepted_tokens: int = 0  # of those, the ones verification kept
    token_ids: list[int] = field(default_factory=list)  # the response as run through the model, forced tokens too
    tool_calls: list[ToolCall] = field(default_factory=list)  # the answer's complete calls, when tools were given

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


@dataclass(frozen=True)
class TokenLogprob:
    """A drawn token's log-probability, and the `top` most likely tokens' (id, log-probability)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Chunk:
    """A piece of streamed text. `stats` is the run's live statistics object; `logprobs`, when asked
    for, those of the drawn tokens whose text this chunk releases. Kind "tool_call" (when tools were
    given): a piece of a call, `tool_call`, whose argument fragment is also `text`."""

    text: str
    kind: Kind
    token: int | None
    stats: GenerationStats = field(repr=False)
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_call: ToolCallDelta | None = None


@dataclass
class GenerationResult:
    """What generate() returns: the reasoning and the answer apart, with counts and timings."""

    reasoning: str
    content: str
    token_ids: list[int]
    stats: GenerationStats
    logprobs: list[TokenLogprob] = field(default_factory=list)  # every drawn token's, when asked for
    tool_calls: list[ToolCall] = field(default_factory=list)  # parsed out of the answer, when tools were given
    content_logprobs: list[TokenLogprob] = field(default_factory=list)  # those of the answer's text (as APIs report)

    @property
    def incomplete(self) -> bool:
        """The response was cut before it ended (by a limit, a cancel or an interrupt): an answer
        constrained to a grammar may then not match it."""
        return self.stats.finish_reason in ("length", "cancelled", "interrupted")

    @property
    def text(self) -> str:
        """The whole response as the model wrote it, reasoning in <think> tags."""
        if not self.reasoning and not self.stats.reasoning_tokens:
            return self.content
        return f"<think>{self.reasoning}</think>{self.content}"


@dataclass(frozen=True)
class Limits:
    """When no more tokens may be drawn. Every drawn token counts toward a limit: without a thinking
    budget, `max_tokens` counts them all, <think> and </think> included; with one, the budget bounds
    the reasoning (_budget_ends_reasoning) and `max_tokens` the answer. `room`: the response tokens,
    forced ones included, that fit in the model's context after the prompt; None with a rotating cache."""

    max_tokens: int
    budgeted: bool
    room: int | None
    max_total: int | None = None

    def reached(self, stats: GenerationStats, part: Kind) -> bool:
        if self.room is not None and len(stats.token_ids) >= self.room:
            return True
        if self.max_total is not None and len(stats.token_ids) >= self.max_total:
            return True
        if not self.budgeted:
            return stats.sampled_tokens >= self.max_tokens
        return part == "answer" and stats.answer_tokens >= self.max_tokens

    @property
    def allow_nothing(self) -> bool:
        return 0 in (self.max_tokens, self.max_total, self.room)

    def fit(self, stats: GenerationStats, ids: list[int]) -> list[int]:
        """The first of `ids` that fit in the context, and under max_total, after the response so far."""
        for cap in (self.room, self.max_total):
            if cap is not None:
                ids = ids[: max(cap - len(stats.token_ids), 0)]
        return ids


class Clock:
    """Timings: the time to the first token, the decode rate's share (see GenerationStats), the total."""

    def __init__(self, stats: GenerationStats) -> None:
        self.stats = stats
        self.start = self.last = time.perf_counter()
        self.after_pass = True  # the next token comes out of a multi-token pass: the prefill, first

    def restart(self) -> None:
        """Count from now (the work on the request begins)."""
        self.start = self.last = time.perf_counter()

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


class PartText:
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


class Response:
    """One response as its tokens arrive: which part it is in, what is shown, and when it ends.

    The loop that draws tokens asks `may_draw()`, draws one, and gives it to `read()`; after each
    read, `take_forced()` gives the ids the thinking budget forces in: the loop feeds them to the
    model in place of the token it was about to draw, and reads them back with `read(id, forced=True)`.

    A reasoning block opens only with the response's first token (<think>), or in the prompt; after
    that <think> is text like any other, and so is </think> outside the reasoning.
    """

    def __init__(self, tokenizer: Tokenizer, budget: ThinkingBudget | None, limits: Limits,
                 stop: Sequence[str], stats: GenerationStats, reasoning: bool, tools: bool = False) -> None:
        self.tokenizer, self.budget, self.limits, self.stats = tokenizer, budget, limits, stats
        self.part: Kind = "reasoning" if reasoning else "answer"
        self.text = PartText(tokenizer, self.part)
        self.stops = StopStrings(stop)
        self.clock = Clock(stats)
        self.calls = ToolCallParser() if tools else None  # the answer's tool calls
        self.ended = False  # the end of turn or a stop string came
        self._forced: list[int] = []  # ids to feed, not yet taken by the loop
        self._logprobs: list[TokenLogprob] = []  # drawn tokens' whose text no chunk has released yet
        self.first = True  # no token read yet
        stats.finish_reason = "length"  # unless an end comes first
        if self.part == "reasoning":
            self._consult_budget()  # a budget of 0 closes the block at once

    def may_draw(self) -> bool:
        """Whether the model may draw another token."""
        return not self.ended and not self._forced and not self.limits.reached(self.stats, self.part)

    def take_forced(self) -> list[int]:
        """The ids to feed now (maybe none)."""
        ids, self._forced = self._forced, []
        return ids

    def read(self, token: int, forced: bool = False, logprob: TokenLogprob | None = None) -> list[Chunk]:
        """Read the next token of the response: the chunks of text it completes."""
        self.stats.token_ids.append(token)
        if logprob is not None:
            self._logprobs.append(logprob)
        if not forced and token in self.tokenizer.eos_token_ids:
            self.stats.finish_reason, self.ended = "stop", True
            return []
        chunks = list(self._read(token, forced))
        if self.stops.found:
            self.stats.finish_reason, self.ended = "stop_string", True
            self.stats.stop_string = self.stops.matched
        return chunks

    def last_chunks(self) -> list[Chunk]:
        """What is left, and always a last chunk (token None, maybe empty), so that a caller sees the
        final stats even for an empty response."""
        text = "" if self.stops.found else self.text.flush()
        if self.part == "reasoning":
            return [self._chunk(text, None)]
        chunks = list(self._answer(self.stops.finish(text) if not self.stops.found else "", None))
        if self.calls is not None:
            cut = self.stats.finish_reason in ("length", "cancelled", "interrupted")
            chunks += self._events(self.calls.finish(cut), None)
            self.stats.tool_calls = list(self.calls.calls)  # not those announced, then found malformed
            if self.calls.calls and self.stats.finish_reason == "stop":
                self.stats.finish_reason = "tool_calls"
        return chunks + [self._chunk("", None)]

    def _answer(self, text: str, token: int | None) -> Iterator[Chunk]:
        if self.calls is None:
            if text:
                yield self._chunk(text, token)
            return
        yield from self._events(self.calls.push(text), token)

    def _events(self, events: list[str | ToolCallDelta], token: int | None) -> Iterator[Chunk]:
        for event in events:
            if isinstance(event, str):
                yield self._chunk(event, token)
            else:
                logprobs, self._logprobs = tuple(self._logprobs), []
                yield Chunk(event.arguments, "tool_call", token, self.stats, logprobs, event)

    def _chunk(self, text: str, token: int | None) -> Chunk:
        logprobs, self._logprobs = tuple(self._logprobs), []
        return Chunk(text, self.part, token, self.stats, logprobs)

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
            yield from self._answer(self.stops.push(text), token)
        elif text:
            yield self._chunk(text, token)
        if self.part == "reasoning" and not forced:
            self._consult_budget()

    def _begin(self, part: Kind) -> Iterator[Chunk]:
        """End the current part's text and begin `part`'s."""
        rest = self.text.flush()
        if rest:
            yield self._chunk(rest, None)
        self.part, self.text = part, PartText(self.tokenizer, part)

    def _consult_budget(self) -> None:
        detok = self.text.detok
        if self.budget is None or not self.budget.should_stop(self.stats.reasoning_tokens, detok.text):
            return
        detok.drop_held()  # the bytes of a character the cut leaves incomplete are not shown
        self.stats.budget_exhausted = True
        self._forced = self.limits.fit(self.stats, self.tokenizer.encode(self.budget.close_text()))
        # No forced ids: the context is full, and the limits end the response.
