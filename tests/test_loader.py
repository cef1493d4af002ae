"""The loader's options and what it hands on: dtype by name or as an MLX dtype, generation_config on the tokenizer."""

import json

import mlx.core as mx
import pytest
from checkpoints import ONE_LAYER, make_checkpoint

from qwen3_mlx.errors import OptionError
from qwen3_mlx.checkpoint.loader import load, load_model


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("floats"), **ONE_LAYER)


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("chat"), tokenizer=True, hidden_size=32, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=1)


@pytest.mark.parametrize("dtype", ["bfloat16", mx.bfloat16])
def test_dtype_is_a_name_or_an_mlx_dtype(floats, dtype):
    model = load_model(floats, dtype)
    assert model.model.norm.weight.dtype == model.model.embed_tokens.weight.dtype == mx.bfloat16


def test_load_takes_an_mlx_dtype(chat_ckpt):
    model, _ = load(chat_ckpt, dtype=mx.float16)
    assert model.model.norm.weight.dtype == mx.float16


@pytest.mark.parametrize("dtype", ["int8", mx.int8, "fp16", 16])
def test_another_dtype_is_an_option_error_before_anything_is_read(floats, tmp_path, dtype):
    with pytest.raises(OptionError) as e:
        load_model(tmp_path / "not-even-a-folder", dtype)
    assert str(e.value) == f"dtype={dtype!r} must be one of float16, bfloat16, float32, as a name or an mlx.core dtype"


def test_a_bad_dtype_fails_before_a_hub_download(monkeypatch):
    def download(*args, **kwargs):
        raise AssertionError("downloaded")

    monkeypatch.setattr("huggingface_hub.snapshot_download", download)
    with pytest.raises(OptionError):
        load("Qwen/Qwen3-0.6B", dtype="int4")


def test_the_tokenizer_carries_the_checkpoints_generation_config(chat_ckpt):
    _, tokenizer = load(chat_ckpt)
    assert tokenizer.generation_config == json.loads((chat_ckpt / "generation_config.json").read_text())
