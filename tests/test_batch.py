"""Batched generation: every row gives the tokens of the same request alone, whatever shares its batch."""

import asyncio

import mlx.core as mx
import numpy as np
import pytest

from qwen3_mlx import GenerationOptions, generate
from qwen3_mlx.errors import OptionError, Qwen3Error
from qwen3_mlx.generation import scheduler as scheduling
from qwen3_mlx.generation.batch import batch_generate
from qwen3_mlx.generation.caches import new_cache
from qwen3_mlx.generation.engine import Engine, EngineClosed, EngineFull
from qwen3_mlx.generation.options import EngineOptions
from qwen3_mlx.generation.passes import extend_cache
from qwen3_mlx.generation.prefill import extend_caches
from qwen3_mlx.generation.prefix_store import PrefixStore
from qwen3_mlx.generation.job import collect, prepare
from qwen3_mlx.generation.scheduler import Scheduler, Ticket
from qwen3_mlx.model.batch_cache import BatchKVCache, BatchRotatingKVCache
from qwen3_mlx.model.cache import KVCache, RotatingKVCache
from qwen3_mlx.model.kv_quant import KVQuantization
from qwen3_mlx.text.prompt import Prompt, encode_prompt

PROMPTS = ["Hello", "Tell me a long story about a dragon and a knight who meet at dawn", "Why?", "1 2 3",
           "a b c d e f", "What is 2+2?", "Name three colours.", "ok"]
GREEDY = dict(temp=0, think=False)


def alone(model, tok, prompts, options):
    return [generate(model, tok, p, o) for p, o in zip(prompts, options)]


def eot_bias(tok, value):
    """A bias toward the end of turn that makes the random model end some answers early and not others."""
    return {tok.token_to_id("<|im_end|>"): value}


# ---------------------------------------------------------------- the cache


def test_batch_cache_aligns_rows_on_the_right_and_masks_the_padding():
    def single(n, value):
        c = KVCache()
        c.update_and_fetch(mx.full((1, 1, n, 2), value), mx.full((1, 1, n, 2), -value))
        return c

    batch = BatchKVCache()
    batch.add(single(2, 1.0))
    batch.add(single(4, 2.0))  # longer: the first row is padded in front
    batch.add(single(1, 3.0))
    assert (batch.end, batch.lengths, batch.offset.tolist()) == (4, [2, 4, 1], [2, 4, 1])
    assert batch.keys[:, 0, :, 0].tolist() == [[0, 0, 1, 1], [2, 2, 2, 2], [0, 0, 0, 3]]
    assert batch.make_mask(1)[:, 0, 0].tolist() == [[False, False, True, True, True], [True] * 5,
                                                   [False, False, False, True, True]]
    keys, _ = batch.update_and_fetch(mx.full((3, 1, 1, 2), 9.0), mx.zeros((3, 1, 1, 2)))
    assert keys[:, 0, :, 0].tolist() == [[0, 0, 1, 1, 9], [2, 2, 2, 2, 9], [0, 0, 0, 3, 9]]
    batch.keep([2, 0])  # the longest row leaves: the columns only it used go too
    assert (batch.end, batch.lengths) == (3, [2, 3])
    assert batch.keys[:, 0, :, 0].tolist() == [[0, 3, 9], [1, 1, 9]]
    assert batch.row(1)[0][0, 0, :, 0].tolist() == [1, 1, 9]
    batch.keep([])
    assert (batch.keys, batch.nbytes) == (None, 0)


# ---------------------------------------------------------------- rows equal requests alone


def test_greedy_rows_of_different_lengths_equal_generate(tiny):
    model, tok = tiny
    options = [GenerationOptions(max_tokens=24, logit_bias=eot_bias(tok, 3.5), **GREEDY)] * len(PROMPTS)
    single = alone(model, tok, PROMPTS, options)
    batched = batch_generate(model, tok, PROMPTS, options)
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [(r.reasoning, r.content) for r in batched] == [(r.reasoning, r.content) for r in single]
    # Rows left early at their end of turn and others ran to max_tokens: both were covered.
    assert {r.stats.finish_reason for r in batched} == {"stop", "length"}


