"""The sampling parameters every API's body is read through (chat and text completions carry them as
they are; Anthropic's and the Responses API's fields are checked by them too), and the request
bodies' common base. Pydantic only: importable without FastAPI.

Bounds that JSON alone can break (NaN, a negative token count) are checked here, so that
/openapi.json states them; a known parameter the server cannot honour is refused by the mapping.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Count = Annotated[int, Field(ge=1)]
Probability = Annotated[float, Field(ge=0, le=1)]
Seed = Annotated[int, Field(ge=0, lt=1 << 64)]  # MLX's random key takes an unsigned 64-bit seed
Budget = Annotated[int, Field(ge=0)]

class RequestBody(BaseModel):
    """A request body. An explicit null on an optional field means "not given" (OpenAI's SDKs and proxies
    send null for fields they leave unset), so a field typed `X | None` with another default never holds
    None: the type says, in /openapi.json, that null is accepted."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

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
    max_tokens: Count | None = Field(None, description="The most tokens generated, reasoning and forced text "
                                                       "included; capped by the server's --max-tokens.")
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = Field(None, description="0 or -1: no top-k filter.")
    min_p: Probability | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = Field(
        None, description="Not implemented: only 0 is accepted; use presence_penalty or repetition_penalty.")
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Count | None = 1
    thinking_budget: Budget | None = Field(None, description="The most reasoning tokens (0: no reasoning).")
    thinking_budget_tokens: Budget | None = Field(None, description="llama.cpp's name for thinking_budget.")
    thinking_token_budget: Budget | None = Field(None, description="vLLM's name for thinking_budget.")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="A thinking budget by name (options.REASONING_EFFORTS): none 0, minimal 256, low 1024, "
                          "medium 4096, high 16384, xhigh 32768, max no limit.")
    num_draft_tokens: Annotated[int, Field(ge=0, le=64)] | None = Field(
        None, description="On a server that speculates (serve --draft-model or --prompt-lookup): the longest draft "
                          "for this request; 0: none.")
