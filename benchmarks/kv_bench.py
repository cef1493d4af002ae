"""Quantized KV caches: memory and speed at a long context against mlx-lm's --kv-bits, one layer's
attention ways, and quality against the float32 cache.

    python benchmarks/bench.py make tiny /tmp/qwen3-tiny-bf16            # checkpoints: bench.py make
    python benchmarks/kv_bench.py run /tmp/qwen3-tiny-bf16 [--context 16384] [--chunk 2048]
                                  [--decode-tokens 16] [--bits none,8,4] [--out run.json]
    python benchmarks/kv_bench.py attention [--shape tiny] [--context 16384] [--chunk 2048]
    python benchmarks/kv_bench.py cli /tmp/qwen3-small-bf16 [--prompt-tokens 4096] [--bits none,8,4]
    python benchmarks/kv_bench.py quality [--shape full] [--layers 28] [--prompt-tokens 4096]
                                  [--steps 256] [--out quality.json]

run: for each implementation (ours: qwen3_mlx.load, TokenGenerator; mlx-lm: mlx_lm.load,
generate_step with kv_bits) and each setting of --bits (none is the model's dtype), a cache is filled
with context - chunk random keys and values (what a prefill of as many tokens leaves, less the time;
the same for both), then one prompt chunk of `chunk` random ids is prefilled (the last and largest
chunk of a context-long prompt, where the peak is) and decode-tokens tokens are decoded greedily.
Figures: prefill tok/s of that chunk, decode tok/s at the context, the cache's bytes, the peak
(mx.get_peak_memory, reset after the fill) and the peak beyond the weights (the KV cache and the
activations). mlx-lm is given a QuantizedKVCache from the start (its --quantized-kv-start 0).

attention: one layer's attention at the context, the queries of one decode step and of one chunk:
mx.fast's over the model's dtype (a plain cache), ours over a packed cache (kv_quant: packed reads
for a decode step, dequantized blocks for a chunk; on the CPU in float32, as fast.CPUAttention asks),
ours reading packed keys for a chunk too (in bf16), and mlx-lm's quantized_scaled_dot_product_attention.
Time, and memory beyond the inputs; bf16 inputs.

cli: `qwen3-mlx generate -p PROMPT -m 8 --temp 0 --kv-bits B -v` run in-process for each --bits, on a
prompt of about --prompt-tokens tokens; the loader is replaced by one that hands the command the model
wrapped so that it records the cache each pass is handed (as the tests' Spy): the figure is the bytes of
the cache the command used, at its largest, and its ratio to the plain cache's; with the command's own
-v line of peak memory.

quality: a random float32 model of the shape (bench.py's SHAPES; --layers to cut the depth), weights
of std 0.02 scaled so that logits are peaked, with and without outlier key channels (4 k_proj output
rows of each layer scaled 10-30x, as real models have): the float32 cache's greedy tokens after a
random prompt, then each quantized cache fed the same tokens. KL(fp32 || quantized) of the next-token
distributions (mean and max), top-1 agreement, max |delta logit|, and where greedy decoding with the
quantized cache first parts from the float32 cache's (the first position whose top-1 differs: until then
both runs feed the same tokens), with the float32 logits' top-2 margin there.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES  # noqa: E402

EOS_IDS = (151645, 151643)


def bits_list(text: str) -> list[int | None]:
    return [None if b == "none" else int(b) for b in text.split(",")]


def weights_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def fill(caches, n: int, heads: int, dim: int, dtype, step: int = 2048) -> None:
    """n random keys and values into every layer's cache, in steps."""
    for start in range(0, n, step):
        m = min(step, n - start)
        for c in caches:
            k = mx.random.normal((1, heads, m, dim)).astype(dtype)
            c.update_and_fetch(k, mx.random.normal((1, heads, m, dim)).astype(dtype))
        mx.eval([c.keys for c in caches])


def timed(prefill, decode, n: int) -> dict:
    """prefill(): the first token on the host; decode(): the next one."""
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    prefill()
    t1 = time.perf_counter()
    for _ in range(n - 1):
        decode()
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "peak": mx.get_peak_memory()}


