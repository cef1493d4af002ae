"""Batched generation: qwen3_mlx.generation.batch against mlx-lm's batch_generate, and time to first token under load.

    python benchmarks/batch_bench.py batch CHECKPOINT [--rows 1 8 [32]] [--prompt-tokens 32]
                                         [--decode-tokens 64] [--trials 3] [--out batch.json]
    python benchmarks/batch_bench.py ttft CHECKPOINT [--prompt-tokens 512] [--running 7]
                                        [--prefill-step-size 512] [--trials 5] [--out ttft.json]

Checkpoints come from `bench.py make` (random weights); prompts are token ids drawn below the
model's vocabulary, one prompt per row, the same on both sides.

batch: both models loaded once, in one process. For each row count, ours
(qwen3_mlx.generation.batch.batch_generate, max_batch = rows) and mlx-lm's (mlx_lm.batch_generate,
completion_batch_size = rows) run alternately (which goes first switches each trial), after one
untimed warm-up of each: greedy, no seed (mlx-lm would not batch one), the end-of-turn ids banned by
a -inf logit bias (ours: logit_bias; mlx-lm: make_logits_processors) so that every row writes
exactly --decode-tokens tokens. Each side runs twice per trial on the same prompts: with
max_tokens 1 (the prefill and one draw) and with --decode-tokens. Figures, medians over the trials:
    decode tok/s     rows x (decode tokens - 1) / (wall(decode tokens) - wall(1)): the decode steps
                     alone, whatever each side does with the prompts (ours prefills newcomers one
                     at a time between decode steps, mlx-lm prefills them together)
    end-to-end tok/s rows x decode tokens / wall(decode tokens), prompts and text included
    peak GB          mx.get_peak_memory() over the run, less the memory held before it (both
                     models' weights): the batch's KV cache and activations
Also ours' single stream: qwen3_mlx.generate on the first prompt (stats.decode_tokens /
stats.decode_seconds), the figure a batch of 8 is compared with. Ratios are ours / mlx-lm at the
same rows, and ours at each row count / our single stream.

ttft: our Engine (max_batch = --running + 1, no prefix store, --prefill-step-size prompt tokens
between two decode steps). "alone": a request of --prompt-tokens ids (max_tokens 1) submitted to an
idle engine; "loaded": the same size of request submitted while --running rows of 32-token prompts
are decoding. TTFT is wall time from submit() to the request's first chunk, read by the submitting
thread. Also the longest gap between two tokens of the running rows while the newcomer was being
prefilled, against their median gap: the running rows keep producing tokens. The trials alternate
alone and loaded; every long prompt is new.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench import EOS_IDS


def prompts_of(rng: np.random.Generator, vocab: int, rows: int, n: int) -> list[list[int]]:
    # Ids below the model's vocabulary and below Qwen3's special tokens: real text tokens either way.
    return [rng.integers(0, min(vocab, 151643), n).tolist() for _ in range(rows)]


def banned(tokenizer, vocab: int) -> dict[int, float]:
    return {t: float("-inf") for t in set(tokenizer.eos_token_ids) | set(EOS_IDS) if t < vocab}


def fresh() -> float:
    """Free what the last run left; reset the peak; return the memory held now."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    return mx.get_active_memory()


# ---------------------------------------------------------------- batch


def run_ours(model, tokenizer, prompts: list[list[int]], n: int, bias: dict) -> tuple[float, list[list[int]]]:
    from qwen3_mlx.generation.batch import batch_generate
    from qwen3_mlx.generation.options import EngineOptions

    start = time.perf_counter()
    results = batch_generate(model, tokenizer, prompts, engine_options=EngineOptions(max_batch=len(prompts)),
                             temp=0.0, think=False, max_tokens=n, logit_bias=bias)
    wall = time.perf_counter() - start
    return wall, [r.token_ids for r in results]


def run_mlx_lm(model, tokenizer, prompts: list[list[int]], n: int, bias: dict) -> tuple[float, list[list[int]]]:
    from mlx_lm import batch_generate
    from mlx_lm.sample_utils import make_logits_processors

    start = time.perf_counter()
    r = batch_generate(model, tokenizer, prompts, max_tokens=n, return_token_ids=True,
                       logits_processors=make_logits_processors(logit_bias=bias),
                       completion_batch_size=len(prompts), prefill_batch_size=min(8, len(prompts)))
    wall = time.perf_counter() - start
    return wall, r.token_ids


def single_stream(model, tokenizer, prompt: list[int], n: int, bias: dict) -> float:
    from qwen3_mlx import generate

    stats = generate(model, tokenizer, prompt, temp=0.0, think=False, max_tokens=n, logit_bias=bias).stats
    return stats.decode_tokens / stats.decode_seconds


