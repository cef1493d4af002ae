"""A request's sampling parameters and their defaults: the Qwen3 model card's per mode, then a
checkpoint's generation_config.json, then what the caller gives. The loader reads them with the
checkpoint; the samplers (generation/sampling.py) take them.
"""

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import OptionError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. Field names follow generation_config.json.

    temperature 0 means greedy; top_p 1.0, top_k 0 and min_p 0.0 switch their filter off.
    presence_penalty is subtracted once from every token already generated (OpenAI/Qwen);
    repetition_penalty divides positive and multiplies negative logits of those tokens (HF/CTRL);
    logit_bias maps a token id to a value added to its logit (-inf bans it).
    """

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None


# Qwen3 model card, "Best Practices". Greedy decoding is discouraged in both modes (endless repetition).
_THINKING = SamplingParams(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
_NON_THINKING = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)
_GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p")


def default_params(thinking: bool, generation_config: Mapping | None = None, **overrides) -> SamplingParams:
    """The sampling parameters for a mode, a checkpoint's generation_config.json, and explicit options.

    Precedence, lowest first: the Qwen3 model card's values for the mode; in thinking mode only, the
    keys temperature, top_p, top_k and min_p of `generation_config` (Qwen3's file holds the thinking
    values, so applying it to non-thinking mode would undo the mode's defaults); `overrides` that are
    not None. When
    `generation_config` says `"do_sample": false` its sampling keys are ignored rather than turned
    into greedy decoding: such files are usually transformers' defaults saved by a fine-tune, and
    greedy decoding makes Qwen3 repeat itself. Ask for greedy with `temperature=0`.

    Args:
        thinking: whether the chat template enables thinking (selects the model card's defaults).
        generation_config: the parsed generation_config.json, or None.
        **overrides: any SamplingParams field, e.g. from CLI options; None means "not given".

    Returns:
        The parameters (not validated; `make_sampler` validates).

    Raises:
        OptionError: an override names no SamplingParams field.
    """
    params = _THINKING if thinking else _NON_THINKING
    if thinking and generation_config and generation_config.get("do_sample", True) is not False:
        from_file = {k: generation_config.get(k) for k in _GENERATION_CONFIG_KEYS}
        params = replace(params, **{k: v for k, v in from_file.items() if v is not None})
    known = {f.name for f in fields(SamplingParams)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        expected = ", ".join(sorted(known))
        raise OptionError(f"unknown sampling option {unknown[0]!r}; expected one of {expected}")
    return replace(params, **{k: v for k, v in overrides.items() if v is not None})


def validate(params: SamplingParams) -> None:
    """Check every field's type and range (check_sampling's words).

    Raises:
        OptionError: one line naming the field, its allowed range and the value given.
    """
    check_sampling(**{f.name: getattr(params, f.name) for f in fields(params)})


def check_sampling(*, temperature: Any = None, top_p: Any = None, top_k: Any = None, min_p: Any = None,
                   presence_penalty: Any = None, repetition_penalty: Any = None, logit_bias: Any = None) -> None:
    """Check each sampling value given (None: not given): the one owner of their bounds and of their
    words, which GenerationOptions, the loader and the samplers all call.

    Raises:
        OptionError: one line naming the value, its allowed range and the value given.
    """
    if temperature is not None:
        t = _number("temperature", temperature)
        if not t >= 0:  # written this way so NaN fails too
            raise OptionError(f"temperature must be >= 0, got {t}")
        if math.isinf(t):
            raise OptionError(f"temperature must be finite, got {t}")
    if top_p is not None and not 0 < _number("top_p", top_p) <= 1:
        raise OptionError(f"top_p must be in (0, 1], got {float(top_p)}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise OptionError(f"top_k={top_k!r} must be an integer")
        if top_k < 0:
            raise OptionError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if min_p is not None and not 0 <= _number("min_p", min_p) <= 1:
        raise OptionError(f"min_p must be in [0, 1], got {float(min_p)}")
    if presence_penalty is not None and not math.isfinite(_number("presence_penalty", presence_penalty)):
        raise OptionError(f"presence_penalty must be finite, got {float(presence_penalty)}")
    if repetition_penalty is not None:
        r = _number("repetition_penalty", repetition_penalty)
        if not (r > 0 and math.isfinite(r)):
            raise OptionError(f"repetition_penalty must be > 0 and finite, got {r}")
    if logit_bias is not None:
        _check_logit_bias(logit_bias)


def _check_logit_bias(logit_bias: Any) -> None:
    if not isinstance(logit_bias, Mapping):
        raise OptionError(f"logit_bias={logit_bias!r} must be a mapping of token ids to biases")
    for token, bias in logit_bias.items():
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise OptionError(f"logit_bias: token ids must be integers >= 0, got {token!r}")
        if isinstance(bias, bool) or not isinstance(bias, numbers.Real):
            raise OptionError(f"logit_bias: the bias of token {token} must be a number, got {bias!r}")
        if math.isnan(bias) or bias == math.inf:
            raise OptionError(f"logit_bias: bias for token {token} must be finite or -inf, got {float(bias)}")


def _number(name: str, value: Any) -> float:
    """`value` as a float, or an OptionError in the words every path uses for a value that is no number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"{name}={value!r} must be a number")
    return float(value)
