"""The tokenizer: encode/decode, end-of-turn and <think> ids, the chat template, and streaming detokenization."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import tokenizers

from ..errors import OptionError, Qwen3Error
from .template import TemplateRaised, alias_reasoning, plain, template_environment

# The named special tokens transformers hands to every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The roles Qwen3's templates render; a message with another role would vanish from the prompt.
ROLES = ("system", "user", "assistant", "tool")


# ---------------------------------------------------------------- the tokenizer


class Tokenizer:
    """Wraps tokenizers.Tokenizer; knows the end-of-turn ids, the <think> ids and the chat template."""

    eos_token_ids: frozenset[int]
    think_start_id: int | None
    think_end_id: int | None
    vocab_size: int  # ids the tokenizer knows; the model's embedding is larger and ids >= this are never valid
    chat_template: str | None
    generation_config: Mapping[str, Any] | None  # generation_config.json: the checkpoint's sampling defaults

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        template_source: str = "chat template",
        special_tokens: Mapping[str, str] | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ) -> None:
        """Args:
        tokenizer: the parsed tokenizer.json.
        eos_token_ids: ids that end a turn.
        chat_template: Jinja source, or None when the checkpoint has none.
        template_source: the file the template came from, named in errors.
        special_tokens: bos_token, eos_token, ... as strings, passed to the template as transformers does.
        generation_config: the checkpoint's generation_config.json, whose sampling values generation uses as
            the thinking mode's defaults; None when it has none.
        """
        self._tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.chat_template = chat_template
        self.generation_config = generation_config
        self._template_source = template_source
        self._special_tokens = dict(special_tokens or {})
        self._compiled: jinja2.Template | None = None
        self.think_start_id = tokenizer.token_to_id("<think>")
        self.think_end_id = tokenizer.token_to_id("</think>")
        # Added tokens may sit above a gap in the ids, so take the largest id rather than a count.
        added_ids = tokenizer.get_added_tokens_decoder()
        self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=False), max(added_ids, default=-1) + 1)

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        """Load the tokenizer of a Hugging Face checkpoint folder.

        Reads tokenizer.json, and when present tokenizer_config.json, chat_template.jinja (which wins over the
        config's chat_template, as in transformers), generation_config.json (kept whole, and its eos_token_id)
        and config.json (eos_token_id).

        Raises:
            Qwen3Error: tokenizer.json is missing or unreadable, or a JSON file is corrupt.
        """
        path = Path(path)
        tokenizer = _load_tokenizer_json(path / "tokenizer.json")
        tok_config = _read_json_object(path / "tokenizer_config.json")
        special = {key: _token_text(tok_config.get(key)) for key in _SPECIAL_TOKEN_KEYS}
        special = {key: value for key, value in special.items() if value is not None}

        generation_file = path / "generation_config.json"
        generation_config = _read_json_object(generation_file) if generation_file.is_file() else None
        eos = _eos_ids(generation_file, (generation_config or {}).get("eos_token_id"))
        eos |= _eos_ids(path / "config.json", _read_json_object(path / "config.json").get("eos_token_id"))
        if "eos_token" in special and (eos_id := tokenizer.token_to_id(special["eos_token"])) is not None:
            eos.add(eos_id)

        template, source = _pick_template(tok_config.get("chat_template"), path / "tokenizer_config.json")
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            try:
                template, source = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
            except UnicodeDecodeError as e:
                raise Qwen3Error(f"{jinja_file}: not UTF-8 text; re-download it from the original checkpoint") from e
        if template is None:
            source = str(path)
        return cls(tokenizer, eos_token_ids=eos, chat_template=template, template_source=source,
                   special_tokens=special, generation_config=generation_config)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS is added, but special-token strings such as <|im_start|> are recognised."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; an incomplete multi-byte character becomes U+FFFD."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string, or None if the vocabulary lacks it."""
        return self._tokenizer.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        """The id of tokenizer_config.json's eos_token (what a text ends with in training data), or None."""
        token = self._special_tokens.get("eos_token")
        return self._tokenizer.token_to_id(token) if token else None

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The parsed tokenizer.json (what a grammar engine builds its vocabulary from)."""
        return self._tokenizer

    def detokenizer(self) -> StreamDetokenizer:
        """A fresh StreamDetokenizer for one generated sequence."""
        return StreamDetokenizer(self._tokenizer)

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        **extra: Any,
    ) -> str:
        """Render a conversation to prompt text exactly as transformers' apply_chat_template(tokenize=False) does.

        A message's content is text, or OpenAI's list of parts ([{"type": "text", "text": "..."}, ...]), whose
        texts are joined with newlines as vLLM does for Qwen3's templates (which read content as one string).

        Args:
            messages: dicts with role (system, user, assistant or tool), content and optionally
                reasoning_content, tool_calls; an assistant message with tool_calls may have null content.
            tools: JSON schemas of the callable tools.
            add_generation_prompt: end with the header that opens the assistant's turn.
            enable_thinking: False makes Qwen3 templates emit an empty <think></think> block.
            **extra: further variables the template reads.

        Raises:
            OptionError: a malformed message: no role or an unknown one, content that is neither text nor a
                list of text parts; the message names its index.
            Qwen3Error: no template, a template syntax error, a sandbox refusal, or the template failed.
        """
        if self.chat_template is None:
            raise Qwen3Error(f"{self._template_source}: the checkpoint has no chat template (no chat_template.jinja "
                             "and no chat_template in tokenizer_config.json); use --raw to send the prompt as-is")
        if self._compiled is None:
            self._compiled = self._compile()
        # transformers drops None-valued keys and rebuilds the inputs from plain JSON types before rendering.
        chat = [alias_reasoning({k: plain(v) for k, v in m.items()}) for m in checked_messages(messages)]
        variables = {**self._special_tokens, **plain(extra), "enable_thinking": enable_thinking}
        try:
            return self._compiled.render(messages=chat, tools=plain(tools), documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.SecurityError as e:
            raise Qwen3Error(f"{self._template_source}: chat template refused by the sandbox: {_one_line(e)}") from e
        except TemplateRaised as e:
            raise Qwen3Error(f"{self._template_source}: the chat template rejected the conversation: "
                             f"{_one_line(e)}") from e
        except Exception as e:  # the template is untrusted code: any failure is a bad template or bad messages
            raise Qwen3Error(f"{self._template_source}: chat template failed: {type(e).__name__}: "
                             f"{_one_line(e)}") from e

    def _compile(self) -> jinja2.Template:
        try:
            return template_environment().from_string(self.chat_template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise Qwen3Error(f"{self._template_source}: chat template syntax error at line {e.lineno}: "
                             f"{_one_line(e)}") from e


# ---------------------------------------------------------------- messages


def checked_messages(messages: Any) -> list[dict]:
    """The messages with None-valued keys dropped and each content one string; OptionError at the first
    malformed one, which a template would otherwise skip silently or fail on with a Jinja error."""
    if not isinstance(messages, (list, tuple)):
        raise OptionError(f"messages is a {type(messages).__name__}; give a list of "
                          '{"role": ..., "content": ...} objects')
    return [_checked_message(f"messages[{i}]", m) for i, m in enumerate(messages)]


def _checked_message(where: str, message: Any) -> dict:
    if not isinstance(message, Mapping):
        raise OptionError(f"{where} is a {type(message).__name__}; give an object like "
                          '{"role": "user", "content": "..."}')
    message = {k: v for k, v in message.items() if v is not None}
    role = message.get("role")
    if role is None:
        raise OptionError(f"{where} has no 'role'; give it one of {', '.join(ROLES)}")
    if not isinstance(role, str) or role not in ROLES:
        raise OptionError(f"{where}.role={role!r} is not one of {', '.join(ROLES)}")
    content = message.get("content")
    if content is None and role == "assistant" and message.get("tool_calls"):
        content = ""  # OpenAI's null content beside tool calls
    if content is None:
        raise OptionError(f"{where} ({role}) has no 'content'; give it text")
    if isinstance(content, (list, tuple)):
        content = "\n".join(_part_text(f"{where}.content[{j}]", part) for j, part in enumerate(content))
    elif not isinstance(content, str):
        raise OptionError(f"{where}.content={content!r} must be text or a list of "
                          '{"type": "text", "text": ...} parts')
    return {**message, "content": content}


def _part_text(where: str, part: Any) -> str:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind != "text":
        shown = f"type {kind!r}" if isinstance(part, Mapping) else f"a {type(part).__name__}"
        raise OptionError(f"{where} is {shown}; Qwen3 reads text parts only: "
                          '{"type": "text", "text": "..."}')
    if not isinstance(part.get("text"), str):
        raise OptionError(f"{where}.text={part.get('text')!r} must be a string")
    return part["text"]


# ---------------------------------------------------------------- streaming text


class StreamDetokenizer:
    """Turns generated ids into text one id at a time; the pieces join to exactly `decode(all ids)`.

    A piece is released only when its decoded text does not end in U+FFFD, i.e. no multi-byte character is
    cut in half. tokenizers' DecodeStream does the same but cannot release text still held at the end of a
    sequence that never completes its character, hence `flush()` and this small reimplementation.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []  # ids from the prefix offset on; earlier ones are no longer needed
        self._read = 0  # ids[:_read] are already in `text`; decoding from ids[0] keeps decoders' context
        self._text = ""

    @property
    def text(self) -> str:
        """All text released so far."""
        return self._text

    def add(self, token_id: int) -> str:
        """Feed one id; return the newly completed text ("" while a multi-byte character is incomplete)."""
        self._ids.append(token_id)
        prefix = self._tokenizer.decode(self._ids[: self._read], skip_special_tokens=False)
        full = self._tokenizer.decode(self._ids, skip_special_tokens=False)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        return self._release(full[len(prefix):])

    @property
    def holding(self) -> int:
        """How many ids are held back because their character is not complete yet."""
        return len(self._ids) - self._read

    def drop_held(self) -> None:
        """Forget the ids held back (a character not complete yet): their text is never released."""
        self._ids = self._ids[: self._read]

    def flush(self) -> str:
        """Release whatever is held back (as U+FFFD), at the end of a sequence."""
        prefix = self._tokenizer.decode(self._ids[: self._read], skip_special_tokens=False)
        full = self._tokenizer.decode(self._ids, skip_special_tokens=False)
        self._ids, self._read = [], 0
        return self._release(full[len(prefix):])

    def _release(self, piece: str) -> str:
        self._text += piece
        return piece


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


# ---------------------------------------------------------------- reading the checkpoint's files


def _load_tokenizer_json(file: Path) -> tokenizers.Tokenizer:
    if not file.is_file():
        raise Qwen3Error(f"{file}: not found; copy tokenizer.json from the original Hugging Face checkpoint "
                         "into this folder")
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on any parse failure
        _read_json_object(file)  # names a JSON syntax error precisely, if that is the cause
        raise Qwen3Error(f"{file}: tokenizers could not parse it ({_one_line(e)}); re-download it from the "
                         "original checkpoint") from e


def _read_json_object(file: Path) -> dict:
    """The JSON object in `file`, or {} when the file does not exist."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise Qwen3Error(f"{file}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); fix it or "
                         "re-download it from the original checkpoint") from e
    except UnicodeDecodeError as e:
        raise Qwen3Error(f"{file}: not valid JSON (not UTF-8 text); re-download it from the original "
                         "checkpoint") from e
    if not isinstance(data, dict):
        raise Qwen3Error(f"{file}: expected a JSON object, got {type(data).__name__}; re-download it from the "
                         "original checkpoint")
    return data


def _eos_ids(file: Path, value: Any) -> set[int]:
    if value is None:
        return set()
    values = value if isinstance(value, list) else [value]
    if not all(type(v) is int for v in values):
        raise Qwen3Error(f"{file}: eos_token_id must be an int or a list of ints, got {value!r}")
    return set(values)


def _token_text(value: Any) -> str | None:
    # Older configs store special tokens as serialized AddedToken objects: {"content": "<|im_end|>", ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: Any, file: Path) -> tuple[str | None, str]:
    if value is None or isinstance(value, str):
        return value, str(file)
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"], str(file)
    raise Qwen3Error(f"{file}: chat_template must be a string or a list of {{name, template}} with a 'default' "
                     "entry; fix it or add a chat_template.jinja")
