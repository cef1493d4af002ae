import math
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen3_mlx.errors import OptionError
from qwen3_mlx.checkpoint.sampling_defaults import SamplingParams, default_params, validate
from qwen3_mlx.generation.sampling import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processor,
    make_sampler,
    warp_logits,
)

PROBS = [0.5, 0.25, 0.15, 0.1]
LOGITS = mx.log(mx.array([PROBS]))  # (1, 4)
OFF = dict(top_p=1.0, top_k=0, min_p=0.0)


def probs_of(logits: mx.array) -> np.ndarray:
    return np.array(mx.softmax(logits, axis=-1))[0]


def params(temperature: float = 1.0, **kw) -> SamplingParams:
    return SamplingParams(temperature=temperature, **{**OFF, **kw})


# ---- exact probabilities after each filter ---------------------------------------------------------


@pytest.mark.parametrize(
    "k, expected",
    [
        (1, [1, 0, 0, 0]),
        (2, [2 / 3, 1 / 3, 0, 0]),
        (3, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]),
        (4, PROBS),
        (100, PROBS),  # k beyond the vocabulary keeps everything
    ],
)
def test_top_k_keeps_the_k_most_likely_and_renormalises(k, expected):
    np.testing.assert_allclose(probs_of(apply_top_k(LOGITS, k)), expected, rtol=1e-6, atol=0)


def test_top_k_keeps_every_token_tied_with_the_kth_like_hf():
    tied = mx.log(mx.array([[0.4, 0.2, 0.2, 0.2]]))
    np.testing.assert_allclose(probs_of(apply_top_k(tied, 2)), [0.4, 0.2, 0.2, 0.2], rtol=1e-6)


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.3, [1, 0, 0, 0]),
        (0.7, [2 / 3, 1 / 3, 0, 0]),  # 0.5 + 0.25 = 0.75 >= 0.7
        (0.8, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]),  # 0.75 < 0.8 <= 0.9
        (0.95, PROBS),
        (1e-9, [1, 0, 0, 0]),  # at least one token survives however small p is
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    np.testing.assert_allclose(probs_of(apply_top_p(LOGITS, p)), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "min_p, expected",
    [
        (0.1, PROBS),  # threshold 0.05
        (0.25, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]),  # threshold 0.125
        (0.4, [2 / 3, 1 / 3, 0, 0]),  # threshold 0.2
        (1.0, [1, 0, 0, 0]),
    ],
)
def test_min_p_drops_tokens_below_min_p_times_the_top_probability(min_p, expected):
    np.testing.assert_allclose(probs_of(apply_min_p(LOGITS, min_p)), expected, rtol=1e-6, atol=0)


def test_top_p_sees_the_distribution_left_by_top_k():
    # top-k=3 renormalises to [.556, .278, .167]; top-p=0.8 then stops at two tokens (.833 >= .8),
    # where top-p on the raw distribution would have kept three.
    out = warp_logits(LOGITS, params(top_k=3, top_p=0.8))
    np.testing.assert_allclose(probs_of(out), [2 / 3, 1 / 3, 0, 0], rtol=1e-6, atol=0)


def test_temperature_is_applied_before_the_filters():
    # T=2 flattens to sqrt(PROBS)/sum = [.370, .262, .203, .166]; top-p=0.7 then drops only the last
    # token. Filtering before the temperature would have dropped two.
    out = warp_logits(LOGITS, params(temperature=2.0, top_p=0.7))
    root = np.sqrt(PROBS[:3])
    np.testing.assert_allclose(probs_of(out), [*(root / root.sum()), 0], rtol=1e-6, atol=0)


def test_min_p_after_top_k_and_top_p():
    out = warp_logits(LOGITS, params(top_k=3, top_p=0.95, min_p=0.4))
    np.testing.assert_allclose(probs_of(out), [2 / 3, 1 / 3, 0, 0], rtol=1e-6, atol=0)


