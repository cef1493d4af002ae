"""Qwen's own quantized checkpoints (AutoAWQ's GEMM int4, fine-grained FP8), written here in those layouts, read
by the loader and the converter into MLX's formats and compared with the dequantization computed here."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint
from mlx_lm.utils import load_model as mlx_lm_load_model
from safetensors.torch import load_file, save_file

from qwen3_mlx.checkpoint.converter import convert
from qwen3_mlx.checkpoint.foreign import awq_to_affine
from qwen3_mlx.checkpoint.loader import load_model
from qwen3_mlx.errors import ConfigError, OptionError
from qwen3_mlx.model.fast import speed_up

IDS = mx.array([[1, 17, 300, 42, 9, 250, 3, 77]])
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
AUTOAWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # WQLinear_GEMM.from_linear's order_map for 4 bits
GROUP = 32  # the tiny shapes' inputs (64, 160) take 32; Qwen's checkpoints use 128 (tested on one matrix)


def awq_quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ's pseudo_quantize_tensor (zero point, 4 bits): (q (out, in), zeros, fp16 scales (out, in/group))."""
    g = w.float().reshape(w.shape[0], -1, group)
    hi, lo = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    scales = ((hi - lo).clamp(min=1e-5) / 15).half().float()
    zeros = (-torch.round(lo / scales)).clamp(0, 15)
    q = (torch.round(g / scales) + zeros).clamp(0, 15)
    return q.reshape(w.shape).int(), zeros[..., 0].int(), scales[..., 0].half()


def awq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """(rows, cols) 4-bit ints -> (rows, cols/8) int32 as WQLinear_GEMM.from_linear packs them."""
    packed = torch.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + AUTOAWQ_ORDER[i]].int() << (i * 4)
    return packed


def awq_reference(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """w = (q - zero) * scale, each input's group's, in float32."""
    return (q.float() - zeros.float().repeat_interleave(group, 1)) * scales.float().repeat_interleave(group, 1)


def fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn weights and float32 weight_scale_inv per (out, in) block, partial blocks at the edges."""
    rows, cols = w.shape
    scale = torch.empty((-(-rows // block[0]), -(-cols // block[1])))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            scale[i, j] = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].abs().max() / 448
    expanded = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (w.float() / expanded).to(torch.float8_e4m3fn), scale


def fp8_reference(w8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = w8.shape
    return w8.float() * scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def write(folder: Path, hf: Path, tensors: dict, quantization_config: dict | None, dtype: str) -> Path:
    folder.mkdir()
    config = json.loads((hf / "config.json").read_text())
    config.update(torch_dtype=dtype, **({"quantization_config": quantization_config} if quantization_config else {}))
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def awq(tmp_path_factory):
    """(AWQ folder, the float32 folder of its reference dequantization, {module: reference weight})."""
    root = tmp_path_factory.mktemp("awq")
    hf = make_checkpoint(root / "hf", dtype=torch.float16)
    state = load_file(hf / "model.safetensors")
    packed, reference = dict(state), {k: v.float() for k, v in state.items()}
    for name in [n for n in state if n.endswith(".weight") and n.rsplit(".", 1)[0].endswith(LINEARS)]:
        module = name.removesuffix(".weight")
        q, zeros, scales = awq_quantize(state[name], GROUP)
        del packed[name]
        packed.update({f"{module}.qweight": awq_pack(q.T), f"{module}.qzeros": awq_pack(zeros.T),
                       f"{module}.scales": scales.T})
        reference[name] = awq_reference(q, zeros, scales, GROUP)
    block = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True,
             "modules_to_not_convert": None}
    return (write(root / "awq", hf, packed, block, "float16"), write(root / "ref", hf, reference, None, "float32"),
            {k.removesuffix(".weight"): v for k, v in reference.items() if k not in packed})


@pytest.fixture(scope="module", params=[(128, 128), (32, 32)], ids=["block128-partial", "block32"])
def fp8(request, tmp_path_factory):
    """(FP8 folder, the bfloat16 folder of its dequantization, {module: float32 reference}, block)."""
    block = request.param
    root = tmp_path_factory.mktemp("fp8")
    hf = make_checkpoint(root / "hf", dtype=torch.bfloat16)
    state = load_file(hf / "model.safetensors")
    quantized, reference, exact = dict(state), dict(state), {}
    for name in [n for n in state if n.endswith(".weight") and n.rsplit(".", 1)[0].endswith(LINEARS)]:
        w8, scale = fp8_quantize(state[name], block)
        quantized.update({name: w8, name.replace(".weight", ".weight_scale_inv"): scale})
        exact[name.removesuffix(".weight")] = fp8_reference(w8, scale, block)
        reference[name] = exact[name.removesuffix(".weight")].to(torch.bfloat16)  # transformers' rounding
    config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    return (write(root / "fp8", hf, quantized, config, "bfloat16"),
            write(root / "ref", hf, reference, None, "bfloat16"), exact, block)


def module(model, path: str):
    for part in path.split("."):
        model = getattr(model, part) if not part.isdigit() else model[int(part)]
    return model


def tensors(folder: Path) -> dict[str, np.ndarray]:
    """A folder's tensors, bfloat16 ones as float32 (numpy has no bfloat16)."""
    return {k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)
            for f in folder.glob("*.safetensors") for k, v in mx.load(str(f)).items()}


