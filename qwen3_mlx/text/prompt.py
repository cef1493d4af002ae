"""The prompt: a `Prompt` value (what a request asks the model to continue), made into token ids,
Qwen3's thinking mode read from it, the ids checked, and the cache they start (plain, or rotating with
the system turn kept)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import OptionError, Qwen3Error
from .tokenizer import Tokenizer, checked_messages

# What Qwen3's template writes for enable_thinking=False: an empty reasoning block.
EMPTY_THINKING_TEXT = "\n\n</think>\n\n"

Messages = Sequence[Mapping[str, object]]


@dataclass(frozen=True)
class Prompt:
    """What a request asks the model to continue; with GenerationOptions, a whole request.

    content: a user message, a list of chat messages, or token ids (used as they are).
    system: a system prompt (replaces any system message in `content`).
    raw: `content` is the exact text to complete; no chat template.
    tools: tool definitions (OpenAI's function format) given to the chat template.
    prefill_response: the start of the response, which the model continues (not yielded). It is
        reasoning when it starts with <think> or the template has opened the block; otherwise it is
        the answer, after an empty reasoning block (the template's, or one put in), so the model
        answers without reasoning. After raw text or token ids it is appended as it is.
    """

    content: str | Messages | Sequence[int]
    system: str | None = None
    raw: bool = False
    tools: Sequence[Mapping[str, Any]] | None = None
    prefill_response: str | None = None

    @classmethod
    def of(cls, prompt: Prompt | str | Messages | Sequence[int], **parts: Any) -> Prompt:
        """`prompt` as a Prompt, with the parts given (the keyword API: system=, raw=, tools=,
        prefill_response=); a part left None or False keeps the Prompt's own."""
        given = {k: v for k, v in parts.items() if v is not None and v is not False}
        if isinstance(prompt, Prompt):
            return dataclasses.replace(prompt, **given) if given else prompt
        return cls(prompt, **given)


def build_prompt(tokenizer: Tokenizer, prompt: str | Messages, *, system: str | None = None,
                 think: bool = True, raw: bool = False, tools: list[dict] | None = None) -> str:
    """The text the model reads: the chat template applied to `prompt`, or `prompt` itself when raw."""
    if raw:
        if not isinstance(prompt, str):
            raise Qwen3Error("raw mode takes a string prompt, not a list of messages")
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else checked_messages(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, enable_thinking=think)


def encode_prompt(tokenizer: Tokenizer, request: Prompt, think: bool = True) -> tuple[list[int], bool]:
    """(prompt token ids, whether the model is asked to think). Token ids pass through as they are;
    `prefill_response` follows the prompt (see Prompt for the rule)."""
    prompt, system, raw, prefill_response = request.content, request.system, request.raw, request.prefill_response
    tools = list(request.tools) if request.tools else None
    if isinstance(prompt, str) and not prompt.strip():  # one rule, with or without the template (the CLI's too)
        raise Qwen3Error("the prompt is empty; give some text")
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        ids, thinking = list(prompt) + (tokenizer.encode(prefill_response) if prefill_response else []), think
    else:
        if not raw and not isinstance(prompt, str):
            prompt = checked_messages(prompt)  # one line for a malformed message; content lists made text
        thinking = think if raw else thinking_requested(prompt, think)  # type: ignore[arg-type]
        text = build_prompt(tokenizer, prompt, system=system, think=think, raw=raw, tools=tools)  # type: ignore[arg-type]
        if prefill_response and not raw and _needs_closed_reasoning(text, prefill_response):
            prefill_response = "<think>" + EMPTY_THINKING_TEXT + prefill_response
        ids = tokenizer.encode(text + (prefill_response or ""))
    if prefill_response:  # a prefilled answer ends the thinking; a prefill inside the reasoning continues it
        thinking = thinking and starts_in_reasoning(tokenizer, ids)
    return ids, thinking


def _needs_closed_reasoning(text: str, prefill: str) -> bool:
    """Whether `prefill` is an answer that has to follow an (empty) reasoning block: it does not open
    one itself, the template has not opened one (Qwen3-2507 thinking templates end in <think>), nor
    closed one (the non-thinking template ends in an empty block)."""
    opened = text.rfind("<think>") > text.rfind("</think>")
    return not (prefill.startswith("<think>") or opened or text.rstrip().endswith("</think>"))


def thinking_requested(prompt: str | Messages, think: bool) -> bool:
    """Qwen3's mode: enable_thinking, unless the last user turn says /no_think (the soft switch)."""
    if not think:
        return False
    text = prompt if isinstance(prompt, str) else next(
        (str(m.get("content", "")) for m in reversed(prompt) if m.get("role") == "user"), "")
    return text.rfind("/no_think") <= text.rfind("/think")


def check_prompt_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Refuse an empty prompt and ids the model has no embedding for (MLX would read out of bounds).

    Raises:
        Qwen3Error: the prompt is empty.
        OptionError: an id is outside [0, vocab_size); the message names it and its position.
    """
    if not ids:
        raise Qwen3Error("the prompt is empty; give some text")
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise OptionError(f"prompt token {i} is id {t}, outside the model's vocabulary [0, {vocab_size}); "
                              "give ids that the tokenizer makes")


def system_prefix_length(tokenizer: Tokenizer, prompt_ids: Sequence[int], system: str | None) -> int:
    """Tokens of the system turn at the start of the prompt (what a rotating cache keeps); else 4,
    the attention sinks of StreamingLLM."""
    if system is not None:
        head = tokenizer.encode(tokenizer.apply_chat_template(
            [{"role": "system", "content": system}], add_generation_prompt=False))
        if list(prompt_ids[: len(head)]) == head:
            return len(head)
    return min(4, len(prompt_ids))


def starts_in_reasoning(tokenizer: Tokenizer, ids: Sequence[int]) -> bool:
    """A prompt that ends inside an open <think> block (e.g. Qwen3-2507 thinking templates)."""
    start, end = tokenizer.think_start_id, tokenizer.think_end_id
    if start is None or start not in ids:
        return False
    last = len(ids) - 1 - list(reversed(ids)).index(start)
    return end not in ids[last:]