def test_filters_that_are_off_leave_the_logits_unchanged():
    np.testing.assert_array_equal(np.array(warp_logits(LOGITS, params())), np.array(LOGITS))


# ---- parity with transformers' warpers ---------------------------------------------------------------


def hf_warp(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    scores = torch.from_numpy(logits)
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k > 0:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        warpers.append(MinPLogitsWarper(p.min_p))
    for warper in warpers:
        scores = warper(None, scores)
    return scores.numpy()


@pytest.mark.parametrize(
    "p",
    [
        params(top_k=1),
        params(top_k=20),
        params(top_k=500),
        params(top_p=0.5),
        params(top_p=0.9),
        params(min_p=0.05),
        params(min_p=0.3),
        params(temperature=0.6, top_p=0.95, top_k=20),  # Qwen3 thinking
        params(temperature=0.7, top_p=0.8, top_k=20),  # Qwen3 non-thinking
        params(temperature=1.3, top_p=0.9, top_k=50, min_p=0.02),
    ],
)
def test_matches_hf_warpers_on_random_logits(p):
    logits = np.random.default_rng(0).normal(0, 3, size=(8, 1000)).astype(np.float32)
    ours = np.array(warp_logits(mx.array(logits), p))
    theirs = hf_warp(logits, p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-6)


def test_top_k_matches_hf_on_bfloat16_ties():
    # bfloat16 logits (what the model returns) tie often; HF keeps every tie of the k-th value.
    logits = np.random.default_rng(1).normal(0, 1, size=(8, 32000)).astype(np.float32)
    logits = np.array(mx.array(logits).astype(mx.bfloat16).astype(mx.float32))
    for k in (20, 64):
        ours = np.isinf(np.array(apply_top_k(mx.array(logits), k)))
        theirs = np.isinf(TopKLogitsWarper(k)(None, torch.from_numpy(logits)).numpy())
        np.testing.assert_array_equal(ours, theirs)
        assert (~ours).sum(axis=-1).max() > k  # the vectors really have ties at the boundary


# ---- the sampler -------------------------------------------------------------------------------------


def test_ids_past_the_vocabulary_are_never_drawn():
    # ids 10 and 11 hold almost all the mass; 1000 draws in one batch
    logits = mx.concatenate([mx.zeros((1000, 10)), mx.full((1000, 2), 30.0)], axis=-1)
    for p in (params(), params(temperature=0.6, top_p=0.95, top_k=20), params(temperature=5.0)):
        draws = np.array(make_sampler(p, vocab_limit=10)(logits))
        assert draws.max() < 10
        assert set(draws) == set(range(10))  # the allowed ids are still all drawn
    greedy = make_sampler(params(temperature=0.0), vocab_limit=10)
    assert greedy(logits).tolist() == [0] * 1000
    greedy_3 = make_sampler(params(temperature=0.0), vocab_limit=3)
    assert greedy_3(mx.array([[0.0, 3.0, 1.0, 9.0]])).tolist() == [1]  # id 3 (9.0) is past the limit


def test_sampler_returns_one_int32_id_for_bfloat16_logits():
    ids = make_sampler(default_params(thinking=True), vocab_limit=4)(LOGITS.astype(mx.bfloat16))
    assert ids.shape == (1,) and ids.dtype == mx.int32


def test_same_seed_gives_the_same_draws():
    sampler = make_sampler(default_params(thinking=True), vocab_limit=None)
    logits = mx.random.normal((64, 100), key=mx.random.key(3))
    mx.random.seed(1234)
    first = np.array(sampler(logits))
    mx.random.seed(1234)
    second = np.array(sampler(logits))
    mx.random.seed(4321)
    other = np.array(sampler(logits))
    np.testing.assert_array_equal(first, second)
    assert (first != other).any()


def test_a_key_gives_the_same_draws_and_leaves_the_global_random_state_alone():
    sampler = make_sampler(default_params(thinking=True), vocab_limit=None)
    logits = mx.random.normal((64, 100), key=mx.random.key(3))
    first = np.array(sampler(logits, mx.random.key(1234)))
    mx.random.seed(99)  # whatever the global state does in between
    sampler(logits)
    state = np.array(mx.random.state[0])
    second = np.array(sampler(logits, mx.random.key(1234)))
    other = np.array(sampler(logits, mx.random.key(4321)))
    np.testing.assert_array_equal(first, second)
    assert (first != other).any()
    np.testing.assert_array_equal(np.array(mx.random.state[0]), state)  # keyed draws never advance it


@pytest.mark.parametrize("p", [params(temperature=0.7), params(temperature=1.5, top_k=4, top_p=0.9)])
def test_draw_frequencies_match_the_warped_distribution(p):
    n = 200_000
    logits = mx.array([[1.0, 0.5, 0.0, -0.5, -1.0, -2.0]])
    expected = probs_of(warp_logits(logits, p)) * n
    mx.random.seed(0)
    counts = np.bincount(np.array(make_sampler(p, None)(mx.broadcast_to(logits, (n, 6)))), minlength=6)
    assert (counts[expected == 0] == 0).all()
    kept = expected > 0
    chi2 = (((counts[kept] - expected[kept]) ** 2) / expected[kept]).sum()
    assert chi2 < 20.5  # the 0.999 quantile of chi-square with 5 degrees of freedom


# ---- penalties and bias ------------------------------------------------------------------------------

PENALTY_LOGITS = mx.array([[2.0, -1.0, 0.5, -3.0, 0.0]])
GENERATED = mx.array([0, 1, 1, 4, 1], dtype=mx.int32)


def penalised(**kw) -> list[float]:
    process = make_logits_processor(params(**kw), vocab_size=5)
    return process(PENALTY_LOGITS, GENERATED).tolist()[0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    assert penalised(repetition_penalty=2.0) == [1.0, -2.0, 0.5, -3.0, 0.0]


def test_repetition_penalty_below_one_rewards_seen_tokens():
    assert penalised(repetition_penalty=0.5) == [4.0, -0.5, 0.5, -3.0, 0.0]


def test_presence_penalty_is_subtracted_once_per_distinct_token():
    assert penalised(presence_penalty=1.5) == [0.5, -2.5, 0.5, -3.0, -1.5]


def test_repetition_penalty_is_applied_before_presence_penalty():
    assert penalised(repetition_penalty=2.0, presence_penalty=0.5) == [0.5, -2.5, 0.5, -3.0, -0.5]


def test_logit_bias_is_added_per_id_after_the_penalties():
    out = penalised(repetition_penalty=2.0, logit_bias={0: 1.0, 3: 0.25, 2: -math.inf})
    assert out == [2.0, -2.0, -math.inf, -2.75, 0.0]


def test_a_finite_bias_on_bfloat16_logits_is_added_in_float32_and_a_ban_keeps_the_dtype():
    logits, none = mx.array([[1.0, 2.0, 3.0]]).astype(mx.bfloat16), mx.array([], dtype=mx.int32)
    nudged = make_logits_processor(params(logit_bias={0: 2**-10}), vocab_size=3)(logits, none)
    assert nudged.dtype == mx.float32 and nudged.tolist() == [[1.0009765625, 2.0, 3.0]]  # 1.0 in bfloat16
    banned = make_logits_processor(params(logit_bias={1: -math.inf}), vocab_size=3)(logits, none)
    assert banned.dtype == mx.bfloat16 and banned.tolist() == [[1.0, -math.inf, 3.0]]


def test_penalties_do_nothing_before_the_first_generated_token():
    process = make_logits_processor(params(presence_penalty=1.0, repetition_penalty=1.3), vocab_size=5)
    assert process(PENALTY_LOGITS, mx.array([], dtype=mx.int32)).tolist() == PENALTY_LOGITS.tolist()


def test_no_processor_when_no_penalty_or_bias_is_set():
    assert make_logits_processor(params(logit_bias={}), vocab_size=5) is None


def test_logit_bias_id_outside_the_vocabulary_is_rejected():
    with pytest.raises(OptionError) as e:
        make_logits_processor(params(logit_bias={5: 1.0}), vocab_size=5)
    assert str(e.value) == "logit_bias: token id 5 is outside the vocabulary (size 5)"


# ---- defaults and validation -------------------------------------------------------------------------

QWEN3_GENERATION_CONFIG = {  # Qwen/Qwen3-0.6B generation_config.json
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
}


def test_default_params_follow_the_model_card_per_mode():
    assert default_params(thinking=True) == SamplingParams(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
    assert default_params(thinking=False) == SamplingParams(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)


def test_generation_config_overrides_the_thinking_defaults_only():
    assert default_params(True, {**QWEN3_GENERATION_CONFIG, "temperature": 0.5}) == SamplingParams(0.5, 0.95, 20, 0.0)
    assert default_params(False, QWEN3_GENERATION_CONFIG) == SamplingParams(0.7, 0.8, 20, 0.0)
    partial = {"top_k": 40, "min_p": 0.1, "top_p": None}
    assert default_params(True, partial) == SamplingParams(0.6, 0.95, 40, 0.1)


def test_generation_config_with_do_sample_false_is_ignored():
    config = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50}
    assert default_params(True, config) == default_params(True)


def test_explicit_overrides_win_and_none_means_not_given():
    p = default_params(True, QWEN3_GENERATION_CONFIG, temperature=0.0, top_p=None, presence_penalty=1.5)
    assert p == SamplingParams(0.0, 0.95, 20, 0.0, presence_penalty=1.5)


def test_unknown_override_is_rejected():
    with pytest.raises(OptionError) as e:
        default_params(True, temp=0.5)
    assert str(e.value) == (
        "unknown sampling option 'temp'; expected one of "
        "logit_bias, min_p, presence_penalty, repetition_penalty, temperature, top_k, top_p"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
        ({"temperature": math.nan}, "temperature must be >= 0, got nan"),
        ({"temperature": math.inf}, "temperature must be finite, got inf"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_k": -1}, "top_k must be >= 0 (0 = off), got -1"),
        ({"top_k": 2.5}, "top_k=2.5 must be an integer"),
        ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1"),
        ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1"),
        ({"presence_penalty": math.inf}, "presence_penalty must be finite, got inf"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0 and finite, got 0.0"),
        ({"logit_bias": {-3: 1.0}}, "logit_bias: token ids must be integers >= 0, got -3"),
        ({"logit_bias": {7: math.inf}}, "logit_bias: bias for token 7 must be finite or -inf, got inf"),
    ],
)
def test_validate_names_the_option_and_the_value(change, message):
    with pytest.raises(OptionError) as e:
        validate(params(**change))
    assert str(e.value) == message


def test_sampler_factory_validates():
    with pytest.raises(OptionError, match="top_p"):
        make_sampler(params(top_p=0.0), vocab_limit=None)


@pytest.mark.parametrize(
    "change",
    [{}, {"temperature": 0.0}, {"top_p": 1.0}, {"top_p": 1e-9}, {"top_k": 0}, {"min_p": 0.0}, {"min_p": 1.0},
     {"presence_penalty": -2.0}, {"repetition_penalty": 1e-3}, {"logit_bias": {0: -math.inf, 7: -1e9}}],
)
def test_the_ends_of_each_range_and_both_modes_defaults_are_accepted(change):
    for thinking in (True, False):
        p = replace(default_params(thinking), **change)
        assert validate(p) is None
        assert make_sampler(p, vocab_limit=4)(LOGITS).shape == (1,)