def test_rows_join_a_running_batch_as_others_leave(tiny):
    model, tok = tiny
    options = [GenerationOptions(max_tokens=4 + 5 * (i % 3), **GREEDY) for i in range(len(PROMPTS))]
    single = alone(model, tok, PROMPTS, options)
    done = []
    batched = batch_generate(model, tok, PROMPTS, options, engine_options=EngineOptions(max_batch=3),
                             progress=lambda d, t: done.append((d, t)))
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert done == [(i, len(PROMPTS)) for i in range(1, len(PROMPTS) + 1)]


def test_a_stop_string_ends_its_row_only(tiny):
    model, tok = tiny
    free = generate(model, tok, PROMPTS[1], max_tokens=30, **GREEDY).content
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    options = [GenerationOptions(max_tokens=30, **GREEDY), GenerationOptions(max_tokens=30, stop=(stop,), **GREEDY),
               GenerationOptions(max_tokens=30, **GREEDY)]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    single = alone(model, tok, prompts, options)
    batched = batch_generate(model, tok, prompts, options)
    assert [(r.content, r.stats.finish_reason) for r in batched] == [(r.content, r.stats.finish_reason) for r in single]
    assert batched[1].stats.finish_reason == "stop_string" and stop not in batched[1].content


@pytest.mark.filterwarnings("ignore:greedy decoding")
def test_rows_with_a_thinking_budget_are_cut_as_alone_while_the_others_sample(tiny):
    model, tok = tiny
    budgets = [None, 0, 5, 12, 3, 1]  # 1: the cut follows a newcomer's first token, read as it joins
    options = [GenerationOptions(temp=0, thinking_budget=b, max_tokens=8) for b in budgets]
    prompts = PROMPTS[: len(budgets)]
    kwargs = dict(prefill_response="<think>\n")  # the reasoning is open: the random model need not open it
    single = [generate(model, tok, p, o, **kwargs) for p, o in zip(prompts, options)]
    batched = batch_generate(model, tok, prompts, options, **kwargs)
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.stats.budget_exhausted for r in batched] == [False, True, True, True, True, True]
    assert [r.stats.forced_tokens > 0 for r in batched] == [False, True, True, True, True, True]
    assert [r.reasoning for r in batched] == [r.reasoning for r in single]


def test_rows_that_end_at_their_first_token_leave_as_they_join(tiny):
    model, tok = tiny
    options = [GenerationOptions(max_tokens=1 if i % 2 else 6, **GREEDY) for i in range(6)]
    single = alone(model, tok, PROMPTS[:6], options)
    batched = batch_generate(model, tok, PROMPTS[:6], options, engine_options=EngineOptions(max_batch=2))
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [len(r.token_ids) for r in batched[1::2]] == [1, 1, 1]


def test_a_seeded_row_draws_the_same_text_alone_and_among_seven_others(tiny):
    model, tok = tiny
    options = [GenerationOptions(seed=100 + i, temp=0.8, top_p=0.95, max_tokens=16, think=False,
                                 presence_penalty=0.5 if i % 2 else None) for i in range(8)]
    single = alone(model, tok, PROMPTS, options)
    batched = batch_generate(model, tok, PROMPTS, options)
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    # The same request among other rows: its own seed alone decides what it draws.
    shuffled = batch_generate(model, tok, PROMPTS[::-1], options[::-1], engine_options=EngineOptions(max_batch=5))
    assert shuffled[-1].token_ids == batched[0].token_ids


def test_log_probabilities_of_a_row_are_those_of_the_request_alone(tiny):
    model, tok = tiny
    options = GenerationOptions(max_tokens=6, logprobs=3, **GREEDY)
    single = generate(model, tok, PROMPTS[0], options)
    batched = batch_generate(model, tok, PROMPTS[:3], options)[0]
    assert [lp.token for lp in batched.logprobs] == single.token_ids
    for a, b in zip(batched.logprobs, single.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top] and a.top[0][0] == a.token  # greedy: the most likely
    # The first token's, from the model's own logits.
    ids, _ = encode_prompt(tok, Prompt(PROMPTS[0]), think=False)
    logits = model(mx.array([ids]))[0, -1, : tok.vocab_size]
    expected = (logits - mx.logsumexp(logits))[single.token_ids[0]].item()
    assert single.logprobs[0].logprob == pytest.approx(expected, abs=1e-5)


