"""The memory ceiling: a request that could never fit is refused with the numbers; the prefix store
gives memory back before a request waits; bounded soaks, of streaming clients (some leaving midway)
against the server and of batch_generate, under a ceiling that lets few rows run at once, where MLX's
peak never passes the limit, every finished answer equals the request alone, none hangs, and memory
returns to its idle level."""

import asyncio
import gc
import json
import random
import threading
import time

import httpx
import mlx.core as mx
import pytest
from server_live import LiveServer

from qwen3_mlx import GenerationOptions, generate
from qwen3_mlx.errors import MemoryLimitError
from qwen3_mlx.generation.batch import batch_generate
from qwen3_mlx.generation.engine import Engine
from qwen3_mlx.generation.memory import MemoryPlan, default_memory_limit, weight_bytes
from qwen3_mlx.generation.options import EngineOptions
from qwen3_mlx.server import ServerSettings, create_app
from qwen3_mlx.text.prompt import Prompt, encode_prompt

GREEDY = dict(temp=0, think=False)
NO_EOT = {151645: -100.0, 151643: -100.0}  # long answers: the end of turn is never drawn


def requests(tok, n, seed=0):
    """n (messages, max_tokens) of prompts of 20 to 250 tokens and answers of 20 to 80."""
    rng = random.Random(seed)
    words = ["sky", "blue", "tell", "me", "why", "the", "sea", "is", "so", "deep", "and", "wide"]
    return [([{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(15, 250)))}],
             rng.randint(20, 80)) for _ in range(n)]


def options(max_tokens):
    return GenerationOptions(max_tokens=max_tokens, max_total_tokens=max_tokens, logit_bias=NO_EOT, **GREEDY)


def limit_for(model, tok, reqs, rows, prefill_budget=256):
    """A ceiling that lets `rows` rows of the longest request run at once, and not one more."""
    plan = MemoryPlan(model, limit=0)
    prompts = [len(encode_prompt(tok, Prompt(m), think=False)[0]) for m, _ in reqs]
    longest = max(p + m for p, (_, m) in zip(prompts, reqs))
    return plan.need(rows, longest, max(prompts), prefill_budget) + 1


class Watch:
    """The most rows an engine decodes at once, sampled from a thread."""

    def __init__(self, engine):
        self.engine, self.most, self._stop = engine, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.most = max(self.most, self.engine.rows)
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def others(model):
    """MLX memory held now by what is not the engine's (other tests' arrays), to be left out of its peak."""
    gc.collect()
    return mx.get_active_memory() - weight_bytes(model)


# ---------------------------------------------------------------- refusals and the prefix store


def test_the_default_ceiling_is_three_quarters_of_the_device():
    recommended = mx.device_info().get("max_recommended_working_set_size") or mx.get_memory_limit()
    assert default_memory_limit() == int(0.75 * recommended)


def test_a_request_that_could_never_fit_alone_is_refused_with_the_numbers(tiny):
    model, tok = tiny
    prompt = len(encode_prompt(tok, Prompt("Hello"), think=False)[0])
    limit = MemoryPlan(model, limit=0).need(1, prompt + 500, prompt, prompt)  # 500 tokens fit, 4000 do not
    with Engine(model, tok, memory_limit=limit) as engine:
        with pytest.raises(MemoryLimitError) as e:
            engine.submit("Hello", max_tokens=4000, **GREEDY)
        message = str(e.value)
        assert message.startswith("the request needs up to ") and " alone (weights 19.5 MB, KV cache of 4013 " in message
        assert message.endswith(f"but the memory limit is {limit / 1e6:.1f} MB; lower max_tokens (or the thinking "
                                "budget), or raise memory_limit")
        assert engine.submit("Hello", max_tokens=500, **GREEDY).result().stats.finish_reason in ("stop", "length")
    with pytest.raises(MemoryLimitError):
        batch_generate(model, tok, ["Hello"], max_tokens=4000, engine_options=EngineOptions(memory_limit=limit),
                       **GREEDY)


def test_the_prefix_store_gives_memory_back_before_a_request_waits(tiny):
    model, tok = tiny
    reqs = requests(tok, 3, seed=1)
    limit = limit_for(model, tok, reqs, rows=1)
    with Engine(model, tok, memory_limit=limit, prefix_store_bytes=10**9) as engine:
        first = engine.submit(reqs[0][0], options(reqs[0][1])).result()
        held = engine.memory()["prefix_store"]
        assert held > 0  # the first prompt and its answer are kept for reuse
        second = engine.submit(reqs[1][0], options(reqs[1][1])).result()
        memory = engine.memory()
    assert first.token_ids == generate(model, tok, reqs[0][0], options(reqs[0][1])).token_ids
    assert second.token_ids == generate(model, tok, reqs[1][0], options(reqs[1][1])).token_ids
    # The store kept what fitted beside one row: never more than the ceiling left it.
    assert memory["prefix_store"] <= limit - MemoryPlan(model, limit=limit).need(1, 0, 0, 1)
    assert set(memory) == {"limit", "active", "peak", "kv", "prefix_store"} and memory["limit"] == limit


