"""Quantized KV caches: what attention reads is exactly the dequantized keys (and the full-precision
head); plain, rotating and batched caches alike; quality against the float32 cache; cache files, the
prefix store and batches."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from qwen3_mlx import GenerationOptions, generate
from qwen3_mlx.errors import OptionError, Qwen3Error
from qwen3_mlx.generation.batch import batch_generate
from qwen3_mlx.generation.caches import new_cache
from qwen3_mlx.generation.chat import ChatSession
from qwen3_mlx.generation.engine import Engine
from qwen3_mlx.generation.options import EngineOptions
from qwen3_mlx.generation.prefix_store import PrefixStore
from qwen3_mlx.generation.prompt_cache import load_cache, save_cache
from qwen3_mlx.model import kv_quant
from qwen3_mlx.model.batch_cache import BatchKVCache
from qwen3_mlx.model.cache import KVCache, RotatingKVCache
from qwen3_mlx.model.config import ModelArgs
from qwen3_mlx.model.kv_quant import KVQuantization, Packed
from qwen3_mlx.model.model import Model
from qwen3_mlx.text.prompt import Prompt, encode_prompt

H, D = 2, 32
Q4, Q8_64 = KVQuantization(4, 32), KVQuantization(8, 64)
GREEDY = dict(temp=0, think=False)


def dequantized(x: mx.array, q: KVQuantization) -> mx.array:
    """What a quantized cache's attention reads of x: its quantized values."""
    return mx.dequantize(*mx.quantize(x, q.group_size, q.bits), group_size=q.group_size, bits=q.bits)


def effective(x: mx.array, q: KVQuantization, start: int) -> mx.array:
    """x (1, H, S, D) of positions from `start` dequantized, those before kept as they are."""
    if start >= x.shape[2]:
        return x
    return mx.concatenate([x[..., :start, :], dequantized(x[..., start:, :], q)], axis=2)


def chunk(rng, n):
    return [mx.array(rng.randn(1, H, n, D).astype(np.float32)) for _ in range(3)]


def visible(query, key, keep, window):
    return key <= query and (key < keep or query - key < window)


def sdpa(q, k, v, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)


def attend(q, k, v, mask):
    from qwen3_mlx.model.kv_quant import quantized_attention

    return quantized_attention(q, k, v, D**-0.5, mask)


# ---------------------------------------------------------------- what attention reads


@pytest.mark.parametrize("bits, start", [(8, 0), (4, 0), (8, 5), (4, 3)])
@pytest.mark.parametrize("max_size, keep, chunks", [
    (None, 0, [7, 1, 1, 12, 1, 1]),
    (8, 3, [5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),  # prefill, then decode past the window
    (8, 3, [20, 1, 1, 4, 1, 9, 1]),  # chunks longer than the window
    (16, 6, [3, 30, 2, 1, 40, 1]),
])
def test_a_quantized_cache_attends_as_sdpa_over_its_dequantized_keys(bits, start, max_size, keep, chunks):
    q = KVQuantization(bits, 32, start)
    cache = KVCache(q) if max_size is None else RotatingKVCache(max_size, keep, q)
    head = cache.head_size  # a rotating cache keeps only kept positions in full precision
    window = (max_size or 10**9) - keep
    rng, offset, all_k, all_v = np.random.RandomState(0), 0, [], []
    for n in chunks:
        query, k, v = chunk(rng, n)
        mask = cache.make_mask(n)
        got = attend(query, *cache.update_and_fetch(k, v), mask)
        all_k.append(k)
        all_v.append(v)
        full_k, full_v = (effective(mx.concatenate(x, axis=2), q, head) for x in (all_k, all_v))
        ref_mask = mx.array([[visible(offset + i, j, keep, window) for j in range(offset + n)] for i in range(n)])
        np.testing.assert_allclose(np.array(got), np.array(sdpa(query, full_k, full_v, ref_mask)), atol=2e-5)
        offset += n
    assert cache.offset == offset and (cache.head is None) == (head == 0)


def test_query_blocks_give_the_rows_one_block_gives(monkeypatch):
    cache = KVCache(KVQuantization(8, 32, 4))
    rng = np.random.RandomState(1)
    query, k, v = chunk(rng, 40)
    mask = cache.make_mask(40)
    keys, values = cache.update_and_fetch(k, v)
    whole = attend(query, keys, values, mask)
    monkeypatch.setattr(kv_quant, "SCORES_BYTES", 40 * 4 * H * 3)  # 3 query rows a block
    np.testing.assert_array_equal(np.array(attend(query, keys, values, mask)), np.array(whole))


@pytest.mark.parametrize("start", [0, 6])
def test_rows_of_a_quantized_batch_attend_as_each_row_alone(start):
    q = KVQuantization(8, 32, start)
    rng = np.random.RandomState(2)
    singles, batch = [], BatchKVCache(q)
    for n in (9, 3, 14):  # one row shorter than the head: its next tokens go into the head, one a step
        cache = KVCache(q)
        cache.update_and_fetch(*chunk(rng, n)[1:])
        singles.append(cache)
        batch.add(cache)
    for _ in range(5):
        query, k, v = chunk(rng, 1)
        queries, ks, vs = (mx.concatenate([x] * 3) * mx.array([1.0, 0.5, -1.0])[:, None, None, None]
                           for x in (query, k, v))
        mask = batch.make_mask(1)
        got = attend(queries, *batch.update_and_fetch(ks, vs), mask)
        for i, single in enumerate(singles):
            mask = single.make_mask(1)
            want = attend(queries[i : i + 1], *single.update_and_fetch(ks[i : i + 1], vs[i : i + 1]), mask)
            np.testing.assert_allclose(np.array(got[i : i + 1]), np.array(want), atol=2e-6)
    for i, single in enumerate(singles):
        for a, b in zip(batch.row(i), single.stored()[:2]):
            assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(a, b) if x is not None)
    batch.keep([2])
    assert batch.lengths == [19] and batch.nbytes == singles[2].nbytes - _spare(singles[2])


