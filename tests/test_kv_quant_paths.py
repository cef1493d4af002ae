"""Every path that builds a KV cache stores it as kv_bits says (issue 33): a single stream with and without a
cache file, the chat, a batch, the engine, a draft model's own cache (alone and in a batch), the ranks'
paths (a launched rank's watched model, the DistributedEngine), through the Python API and the CLI.

What is asserted is the cache the model was handed: `Spy` wraps the model (as a launched rank's WatchedModel
does, so no loop changes) and records each cache a pass gets, and its bytes before the pass. A quantized
cache's every layer has the quantization and packed keys, and its bytes (beyond the full-precision head
that quantized_kv_start keeps) are at most 0.55x the plain cache's for 8 bits and 0.3x for 4, on bf16
weights with groups of 64 (1 byte + a bf16 scale and bias per 64 elements is 0.53x; 4 bits 0.28x). The CLI
is measured through the same hook: its loader is replaced by one that hands it the spy (`loader.load` is
looked up when called), so what is measured is the cache the command used, and no figure is added to its
output for the test's sake.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import pytest
import torch
from checkpoints import make_checkpoint
from click.testing import CliRunner

from qwen3_mlx import GenerationOptions, generate
from qwen3_mlx.checkpoint import loader
from qwen3_mlx.cli import commands as cli
from qwen3_mlx.distributed.engine import DistributedEngine
from qwen3_mlx.distributed.ranks import ParallelOptions, Ranks
from qwen3_mlx.generation.batch import batch_generate
from qwen3_mlx.generation.chat import ChatSession
from qwen3_mlx.generation.engine import Engine
from qwen3_mlx.generation.options import EngineOptions
from qwen3_mlx.model.kv_quant import KVQuantization, Packed

RATIO = {8: 0.55, 4: 0.3}
START = 16  # positions quantized_kv_start keeps in full precision, where a case asks for them
PROMPT = "Tell me everything about dragons. " * 40  # ~280 tokens: a cache worth measuring
CASES = [(8, 0), (4, 0), (8, START)]


class Spy:
    """`model`, recording every cache a pass is handed (`caches`, by identity) and the most bytes one
    held when a pass began (`peak`), with its full-precision head apart (`head`)."""

    def __init__(self, model: Any) -> None:
        self._model, self.caches, self.peak, self.head = model, {}, 0, 0

    def _see(self, cache: Sequence[Any] | None) -> None:
        if cache is None:
            return
        self.caches[id(cache)] = cache
        held = sum(c.nbytes for c in cache)
        if held > self.peak:
            self.peak, self.head = held, sum(x.nbytes for c in cache for x in (c.head or ()))

    def __call__(self, inputs: mx.array, cache: Sequence[Any] | None = None) -> mx.array:
        self._see(cache)
        return self._model(inputs, cache)

    def decode(self, ids: mx.array, cache: Sequence[Any]) -> mx.array:
        self._see(cache)
        return self._model.decode(ids, cache)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """bf16 weights, heads of 64 dims (one group of 64), the real tokenizer."""
    path = make_checkpoint(tmp_path_factory.mktemp("kvpaths") / "ckpt", tokenizer=True, dtype=torch.bfloat16,
                           hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=64)
    return path, *loader.load(path)


def options(tok, bits: int | None, start: int = 0, **kw) -> GenerationOptions:
    never_end = {t: -1e9 for t in tok.eos_token_ids}  # every run the same length
    return GenerationOptions(temp=0, think=False, max_tokens=6, kv_bits=bits, kv_group_size=64,
                             quantized_kv_start=start, logit_bias=never_end, **kw)


def check(spy: Spy, plain: Spy, bits: int, start: int) -> None:
    """Every cache the spy saw is quantized as asked; its bytes within the bound, the head counted."""
    q = KVQuantization(bits, 64, start)
    assert spy.caches and plain.peak > 0
    for cache in spy.caches.values():
        assert all(c.quantization == q for c in cache), [c.quantization for c in cache]
        assert all(isinstance(c.keys, Packed) for c in cache if c.keys is not None)
    assert (spy.head > 0) == (start > 0)
    assert spy.peak - spy.head <= RATIO[bits] * plain.peak, (spy.peak, spy.head, plain.peak)


def run_path(path: str, model, tok, opts: GenerationOptions) -> None:
    """One path's run on `model` (a Spy): for a draft, `model` is the draft and the target the plain model."""
    engine_options = EngineOptions(max_batch=2, kv_bits=opts.kv_bits, kv_group_size=64,
                                   quantized_kv_start=opts.quantized_kv_start)
    if path == "single":
        generate(model, tok, PROMPT, opts)
    elif path == "chat":
        session = ChatSession(model, tok, opts)
        for message in (PROMPT, "And then?"):
            list(session.send(message))
    elif path == "batch":
        batch_generate(model, tok, [PROMPT, "Why?"], opts)
    elif path == "engine":
        with Engine(model, tok, engine_options) as engine:
            asked = opts.replace(kv_bits=None)  # the engine's, not a request's
            [r.result() for r in [engine.submit(PROMPT, asked), engine.submit("Why?", asked)]]
    elif path == "draft":
        generate(model._model, tok, PROMPT, opts.replace(num_draft_tokens=3), draft_model=model)
    elif path == "batch draft":
        batch_generate(model._model, tok, [PROMPT, "Why?"], opts.replace(num_draft_tokens=3), draft_model=model)
    elif path == "rank":  # a launched rank generates through Ranks.watched(model) (here a group of one)
        ranks = Ranks(ParallelOptions("tensor"), mx.distributed.init())
        with ranks.steps():
            generate(ranks.watched(model), tok, PROMPT, opts)
    elif path == "distributed engine":
        ranks = Ranks(ParallelOptions("tensor"), mx.distributed.init())
        with DistributedEngine(model, tok, ranks, engine_options) as engine:
            engine.submit(PROMPT, opts.replace(kv_bits=None)).result()


