"""Qwen3's tool calls, parsed out of the answer's text, whole or as it streams.

Qwen3's template asks for each call as a block in the answer:

    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

There can be several, with text around them. `json` parses a complete block. What no library does
for us is stream the arguments so that the fragments add up to exactly `json.dumps(arguments)`:
partial-JSON parsers (partial-json-parser, which vLLM uses) complete a prefix into a value, and
re-serialising that value each step gives text that can change behind what was already sent (a
number still being written, a string's escape). So a small writer reads the arguments token by
token and writes each one, once complete, as `json.dumps(..., ensure_ascii=False)` would.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# The start of a block whose arguments can stream: the name first, then "arguments": {
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


@dataclass(frozen=True)
class ToolCall:
    """A complete call: `arguments` is its arguments object, parsed; `arguments_json` its JSON text as
    `json.dumps(arguments, ensure_ascii=False)` writes it, which is what the call's streamed fragments
    add up to (and what OpenAI's and the Responses API's `arguments` string carries)."""

    id: str
    name: str
    arguments: dict
    arguments_json: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arguments_json", json.dumps(self.arguments, ensure_ascii=False))


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of call number `index` (0-based in the answer), as OpenAI's streaming API sends it:
    the first carries the call's id and name (and maybe arguments), the next ones fragments of its
    arguments only (id and name None)."""

    index: int
    id: str | None
    name: str | None
    arguments: str


Event = str | ToolCallDelta  # text to show, or a piece of a call