def test_a_batch_refuses_requests_that_differ_in_their_cache_and_a_mismatched_options_list(tiny):
    model, tok = tiny
    with pytest.raises(OptionError) as e:
        batch_generate(model, tok, ["a", "b"], [GenerationOptions(max_kv_size=64), GenerationOptions()])
    assert str(e.value) == "max_kv_size: the batch's, not a request's; give every prompt the same, got 64 and None"
    with pytest.raises(OptionError) as e:
        batch_generate(model, tok, ["a", "b"], [GenerationOptions()])
    assert str(e.value) == "options: 1 given for 2 prompts; give one, or one per prompt"


# ---------------------------------------------------------------- a rotating cache in a batch


def rows_of(seed, n):
    rng = np.random.RandomState(seed)
    return [mx.array(rng.randn(1, 2, n, 4).astype(np.float32)) for _ in range(3)]


@pytest.mark.parametrize("max_size, rows", [
    (8, [(3, 5), (1, 12), (2, 2)]),  # (kept prefix, prompt length): one longer than the window already
    (12, [(4, 30), (0, 3), (6, 9), (2, 1)]),
])
def test_rows_of_a_rotating_batch_attend_as_each_rotating_cache_alone(max_size, rows, monkeypatch):
    monkeypatch.setattr(BatchKVCache, "step", 4)  # buffers full every few steps: packed often
    singles, batch = [], BatchRotatingKVCache(max_size)
    for i, (keep, n) in enumerate(rows):
        single = RotatingKVCache(max_size, keep)
        single.update_and_fetch(*rows_of(i, n)[1:])
        singles.append(single)
        batch.add(single)
    for step in range(40):  # every row through its window several times; the buffers packed as they fill
        q, k, v = (mx.concatenate(x) for x in zip(*(rows_of(100 + 7 * step + i, 1) for i in range(len(rows)))))
        mask = batch.make_mask(1)
        got = mx.fast.scaled_dot_product_attention(q, *batch.update_and_fetch(k, v), scale=0.5, mask=mask)
        for i, single in enumerate(singles):
            mask = single.make_mask(1)
            want = mx.fast.scaled_dot_product_attention(q[i : i + 1], *single.update_and_fetch(k[i : i + 1], v[i : i + 1]),
                                                        scale=0.5, mask=mask)
            np.testing.assert_allclose(np.array(got[i : i + 1]), np.array(want), atol=1e-5)
        assert batch.end < max_size + 4
    batch.keep([2, 0])
    assert batch.lengths == [singles[2].offset, singles[0].offset] and batch.keeps == [rows[2][0], rows[0][0]]


SYSTEMS = [None, "You are a terse assistant.", None, "Answer in French, always, whatever the question is.", None]


def test_rotating_rows_equal_the_single_stream_rotating_run_through_a_wrap(tiny, monkeypatch):
    monkeypatch.setattr(BatchKVCache, "step", 16)  # the batch's buffers packed several times
    model, tok = tiny
    never_end = {t: -1e9 for t in tok.eos_token_ids}
    options = [GenerationOptions(max_tokens=70 + 9 * i, max_kv_size=48, logit_bias=never_end, **GREEDY)
               for i in range(5)]
    prompts = [Prompt(p, system=s) for p, s in zip(PROMPTS, SYSTEMS)]
    single = [generate(model, tok, p, o) for p, o in zip(prompts, options)]
    assert all(len(r.token_ids) + r.stats.prompt_tokens > 48 + 30 for r in single)  # every row went round
    batched = batch_generate(model, tok, prompts, options, engine_options=EngineOptions(max_batch=3))
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    with Engine(model, tok, max_kv_size=48) as engine:
        served = [engine.submit(p, o.replace(max_kv_size=None)) for p, o in zip(prompts, options)]
        assert [r.result().token_ids for r in served] == [r.token_ids for r in single]


# ---------------------------------------------------------------- newcomers prefilled together


