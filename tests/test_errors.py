"""Bad input, faults and long runs: one clear line naming the file, key or value, and what to do; never a traceback.

Exit codes: 0 success, 1 runtime error (one line on stderr), 2 usage error, 130 interrupted.
"""

import json
import math
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import click
import mlx.core as mx
import mlx.nn as nn
import pytest
import tokenizers
from checkpoints import ONE_LAYER, make_checkpoint
from click.testing import CliRunner
from mlx.utils import tree_flatten

from qwen3_mlx.cli.generate_command import generate
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.generation.single import stream_generate
from qwen3_mlx.checkpoint.loader import load, load_model

ROOT = Path(__file__).resolve().parent.parent
DELETE = object()  # a config value that removes its key
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}


# ---------------------------------------------------------------- checkpoints, built once


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    """One layer, float32, no tokenizer: what the loader tests break."""
    return make_checkpoint(tmp_path_factory.mktemp("floats"), **ONE_LAYER)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """4-bit, group size 32, in mlx-lm's layout (a "quantization" block in config.json)."""
    src = make_checkpoint(tmp_path_factory.mktemp("qsrc"), hidden_size=64, intermediate_size=128,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=64,
                          num_hidden_layers=1)
    model = load_model(src)
    nn.quantize(model, group_size=32, bits=4)
    out = tmp_path_factory.mktemp("q4")
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 32, "bits": 4}}))
    return out


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    """The real Qwen3 tokenizer on a tiny model; 2 KV heads of 64 so a cache that kept growing would show."""
    return make_checkpoint(tmp_path_factory.mktemp("chat"), tokenizer=True, hidden_size=32, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def variant(src: Path, dst: Path, config: dict | None = None, files: dict | None = None, drop=()) -> Path:
    """A copy of `src` (files linked, not copied) with config keys changed, files replaced or removed."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in drop:
            (dst / f.name).symlink_to(f)
    if config is not None:
        merged = {**json.loads((src / "config.json").read_text()), **config}
        files = {**(files or {}), "config.json": json.dumps({k: v for k, v in merged.items() if v is not DELETE})}
    for name, content in (files or {}).items():
        (dst / name).unlink(missing_ok=True)
        if isinstance(content, bytes):
            (dst / name).write_bytes(content)
        else:
            (dst / name).write_text(content)
    return dst


def split(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def with_tensors(src: Path, change) -> bytes:
    """model.safetensors of `src` after `change(dict of arrays)`."""
    tensors = mx.load(str(src / "model.safetensors"))
    change(tensors)
    out = src.parent / f"{src.name}-edit.safetensors"
    mx.save_safetensors(str(out), tensors)
    data = out.read_bytes()
    out.unlink()
    return data


def error_of(fn, *args) -> str:
    with pytest.raises(Qwen3Error) as e:
        fn(*args)
    return str(e.value)


def parse_error(content: str | bytes) -> json.JSONDecodeError | UnicodeDecodeError:
    """What Python says of `content` read as a UTF-8 JSON file. A message carries these words; they are
    Python's, so a test takes them from Python rather than typing them."""
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)) as e:
        json.loads(content.decode("utf-8") if isinstance(content, bytes) else content)
    return e.value


# ---------------------------------------------------------------- the folder


def test_a_path_that_does_not_exist_is_named(tmp_path):
    assert error_of(load, tmp_path / "nope") == (
        f"{tmp_path}/nope: no such folder; pass a checkpoint folder or a Hub repo id like Qwen/Qwen3-1.7B")


def test_a_file_instead_of_a_folder_asks_for_the_folder(floats):
    assert error_of(load, floats / "config.json") == (
        f"{floats}/config.json: is a file; pass the checkpoint folder that holds config.json")


def test_a_folder_without_config_json_is_not_a_checkpoint(floats, tmp_path):
    path = variant(floats, tmp_path / "c", drop={"config.json"})
    assert error_of(load_model, path) == f"{path}/config.json: not found; is this a Qwen3 checkpoint folder?"


def test_pytorch_pickles_are_never_loaded(floats, tmp_path):
    path = variant(floats, tmp_path / "c", drop={"model.safetensors"},
                   files={"pytorch_model.bin": (floats / "model.safetensors").read_bytes()})
    assert error_of(load_model, path) == (
        f"{path}: no *.safetensors weights found (only safetensors are loaded, never pickles)")