def one_batch(side: str, models: dict, prompts: list[list[int]], n: int, bias: dict) -> dict:
    import mlx.core as mx

    run = {"ours": run_ours, "mlx-lm": run_mlx_lm}[side]
    model, tokenizer = models[side]
    fresh()
    wall_1, _ = run(model, tokenizer, prompts, 1, bias)
    held = fresh()
    wall_n, tokens = run(model, tokenizer, prompts, n, bias)
    peak = mx.get_peak_memory() - held
    rows = len(prompts)
    if any(len(t) != n for t in tokens):
        sys.exit(f"batch_bench.py: {side} wrote {sorted({len(t) for t in tokens})} tokens a row, not {n}")
    return {"wall_1_s": wall_1, "wall_s": wall_n, "decode_tps": rows * (n - 1) / (wall_n - wall_1),
            "e2e_tps": rows * n / wall_n, "peak_gb": peak / 1e9, "tokens": tokens}


def cmd_batch(a: argparse.Namespace) -> None:
    import mlx.core as mx
    import mlx_lm

    import qwen3_mlx

    path = Path(a.checkpoint).expanduser().absolute()
    config = json.loads((path / "config.json").read_text())
    vocab = config["vocab_size"]
    models = {"ours": qwen3_mlx.load(path), "mlx-lm": mlx_lm.load(str(path))}
    bias = banned(models["ours"][1], vocab)
    rng = np.random.default_rng(a.seed)
    prompts = {r: prompts_of(rng, vocab, r, a.prompt_tokens) for r in a.rows}
    warm = prompts[max(a.rows)]
    for side in models:
        one_batch(side, models, warm, 3, bias)
    single_stream(*models["ours"], warm[0], 3, bias)
    trials: dict[str, list] = {"single": []}
    for t in range(a.trials):
        trials["single"].append(single_stream(*models["ours"], prompts[a.rows[0]][0], a.decode_tokens, bias))
        print(f"trial {t + 1} ours single stream {trials['single'][-1]:.1f} tok/s", file=sys.stderr)
        for rows in a.rows:
            for side in (("ours", "mlx-lm") if t % 2 == 0 else ("mlx-lm", "ours")):
                r = one_batch(side, models, prompts[rows], a.decode_tokens, bias)
                trials.setdefault(f"{side}/{rows}", []).append(r)
                print(f"trial {t + 1} {side:6s} rows {rows:2d}: decode {r['decode_tps']:.1f} tok/s, end-to-end "
                      f"{r['e2e_tps']:.1f} tok/s, wall {r['wall_s']:.2f} s (1 token {r['wall_1_s']:.2f} s), "
                      f"peak {r['peak_gb']:.3f} GB", file=sys.stderr)
    single = statistics.median(trials["single"])
    med = {k: {f: statistics.median(r[f] for r in rs) for f in ("decode_tps", "e2e_tps", "peak_gb")}
           for k, rs in trials.items() if k != "single"}
    same = {rows: sum(o == m for o, m in zip(trials[f"ours/{rows}"][0]["tokens"], trials[f"mlx-lm/{rows}"][0]["tokens"]))
            for rows in a.rows}
    title = (f"{path.name}: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
             f"{'4-bit' if config.get('quantization') else config.get('torch_dtype', '?')}; prompts "
             f"{a.prompt_tokens}, decode {a.decode_tokens} a row, {a.trials} trials (medians); "
             f"{mx.default_device()}, {platform.machine()}; ours single stream {single:.1f} tok/s")
    lines = [title, "", ("| rows | decode tok/s ours | mlx-lm | ours / mlx-lm | ours / single stream "
                         "| end-to-end tok/s ours | mlx-lm | peak GB ours | mlx-lm | rows alike |"),
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rows in a.rows:
        o, m = med[f"ours/{rows}"], med[f"mlx-lm/{rows}"]
        lines.append(f"| {rows} | {o['decode_tps']:.1f} | {m['decode_tps']:.1f} | "
                     f"{o['decode_tps'] / m['decode_tps']:.2f}x | {o['decode_tps'] / single:.2f}x | "
                     f"{o['e2e_tps']:.1f} | {m['e2e_tps']:.1f} | {o['peak_gb']:.3f} | {m['peak_gb']:.3f} | "
                     f"{same[rows]}/{rows} |")
    print("\n".join(lines))
    if a.out:
        for rs in trials.values():
            for r in rs:
                if isinstance(r, dict):
                    r.pop("tokens")
        Path(a.out).write_text(json.dumps({
            "checkpoint": str(path), "config": config, "prompt_tokens": a.prompt_tokens,
            "decode_tokens": a.decode_tokens, "rows": a.rows, "trials": trials, "medians": med,
            "single_stream_tps": single, "rows_alike": same, "device": str(mx.default_device()),
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "table": "\n".join(lines)}, indent=1))


# ---------------------------------------------------------------- ttft


class Running:
    """A request that keeps decoding, read in a thread of its own that notes when each chunk came."""

    def __init__(self, request) -> None:
        self.request, self.times = request, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for _ in self.request:
            self.times.append(time.perf_counter())


def first_chunk(engine, prompt: list[int], bias: dict) -> tuple[float, float]:
    """Submit, then wait for the first chunk: (submit time, seconds to the first chunk)."""
    start = time.perf_counter()
    request = engine.submit(prompt, temp=0.0, think=False, max_tokens=1, logit_bias=bias)
    next(iter(request))
    ttft = time.perf_counter() - start
    request.result()  # the rest: its last chunk
    return start, ttft


def ttft_loaded(engine, prompt: list[int], short: list[list[int]], bias: dict) -> dict:
    running = [Running(engine.submit(p, temp=0.0, think=False, max_tokens=1 << 14, logit_bias=bias))
               for p in short]
    while any(len(r.times) < 3 for r in running):  # every row decoding
        time.sleep(0.005)
    start, ttft = first_chunk(engine, prompt, bias)
    end = start + ttft
    for r in running:
        r.request.cancel()
    for r in running:
        r.thread.join()
    gaps = [b - a for r in running for a, b in zip(r.times, r.times[1:])]
    during = [b - a for r in running for a, b in zip(r.times, r.times[1:]) if b > start and a < end]
    return {"ttft_s": ttft, "median_gap_s": statistics.median(gaps), "max_gap_during_s": max(during, default=0.0),
            "tokens_during": sum(start < t <= end for r in running for t in r.times)}


def cmd_ttft(a: argparse.Namespace) -> None:
    import mlx.core as mx

    import qwen3_mlx
    from qwen3_mlx.generation.engine import Engine

    path = Path(a.checkpoint).expanduser().absolute()
    config = json.loads((path / "config.json").read_text())
    vocab = config["vocab_size"]
    model, tokenizer = qwen3_mlx.load(path)
    bias = banned(tokenizer, vocab)
    rng = np.random.default_rng(a.seed)
    short = prompts_of(rng, vocab, a.running, 32)
    trials: dict[str, list] = {"alone": [], "loaded": []}
    with Engine(model, tokenizer, max_batch=a.running + 1, prefix_store_bytes=0,
                prefill_budget=a.prefill_step_size) as engine:
        ttft_loaded(engine, prompts_of(rng, vocab, 1, a.prompt_tokens)[0], short, bias)  # warm-up
        first_chunk(engine, prompts_of(rng, vocab, 1, a.prompt_tokens)[0], bias)
        for t in range(a.trials):
            for mode in (("alone", "loaded") if t % 2 == 0 else ("loaded", "alone")):
                prompt = prompts_of(rng, vocab, 1, a.prompt_tokens)[0]
                fresh()
                r = {"ttft_s": first_chunk(engine, prompt, bias)[1]} if mode == "alone" else \
                    ttft_loaded(engine, prompt, short, bias)
                trials[mode].append(r)
                print(f"trial {t + 1} {mode:6s} " + " ".join(f"{k} {v:.4f}" for k, v in r.items()), file=sys.stderr)
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in trials.items()}
    lo = med["loaded"]
    lines = [(f"{path.name}: a {a.prompt_tokens}-token request, alone and while {a.running} rows decode; "
              f"prefill step {a.prefill_step_size}; {a.trials} trials (medians); {mx.default_device()}"), "",
             "| figure | value |", "| --- | ---: |",
             f"| TTFT alone s | {med['alone']['ttft_s']:.4f} |",
             f"| TTFT under load s | {lo['ttft_s']:.4f} |",
             f"| loaded / alone | {lo['ttft_s'] / med['alone']['ttft_s']:.2f}x |",
             f"| running rows: median gap between tokens s | {lo['median_gap_s']:.4f} |",
             f"| running rows: longest gap while the newcomer was prefilled s | {lo['max_gap_during_s']:.4f} |",
             f"| running rows' tokens while the newcomer waited | {lo['tokens_during']:.0f} |"]
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text(json.dumps({
            "checkpoint": str(path), "prompt_tokens": a.prompt_tokens, "running": a.running,
            "prefill_step_size": a.prefill_step_size, "trials": trials, "medians": med,
            "device": str(mx.default_device()), "table": "\n".join(lines)}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("batch", help="batched decode, ours against mlx-lm")
    b.add_argument("checkpoint")
    b.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    b.add_argument("--prompt-tokens", type=int, default=32)
    b.add_argument("--decode-tokens", type=int, default=64)
    t = sub.add_parser("ttft", help="time to first token of a long request while rows decode")
    t.add_argument("checkpoint")
    t.add_argument("--prompt-tokens", type=int, default=512)
    t.add_argument("--running", type=int, default=7)
    t.add_argument("--prefill-step-size", type=int, default=512)
    for s in (b, t):
        s.add_argument("--trials", type=int, default=3)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--out", help="write the JSON here")
    a = p.parse_args()
    if a.command == "batch" and (a.decode_tokens < 2 or a.prompt_tokens < 1 or min(a.rows) < 1):
        sys.exit("batch_bench.py batch: --decode-tokens must be >= 2, --prompt-tokens and --rows >= 1")
    {"batch": cmd_batch, "ttft": cmd_ttft}[a.command](a)


if __name__ == "__main__":
    main()
