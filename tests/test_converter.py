"""The converter: parity with mlx-lm on the same folders, exact tensors, and a safe, all-or-nothing output."""

import errno
import functools
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import make_checkpoint
from click.testing import CliRunner
from mlx_lm import convert as mlx_lm_convert
from mlx_lm.convert import QUANT_RECIPES, configure_parser
from mlx_lm.utils import load_model as mlx_lm_load_model

from qwen3_mlx.checkpoint import converter
from qwen3_mlx.cli.commands import main
from qwen3_mlx.checkpoint.converter import convert
from qwen3_mlx.errors import OptionError, Qwen3Error
from qwen3_mlx.model.fast import RowSplit, speed_up
from qwen3_mlx.checkpoint.loader import load_model

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


def small_checkpoint(path: Path, **overrides) -> Path:
    """A float32 Hugging Face checkpoint, vocabulary 512, with the Qwen3 tokenizer's files (which the converter
    copies, never reads)."""
    return make_checkpoint(path, tokenizer=True, vocab_size=512, **SMALL, **overrides)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return small_checkpoint(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """With the real tokenizer (vocabulary 151936), which `mlx_lm.convert` needs."""
    return make_checkpoint(tmp_path_factory.mktemp("hf_tok"), tokenizer=True, seed=1, **SMALL)


# mlx-lm's quantization formats: its default (affine 4-bit), its mixed recipes, its other modes; each written as
# `mlx_lm convert -q --quant-predicate RECIPE` or `-q --q-mode MODE` writes it (no group size or bits given).
MLX_LM_FORMATS = {"affine": {}, **{recipe: {"quant_predicate": recipe} for recipe in QUANT_RECIPES},
                  **{mode: {"q_mode": mode} for mode in ("mxfp4", "nvfp4", "mxfp8")}}


@pytest.fixture(scope="module")
def mlx_lm_folder(hf_tok, tmp_path_factory):
    """mlx-lm's conversion of `hf_tok` in a format of MLX_LM_FORMATS, made once per module."""
    folders = {}

    def folder(name: str) -> Path:
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp("mlx_lm") / name
            mlx_lm_convert(str(hf_tok), str(folders[name]), quantize=True, **MLX_LM_FORMATS[name])
        return folders[name]

    return folder


@pytest.fixture(scope="module")
def mlx_lm_4bit(mlx_lm_folder):
    return mlx_lm_folder("affine")


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


def test_the_formats_cover_every_recipe_and_mode_of_mlx_lm():
    q_mode = next(action for action in configure_parser()._actions if action.dest == "q_mode")
    assert set(MLX_LM_FORMATS) == {"affine", *QUANT_RECIPES, *q_mode.choices}


@pytest.mark.parametrize("name", MLX_LM_FORMATS)
def test_mlx_lm_converted_folder_loads_with_mlx_lm_logits(mlx_lm_folder, name):
    out = mlx_lm_folder(name)
    assert np.abs(logits(load_model(out)) - mlx_lm_logits(out)).max() <= 1e-4


@pytest.mark.parametrize("name", ["mixed_3_6", "mxfp4", "nvfp4", "mxfp8"])
def test_mlx_lm_formats_through_the_fast_modules_give_mlx_lm_logits(mlx_lm_folder, name):
    # Every matmul fused and split in 3 (a CPU technique, so on the CPU), then the compiled decode step.
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        out = mlx_lm_folder(name)
        model = load_model(out, swap=functools.partial(speed_up, threads=3, split_min_cost=0))
        assert isinstance(model.layers[0].self_attn.qkv_proj, RowSplit)
        expected = mlx_lm_logits(out)
        assert np.abs(logits(model) - expected).max() <= 1e-4
        cache = model.make_cache()
        model(IDS[:, :-1], cache)
        last = np.array(model.decode(IDS[:, -1:], cache).astype(mx.float32))
        assert np.abs(last - expected[:, -1]).max() <= 1e-4
    finally:
        mx.set_default_device(device)


def test_a_mixed_recipe_leaves_group_size_null_and_each_layer_gets_its_bits(mlx_lm_folder):
    out = mlx_lm_folder("mixed_3_6")
    block = json.loads((out / "config.json").read_text())["quantization"]
    # Of 2 layers, the last gets 6-bit v_proj and down_proj; the rest is 3-bit.
    assert block["model.layers.0.mlp.down_proj"] == {"group_size": None, "bits": 3, "mode": "affine"}
    assert block["model.layers.1.mlp.down_proj"] == {"group_size": None, "bits": 6, "mode": "affine"}
    model = load_model(out)
    for path, module in model.named_modules():
        if path in block:
            assert (module.group_size, module.bits, module.mode) == (64, block[path]["bits"], "affine"), path


@pytest.mark.parametrize("mode, group_size, bits", [("mxfp4", 32, 4), ("nvfp4", 16, 4), ("mxfp8", 32, 8)])
def test_a_mode_folder_quantizes_every_layer_in_that_mode(mlx_lm_folder, mode, group_size, bits):
    model = load_model(mlx_lm_folder(mode))
    layers = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert len(layers) == 1 + 2 * 7  # the embedding (the head is tied), 7 linears in each of 2 layers
    assert {(m.mode, m.group_size, m.bits, "biases" in m) for m in layers} == {(mode, group_size, bits, False)}


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


@pytest.mark.parametrize("name", MLX_LM_FORMATS)
def test_dequantizing_an_mlx_lm_folder_gives_mlx_lm_dequantized_weights(mlx_lm_folder, tmp_path, name):
    source = mlx_lm_folder(name)
    ours = convert(source, tmp_path / "ours", dequantize=True).path
    mlx_lm_convert(str(source), str(tmp_path / "theirs"), dequantize=True)
    a, b = tensors(ours), tensors(tmp_path / "theirs")
    assert sorted(a) == sorted(b)
    for key, value in b.items():  # mlx-lm leaves mxfp4, nvfp4, mxfp8 weights in bfloat16: ours are all float32
        assert a[key].dtype == mx.float32 and mx.array_equal(a[key], value.astype(mx.float32)), key
    assert "quantization" not in json.loads((ours / "config.json").read_text())
    assert np.abs(logits(load_model(ours)) - mlx_lm_logits(source)).max() <= 1e-4


@pytest.mark.parametrize("name", ["mixed_3_6", "nvfp4"])
def test_an_mlx_lm_folder_is_copied_as_is(mlx_lm_folder, tmp_path, name):
    source = mlx_lm_folder(name)
    out = convert(source, tmp_path / "copy").path
    a, b = tensors(source), tensors(out)
    assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]) for k in a)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == json.loads((source / "config.json").read_text())["quantization"]


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
    sharded = small_checkpoint(tmp_path / "sharded", shard=True)  # the same seed as `hf`
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a = tensors(convert(sharded, tmp_path / "a", quantize=True).path)
    b = tensors(convert(hf, tmp_path / "b", quantize=True).path)
    assert sorted(a) == sorted(b) and all(mx.array_equal(a[k], b[k]) for k in a)


