"""OpenAI's chat and text completions mapped onto the one request path: a body read into a Submission
(submission/reading.py's rules), and a generation result made into its chat.completion or
text_completion body, usage and log-probabilities. FastAPI-free: the routes and `generate
--prompts-file` write the same bodies with it."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ...errors import OptionError
from ...generation.response import GenerationResult, GenerationStats, TokenLogprob
from ...text.prompt import Prompt
from ...text.structured import response_format_schema
from ...text.tools import ToolCall
from ..submission.outcome import StreamedCall, new_id, tool_calls
from ..submission.parameters import SamplingParameters
from ..submission.reading import (
    Settings,
    Submission,
    check_choice_has_tools,
    check_model,
    check_tool_names,
    generation_options,
    tool_constraint,
)
from ..submission.refusal import ApiError, check_range, unsupported, validation_problem
from . import protocol as p

FINISH_REASONS = {"stop": "stop", "stop_string": "stop", "length": "length", "tool_calls": "tool_calls"}


# ---------------------------------------------------------------- a body -> the one Submission


def chat_body_submission(body: dict, settings: Settings) -> Submission:
    """A chat completion body as JSON reads it (an OpenAI batch line's), read as the route reads it.

    Raises:
        ApiError: what the route would answer with a 400 (or 404).
    """
    try:
        request = p.ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        message, param = validation_problem(e.errors())
        raise ApiError(400, message, param=param) from None
    try:
        return chat_submission(request, settings)
    except OptionError as e:  # GenerationOptions' refusal of a value, as the route answers it
        raise ApiError(400, str(e)) from None


def chat_submission(body: p.ChatCompletionRequest, settings: Settings) -> Submission:
    check_model(body.model or None, settings)
    _check_common(body)
    check_range("max_completion_tokens", body.max_completion_tokens, 1)
    check_range("top_logprobs", body.top_logprobs, 0, 20)
    if body.tool_choice is not None:
        check_choice_has_tools(body.tools)
    check_tool_names([t.model_dump() for t in body.tools or ()])
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
    think = (body.chat_template_kwargs or {}).get("enable_thinking", settings.defaults.think)
    if not isinstance(think, bool):
        raise ApiError(400, f"chat_template_kwargs.enable_thinking: must be true or false, got {think!r}",
                       param="chat_template_kwargs.enable_thinking")
    choice = body.tool_choice
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and choice != "none" else None
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    asked = body.max_completion_tokens or body.max_tokens
    options = generation_options(body, settings, asked, think=think, logprobs=logprobs)
    _check_ranges(body)
    name = choice.function.name if isinstance(choice, p.NamedToolChoice) else choice or "auto"
    constraint = tool_constraint(tools, name, parallel=body.parallel_tool_calls, schema=_schema(body))
    return Submission(Prompt(chat_messages(body), tools=tools), options.replace(**constraint))


def _schema(body: p.ChatCompletionRequest) -> dict | None:
    """The answer's JSON schema, from response_format."""
    fmt = body.response_format
    try:
        return response_format_schema(None if fmt is None else fmt.model_dump(by_alias=True, exclude_none=True))
    except OptionError as e:
        raise ApiError(400, str(e), param="response_format") from None


def completion_submission(body: p.CompletionRequest, settings: Settings) -> Submission:
    check_model(body.model or None, settings)
    _check_common(body)
    check_range("best_of", body.best_of, 1)
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
    _check_ranges(body)
    check_range("logprobs", body.logprobs, high=20)
    return Submission(Prompt(prompt, raw=isinstance(prompt, str)), options)


def chat_messages(body: p.ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template reads them (OpenAI's "developer" is a system message)."""
    messages = []
    for m in body.messages:
        message = m.model_dump(exclude_none=True)
        if message["role"] == "developer":
            message["role"] = "system"
        messages.append(message)
    return messages


def _check_common(body: SamplingParameters) -> None:
    """OpenAI's rules on what GenerationOptions does not hold (its counts of tokens and choices start at 1)."""
    check_range("n", body.n, 1)
    check_range("max_tokens", body.max_tokens, 1)
    if body.n > 1:
        raise unsupported("n", f"{body.n} choices asked; this server gives one per request: send {body.n} requests "
                               "(they are batched)")
    if body.frequency_penalty:
        raise unsupported("frequency_penalty", "not implemented; use presence_penalty or repetition_penalty")


def _check_ranges(body: SamplingParameters) -> None:
    """OpenAI's own bounds on values GenerationOptions checks too, checked after it, so that a value both
    refuse (an infinite penalty) is told in GenerationOptions' words."""
    check_range("presence_penalty", body.presence_penalty, -2, 2)
    for token, bias in (body.logit_bias or {}).items():
        if not -100 <= bias <= 100:
            raise ApiError(400, f"logit_bias: the bias of token {token} must be in [-100, 100], got {bias}",
                           param="logit_bias")
    check_range("num_draft_tokens", body.num_draft_tokens, high=64)


# ---------------------------------------------------------------- a result -> its body


def finish_reason(stats: GenerationStats, calls: list[ToolCall]) -> str:
    """OpenAI's: "length" whenever the cap cut the reply, even after complete calls; "tool_calls" when
    it ended after calls. (A reply the shutdown cancelled gets none: the server ends it with an error.)"""
    reason = stats.finish_reason or "stop"
    if reason != "length" and calls:
        return "tool_calls"
    return FINISH_REASONS.get(reason, reason)


def usage(stats: GenerationStats) -> p.Usage:
    """The one rule of usage, vLLM's: completion_tokens counts every token of the response, reasoning,
    <think> tags, forced text and the end-of-turn token included (what max_tokens counts, so it never
    exceeds it); reasoning_tokens, those the model wrote inside the reasoning; accepted and rejected
    prediction tokens, speculative decoding's drafts kept and not kept (OpenAI's names, from its
    predicted outputs)."""
    completion = len(stats.token_ids)
    details = p.CompletionTokensDetails(reasoning_tokens=stats.reasoning_tokens,
                                        accepted_prediction_tokens=stats.accepted_tokens,
                                        rejected_prediction_tokens=stats.drafted_tokens - stats.accepted_tokens)
    return p.Usage(prompt_tokens=stats.prompt_tokens, completion_tokens=completion,
                   total_tokens=stats.prompt_tokens + completion,
                   prompt_tokens_details=p.PromptTokensDetails(cached_tokens=stats.cached_tokens),
                   completion_tokens_details=details)


def chat_completion(result: GenerationResult, model_id: str, *, logprobs: bool, parallel: bool,
                    tokenizer: Any, streamed: list[StreamedCall] | None = None) -> p.ChatCompletion:
    """The chat.completion body of a whole result; `streamed`: the calls its stream carried (a call the
    cap cut among them, with its arguments so far, as OpenAI sends one), else the complete ones."""
    reasoning = result.reasoning or None
    calls = tool_calls(result.stats, parallel)
    content = result.content
    if streamed is None:
        streamed = [StreamedCall(c.id, c.name, c.arguments_json, True) for c in calls]
    wire = [p.ToolCall(id=c.id, function=p.FunctionCall(name=c.name, arguments=c.arguments)) for c in streamed]
    message = p.AssistantMessage(content=content if content or not wire else None, reasoning_content=reasoning,
                                 reasoning=reasoning, tool_calls=wire or None)
    choice = p.ChatChoice(message=message, finish_reason=finish_reason(result.stats, calls),
                          logprobs=chat_logprobs(result.content_logprobs, tokenizer) if logprobs else None)
    return p.ChatCompletion(id=new_id("chatcmpl-"), model=model_id, choices=[choice], usage=usage(result.stats))


def completion(result: GenerationResult, model_id: str, *, logprobs: bool, tokenizer: Any) -> p.Completion:
    """The text_completion body of a whole result."""
    reasoning = result.reasoning or None
    choice = p.CompletionChoice(text=result.content, finish_reason=finish_reason(result.stats, result.stats.tool_calls),
                                logprobs=legacy_logprobs(result.content_logprobs, tokenizer) if logprobs else None,
                                reasoning_content=reasoning, reasoning=reasoning)
    return p.Completion(id=new_id("cmpl-"), model=model_id, choices=[choice], usage=usage(result.stats))


def chat_logprobs(logprobs: list[TokenLogprob], tokenizer: Any) -> p.ChoiceLogprobs:
    def top(token: int, logprob: float) -> p.TopLogprob:
        text = tokenizer.decode([token])
        return p.TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    return p.ChoiceLogprobs(content=[
        p.TokenLogprob(**top(lp.token, lp.logprob).model_dump(), top_logprobs=[top(t, v) for t, v in lp.top])
        for lp in logprobs])


def legacy_logprobs(logprobs: list[TokenLogprob], tokenizer: Any) -> p.LegacyLogprobs:
    tokens = [tokenizer.decode([lp.token]) for lp in logprobs]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return p.LegacyLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in logprobs],
                            top_logprobs=[{tokenizer.decode([t]): v for t, v in lp.top} for lp in logprobs],
                            text_offset=offsets)


def dump_json(body: p.BaseModel) -> str:
    """A response body as the API writes it: the one serialization of every route and of batch output,
    every field sent, null when empty, as OpenAI does."""
    return body.model_dump_json()


def error_json(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> str:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return dump_json(p.ErrorResponse(error=p.ErrorDetail(message=message, type=type, param=param, code=code)))
