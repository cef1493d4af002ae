"""Quantization with calibration text against plain rounding: KL divergence to the float model and
perplexity on held-out text, ours (qwen3-mlx convert --method) and mlx-lm's same method fed the same
calibration tokens through its functions (gptq_quantize, awq_quantize, dwq_quantize; mlx-lm's gptq takes 2, 4
or 8 bits only, so it runs at 4).

    python benchmarks/quant_bench.py [--shape tiny-vocab] [--layers 4] [--bits 3,4] [--samples 32]
                                     [--length 256] [--calibration FILE] [--held-out FILE] [--logit-scale 8] [--out quant.json]
                                     [--methods rtn,gptq,awq,dwq,mixed]

The model: a random float32 Qwen3 of bench.py's SHAPES (--layers cuts the depth; "full-width" is Qwen3-1.7B's
widths), weights of std 0.02, the final norm scaled by --logit-scale so the logits are peaked, and outlier channels in the
activations: 4 channels of every input_layernorm and post_attention_layernorm scaled 10-30x, so the q/k/v
and gate/up inputs carry a few large channels, as real models' do. It is written as a Hugging Face folder
with the Qwen3 tokenizer, and every method reads it from there, as a user's run would.
Calibration: the text of docs/*.md (default), cut into --samples pieces of --length tokens; held out:
README.md, in windows of --length tokens side by side (each window's first token unscored). mixed aims
halfway between uniform 3- and 4-bit's size (bits per weight as convert reports it, embedding at 8 bits).
mlx-lm's dwq gets what ours does by default: the same samples, one in eight held out for its validation, the
rest four times over, Adam at 1e-5 in batches of 4, the float model's logits computed as it goes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES, hf_config, tokenizer_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {**SHAPES, "full-width": SHAPES["full"]}


def random_checkpoint(folder: Path, shape: str, layers: int, logit_scale: float, seed: int = 0) -> Path:
    from qwen3_mlx.model.config import ModelArgs
    from qwen3_mlx.model.model import Model

    config = {**hf_config("full" if shape == "full-width" else shape), "num_hidden_layers": layers,
              "torch_dtype": "float32"}
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    model.update(tree_map(lambda p: 1 + 0.2 * mx.random.normal(p.shape) if p.ndim == 1 else
                          0.02 * mx.random.normal(p.shape), model.parameters()))
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            factor = np.ones(norm.weight.shape[0], np.float32)
            factor[rng.choice(len(factor), 4, replace=False)] = rng.uniform(10, 30, 4)
            norm.weight = norm.weight * mx.array(factor)
    model.model.norm.weight = model.model.norm.weight * logit_scale  # peaked logits, not near-uniform (kv_bench's)
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in tokenizer_dir().iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copy(f, folder / f.name)
    return folder


def windows(ids: list[int], length: int, count: int) -> mx.array:
    return mx.array([ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:count])


def as_float(model):
    """The model with each quantized module replaced by a float one holding the weights its levels stand for:
    the same function, computed with MLX's fast float matmuls (its quantized ones are slow on the CPU)."""
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    swaps = []
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if hasattr(m, "scales"):
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits).astype(mx.float32)
            f = nn.Embedding(*w.shape) if isinstance(m, nn.QuantizedEmbedding) else nn.Linear(w.shape[1], w.shape[0],
                                                                                                 bias="bias" in m)
            f.weight = w
            if "bias" in m:
                f.bias = m.bias
            swaps.append((path, f))
    model.update_modules(tree_unflatten(swaps))
    return model


def scores(model, held: mx.array, reference: list[mx.array] | None) -> tuple[float, float, list[mx.array]]:
    """(mean KL to the reference logits, perplexity, the logits) over the held-out windows."""
    kls, nll, count, out = [], 0.0, 0, []
    for i in range(held.shape[0]):
        logits = model(held[i:i + 1]).astype(mx.float32)[0]  # (L, vocab)
        mx.eval(logits)
        out.append(logits)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll -= mx.take_along_axis(lp[:-1], held[i, 1:, None], axis=-1).sum().item()
        count += held.shape[1] - 1
        if reference is not None:
            rp = reference[i] - mx.logsumexp(reference[i], axis=-1, keepdims=True)
            kls.append((mx.exp(rp) * (rp - lp)).sum(-1).mean().item())
    return (float(np.mean(kls)) if kls else 0.0), math.exp(nll / count), out


def ours(source: Path, out: Path, method: str, calibration: Path, a, bits: int, target: float | None):
    from qwen3_mlx.checkpoint.converter import convert
    from qwen3_mlx.checkpoint.loader import load
    from qwen3_mlx.quantize.calibrated import quantize_checkpoint

    t = time.perf_counter()
    if method == "rtn":
        result = convert(source, out, quantize=True, bits=bits, force=True)
    else:
        result = quantize_checkpoint(source, out, method.split(","), calibration, samples=a.samples,
                                     length=a.length, bits=bits, target_bpw=target, force=True)
    return as_float(load(out)[0]), time.perf_counter() - t, result.bits_per_weight


