"""The server (`qwen3-mlx serve`): one sub-package per API (openai/, anthropic/, responses/: each its
protocol models, its mapping onto the one Submission and its event stream), the reading they share
(submission/), and the routes (app.py), built by `create_app` from a ServerSettings as `serve` builds it.
"""

from typing import Any

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:  # the app needs FastAPI; the protocol models and the mappings do not
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerSettings":
        from .settings import ServerSettings

        return ServerSettings
    raise AttributeError(name)