def logits(model) -> np.ndarray:
    return np.array(model(IDS).astype(mx.float32))


def test_awq_unpacks_autoawq_gemm_packing_at_qwens_group_size_128():
    torch.manual_seed(1)
    w = torch.randn(96, 256)  # (out, in): two groups of 128 along the input
    q, zeros, scales = awq_quantize(w, 128)
    wq, s, b = awq_to_affine("m", mx.array(awq_pack(q.T).numpy()), mx.array(awq_pack(zeros.T).numpy()),
                             mx.array(scales.T.numpy()), 128, mx.float32)
    got = np.array(mx.dequantize(wq, s, b, group_size=128, bits=4))
    assert np.array_equal(got, awq_reference(q, zeros, scales, 128).numpy())
    assert np.array_equal(np.array(mx.dequantize(wq, mx.ones_like(s), mx.zeros_like(b), 128, 4)), q.float().numpy())


def test_awq_loads_to_exactly_its_dequantization_in_float32_and_rounds_only_the_bias_in_float16(awq):
    folder, _, reference = awq
    exact, half = load_model(folder, "float32"), load_model(folder)
    for path, want in reference.items():
        layer = module(exact, path)
        got = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=GROUP, bits=4)
        assert np.array_equal(np.array(got), want.numpy()), path
        layer16, ref32 = module(half, path), module(exact, path)
        assert layer16.scales.dtype == mx.float16 and np.array_equal(np.array(layer16.scales), np.array(ref32.scales))
        assert np.array_equal(np.array(layer16.biases), np.array(ref32.biases.astype(mx.float16)))
    assert exact.model.embed_tokens.weight.dtype == mx.float32 and not hasattr(exact.model.embed_tokens, "scales")


def test_awq_logits_equal_the_float_model_of_its_dequantization(awq):
    folder, ref, _ = awq
    want = logits(load_model(ref, swap=speed_up))
    assert np.abs(logits(load_model(folder, "float32", swap=speed_up)) - want).max() <= 1e-4
    assert np.abs(logits(load_model(folder, "float32")) - want).max() <= 1e-4


def test_convert_writes_awq_as_our_affine_format_that_mlx_lm_loads(awq, tmp_path):
    folder, ref, reference = awq
    out = convert(folder, tmp_path / "out", weights_only=True, dtype="float32").path
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": GROUP, "bits": 4, "mode": "affine"}
    ours = load_model(out)
    for path, want in reference.items():
        layer = module(ours, path)
        assert np.array_equal(np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, GROUP, 4)), want.numpy())
    theirs, _ = mlx_lm_load_model(out)
    assert np.abs(logits(theirs) - logits(ours)).max() <= 1e-5
    assert np.abs(logits(ours) - logits(load_model(ref))).max() <= 1e-4
    default = convert(folder, tmp_path / "fp16", weights_only=True).path  # the source's float16 scales and biases
    assert np.abs(logits(mlx_lm_load_model(default)[0]) - logits(load_model(default))).max() <= 1e-5
    with pytest.raises(OptionError, match="already quantized"):
        convert(folder, tmp_path / "q", weights_only=True, quantize=True)


@pytest.mark.parametrize("key, value", [("group_size", 100), ("bits", 8), ("version", "gemv"), ("zero_point", False)])
def test_an_awq_block_this_reader_cannot_take_exactly_is_refused_naming_its_key(awq, tmp_path, key, value):
    folder = tmp_path / "bad"
    folder.mkdir()
    config = json.loads((awq[0] / "config.json").read_text())
    config["quantization_config"][key] = value
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(awq[0] / "model.safetensors")
    with pytest.raises(ConfigError, match=f"config.json: quantization_config.{key}={value!r} is not supported"):
        load_model(folder)


def test_fp8_loads_to_its_block_dequantization_rounded_once(fp8):
    folder, _, exact, _ = fp8
    default, full = load_model(folder), load_model(folder, "float32")
    for path, want in exact.items():
        assert module(default, path).weight.dtype == mx.bfloat16
        got = np.array(module(default, path).weight.astype(mx.float32))
        assert np.array_equal(got, want.to(torch.bfloat16).float().numpy()), path
        assert np.array_equal(np.array(module(full, path).weight), want.numpy()), path


def test_fp8_logits_equal_the_float_model_of_its_dequantization(fp8):
    folder, ref, _, _ = fp8
    assert np.array_equal(logits(load_model(folder, swap=speed_up)), logits(load_model(ref, swap=speed_up)))


def test_convert_dequantizes_fp8_and_requantizes_it_with_q(fp8, tmp_path):
    folder, ref, _, _ = fp8
    out = convert(folder, tmp_path / "out", weights_only=True).path
    want, got = tensors(ref), tensors(out)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert "quantization" not in json.loads((out / "config.json").read_text())
    asked = convert(folder, tmp_path / "d", weights_only=True, dequantize=True).path  # -d: what FP8 gets anyway
    asked = tensors(asked)
    assert asked.keys() == want.keys() and all(np.array_equal(asked[k], want[k]) for k in want)
    q = convert(folder, tmp_path / "q", weights_only=True, quantize=True).path
    q_ref = convert(ref, tmp_path / "q_ref", weights_only=True, quantize=True).path
    mine, theirs = tensors(q), tensors(q_ref)
    assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)
    assert np.abs(logits(mlx_lm_load_model(q)[0]) - logits(load_model(q))).max() <= 1e-5