def run_ours(path: Path, bits: int | None, context: int, chunk: int, n: int, prompt: list[int]) -> dict:
    from qwen3_mlx import load
    from qwen3_mlx.generation.single import TokenGenerator
    from qwen3_mlx.model.kv_quant import KVQuantization
    from qwen3_mlx.generation.picker import Picker
    from qwen3_mlx.checkpoint.sampling_defaults import SamplingParams
    from qwen3_mlx.generation.sampling import make_logits_processor, make_sampler

    model, tokenizer = load(path)
    a = model.args
    cache = model.make_cache(quantization=KVQuantization(bits, 64) if bits else None)
    fill(cache, context - chunk, a.num_key_value_heads, a.head_dim, model.dtype)
    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                            logit_bias={t: float("-inf") for t in EOS_IDS if t < a.vocab_size})
    draws = Picker(make_sampler(params, tokenizer.vocab_size), make_logits_processor(params, a.vocab_size))
    gen = TokenGenerator(model, cache, draws)

    def prefill() -> None:
        gen.prefill(prompt, chunk)
        gen.next_token()

    r = timed(prefill, gen.next_token, n)
    r.update(weights=weights_bytes(model), cache=sum(c.nbytes for c in cache))
    return r


def run_mlx_lm(path: Path, bits: int | None, context: int, chunk: int, n: int, prompt: list[int]) -> dict:
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import KVCache, QuantizedKVCache
    from mlx_lm.sample_utils import make_logits_processors

    model, _ = load(str(path))
    a = model.args
    cache = [QuantizedKVCache(64, bits) if bits else KVCache() for _ in model.layers]
    dtype = model.model.norm.weight.dtype
    fill(cache, context - chunk, a.num_key_value_heads, a.head_dim, dtype)
    processors = make_logits_processors(logit_bias={t: float("-inf") for t in EOS_IDS if t < a.vocab_size})
    steps = generate_step(mx.array(prompt, mx.int32), model, max_tokens=n, prompt_cache=cache,
                          sampler=lambda logprobs: mx.argmax(logprobs, axis=-1), logits_processors=processors,
                          prefill_step_size=chunk, kv_bits=bits, kv_group_size=64, quantized_kv_start=0)
    r = timed(lambda: next(steps), lambda: next(steps), n)
    r.update(weights=weights_bytes(model), cache=sum(c.nbytes for c in cache))
    return r


