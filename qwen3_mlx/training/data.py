"""Training data: mlx-lm's JSONL formats read into token ids and the tokens trained on.

A line is one of
    {"messages": [...], "tools": [...]}      chat, tool calls and results included
    {"prompt": "...", "completion": "..."}   a user turn and the assistant's answer
    {"text": "..."}                          plain text, ended with the end-of-sequence token
and a bad one is refused before training starts as `FILE:LINE: what is wrong`.

Thinking-aware: every assistant turn is trained as the chat template renders a conversation that ends at
that turn, so its reasoning (reasoning_content, or <think>...</think> in its content) is kept inside the
turn as Qwen3 writes it, and its context is what the model sees at inference. Qwen3's template drops the
reasoning of turns before the last user message, so such a conversation becomes one sequence per turn whose
rendering is not a prefix of a longer one; a turn without reasoning gets the empty block the template gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import OptionError, Qwen3Error
from ..text.tokenizer import Tokenizer

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Example:
    """One training sequence: token ids, and for each token whether it is a target trained on (the first
    token never is: nothing predicts it)."""

    ids: tuple[int, ...]
    trained: tuple[bool, ...]
    where: str  # FILE:LINE, named when a batch goes wrong

    def __len__(self) -> int:
        return len(self.ids)


def read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(FILE:LINE, the line's JSON value) of each non-blank line. Raises Qwen3Error at a line that is not JSON."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise Qwen3Error(f"{path}: could not be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise Qwen3Error(f"{path}: not UTF-8 text; JSONL data is one JSON object per line") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise Qwen3Error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    return records


def find_splits(data: Path) -> dict[str, Path]:
    """The JSONL files of a data folder (train.jsonl, valid.jsonl, test.jsonl) or one file as train."""
    data = Path(data)
    if data.is_file():
        return {"train": data}
    if not data.is_dir():
        raise Qwen3Error(f"{data}: no such folder or file; give a folder with train.jsonl (valid.jsonl, "
                         f"test.jsonl) or one JSONL file")
    found = {name: data / f"{name}.jsonl" for name in SPLITS if (data / f"{name}.jsonl").is_file()}
    if not found:
        raise Qwen3Error(f"{data}: holds none of train.jsonl, valid.jsonl, test.jsonl")
    return found


def examples(records: Iterable[tuple[str, Any]] | Sequence[dict], tokenizer: Tokenizer,
             mask_prompt: bool = False) -> list[Example]:
    """The examples of parsed lines ((where, value) pairs, or bare dicts numbered from 1), every line
    checked before any is returned.

    Raises:
        Qwen3Error: `WHERE: what is wrong` for the first bad line.
    """
    out = []
    for i, record in enumerate(records, 1):
        where, value = record if isinstance(record, tuple) else (f"example {i}", record)
        try:
            out += line_examples(value, tokenizer, mask_prompt, where)
        except (OptionError, Qwen3Error) as e:
            raise Qwen3Error(f"{where}: {e}") from None
    return out


def line_examples(value: Any, tokenizer: Tokenizer, mask_prompt: bool, where: str) -> list[Example]:
    if not isinstance(value, dict):
        raise Qwen3Error(f"is a {type(value).__name__}; each line is a JSON object: {{\"messages\": [...]}}, "
                         f"{{\"prompt\": ..., \"completion\": ...}} or {{\"text\": ...}}")
    if "messages" in value:
        tools = value.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise Qwen3Error(f"tools is a {type(tools).__name__}; give a list of tool schemas")
        return chat_examples(value["messages"], tools, tokenizer, mask_prompt, where)
    if "prompt" in value or "completion" in value:
        for key in ("prompt", "completion"):
            if not isinstance(value.get(key), str):
                raise Qwen3Error(f"{key}={value.get(key)!r} must be text (a prompt line has prompt and completion)")
        messages = [{"role": "user", "content": value["prompt"]},
                    {"role": "assistant", "content": value["completion"]}]
        return chat_examples(messages, value.get("tools"), tokenizer, mask_prompt, where)
    if "text" in value:
        if not isinstance(value["text"], str) or not value["text"]:
            raise Qwen3Error(f"text={value['text']!r} must be non-empty text")
        if mask_prompt:
            raise Qwen3Error("a text line has no prompt to mask; drop --mask-prompt or give prompt and completion")
        return [text_example(value["text"], tokenizer, where)]
    raise Qwen3Error(f"has none of messages, prompt and completion, text (keys: {', '.join(value) or 'none'}); "
                     f"those are mlx-lm's formats")


def text_example(text: str, tokenizer: Tokenizer, where: str) -> Example:
    ids = tokenizer.encode(text)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # as mlx-lm's TextDataset: the model learns where a text ends
    if len(ids) < 2:
        raise Qwen3Error("text is a single token; nothing to train on")
    return Example(tuple(ids), (False,) + (True,) * (len(ids) - 1), where)


def chat_examples(messages: Any, tools: list | None, tokenizer: Tokenizer, mask_prompt: bool,
                  where: str) -> list[Example]:
    if not isinstance(messages, list) or not messages:
        raise Qwen3Error("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    if not turns:
        raise Qwen3Error("messages has no assistant message to train on")
    sequences: list[tuple[str, list[tuple[int, int]]]] = []
    for i in reversed(turns):
        prompt = tokenizer.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True) if i else ""
        text = tokenizer.apply_chat_template(messages[: i + 1], tools=tools, add_generation_prompt=False)
        if not text.startswith(prompt):
            raise Qwen3Error(f"messages[{i}]: the chat template renders this turn apart from its prompt; "
                             f"it cannot be trained as inference would see it")
        span = (len(prompt), len(text))
        home = next((s for s in sequences if s[0].startswith(text)), None)
        if home is not None:
            home[1].append(span)
        else:
            sequences.append((text, [span]))
    return [_sequence(text, spans, tokenizer, mask_prompt, where) for text, spans in reversed(sequences)]


def _sequence(text: str, spans: list[tuple[int, int]], tokenizer: Tokenizer, mask_prompt: bool,
              where: str) -> Example:
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = tuple(encoding.ids)
    if not mask_prompt:
        return Example(ids, (False,) + (True,) * (len(ids) - 1), where)
    trained = tuple(i > 0 and any(a <= start < b for a, b in spans) for i, (start, _) in enumerate(encoding.offsets))
    return Example(ids, trained, where)


def load_split(source: Path | Sequence[dict] | None, tokenizer: Tokenizer, mask_prompt: bool) -> list[Example]:
    """Examples of a JSONL file, of parsed line objects, or none."""
    if source is None:
        return []
    if isinstance(source, (str, Path)):
        return examples(read_jsonl(Path(source)), tokenizer, mask_prompt)
    return examples(list(source), tokenizer, mask_prompt)
