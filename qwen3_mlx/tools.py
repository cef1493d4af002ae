"""Qwen3's tool calls, parsed out of the answer's text, whole or as it streams.

Qwen3's template asks for each call as a block in the answer:

    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

There can be several, with text around them. A JSON library parses a complete block; what none does
is say, while a block streams in, how far the arguments object goes (partial-JSON parsers complete
a prefix instead), so a small scanner of strings and braces streams the arguments as they come.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# The start of a block whose arguments can stream: the name first, then "arguments": {
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


@dataclass(frozen=True)
class ToolCall:
    """A complete call: `arguments` is the JSON text of its arguments object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of call number `index` (0-based in the answer), as OpenAI's streaming API sends it:
    the first carries the call's id and name, the next ones fragments of its arguments."""

    index: int
    id: str | None
    name: str | None
    arguments: str


Event = str | ToolCallDelta  # text to show, or a piece of a call


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallParser:
    """The answer's text in, plain text and tool-call deltas out, in order.

    Text that may be the start of `<tool_call>` is held until it is known not to be, and the
    whitespace the template puts around blocks is dropped. Inside a block, the call is announced
    (id and name) once `{"name": "...", "arguments": {` has arrived, and its arguments then stream
    as they come, up to the brace that closes them. A block that turns out not to be a call (its
    JSON does not parse, or has no name or no arguments object) is released whole as text and is
    not in `calls`; if it had been announced, the deltas already sent cannot be taken back, and a
    client sees a call whose arguments do not parse (the whole-answer API, parse_tool_calls, never
    reports one). Arguments given as a JSON string holding an object come whole, at the block's end.
    """

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        self.calls: list[ToolCall] = []
        self._new_id = id_factory
        self._pending = ""  # text outside blocks, not yet released
        self._block: str | None = None  # inside a block: its text so far
        self._after_block = False  # whitespace after a block is dropped
        self._index = 0  # of the next call announced
        self._call: _Streaming | None = None

    def push(self, text: str) -> list[Event]:
        out: list[Event] = []
        if self._block is not None:
            self._block += text
        else:
            self._pending += text
        while True:
            if self._block is not None:
                end = self._block.find(CLOSE)
                if end < 0:
                    self._stream(out)
                    return out
                body, rest = self._block[:end], self._block[end + len(CLOSE):]
                self._end_block(body, out)
                self._pending, self._after_block = rest, True
                continue
            if self._after_block:
                self._pending = self._pending.lstrip()
                if not self._pending:
                    return out
                self._after_block = False
            start = self._pending.find(OPEN)
            if start < 0:
                safe = self._pending[: len(self._pending) - _tag_prefix(self._pending, OPEN)]
                shown = safe.rstrip()  # trailing whitespace waits: a block may follow it
                if shown:
                    out.append(shown)
                self._pending = self._pending[len(shown):]
                return out
            before = self._pending[:start].rstrip()
            if before:
                out.append(before)
            self._block, self._pending = self._pending[start + len(OPEN):], ""

    def finish(self) -> list[Event]:
        """The end of the answer: what was held is released (an unterminated block as text)."""
        out: list[Event] = []
        if self._block is not None:
            out.append(OPEN + self._block)
            self._block = self._call = None
        elif self._pending and not self._after_block:
            out.append(self._pending)
        self._pending = ""
        return out

    def _stream(self, out: list[Event]) -> None:
        """Announce the block's call once its name is known, then send its arguments so far."""
        block = self._block
        if self._call is None:
            head = _HEAD.match(block)
            if head is None:
                return
            name = json.loads(f'"{head.group(1)}"')
            self._call = _Streaming(self._index, self._new_id(), name, head.end())
            self._index += 1
            out.append(ToolCallDelta(self._call.index, self._call.id, name, ""))
        # Not the end of the text, which may be the start of </tool_call>.
        fragment = self._call.scan(block, len(block) - _tag_prefix(block, CLOSE))
        if fragment:
            out.append(ToolCallDelta(self._call.index, None, None, fragment))

    def _end_block(self, body: str, out: list[Event]) -> None:
        call, self._call, self._block = self._call, None, None
        parsed = _parse_call(body)
        if parsed is None:
            out.append(OPEN + body + CLOSE)
            return
        name, arguments = parsed
        if call is not None and call.name == name:
            raw = body[call.start : json.JSONDecoder().raw_decode(body, call.start)[1]]
            if raw.startswith(call.sent):  # the rest of what streamed
                if raw != call.sent:
                    out.append(ToolCallDelta(call.index, None, None, raw[len(call.sent):]))
                self.calls.append(ToolCall(call.id, name, raw))
                return
        index, call_id = (call.index, call.id) if call is not None else (self._index, self._new_id())
        if call is None:
            self._index += 1
        out.append(ToolCallDelta(index, call_id, name if call is None else None, arguments))
        self.calls.append(ToolCall(call_id, name, arguments))


@dataclass
class _Streaming:
    """A call being streamed: its arguments object begins at `start` in the block's text; `sent` of
    it has gone out. A scanner of strings and braces finds where it ends."""

    index: int
    id: str
    name: str
    start: int
    sent: str = ""
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    closed: bool = False

    def scan(self, block: str, limit: int) -> str:
        """The arguments' text from what was sent up to `limit`, or to their closing brace."""
        at = self.start + len(self.sent)
        end = at
        while end < limit and not self.closed:
            ch = block[end]
            end += 1
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.closed = self.depth == 0
        fragment = block[at:end]
        self.sent += fragment
        return fragment


def _parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a block's body, or None when it is not a call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return obj["name"], json.dumps(arguments, ensure_ascii=False)


def _tag_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse_tool_calls(text: str, id_factory: Callable[[], str] = new_call_id) -> tuple[str, list[ToolCall]]:
    """(the answer's text outside its calls, the calls) of a whole answer, by the same rules as a stream."""
    parser = ToolCallParser(id_factory)
    events = parser.push(text) + parser.finish()
    return "".join(e for e in events if isinstance(e, str)).strip(), parser.calls


def tool_call_openai(call: ToolCall) -> dict:
    """A call as OpenAI's API writes it in a message's tool_calls."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