def new_call_id() -> str:
    """A fresh id as OpenAI writes them: "call_" and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


# ---------------------------------------------------------------- the parser


class ToolCallParser:
    """The answer's text in, plain text and tool-call deltas out, in order.

    Text: what may be the start of `<tool_call>` is held until it is known not to be. Whitespace
    is released only between two pieces of text, so that the whitespace the template puts around
    blocks (and at the answer's ends) never shows: the text events of a stream join into exactly
    the content `parse_tool_calls` gives for the whole answer.

    Streaming rule: a block's call is announced (a delta with its id and name) once
    `{"name": "...", "arguments": {` has arrived; its arguments then stream, each JSON token once it
    is complete and valid, written as `json.dumps` writes it. At `</tool_call>` the whole block is
    parsed; if it is a call whose arguments begin with what streamed, the rest is sent and the call
    joins `calls`. Arguments given as a JSON string holding an object come whole at the block's
    end, in one delta with the id and name.

    A block that is not a call (its JSON does not parse, it has no string name or no arguments
    object, or it repeats a key so that the streamed text is not what `json.dumps` writes), and a
    block still open at `finish()`, is released whole as text, tags included, and is not in
    `calls`. If it had been announced, its deltas cannot be taken back: its index is put in
    `abandoned`, and the next call takes the next index. A server should then treat `calls` as the
    truth: finish with "tool_calls" only when `calls` is not empty, and drop from a whole reply any
    call whose index is in `abandoned`; a streaming client has seen the abandoned call's pieces
    and then the block as content.
    """

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        """Args:
        id_factory: makes each call's id (tests pass a counter).
        """
        self.calls: list[ToolCall] = []
        self.abandoned: list[int] = []  # indices announced whose block was not a call
        self._new_id = id_factory
        self._pending = ""  # text outside blocks, maybe the start of <tool_call>
        self._space = ""  # whitespace held until text follows it
        self._texted = False  # some text was released
        self._block: str | None = None  # inside a block: its text so far
        self._index = 0  # of the next call announced
        self._call: _Call | None = None  # the block's call, once announced

    def push(self, text: str) -> list[Event]:
        """The next piece of the answer: the text and deltas it completes."""
        out: list[Event] = []
        if self._block is None:
            self._pending += text
        else:
            self._block += text
        while True:
            if self._block is None:
                start = self._pending.find(OPEN)
                if start < 0:
                    held = _tag_prefix(self._pending, OPEN)
                    self._text(self._pending[: len(self._pending) - held], out)
                    self._pending = self._pending[len(self._pending) - held :]
                    return out
                self._text(self._pending[:start], out)
                self._block, self._pending = self._pending[start + len(OPEN) :], ""
            end = self._block.find(CLOSE)
            if end < 0:
                # Not the end of the text, which may be the start of </tool_call>.
                self._stream(self._block, len(self._block) - _tag_prefix(self._block, CLOSE), out)
                return out
            body, self._pending, self._block = self._block[:end], self._block[end + len(CLOSE) :], None
            self._stream(body, len(body), out)
            self._end_block(body, out)

    def finish(self, cut: bool = False) -> list[Event]:
        """The end of the answer: what was held is released. An unterminated block is text when the
        model ended the answer there; when a limit `cut` it, it is dropped: the markup of a call that
        never completed is neither a call nor the answer's text."""
        out: list[Event] = []
        if self._block is not None:
            self._abandon()
            if not cut:
                self._text(OPEN + self._block, out)
            self._block = None
        else:
            self._text(self._pending, out)
        self._pending = self._space = ""  # whitespace at the end is dropped
        return out

    def _text(self, text: str, out: list[Event]) -> None:
        """Release text outside calls, holding its trailing whitespace until more text follows."""
        core = text.strip()
        if not core:
            self._space += text
            return
        lead = text[: len(text) - len(text.lstrip())]
        out.append((self._space + lead if self._texted else "") + core)
        self._space = text[len(text.rstrip()) :]
        self._texted = True

    def _stream(self, block: str, limit: int, out: list[Event]) -> None:
        """Announce the block's call once its name is known, then send its arguments up to `limit`."""
        if self._call is None:
            head = _HEAD.match(block, 0, limit)
            if head is None:
                return
            try:
                name = json.loads(f'"{head.group(1)}"')
            except ValueError:  # a bad escape in the name: not a call, as the block's end will find
                return
            self._call = _Call(self._index, self._new_id(), name, _ArgumentWriter(head.end()))
            self._index += 1
            out.append(ToolCallDelta(self._call.index, self._call.id, name, ""))
        fragment = self._call.arguments.read(block, limit)
        if fragment:
            out.append(ToolCallDelta(self._call.index, None, None, fragment))

    def _end_block(self, body: str, out: list[Event]) -> None:
        call, parsed = self._call, _parse_call(body)
        # A block not announced gets its id only once it is known to be a call.
        found = None if parsed is None else ToolCall(self._new_id() if call is None else call.id, *parsed)
        if found is None or (call is not None and (found.name != call.name or
                                                   not found.arguments_json.startswith(call.arguments.sent))):
            self._abandon()
            self._text(OPEN + body + CLOSE, out)
            return
        self._call = None
        if call is None:
            out.append(ToolCallDelta(self._index, found.id, found.name, found.arguments_json))
            self._index += 1
        else:
            rest = found.arguments_json[len(call.arguments.sent) :]
            if rest:
                out.append(ToolCallDelta(call.index, None, None, rest))
        self.calls.append(found)
        self._space = ""  # whitespace before and after a call is the template's

    def _abandon(self) -> None:
        if self._call is not None:
            self.abandoned.append(self._call.index)
        self._call = None


@dataclass
class _Call:
    """The call of the block being read, once announced."""

    index: int
    id: str
    name: str
    arguments: _ArgumentWriter


# ---------------------------------------------------------------- arguments, token by token

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_PLAIN = re.compile(r'[^"\\\x00-\x1f]+')  # string characters json.dumps(ensure_ascii=False) writes as they are
_ESCAPE = re.compile(r'\\(?:(["\\/bfnrt])|u([0-9a-fA-F]{4}))')
_LOW_SURROGATE = re.compile(r"\\u([dD][c-fC-F][0-9a-fA-F]{2})")
_SIMPLE = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class _ArgumentWriter:
    """Reads an arguments object from `start` in a block's text, as it grows, and writes each
    complete token as json.dumps(..., ensure_ascii=False) does (", " and ": " between, strings
    re-escaped, numbers as Python reads and writes them). It stops at the object's closing brace,
    and for good at anything it does not take for valid JSON (NaN, a trailing comma): the block's
    end then decides. `sent` is what it has written."""

    def __init__(self, start: int) -> None:
        self.at = start  # where reading resumes in the block's text
        self.sent = ""
        self.stopped = False
        self._stack: list[str] = []  # the open "{" and "["
        self._state = "value"  # value, value_or_end, key, key_or_end, colon, after, string
        self._key = False  # the string being read is a key

    def read(self, block: str, limit: int) -> str:
        """Read `block` up to `limit`: the text written for what was completed."""
        before = len(self.sent)
        while not self.stopped and self.at < limit and self._step(block, limit):
            if self._state == "after" and not self._stack:
                self.stopped = True  # the arguments' closing brace
        return self.sent[before:]

    def _step(self, block: str, limit: int) -> bool:
        """Read one token; False when it needs more text or is not valid."""
        if self._state == "string":
            return self._string(block, limit)
        ch = block[self.at]
        if ch in " \t\n\r":
            return self._write("", 1)
        state = self._state
        if (state == "value_or_end" and ch == "]") or (state == "key_or_end" and ch == "}") or \
                (state == "after" and self._stack and ch == "]}"[self._stack[-1] == "{"]):
            self._stack.pop()
            return self._write(ch, 1, "after")
        if state in ("value", "value_or_end"):
            return self._value(block, limit, ch)
        if state in ("key", "key_or_end") and ch == '"':
            self._key = True
            return self._write('"', 1, "string")
        if state == "colon" and ch == ":":
            return self._write(": ", 1, "value")
        if state == "after" and ch == ",":
            return self._write(", ", 1, "key" if self._stack[-1] == "{" else "value")
        return self._stop()

    def _value(self, block: str, limit: int, ch: str) -> bool:
        if ch in "{[":
            self._stack.append(ch)
            return self._write(ch, 1, "key_or_end" if ch == "{" else "value_or_end")
        if ch == '"':
            self._key = False
            return self._write('"', 1, "string")
        if ch == "-" or ch.isdigit():
            end = self.at
            while end < limit and block[end] in _NUMBER_CHARS:
                end += 1
            if end == limit:
                return False  # the number may go on
            if not _NUMBER.fullmatch(block, self.at, end):
                return self._stop()
            return self._write(json.dumps(json.loads(block[self.at : end])), end - self.at, "after")
        available = block[self.at : limit]
        for literal in ("true", "false", "null"):
            if available.startswith(literal):
                return self._write(literal, len(literal), "after")
            if literal.startswith(available):
                return False
        return self._stop()

    def _string(self, block: str, limit: int) -> bool:
        plain = _PLAIN.match(block, self.at, limit)
        if plain:
            return self._write(plain.group(), plain.end() - self.at)
        ch = block[self.at]
        if ch == '"':
            return self._write('"', 1, "colon" if self._key else "after")
        if ch != "\\":
            return self._stop()  # a control character, which JSON does not allow raw
        escape = _ESCAPE.match(block, self.at, limit)
        if escape is None:
            return False if limit - self.at < 6 else self._stop()
        if escape.group(1):
            return self._write(json.dumps(_SIMPLE[escape.group(1)])[1:-1], 2)
        code, size = int(escape.group(2), 16), 6
        if 0xD800 <= code <= 0xDBFF:  # json pairs a high surrogate with a low one right after it
            following = block[escape.end() : min(limit, escape.end() + 6)]
            if len(following) < 6 and "\\u".startswith(following[:2]):
                return False
            low = _LOW_SURROGATE.match(block, escape.end(), limit)
            if low:
                code, size = 0x10000 + ((code - 0xD800) << 10) + (int(low.group(1), 16) - 0xDC00), 12
        return self._write(json.dumps(chr(code), ensure_ascii=False)[1:-1], size)

    def _write(self, text: str, consumed: int, state: str | None = None) -> bool:
        self.sent += text
        self.at += consumed
        if state is not None:
            self._state = state
        return True

    def _stop(self) -> bool:
        self.stopped = True
        return False


# ---------------------------------------------------------------- helpers


def _parse_call(body: str) -> tuple[str, dict] | None:
    """(name, arguments object) of a block's body, or None when it is not a call."""
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
    return obj["name"], arguments


def _tag_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse_tool_calls(text: str, id_factory: Callable[[], str] = new_call_id) -> tuple[str, list[ToolCall]]:
    """Split a whole answer into its text and its tool calls, by the same rules as a stream.

    Args:
        text: the answer (after any reasoning).
        id_factory: makes each call's id.

    Returns:
        (the text outside the calls, without the whitespace around blocks and at the ends; the calls).
    """
    parser = ToolCallParser(id_factory)
    events = parser.push(text) + parser.finish()
    return "".join(e for e in events if isinstance(e, str)), parser.calls


def tool_call_openai(call: ToolCall) -> dict:
    """A call as OpenAI's API writes it in a message's tool_calls."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}
