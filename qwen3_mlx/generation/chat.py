"""Multi-turn chat that reuses the KV cache across turns.

At each turn the whole conversation is rendered with the checkpoint's template, and only the tokens
past the longest common prefix of what the cache holds and the new prompt are computed. Qwen3's
template drops earlier reasoning from the history, so the cache is trimmed back to where the last
answer's <think> block began and the answer is read again without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from ..errors import OptionError, Qwen3Error
from ..model.cache import KVCache
from ..model.model import Model
from ..text.prompt import Prompt, thinking_requested
from ..text.tokenizer import Tokenizer
from .caches import new_cache
from .options import GenerationOptions
from .passes import extend_cache
from .prompt_cache import SavedCache, load_cache, reuse, save_cache
from .response import Chunk, GenerationStats
from .single import stream_generate


class ChatSession:
    """A conversation that a program drives turn by turn; the CLI's `chat` runs one.

    Args:
        options: the GenerationOptions of every turn (options.think is the starting mode;
            options.max_kv_size makes the cache a rotating one).
        system: the system prompt.
        tools: tool definitions (OpenAI's function format), given to the chat template every turn.
        draft_model: a smaller model of the same family that drafts for speculative decoding.
        eager: after an answer that had reasoning, read it again without it at once (see
            prepare_next_turn), so the next message waits only for its own tokens.
        **kwargs: GenerationOptions fields, which override those of `options`.
    """

    def __init__(self, model: Model, tokenizer: Tokenizer, options: GenerationOptions | None = None, *,
                 system: str | None = None, tools: list[dict] | None = None, eager: bool = True,
                 draft_model: Model | None = None, **kwargs: Any) -> None:
        self.model, self.tokenizer, self.eager, self.draft_model = model, tokenizer, eager, draft_model
        self.options = GenerationOptions.of(options, **kwargs)
        self.system, self.tools = system, list(tools) if tools else None
        self.messages: list[dict[str, Any]] = []
        self.cache: list[KVCache] | None = None
        self.cached: list[int] = []  # the tokens whose keys/values the cache holds
        self.last: GenerationStats | None = None  # the figures of the last answer of this conversation
        self.thinking = self.options.think  # the mode now: the latest soft switch wins, as Qwen3 follows it
        self._switch = ""  # a soft switch to append to the next user message

    # -------------------------------------------------------------- settings

    def set_thinking(self, on: bool) -> None:
        """Qwen3's soft switch: the next user message ends with /think or /no_think."""
        self.thinking = on
        self._switch = " /think" if on else " /no_think"

    def set_budget(self, tokens: int | None) -> None:
        """The thinking budget of the next turns; None for no limit."""
        self.options = self.options.replace(thinking_budget=tokens)

    def set_system(self, text: str | None) -> None:
        """The system prompt of the next renders; None or "" for none. The cache is reused up to where it differs."""
        self.system = text or None

    def reset(self) -> None:
        """Start a new conversation: no history, no cache, no figures; thinking back to options.think."""
        self.messages, self.cache, self.cached, self.last = [], None, [], None
        self._switch, self.thinking = "", self.options.think

    # -------------------------------------------------------------- files

    def save(self, path: Path) -> SavedCache:
        """Save the conversation and its cache to a safetensors file.

        Returns:
            what the file holds (with a rotating cache past its window, fewer tokens than were seen).

        Raises:
            Qwen3Error: nothing to save yet, or the file cannot be written.
        """
        if self.cache is None:
            raise Qwen3Error("nothing to save yet; say something first")
        return save_cache(path, self.cache, self.cached, self.model,
                          {"messages": self.messages, "system": self.system})

    def load(self, path: Path) -> None:
        """Continue a conversation saved by save() (with the same model).

        Raises:
            Qwen3Error: no such file, or one made with another model or KV cache quantization.
        """
        self.cache, self.cached, extra = load_cache(path, self.model, self.options.kv_quantization)
        self.messages, self.system, self.last = extra.get("messages", []), extra.get("system"), None

    # -------------------------------------------------------------- turns

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(
            full, tools=self.tools, add_generation_prompt=add_generation_prompt, enable_thinking=self.options.think))

    def send(self, text: str) -> Iterator[Chunk]:
        """Answer a user message; yields the answer's chunks. The history keeps the answer, not the reasoning.

        Raises:
            OptionError: an empty message.
        """
        if not text.strip():
            raise OptionError("empty message; type something, or /quit")
        if "/think" in text or "/no_think" in text:
            self.thinking = thinking_requested(text, True)
        return self._turn(self.messages + [{"role": "user", "content": text + self._switch}])

    def add_tool_result(self, content: str, name: str | None = None) -> None:
        """Add the result of a tool call the last answer asked for (a "tool" message); respond() then
        answers with it, or send() with a user message after it."""
        self.messages.append({"role": "tool", "content": content, **({"name": name} if name else {})})

    def respond(self) -> Iterator[Chunk]:
        """Answer the tool results added since the last answer, without a new user message.

        Raises:
            OptionError: the conversation does not end with a tool result.
        """
        if not self.messages or self.messages[-1]["role"] != "tool":
            raise OptionError("respond() answers tool results: add_tool_result() first, or send() a message")
        return self._turn(list(self.messages))

    def _turn(self, messages: list[dict[str, Any]]) -> Iterator[Chunk]:
        prompt = self.render(messages)
        self._reuse_or_make_cache(prompt)
        answer: list[str] = []
        stats: GenerationStats | None = None
        ended = interrupted = False
        try:
            for chunk in stream_generate(self.model, self.tokenizer, Prompt(prompt, tools=self.tools),
                                         self.options.replace(think=self.thinking), cache=self.cache,
                                         draft_model=self.draft_model):
                stats = chunk.stats
                if chunk.kind == "answer":
                    answer.append(chunk.text)
                yield chunk
            ended = True
        except (KeyboardInterrupt, GeneratorExit):  # Ctrl-C, or the caller closed the stream
            interrupted = True
            raise
        finally:
            self._settle(prompt, stats)
            if ended or interrupted:  # the cache holds the exchange, so the history keeps it, marked when cut short
                if stats is not None and interrupted:
                    stats.finish_reason = "interrupted"
                self.messages = messages + [{"role": "assistant", "content": "".join(answer),
                                             **({"interrupted": True} if interrupted else {})}]
                self._switch, self.last = "", stats
        if self.eager and stats is not None and stats.reasoning_tokens + stats.forced_tokens:
            self.prepare_next_turn()

    def _reuse_or_make_cache(self, prompt: list[int]) -> None:
        if self.cache is not None:
            kept = reuse(self.cache, self.cached, prompt)
            if kept < 0:  # rotated past its window: the kept prefix must be computed again
                self.cache, self.cached = None, []
            else:
                self.cached = self.cached[:kept]
        if self.cache is None:
            self.cache = new_cache(self.model, self.tokenizer, prompt, self.system, self.options)

    def prepare_next_turn(self) -> None:
        """Read the last answer again as the next turn's template will show it (without its reasoning)
        right away, so the next message waits only for its own tokens. Qwen3's template drops the
        reasoning of every answer before the latest user message, so this is work the next turn needs."""
        start = self.tokenizer.token_to_id("<|im_start|>")
        if self.cache is None or start is None:
            return
        # Render with a placeholder next message and keep what comes before that message's turn.
        ids = self.render(self.messages + [{"role": "user", "content": "."}], add_generation_prompt=False)
        ids = ids[: len(ids) - 1 - ids[::-1].index(start)]
        kept = reuse(self.cache, self.cached, ids, prompt=False)
        if kept < 0 or kept == len(ids):
            return
        extend_cache(self.model, self.cache, ids[kept:], self.options.prefill_step_size)
        self.cached = ids

    def _settle(self, prompt: list[int], stats: GenerationStats | None) -> None:
        """Record which tokens the cache holds after a turn ended or was interrupted. Ctrl-C can land
        while a step is being built, with some layers a token ahead: all are brought back to the shortest."""
        tokens = prompt + (stats.token_ids if stats is not None else [])
        held = min([c.offset for c in self.cache] + [len(tokens)])
        if any(c.offset != held for c in self.cache) and not all(c.is_trimmable() for c in self.cache):
            self.cache, self.cached = None, []  # rotated and uneven: compute it again next turn
            return
        for c in self.cache:
            c.trim(c.offset - held)
        self.cached = tokens[:held]