def run_together(model, tok, requests, monkeypatch, **kwargs):
    """Every request submitted before the first round, as clients arriving together, to a Scheduler
    made with `kwargs`: the results, and (rows, length) of each pass that computed several prompts at once."""
    passes = []

    def counted(model, caches, chunks):
        passes.append((len(chunks), max(len(c) for c in chunks)))
        extend_caches(model, caches, chunks)

    monkeypatch.setattr(scheduling, "extend_caches", counted)
    scheduler = Scheduler(model, tok, **kwargs)
    chunks = [[] for _ in requests]
    for i, (prompt, options) in enumerate(requests):
        job = prepare(model, tok, prompt, options, rotating=scheduler.max_kv_size is not None)
        scheduler.submit(Ticket(job, lambda chunk, last, i=i: chunks[i].append(chunk)))
    while scheduler.busy:
        scheduler.run_once()
    return [collect(iter(c)) for c in chunks], passes


@pytest.mark.filterwarnings("ignore:greedy decoding")
def test_eight_newcomers_prefilled_in_one_pass_each_equal_generate(tiny, monkeypatch):
    model, tok = tiny
    conversation = [{"role": "user", "content": PROMPTS[1]}, {"role": "assistant", "content": "Once upon a time"},
                    {"role": "user", "content": "And then?"}]
    store = PrefixStore(10**8)  # holds the conversation's first turn: one newcomer starts from it
    first = encode_prompt(tok, Prompt(conversation[:1]), think=False)[0]
    cache = model.make_cache()
    extend_cache(model, cache, first)
    store.store(first, cache)
    greedy = GenerationOptions(max_tokens=12, logit_bias=eot_bias(tok, 3.5), **GREEDY)
    requests = [(Prompt(PROMPTS[i]), greedy) for i in (0, 2, 3, 7)] + [
        (Prompt(conversation), greedy),
        (Prompt(PROMPTS[4], prefill_response="<think>\n"), GenerationOptions(temp=0, thinking_budget=0, max_tokens=8)),
        (Prompt(PROMPTS[5]), greedy.replace(max_tokens=1)),
        (Prompt(PROMPTS[6]), GenerationOptions(seed=7, temp=0.8, max_tokens=10, think=False)),
    ]
    single = [generate(model, tok, p, o) for p, o in requests]
    results, passes = run_together(model, tok, requests, monkeypatch, prefix_store=store)
    assert [r.token_ids for r in results] == [r.token_ids for r in single]
    assert [(r.reasoning, r.content) for r in results] == [(r.reasoning, r.content) for r in single]
    assert [n for n, _ in passes] == [8]  # all eight at once: padded, fewer than the 256 tokens of a round
    # Every prompt shares the template's first tokens with the stored one; the conversation, its whole first turn.
    assert results[4].stats.cached_tokens > 20 and results[5].stats.budget_exhausted


def test_eight_rotating_newcomers_prefilled_together_equal_the_single_stream_run(tiny, monkeypatch):
    model, tok = tiny
    never_end = {t: -1e9 for t in tok.eos_token_ids}
    options = [GenerationOptions(max_tokens=24 + 3 * i, max_kv_size=48, logit_bias=never_end, **GREEDY)
               for i in range(8)]
    prompts = [Prompt(p, system=s) for p, s in zip(PROMPTS, SYSTEMS + SYSTEMS)]
    prompts[2] = Prompt(" ".join(["knight"] * 70), system=SYSTEMS[1])  # longer than the window already
    single = [generate(model, tok, p, o) for p, o in zip(prompts, options)]
    assert sum(len(r.token_ids) + r.stats.prompt_tokens > 48 for r in single) >= 6  # most rows went round
    results, passes = run_together(model, tok, list(zip(prompts, options)), monkeypatch, max_kv_size=48,
                                   prefill_budget=1024)
    assert [r.token_ids for r in results] == [r.token_ids for r in single]
    assert passes[0][0] == 8


@pytest.fixture(scope="module")
def heads_of_32(tmp_path_factory):
    """A tiny checkpoint whose heads of 32 dims take a quantized cache's groups of 32."""
    from checkpoints import make_checkpoint

    from qwen3_mlx.checkpoint.loader import load

    return load(make_checkpoint(tmp_path_factory.mktemp("q32"), tokenizer=True, hidden_size=32, intermediate_size=64,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=32))