def test_hub_repo_id_offline_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "generate.py", "--model", "Qwen/Qwen3-0.6B", "-p", "hi"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == ("error: Qwen/Qwen3-0.6B: no local folder of that name, and not in the Hugging Face cache "
                          "while HF_HUB_OFFLINE is set; download it once online, or pass a local folder\n")


# ---------------------------------------------------------------- config.json


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe", DELETE])
def test_another_architecture_names_its_type_and_what_is_supported(floats, tmp_path, model_type):
    path = variant(floats, tmp_path / "c", config={"model_type": model_type})
    shown = None if model_type is DELETE else model_type
    assert error_of(load_model, path) == (
        f"{path}/config.json: model_type={shown!r} is not supported; "
        "qwen3-mlx runs the dense Qwen3 family (model_type 'qwen3') only")


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide num_attention_heads=2"),
    ({"num_hidden_layers": 0}, "num_hidden_layers=0 must be >= 1"),
    ({"hidden_size": -16}, "hidden_size=-16 must be >= 1"),
    ({"intermediate_size": "32"}, "intermediate_size='32' must be an integer"),
    ({"vocab_size": 64.5}, "vocab_size=64.5 must be an integer"),
    ({"vocab_size": None}, "missing required key 'vocab_size'"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps='tiny' must be a finite number"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes' must be true or false"),
    ({"vocab_size": 2**40}, "vocab_size=1099511627776 is too large (at most 2147483647)"),
    ({"num_attention_heads": 2**20, "head_dim": 2**12},
     "num_attention_heads=1048576 times head_dim=4096 is too large (at most 2147483647)"),
    ({"head_dim": 7}, "head_dim=7 must be even for rotary embeddings"),
    ({"quantization": [4]}, "quantization=[4] must be an object"),
    ({"quantization": {"group_size": 32, "bits": 7}}, "quantization.bits=7 must be one of 2, 3, 4, 5, 6, 8"),
    ({"rope_parameters": {**YARN, "rope_theta": 1.0}}, "rope_theta=1.0 must be > 1 with rope_scaling of type 'yarn'"),
    ({"rope_parameters": {**YARN, "beta_fast": 1e308}}, "rope_scaling.beta_fast=1e+308 is out of range"),
    ({"rope_parameters": {**YARN, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": -10 / math.log(4.0)}},
     "rope_scaling.mscale_all_dim=-7.213475204444817 makes YaRN's attention scale divide by zero"),
])
def test_config_values_that_make_no_sense_name_the_key(floats, tmp_path, change, message):
    path = variant(floats, tmp_path / "c", config=change)
    assert error_of(load_model, path) == f"{path}/config.json: {message}"


def test_more_layers_than_the_weights_hold_fails_before_building_them(floats, tmp_path):
    path = variant(floats, tmp_path / "c", config={"num_hidden_layers": 10**9})
    start = time.perf_counter()
    assert error_of(load_model, path) == (
        f"{path}/config.json: num_hidden_layers=1000000000 but the weights hold 1 layers; "
        "the config and the weights do not belong together")
    assert time.perf_counter() - start < 5


def test_config_json_that_is_not_an_object_is_named(floats, tmp_path):
    path = variant(floats, tmp_path / "c", files={"config.json": "[1, 2]"})
    assert error_of(load_model, path) == f"{path}/config.json: must hold a JSON object"


@pytest.mark.parametrize("content", ["{model_type: qwen3", "", b"\xff\xfe{}"])
def test_config_json_that_is_not_json_carries_the_parsers_reason(floats, tmp_path, content):
    path = variant(floats, tmp_path / "c", files={"config.json": content})
    assert error_of(load_model, path) == (
        f"{path}/config.json: not valid JSON ({parse_error(content)}); the file is corrupt, download it again")


def test_config_json_that_is_a_folder_cannot_be_read(floats, tmp_path):
    path = variant(floats, tmp_path / "c", drop={"config.json"})
    (path / "config.json").mkdir()
    with pytest.raises(OSError) as e:  # the system's words for it, which the message carries
        open(path / "config.json")
    assert error_of(load_model, path) == (
        f"{path}/config.json: could not be read ({e.value.strerror}); check that it is a readable file")


