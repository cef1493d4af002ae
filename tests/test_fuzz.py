"""Fuzzing the loader: random and mutated safetensors files and config.json dicts either load or raise Qwen3Error.

Never another exception, never a crash.
"""

import json
import math
import struct
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from checkpoints import ONE_LAYER, make_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.checkpoint.loader import load_model
from qwen3_mlx.model.model import Model

FUZZ = settings(derandomize=True, max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "U32", "I16", "U16", "I8", "U8", "BOOL"]
SAME_SIZE = {"F32": ["I32", "U32"], "F16": ["BF16", "I16", "U16"], "BF16": ["F16", "I16", "U16"]}
CONFIG_KEYS = ["model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta",
               "max_position_embeddings", "tie_word_embeddings", "attention_bias", "rope_scaling",
               "rope_parameters", "quantization", "quantization_config", "eos_token_id"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 2, 8, 16, 32, 64, 2**31, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
numbers = (st.integers(-2, 2**40) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0, 1, 1.0, 0.5, 4.0, 32, 10000.0, 1e-308, 1e308]))
rope_blocks = st.fixed_dictionaries({"rope_type": st.sampled_from(["yarn", "yarn", "default", "linear", None, 3])},
                                    optional={key: numbers | json_values for key in (
    "factor", "original_max_position_embeddings", "rope_theta", "beta_fast", "beta_slow", "mscale",
    "mscale_all_dim", "attention_factor", "truncate")})
quant_entries = st.fixed_dictionaries({}, optional={
    "bits": st.sampled_from([2, 3, 4, 8, 7, "4", 4.0, None]), "group_size": st.sampled_from([16, 32, 64, 128, 0, None]),
    "mode": st.sampled_from(["affine", "mxfp4", "nvfp4", "mxfp8", "int4", None, 4]),
    "quantize_input": st.booleans(), "global_scale": st.booleans()})
quant_blocks = st.fixed_dictionaries({}, optional={
    "bits": st.sampled_from([2, 3, 4, 8, 7, "4"]), "group_size": st.sampled_from([16, 32, 64, 128, 0, None]),
    "mode": st.sampled_from(["affine", "mxfp4", "nvfp4", "mxfp8"]),
    "model.embed_tokens": st.booleans() | json_values | quant_entries,
    "model.layers.0.mlp.down_proj": st.booleans() | quant_entries, "model.norm": quant_entries})