def _spare(cache):
    """Bytes of a single cache's preallocated, unused slots."""
    unused = KVCache.step - cache.offset
    return sum(a.nbytes // a.shape[2] * unused for x in (cache.keys, cache.values) for a in x[:3])


def test_a_quantized_cache_is_smaller_and_its_head_follows_trims():
    rng = np.random.RandomState(3)
    k, v = chunk(rng, 20)[1:]
    full, q8, q4 = KVCache(), KVCache(KVQuantization(8, 32, 4)), KVCache(Q4)
    for c in (full, q8, q4):
        c.update_and_fetch(k, v)
    # float32 (4 bytes) against 1 byte + a float32 scale and bias per 32 elements, plus 4 float32 positions
    assert q8.nbytes == full.nbytes * (1 + 8 / 32) / 4 + 2 * H * 4 * D * 4
    assert q4.nbytes == full.nbytes * (0.5 + 8 / 32) / 4
    q8.trim(18)
    assert q8.offset == 2 and q8.head[0].shape[2] == 2
    q8.trim(2)
    assert q8.head is None


def test_options_refuse_what_a_quantized_cache_cannot_be():
    for kwargs, message in [
        (dict(kv_bits=3), "kv_bits must be one of 4, 8 (or unset), got 3"),
        (dict(kv_bits=8.0), "kv_bits=8.0 must be an integer"),
        (dict(kv_group_size=16), "kv_group_size must be one of 32, 64, 128, got 16"),
        (dict(quantized_kv_start=-1), "quantized_kv_start must be >= 0, got -1"),
    ]:
        with pytest.raises(OptionError) as e:
            GenerationOptions(**kwargs)
        assert str(e.value) == message
    assert GenerationOptions(kv_bits=4, quantized_kv_start=2).kv_quantization == KVQuantization(4, 64, 2)
    assert GenerationOptions().kv_quantization is None


# ---------------------------------------------------------------- quality against the float32 cache


def random_model(seed=0, outliers=0, **shape):
    """A random float32 Qwen3 whose logits are peaked (weights of std 0.15, norms around 1); `outliers`
    k_proj output rows of every layer scaled 10-30x, as real models' outlier key channels."""
    config = dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=8192,
                  rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, model_type="qwen3")
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict({**config, **shape}))
    model.update(tree_map(lambda p: 1 + 0.2 * mx.random.normal(p.shape) if p.ndim == 1 else
                          0.15 * mx.random.normal(p.shape), model.parameters()))
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        w = layer.self_attn.k_proj.weight
        factor = np.ones(w.shape[0], np.float32)
        factor[rng.choice(w.shape[0], outliers, replace=False)] = rng.uniform(10, 30, outliers)
        layer.self_attn.k_proj.weight = w * mx.array(factor)[:, None]
    return model


def greedy(model, prompt, steps, quantization=None):
    """`steps` greedy tokens, and each step's logits (1, V)."""
    cache = model.make_cache(quantization=quantization)
    logits, tokens, seen = model(prompt, cache)[:, -1], [], []
    for _ in range(steps):
        seen.append(logits)
        tokens.append(logits.argmax(-1).item())
        logits = model(mx.array([tokens[-1:]]), cache)[:, -1]
    return tokens, seen


