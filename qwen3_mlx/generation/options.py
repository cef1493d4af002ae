"""The options, each written once: GenerationOptions (how one response is generated), a frozen value that
travels from the CLI, the chat and the API to the loop; EngineOptions (how a batch or an engine runs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..checkpoint.sampling_defaults import check_sampling
from ..errors import OptionError
from ..model.kv_quant import KV_BITS, KV_GROUP_SIZES, KVQuantization

# The defaults, written once: every entry point and its --help read them here.
DEFAULT_MAX_TOKENS = 4096  # tokens a response may draw
DEFAULT_PREFILL_STEP = 2048  # prompt tokens a prefill chunk computes: bounds a pass's activations
DEFAULT_PREFILL_BUDGET = 256  # prompt tokens a batch computes between two decode steps: bounds the others' wait
DEFAULT_MAX_BATCH = 8  # rows decoded together
DEFAULT_PREFIX_STORE_BYTES = 10**9  # caches of recent prompts kept for prefix reuse (1 GB, as --prompt-cache-gb)
DEFAULT_MAX_QUEUE = 256  # requests an engine keeps waiting for a row
DEFAULT_KV_GROUP_SIZE = 64  # elements of a quantized KV cache sharing a scale and a bias

# Reasoning effort by name, as thinking budgets (None: no limit): OpenAI's reasoning_effort (none to
# xhigh), Anthropic's output_config.effort (low to max). The one table every API reads.
REASONING_EFFORTS: dict[str, int | None] = {
    "none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768, "max": None,
}


@dataclass(frozen=True)
class GenerationOptions:
    """How one response is generated. Every field has a default; None means "the mode's default".

    think: Qwen3's enable_thinking ("/no_think" in the last user message also turns it off).
    thinking_budget: the most reasoning tokens (0: no reasoning); None for no limit.
    max_tokens: the most tokens the model may draw for the answer; without a thinking budget, for
        the reasoning and the answer together, <think> and </think> included. (With a budget, the
        budget bounds the reasoning's tokens.)
    max_total_tokens: the most tokens of the whole response, reasoning, forced text and answer
        together (how OpenAI's API counts max_tokens); None for no such cap.
    temp, top_p, top_k, min_p: sampling; None takes Qwen's defaults for the mode, then
        generation_config.json. temp 0 is greedy decoding.
    presence_penalty, repetition_penalty, logit_bias: over every generated token.
    stop: strings that end the answer (not included in it).
    seed: makes sampling repeatable, whatever else the process does.
    max_kv_size: a rotating cache of this many tokens (keeps the system turn).
    prefill_step_size: prompt tokens per prefill chunk (bounds the memory of a pass).
    json_schema, regex, grammar: what the answer must match (structured.py), one at a time: a JSON
        schema (a dict, or a pydantic model class), a regular expression, or a Lark or GBNF grammar.
        The reasoning stays free text; the constraint starts after it.
    logprobs: None, or k >= 0: each drawn token's log-probability (of the distribution after the
        penalties and the logit bias, before temperature and filters) and the k most likely tokens'.
    kv_bits, kv_group_size, quantized_kv_start: the KV cache stored in kv_bits (8 or 4; None: the
        model's dtype) per element, in groups of kv_group_size (32, 64, 128) along the head dimension,
        its first quantized_kv_start positions also kept in full precision (kv_quant.py). A property
        of the cache: in a batch, the same for every request.
    num_draft_tokens: speculative decoding's longest draft, k (adapted per request up to it); 0 turns
        speculation off for the request. It speculates with a draft model (given beside the options,
        `draft_model=`) or with prompt_lookup.
    prompt_lookup: draft by looking the text's last n tokens up earlier in the prompt and the text,
        for n from prompt_lookup_max down to prompt_lookup_min (vLLM's names).
    """

    think: bool = True
    thinking_budget: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_total_tokens: int | None = None
    temp: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: Mapping[int, float] | None = field(default=None, compare=False)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    max_kv_size: int | None = None
    prefill_step_size: int = DEFAULT_PREFILL_STEP
    logprobs: int | None = None
    json_schema: Mapping[str, Any] | type | None = field(default=None, compare=False)
    regex: str | None = None
    grammar: str | None = None
    kv_bits: int | None = None
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE
    quantized_kv_start: int = 0
    num_draft_tokens: int = 4
    prompt_lookup: bool = False
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        _check_int("max_tokens", self.max_tokens, 0)
        _check_int("prefill_step_size", self.prefill_step_size, 1)
        if self.thinking_budget is not None:
            _check_int("thinking_budget", self.thinking_budget, 0)
        if self.max_total_tokens is not None:
            _check_int("max_total_tokens", self.max_total_tokens, 0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0)
        if self.max_kv_size is not None:
            _check_int("max_kv_size", self.max_kv_size, 1)
        _check_kv(self)
        _check_int("num_draft_tokens", self.num_draft_tokens, 0)
        _check_int("prompt_lookup_min", self.prompt_lookup_min, 1)
        _check_int("prompt_lookup_max", self.prompt_lookup_max, self.prompt_lookup_min)
        check_sampling(temperature=self.temp, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                       presence_penalty=self.presence_penalty, repetition_penalty=self.repetition_penalty,
                       logit_bias=self.logit_bias)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
            if self.seed >= 2**64:
                raise OptionError(f"seed must be below 2**64, got {self.seed}")
        constraints = [n for n in ("json_schema", "regex", "grammar") if getattr(self, n) is not None]
        if len(constraints) > 1:
            raise OptionError(f"structured output: give one of json_schema, regex or grammar, got {' and '.join(constraints)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise OptionError(f"stop={s!r}: a stop string must be non-empty text")

    @property
    def kv_quantization(self) -> KVQuantization | None:
        """How the cache stores keys and values (None: in the model's dtype)."""
        return _kv_quantization(self)

    def replace(self, **changes: Any) -> GenerationOptions:
        """A copy with `changes`; an unknown name is an OptionError that lists the known ones."""
        return _replace(self, "generation", changes)

    @classmethod
    def of(cls, options: GenerationOptions | None = None, **changes: Any) -> GenerationOptions:
        """`options` (or the defaults) with keyword changes: how the API's keyword arguments arrive."""
        return (options or cls()).replace(**changes) if changes else (options or cls())


@dataclass(frozen=True)
class EngineOptions:
    """How a batch of requests runs together: engine.Engine, scheduler.Scheduler, batch_generate, the
    distributed engine and the server take it. Every field has a default.

    max_batch: the most rows decoded at once; the others wait their turn.
    max_queue: the most requests waiting for a row in an engine; more is EngineFull (a batch_generate
        run has no queue bound).
    memory_limit: bytes the process may take in all: the weights, the batch's KV cache at its worst,
        the prefix store and a round's activations (memory.py). A request waits while the batch with it
        would not fit (the prefix store gives memory back first), and is refused at submit if it could
        never fit alone. None: 75% of the device's (memory.default_memory_limit).
    kv_memory: a finer bound, on the batch's KV cache alone (None: none beyond memory_limit).
    prefix_store_bytes: bytes of an engine's caches kept for prefix reuse across requests (0: none),
        within memory_limit (a batch_generate run keeps none).
    prefill_budget: prompt tokens computed between two decode steps (bounds how long the running rows
        wait for a newcomer's prompt); each prompt in chunks of its options' prefill_step_size.
    kv_bits, kv_group_size, quantized_kv_start: every request's cache stored in 8 or 4 bits
        (GenerationOptions' fields of these names; a request may leave them unset or repeat them).
    max_kv_size: every request's cache a rotating one of this many tokens, keeping its system prompt
        (a request may leave it unset or repeat it).
    prompt_lookup: every request drafts by prompt lookup (its prompt_lookup_min/max and
        num_draft_tokens), unless a draft model is given beside these options.
    speculative: the requests that ask for prompt_lookup draft by it (batch_generate's rule); without
        it, prompt_lookup or a draft model, such a request is refused.
    """

    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = DEFAULT_MAX_QUEUE
    memory_limit: int | None = None
    kv_memory: int | None = None
    prefix_store_bytes: int = DEFAULT_PREFIX_STORE_BYTES
    prefill_budget: int = DEFAULT_PREFILL_BUDGET
    kv_bits: int | None = None
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE
    quantized_kv_start: int = 0
    max_kv_size: int | None = None
    prompt_lookup: bool = False
    speculative: bool = False

    def __post_init__(self) -> None:
        _check_int("max_batch", self.max_batch, 1)
        _check_int("max_queue", self.max_queue, 0)
        for name in ("memory_limit", "kv_memory", "max_kv_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_int("prefix_store_bytes", self.prefix_store_bytes, 0)
        _check_int("prefill_budget", self.prefill_budget, 1)
        _check_kv(self)
        for name in ("prompt_lookup", "speculative"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name}={getattr(self, name)!r} must be true or false")

    @property
    def kv_quantization(self) -> KVQuantization | None:
        """How every request's cache stores keys and values (None: in the model's dtype)."""
        return _kv_quantization(self)

    def replace(self, **changes: Any) -> EngineOptions:
        """A copy with `changes`; an unknown name is an OptionError that lists the known ones."""
        return _replace(self, "engine", changes)

    @classmethod
    def of(cls, options: EngineOptions | None = None, **changes: Any) -> EngineOptions:
        """`options` (or the defaults) with keyword changes: how Engine's keyword arguments arrive."""
        return (options or cls()).replace(**changes) if changes else (options or cls())

    def for_requests(self, requests: Sequence[GenerationOptions]) -> EngineOptions:
        """These options for one run of `requests` (batch_generate's rule): the cache's kind and size,
        when these leave them unset, are the ones every request gives; the rows that ask for
        prompt_lookup draft by it.

        Raises:
            OptionError: requests that give different kinds or sizes of cache.
        """
        changes: dict[str, Any] = {}
        if self.kv_bits is None:
            asked = run_option([o.kv_quantization for o in requests], "kv_bits, kv_group_size, quantized_kv_start",
                               KVQuantization.describe)
            if asked is not None:
                changes.update(kv_bits=asked.bits, kv_group_size=asked.group_size, quantized_kv_start=asked.start)
        if self.max_kv_size is None:
            changes["max_kv_size"] = run_option([o.max_kv_size for o in requests], "max_kv_size")
        if any(o.prompt_lookup and o.num_draft_tokens for o in requests):
            changes["speculative"] = True
        return self.replace(**changes)


def run_option(values: Sequence[Any], name: str, text: Callable[[Any], str] = str) -> Any:
    """A whole-run option's value (a property of the batch's cache): the one every request gives.

    Raises:
        OptionError: requests that give different values.
    """
    distinct = list(dict.fromkeys(values))
    if len(distinct) > 1:
        raise OptionError(f"{name}: the batch's, not a request's; give every prompt the same, "
                          f"got {text(distinct[0])} and {text(distinct[1])}")
    return distinct[0] if distinct else None


def _check_kv(options: GenerationOptions | EngineOptions) -> None:
    """The KV cache's storage fields, the same in both kinds of options."""
    if options.kv_bits is not None:
        _check_int("kv_bits", options.kv_bits, None)
        if options.kv_bits not in KV_BITS:
            raise OptionError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))} (or unset), "
                              f"got {options.kv_bits!r}")
    if options.kv_group_size not in KV_GROUP_SIZES:
        raise OptionError(f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, "
                          f"got {options.kv_group_size!r}")
    _check_int("quantized_kv_start", options.quantized_kv_start, 0)


def _kv_quantization(options: GenerationOptions | EngineOptions) -> KVQuantization | None:
    if options.kv_bits is None:
        return None
    return KVQuantization(options.kv_bits, options.kv_group_size, options.quantized_kv_start)


def _replace(options: Any, kind: str, changes: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(options)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise OptionError(f"unknown {kind} option {unknown[0]!r}; expected one of {', '.join(sorted(known))}")
    return dataclasses.replace(options, **changes)


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{name}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise OptionError(f"{name} must be >= {minimum}, got {value}")

