"""The OpenAI-compatible server (`qwen3-mlx serve`): protocol.py holds the request and response
models, params.py makes a request's parameters into generation options, app.py the routes."""

from .app import create_app

__all__ = ["create_app"]