def theirs(source: Path, method: str, data: mx.array, bits: int):
    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize
    from mlx_lm.quant.gptq import gptq_quantize
    from mlx_lm.utils import compute_bits_per_weight, load_model

    model, _ = load_model(source)
    t = time.perf_counter()
    if method == "dwq":
        model = their_dwq(model, source, data, bits)
    elif method == "gptq":
        model, _ = gptq_quantize(model, data, bits, 64, 8, 64)
    else:
        awq_quantize(model, data, AWQ_MODEL_CONFIGS["qwen3"], group_size=64, bits=bits, embed_group_size=64,
                     embed_bits=8)
    mx.eval(model.parameters())
    seconds, bpw = time.perf_counter() - t, compute_bits_per_weight(model)  # before as_float unpacks it
    return as_float(model), seconds, bpw


def their_dwq(teacher, source: Path, data: mx.array, bits: int):
    import copy

    import mlx.optimizers as optim
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import load_config, quantize_model

    student = copy.deepcopy(teacher)
    quantize_model(student, load_config(source), group_size=64, bits=bits)
    rows = [(ids, 0) for ids in data.tolist()]
    held = max(1, len(rows) // 8)
    dwq_quantize(student, lambda batch, i, split: teacher(batch), optim.Adam(learning_rate=1e-5, bias_correction=True),
                 rows[:-held] * 4, (rows[-held:] * 4)[:max(4, held)], 4, data.shape[1] + 1, 0)  # a batch at least
    return student


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny-vocab", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--bits", default="3,4")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--calibration", type=Path)
    p.add_argument("--held-out", type=Path, default=ROOT / "README.md")
    p.add_argument("--held-windows", type=int, default=8, help="windows of held-out text (their float logits are kept)")
    p.add_argument("--logit-scale", type=float, default=8.0, help="the final norm's weight times this")
    p.add_argument("--no-mlx-lm", action="store_true")
    p.add_argument("--methods", default="rtn,gptq,awq,dwq,mixed",
                   help="the rows to run: rtn, gptq, awq, dwq, gptq+dwq, awq+dwq (a chain of ours), mixed")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    from qwen3_mlx.checkpoint.loader import load
    from qwen3_mlx.quantize.calibration import calibration_samples
    from qwen3_mlx.evaluation.documents import read_texts

    work = Path(tempfile.mkdtemp(prefix="quant_bench_"))
    calibration = a.calibration or work / "docs.txt"
    if a.calibration is None:
        calibration.write_text("\n\n".join(f.read_text() for f in sorted((ROOT / "docs").glob("*.md"))))
    source = random_checkpoint(work / "float", a.shape, a.layers, a.logit_scale)
    model, tokenizer = load(source)
    held = windows(tokenizer.encode(a.held_out.read_text()), a.length, a.held_windows)
    data = calibration_samples(calibration, read_texts(calibration), tokenizer, a.samples, a.length)
    _, float_ppl, reference = scores(model, held, None)
    rows = [{"method": "float32", "bits": None, "kl": 0.0, "ppl": float_ppl, "bpw": 32.0, "seconds": 0.0}]
    sizes = {}  # bits -> uniform rounding's bits per weight
    methods = [m.replace("+", ",") for m in a.methods.split(",") if m != "mixed"]
    for bits, method in ((b, m) for b in map(int, a.bits.split(",")) for m in methods):
        m, seconds, bpw = ours(source, work / f"{method}{bits}", method, calibration, a, bits, None)
        kl, ppl, _ = scores(m, held, reference)
        rows.append({"method": f"ours {method}", "bits": bits, "kl": kl, "ppl": ppl, "bpw": bpw, "seconds": seconds})
        sizes.setdefault(bits, bpw)
        print(rows[-1], file=sys.stderr, flush=True)
        if not a.no_mlx_lm and (method in ("awq", "dwq") or (method == "gptq" and bits in (2, 4, 8))):
            m, seconds, bpw = theirs(source, method, data, bits)
            kl, ppl, _ = scores(m, held, reference)
            rows.append({"method": f"mlx-lm {method}", "bits": bits, "kl": kl, "ppl": ppl, "bpw": bpw,
                         "seconds": seconds})
            print(rows[-1], file=sys.stderr, flush=True)
    if "mixed" in a.methods.split(",") and 3 in sizes and 4 in sizes:
        target = (sizes[3] + sizes[4]) / 2
        for method in ("mixed", "mixed,gptq"):
            m, seconds, bpw = ours(source, work / method, method, calibration, a, 3, target)
            kl, ppl, _ = scores(m, held, reference)
            rows.append({"method": f"ours {method} (target {target:.3f})", "bits": "3/4", "kl": kl, "ppl": ppl,
                         "bpw": bpw, "seconds": seconds})
            print(rows[-1], file=sys.stderr, flush=True)
    shutil.rmtree(work)
    lines = [f"shape {a.shape}, {a.layers} layers; calibration {a.samples} x {a.length} tokens; held out "
             f"{held.shape[0]} x {a.length} tokens", "",
             "| method | bits | bits/weight | KL to float32 | perplexity | seconds |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['method']} | {r['bits'] or '-'} | {r['bpw']:.3f} | {r['kl']:.4f} | {r['ppl']:.1f} | "
              f"{r['seconds']:.1f} |" for r in rows]
    print("\n".join(lines))
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
