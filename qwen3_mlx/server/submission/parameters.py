"""The sampling parameters every API's body is read through (chat and text completions carry them as
they are; Anthropic's and the Responses API's fields are checked by them too), and the request
bodies' common base. Pydantic only: importable without FastAPI.

Types only: a value's bounds are GenerationOptions' (one wording in every path), a bound of one wire
API its mapping's; a known parameter the server cannot honour is refused by the mapping.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RequestBody(BaseModel):
    """A request body. An explicit null on an optional field means "not given" (OpenAI's SDKs and proxies
    send null for fields they leave unset), so a field typed `X | None` with another default never holds
    None: the type says, in /openapi.json, that null is accepted."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        optional = {key for name, f in cls.model_fields.items() if not f.is_required() for key in (name, f.alias)}
        return {key: value for key, value in data.items() if value is not None or key not in optional}

class StreamOptions(RequestBody):
    include_usage: bool | None = False

class SamplingParameters(RequestBody):
    """What chat and text completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, description="The most tokens generated, reasoning and forced text "
                                                     "included; capped by the server's --max-tokens.")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="0 or -1: no top-k filter.")
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = Field(
        None, description="Not implemented: only 0 is accepted; use presence_penalty or repetition_penalty.")
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    thinking_budget: int | None = Field(None, description="The most reasoning tokens (0: no reasoning).")
    thinking_budget_tokens: int | None = Field(None, description="llama.cpp's name for thinking_budget.")
    thinking_token_budget: int | None = Field(None, description="vLLM's name for thinking_budget.")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="A thinking budget by name (options.REASONING_EFFORTS): none 0, minimal 256, low 1024, "
                          "medium 4096, high 16384, xhigh 32768, max no limit.")
    num_draft_tokens: int | None = Field(
        None, description="On a server that speculates (serve --draft-model or --prompt-lookup): the longest draft "
                          "for this request; 0: none.")