# ---------------------------------------------------------------- weights


def test_a_missing_weight_is_named(floats, tmp_path):
    path = variant(floats, tmp_path / "c", files={
        "model.safetensors": with_tensors(floats, lambda w: w.pop("model.norm.weight"))})
    assert error_of(load_model, path) == f"{path}: weight 'model.norm.weight' is missing; 1 missing in all"


def test_an_extra_weight_is_named(floats, tmp_path):
    path = variant(floats, tmp_path / "c", files={
        "model.safetensors": with_tensors(floats, lambda w: w.update({"model.extra.weight": mx.zeros(3)}))})
    assert error_of(load_model, path) == f"{path}: unexpected weight 'model.extra.weight'; 1 unexpected in all"


def test_a_weight_of_the_wrong_shape_names_both_shapes(floats, tmp_path):
    path = variant(floats, tmp_path / "c", files={
        "model.safetensors": with_tensors(floats, lambda w: w.update({"model.norm.weight": mx.zeros(17)}))})
    assert error_of(load_model, path) == f"{path}: weight 'model.norm.weight' has shape (17,), expected (16,)"


def test_a_weight_of_the_wrong_dtype_is_named(floats, tmp_path):
    path = variant(floats, tmp_path / "c", files={
        "model.safetensors": with_tensors(floats, lambda w: w.update({"model.norm.weight": mx.zeros(16, mx.int32)}))})
    assert error_of(load_model, path) == f"{path}: weight 'model.norm.weight' has dtype int32, expected a float type"


def test_an_index_naming_a_missing_shard_says_the_download_is_incomplete(floats, tmp_path):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    path = variant(floats, tmp_path / "c", files={"model.safetensors.index.json": json.dumps(index)})
    assert error_of(load_model, path) == (f"{path}/model-00002-of-00002.safetensors: listed in "
                                          "model.safetensors.index.json but missing; the download is incomplete")


def test_an_index_that_is_not_an_object_is_corrupt(floats, tmp_path):
    path = variant(floats, tmp_path / "c", files={"model.safetensors.index.json": "[]"})
    assert error_of(load_model, path) == (f"{path}/model.safetensors.index.json: has no 'weight_map' object; "
                                          "the file is corrupt, download it again")


# ---------------------------------------------------------------- damaged safetensors


@pytest.mark.parametrize("keep", [0, 5, 8, 100])
def test_a_file_cut_inside_its_header_is_truncated(floats, tmp_path, keep):
    data = (floats / "model.safetensors").read_bytes()
    path = variant(floats, tmp_path / "c", files={"model.safetensors": data[:keep]})
    file = path / "model.safetensors"
    (n,) = struct.unpack("<Q", data[:8])
    expected = (f"{file}: truncated ({keep} bytes); download it again" if keep < 8 else
                f"{file}: header claims {n} bytes but the file has {keep}; the file is corrupt or truncated, "
                "download it again")
    assert error_of(load_model, path) == expected


def test_a_file_cut_inside_its_data_names_the_tensor(floats, tmp_path):
    header, data = split(floats / "model.safetensors")
    path = variant(floats, tmp_path / "c", files={"model.safetensors": join(header, data[:-1])})
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    assert error_of(load_model, path) == (
        f"{path}/model.safetensors: tensor {last!r} lies at bytes {begin}..{end} but the data has {len(data) - 1}; "
        "the file is truncated, download it again")


def test_a_header_that_is_not_json_is_corrupt(floats, tmp_path):
    raw = bytearray((floats / "model.safetensors").read_bytes())
    raw[8] = ord("x")
    path = variant(floats, tmp_path / "c", files={"model.safetensors": bytes(raw)})
    assert error_of(load_model, path) == (
        f"{path}/model.safetensors: header is not valid JSON; the file is corrupt, download it again")


def test_offsets_past_the_end_name_the_tensor(floats, tmp_path):
    header, data = split(floats / "model.safetensors")
    header["model.norm.weight"]["data_offsets"] = [len(data), len(data) + 64]
    path = variant(floats, tmp_path / "c", files={"model.safetensors": join(header, data)})
    assert error_of(load_model, path) == (
        f"{path}/model.safetensors: tensor 'model.norm.weight' lies at bytes {len(data)}..{len(data) + 64} but the "
        f"data has {len(data)}; the file is truncated, download it again")


