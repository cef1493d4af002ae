"""Multi-turn chat that reuses the KV cache across turns, and cache files (chat /save, --prompt-cache).

At each turn the whole conversation is rendered with the checkpoint's template, and only the tokens
past the longest common prefix of what the cache holds and the new prompt are computed. Qwen3's
template drops earlier reasoning from the history, so the cache is trimmed back to where the last
answer's <think> block began and the answer is read again without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx

from .cache import KVCache, restore
from .errors import OptionError, Qwen3Error
from .generation import (Chunk, GenerationStats, extend_cache, make_prompt_cache, stream_generate,
                         thinking_requested)
from .model import Model
from .tokenizer import Tokenizer

CACHE_FORMAT = "qwen3-mlx-kv-cache/1"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def model_fingerprint(model: Model) -> str:
    """Identifies the weights a cache was computed with: the architecture, the quantization, and a
    few of the weights themselves (another model of the same shape has other norms)."""
    args = asdict(model.args)
    args["quantization"] = dict(model.args.quantization or {})
    h = hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode())
    h.update(memoryview(model.model.norm.weight.astype(mx.float32)))
    h.update(memoryview(model.model.layers[0].input_layernorm.weight.astype(mx.float32)))
    return h.hexdigest()[:32]


def save_cache(path: Path, cache: list[KVCache], tokens: list[int], model: Model,
               extra: dict[str, Any] | None = None) -> None:
    """Write the cache, the tokens it holds and `extra` (e.g. the conversation) to a safetensors file.

    The file is written beside its destination and renamed into place, so a failure leaves no half file.
    """
    if cache[0].offset != len(tokens):
        raise Qwen3Error(f"internal: the cache holds {cache[0].offset} tokens, not {len(tokens)}")
    arrays = {"tokens": mx.array(tokens, mx.int32)}
    for i, c in enumerate(cache):
        if c.offset:
            arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"], _ = c.stored()
    meta = {"format": CACHE_FORMAT, "model": model_fingerprint(model), "offset": str(cache[0].offset),
            "max_size": str(getattr(cache[0], "max_size", "")), "keep": str(getattr(cache[0], "keep", "")),
            "extra": json.dumps(extra or {}, ensure_ascii=False)}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent or ".")
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        raise Qwen3Error(f"{path}: could not write the cache file ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_cache(path: Path, model: Model) -> tuple[list[KVCache], list[int], dict[str, Any]]:
    """Read a file written by save_cache; refuse one made with another model or quantization.

    Returns:
        (cache, tokens it holds, extra)
    """
    path = Path(path)
    if not path.is_file():
        raise Qwen3Error(f"{path}: no such cache file")
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise Qwen3Error(f"{path}: not a readable cache file ({e})") from None
    if meta.get("format") != CACHE_FORMAT:
        raise Qwen3Error(f"{path}: not a qwen3-mlx cache file (format {meta.get('format')!r})")
    if meta.get("model") != model_fingerprint(model):
        raise Qwen3Error(f"{path}: was made with another model or quantization; "
                         f"delete it or pass another file")
    offset, tokens = int(meta["offset"]), arrays["tokens"].tolist()
    cache = (model.make_cache(int(meta["max_size"]), int(meta["keep"])) if meta["max_size"]
             else model.make_cache())
    if offset:
        for i, c in enumerate(cache):
            restore(c, arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"], offset)
    return cache, tokens, json.loads(meta.get("extra") or "{}")


def reuse(cache: list[KVCache], cached: list[int], prompt: list[int]) -> int:
    """Trim `cache` (holding `cached`) back to its longest common prefix with `prompt`.

    Returns how many prompt tokens the cache still holds, or -1 when it cannot be trimmed
    (a rotating cache past its window) and must be rebuilt.
    """
    keep = common_prefix(cached, prompt)
    if keep == len(cached):
        return keep
    if not all(c.is_trimmable() for c in cache):
        return -1
    for c in cache:
        c.trim(c.offset - keep)
    return keep


class ChatSession:
    """A conversation that a program drives turn by turn; the CLI's `chat` runs one.

    Options are those of stream_generate (thinking_budget, max_tokens, temp, ..., max_kv_size).
    """

    def __init__(self, model: Model, tokenizer: Tokenizer, *, system: str | None = None,
                 think: bool = True, eager: bool = True, **options: Any) -> None:
        self.model, self.tokenizer, self.eager = model, tokenizer, eager
        self.system, self.think, self.options = system, think, options
        self.messages: list[dict[str, str]] = []
        self.cache: list[KVCache] | None = None
        self.cached: list[int] = []  # the tokens whose keys/values the cache holds
        self.last: GenerationStats | None = None
        self.thinking = think  # the mode now: the latest soft switch wins, as Qwen3 follows it
        self._switch = ""  # a soft switch to append to the next user message

    # -------------------------------------------------------------- commands

    def set_thinking(self, on: bool) -> None:
        """Qwen3's soft switch: the next user message ends with /think or /no_think."""
        self.thinking = on
        self._switch = " /think" if on else " /no_think"

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def reset(self) -> None:
        self.messages, self.cache, self.cached, self._switch, self.thinking = [], None, [], "", self.think

    def save(self, path: Path) -> None:
        if self.cache is None:
            raise Qwen3Error("nothing to save yet; say something first")
        save_cache(path, self.cache, self.cached, self.model,
                   {"messages": self.messages, "system": self.system})

    def load(self, path: Path) -> None:
        self.cache, self.cached, extra = load_cache(path, self.model)
        self.messages, self.system = extra.get("messages", []), extra.get("system")

    # -------------------------------------------------------------- a turn

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(
            full, add_generation_prompt=add_generation_prompt, enable_thinking=self.think))

    def send(self, text: str) -> Iterator[Chunk]:
        """Answer a user message; yields the answer's chunks. The history keeps the answer, not the reasoning."""
        if not text.strip():
            raise OptionError("empty message; type something, or /quit")
        if "/think" in text or "/no_think" in text:
            self.thinking = thinking_requested(text, True)
        messages = self.messages + [{"role": "user", "content": text + self._switch}]
        prompt = self.render(messages)
        if self.cache is not None:
            kept = reuse(self.cache, self.cached, prompt)
            if kept < 0:  # rotated past its window: the kept prefix must be computed again
                self.cache, self.cached = None, []
            else:
                self.cached = self.cached[:kept]
        if self.cache is None:
            self.cache = make_prompt_cache(self.model, self.tokenizer, prompt, self.system,
                                           self.options.get("max_kv_size"))
        options = {k: v for k, v in self.options.items() if k != "max_kv_size"}
        reasoning, answer = [], []
        stats = None
        try:
            for chunk in stream_generate(self.model, self.tokenizer, prompt, cache=self.cache,
                                         think=self.thinking, **options):
                stats = chunk.stats
                (reasoning if chunk.kind == "reasoning" else answer).append(chunk.text)
                yield chunk
        finally:
            self._settle(prompt, stats)
        self.messages = messages + [{"role": "assistant", "content": "".join(answer)}]
        self._switch = ""
        self.last = stats
        if self.eager and stats is not None and stats.reasoning_tokens + stats.forced_tokens:
            self.prepare_next_turn()

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
        kept = reuse(self.cache, self.cached, ids)
        if kept < 0 or kept == len(ids):
            return
        extend_cache(self.model, self.cache, ids[kept:], self.options.get("prefill_step_size") or 2048)
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


# ---------------------------------------------------------------- one-shot prompt cache


def open_prompt_cache(path: Path, model: Model, tokenizer: Tokenizer, prompt: list[int],
                      system: str | None, max_kv_size: int | None) -> list[KVCache]:
    """A cache for `prompt`: the one saved in `path` trimmed to the shared prefix, or a new one."""
    if Path(path).exists():
        cache, cached, _ = load_cache(path, model)
        if reuse(cache, cached, prompt) >= 0:
            return cache
    return make_prompt_cache(model, tokenizer, prompt, system, max_kv_size)


def save_prompt_cache(path: Path, cache: list[KVCache], prompt: list[int], model: Model) -> bool:
    """Save the cache of `prompt` (the response is trimmed off); False when the cache has rotated."""
    if not all(c.is_trimmable() for c in cache):
        return False
    for c in cache:
        c.trim(c.offset - len(prompt))
    save_cache(path, cache, prompt, model)
    return True