def cmd_run(a: argparse.Namespace) -> None:
    path = Path(a.checkpoint).expanduser().absolute()
    config = json.loads((path / "config.json").read_text())
    prompt = np.random.default_rng(0).integers(0, min(config["vocab_size"], 151643), a.chunk).tolist()
    rows = []
    for bits in bits_list(a.bits):
        for name, runner in (("ours", run_ours), ("mlx-lm", run_mlx_lm)):
            r = runner(path, bits, a.context, a.chunk, a.decode_tokens, prompt)
            r.update(impl=name, bits=bits or "none", prefill_tps=a.chunk / r["prefill_s"],
                     decode_tps=(a.decode_tokens - 1) / r["decode_s"], beyond=r["peak"] - r["weights"])
            rows.append(r)
            print(f"{name:6s} bits {r['bits']}: prefill {r['prefill_tps']:.1f} tok/s, decode {r['decode_tps']:.2f} "
                  f"tok/s, cache {r['cache'] / 1e6:.1f} MB, peak {r['peak'] / 1e6:.1f} MB "
                  f"({r['beyond'] / 1e6:.1f} MB beyond the weights)", file=sys.stderr, flush=True)
            gc.collect()
            mx.clear_cache()
    base = {r["impl"]: r for r in rows if r["bits"] == "none"}
    lines = [f"{path.name}: {config['num_hidden_layers']} layers, {config['num_attention_heads']}/"
             f"{config['num_key_value_heads']} heads of {config['head_dim']}; context {a.context}, last chunk "
             f"{a.chunk}, decode {a.decode_tokens}; {mx.default_device()}", "",
             "| impl | kv bits | prefill tok/s | decode tok/s | cache MB | peak MB | beyond weights MB | "
             "beyond weights / bf16's |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = r["beyond"] / base[r["impl"]]["beyond"] if r["impl"] in base else float("nan")
        lines.append(f"| {r['impl']} | {r['bits']} | {r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | "
                     f"{r['cache'] / 1e6:.1f} | {r['peak'] / 1e6:.1f} | {r['beyond'] / 1e6:.1f} | {ratio:.2f}x |")
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text(json.dumps({"config": config, "args": vars(a), "rows": rows,
                                           "table": "\n".join(lines)}, indent=1, default=str))


# ---------------------------------------------------------------- attention


def cmd_attention(a: argparse.Namespace) -> None:
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    from qwen3_mlx.model import kv_quant
    from qwen3_mlx.model.kv_quant import KVQuantization

    s = SHAPES[a.shape]
    H, H_kv, D, S = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"], a.context
    dtype = mx.bfloat16
    compute = mx.float32 if mx.default_device() == mx.cpu else None  # what the model's attention asks for there
    k, v = (mx.random.normal((1, H_kv, S, D)).astype(dtype) for _ in range(2))
    lines = [f"one layer's attention, {a.shape} heads ({H}/{H_kv} of {D}), context {S}, {mx.default_device()}", "",
             "| queries | way | ms | MB beyond the inputs |", "| ---: | --- | ---: | ---: |"]
    for L in (1, a.chunk):
        q = mx.random.normal((1, H, L, D)).astype(dtype)
        visible = mx.arange(S)[None] <= mx.arange(S - L, S)[:, None] if L > 1 else None
        ways = {"mx.fast, bf16 cache": lambda: mx.fast.scaled_dot_product_attention(
            q, k, v, scale=D**-0.5, mask="causal" if L > 1 else None)}
        for bits in bits_list(a.bits):
            if bits is None:
                continue
            pk, pv = (KVQuantization(bits, 64).pack(x) for x in (k, v))
            mx.eval(pk, pv)
            mask = (None, visible)
            ways[f"ours, {bits}-bit"] = lambda pk=pk, pv=pv, mask=mask: kv_quant.quantized_attention(
                q, pk, pv, D**-0.5, mask, compute)
            if L > 1:
                ways[f"ours reading packed, {bits}-bit"] = lambda pk=pk, pv=pv, mask=mask: kv_quant._read_packed(
                    q, pk, pv, D**-0.5, mask)
            ways[f"mlx-lm, {bits}-bit"] = lambda pk=pk, pv=pv, bits=bits: quantized_scaled_dot_product_attention(
                q, tuple(pk[:3]), tuple(pv[:3]), D**-0.5, "causal" if L > 1 else None, 64, bits)
        mx.eval(q, k, v)
        for name, fn in ways.items():
            times, extra = [], []
            for _ in range(a.trials):
                gc.collect()
                mx.synchronize()
                mx.clear_cache()
                mx.reset_peak_memory()
                base = mx.get_active_memory()
                t = time.perf_counter()
                mx.eval(fn())
                times.append(time.perf_counter() - t)
                extra.append(mx.get_peak_memory() - base)
            lines.append(f"| {L} | {name} | {1000 * statistics.median(times):.1f} | {max(extra) / 1e6:.1f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


# ---------------------------------------------------------------- quality


def random_model(shape: dict, layers: int | None, outliers: int, seed: int = 0):
    """A random float32 Qwen3: weights of std 0.02 (HF's init), the final norm scaled so that the
    logits spread over about 20, norms elsewhere around 1; `outliers` k_proj output rows of every
    layer scaled 10-30x."""
    from mlx.utils import tree_map

    from qwen3_mlx.model.config import ModelArgs
    from qwen3_mlx.model.model import Model

    config = dict(shape, model_type="qwen3", max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6,
                  tie_word_embeddings=True)
    if layers:
        config["num_hidden_layers"] = layers
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    model.update(tree_map(lambda p: 1 + 0.2 * mx.random.normal(p.shape) if p.ndim == 1 else
                          0.02 * mx.random.normal(p.shape), model.parameters()))
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        w = layer.self_attn.k_proj.weight
        factor = np.ones(w.shape[0], np.float32)
        factor[rng.choice(w.shape[0], outliers, replace=False)] = rng.uniform(10, 30, outliers)
        layer.self_attn.k_proj.weight = w * mx.array(factor)[:, None]
    mx.eval(model.parameters())
    return model


def prefilled(model, prompt: mx.array, quantization, chunk: int = 1024):
    cache = model.make_cache(quantization=quantization)
    for start in range(0, prompt.shape[1] - 1, chunk):
        model(prompt[:, start : min(start + chunk, prompt.shape[1] - 1)], cache)
        mx.eval([c.keys for c in cache])
    return cache


def greedy(model, cache, last: mx.array, steps: int) -> tuple[list[int], list[mx.array]]:
    logits, tokens, seen = model(last, cache)[:, -1], [], []
    for _ in range(steps):
        seen.append(logits)
        tokens.append(logits.argmax(-1).item())
        logits = model(mx.array([tokens[-1:]]), cache)[:, -1]
    return tokens, seen


def cmd_quality(a: argparse.Namespace) -> None:
    from qwen3_mlx.model.kv_quant import KVQuantization

    shape = SHAPES[a.shape]
    rows = []
    for outliers in (0, 4):
        model = random_model(shape, a.layers, outliers)
        norm = model.model.norm
        norm.weight = norm.weight * a.logit_scale
        prompt = mx.random.randint(0, shape["vocab_size"], (1, a.prompt_tokens), key=mx.random.key(1))
        t = time.perf_counter()
        ref_tokens, ref_logits = greedy(model, prefilled(model, prompt, None), prompt[:, -1:], a.steps)
        full = mx.concatenate(ref_logits)  # (steps, V)
        print(f"outliers {outliers}: float32 reference in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        teacher = mx.array([ref_tokens[:-1]])
        for bits in (8, 4):
            for start in (0, a.start):
                t = time.perf_counter()
                q = KVQuantization(bits, 64, start)
                cache = prefilled(model, prompt, q)
                quantized = mx.concatenate([model(prompt[:, -1:], cache)[0], model(teacher, cache)[0]])
                lp, lq = (x - mx.logsumexp(x, axis=-1, keepdims=True) for x in (full, quantized))
                kl = (mx.exp(lp) * (lp - lq)).sum(-1)
                # Fed the float32 cache's tokens, the quantized cache's greedy choice first differs where its own
                # greedy run would first part (until then the two runs feed the same tokens).
                parted = next((i for i, (x, y) in enumerate(zip(quantized.argmax(-1).tolist(), ref_tokens))
                               if x != y), None)
                margin = None
                if parted is not None:
                    top2 = mx.sort(ref_logits[parted][0])[-2:]
                    margin = (top2[1] - top2[0]).item()
                row = {"outliers": outliers, "bits": bits, "start": start, "kl_mean": kl.mean().item(),
                       "kl_max": kl.max().item(), "top1": (full.argmax(-1) == quantized.argmax(-1)).mean().item(),
                       "max_dlogit": mx.abs(full - quantized).max().item(), "parted_at": parted,
                       "margin_there": margin, "seconds": time.perf_counter() - t}
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
        del model
        gc.collect()
        mx.clear_cache()
    layers = a.layers or shape["num_hidden_layers"]
    lines = [f"{a.shape} shape, {layers} layers, float32 weights; prompt {a.prompt_tokens} random ids, {a.steps} "
             f"greedy tokens of the float32 cache; group size 64", "",
             "| outlier channels | kv bits | quantized_kv_start | KL mean | KL max | top-1 | max abs dlogit | "
             "greedy parts at (fp32 top-2 margin there) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        parted = "never" if r["parted_at"] is None else f"{r['parted_at']} ({r['margin_there']:.3f})"
        lines.append(f"| {'yes' if r['outliers'] else 'no'} | {r['bits']} | {r['start']} | {r['kl_mean']:.2e} | "
                     f"{r['kl_max']:.2e} | {r['top1']:.3f} | {r['max_dlogit']:.3f} | {parted} |")
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows, "table": "\n".join(lines)}, indent=1))


class CacheBytes:
    """A model that records the most bytes a cache it was handed held when a pass began."""

    def __init__(self, model) -> None:
        self._model, self.peak = model, 0

    def _see(self, cache) -> None:
        if cache is not None:
            self.peak = max(self.peak, sum(c.nbytes for c in cache))

    def __call__(self, inputs, cache=None):
        self._see(cache)
        return self._model(inputs, cache)

    def decode(self, ids, cache):
        self._see(cache)
        return self._model.decode(ids, cache)

    def __getattr__(self, name):
        return getattr(self._model, name)


def cmd_cli(a: argparse.Namespace) -> None:
    from click.testing import CliRunner

    from qwen3_mlx.checkpoint import loader
    from qwen3_mlx.cli import commands as cli

    model, tok = loader.load(a.checkpoint)
    words = "the quick brown fox jumps over the lazy dog and keeps running far away "
    prompt = words * (a.prompt_tokens // len(tok.encode(words)))
    rows, plain = [], None
    for bits in bits_list(a.bits):
        spy = CacheBytes(model)
        loader.load = lambda *args, spy=spy, **kw: (spy, tok)
        kv = [] if bits is None else ["--kv-bits", str(bits)]
        result = CliRunner().invoke(cli.main, ["generate", "--model", a.checkpoint, "-p", prompt, "-m", "8", "--temp",
                                               "0", "--no-think", "-v", *kv])
        assert result.exit_code == 0, result.output
        plain = plain or spy.peak
        figures = [line for line in result.stderr.splitlines() if line.startswith(("prompt:", "peak memory:"))]
        rows.append({"kv_bits": bits, "cache_mb": round(spy.peak / 1e6, 2), "x_plain": round(spy.peak / plain, 3),
                     "cli": figures})
        print(json.dumps(rows[-1]), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="memory and speed at a long context, ours against mlx-lm")
    r.add_argument("checkpoint")
    r.add_argument("--context", type=int, default=16384)
    r.add_argument("--chunk", type=int, default=2048)
    r.add_argument("--decode-tokens", type=int, default=16)
    r.add_argument("--bits", default="none,8,4")
    r.add_argument("--out")
    t = sub.add_parser("attention", help="one layer's attention, the ways compared")
    t.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    t.add_argument("--context", type=int, default=16384)
    t.add_argument("--chunk", type=int, default=2048)
    t.add_argument("--bits", default="8,4")
    t.add_argument("--trials", type=int, default=3)
    q = sub.add_parser("quality", help="quantized caches against the float32 cache")
    q.add_argument("--shape", choices=sorted(SHAPES), default="full")
    q.add_argument("--layers", type=int, help="fewer layers than the shape's")
    q.add_argument("--prompt-tokens", type=int, default=4096)
    q.add_argument("--steps", type=int, default=256)
    q.add_argument("--start", type=int, default=64, help="the quantized_kv_start compared with 0")
    q.add_argument("--logit-scale", type=float, default=8.0, help="the final norm's weight times this")
    q.add_argument("--out")
    c = sub.add_parser("cli", help="the cache qwen3-mlx generate --kv-bits used, measured through the CLI")
    c.add_argument("checkpoint")
    c.add_argument("--prompt-tokens", type=int, default=4096)
    c.add_argument("--bits", default="none,8,4")
    a = p.parse_args()
    {"run": cmd_run, "attention": cmd_attention, "quality": cmd_quality, "cli": cmd_cli}[a.command](a)


if __name__ == "__main__":
    main()
