"""A request's new KV cache, built from its options: every path (a single stream with or without a cache
file, the chat, a batch's newcomers, the engine, the ranks) calls `new_cache`, and a draft model's cache
(single stream or batch) is `draft_cache`, so a cache's kind, size and storage are read from the options in
one place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..errors import OptionError
from ..model.cache import KVCache
from ..model.kv_quant import KVQuantization
from ..model.model import Model
from ..text.prompt import system_prefix_length
from ..text.tokenizer import Tokenizer


class CacheOptions(Protocol):
    """What a cache is built from: GenerationOptions (one request) and EngineOptions (a batch) both are."""

    max_kv_size: int | None

    @property
    def kv_quantization(self) -> KVQuantization | None: ...


def kept_prefix(tokenizer: Tokenizer, prompt_ids: Sequence[int], system: str | None,
                max_kv_size: int | None) -> int | None:
    """The tokens a rotating cache of max_kv_size keeps at its start (the system turn, or 4 attention
    sinks); None without a rotating cache.

    Raises:
        OptionError: the kept prefix does not fit in max_kv_size.
    """
    if max_kv_size is None:
        return None
    keep = system_prefix_length(tokenizer, prompt_ids, system)
    if max_kv_size <= keep:
        what = "the system prompt" if system is not None else "the first tokens, kept as attention sinks"
        raise OptionError(f"max_kv_size={max_kv_size} must be larger than the kept prefix ({keep} tokens: {what}); "
                          f"raise it{' or shorten the system prompt' if system is not None else ''}")
    return keep


def new_cache(model: Model, tokenizer: Tokenizer, prompt_ids: Sequence[int], system: str | None,
              options: CacheOptions, keep: int | None = None) -> list[KVCache]:
    """A plain cache, or a rotating one of options.max_kv_size tokens that keeps the system turn (or
    `keep` tokens); either one stored as options.kv_quantization says.

    Raises:
        OptionError: a rotating cache's kept prefix does not fit in it.
    """
    if options.max_kv_size is None:
        return model.make_cache(quantization=options.kv_quantization)
    if keep is None:
        keep = kept_prefix(tokenizer, prompt_ids, system, options.max_kv_size)
    return model.make_cache(options.max_kv_size, keep, options.kv_quantization)


def draft_cache(draft: Model, quantization: KVQuantization | None) -> list[KVCache]:
    """A draft model's cache, stored as the target's (the run's options.kv_quantization): always plain, as
    a draft's cache is trimmed back to the text it shares with the target, never rotated.

    Raises:
        OptionError: the quantization's group size does not divide the draft's head_dim.
    """
    return draft.make_cache(quantization=quantization)
