"""DWQ (qwen3_mlx/quantize/dwq.py): only the quantized model's scales and biases move, they bring its
output nearer the float model's on held-out ids than rounding's, and `convert --method dwq` writes a
checkpoint whose packed levels are rounding's, bit for bit, that both loaders read alike."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import make_checkpoint
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model as mlx_lm_load_model

from qwen3_mlx.checkpoint.loader import load, load_model
from qwen3_mlx.cli.commands import main
from qwen3_mlx.errors import OptionError
from qwen3_mlx.generation.options import GenerationOptions
from qwen3_mlx.generation.single import generate
from qwen3_mlx.quantize.calibrated import check_methods
from qwen3_mlx.quantize.capture import kl_divergence
from qwen3_mlx.quantize.dwq import dwq, quantized_student, trainable_modules
from qwen3_mlx.quantize.gptq import gptq
from qwen3_mlx.training.options import TrainingOptions

CALIBRATION = mx.random.randint(0, 512, (32, 64), key=mx.random.key(10))
HELD_OUT = mx.random.randint(0, 512, (8, 64), key=mx.random.key(11))


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("float"), vocab_size=512, intermediate_size=192,
                           num_hidden_layers=2)


def test_dwq_trains_only_scales_and_biases_and_beats_rounding_on_held_out_ids(float_checkpoint):
    teacher = load_model(float_checkpoint)
    student = quantized_student(teacher, 3, 64, 8, mx.float32)
    q_proj = student.layers[0].self_attn.q_proj  # rounding as the converter rounds: mx.quantize's
    expected = mx.quantize(teacher.layers[0].self_attn.q_proj.weight, 64, 3)
    assert all(mx.array_equal(a, b) for a, b in zip((q_proj.weight, q_proj.scales, q_proj.biases), expected))
    assert set(trainable_modules(student)) == {f"model.layers.{n}.{p}" for n in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}  # the 8-bit embedding is left as it is, as mlx-lm leaves it
    reference = teacher(HELD_OUT)
    rounding = kl_divergence(reference, student(HELD_OUT)).mean().item()
    before = dict(tree_flatten(student.parameters()))

    reports = []
    result = dwq(student, teacher, CALIBRATION, TrainingOptions(learning_rate=1e-4, epochs=3, batch_size=4),
                 on_report=reports.append)
    after = dict(tree_flatten(student.parameters()))
    changed = {name for name in before if not mx.array_equal(before[name], after[name])}
    assert changed and all(name.endswith((".scales", ".biases")) for name in changed)
    assert all(mx.array_equal(before[name], after[name]) for name in before if name.endswith(".weight"))
    assert kl_divergence(reference, student(HELD_OUT)).mean().item() < 0.99 * rounding

    # 28 training samples in batches of 4, 3 epochs: 21 steps, the held-out four measured before and after each.
    assert result.steps == 21 and result.final_kl < result.initial_kl
    assert [r.step for r in reports if r.val_loss is not None] == [0, 7, 14, 21]
    assert [r.step for r in reports if r.train_loss is not None] == list(range(10, 21, 10)) + [21]
    assert min(r.val_loss for r in reports if r.val_loss is not None) == result.final_kl


def test_a_student_after_gptq_starts_from_gptqs_levels_and_grid(float_checkpoint):
    grids = gptq(load_model(float_checkpoint), CALIBRATION[:8], 3, 64)
    student = quantized_student(load_model(float_checkpoint), 3, 64, 8, mx.float32, replaced=grids)
    modules = dict(student.named_modules())
    for name, q in grids.items():
        module = modules[name]
        assert all(mx.array_equal(a, b) for a, b in zip((module.weight, module.scales, module.biases),
                                                        (q.weight, q.scales, q.biases)))


def test_convert_method_dwq_keeps_roundings_levels_and_loads_in_both(tmp_path):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    # The Qwen3 vocabulary makes every step slow on a CPU: two samples, one trained on, one held out.
    source = make_checkpoint(tmp_path / "tok", tokenizer=True, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=1)
    runner = CliRunner()
    plain, out = tmp_path / "plain", tmp_path / "dwq"
    options = ["--bits", "3", "--dtype", "float32"]  # float32 grids: one step's change is not rounded away
    assert runner.invoke(main, ["convert", str(source), str(plain), "-q", *options]).exit_code == 0
    result = runner.invoke(main, ["convert", str(source), str(out), "--method", "dwq", "--calibration",
                                  str(calibration), "--calibration-samples", "2", "--calibration-length", "16",
                                  "--epochs", "1", "--learning-rate", "1e-4", *options])
    assert result.exit_code == 0, result.output
    ours, tokenizer = load(out)
    theirs, _ = mlx_lm_load_model(out)
    ids = mx.array([tokenizer.encode("The quick brown fox")])
    assert np.allclose(np.array(ours(ids)), np.array(theirs(ids)), atol=1e-5)
    assert generate(ours, tokenizer, "hello", GenerationOptions(max_tokens=4, think=False, temp=0.0)).token_ids
    written, rounded = (dict(tree_flatten(load_model(p).parameters())) for p in (out, plain))
    assert written.keys() == rounded.keys()
    assert all(mx.array_equal(written[n], rounded[n]) for n in written if not n.endswith((".scales", ".biases")))
    assert not all(mx.array_equal(written[n], rounded[n]) for n in written if n.endswith(".scales"))


@pytest.mark.parametrize("methods", ["dwq", "mixed,dwq", "gptq,dwq", "mixed,awq,dwq"])
def test_dwq_comes_last_after_any_other_method(methods):
    check_methods(methods.split(","))


@pytest.mark.parametrize("methods", ["dwq,gptq", "dwq,dwq", "gptq,mixed,dwq", "gptq,awq,dwq"])
def test_methods_out_of_order_are_refused_saying_the_order(methods):
    with pytest.raises(OptionError, match="mixed, then gptq or awq, then dwq"):
        check_methods(methods.split(","))


def test_dwqs_options_need_dwq(tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tmp_path), str(tmp_path / "out"), "-q", "--epochs", "2"])
    assert result.exit_code != 0 and "--epochs applies only with --method dwq" in result.output
