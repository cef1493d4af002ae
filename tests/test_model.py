"""Parity of our Qwen3 with Hugging Face transformers on the same weights, in float32."""

import functools
import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from transformers import Qwen3ForCausalLM

from checkpoints import SHAPES, make_checkpoint
from qwen3_mlx.model.config import ModelArgs
from qwen3_mlx.errors import ConfigError
from qwen3_mlx.model.compiled import CompiledDecode
from qwen3_mlx.model.fast import FusedMLP, RowSplit, RowSplitEmbedding, SplitMLP, speed_up
from qwen3_mlx.checkpoint.loader import load_model
from qwen3_mlx.model.model import Model

TOL = 1e-4


def reference_logits(path, ids):
    ref = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.tensor(ids)).logits.numpy()


@pytest.fixture
def on_cpu():
    """Splitting matmuls across threads is a CPU technique: tests of it run on the CPU on any machine."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


@pytest.fixture(scope="module", params=list(SHAPES))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return make_checkpoint(path, seed=len(request.param), shard=request.param == "gqa2", **SHAPES[request.param])


@pytest.mark.parametrize("length", [1, 45])
def test_logits_match_transformers(checkpoint, length):
    ids = np.random.RandomState(length).randint(0, 512, size=(1, length))
    ours = np.array(load_model(checkpoint)(mx.array(ids)))
    assert np.abs(ours - reference_logits(checkpoint, ids)).max() <= TOL


def test_fused_projections_match_transformers(checkpoint):
    ids = np.random.RandomState(3).randint(0, 512, size=(1, 45))
    model = speed_up(load_model(checkpoint), threads=1)
    assert "qkv_proj" in model.layers[0].self_attn and "gate_up_proj" in model.layers[0].mlp
    assert np.abs(np.array(model(mx.array(ids))) - reference_logits(checkpoint, ids)).max() <= TOL


def test_fused_quantized_projections_give_the_same_logits(tmp_path):
    model = load_model(make_checkpoint(tmp_path))
    nn.quantize(model, group_size=32, bits=4)
    ids = mx.array(np.random.RandomState(4).randint(0, 512, size=(1, 20)))
    unfused = np.array(model(ids))
    speed_up(model, threads=1)
    assert isinstance(model.layers[0].mlp.gate_up_proj, nn.QuantizedLinear)
    assert np.abs(np.array(model(ids)) - unfused).max() <= 1e-5


def test_a_sharded_checkpoint_loads_from_all_its_files(tmp_path):
    path = make_checkpoint(tmp_path, shard=True)
    assert len(list(path.glob("*.safetensors"))) > 1 and (path / "model.safetensors.index.json").exists()
    ids = np.arange(20)[None] % 512
    assert np.abs(np.array(load_model(path)(mx.array(ids))) - reference_logits(path, ids)).max() <= TOL


def test_yarn_changes_logits_beyond_original_context(tmp_path):
    yarn = make_checkpoint(tmp_path / "yarn", **SHAPES["yarn"])
    plain = make_checkpoint(tmp_path / "plain", max_position_embeddings=128)
    ids = mx.array(np.arange(60)[None] % 512)
    assert np.abs(np.array(load_model(yarn)(ids)) - np.array(load_model(plain)(ids))).max() > 1e-2


def test_yarn_in_legacy_rope_scaling_format(tmp_path):
    path = make_checkpoint(tmp_path, **SHAPES["yarn"])
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    (path / "config.json").write_text(json.dumps(config))
    ids = np.arange(50)[None] % 512
    assert np.abs(np.array(load_model(path)(mx.array(ids))) - reference_logits(path, ids)).max() <= TOL


@pytest.mark.parametrize("shape", ["gqa4_headdim", "yarn"])
def test_decoding_through_cache_matches_full_forward(tmp_path, shape):
    model = load_model(make_checkpoint(tmp_path, **SHAPES[shape]))
    ids = mx.array(np.random.RandomState(1).randint(0, 512, size=(1, 300)))
    full = model(ids)
    cache = model.make_cache()
    chunks = [model(ids[:, :7], cache)]  # a prefill chunk, then one token at a time across a 256 step
    chunks += [model(ids[:, i : i + 1], cache) for i in range(7, 300)]
    assert cache[0].offset == 300
    assert np.abs(np.array(mx.concatenate(chunks, axis=1)) - np.array(full)).max() <= TOL


def test_full_qwen3_1_7b_shape_builds_without_weights():
    args = ModelArgs.from_dict(dict(
        model_type="qwen3", hidden_size=2048, num_hidden_layers=28, intermediate_size=6144,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        rope_theta=1000000, rms_norm_eps=1e-6, tie_word_embeddings=True, unknown_key=3))
    assert (args.head_dim, args.num_key_value_heads, args.rope_scaling) == (128, 8, None)
    # Parameters are created lazily, so building the 1.7B model allocates nothing.
    shapes = {k: v.shape for k, v in tree_flatten(Model(args).parameters())}
    assert shapes["model.layers.27.self_attn.k_proj.weight"] == (1024, 2048)
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (128,)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (6144, 2048)
    assert "lm_head.weight" not in shapes
    # The model card: 1.7B parameters, 1.4B of them outside the (tied) embedding.
    total = sum(math.prod(s) for s in shapes.values())
    assert (total, total - 151936 * 2048) == (1_720_574_976, 1_409_410_048)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "config.json: model_type='llama' is not supported; qwen3-mlx runs the dense Qwen3 family (model_type 'qwen3') only"),
    ({"num_key_value_heads": 3}, "config.json: num_key_value_heads=3 does not divide num_attention_heads=4"),
    ({"num_hidden_layers": 0}, "config.json: num_hidden_layers=0 must be >= 1"),
    ({"hidden_size": "64"}, "config.json: hidden_size='64' must be an integer"),
    ({"hidden_size": None}, "config.json: missing required key 'hidden_size'"),
    ({"rms_norm_eps": -1}, "config.json: rms_norm_eps=-1 must be > 0"),
    ({"head_dim": 15}, "config.json: head_dim=15 must be even for rotary embeddings"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "config.json: rope_scaling type 'linear' is not supported; use 'yarn' or remove it"),
])
def test_invalid_config_names_the_key(change, message):
    base = dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_dict({**base, **change})
    assert str(e.value) == message


def test_matmuls_split_across_threads_match_transformers(checkpoint, on_cpu):
    ids = np.random.RandomState(5).randint(0, 512, size=(1, 45))
    # Every matmul split, however small, in 3 blocks: uneven ones when rows are not a multiple of 3.
    model = speed_up(load_model(checkpoint), threads=3, split_min_cost=0)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    head = model.model.embed_tokens if model.args.tie_word_embeddings else model.lm_head
    assert isinstance(attn.qkv_proj, RowSplit) and isinstance(head, RowSplit)
    assert len(attn.o_proj._streams) == 2  # and the caller's: 64 rows in blocks of 22, 22 and 20
    # The MLP in blocks of its intermediate size (160), at multiples of 32: gate and up rows, down columns.
    assert isinstance(mlp, SplitMLP)
    assert [b.gate_up_proj.weight.shape[0] for b in mlp.blocks] == [128, 128, 64]
    assert [b.down_proj.weight.shape for b in mlp.blocks] == [(64, 64), (64, 64), (64, 32)]
    assert np.abs(np.array(model(mx.array(ids))) - reference_logits(checkpoint, ids)).max() <= TOL


@pytest.mark.parametrize("bits", [4, 6])  # 6 bits: a group's inputs straddle the packed 32-bit words
def test_split_quantized_matmuls_give_the_same_logits(tmp_path, on_cpu, bits):
    model = load_model(make_checkpoint(tmp_path))
    nn.quantize(model, group_size=32, bits=bits)
    ids = mx.array(np.random.RandomState(6).randint(0, 512, size=(1, 20)))
    whole = np.array(model(ids))
    speed_up(model, threads=3, split_min_cost=0)
    assert isinstance(model.model.embed_tokens, RowSplitEmbedding)
    assert isinstance(model.model.embed_tokens.layer, nn.QuantizedEmbedding)
    assert isinstance(model.layers[0].self_attn.qkv_proj.layer, nn.QuantizedLinear)
    assert [b.down_proj.scales.shape for b in model.layers[0].mlp.blocks] == [(64, 2), (64, 2), (64, 1)]
    assert np.abs(np.array(model(ids)) - whole).max() <= 1e-5


def test_small_matmuls_are_not_split(checkpoint, on_cpu):
    model = speed_up(load_model(checkpoint), threads=2)
    assert isinstance(model.layers[0].mlp, FusedMLP)
    # Small matmuls are split only for many rows (a batch, a prompt): a matmul of M rows counts for
    # 1 + (M - 1) x 3/7 of one row's cost, against 2**18 weights' worth.
    splits = [m for _, m in model.named_modules() if isinstance(m, RowSplit)]
    assert splits and all(m._min_rows > 1 for m in splits)
    if model.args.tie_word_embeddings:
        head = model.model.embed_tokens  # 512 x 64 = 32k weights: from 1 + 7 x 7/3 rows on
        assert isinstance(head, RowSplit) and head._min_rows == 18
        x = mx.random.normal((1, 17, 64))
        assert mx.array_equal(head.as_linear(x), head.layer.as_linear(x))  # fewer rows: the layer whole


def test_nothing_is_split_off_the_cpu_by_default(checkpoint, monkeypatch):
    model = load_model(checkpoint)
    # A GPU default device, faked where there is none: only speed_up's choice is checked.
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu, 0))
    speed_up(model, split_min_cost=0)
    monkeypatch.undo()
    assert isinstance(model.layers[0].mlp, FusedMLP)
    assert not isinstance(model.layers[0].self_attn.o_proj, RowSplit)
    assert type(model.layers[0].self_attn).__name__ == "FusedAttention"  # no CPU attention either


def _decode_one_token_at_a_time(checkpoint, model):
    # The compiled graph, across the cache buffer's growth at 256 tokens and after a trim.
    ids = np.random.RandomState(7).randint(0, 512, size=(1, 262))
    cache = model.make_cache()
    model(mx.array(ids[:, :250]), cache)
    steps = [model.decode(mx.array(ids[:, t : t + 1]), cache) for t in range(250, 260)]
    for c in cache:
        c.trim(3)
    steps += [model.decode(mx.array(ids[:, t : t + 1]), cache) for t in range(257, 262)]
    assert isinstance(model.decode, CompiledDecode)
    assert cache[0].offset == 262 and cache[0].keys.shape[2] == 512
    ref = reference_logits(checkpoint, ids)
    expected = np.concatenate([ref[:, 250:260], ref[:, 257:262]], axis=1)
    assert np.abs(np.array(mx.stack(steps, axis=1)) - expected).max() <= TOL


def test_compiled_decoding_matches_transformers(checkpoint):
    _decode_one_token_at_a_time(checkpoint, speed_up(load_model(checkpoint), threads=1))


def test_compiled_decoding_split_across_threads_matches_transformers(checkpoint, on_cpu):
    model = speed_up(load_model(checkpoint), threads=2, split_min_cost=0)
    assert isinstance(model.layers[0].mlp, SplitMLP)
    _decode_one_token_at_a_time(checkpoint, model)


@pytest.mark.parametrize("split", [False, True])
def test_loading_peaks_at_the_size_of_the_fused_weights(tmp_path, split):
    # Fused (and split) while the weights are read, so the unfused arrays never exist alongside.
    device = mx.default_device()
    if split:
        mx.set_default_device(mx.cpu)
    try:
        path = make_checkpoint(tmp_path)
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        swap = functools.partial(speed_up, threads=2 if split else 1, split_min_cost=0)
        model = load_model(path, swap=swap)
        weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        assert isinstance(model.layers[0].mlp, SplitMLP if split else FusedMLP)
        assert mx.get_peak_memory() - before - weights < 1024  # a gate/up alone is 80 kB
    finally:
        mx.set_default_device(device)
