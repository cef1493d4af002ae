"""Cache files and prefix reuse: a KV cache saved with the tokens it holds (chat /save, --prompt-cache),
refused for another model, and trimmed back to the prefix a new prompt shares with it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx

from ..errors import Qwen3Error
from ..files import written_atomically
from ..model.cache import KVCache, restore
from ..model.kv_quant import KVQuantization, Packed, Stored
from ..model.model import Model
from ..text.prompt import Prompt, encode_prompt
from ..text.tokenizer import Tokenizer
from .caches import CacheOptions, new_cache
from .options import GenerationOptions

CACHE_FORMAT = "qwen3-mlx-kv-cache/1"


@dataclass(frozen=True)
class SavedCache:
    """What a cache file holds: `tokens` seen in all, of which the keys and values of `held` (fewer
    when a rotating cache has moved past its window: the kept prefix and the latest tokens)."""

    tokens: int
    held: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reusable(held: Sequence[int], ids: Sequence[int], *, prompt: bool = True) -> int:
    """The one rule of cache reuse: how many of `ids` a cache holding the tokens `held` can keep. It is
    their longest common prefix; for a prompt, never all of it: its last token must run again to give
    the first draw's logits."""
    n = common_prefix(held, ids)
    return min(n, len(ids) - 1) if prompt else n


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
               extra: dict[str, Any] | None = None) -> SavedCache:
    """Write the cache, the tokens it holds and `extra` (e.g. the conversation) to a safetensors file.

    The file is written beside its destination and renamed into place, so a failure leaves no half file.

    Raises:
        Qwen3Error: the folder does not exist or the file cannot be written; the message names the path.
    """
    if cache[0].offset != len(tokens):
        raise Qwen3Error(f"internal: the cache holds {cache[0].offset} tokens, not {len(tokens)}")
    arrays = {"tokens": mx.array(tokens, mx.int32)}
    held = 0
    for i, c in enumerate(cache):
        if c.offset:
            keys, values, positions = c.stored()
            arrays.update(_named(f"layers.{i}.keys", keys) | _named(f"layers.{i}.values", values))
            held = positions.size
    meta = {"format": CACHE_FORMAT, "model": model_fingerprint(model), "offset": str(cache[0].offset),
            "max_size": str(getattr(cache[0], "max_size", "")), "keep": str(getattr(cache[0], "keep", "")),
            "kv": str(cache[0].quantization or ""), "extra": json.dumps(extra or {}, ensure_ascii=False)}
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise Qwen3Error(f"{path}: the folder {folder} does not exist; create it or choose another path")
    try:
        with written_atomically(path, suffix=".safetensors") as tmp:  # MLX adds it to a name without it
            mx.save_safetensors(str(tmp), arrays, metadata=meta)
    except OSError as e:
        raise Qwen3Error(f"{path}: could not write the cache file ({e.strerror or e}); choose another path") from None
    return SavedCache(tokens=len(tokens), held=held)


