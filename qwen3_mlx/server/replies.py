"""Responses as OpenAI writes them, from our chunks or results: a Reply gathers one response, and
the functions here make its chat.completion or text_completion body, its usage and log-probabilities.
FastAPI-free: the server's routes and `generate --prompts-file` write the same bodies with them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from ..generation.response import Chunk, GenerationResult, GenerationStats, TokenLogprob
from . import protocol as p

FINISH_REASONS = {"stop": "stop", "stop_string": "stop", "length": "length", "tool_calls": "tool_calls"}


@dataclass
class Reply:
    """A response as its chunks arrive: the text of each part, the tool calls, the log-probabilities."""

    parallel_tool_calls: bool = True
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)

    def add(self, chunk: Chunk) -> dict | None:
        """Take in a chunk; returns its tool-call delta ({"index", "id", "name", "arguments"}), if any."""
        self.stats = chunk.stats
        if chunk.kind == "answer":
            self.logprobs.extend(chunk.logprobs)
            self.content.append(chunk.text)
        elif chunk.kind == "reasoning":
            self.reasoning.append(chunk.text)
        else:
            delta = chunk.tool_call
            if delta is None or (delta.index > 0 and not self.parallel_tool_calls):
                return None
            return {"index": delta.index, "id": delta.id, "name": delta.name, "arguments": delta.arguments}
        return None

    @property
    def finish_reason(self) -> str:
        """OpenAI's: "length" whenever the cap cut the reply, even after complete calls; "tool_calls" when
        it ended after calls. (A reply the shutdown cancelled gets none: the server ends it with an error.)"""
        reason = self.stats.finish_reason or "stop"
        if reason != "length" and self.tool_calls():
            return "tool_calls"
        return FINISH_REASONS.get(reason, reason)

    def tool_calls(self) -> list[p.ToolCall] | None:
        """The answer's complete calls, as the library parsed them (a call announced while streaming,
        then found malformed, is not one); the first alone without parallel_tool_calls."""
        calls = self.stats.tool_calls[: None if self.parallel_tool_calls else 1]
        if not calls:
            return None
        return [p.ToolCall(id=c.id, function=p.FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]

    def usage(self) -> p.Usage:
        return usage(self.stats)

    @classmethod
    def of(cls, result: GenerationResult, parallel_tool_calls: bool = True) -> Reply:
        """A whole result as the chunks would have made it (what generate --prompts-file writes)."""
        return cls(parallel_tool_calls, [result.reasoning], [result.content], list(result.content_logprobs),
                   result.stats)


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


def chat_completion(reply: Reply, model_id: str, logprobs: bool, tokenizer: Any) -> p.ChatCompletion:
    reasoning = "".join(reply.reasoning) or None
    calls = reply.tool_calls()
    content = "".join(reply.content)
    message = p.AssistantMessage(content=content if content or not calls else None, reasoning_content=reasoning,
                                 reasoning=reasoning, tool_calls=calls)
    choice = p.ChatChoice(message=message, finish_reason=reply.finish_reason,
                          logprobs=chat_logprobs(reply.logprobs, tokenizer) if logprobs else None)
    return p.ChatCompletion(id=new_id("chatcmpl"), model=model_id, choices=[choice],
                            usage=reply.usage())


def completion(reply: Reply, model_id: str, logprobs: bool, tokenizer: Any) -> p.Completion:
    reasoning = "".join(reply.reasoning) or None
    choice = p.CompletionChoice(text="".join(reply.content), finish_reason=reply.finish_reason,
                                logprobs=legacy_logprobs(reply.logprobs, tokenizer) if logprobs else None,
                                reasoning_content=reasoning, reasoning=reasoning)
    return p.Completion(id=new_id("cmpl"), model=model_id, choices=[choice], usage=reply.usage())


# ---------------------------------------------------------------- log-probabilities


def _token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token])


def chat_logprobs(logprobs: list[TokenLogprob], tokenizer: Any) -> p.ChoiceLogprobs:
    def top(token: int, logprob: float) -> p.TopLogprob:
        text = _token_text(tokenizer, token)
        return p.TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    return p.ChoiceLogprobs(content=[
        p.TokenLogprob(**top(lp.token, lp.logprob).model_dump(), top_logprobs=[top(t, v) for t, v in lp.top])
        for lp in logprobs])


def legacy_logprobs(logprobs: list[TokenLogprob], tokenizer: Any) -> p.LegacyLogprobs:
    tokens = [_token_text(tokenizer, lp.token) for lp in logprobs]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return p.LegacyLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in logprobs],
                            top_logprobs=[{_token_text(tokenizer, t): v for t, v in lp.top} for lp in logprobs],
                            text_offset=offsets)


def dump_json(body: p.BaseModel) -> str:
    """A response body as the API writes it: the one serialization of every route and of batch output,
    every field sent, null when empty, as OpenAI does."""
    return body.model_dump_json()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


