"""`qwen3-mlx serve`: the HTTP server over one engine (the serve extra)."""

from __future__ import annotations

from typing import Any

import click

from ..errors import Qwen3Error
from ..generation.options import EngineOptions
from .display import user_errors
from .options import (
    CONTEXT,
    DEFAULTS,
    THINKING_BUDGET,
    check_parallel_draft,
    engine_options,
    model_option,
    parallel_options,
    version,
)


@click.command(context_settings=CONTEXT)
@model_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 opens it to the network (set --api-key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on; a busy one fails at once (exit 1), before the model loads.")
@click.option("--served-model-name", "served_model_names", multiple=True, metavar="NAME",
              help="A name requests may give as `model` (repeatable); the first is the one responses report. "
                   "Default: --model as given.")
@click.option("--api-key", envvar="QWEN3_MLX_API_KEY", metavar="KEY",
              help="Require `Authorization: Bearer KEY` on /v1/*, /api/* and /metrics (also read from "
                   "QWEN3_MLX_API_KEY).")
@THINKING_BUDGET
@click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=DEFAULTS.max_tokens, show_default=True,
              help="Most tokens a request may generate, reasoning included (larger max_tokens are lowered to it); "
                   "also the default.")
@click.option("--cors-origin", metavar="ORIGIN", help="Allow browsers on ORIGIN to call the API (CORS is off without).")
@click.option("--grace", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="SECONDS",
              help="After SIGTERM or Ctrl-C, how long running requests may take to finish before they are cancelled.")
@click.option("--no-ui", is_flag=True, help="Do not serve the chat page at / (the APIs alone).")
@click.option("--no-metrics", is_flag=True, help="Do not serve /metrics (Prometheus' text format).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="What the server and the library log on stderr.")
@click.option("--secret-key-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="The key that seals the reasoning clients carry back (Anthropic's thinking signature, the "
                   "Responses API's encrypted_content). Default: one created once under ~/.cache/qwen3-mlx/.")
@user_errors
@engine_options
@parallel_options
@version
def serve(model: str, host: str, port: int, served_model_names: tuple[str, ...], api_key: str | None,
          thinking_budget: int | None, max_tokens: int, cors_origin: str | None, grace: float, no_ui: bool,
          no_metrics: bool, log_level: str, secret_key_file: str | None, engine: EngineOptions,
          draft_model: str | None, num_draft_tokens: int, parallel: Any) -> None:
    """Serve the model over HTTP: OpenAI's API (/v1/chat/completions, /v1/completions, /v1/responses,
    /v1/models), Anthropic's (/v1/messages), Ollama's (/api/chat, /api/generate, /api/tags, ...), /health,
    /metrics (--no-metrics: none) and a chat page at / (--no-ui: none); /docs describes it. Needs the
    serve extra: pip install "qwen3-mlx[serve]".

    SIGTERM or Ctrl-C stops admitting (new requests get a 503) and lets running requests finish
    (--grace; a second signal cancels them: they end with an error), then exits 0 (SIGTERM) or
    130 (Ctrl-C).

    Under mlx.launch (--parallel) rank 0 serves, every rank computes; a rank lost ends the requests in
    flight with an error, then the server (exit 1). --kv-memory and --prompt-cache-gb are then per rank.
    """
    check_parallel_draft(parallel, draft_model)
    try:
        from ..server.serve import serve as run_server
    except ImportError as e:  # FastAPI or uvicorn missing
        raise Qwen3Error(f"serve needs the serve extra ({e.name} is not installed): "
                         f'pip install "qwen3-mlx[serve]"') from None
    run_server(model, host=host, port=port, served_model_names=served_model_names, api_key=api_key,
               engine_options=engine, thinking_budget=thinking_budget, max_tokens=max_tokens,
               cors_origin=cors_origin, grace=grace, parallel=parallel, ui=not no_ui, draft_model=draft_model,
               num_draft_tokens=num_draft_tokens, metrics=not no_metrics, log_level=log_level,
               secret_key_file=secret_key_file)
