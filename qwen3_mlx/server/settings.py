"""The server's settings: serve's options that shape the app (names, key, caps, page), one value that
`serve` builds and `create_app` takes, so that the tests build the app exactly as `serve` does."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from ..errors import OptionError
from ..generation.options import DEFAULT_MAX_TOKENS, GenerationOptions
from .submission.reading import Settings

DEFAULT_MAX_BODY_BYTES = 8 << 20


@dataclass(frozen=True)
class ServerSettings:
    """What `qwen3-mlx serve` imposes on every request.

    Args:
        model_names: the names a request's `model` may give (--served-model-name, or the model as given);
            the first is the one /v1/models lists and responses report. A request naming another gets a 404.
        api_key: when set, /v1/* needs `Authorization: Bearer <api_key>` (or `x-api-key: <api_key>`).
        max_tokens: the most tokens a request may generate (its max_tokens is lowered to it), and the
            default when it asks for no limit (--max-tokens).
        thinking_budget: the thinking budget of requests that give none (--thinking-budget).
        num_draft_tokens: the longest draft of a request that gives none (--num-draft-tokens).
        cors_origin: the one origin browsers may call from; None: no CORS headers.
        ui: serve the chat page at /.
        max_body_bytes: larger request bodies get a 413.
        secret_key: what seals the reasoning clients carry back (--secret-key-file); default: random.
        metrics: serve /metrics, Prometheus' text format (--no-metrics: not).
    """

    model_names: tuple[str, ...]
    api_key: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    thinking_budget: int | None = None
    num_draft_tokens: int | None = None
    cors_origin: str | None = None
    ui: bool = True
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    secret_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    metrics: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.model_names, str) or not self.model_names:
            raise OptionError(f"model_names: give the model's names as a tuple of one or more, "
                              f"got {self.model_names!r}")

    @property
    def requests(self) -> Settings:
        """The rules every API's mapping reads a body by."""
        defaults = GenerationOptions()
        if self.num_draft_tokens is not None:
            defaults = defaults.replace(num_draft_tokens=self.num_draft_tokens)
        return Settings(self.model_names[0], self.max_tokens, self.thinking_budget, defaults=defaults,
                        aliases=self.model_names[1:], secret_key=self.secret_key)
