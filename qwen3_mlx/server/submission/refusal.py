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


def check_range(param: str, value: float | None, low: float | None = None, high: float | None = None) -> None:
    """A wire API's own bound on a parameter (value None: not given), refused in the words
    GenerationOptions uses for its bounds."""
    if value is None:
        return
    if low is not None and high is not None and not low <= value <= high:
        raise ApiError(400, f"{param} must be in [{low}, {high}], got {value}", param=param)
    if low is not None and high is None and not value >= low:
        raise ApiError(400, f"{param} must be >= {low}, got {value}", param=param)
    if high is not None and low is None and not value <= high:
        raise ApiError(400, f"{param} must be <= {high}, got {value}", param=param)


# pydantic's type errors, told as GenerationOptions tells a value of the wrong type.
_TYPES = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
          "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
          "bool_parsing": "true or false", "string_type": "a string"}


def validation_problem(errors: Sequence[Any]) -> tuple[str, str | None]:
    """The first of pydantic's errors about a body, as (`param: what is wrong`, param); a value of the
    wrong type as `param=value must be an integer` (GenerationOptions' words)."""
    error = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON{f' ({detail})' if detail else ''}", None
    if not loc:
        return "the body must be a JSON object", None
    param = ".".join(loc)
    if error.get("type") in _TYPES:
        return f"{param}={error.get('input')!r} must be {_TYPES[error['type']]}", param
    return f"{param}: {error.get('msg', 'invalid')}", param
