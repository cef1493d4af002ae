"""A request the server refuses: ApiError, which names the parameter at fault, and the first of
pydantic's problems with a body told in our words."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ApiError(Exception):
    """An error answered in its route's API's shape (OpenAI's: {"error": {"message", "type", "param", "code"}})."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="unsupported_parameter")


def validation_problem(errors: Sequence[Any]) -> tuple[str, str | None]:
    """The first of pydantic's errors about a body, as (`param: what is wrong`, param)."""
    error = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON{f' ({detail})' if detail else ''}", None
    if not loc:
        return "the body must be a JSON object", None
    param = ".".join(loc)
    return f"{param}: {error.get('msg', 'invalid')}", param