# The formats the quantized bases are written in: (mode, group size, bits).
FORMATS = [("affine", 32, 4), ("mxfp4", 32, 4), ("nvfp4", 16, 4), ("mxfp8", 32, 8)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fuzz-base"), **ONE_LAYER)


@pytest.fixture(scope="module")
def quantized_bases(tmp_path_factory) -> dict[str, tuple[bytes, bytes]]:
    """mode -> (config.json, model.safetensors) of one layer quantized in that format, every layer alike."""
    path = make_checkpoint(tmp_path_factory.mktemp("fuzz-q"), **{**ONE_LAYER, "hidden_size": 32,
                                                                  "intermediate_size": 64, "head_dim": 16})
    config = json.loads((path / "config.json").read_text())
    bases = {}
    for mode, group_size, bits in FORMATS:
        model = load_model(path)
        nn.quantize(model, group_size, bits, mode=mode)
        file = path.parent / f"{path.name}-{mode}.safetensors"  # not beside the float weights: they would load too
        mx.save_safetensors(str(file), dict(tree_flatten(model.parameters())))
        block = {"group_size": group_size, "bits": bits, "mode": mode}
        bases[mode] = json.dumps({**config, "quantization": block}).encode(), file.read_bytes()
    return bases


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def outcome(config: bytes, weights: bytes, root: Path, must_load: bool = False) -> None:
    """Load a folder with these two files: a model or a Qwen3Error, nothing else."""
    path = Path(tempfile.mkdtemp(dir=root))
    (path / "config.json").write_bytes(config)
    (path / "model.safetensors").write_bytes(weights)
    try:
        model = load_model(path)
    except Qwen3Error as e:
        assert "\n" not in str(e) and not must_load, str(e)
        return
    assert isinstance(model, Model)
    mx.eval(model(mx.array([[1, 2, 3]])))  # a block that loads also runs


# ---------------------------------------------------------------- safetensors


@st.composite
def mutated_safetensors(draw, file: str) -> bytes:
    original = Path(file).read_bytes()  # a path, not bytes: hypothesis shows the arguments of a strategy
    (n,) = struct.unpack("<Q", original[:8])
    header, data = json.loads(original[8 : 8 + n]), original[8 + n :]
    names = sorted(k for k in header if k != "__metadata__")
    header_shapes = {k: list(header[k]["shape"]) for k in names}
    raw = None  # set when a mutation works on bytes rather than on the parsed header
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["dtype", "same_size_dtype", "shape", "reshape", "offsets", "entry", "rename",
                                     "metadata", "length", "bytes", "truncate", "append"]))
        name = draw(st.sampled_from(names))
        info = header.get(name)
        if kind in ("length", "bytes", "truncate", "append"):
            raw = bytearray(raw if raw is not None else _join(header, data))
            if kind == "length":
                value = draw(st.integers(0, 2**64 - 1) | st.integers(max(0, n - 16), n + 16))
                raw[:8] = struct.pack("<Q", value)
            elif kind == "bytes":
                end = min(draw(st.sampled_from([8 + n, len(raw)])), len(raw))
                for _ in range(draw(st.integers(1, 8)) if end else 0):
                    raw[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
            elif kind == "truncate":
                del raw[draw(st.integers(0, len(raw))) :]
            else:
                raw += draw(st.binary(min_size=1, max_size=64))
            continue
        if raw is not None or not isinstance(info, dict):
            continue
        if kind == "dtype":
            info["dtype"] = draw(st.sampled_from(DTYPES + ["F8_E4M3", "I4", "", "f32"]) | json_values)
        elif kind == "same_size_dtype" and str(info.get("dtype")) in SAME_SIZE:
            info["dtype"] = draw(st.sampled_from(SAME_SIZE[info["dtype"]]))
        elif kind == "shape":
            info["shape"] = draw(st.lists(st.integers(-2, 2**40) | st.sampled_from([0, 1, 2**31, 2**32]), max_size=4)
                                 | json_values)
        elif kind == "reshape" and info.get("shape") == header_shapes[name]:
            size = math.prod(info["shape"])
            first = draw(st.sampled_from([d for d in range(1, size + 1) if size % d == 0] or [1]))
            info["shape"] = draw(st.sampled_from([[size], [first, size // first], [1, size, 1],
                                                  list(reversed(info["shape"]))]))
        elif kind == "offsets":
            info["data_offsets"] = draw(st.lists(st.integers(-4, len(data) + 64) | st.sampled_from([2**63, 2**64]),
                                                 min_size=0, max_size=3) | json_values)
        elif kind == "entry":
            del info[draw(st.sampled_from(sorted(info)))]
        elif kind == "rename":
            header[draw(st.text(max_size=30))] = header.pop(name)
        elif kind == "metadata":
            header["__metadata__"] = draw(json_values)
    return bytes(raw) if raw is not None else _join(header, data)


def _join(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


@FUZZ
@given(data=st.data())
def test_mutated_safetensors_load_or_raise_qwen3error(base, scratch, data):
    weights = data.draw(mutated_safetensors(str(base / "model.safetensors")) | st.binary(max_size=256), label="weights")
    outcome((base / "config.json").read_bytes(), weights, scratch)


# ---------------------------------------------------------------- config.json


@st.composite
def mutated_configs(draw, original: dict) -> bytes:
    if draw(st.integers(0, 9)) == 0:  # now and then, not an object at all
        return json.dumps(draw(json_values)).encode()
    config = dict(original)
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(CONFIG_KEYS) | st.text(max_size=8))
        action = draw(st.sampled_from(["value", "delete", "nudge", "block"]))
        if action == "delete":
            config.pop(key, None)
        elif action == "nudge" and isinstance(config.get(key), int) and not isinstance(config[key], bool):
            config[key] = config[key] + draw(st.sampled_from([-2, -1, 1, 2, 10**9, -config[key]]))
        elif action == "block":
            key = draw(st.sampled_from(["rope_parameters", "rope_scaling", "quantization"]))
            config[key] = draw(quant_blocks if key == "quantization" else rope_blocks)
        else:
            config[key] = draw(json_values)
    return json.dumps(config).encode()


@FUZZ
@given(data=st.data())
def test_mutated_configs_load_or_raise_qwen3error(base, scratch, data):
    original = json.loads((base / "config.json").read_text())
    config = data.draw(mutated_configs(original), label="config")
    outcome(config, (base / "model.safetensors").read_bytes(), scratch)


def test_the_quantized_bases_load(quantized_bases, scratch):
    for config, weights in quantized_bases.values():
        outcome(config, weights, scratch, must_load=True)


@FUZZ
@given(data=st.data())
def test_mutated_quantization_blocks_load_or_raise_qwen3error(quantized_bases, scratch, data):
    config, weights = quantized_bases[data.draw(st.sampled_from([mode for mode, _, _ in FORMATS]), label="mode")]
    config = json.loads(config)
    config["quantization"] = {**config["quantization"], **data.draw(quant_blocks, label="block")}
    outcome(json.dumps(config).encode(), weights, scratch)