PATHS = ["single", "chat", "batch", "engine", "draft", "batch draft", "rank", "distributed engine"]


@pytest.mark.parametrize("path", PATHS)
def test_every_path_stores_its_cache_as_kv_bits_says(wide, path):
    _, model, tok = wide
    plain = Spy(model)
    run_path(path, plain, tok, options(tok, None))
    for bits, start in CASES:
        spy = Spy(model)
        run_path(path, spy, tok, options(tok, bits, start))
        check(spy, plain, bits, start)


def cli_run(monkeypatch, path, model, tok, *args: str, input: str | None = None) -> Spy:
    spy = Spy(model)
    monkeypatch.setattr(loader, "load", lambda *a, **k: (spy, tok))
    result = CliRunner().invoke(cli.main, [*args, "--model", str(path), "--temp", "0", "-m", "6", "--no-think",
                                           "--kv-group-size", "64"], input=input)
    assert result.exit_code == 0, result.output
    return spy


@pytest.mark.parametrize("command", ["generate", "generate --prompt-cache", "chat"])
def test_the_cli_stores_its_cache_as_kv_bits_says(wide, monkeypatch, tmp_path, command):
    path, model, tok = wide

    def args(bits: int | None, start: int) -> list[str]:
        kv = [] if bits is None else ["--kv-bits", str(bits), "--quantized-kv-start", str(start)]
        if command == "chat":
            return ["chat", *kv]
        cache = ["--prompt-cache", str(tmp_path / f"{bits}-{start}.cache")] if "cache" in command else []
        return ["generate", "-p", PROMPT, *cache, *kv]

    plain = cli_run(monkeypatch, path, model, tok, *args(None, 0), input=PROMPT + "\n")
    for bits, start in CASES:
        check(cli_run(monkeypatch, path, model, tok, *args(bits, start), input=PROMPT + "\n"), plain, bits, start)