def test_a_size_that_disagrees_with_the_shape_is_corrupt(floats, tmp_path):
    header, data = split(floats / "model.safetensors")
    header["model.norm.weight"]["shape"] = [32]
    path = variant(floats, tmp_path / "c", files={"model.safetensors": join(header, data)})
    assert error_of(load_model, path) == (
        f"{path}/model.safetensors: tensor 'model.norm.weight' has 64 bytes for shape [32] F32; the file is corrupt")


@pytest.mark.parametrize("change, message", [
    ({"dtype": ["F32"]}, "tensor 'model.norm.weight' has a malformed header entry; the file is corrupt"),
    ({"shape": [-16]}, "tensor 'model.norm.weight' has a malformed header entry; the file is corrupt"),
    ({"data_offsets": [0]}, "tensor 'model.norm.weight' has a malformed header entry; the file is corrupt"),
])
def test_a_malformed_header_entry_names_the_tensor(floats, tmp_path, change, message):
    header, data = split(floats / "model.safetensors")
    header["model.norm.weight"].update(change)
    path = variant(floats, tmp_path / "c", files={"model.safetensors": join(header, data)})
    assert error_of(load_model, path) == f"{path}/model.safetensors: {message}"


def test_metadata_that_is_not_strings_is_corrupt(floats, tmp_path):
    header, data = split(floats / "model.safetensors")
    header["__metadata__"] = {"format": 1}
    path = variant(floats, tmp_path / "c", files={"model.safetensors": join(header, data)})
    assert error_of(load_model, path) == (
        f"{path}/model.safetensors: __metadata__ is not an object of strings; the file is corrupt")