def quality(model, quantization, teacher, steps):
    """KL(fp32 || quantized) of the next-token distributions, top-1 agreement and max |Δlogit| over the
    last `steps` positions of `teacher` (a prompt and the float32 cache's greedy tokens), the caches fed
    the same tokens."""
    full = model(teacher, model.make_cache())[:, -steps:]
    quantized = model(teacher, model.make_cache(quantization=quantization))[:, -steps:]
    lp, lq = (x - mx.logsumexp(x, axis=-1, keepdims=True) for x in (full, quantized))
    kl = (mx.exp(lp) * (lp - lq)).sum(-1).mean().item()
    top1 = (full.argmax(-1) == quantized.argmax(-1)).mean().item()
    return kl, top1, mx.abs(full - quantized).max().item()


def test_quantized_cache_quality_against_the_float32_cache():
    prompt = mx.random.randint(0, 1024, (1, 256), key=mx.random.key(5))
    figures = {}
    for outliers in (0, 4):
        model = random_model(outliers=outliers)
        teacher = mx.concatenate([prompt, mx.array([greedy(model, prompt, 32)[0][:-1]])], axis=1)
        for bits in (8, 4):
            for start in (0, 64):
                figures[outliers, bits, start] = quality(model, KVQuantization(bits, 64, start), teacher, 32)
    for (outliers, bits, start), (kl, top1, delta) in figures.items():
        if bits == 8:
            assert kl < 1e-3 and top1 >= 0.9 and delta < 0.25, (outliers, start, kl, top1, delta)
        else:
            assert kl < 0.15 and top1 >= 0.5 and delta < 4, (outliers, start, kl, top1, delta)
        if start:  # the first positions in full precision: fewer quantized keys, a closer distribution
            assert kl < figures[outliers, bits, 0][0]
    # Outlier key channels cost 4 bits more than 8; 8 bits stay close to exact either way.
    assert figures[4, 4, 0][0] > figures[0, 4, 0][0] > 10 * figures[4, 8, 0][0]


@pytest.mark.parametrize("seed", [1, 2])
def test_8_bit_greedy_tokens_equal_the_full_cache_until_a_near_tie(seed):
    """A random model's greedy run meets near-ties (top two logits a few hundredths apart) every few
    dozen tokens; 8 bits move the logits by about 0.05, so the runs part at the first near-tie whose
    margin is below that, and never before it."""
    model = random_model(seed=seed)
    prompt = mx.random.randint(0, 1024, (1, 200), key=mx.random.key(6))
    (full, full_logits), (quantized, quantized_logits) = (greedy(model, prompt, 64, q) for q in (None, Q8_64))
    parted = next((i for i, (a, b) in enumerate(zip(full, quantized)) if a != b), None)
    if parted is not None:
        top2 = mx.sort(full_logits[parted][0])[-2:]
        assert (top2[1] - top2[0]).item() < mx.abs(full_logits[parted] - quantized_logits[parted]).max().item() < 0.1
    assert full[:parted] == quantized[:parted]


def test_a_group_size_that_does_not_divide_the_heads_is_refused():
    with pytest.raises(OptionError) as e:
        random_model(head_dim=32).make_cache(quantization=KVQuantization(8, 64))
    assert str(e.value) == "kv_group_size=64 does not divide the model's head_dim=32; choose one of 32"


# ---------------------------------------------------------------- files, prefixes, batches


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny checkpoint with the real tokenizer and heads of 32 dims (group size 32)."""
    from checkpoints import make_checkpoint

    from qwen3_mlx.checkpoint.loader import load

    path = make_checkpoint(tmp_path_factory.mktemp("kvq"), tokenizer=True, hidden_size=32, intermediate_size=64,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    return load(path)


def test_a_cache_file_keeps_its_quantization_and_refuses_another(small, tmp_path):
    model, _ = small
    q = KVQuantization(8, 32, 4)
    cache, ids = model.make_cache(quantization=q), list(range(100, 130))
    model(mx.array([ids]), cache)
    path = tmp_path / "c.safetensors"
    save_cache(path, cache, ids, model)
    loaded, tokens, _ = load_cache(path, model, q)
    assert tokens == ids and isinstance(loaded[0].keys, Packed) and loaded[0].head[0].shape[2] == 4
    probe = mx.array([[5, 6]])
    np.testing.assert_array_equal(np.array(model(probe, loaded)), np.array(model(probe, cache)))
    for other, text in [(None, "the model's dtype (no kv_bits)"),
                        (KVQuantization(4, 32, 4), "kv_bits=4, kv_group_size=32, quantized_kv_start=4")]:
        with pytest.raises(Qwen3Error) as e:
            load_cache(path, model, other)
        assert str(e.value) == (f"{path}: holds a KV cache of kv_bits=8, kv_group_size=32, quantized_kv_start=4, "
                                f"this run's is {text}; give the same --kv-bits, --kv-group-size and "
                                "--quantized-kv-start, or another file")


def test_the_prefix_store_holds_packed_entries_counted_in_packed_bytes(small):
    model, _ = small
    q = KVQuantization(4, 32, 2)
    cache, ids = model.make_cache(quantization=q), list(range(50, 90))
    model(mx.array([ids]), cache)
    store = PrefixStore(10**6)
    store.store(ids, cache)
    packed = sum(c.stored()[0].nbytes + c.stored()[1].nbytes for c in cache)
    assert store.nbytes == packed
    filled, n = store.lookup(ids[:30] + [1, 2], model.make_cache(quantization=q))
    assert n == 30 and filled[0].offset == 30 and filled[0].head[0].shape[2] == 2
    probe = mx.array([[7]])
    short = model.make_cache(quantization=q)
    model(mx.array([ids[:30]]), short)
    np.testing.assert_allclose(np.array(model(probe, filled)), np.array(model(probe, short)), atol=1e-5)
    assert store.evict(0) == packed and (store.nbytes, len(store)) == (0, 0)


PROMPTS = ["Hello", "Tell me a long story about a dragon", "Why?", "1 2 3", "What is 2+2?"]


def alone(model, tok, prompt, options):
    """The request alone, on a cache of the options' quantization."""
    return generate(model, tok, prompt, options, cache=model.make_cache(quantization=options.kv_quantization))


