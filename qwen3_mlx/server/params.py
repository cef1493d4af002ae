"""The one reading of an API's request body: it becomes what the engine takes, a Prompt and
GenerationOptions. Budgets, caps, effort names, defaults and refusals live here, for the server's
routes and for `generate --prompts-file`'s OpenAI batch lines alike.

Every refusal is an ApiError naming the parameter: a value the server cannot honour is never
silently dropped. Unknown parameter names never get here (protocol.py ignores them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from pydantic import ValidationError

from ..errors import OptionError
from ..generation.options import (
    DEFAULT_MAX_TOKENS,
    REASONING_EFFORTS,
    GenerationOptions,
)
from ..text.prompt import Prompt, encode_prompt
from ..text.structured import response_format_schema
from ..text.tool_grammar import tool_call_grammar
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingParameters,
)


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="unsupported_parameter")


@dataclass(frozen=True)
class Settings:
    """What the server imposes on every request."""

    model_id: str  # the name responses report
    max_tokens_cap: int = DEFAULT_MAX_TOKENS  # the most a request may generate; also the default
    default_thinking_budget: int | None = None
    defaults: GenerationOptions = GenerationOptions()  # what a body leaves unset (the CLI's options, for a batch)
    aliases: tuple[str, ...] = ()  # more names a request's `model` may give


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


def validation_problem(errors: Sequence[Any]) -> tuple[str, str | None]:
    """The first of pydantic's errors about a body, as (`param: what is wrong`, param)."""
    error = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON{f' ({detail})' if detail else ''}", None
    if not loc:
        return "the body must be a JSON object", None
    param = ".".join(loc)
    return f"{param}: {error.get('msg', 'invalid')}", param


def chat_body_submission(body: dict, settings: Settings) -> Submission:
    """A chat completion body as JSON reads it (an OpenAI batch line's), read as the route reads it.

    Raises:
        ApiError: what the route would answer with a 400 (or 404).
    """
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        message, param = validation_problem(e.errors())
        raise ApiError(400, message, param=param) from None
    return chat_submission(request, settings)


def check_tools(body: ChatCompletionRequest) -> None:
    """OpenAI's refusals: a tool_choice without tools, two tools of one name."""
    if body.tool_choice is not None and not body.tools:
        raise ApiError(400, "tool_choice: given without tools; send tools, or leave tool_choice out",
                       param="tool_choice")
    names = [t.function.name for t in body.tools or ()]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ApiError(400, f"tools: more than one tool is named {', '.join(map(repr, twice))}; give each tool its "
                            "own name", param="tools")


def chat_submission(body: ChatCompletionRequest, settings: Settings) -> Submission:
    check_model(body.model or None, settings)
    _check_common(body)
    check_tools(body)
    choice = body.tool_choice
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
    think = (body.chat_template_kwargs or {}).get("enable_thinking", settings.defaults.think)
    if not isinstance(think, bool):
        raise ApiError(400, f"chat_template_kwargs.enable_thinking: must be true or false, got {think!r}",
                       param="chat_template_kwargs.enable_thinking")
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and choice != "none" else None
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    asked = body.max_completion_tokens or body.max_tokens
    options = generation_options(body, settings, asked, think=think, logprobs=logprobs)
    options = dataclasses.replace(options, **constraint(body, tools))
    return Submission(Prompt(chat_messages(body), tools=tools), options)


def constraint(body: ChatCompletionRequest, tools: list[dict] | None) -> dict[str, Any]:
    """What the answer must match, as GenerationOptions fields: a JSON schema (response_format), or a
    tool-call grammar (tool_choice "required" or a name; "auto" with strict tools or a response_format)."""
    fmt = body.response_format
    try:
        schema = response_format_schema(None if fmt is None else fmt.model_dump(by_alias=True, exclude_none=True))
    except OptionError as e:
        raise ApiError(400, str(e), param="response_format") from None
    choice = body.tool_choice or "auto"
    if not tools:
        return {} if schema is None else {"json_schema": schema}
    name = choice if isinstance(choice, str) else choice.function.name
    if name == "auto" and schema is None and not any(t["function"].get("strict") for t in tools):
        return {}  # free text and calls, parsed but not constrained
    try:
        grammar = tool_call_grammar(tools, choice=name, parallel=body.parallel_tool_calls, answer_schema=schema)
    except OptionError as e:
        message = str(e)
        param = next((p for p in ("tool_choice", "response_format") if message.startswith(p)), "tools")
        raise ApiError(400, message, param=param) from None
    return {"grammar": grammar}


def completion_submission(body: CompletionRequest, settings: Settings) -> Submission:
    check_model(body.model or None, settings)
    _check_common(body)
    if body.echo:
        raise unsupported("echo", "echoing the prompt is not supported; leave it false")
    if body.suffix:
        raise unsupported("suffix", "Qwen3 has no fill-in-the-middle mode here; leave it unset")
    if body.best_of is not None and body.best_of > 1:
        raise unsupported("best_of", f"{body.best_of} asked; this server gives one completion per request")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) > 1:
            raise unsupported("prompt", f"{len(prompt)} prompts: send one per request (they are batched)")
        prompt = prompt[0]
    if not prompt:
        raise ApiError(400, "prompt: the prompt is empty; give some text", param="prompt")
    # Text completion uses the non-thinking sampling defaults; a prompt that ends inside <think> is
    # still read as reasoning, and the thinking budget applies to it.
    options = generation_options(body, settings, body.max_tokens, think=False, logprobs=body.logprobs)
    return Submission(Prompt(prompt, raw=isinstance(prompt, str)), options)


def chat_messages(body: ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template reads them (OpenAI's "developer" is a system message)."""
    messages = []
    for m in body.messages:
        message = m.model_dump(exclude_none=True)
        if message["role"] == "developer":
            message["role"] = "system"
        messages.append(message)
    return messages


def _check_common(body: SamplingParameters) -> None:
    if body.n > 1:
        raise unsupported("n", f"{body.n} choices asked; this server gives one per request: send {body.n} requests "
                               "(they are batched)")
    if body.frequency_penalty:
        raise unsupported("frequency_penalty", "not implemented; use presence_penalty or repetition_penalty")


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


# ---------------------------------------------------------------- what the other APIs share (anthropic.py, responses.py)


def sampling_options(fields: dict[str, Any], settings: Settings, asked: int | None, *, think: bool) -> GenerationOptions:
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
