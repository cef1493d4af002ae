"""The converter: parity with mlx-lm on the same folders, exact tensors, and a safe, all-or-nothing output."""

import errno
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import make_checkpoint
from click.testing import CliRunner
from mlx_lm import convert as mlx_lm_convert
from mlx_lm.utils import load_model as mlx_lm_load_model

from qwen3_mlx import converter
from qwen3_mlx.cli import main
from qwen3_mlx.converter import convert
from qwen3_mlx.errors import OptionError, Qwen3Error
from qwen3_mlx.loader import load_model

ROOT = Path(__file__).resolve().parent.parent
IDS = mx.array([[1, 5, 9, 100, 3, 511, 42, 7]])
SMALL = dict(intermediate_size=128)  # every input size divisible by group 64


def logits(model) -> np.ndarray:
    return np.array(model(IDS).astype(mx.float32))


def mlx_lm_logits(path: Path) -> np.ndarray:
    model, _ = mlx_lm_load_model(path)
    return logits(model)


def tensors(path: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A float32 Hugging Face checkpoint, vocabulary 512."""
    return make_checkpoint(tmp_path_factory.mktemp("hf"), **SMALL)


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """With the real tokenizer (vocabulary 151936), which `mlx_lm.convert` needs."""
    return make_checkpoint(tmp_path_factory.mktemp("hf_tok"), tokenizer=True, seed=1, **SMALL)


@pytest.fixture(scope="module")
def mlx_lm_4bit(hf_tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlx_lm") / "q4"
    mlx_lm_convert(str(hf_tok), str(out), quantize=True, q_bits=4, q_group_size=64)
    return out


@pytest.fixture(scope="module")
def ours_4bit(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("ours") / "q4"
    convert(hf, out, quantize=True, dtype="float32")
    return out


# ---------------------------------------------------------------- parity with mlx-lm


@pytest.mark.parametrize("bits", [4, 8])
def test_our_quantized_folder_gives_mlx_lm_logits(hf, ours_4bit, tmp_path, bits):
    out = ours_4bit if bits == 4 else convert(hf, tmp_path / "q8", quantize=True, bits=8, dtype="float32").path
    assert np.abs(logits(load_model(out)) - mlx_lm_logits(out)).max() <= 1e-5


def test_embedding_gets_8_bits_as_an_override_mlx_lm_honours(ours_4bit):
    config = json.loads((ours_4bit / "config.json").read_text())
    expected = {"group_size": 64, "bits": 4, "mode": "affine",
                "model.embed_tokens": {"group_size": 64, "bits": 8, "mode": "affine"}}
    assert config["quantization"] == config["quantization_config"] == expected
    model, _ = mlx_lm_load_model(ours_4bit)
    assert model.model.embed_tokens.bits == 8
    assert model.model.layers[0].mlp.down_proj.bits == 4
    index = json.loads((ours_4bit / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: the embedding is the head
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors(ours_4bit).values())


@pytest.mark.parametrize("recipe", [None, "mixed_3_6"])
def test_mlx_lm_converted_folder_loads_with_mlx_lm_logits(hf_tok, mlx_lm_4bit, tmp_path, recipe):
    out = mlx_lm_4bit
    if recipe:
        out = tmp_path / recipe
        mlx_lm_convert(str(hf_tok), str(out), quantize=True, q_group_size=64, quant_predicate=recipe)
    assert np.abs(logits(load_model(out)) - mlx_lm_logits(out)).max() <= 1e-5


def test_same_tensors_as_mlx_lm_convert_even_in_small_row_blocks(hf_tok, mlx_lm_4bit, tmp_path):
    # Quantization groups run along rows, so quantizing a few rows at a time changes nothing.
    out = convert(hf_tok, tmp_path / "q4", quantize=True, embed_bits=4, dtype="float32", block_bytes=4096).path
    ours, theirs = tensors(out), tensors(mlx_lm_4bit)
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and mx.array_equal(ours[name], value), name


# ---------------------------------------------------------------- dtypes, dequantize, source layouts


def test_float32_source_to_bfloat16(hf, tmp_path):
    out = convert(hf, tmp_path / "bf16", dtype="bfloat16").path
    source = tensors(hf)
    for name, value in tensors(out).items():
        assert value.dtype == mx.bfloat16 and mx.array_equal(value, source[name].astype(mx.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(out).model.norm.weight.dtype == mx.bfloat16


def test_default_dtype_keeps_float32_but_quantizing_gives_bfloat16_scales(hf, tmp_path):
    assert tensors(convert(hf, tmp_path / "f32").path)["model.norm.weight"].dtype == mx.float32
    quantized = tensors(convert(hf, tmp_path / "q4", quantize=True).path)
    assert quantized["model.norm.weight"].dtype == quantized["model.embed_tokens.scales"].dtype == mx.bfloat16


def test_dequantize_gives_the_dequantized_weights(ours_4bit, tmp_path):
    out = convert(ours_4bit, tmp_path / "float", dequantize=True).path
    quantized, floats = tensors(ours_4bit), tensors(out)
    for name in [n for n in quantized if n.endswith(".scales")]:
        module = name[: -len(".scales")]
        bits = 8 if module == "model.embed_tokens" else 4
        w, biases = quantized[f"{module}.weight"], quantized[f"{module}.biases"]
        expected = mx.dequantize(w, quantized[name], biases, 64, bits)
        assert mx.array_equal(floats[f"{module}.weight"], expected), module
    assert not any(n.endswith((".scales", ".biases")) for n in floats)
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert np.abs(logits(load_model(out)) - logits(load_model(ours_4bit))).max() <= 1e-5


def test_quantized_source_is_copied_as_is(ours_4bit, tmp_path):
    out = convert(ours_4bit, tmp_path / "copy").path
    a, b = tensors(ours_4bit), tensors(out)
    assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]) for k in a)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == json.loads((ours_4bit / "config.json").read_text())["quantization"]


def test_sharded_source_converts_like_a_single_file(hf, tmp_path):
    sharded = make_checkpoint(tmp_path / "sharded", shard=True, **SMALL)  # the same seed as `hf`
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a = tensors(convert(sharded, tmp_path / "a", quantize=True).path)
    b = tensors(convert(hf, tmp_path / "b", quantize=True).path)
    assert sorted(a) == sorted(b) and all(mx.array_equal(a[k], b[k]) for k in a)


def test_untied_lm_head_is_quantized_with_embed_bits(tmp_path):
    source = make_checkpoint(tmp_path / "untied", tie_word_embeddings=False, **SMALL)
    out = convert(source, tmp_path / "q4", quantize=True, dtype="float32").path
    assert json.loads((out / "config.json").read_text())["quantization"]["lm_head"]["bits"] == 8
    assert tensors(out)["lm_head.weight"].dtype == mx.uint32
    assert np.abs(logits(load_model(out)) - mlx_lm_logits(out)).max() <= 1e-5


def test_progress_is_reported_per_tensor_with_the_total(hf, tmp_path):
    calls = []
    convert(hf, tmp_path / "out", quantize=True, progress=lambda done, total: calls.append((done, total)))
    total = 2 + 11 * 2  # embedding and final norm (the head is tied), 11 parameters in each of 2 layers
    assert calls == [(i, total) for i in range(1, total + 1)]


# ---------------------------------------------------------------- safety


def test_existing_output_is_refused_and_force_replaces_it(hf, tmp_path):
    out = tmp_path / "out"
    convert(hf, out)
    with pytest.raises(Qwen3Error) as e:
        convert(hf, out, quantize=True)
    assert str(e.value) == f"{out}: already exists; pass --force to replace it"
    convert(hf, out, quantize=True, force=True)
    assert "quantization" in json.loads((out / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one is gone


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_output_overlapping_the_source_is_refused(hf, where):
    out = {"same": hf, "inside": hf / "mlx", "around": hf.parent}[where]
    before = digest(hf)
    with pytest.raises(Qwen3Error, match="source folder"):
        convert(hf, out, force=True)
    assert digest(hf) == before


def test_source_is_unchanged_byte_for_byte(hf, ours_4bit, tmp_path):
    before, before_q = digest(hf), digest(ours_4bit)
    convert(hf, tmp_path / "a", quantize=True, bits=3)
    convert(ours_4bit, tmp_path / "b", dequantize=True)
    assert digest(hf) == before and digest(ours_4bit) == before_q


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_on_the_second_shard_leaves_nothing_behind(hf, tmp_path, monkeypatch, error):
    real, calls = converter._write_shard, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(converter, "_write_shard", failing)
    with pytest.raises(type(error)):
        convert(hf, tmp_path / "new" / "deeper" / "out", quantize=True, shard_bytes=20_000)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder, no parent made for it

    convert(hf, tmp_path / "old")
    before = digest(tmp_path / "old")
    calls.clear()
    with pytest.raises(type(error)):
        convert(hf, tmp_path / "old", quantize=True, force=True, shard_bytes=20_000)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and digest(tmp_path / "old") == before


def test_disk_full_is_one_line_naming_the_output(hf, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(converter, "_write_shard", full)
    with pytest.raises(Qwen3Error, match=rf"^{tmp_path / 'out'}: no space left"):
        convert(hf, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_source_is_a_one_line_error(tmp_path):
    with pytest.raises(Qwen3Error, match="no such folder"):
        convert(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Qwen3Error, match="config.json: not found"):
        convert(tmp_path / "empty", tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_invalid_combinations_are_option_errors(hf, ours_4bit, tmp_path):
    for kwargs in (dict(quantize=True, dequantize=True), dict(bits=7, quantize=True), dict(embed_bits=8),
                   dict(group_size=48, quantize=True), dict(dtype="int8")):
        with pytest.raises(OptionError):
            convert(hf, tmp_path / "out", **kwargs)
    with pytest.raises(OptionError, match="already quantized"):
        convert(ours_4bit, tmp_path / "out", quantize=True)
    with pytest.raises(OptionError, match="is not quantized"):
        convert(hf, tmp_path / "out", dequantize=True)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- command line


def test_cli_converts_and_prints_bits_per_weight(hf, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(main, ["convert", str(hf), str(out), "-q", "--bits", "8"])
    assert result.exit_code == 0, result.output
    assert re.fullmatch(rf"wrote {out}: 8\.5\d bits per weight, 0\.00 GB in \d+\.\d s\n", result.stdout)
    assert "converting" in result.stderr
    again = runner.invoke(main, ["convert", str(hf), str(out), "-q"])
    assert again.exit_code == 1 and again.stderr == f"error: {out}: already exists; pass --force to replace it\n"
    forced = runner.invoke(main, ["convert", str(hf), str(out), "-q", "--force"])
    assert forced.exit_code == 0 and f"wrote {out}: 5." in forced.stdout  # 4-bit layers, 8-bit embedding


@pytest.mark.parametrize("args, message", [
    (["-q", "--dequantize"], "exclude each other"),
    (["--bits", "3"], "--bits applies only with --quantize"),
    (["--embed-bits", "8"], "--embed-bits applies only with --quantize"),
    (["-q", "--bits", "7"], "'7' is not one of"),
])
def test_cli_usage_errors_exit_2(hf, tmp_path, args, message):
    result = CliRunner().invoke(main, ["convert", str(hf), str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_convert_script_exit_codes(hf, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "convert.py"), str(hf), str(tmp_path / "out"), *args],
                              capture_output=True, text=True, cwd=tmp_path)

    ok = run("-q")
    assert ok.returncode == 0 and "bits per weight" in ok.stdout, ok.stderr
    exists = run()
    assert exists.returncode == 1 and exists.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'out'}: already exists; pass --force to replace it"]
    assert run("-q", "--dequantize").returncode == 2