def test_newcomers_share_a_pass_only_when_its_activations_fit_the_ceiling(tiny, monkeypatch):
    from qwen3_mlx.generation import scheduler as batch

    model, tok = tiny
    reqs = requests(tok, 2, seed=3)
    prompts = [len(encode_prompt(tok, Prompt(m), think=False)[0]) for m, _ in reqs]
    longest, chunk = max(p + m for p, (_, m) in zip(prompts, reqs)), max(prompts)  # whole, in a budget of 1024
    plan = MemoryPlan(model, limit=0)
    alone_fits, together_fit = (plan.need(2, longest, max(prompts), chunk, n) + 1 for n in (1, 2))
    assert together_fit > alone_fits  # the pass of two counts both rows' activations and padded keys
    single = [generate(model, tok, m, options(n)).token_ids for m, n in reqs]
    seen, extend_caches = [], batch.extend_caches

    def counted(model, caches, chunks):
        seen.append(len(chunks))
        extend_caches(model, caches, chunks)

    monkeypatch.setattr(batch, "extend_caches", counted)
    for limit, passes in [(alone_fits, []), (together_fit, [2])]:  # one after the other; both in one pass
        seen.clear()
        results = batch_generate(model, tok, [m for m, _ in reqs], [options(n) for _, n in reqs],
                                 engine_options=EngineOptions(memory_limit=limit, prefill_budget=1024))
        assert [r.token_ids for r in results] == single and seen == passes


# ---------------------------------------------------------------- the soaks


async def stream(http, url, messages, max_tokens, leave_after):
    """The streamed answer's text; None when the client leaves after `leave_after` chunks."""
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logit_bias": {str(t): b for t, b in NO_EOT.items()},
            "chat_template_kwargs": {"enable_thinking": False}}
    text, seen = [], 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            seen += 1
            if leave_after is not None and seen > leave_after:
                return None  # the connection closes with the block: the server cancels the request
            choices = json.loads(line[6:])["choices"]
            text += [c["delta"].get("content") or "" for c in choices]
    return "".join(text)


def test_streaming_clients_under_a_low_ceiling_never_pass_it(tiny):
    model, tok = tiny
    reqs = requests(tok, 24)
    alone = [generate(model, tok, m, options(n)).content for m, n in reqs]
    limit = limit_for(model, tok, reqs, rows=3)
    leaving = {i for i in range(len(reqs)) if i % 4 == 3}
    with Engine(model, tok, max_batch=8, memory_limit=limit) as engine, \
            LiveServer(create_app(engine, ServerSettings(("tiny",), max_tokens=4096))) as server:
        idle, other = mx.get_active_memory(), others(model)
        mx.reset_peak_memory()

        async def clients():
            async with httpx.AsyncClient(timeout=120) as http:
                return await asyncio.wait_for(asyncio.gather(*(
                    stream(http, server.url, m, n, 3 if i in leaving else None) for i, (m, n) in enumerate(reqs))),
                    timeout=600)

        with Watch(engine) as watch:
            answers = asyncio.run(clients())
            deadline = time.monotonic() + 30  # the cancelled rows leave at the next step
            while engine.rows and time.monotonic() < deadline:
                time.sleep(0.01)
        memory = engine.memory()
        gc.collect()
        settled = mx.get_active_memory() - memory["prefix_store"]
    assert memory["peak"] - other <= limit
    assert [a for i, a in enumerate(answers) if i not in leaving] == [a for i, a in enumerate(alone) if i not in leaving]
    assert all(answers[i] is None for i in leaving)
    assert 2 <= watch.most < 8  # the ceiling (3 rows of the longest), not max_batch, bounded the batch
    assert engine.rows == 0 and memory["kv"] == 0
    assert settled <= idle + 100_000  # back to idle, but for the prefix store's entries


def test_batch_generate_under_a_low_ceiling_never_passes_it(tiny):
    model, tok = tiny
    reqs = requests(tok, 12, seed=2)
    alone = [generate(model, tok, m, options(n)).token_ids for m, n in reqs]
    limit = limit_for(model, tok, reqs, rows=2)
    idle, other = mx.get_active_memory(), others(model)
    mx.reset_peak_memory()
    results = batch_generate(model, tok, [m for m, _ in reqs], [options(n) for _, n in reqs],
                             engine_options=EngineOptions(memory_limit=limit))
    peak = mx.get_peak_memory()
    gc.collect()
    assert peak - other <= limit
    assert [r.token_ids for r in results] == alone
    assert mx.get_active_memory() <= idle + 100_000
