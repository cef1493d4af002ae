"""Quantization that learns from calibration text (qwen3_mlx/quantize): each piece against a reference
computed here, each method against plain rounding on held-out ids, and the CLI's output loaded by us and
by mlx-lm alike."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import make_checkpoint
from click.testing import CliRunner
from mlx_lm.utils import load_model as mlx_lm_load_model

from qwen3_mlx.checkpoint.loader import load, load_model
from qwen3_mlx.cli.commands import main
from qwen3_mlx.generation.options import GenerationOptions
from qwen3_mlx.generation.single import generate
from qwen3_mlx.quantize.awq import awq, search_clip, search_scale
from qwen3_mlx.quantize.capture import LINEARS, fits, kl_divergence, submodule
from qwen3_mlx.quantize.gptq import gptq, gptq_weight, hessian
from qwen3_mlx.quantize.mixed import choose_bits, model_bytes, sensitivities
from qwen3_mlx.quantize.rounding import dequantized, grid, levels, pack, rounded

SHAPE = dict(vocab_size=512, intermediate_size=192, num_hidden_layers=2)  # every input width a multiple of 64


def correlated_inputs(tokens: int, width: int, seed: int = 0) -> np.ndarray:
    """Inputs whose channels are correlated and a few of them large, as a layer's are."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, width)) @ rng.normal(size=(width, width)) / np.sqrt(width)
    x[:, rng.choice(width, 3, replace=False)] *= 8
    return x.astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_the_pieces_rebuild_mx_quantize_exactly(bits):
    w = mx.random.normal((8, 128), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(w, 32, bits)
    s, b = grid(w, bits, 32)
    q = levels(w, s, b, bits)
    assert mx.array_equal(s, scales) and mx.array_equal(b, biases)
    assert mx.array_equal(pack(q, bits), packed)
    assert mx.allclose(dequantized(q, s, b), mx.dequantize(packed, scales, biases, 32, bits), atol=1e-6)


def obs_reference(w: np.ndarray, h: np.ndarray, bits: int, group_size: int, damp: float) -> np.ndarray:
    """GPTQ written as the OBS update it stands for: each column rounded in turn, and the remaining
    columns moved by -err / [H_F^-1]_kk * [H_F^-1]_k,: with the inverse of the remaining Hessian H_F
    computed afresh (no Cholesky factor, no blocks); float64. Returns the levels."""
    h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    w, q = w.astype(np.float64).copy(), np.zeros_like(w)
    for k in range(w.shape[1]):
        if k % group_size == 0:
            s, b = (np.array(a, np.float64)[:, 0] for a in grid(mx.array(w[:, k:k + group_size].astype(np.float32)),
                                                                 bits, group_size))
        q[:, k] = np.clip(np.round((w[:, k] - b) / s), 0, 2**bits - 1)
        inverse = np.linalg.inv(h[k:, k:])
        w[:, k:] -= np.outer((w[:, k] - (q[:, k] * s + b)) / inverse[0, 0], inverse[0])
    return q


def test_gptq_weight_equals_the_obs_update_column_by_column():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 96)).astype(np.float32)
    h = np.asarray(hessian(mx.array(correlated_inputs(400, 96))))
    q, scales, biases = gptq_weight(mx.array(w), h, 3, 32, damp=0.01)
    expected = obs_reference(w, h, 3, 32, 0.01)
    assert np.array_equal(np.array(q), expected)
    # And it pays: the output moves less than plain rounding's on the inputs the Hessian came from.
    x = correlated_inputs(400, 96)
    error = lambda wq: float(np.sum((x @ (wq - w).T) ** 2))  # noqa: E731
    assert error(np.array(dequantized(q, scales, biases))) < 0.9 * error(np.array(rounded(mx.array(w), 3, 32)))


def test_awq_scale_search_picks_the_scale_of_least_measured_error():
    x = mx.array(correlated_inputs(256, 128, seed=2))
    linear = nn.Linear(128, 96, bias=False)
    original = linear.weight
    chosen, errors = search_scale(linear, [linear], x, [3], 64, mx.float32, n_grid=10)
    measured = []
    for i in range(10):  # the candidates, built here as llm-awq builds them
        s = mx.maximum(mx.abs(x).mean(axis=0) ** (i / 10), 1e-4)
        s = s / mx.sqrt(s.max() * s.min())
        out = x @ (rounded(original * s, 3, 64) / s).T
        measured.append((mx.mean((out - x @ original.T) ** 2).item(), s))
    assert np.allclose(errors, [e for e, _ in measured], rtol=1e-4)
    assert mx.allclose(chosen, min(measured, key=lambda m: m[0])[1])
    assert mx.array_equal(linear.weight, original)  # the search leaves the weights as it found them
    assert min(errors) < errors[0]  # with outlier channels, some scaling beats none