@pytest.mark.parametrize("start", [0, 40])  # 40: every row's head still filling while it decodes
def test_quantized_batch_rows_equal_each_request_alone(small, start):
    model, tok = small
    options = GenerationOptions(max_tokens=12, kv_bits=8, kv_group_size=32, quantized_kv_start=start, **GREEDY)
    single = [alone(model, tok, p, options) for p in PROMPTS]
    batched = batch_generate(model, tok, PROMPTS, options, engine_options=EngineOptions(max_batch=3))
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    with Engine(model, tok, kv_bits=8, kv_group_size=32, quantized_kv_start=start) as engine:
        served = [engine.submit(p, options.replace(kv_bits=None)) for p in PROMPTS]
        assert [r.result().token_ids for r in served] == [r.token_ids for r in single]


def test_quantized_rotating_batch_rows_equal_each_request_alone(small, monkeypatch):
    monkeypatch.setattr(BatchKVCache, "step", 16)  # the batch's buffers packed as rows go round
    model, tok = small
    never_end = {t: -1e9 for t in tok.eos_token_ids}
    options = GenerationOptions(max_tokens=50, max_kv_size=40, kv_bits=8, kv_group_size=32, quantized_kv_start=6,
                                logit_bias=never_end, **GREEDY)
    prompts = [Prompt(p, system=s) for p, s in zip(PROMPTS, [None, "Be brief.", None, "You answer in rhymes.", None])]

    def alone_rotating(prompt):
        ids = encode_prompt(tok, prompt, think=False)[0]
        cache = new_cache(model, tok, ids, prompt.system, options)
        return generate(model, tok, prompt, options, cache=cache)

    single = [alone_rotating(p) for p in prompts]
    batched = batch_generate(model, tok, prompts, options, engine_options=EngineOptions(max_batch=3))
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]


def test_a_batch_refuses_requests_that_differ_in_their_cache(small):
    model, tok = small
    with pytest.raises(OptionError) as e:
        batch_generate(model, tok, ["a", "b"], [GenerationOptions(kv_bits=8, kv_group_size=32), GenerationOptions()])
    assert str(e.value) == ("kv_bits, kv_group_size, quantized_kv_start: the batch's, not a request's; give every "
                            "prompt the same, got "
                            "kv_bits=8, kv_group_size=32, quantized_kv_start=0 and the model's dtype (no kv_bits)")
    with Engine(model, tok, kv_bits=8, kv_group_size=32) as engine:
        with pytest.raises(OptionError) as e:
            engine.submit("a", kv_bits=4, kv_group_size=32)
        assert str(e.value) == ("kv_bits=4, kv_group_size=32, quantized_kv_start=0 is not this batch's cache, "
                                "kv_bits=8, kv_group_size=32, quantized_kv_start=0: set it for the whole batch or "
                                "engine, or leave it unset")


def test_a_quantized_chat_reuses_its_cache_as_a_fresh_run_computes_it(small):
    model, tok = small
    options = GenerationOptions(max_tokens=10, kv_bits=8, kv_group_size=32, quantized_kv_start=8, **GREEDY)
    session = ChatSession(model, tok, options)
    first = "".join(c.text for c in session.send("Hello there") if c.kind == "answer")
    second = session.send("And then?")
    answer = [c for c in second][-1].stats
    conversation = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "And then?"}]
    fresh = alone(model, tok, conversation, options)
    assert answer.token_ids == fresh.token_ids and answer.cached_tokens > 0