@pytest.mark.parametrize("max_kv_size", [None, 40])
def test_eight_quantized_newcomers_prefilled_together_equal_each_request_alone(heads_of_32, monkeypatch, max_kv_size):
    model, tok = heads_of_32
    q = KVQuantization(8, 32, 8)
    options = GenerationOptions(max_tokens=20, kv_bits=8, kv_group_size=32, quantized_kv_start=8,
                                max_kv_size=max_kv_size, logit_bias={t: -1e9 for t in tok.eos_token_ids}, **GREEDY)
    prompts = [Prompt(p, system=s) for p, s in zip(PROMPTS, SYSTEMS + SYSTEMS)]

    def alone(prompt):
        ids = encode_prompt(tok, prompt, think=False)[0]
        return generate(model, tok, prompt, options,
                        cache=new_cache(model, tok, ids, prompt.system, options))

    single = [alone(p) for p in prompts]
    results, passes = run_together(model, tok, [(p, options) for p in prompts], monkeypatch, kv_bits=q.bits,
                                   kv_group_size=q.group_size, quantized_kv_start=q.start,
                                   max_kv_size=max_kv_size, prefill_budget=1024)
    assert [r.token_ids for r in results] == [r.token_ids for r in single]
    assert sum(n for n, _ in passes[:2]) == 8  # in two passes: prompts of a few tokens attend another way (prefill.py)


def test_newcomers_share_a_pass_only_within_the_round_budget(tiny, monkeypatch):
    model, tok = tiny
    options = GenerationOptions(max_tokens=5, **GREEDY)
    single = alone(model, tok, PROMPTS, [options] * len(PROMPTS))
    results, passes = run_together(model, tok, [(Prompt(p), options) for p in PROMPTS], monkeypatch,
                                   prefill_budget=40)
    assert [r.token_ids for r in results] == [r.token_ids for r in single]
    # Prompts of 13 to 27 tokens: two at a time (a third would pass 40 tokens), some alone (not counted).
    assert passes == [(2, 16), (2, 18), (2, 12)]


# ---------------------------------------------------------------- the engine


def test_engine_rows_submitted_while_others_run_equal_generate(tiny):
    model, tok = tiny
    options = [GenerationOptions(max_tokens=10 + i, **GREEDY) for i in range(len(PROMPTS))]
    single = alone(model, tok, PROMPTS, options)
    with Engine(model, tok, max_batch=3, prefix_store_bytes=0) as engine:
        first = [engine.submit(p, o) for p, o in zip(PROMPTS[:2], options[:2])]
        next(iter(first[0]))  # the batch is running
        rest = [engine.submit(p, o) for p, o in zip(PROMPTS[2:], options[2:])]
        results = [r.result() for r in first + rest]
    assert [r.token_ids for r in results] == [r.token_ids for r in single]


def test_engine_streams_to_asyncio_tasks(tiny):
    model, tok = tiny
    single = [generate(model, tok, p, max_tokens=8, **GREEDY) for p in PROMPTS[:4]]

    async def main(engine):
        async def one(i, prompt):
            if i % 2:  # submitted from a worker thread, for this loop (as the server does)
                loop = asyncio.get_running_loop()
                request = await asyncio.to_thread(engine.submit, prompt, max_tokens=8, loop=loop, **GREEDY)
            else:
                request = engine.submit(prompt, max_tokens=8, **GREEDY)
            text = []
            async for chunk in request:
                text.append(chunk.text)
            return "".join(text), chunk.stats.token_ids

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS[:4])))

    with Engine(model, tok) as engine:
        results = asyncio.run(main(engine))
        with pytest.raises(Qwen3Error) as e:  # a worker thread's request without the loop is for `for`
            asyncio.run(anext(aiter(engine.submit(PROMPTS[0], max_tokens=1, **GREEDY))))
        assert str(e.value) == "this request was not submitted from an event loop: read it with `for`"
    assert results == [(r.content, r.token_ids) for r in single]