def test_awq_clip_picks_each_groups_best_range():
    x = mx.array(correlated_inputs(64, 128, seed=3))
    w = mx.random.normal((4, 128), key=mx.random.key(3))
    clipped = np.array(search_clip(w, x, 3, 64, mx.float32, n_grid=10))
    xs, ws = np.array(x).reshape(64, 2, 64), np.array(w).reshape(4, 2, 64)
    for row in range(4):
        for g in range(2):
            group = ws[row, g]
            best = min((np.mean((xs[:, g] @ (np.array(rounded(mx.array(np.clip(group, -t, t)[None]), 3, 64))[0]
                                             - group)) ** 2), t)
                       for t in np.abs(group).max() * (1 - np.arange(5) / 10))
            assert np.allclose(clipped[row, g * 64:(g + 1) * 64], np.clip(group, -best[1], best[1]), atol=1e-6)


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("float"), **SHAPE)


def round_all(model, bits: int):
    for layer in model.layers:
        for name in LINEARS:
            if fits(linear := submodule(layer, name), 64):
                linear.weight = rounded(linear.weight, bits, 64)
    return model


CALIBRATION = mx.random.randint(0, 512, (16, 64), key=mx.random.key(10))
HELD_OUT = mx.random.randint(0, 512, (8, 64), key=mx.random.key(11))


def kl_to(reference, model) -> float:
    return kl_divergence(reference, model(HELD_OUT).astype(mx.float32)).mean().item()


def test_gptq_awq_and_mixed_each_beat_rounding_on_held_out_ids(float_checkpoint):
    reference = load_model(float_checkpoint)(HELD_OUT)
    plain = {bits: kl_to(reference, round_all(load_model(float_checkpoint), bits)) for bits in (3, 4)}
    model = load_model(float_checkpoint)
    gptq(model, CALIBRATION, 3, 64)  # leaves the model computing as its quantized self
    assert kl_to(reference, model) < 0.95 * plain[3]
    model = load_model(float_checkpoint)
    awq(model, CALIBRATION, 3, 64)
    assert kl_to(reference, round_all(model, 3)) < 0.95 * plain[3]

    model = load_model(float_checkpoint)
    low, _ = model_bytes(model, {}, 3, 8, 64, mx.float32)
    high, params = model_bytes(model, {}, 4, 8, 64, mx.float32)
    target = (low + high) / 2 * 8 / params
    chosen = choose_bits(model, sensitivities(model, CALIBRATION, 3, 4, 64), target, 3, 4, 8, 64, mx.float32)
    size, _ = model_bytes(model, chosen, 3, 8, 64, mx.float32)
    assert low < size and size * 8 / params <= target
    for layer_index, layer in enumerate(model.layers):
        for name in LINEARS:
            linear = submodule(layer, name)
            linear.weight = rounded(linear.weight, chosen.get(f"model.layers.{layer_index}.{name}", 3), 64)
    assert kl_to(reference, model) < plain[3]


def test_convert_method_writes_a_checkpoint_both_loaders_read_alike(tmp_path, float_checkpoint):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    source = make_checkpoint(tmp_path / "tok", tokenizer=True, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=1)
    runner = CliRunner()
    # The 8-bit embedding (151936 x 64) is most of the size: 3 and 4 bits uniform give 8.481 and 8.485.
    for method, extra in (("gptq", []), ("mixed,awq", ["--target-bpw", "8.483", "--bits", "3"])):
        out = tmp_path / method
        result = runner.invoke(main, ["convert", str(source), str(out), "--method", method, "--calibration",
                                      str(calibration), "--calibration-samples", "4", "--calibration-length", "32",
                                      *extra])
        assert result.exit_code == 0, result.output
        assert "bits per weight" in result.output
        ours, tokenizer = load(out)
        theirs, _ = mlx_lm_load_model(out)
        ids = mx.array([tokenizer.encode("The quick brown fox")])
        assert np.allclose(np.array(ours(ids).astype(mx.float32)), np.array(theirs(ids).astype(mx.float32)),
                           atol=1e-4)
        assert generate(ours, tokenizer, "hello", GenerationOptions(max_tokens=4, think=False, temp=0.0)).token_ids
    config = json.loads((tmp_path / "mixed,awq" / "config.json").read_text())["quantization"]
    assert config["bits"] == 3 and any(isinstance(v, dict) and v["bits"] == 4 for v in config.values())


def test_a_bad_method_or_calibration_is_one_line(tmp_path, float_checkpoint):
    runner = CliRunner()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": 1}\n')
    for args, words in ((["--method", "dwq,gptq", "--calibration", str(bad)], "then gptq or awq, then dwq"),
                        (["--method", "gptq,awq", "--calibration", str(bad)], "give one method"),
                        (["--method", "gptq"], "--method and --calibration FILE go together"),
                        (["--method", "gptq", "--calibration", str(bad)], f"{bad}:2:")):
        result = runner.invoke(main, ["convert", str(float_checkpoint), str(tmp_path / "out"), *args])
        assert result.exit_code != 0 and words in result.output, result.output
    assert not (tmp_path / "out").exists()
