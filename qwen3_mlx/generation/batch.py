"""Many requests decoded together, each exactly as if it ran alone, in the caller's thread: the batch's
scheduler (scheduler.py) run until every response is done.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..errors import OptionError
from ..model.model import Model
from ..text.prompt import Messages, Prompt
from ..text.tokenizer import Tokenizer
from .options import EngineOptions, GenerationOptions
from .job import collect, prepare
from .response import Chunk, GenerationResult
from .scheduler import Scheduler, Sink, Ticket


def batch_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt | str | Messages | Sequence[int]],
    options: GenerationOptions | Sequence[GenerationOptions] | None = None,
    *,
    engine_options: EngineOptions | None = None,
    system: str | None = None,
    raw: bool = False,
    tools: list[dict] | None = None,
    prefill_response: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    draft_model: Model | None = None,
    **kwargs: Any,
) -> list[GenerationResult]:
    """Generate a response to each prompt, decoding them together; each row's tokens are those the
    same request gives through `generate` (seeds, penalties, stop strings, limits and the thinking
    budget are per row). Token for token on the CPU in float32; on a GPU, batched matrix products
    may differ from one row's in the last bits, so rows agree wherever the top two tokens are not
    within those bits of each other.

    Args:
        prompts: Prompts, or their contents (user messages, lists of chat messages, or token ids).
        options: GenerationOptions for all prompts, or a list with one per prompt.
        engine_options: how the batch runs (EngineOptions: max_batch, the memory bounds, the prefill
            budget, the cache's kind); the cache's kind and size, where these leave them unset, are the
            ones every request gives (EngineOptions.for_requests). No prefix store, no queue bound.
        system, raw, tools, prefill_response: Prompt parts for every prompt given as its content.
        progress: called with (responses done, total) as each one ends.
        draft_model: a smaller model of the same family that drafts for every request whose
            num_draft_tokens is not 0 (speculative decoding; requests may instead ask for prompt_lookup).
            A speculative batch's row gives the tokens the request gives alone through `generate` with
            the same draft.
        **kwargs: GenerationOptions fields, overriding those of `options` for every prompt.

    Returns:
        one GenerationResult per prompt, in order.

    Raises:
        OptionError, Qwen3Error: as `generate`; MemoryLimitError: a request that could never fit in
        memory_limit (or kv_memory), even alone; OptionError: requests that differ in a whole-run
        option (the cache's kind: kv_bits, kv_group_size, quantized_kv_start, max_kv_size).
    """
    if options is None or isinstance(options, GenerationOptions):
        options = [options] * len(prompts)
    if len(options) != len(prompts):
        raise OptionError(f"options: {len(options)} given for {len(prompts)} prompts; give one, or one per prompt")
    parts = {"system": system, "raw": raw, "tools": tools, "prefill_response": prefill_response}
    requests = [(Prompt.of(prompt, **parts), GenerationOptions.of(opts, **kwargs))
                for prompt, opts in zip(prompts, options)]
    run = (engine_options or EngineOptions()).for_requests([opts for _, opts in requests])
    scheduler = Scheduler(model, tokenizer, run, draft_model=draft_model)
    chunks: list[list[Chunk]] = [[] for _ in prompts]
    ended = [0]

    def sink_of(i: int) -> Sink:
        def sink(chunk: Chunk, last: bool) -> None:
            chunks[i].append(chunk)
            if last:
                ended[0] += 1
                if progress:
                    progress(ended[0], len(prompts))
        return sink

    jobs = [prepare(model, tokenizer, prompt, opts, rotating=run.max_kv_size is not None) for prompt, opts in requests]
    for i, job in enumerate(jobs):
        scheduler.submit(Ticket(job, sink_of(i)))
    while scheduler.busy:
        scheduler.run_once()
    return [collect(iter(c)) for c in chunks]
