"""Run the server: load the model, start the engine, serve the app with uvicorn, shut down gracefully.

The first SIGTERM or Ctrl-C stops admitting (new requests get a 503) and lets the running ones finish,
for up to `grace` seconds; a second Ctrl-C, or the end of the grace, cancels what is left. SIGTERM
then exits 0, Ctrl-C raises KeyboardInterrupt (the CLI's exit 130).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import uvicorn

from ..engine import Engine
from ..loader import load
from .app import create_app


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells the engine when a signal asks it to stop."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # Not in the signal handler's thread: close() waits for the engine's thread.
        threading.Thread(target=self.engine.close, kwargs={"cancel": self.force_exit}, daemon=True).start()


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          max_batch: int = 8, kv_memory: int | None = None, prompt_cache_bytes: int = 1 << 30,
          thinking_budget: int | None = None, max_tokens: int = 4096, cors_origin: str | None = None,
          grace: float = 30.0, log_level: str = "info", kv_bits: int | None = None) -> None:
    """Serve `model` (a checkpoint folder or Hub repo id) until a signal; see the module's docstring.

    Raises:
        Qwen3Error: the model cannot be loaded.
        KeyboardInterrupt: after a graceful shutdown on Ctrl-C.
    """
    loaded, tokenizer = load(model)
    engine = Engine(loaded, tokenizer, max_batch=max_batch, kv_memory=kv_memory,
                    prompt_cache_bytes=prompt_cache_bytes, kv_bits=kv_bits).start()
    app = create_app(engine, model_id=model, api_key=api_key, max_tokens_cap=max_tokens,
                     default_thinking_budget=thinking_budget, cors_origin=cors_origin)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=grace, log_level=log_level)
    main = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    previous = signal.signal(signal.SIGTERM, _exit_cleanly) if main else None  # uvicorn re-raises it at the end
    try:
        _Server(config, engine).run()
    finally:
        engine.close(cancel=True)
        if main:
            signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(sig: int, frame: Any) -> None:
    raise SystemExit(0)
