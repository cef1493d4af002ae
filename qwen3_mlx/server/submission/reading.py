"""The one reading of an API's request body: it becomes what the engine takes, a Submission (a Prompt
and GenerationOptions). Budgets, caps, effort names, defaults and refusals live here, for every API's
mapping and for `generate --prompts-file`'s OpenAI batch lines alike.

Every refusal is an ApiError naming the parameter: a value the server cannot honour is never
silently dropped. Unknown parameter names never get here (the protocol models ignore them).
"""

from __future__ import annotations

import functools
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Sequence

from pydantic import ValidationError

from ...errors import OptionError
from ...generation.options import (
    DEFAULT_MAX_TOKENS,
    REASONING_EFFORTS,
    GenerationOptions,
)
from ...text.prompt import Prompt, encode_prompt
from ...text.tool_grammar import tool_call_grammar
from .parameters import SamplingParameters
from .refusal import ApiError, validation_problem


log = logging.getLogger("qwen3_mlx.server")


@dataclass(frozen=True)
class Settings:
    """What the server imposes on every request."""

    model_id: str  # the name responses report
    max_tokens_cap: int = DEFAULT_MAX_TOKENS  # the most a request may generate; also the default
    default_thinking_budget: int | None = None
    defaults: GenerationOptions = GenerationOptions()  # what a body leaves unset (the CLI's options, for a batch)
    aliases: tuple[str, ...] = ()  # more names a request's `model` may give
    # What seals the reasoning a client carries back (sealed.py); by default a key of this process's own.
    secret_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)


@dataclass(frozen=True)
class Submission:
    """What goes to engine.submit: a whole request."""

    prompt: Prompt
    options: GenerationOptions


def check_model(name: str | None, settings: Settings) -> None:
    """A 404 unless `name` is a name the server answers to, or None (a request left `model` out)."""
    if name is not None and name not in (settings.model_id, *settings.aliases):
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {settings.model_id!r} "
                            "(GET /v1/models)", param="model", code="model_not_found")


def thinking_budget(body: SamplingParameters, default: int | None) -> int | None:
    """The request's budget under any of its names; reasoning_effort when none is given; else the server's."""
    named = {name: getattr(body, name) for name in ("thinking_budget", "thinking_budget_tokens",
                                                    "thinking_token_budget") if getattr(body, name) is not None}
    if len(set(named.values())) > 1:
        given = ", ".join(f"{k}={v}" for k, v in named.items())
        raise ApiError(400, f"thinking_budget: {given} disagree; give one", param="thinking_budget")
    if named:
        return next(iter(named.values()))
    if body.reasoning_effort is not None:
        return REASONING_EFFORTS[body.reasoning_effort]
    return default


def generation_options(body: SamplingParameters, settings: Settings, asked: int | None, *, think: bool,
                       logprobs: int | None) -> GenerationOptions:
    """The options of a request. `asked` (max_tokens) caps every generated token, reasoning and forced
    text included, as OpenAI's does; it is lowered to the server's cap."""
    most = min(asked or settings.max_tokens_cap, settings.max_tokens_cap)
    budget = thinking_budget(body, settings.default_thinking_budget)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    given = dict(
        think=think,
        thinking_budget=None if budget is None else min(budget, most),
        max_tokens=most,
        max_total_tokens=most,
        temp=body.temperature,
        top_p=body.top_p,
        top_k=0 if body.top_k == -1 else body.top_k,
        min_p=body.min_p,
        presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=logit_bias(body.logit_bias),
        stop=stop,
        seed=body.seed,
        logprobs=logprobs,
        num_draft_tokens=body.num_draft_tokens,
    )
    always = ("think", "thinking_budget", "max_tokens", "max_total_tokens", "logprobs")  # the body's, given or not
    return settings.defaults.replace(**{k: v for k, v in given.items() if k in always or v not in (None, ())})


def logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's {"token id": bias}; the ids are checked against the vocabulary by the library."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdecimal()):
            raise ApiError(400, f"logit_bias: key {key!r} is not a token id (a decimal integer)", param="logit_bias")
        out[int(key)] = value
    return out


def sampling_options(fields: dict[str, Any], settings: Settings, asked: int | None, *,
                     think: bool) -> GenerationOptions:
    """The options of another API's body, read by the one rule (generation_options): `fields` are
    SamplingParameters' (temperature, top_p, stop, thinking_budget, reasoning_effort, ...), None for unset."""
    try:
        body = SamplingParameters.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        message, param = validation_problem(e.errors())
        raise ApiError(400, message, param=param) from None
    return generation_options(body, settings, asked, think=think, logprobs=None)


def check_tool_names(tools: Sequence[dict], param: str = "tools") -> None:
    """A 400 for two tools of one name (OpenAI's format: {"type": "function", "function": {"name"}})."""
    names = [t["function"]["name"] for t in tools]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ApiError(400, f"{param}: more than one tool is named {', '.join(map(repr, twice))}; give each tool its "
                            "own name", param=param)


def check_choice_has_tools(tools: Sequence[dict] | None, param: str = "tool_choice") -> None:
    """The chat route's rule, in every API: a tool choice (one that forces a call, in the other two) needs tools."""
    if not tools:
        raise ApiError(400, f"{param}: given without tools; send tools, or leave {param} out", param=param)


def check_tool_result(where: str, call_id: Any, earlier: set[str]) -> None:
    """A tool's result answers a call made earlier in the conversation, by its id (`where`: the id's field)."""
    if not isinstance(call_id, str) or not call_id:
        raise ApiError(400, f"{where}: a tool result needs the id of the call it answers", param=where)
    if call_id not in earlier:
        raise ApiError(400, f"{where}: no earlier tool call has the id {call_id!r}", param=where)


def check_conversation(messages: Sequence[dict], param: str) -> None:
    """What every chat template needs: a user's message (a tool's result is one), checked before rendering,
    so that a template's own failure, which names the server's files, never reaches a client."""
    if not messages:
        raise ApiError(400, f"{param}: give at least one message", param=param)
    if not any(m.get("role") in ("user", "tool") for m in messages):
        raise ApiError(400, f"{param}: the conversation must hold a user message", param=param)


@functools.cache  # once per process: an agent sends the same on every request (Codex: web_search)
def left_out(api: str, what: str, kind: str) -> None:
    """Log that a `what` (a tool, an input item) of type `kind` does not run here and is left out."""
    log.info("%s: %s of type %r left out: it does not run here (logged once per type)", api, what, kind)


def tool_constraint(tools: Sequence[dict] | None, choice: str, *, parallel: bool, schema: dict | None,
                    format_param: str = "response_format") -> dict[str, Any]:
    """What the answer must match, as GenerationOptions fields, for tools in OpenAI's format and a
    choice ("auto", "required" or a tool's name): constrained calls for "required", a name, strict
    tools or an answer schema; a JSON schema alone when there are no tools."""
    if not tools:
        return {} if schema is None else {"json_schema": schema}
    if choice == "auto" and schema is None and not any(t["function"].get("strict") for t in tools):
        return {}  # free text and calls, parsed but not constrained
    try:
        grammar = tool_call_grammar(list(tools), choice=choice, parallel=parallel, answer_schema=schema)
    except OptionError as e:
        message = str(e)
        param = next((p for p in ("tool_choice", "response_format") if message.startswith(p)), "tools")
        raise ApiError(400, message, param=format_param if param == "response_format" else param) from None
    return {"grammar": grammar}


def prompt_tokens(tokenizer: Any, submission: Submission) -> int:
    """The prompt's tokens as the engine counts them (Anthropic's count_tokens)."""
    return len(encode_prompt(tokenizer, submission.prompt, think=submission.options.think)[0])