def test_untied_lm_head_is_quantized_with_embed_bits(tmp_path):
    source = small_checkpoint(tmp_path / "untied", tie_word_embeddings=False)
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


def test_a_source_without_tokenizer_json_is_refused_unless_weights_only(tmp_path):
    source = make_checkpoint(tmp_path / "bare", **SMALL)
    with pytest.raises(Qwen3Error) as e:
        convert(source, tmp_path / "out")
    assert str(e.value) == (
        f"{source}: has no tokenizer.json, so the converted model could not generate; copy tokenizer.json and "
        "tokenizer_config.json from the original Hugging Face checkpoint into it, or pass --weights-only to write "
        "the weights alone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare"]
    out = convert(source, tmp_path / "out", weights_only=True).path
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]


def test_cli_refuses_a_source_without_tokenizer_json_in_one_line(tmp_path):
    source = make_checkpoint(tmp_path / "bare", **SMALL)
    result = CliRunner().invoke(main, ["convert", str(source), str(tmp_path / "out")])
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {source}: has no tokenizer.json")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_tokenizer_files_are_copied(hf, tmp_path):
    out = convert(hf, tmp_path / "out").path
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (hf / name).read_bytes(), name


def test_dtype_is_a_name_or_an_mlx_dtype(hf, tmp_path):
    a = tensors(convert(hf, tmp_path / "a", dtype="float16").path)
    b = tensors(convert(hf, tmp_path / "b", dtype=mx.float16).path)
    assert all(a[k].dtype == b[k].dtype == mx.float16 and mx.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "float16"


def test_invalid_combinations_are_option_errors(hf, ours_4bit, tmp_path):
    for kwargs in (dict(quantize=True, dequantize=True), dict(bits=7, quantize=True), dict(embed_bits=8),
                   dict(group_size=48, quantize=True), dict(dtype="int8"), dict(dtype=mx.int8)):
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
    assert re.fullmatch(rf"wrote {out}: 8\.5\d bits per weight, 0\.\d MB in \d+\.\d s\n", result.stdout)
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


def test_cli_weights_only_converts_a_source_without_tokenizer_json(tmp_path):
    source = make_checkpoint(tmp_path / "bare", **SMALL)
    result = CliRunner().invoke(main, ["convert", str(source), str(tmp_path / "out"), "--weights-only"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / "tokenizer.json").exists()
