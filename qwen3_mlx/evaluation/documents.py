"""What perplexity scores: a data file read into texts (plain text, or chat conversations), and a text
made into a document, its token ids with the positions that are scored.

A data file is JSON lines when its first non-empty line is a JSON object (as a --prompts-file is), each
line {"text": "..."} or {"messages": [...]}; anything else is one text, the whole file. A bad line is one
Qwen3Error, "FILE:LINE: the problem; what to do", raised before anything is computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

from ..errors import OptionError, Qwen3Error
from ..text.tokenizer import Tokenizer, checked_messages

Text = Union[str, Sequence[Mapping[str, object]], Sequence[int]]  # raw text, a conversation, or token ids
ASSISTANT_OPENS = "<|im_start|>assistant\n"
TURN_ENDS = "<|im_end|>"


@dataclass(frozen=True)
class Document:
    """One text's token ids; scored[i] says whether ids[i] counts (the first id never does: nothing
    predicts it)."""

    ids: list[int]
    scored: list[bool]


def read_texts(path: Path) -> list[Text]:
    """The texts of a data file: the file itself, or one per JSON line (`text`, or chat `messages`).

    Raises:
        Qwen3Error: the file cannot be read, holds no text, or a line is bad ("FILE:LINE: ...").
    """
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise Qwen3Error(f"{path}: {e.strerror if isinstance(e, OSError) else e}") from None
    lines = content.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if not first:
        raise Qwen3Error(f"{path}: no text; give a text file, or JSON lines with a text or messages field")
    if not is_json_object(first):
        return [content]
    texts = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                texts.append(json_line(line))
            except (Qwen3Error, OptionError) as e:
                raise Qwen3Error(f"{path}:{number}: {e}") from None
    return texts


def is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def json_line(line: str) -> Text:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise Qwen3Error(f"not JSON ({e.msg} at column {e.colno}); every line is a JSON object") from None
    if not isinstance(value, dict) or ("text" in value) == ("messages" in value):
        raise Qwen3Error('expected a JSON object with a "text" string or a "messages" list, not both')
    if "text" in value:
        if not isinstance(value["text"], str) or not value["text"]:
            raise Qwen3Error('"text" must be a non-empty string')
        return value["text"]
    messages = checked_messages(value["messages"])
    if not any(m.get("role") == "assistant" for m in messages):
        raise Qwen3Error("the conversation has no assistant turn, and only assistant turns are scored")
    return messages


def make_document(tokenizer: Tokenizer, text: Text) -> Document:
    """A text's ids (or the ids given), every one scored but the first; a conversation's, as the chat
    template writes it,
    with only its assistant turns scored: each from after its "<|im_start|>assistant\\n" to its
    <|im_end|>, included (the reasoning the template keeps, the answer, the end of the turn)."""
    if isinstance(text, str) or all(isinstance(t, int) for t in text):
        ids = tokenizer.encode(text) if isinstance(text, str) else list(text)  # type: ignore[arg-type]
        return Document(ids, [i > 0 for i in range(len(ids))])
    rendered = tokenizer.apply_chat_template(list(text), add_generation_prompt=False)
    spans = assistant_spans(rendered)
    encoding = tokenizer.backend.encode(rendered, add_special_tokens=False)
    # A token counts when it starts inside a turn's span (tokens never cross <|im_start|> or <|im_end|>).
    scored = [i > 0 and any(a <= start < b for a, b in spans) for i, (start, _) in enumerate(encoding.offsets)]
    return Document(list(encoding.ids), scored)


def assistant_spans(rendered: str) -> list[tuple[int, int]]:
    """[start, end) character spans of the assistant turns' content and their <|im_end|>."""
    spans, at = [], 0
    while (opened := rendered.find(ASSISTANT_OPENS, at)) >= 0:
        start = opened + len(ASSISTANT_OPENS)
        closed = rendered.find(TURN_ENDS, start)
        end = len(rendered) if closed < 0 else closed + len(TURN_ENDS)
        spans.append((start, end))
        at = end
    return spans
