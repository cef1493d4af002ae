"""Many requests across the ranks of a launched job (`--prompts-file` under mlx.launch), or in one process
alone: batch_generate's rule either way."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..generation.batch import batch_generate
from ..generation.options import EngineOptions, GenerationOptions
from ..generation.response import GenerationResult
from ..model.model import Model
from ..text.prompt import Prompt
from ..text.tokenizer import Tokenizer
from .engine import DistributedEngine
from .ranks import Ranks


def batch_generate_across(ranks: Ranks, model: Model, tokenizer: Tokenizer, prompts: Sequence[Prompt],
                          options: Sequence[GenerationOptions], *, engine_options: EngineOptions | None = None,
                          progress: Callable[[int, int], None] | None = None,
                          draft_model: Model | None = None) -> list[GenerationResult] | None:
    """batch.batch_generate (each prompt with its options), launched or not. Launched, the requests go
    through a DistributedEngine, rank 0 submitting them all and the other ranks following, so that every
    rank admits them alike: every rank calls it, and rank 0 gets the results (in order), the others None.
    `progress(done, total)`: as the results come, in order."""
    if not ranks.launched:
        return batch_generate(model, tokenizer, prompts, list(options), engine_options=engine_options,
                              progress=progress, draft_model=draft_model)
    # As batch_generate: the requests' cache, only the rows that ask look up, no prefix store.
    run = (engine_options or EngineOptions()).for_requests(options)
    run = run.replace(prefix_store_bytes=0, max_queue=len(prompts) + 1)
    engine = DistributedEngine(model, tokenizer, ranks, run, draft_model=draft_model)
    if not ranks.leader:
        engine.follow()
        return None
    results = []
    with engine:  # leaving waits for every request, or cancels them all on an error
        requests = [engine.submit(prompt, opts) for prompt, opts in zip(prompts, options)]
        for request in requests:
            results.append(request.result())
            if progress is not None:
                progress(len(results), len(requests))
    return results