def test_a_header_claiming_gigabytes_fails_before_any_large_allocation(floats, tmp_path):
    raw = (floats / "model.safetensors").read_bytes()
    path = variant(floats, tmp_path / "c", files={"model.safetensors": struct.pack("<Q", 5 * 2**30) + raw[8:]})
    tracemalloc.start()
    try:
        message = error_of(load_model, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message == (f"{path}/model.safetensors: header claims {5 * 2**30} bytes but the file has {len(raw)}; "
                       "the file is corrupt or truncated, download it again")
    assert peak < 8 * 2**20


# ---------------------------------------------------------------- quantization block against the weights


def test_the_quantized_fixture_loads(quantized):
    assert load_model(quantized).model.embed_tokens.bits == 4


def test_bits_8_for_4_bit_weights_names_the_tensor_and_both_shapes(quantized, tmp_path):
    path = variant(quantized, tmp_path / "c", config={"quantization": {"group_size": 32, "bits": 8}})
    assert error_of(load_model, path) == (
        f"{path}: weight 'model.embed_tokens.weight' has shape (64, 8), expected (64, 16); "
        "config.json's quantization bits/group_size disagree with the weights")


def test_a_group_size_that_does_not_divide_the_layers_is_refused(quantized, tmp_path):
    # Checked by the loader itself: MLX's own wording of this refusal is not ours to pin.
    path = variant(quantized, tmp_path / "c", config={"quantization": {"group_size": 128, "bits": 4}})
    assert error_of(load_model, path) == (
        f"{path}/config.json: quantization.group_size=128 does not divide model.embed_tokens's input size 64; "
        "the block disagrees with the weights")
    override = {"group_size": 32, "bits": 4, "model.layers.0.self_attn.q_proj": {"group_size": 128, "bits": 4}}
    path = variant(quantized, tmp_path / "d", config={"quantization": override})
    assert error_of(load_model, path) == (
        f"{path}/config.json: quantization.model.layers.0.self_attn.q_proj.group_size=128 does not divide "
        "model.layers.0.self_attn.q_proj's input size 64; the block disagrees with the weights")


def test_a_quantization_block_on_float_weights_is_refused(floats, tmp_path):
    path = variant(floats, tmp_path / "c", config={"quantization": {"group_size": 32, "bits": 4}})
    assert error_of(load_model, path) == (
        f"{path}/config.json: has a quantization block (bits 4, group_size 32) but the weights are not quantized; "
        "remove the block")


def test_quantized_weights_without_a_block_are_refused(quantized, tmp_path):
    path = variant(quantized, tmp_path / "c", config={"quantization": DELETE})
    assert error_of(load_model, path) == (
        f"{path}: unexpected weight 'model.embed_tokens.biases' (the weights are quantized but config.json has no "
        "matching quantization block); 16 unexpected in all")


@pytest.mark.parametrize("override, message", [
    ("x", "quantization.model.embed_tokens='x' must be an object or false"),
    ({"bits": 7}, "quantization.model.embed_tokens.bits=7 must be one of 2, 3, 4, 5, 6, 8"),
    ({"group_size": "32"}, "quantization.model.embed_tokens.group_size='32' must be one of 32, 64, 128"),
    ({"mode": "int4"}, "quantization.model.embed_tokens.mode='int4' is not supported; use one of affine, mxfp4, "
                       "nvfp4, mxfp8"),
    ({"mode": "mxfp4", "group_size": 64}, "quantization.model.embed_tokens.group_size=64 must be 32 with mode "
                                          "'mxfp4'"),
])
def test_a_bad_per_layer_override_names_the_layer(quantized, tmp_path, override, message):
    block = {"group_size": 32, "bits": 4, "model.embed_tokens": override}
    path = variant(quantized, tmp_path / "c", config={"quantization": block})
    assert error_of(load_model, path) == f"{path}/config.json: {message}"


def test_an_override_on_a_layer_that_cannot_be_quantized_is_ignored(quantized, tmp_path):
    block = {"group_size": 32, "bits": 4, "model.norm": {"group_size": 32, "bits": 8}}
    model = load_model(variant(quantized, tmp_path / "c", config={"quantization": block}))
    assert isinstance(model.model.norm, nn.RMSNorm)
    layers = {path: (m.group_size, m.bits) for path, m in model.named_modules() if "scales" in m}
    linears = [f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert layers == {path: (32, 4) for path in ["model.embed_tokens", *linears]}


# ---------------------------------------------------------------- tokenizer files


def test_missing_tokenizer_json_says_where_to_get_it(chat_ckpt, tmp_path):
    path = variant(chat_ckpt, tmp_path / "c", drop={"tokenizer.json"})
    assert error_of(load, path) == (f"{path}/tokenizer.json: not found; copy tokenizer.json from the original "
                                    "Hugging Face checkpoint into this folder")


def not_json(file: Path, content: str | bytes) -> str:
    """The message for a tokenizer file holding `content`: our words around json's line, column and reason."""
    e = parse_error(content)
    return (f"{file}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); fix it or re-download it from "
            "the original checkpoint")


def test_truncated_tokenizer_json_is_named(chat_ckpt, tmp_path):
    cut = (chat_ckpt / "tokenizer.json").read_bytes()[:1000]
    path = variant(chat_ckpt, tmp_path / "c", files={"tokenizer.json": cut})
    assert error_of(load, path) == not_json(path / "tokenizer.json", cut)


def test_tokenizer_config_json_that_is_not_json_is_named(chat_ckpt, tmp_path):
    content = '{"chat_template": '
    path = variant(chat_ckpt, tmp_path / "c", files={"tokenizer_config.json": content})
    assert error_of(load, path) == not_json(path / "tokenizer_config.json", content)


def test_tokenizer_json_that_tokenizers_cannot_parse_carries_their_reason(chat_ckpt, tmp_path):
    path = variant(chat_ckpt, tmp_path / "c", files={"tokenizer.json": '{"model": 1}'})
    with pytest.raises(Exception) as e:  # tokenizers' words for it (a bare Exception), which the message carries
        tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    assert error_of(load, path) == (f"{path}/tokenizer.json: tokenizers could not parse it ({e.value}); "
                                    "re-download it from the original checkpoint")


@pytest.mark.parametrize("name, content, message", [
    ("chat_template.jinja", b"\xff\xfe{{ x }}", "not UTF-8 text; re-download it from the original checkpoint"),
    ("generation_config.json", "[1]", "expected a JSON object, got list; re-download it from the original "
                                      "checkpoint"),
])
def test_corrupt_tokenizer_files_are_named(chat_ckpt, tmp_path, name, content, message):
    path = variant(chat_ckpt, tmp_path / "c", files={name: content})
    assert error_of(load, path) == f"{path}/{name}: {message}"


@pytest.mark.parametrize("change, message", [
    ({"temperature": "hot"}, "temperature='hot' must be a number"),
    ({"top_p": 5}, "top_p must be in (0, 1], got 5.0"),
    ({"top_k": -3}, "top_k must be >= 0 (0 = off), got -3"),
])
def test_generation_config_values_are_checked_when_loaded(chat_ckpt, tmp_path, change, message):
    config = {**json.loads((chat_ckpt / "generation_config.json").read_text()), **change}
    path = variant(chat_ckpt, tmp_path / "c", files={"generation_config.json": json.dumps(config)})
    assert error_of(load, path) == f"{path}/generation_config.json: {message}; fix it or remove the file"


# ---------------------------------------------------------------- the generate command


def cli(ckpt: Path, *args: str, input: bytes | None = None):
    return CliRunner().invoke(generate, ["--model", str(ckpt), *args], input=input)


def one_line_error(result, code: int = 1) -> str:
    """The message of a runtime error: exit 1, nothing on stdout, exactly one line on stderr."""
    assert (result.exit_code, result.stdout) == (code, ""), result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr[len("error: ") : -1]


def click_usage_error(args: list[str], refusal: click.Option | str) -> str:
    """What click writes for a usage error of a command named generate: `args` refused by `refusal`, an
    option declared as the CLI must declare it; or `refusal`, our own message. The framing and a range's
    wording are click's, so they are taken from click rather than typed here."""

    def refuse() -> None:
        raise click.UsageError(refusal)

    if isinstance(refusal, click.Option):
        result = CliRunner().invoke(click.Command("generate", params=[refusal]), args)
    else:
        result = CliRunner().invoke(click.Command("generate", callback=refuse), [])
    assert result.exit_code == 2, result.output
    return result.stderr


@pytest.mark.parametrize("args, refusal", [
    (["--temp", "-1"], click.Option(["--temp"], type=click.FloatRange(min=0))),
    (["--top-p", "0"], click.Option(["--top-p"], type=click.FloatRange(0, 1, min_open=True))),
    (["--top-p", "1.5"], click.Option(["--top-p"], type=click.FloatRange(0, 1, min_open=True))),
    (["--top-k", "-1"], click.Option(["--top-k"], type=click.IntRange(min=0))),
    (["--thinking-budget", "-1"], click.Option(["--thinking-budget"], type=click.IntRange(min=0))),
    (["--max-tokens", "-5"], click.Option(["--max-tokens", "-m"], type=click.IntRange(min=0))),
    (["--max-kv-size", "0"], click.Option(["--max-kv-size"], type=click.IntRange(min=1))),
    (["--stop", ""], "stop='': a stop string must be non-empty text"),
    (["--extra-eos-token", ""], "stop='': a stop string must be non-empty text"),
    (["--max-kv-size", "4"], "max_kv_size=4 must be larger than the kept prefix (4 tokens: the first tokens, "
                             "kept as attention sinks); raise it"),
    (["--max-kv-size", "10", "-s", "You are a helpful assistant."],
     "max_kv_size=10 must be larger than the kept prefix (11 tokens: the system prompt); raise it or shorten the "
     "system prompt"),
])
def test_invalid_options_are_usage_errors(chat_ckpt, args, refusal):
    result = cli(chat_ckpt, "-p", "hi", *args)
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == click_usage_error(args, refusal)


def test_a_prompt_longer_than_the_context_names_max_kv_size(chat_ckpt):
    result = cli(chat_ckpt, "--raw", "-p", "word" + " word" * 4999)
    assert one_line_error(result) == (
        "the prompt has 5000 tokens but the model's context is 4096 (max_position_embeddings); shorten it, "
        "or use a rotating cache (--max-kv-size, max_kv_size in the API)")


@pytest.mark.parametrize("template, attribute, owner", [
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "__class__", "list"),
    ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "__init__", "type"),
    ("{{ ''.__class__ }}", "__class__", "str"),  # jinja's sandbox alone would print "" and carry on
])
def test_a_template_reaching_python_internals_is_refused(chat_ckpt, tmp_path, template, attribute, owner):
    # These words are ours: template._Sandbox writes them.
    path = variant(chat_ckpt, tmp_path / "c", files={"chat_template.jinja": template})
    assert one_line_error(cli(path, "-p", "hi")) == (
        f"{path}/chat_template.jinja: chat template refused by the sandbox: access to attribute "
        f"'{attribute}' of '{owner}' object is unsafe.")


