"""What every request meets before and after its route: the Guard (draining, the API key, the body's
size) and the error bodies, in the shape of the API the path belongs to: Anthropic's on /v1/messages,
OpenAI's everywhere else."""

from __future__ import annotations

import hmac
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from ..errors import ContextLengthError, MemoryLimitError, Qwen3Error
from ..generation.engine import EngineClosed, EngineFull
from .anthropic.mapping import anthropic_error, is_anthropic
from .ollama.mapping import is_ollama, ollama_error
from .openai import protocol as p
from .openai.mapping import error_json
from .submission.refusal import ApiError, validation_problem

log = logging.getLogger("qwen3_mlx.server")

RETRY_AFTER_SECONDS = 1  # the Retry-After of a 429 (the queue is full)
ERRORS = {400: p.ErrorResponse, 401: p.ErrorResponse, 404: p.ErrorResponse, 413: p.ErrorResponse,
          429: p.ErrorResponse, 503: p.ErrorResponse}
ERROR_DOCS = {status: {"model": model} for status, model in ERRORS.items()}


def error_body(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, path: str = "") -> str:
    """The JSON of an error: Anthropic's {"type": "error", "error": {"type", "message"}} on its routes
    (its type follows the status), Ollama's {"error": "..."} on /api/*, OpenAI's {"error": {"message",
    "type", "param", "code"}} elsewhere."""
    if is_anthropic(path):
        return anthropic_error(status, message)
    if is_ollama(path):
        return ollama_error(message)
    return error_json(message, type=type, param=param, code=code)


def error(request: Request, status: int, message: str, headers: dict[str, str] | None = None,
          **kwargs: Any) -> Response:
    return Response(error_body(status, message, path=request.url.path, **kwargs), status_code=status,
                    media_type="application/json", headers=headers)


def _validation_message(exc: RequestValidationError, content_type: str) -> tuple[str, str | None]:
    """The first problem, as `param: what is wrong` (submission/refusal.py's validation_problem); a body that is not an
    object because it was not sent as JSON (curl -d sends a form's content type) is told what to send."""
    message, param = validation_problem(exc.errors())
    if message == "the body must be a JSON object" and "json" not in content_type:
        message = ("the body must be JSON, sent with Content-Type: application/json (it came as "
                   f"{content_type or 'no content type'})")
    return message, param


# The library's name for a request parameter, where it differs.
_LIBRARY_NAMES = {"json_schema": "response_format", "temp": "temperature", "max_total_tokens": "max_tokens"}
_PARAMETERS = set(p.ChatCompletionRequest.model_fields) | set(p.CompletionRequest.model_fields)


def _param_of(message: str) -> str | None:
    """The request parameter a library error is about: its messages start with the option's name
    ("logit_bias: token id 999999 is outside ...", "messages[0].content[0] is type 'image_url' ...")."""
    name = re.match(r"[a-z_]+", message)
    param = _LIBRARY_NAMES.get(name.group(), name.group()) if name else None
    return param if param in _PARAMETERS else None


# The tokenizer's words for a template that failed on a conversation (text/tokenizer.py).
_TEMPLATE_FAILED = re.compile(r": (chat template failed|the chat template rejected the conversation): ")


def _prompt_param(request: Request) -> str:
    return {"/v1/completions": "prompt", "/v1/responses": "input"}.get(request.url.path, "messages")


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error(request, exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc, request.headers.get("content-type", ""))
        return error(request, 400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error(request, 404, f"no route {request.method} {request.url.path}; see /docs", code="not_found")
        return error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(EngineFull)
    async def full(request: Request, exc: EngineFull) -> Response:
        return error(request, 429, str(exc), headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                     type="rate_limit_error", code="queue_full")

    @app.exception_handler(EngineClosed)
    async def closed(request: Request, exc: EngineClosed) -> Response:
        return error(request, 503, str(exc), type="server_error", code="shutting_down")

    @app.exception_handler(ContextLengthError)
    async def too_long(request: Request, exc: ContextLengthError) -> Response:
        return error(request, 400, str(exc), param=_prompt_param(request), code="context_length_exceeded")

    @app.exception_handler(MemoryLimitError)
    async def too_large(request: Request, exc: MemoryLimitError) -> Response:
        return error(request, 400, f"{exc} (the KV budget is the server's --kv-memory)", param="max_tokens",
                     code="kv_memory_exceeded")

    @app.exception_handler(Qwen3Error)
    async def bad_request(request: Request, exc: Qwen3Error) -> Response:
        if _TEMPLATE_FAILED.search(str(exc)):  # it names the server's files and the template's internals
            log.warning("a request's conversation failed the chat template: %s", exc)
            param = _prompt_param(request)
            return error(request, 400, f"{param}: the model's chat template cannot render this conversation; check "
                                       "its messages' roles and order", param=param)
        return error(request, 400, str(exc), param=_param_of(str(exc)))

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError) -> Response:
        return error(request, 400, "the body is nested too deeply")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(request, 500, "internal server error (logged on the server)", type="server_error")


# ---------------------------------------------------------------- the API key and the body's size


class Guard:
    """ASGI middleware: while `state.draining`, every request is a 503; a missing or wrong API key on /v1/*
    is a 401 (compared in constant time; `Authorization: Bearer <key>` or Anthropic's `x-api-key: <key>`);
    a body over `max_body_bytes` is a 413, checked before the app reads it. Each answers in the shape of
    the path's API."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, state: Any) -> None:
        self.app, self.max_body_bytes, self.state = app, max_body_bytes, state
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.state.draining:
            return await _refuse(send, path, 503, "the server is shutting down and takes no new requests; send the "
                                                  "request again once it is back", type="server_error",
                                 code="shutting_down")
        guarded = self.key is not None and _keyed(path) and scope["method"] != "OPTIONS"
        if guarded and not self._authorized(scope):
            return await _refuse(send, path, 401, "invalid or missing API key: send Authorization: Bearer <key> "
                                                  "(or x-api-key: <key>)", code="invalid_api_key")
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _refuse(send, path, 413, self._too_large())
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            body.append(message)
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return await _refuse(send, path, 413, self._too_large())
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, scope: dict) -> bool:
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        bearer = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return bearer or hmac.compare_digest(headers.get(b"x-api-key", b"").strip(), self.key)

    def _too_large(self) -> str:
        return f"the request body is over {self.max_body_bytes} bytes"


def _keyed(path: str) -> bool:
    """The paths --api-key guards: the APIs and the metrics (not the page, /health or /docs)."""
    return path.startswith(("/v1/", "/api/")) or path == "/metrics"


async def _refuse(send: Any, path: str, status: int, message: str, code: str | None = None,
                  type: str = "invalid_request_error") -> None:
    body = error_body(status, message, type=type, code=code, path=path).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _replay(messages: list[dict], receive: Any) -> Any:
    """A receive() that gives `messages` first, then the client's (its disconnect)."""
    pending = list(messages)

    async def replay() -> dict:
        return pending.pop(0) if pending else await receive()

    return replay