def test_cancelling_frees_the_row_and_its_memory_and_admits_the_next(tiny):
    model, tok = tiny
    with Engine(model, tok, max_batch=1, prefix_store_bytes=0) as engine:
        long = engine.submit(PROMPTS[1], max_tokens=4000, **GREEDY)
        chunks = iter(long)
        next(chunks)
        waiting = engine.submit(PROMPTS[0], max_tokens=5, **GREEDY)  # no row for it yet
        assert engine.rows == 1 and engine.kv_bytes > 0
        long.cancel()
        rest = list(chunks)
        assert rest[-1].stats.finish_reason == "cancelled" and len(rest[-1].stats.token_ids) < 4000
        assert waiting.result().token_ids == generate(model, tok, PROMPTS[0], max_tokens=5, **GREEDY).token_ids
        assert (engine.rows, engine.kv_bytes) == (0, 0)


def test_a_request_larger_than_the_kv_budget_alone_is_refused_at_once(tiny):
    model, tok = tiny
    assert model.kv_bytes_per_token() == 256  # 2 layers of 1 KV head of 16 dims, keys and values, float32
    with Engine(model, tok, kv_memory=1_000_000) as engine:
        with pytest.raises(Qwen3Error) as e:
            engine.submit("Hello", max_tokens=4000, **GREEDY)
        # 13 prompt tokens and 4000 more, and a growth step of 256: 4269 x 256 bytes
        assert str(e.value) == ("the request needs up to 4013 tokens of KV cache (1.1 MB) but the KV budget is "
                                "1.0 MB; lower max_tokens (or the thinking budget), or raise kv_memory")
        assert engine.submit("Hello", max_tokens=3, **GREEDY).result().stats.finish_reason in ("stop", "length")


def test_the_kv_budget_queues_requests_until_their_worst_case_fits(tiny):
    model, tok = tiny
    options = [GenerationOptions(max_tokens=40, **GREEDY)] * 4
    single = alone(model, tok, PROMPTS[:4], options)
    longest = max(len(encode_prompt(tok, Prompt(p), think=False)[0]) for p in PROMPTS[:4]) + 40
    two_rows = 2 * (longest + 256) * model.kv_bytes_per_token()
    with Engine(model, tok, kv_memory=two_rows, prefix_store_bytes=0) as engine:
        requests = [engine.submit(p, o) for p, o in zip(PROMPTS[:4], options)]
        seen = set()
        for r in requests:
            for _ in r:
                seen.add(engine.rows)
    assert max(seen) == 2
    assert [r.result().token_ids for r in requests] == [r.token_ids for r in single]


def test_a_full_queue_and_a_closed_engine_refuse_requests(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_queue=0)
    with pytest.raises(EngineClosed):
        engine.submit("Hello")
    with engine:
        with pytest.raises(EngineFull) as e:
            engine.submit("Hello", max_tokens=1)
        assert str(e.value) == "0 requests are waiting already; try again later"


def test_prefix_reuse_gives_the_same_tokens_and_computes_only_the_rest(tiny):
    model, tok = tiny
    first = [{"role": "user", "content": PROMPTS[1]}]
    with Engine(model, tok) as engine:
        answer = engine.submit(first, max_tokens=12, **GREEDY).result()
        conversation = first + [{"role": "assistant", "content": answer.content},
                                {"role": "user", "content": "And then?"}]
        again = engine.submit(conversation, max_tokens=12, **GREEDY).result()
    fresh = generate(model, tok, conversation, max_tokens=12, **GREEDY)
    assert again.token_ids == fresh.token_ids
    # Computed before: the first prompt and the answer, as far as the conversation's tokens agree with
    # them: to the second assistant header, as the template drops the (empty) reasoning block of past turns.
    before = encode_prompt(tok, Prompt(first), think=False)[0] + answer.token_ids
    now = encode_prompt(tok, Prompt(conversation), think=False)[0]
    common = next(i for i, (a, b) in enumerate(zip(before, now)) if a != b)
    assert tok.decode(now[:common]).endswith("<|im_start|>assistant\n")
    assert again.stats.cached_tokens == common and again.stats.prompt_tokens == len(now)


def test_a_seed_mlx_cannot_take_is_refused_when_the_options_are_made():
    with pytest.raises(OptionError) as e:
        GenerationOptions(seed=-1)
    assert str(e.value) == "seed must be >= 0, got -1"
    with pytest.raises(OptionError) as e:
        GenerationOptions(seed=2**64)
    assert str(e.value) == f"seed must be below 2**64, got {2**64}"
    assert GenerationOptions(seed=2**64 - 1).seed == 2**64 - 1
