"""KV caches: exact contents against a brute-force reference, and attention restricted to the kept tokens."""

import mlx.core as mx
import numpy as np
import pytest

from qwen3_mlx.model.cache import KVCache, RotatingKVCache

H, D = 2, 4


def tokens(start, n):
    """Keys/values whose entries encode their position, so contents can be checked exactly."""
    pos = np.arange(start, start + n, dtype=np.float32)
    k = np.broadcast_to(pos[None, None, :, None], (1, H, n, D)) + np.arange(D) * 0.001
    return mx.array(k), mx.array(-k)


def visible(query_pos, key_pos, keep, window):
    """The rotating cache's definition: the kept prefix plus the last `window` positions."""
    return key_pos <= query_pos and (key_pos < keep or query_pos - key_pos < window)


def attention(q, k, v, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5, mask=mask)


@pytest.mark.parametrize("max_size, keep, chunks", [
    (8, 3, [5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),  # prefill, then decode many times the window
    (8, 3, [20, 1, 1, 4, 1, 9, 1]),                       # chunks longer than the window
    (6, 0, [2, 2, 2, 2, 7, 1, 1, 1]),                     # no kept prefix
    (5, 2, [1, 1, 1, 1, 1, 1, 1, 3, 3, 1]),               # keep filled by single tokens
    (16, 4, [3, 30, 2, 1, 40, 1]),
])
def test_rotating_cache_matches_brute_force(max_size, keep, chunks):
    cache, window = RotatingKVCache(max_size, keep), max_size - keep
    all_k, all_v = [], []
    rng = np.random.RandomState(0)
    offset = 0
    for n in chunks:
        k, v = tokens(offset, n)
        q = mx.array(rng.randn(1, H, n, D).astype(np.float32))
        mask = cache.make_mask(n)
        got = attention(q, *cache.update_and_fetch(k, v), mask)
        all_k.append(k)
        all_v.append(v)
        full_k, full_v = mx.concatenate(all_k, axis=2), mx.concatenate(all_v, axis=2)
        ref_mask = mx.array([[visible(offset + i, j, keep, window) for j in range(offset + n)] for i in range(n)])
        want = attention(q, full_k, full_v, ref_mask)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)

        offset += n
        kept = [p for p in range(offset) if p < keep or offset - 1 - p < window]
        stored_k, stored_v, positions = cache.stored()
        assert positions.tolist() == kept
        np.testing.assert_array_equal(np.array(stored_k), np.array(full_k[..., kept, :]))
        np.testing.assert_array_equal(np.array(stored_v), np.array(full_v[..., kept, :]))
        assert cache.keys.shape[2] <= max_size
    assert cache.offset == sum(chunks)


def test_kv_cache_grows_in_steps_and_trims():
    cache = KVCache()
    cache.update_and_fetch(*tokens(0, 3))
    assert cache.keys.shape[2] == KVCache.step
    cache.update_and_fetch(*tokens(3, KVCache.step))
    assert cache.keys.shape[2] == 2 * KVCache.step
    assert cache.trim(10) == 10 and cache.offset == KVCache.step - 7
    cache.update_and_fetch(*tokens(cache.offset, 1))
    k, _, positions = cache.stored()
    assert positions.tolist() == list(range(KVCache.step - 6))
    assert np.array(k)[0, 0, :, 0].tolist() == list(range(KVCache.step - 6))


def test_rotating_cache_is_trimmable_until_it_rotates():
    cache = RotatingKVCache(6, 2)
    cache.update_and_fetch(*tokens(0, 6))
    assert cache.is_trimmable()
    cache.update_and_fetch(*tokens(6, 1))
    assert not cache.is_trimmable()


@pytest.mark.parametrize("prefill, store, back", [(9, 4, 3), (9, 4, 1), (5, 4, 2), (12, 3, 3)])
def test_a_rotating_cache_with_rollback_takes_back_a_store_past_its_window(prefill, store, back):
    """Speculative decoding's drafts rejected after the ring has wrapped (or as it wraps): trimming them
    gives the cache that never stored them, exactly; then trimming twice (the caller's second take-back)."""
    cache, reference = RotatingKVCache(8, 3), RotatingKVCache(8, 3)
    cache.rollback = True
    for c in (cache, reference):
        c.update_and_fetch(*tokens(0, prefill))
    cache.update_and_fetch(*tokens(prefill, store))
    assert cache.is_trimmable() and cache.trim(back) == back
    reference.update_and_fetch(*tokens(prefill, store - back))
    for got, want in zip(cache.stored(), reference.stored()):
        assert np.array(got).tolist() == np.array(want).tolist()
    assert cache.offset == reference.offset == prefill + store - back
    if store - back > 1:
        cache.trim(1)
        assert cache.stored()[2].tolist()[-1] == prefill + store - back - 2


def test_rotating_cache_rejects_a_window_without_room():
    with pytest.raises(ValueError, match=r"max_kv_size=4 must be larger than the kept prefix \(4 tokens\)"):
        RotatingKVCache(4, 4)