def load_cache(path: Path, model: Model, quantization: KVQuantization | None = None,
               ) -> tuple[list[KVCache], list[int], dict[str, Any]]:
    """Read a file written by save_cache; refuse one made with another model or quantization, of the
    weights or of the cache (`quantization`: the cache this run asks for; None: the model's dtype).

    Returns:
        (cache, tokens it holds, extra)

    Raises:
        Qwen3Error: no such file, not a cache file, or one made with another model or KV cache quantization.
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
    if meta.get("kv", "") != str(quantization or ""):
        made = meta.get("kv") or KVQuantization.describe(None)
        raise Qwen3Error(f"{path}: holds a KV cache of {made}, this run's is {KVQuantization.describe(quantization)}; "
                         f"give the same --kv-bits, --kv-group-size and --quantized-kv-start, or another file")
    offset, tokens = int(meta["offset"]), arrays["tokens"].tolist()
    max_size = int(meta["max_size"]) if meta["max_size"] else None
    cache = model.make_cache(max_size, int(meta["keep"] or 0), quantization)
    if offset:
        for i, c in enumerate(cache):
            restore(c, _unnamed(arrays, f"layers.{i}.keys"), _unnamed(arrays, f"layers.{i}.values"), offset)
    return cache, tokens, json.loads(meta.get("extra") or "{}")


def _named(name: str, x: Stored) -> dict[str, mx.array]:
    """The arrays of keys or values as a file holds them: `name`, or its packed parts name.data, ..."""
    if not isinstance(x, Packed):
        return {name: x}
    return {f"{name}.{part}": a for part, a in x._asdict().items() if a is not None}


def _unnamed(arrays: dict[str, mx.array], name: str) -> Stored:
    if name in arrays:
        return arrays[name]
    return Packed(*(arrays.get(f"{name}.{part}") for part in Packed._fields))


def reuse(cache: list[KVCache], cached: list[int], ids: list[int], *, prompt: bool = True) -> int:
    """Trim `cache` (holding `cached`) back to what `ids` can reuse of it (reusable(); `prompt`: the
    ids are a prompt, whose last token must run again).

    Returns how many of `ids` the cache still holds, or -1 when it cannot be trimmed
    (a rotating cache past its window) and must be rebuilt.
    """
    keep = reusable(cached, ids, prompt=prompt)
    if keep == len(cached):
        return keep
    if not all(c.is_trimmable() for c in cache):
        return -1
    for c in cache:
        c.trim(c.offset - keep)
    return keep


# ---------------------------------------------------------------- one-shot prompt cache


def open_prompt_cache(path: Path, model: Model, tokenizer: Tokenizer, prompt: list[int],
                      system: str | None, options: CacheOptions) -> list[KVCache]:
    """A cache for `prompt`: the one saved in `path` trimmed to the shared prefix, or a new one.

    Raises:
        Qwen3Error: as load_cache.
    """
    if Path(path).exists():
        cache, cached, _ = load_cache(path, model, options.kv_quantization)
        if reuse(cache, cached, prompt) >= 0:
            return cache
    return new_cache(model, tokenizer, prompt, system, options)


def save_prompt_cache(path: Path, cache: list[KVCache], prompt: list[int], model: Model) -> bool:
    """Save the cache of `prompt` (the response is trimmed off); False when the cache has rotated.

    Raises:
        Qwen3Error: as save_cache.
    """
    if not all(c.is_trimmable() for c in cache):
        return False
    for c in cache:
        c.trim(c.offset - len(prompt))
    save_cache(path, cache, prompt, model)
    return True


@dataclass
class CachedPrompt:
    """One prompt and the cache file it reuses (`generate --prompt-cache`): the prompt encoded to the
    token ids the file's cache is matched against (the template applied, the prefill included), the
    options it runs with (`think` as the template decided), and `cache`: the one saved in `path`
    trimmed to the prefix they share, or a new one (None without a file)."""

    prompt: Prompt  # its content the token ids
    options: GenerationOptions
    path: Path | None
    cache: list[KVCache] | None

    @classmethod
    def open(cls, model: Model, tokenizer: Tokenizer, prompt: Prompt, options: GenerationOptions,
             path: Path | None) -> CachedPrompt:
        """Encode `prompt`, and open `path`'s cache for it (when given).

        Raises:
            Qwen3Error: as encode_prompt and load_cache.
        """
        ids, thinking = encode_prompt(tokenizer, prompt, think=options.think)
        cache = None
        if path is not None:
            cache = open_prompt_cache(path, model, tokenizer, ids, prompt.system, options)
        return cls(Prompt(ids, system=prompt.system), options.replace(think=thinking), path, cache)

    def save(self, model: Model) -> bool:
        """Save the prompt's cache to the file, once the response is done; False when the rotating cache
        has moved past the prompt (nothing is saved). True without a file.

        Raises:
            Qwen3Error: as save_cache.
        """
        if self.path is None or self.cache is None:
            return True
        return save_prompt_cache(self.path, self.cache, list(self.prompt.content), model)