@pytest.mark.parametrize("args, stdin", [
    (["--raw", "-p", ""], None), (["-p", ""], None), (["-p", " \n "], None), (["-p", "-"], b""),
    (["--raw", "-p", "-"], b"\n"),
])
def test_an_empty_prompt_is_refused_with_and_without_the_template(chat_ckpt, args, stdin):
    assert one_line_error(cli(chat_ckpt, *args, input=stdin)) == "the prompt is empty; give some text"


def test_stdin_that_is_not_utf8_is_one_line(chat_ckpt):
    result = cli(chat_ckpt, "-p", "-", input=b"\xff\xfe")
    assert one_line_error(result) == "stdin: not valid UTF-8 (byte 0xff at offset 0); pipe UTF-8 text"


def test_a_stop_string_that_never_comes_lets_the_run_finish(chat_ckpt):
    result = cli(chat_ckpt, "-p", "hi", "--stop", "never-said", "--max-tokens", "5", "--seed", "0", "-v")
    assert result.exit_code == 0
    assert "reasoning: 0 tokens, answer: 5 tokens\n" in result.stderr
    assert result.stderr.endswith("finish: length\n")


def test_a_checkpoint_error_through_the_cli_is_one_line(floats, tmp_path):
    path = variant(floats, tmp_path / "c", drop={"config.json"})
    assert one_line_error(cli(path, "-p", "hi")) == f"{path}/config.json: not found; is this a Qwen3 checkpoint folder?"


