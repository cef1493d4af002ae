"""A grammar for answers that call tools as Qwen3 writes calls (`<tool_call>` JSON `</tool_call>`),
compiled by structured.py like any other grammar."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import OptionError
from .structured import JSON_WHITESPACE, checked_schema, with_whitespace
from .tools import CLOSE, OPEN

# Free text in which the model may not spell <tool_call> with ordinary tokens: a call starts only with the
# real token, where the grammar takes over (the library's parser reads the text, so a spelled-out tag
# would be an unconstrained call).
_FREE_TEXT = f"/(?s:.*)/ & ~/(?s:.*){re.escape(OPEN)}(?s:.*)/"


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], *, choice: str = "required", parallel: bool = True,
                      answer_schema: Mapping[str, Any] | None = None) -> str:
    """A Lark grammar (give it as `grammar=`) for answers that call the tools as Qwen3 writes calls:
    `<tool_call>` newline `{"name": ..., "arguments": ...}` newline `</tool_call>`, the tags being the
    tokenizer's own tokens.

    Args:
        tools: OpenAI's tools ({"type": "function", "function": {"name", "parameters", "strict"}}, or the
            function objects alone), as given to the chat template.
        choice: "required": the answer is tool calls only, each call's arguments valid against its tool's
            parameters. A tool's name: one call of that tool. "auto": free text, then optionally calls; a
            grammar that starts when the model writes <tool_call> (llama.cpp's lazy grammars), checking the
            arguments of tools marked `"strict": true` (the others' are any JSON object).
        parallel: several calls may follow each other (with "required" and "auto"); False allows one.
        answer_schema: with "auto": instead of free text, the answer is either JSON valid against this
            schema or the calls (OpenAI's response_format together with tools).

    Raises:
        OptionError: no tools, an unknown tool name in `choice`, a tool without a name, or a tool's
            parameters llguidance rejects (the message names the tool).
    """
    functions = {i: _function(tool, i) for i, tool in enumerate(tools)}  # by index in tools
    if not functions:
        raise OptionError("tools: a tool-call grammar needs at least one tool, and none were given")
    if answer_schema is not None and choice != "auto":
        raise OptionError(f"tool_choice: {choice!r} forces a tool call, which leaves no room for a JSON answer "
                          "(response_format); use 'auto'")
    names = [f["name"] for f in functions.values()]
    if choice not in ("auto", "required"):
        if choice not in names:
            raise OptionError(f"tool_choice: no tool is named {choice!r}; the tools are {', '.join(map(repr, names))}")
        functions, parallel = {i: f for i, f in functions.items() if f["name"] == choice}, False
    rules = [f"call_{i}: %json {json.dumps(_call_schema(f, i, strict=choice != 'auto' or f.get('strict') is True))}"
             for i, f in functions.items()]
    call = f"call: {OPEN} \"\\n\" ({' | '.join(f'call_{i}' for i in functions)}) \"\\n\" {CLOSE}"
    calls = "calls: call (SEPARATOR call)*" if parallel else "calls: call"
    if choice != "auto":
        start = "start: calls"
    elif answer_schema is None:
        start = "start: TEXT calls?"
    else:
        start = "start: answer | calls"
        rules.append(f"answer: %json {json.dumps(with_whitespace(checked_schema(answer_schema, 'response_format')))}")
    return "\n".join([start, calls, call, *rules, f"SEPARATOR: /{JSON_WHITESPACE}/", f"TEXT: {_FREE_TEXT}", ""])


def _function(tool: Mapping[str, Any], i: int) -> Mapping[str, Any]:
    function = tool.get("function", tool) if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
        raise OptionError(f"tools[{i}]: a tool is {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                          "\"parameters\": {...}}}, and this one has no name")
    return function


def _call_schema(function: Mapping[str, Any], i: int, *, strict: bool) -> dict:
    """The JSON of one call: {"name": the tool's name, "arguments": its parameters (or any object)}."""
    name = function["name"]
    parameters = checked_schema(function.get("parameters") or {"type": "object"}, f"tools[{i}] ({name!r}): parameters")
    arguments = dict(parameters) if strict else {"type": "object"}
    # The parameters' definitions go to the top, where their "#/$defs/..." references point from here.
    hoisted = {key: arguments.pop(key) for key in ("$defs", "definitions") if key in arguments}
    return with_whitespace({"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
                             "required": ["name", "arguments"], "additionalProperties": False, **hoisted})
