"""The OpenAI-compatible server (`qwen3-mlx serve`): protocol.py holds the request and response
models (pydantic only: importable without FastAPI), params.py makes a request's parameters into a
prompt and generation options, app.py the routes.
"""

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:  # the app needs FastAPI; the protocol models and params do not
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
