"""The wire format of a request between ranks: its Prompt and GenerationOptions as JSON, which rank 0
broadcasts and the other ranks read back."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import OptionError
from ..generation.options import GenerationOptions
from ..text.prompt import Prompt

# ---------------------------------------------------------------- requests as data


def request_json(prompt: Prompt, options: GenerationOptions) -> dict:
    """A request (a Prompt and its GenerationOptions) as JSON, for the other ranks: every field of
    both; logit_bias as [id, bias] pairs; a json_schema pydantic class as its schema.

    Raises:
        OptionError: a json_schema that is neither a JSON object nor a pydantic model class.
    """
    fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    schema = fields["json_schema"]
    if isinstance(schema, type):
        fields["json_schema"] = _pydantic_schema(schema)
    elif schema is not None and not isinstance(schema, Mapping):
        raise OptionError(f"json_schema: a JSON object or a pydantic model class, got {type(schema).__name__}")
    if fields["logit_bias"] is not None:
        fields["logit_bias"] = [[int(k), float(v)] for k, v in fields["logit_bias"].items()]
    parts = {f.name: getattr(prompt, f.name) for f in dataclasses.fields(prompt)}
    return _plain({"prompt": parts, "options": fields})


def request_from_json(data: dict) -> tuple[Prompt, GenerationOptions]:
    fields = dict(data["options"])
    if fields["logit_bias"] is not None:
        fields["logit_bias"] = {int(k): v for k, v in fields["logit_bias"]}
    return Prompt(**data["prompt"]), GenerationOptions(**fields)


def _pydantic_schema(model: type) -> dict:
    schema = getattr(model, "model_json_schema", None)
    if schema is None:
        raise OptionError(f"json_schema: {model.__name__} is not a pydantic model class; give a JSON schema object")
    return schema()


def _plain(value: Any) -> Any:
    """Mappings and sequences (a Prompt's messages and tools may be any) as JSON's dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
