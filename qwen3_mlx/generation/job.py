"""A request made ready to run: `prepare` turns a Prompt and GenerationOptions into a Job (its prompt's
ids checked, the Response its tokens go to, the Picker it draws with); computes nothing. `collect`
makes a response's chunks into its result. The single-stream loop (single.py) and the batch loop
(batch.py) both start from a Job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ..errors import ContextLengthError
from ..model.model import Model
from ..text.prompt import Prompt, check_prompt_ids, encode_prompt, starts_in_reasoning
from ..text.structured import constraint_state
from ..text.tokenizer import Tokenizer
from .options import GenerationOptions
from .picker import Picker, make_picker
from .response import (
    Chunk,
    GenerationResult,
    GenerationStats,
    Limits,
    Response,
    ThinkingBudget,
    TokenLogprob,
)

__all__ = ["Job", "Prompt", "collect", "context_room", "prepare"]


@dataclass
class Job:
    """One request made ready to run: its prompt's ids, the response its tokens go to, how it draws,
    and the Prompt it was prepared from (what distributed.py hands to the other ranks)."""

    prompt_ids: list[int]
    options: GenerationOptions
    response: Response
    draws: Picker  # how it draws its tokens
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
    draws = make_picker(tokenizer, model, opts, thinking and (budget is None or budget.tokens > 0))
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