def test_ctrl_c_keeps_the_text_prints_the_figures_and_exits_130(chat_ckpt):
    proc = subprocess.Popen(
        [sys.executable, "generate.py", "--model", str(chat_ckpt), "-p", "hi", "--max-tokens", "100000", "--seed", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A shell runs background jobs with SIGINT ignored, and a child inherits that: undo it, as a
        # terminal's foreground job has it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "no output within 60 s"
        first = os.read(proc.stdout.fileno(), 4096)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    text, err = (first + out).decode(), err.decode()
    assert proc.returncode == 130, err
    assert text.strip() and text.endswith("\n")
    figures = re.fullmatch(r"prompt: (\d+) tokens \(0 cached\), \1 computed at [\d.]+ tok/s\n"
                           r"reasoning: (\d+) tokens, answer: (\d+) tokens\n"
                           r"generation: [\d.]+ tok/s, time to first token: [\d.]+ s\n"
                           r"peak memory: [\d.]+ GB, finish: interrupted\ninterrupted\n", err)
    assert figures, err
    assert int(figures[2]) + int(figures[3]) > 0


# ---------------------------------------------------------------- long runs


def test_rotating_cache_soak_keeps_memory_flat_and_output_coming(chat_ckpt):
    model, tokenizer = load(chat_ckpt)
    window, total = 64, 360  # between the marks (100, 340) the window turns over almost 4 times
    memory, late_text = {}, ""
    for chunk in stream_generate(model, tokenizer, "Hello", raw=True, think=False, temp=0.0, max_kv_size=window,
                                 max_tokens=total, logit_bias={t: float("-inf") for t in tokenizer.eos_token_ids}):
        done = chunk.stats.generated_tokens
        for mark in (100, total - 20):  # measured inside the run: once it ends, its cache is freed
            if done >= mark and mark not in memory:
                mx.synchronize()  # the queued step's temporaries are gone
                memory[mark] = mx.get_active_memory()
        if done > total - 40:
            late_text += chunk.text
    assert (chunk.stats.generated_tokens, chunk.stats.finish_reason) == (total, "length")
    assert late_text.strip()
    # Only the token history grows (4 bytes a token); a plain cache would add 512 KB every 256 tokens.
    assert memory[total - 20] - memory[100] < 64 * 1024, memory
