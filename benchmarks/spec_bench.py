"""Speculative decoding: ours against mlx-lm's on the same target/draft pair, and prompt lookup.

    python benchmarks/bench.py make small /tmp/spec-src                 # any bf16 checkpoint made there
    python benchmarks/spec_bench.py pair /tmp/spec-src /tmp/spec --draft-layers 2
    python benchmarks/spec_bench.py draft /tmp/spec [--k 2 4 6] [--tokens 64] [--trials 3]
    python benchmarks/spec_bench.py lookup /tmp/spec/target [--tokens 64] [--trials 3]
    python benchmarks/spec_bench.py batch /tmp/spec [--rows 8] [--k 4] [--tokens 64] [--trials 3]

pair: random weights decide how often a draft agrees, so the pair is built to agree: the target is the
source with every layer from --draft-layers on made to add nothing (its o_proj and down_proj zero), and
the draft is the source's first --draft-layers layers (with the same embedding, norm and head). The two
give the same distributions, so every draft is right under the target's own sampling rule (ours keeps a
draft with probability min(1, p/q) = 1), while a rule that keeps a draft only when an independent
sample of the target equals it (mlx-lm's) keeps fewer as the temperature rises.

draft: greedy (temp 0) and sampled (temp 0.8) decoding of --tokens tokens (end of turn banned), plain and
speculative with k = --k, ours (generate with draft_model=) and mlx-lm's (generate_step and
speculative_generate_step). Prints tok/s, the acceptance (kept drafts / drafted), and the speed-up that
the measured acceptance a and verification cost c(k) predict: (1 - a^(k+1)) / (1 - a) tokens a step
for c(k) + k x (a draft step's cost) of plain steps; c(k) is the time of one k+1-position pass over
the time of one compiled one-token step, both measured here.

lookup: prompt lookup (no draft model) on text it can predict (a prompt that repeats a passage, decoded
greedily: the model repeats it) and on text it cannot (sampled at temperature 1 from a random prompt,
where no draft is kept and the adaptive length rests): tok/s against plain decoding.

batch: --rows requests decoded together by batch_generate, greedy: plain, with the pair's draft, and
with prompt lookup on predictable prompts (each row its own repeated passage); aggregate tok/s, and
whether every row's tokens equal the plain batch's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

EOS_IDS = (151645, 151643)


# ---------------------------------------------------------------- the pair


def cmd_pair(a: argparse.Namespace) -> None:
    import mlx.core as mx

    src, out = Path(a.source), Path(a.out)
    config = json.loads((src / "config.json").read_text())
    weights = {}
    for file in sorted(src.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    target = dict(weights)
    for i in range(a.draft_layers, config["num_hidden_layers"]):
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            key = f"model.layers.{i}.{name}"
            target[key] = mx.zeros_like(weights[key])
    draft = {k: v for k, v in weights.items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < a.draft_layers}
    for name, tensors, layers in (("target", target, config["num_hidden_layers"]), ("draft", draft, a.draft_layers)):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for file in src.iterdir():
            if file.is_file() and file.suffix != ".safetensors" and not file.name.endswith(".index.json"):
                shutil.copy(file, folder / file.name)
        (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=2))
        mx.save_safetensors(str(folder / "model.safetensors"), tensors)
    print(f"wrote {out / 'target'} ({config['num_hidden_layers']} layers, from {a.draft_layers} on adding nothing) "
          f"and {out / 'draft'} ({a.draft_layers} layers)")


# ---------------------------------------------------------------- ours and mlx-lm's


def prompt_ids(vocab: int, n: int = 32, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(0, min(vocab, 1000)) for _ in range(n)]


def ours(target, tok, draft, ids: list[int], n: int, temp: float, k: int, lookup: bool = False) -> dict:
    from qwen3_mlx import generate

    vocab = target.args.vocab_size
    options = dict(max_tokens=n, temp=temp, top_k=0, top_p=1.0, min_p=0.0, seed=1, think=False,
                   logit_bias={t: float("-inf") for t in EOS_IDS if t < vocab})
    if draft is not None or lookup:
        options.update(num_draft_tokens=k, prompt_lookup=lookup)
    start = time.perf_counter()
    r = generate(target, tok, ids, draft_model=draft, **options)
    seconds = time.perf_counter() - start
    s = r.stats
    return {"tps": len(r.token_ids) / seconds, "drafted": s.drafted_tokens, "accepted": s.accepted_tokens,
            "tokens": r.token_ids}


def mlx_lm_run(target, draft, ids: list[int], n: int, temp: float, k: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step, speculative_generate_step
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    vocab = target.args.vocab_size
    processors = make_logits_processors(logit_bias={t: float("-inf") for t in EOS_IDS if t < vocab})
    mx.random.seed(1)
    sampler = make_sampler(temp=temp)
    prompt = mx.array(ids, mx.int32)
    start = time.perf_counter()
    if draft is None:
        steps = generate_step(prompt, target, max_tokens=n, sampler=sampler, logits_processors=processors)
        out = [(t, False) for t, _ in steps]
    else:
        steps = speculative_generate_step(prompt, target, draft, num_draft_tokens=k, max_tokens=n, sampler=sampler,
                                          logits_processors=processors)
        out = [(t, from_draft) for t, _, from_draft in steps]
    seconds = time.perf_counter() - start
    kept = sum(1 for _, d in out if d)
    steps_taken = len(out) - kept  # every verification gives one token of the target's own
    return {"tps": len(out) / seconds, "drafted": steps_taken * k if draft is not None else 0, "accepted": kept,
            "tokens": [int(t) for t, _ in out]}


def verification_cost(model, k: int, trials: int = 5) -> float:
    """The time of a k+1-position pass over a compiled one-token step's, at a 64-token context."""
    import mlx.core as mx

    def timed(n: int) -> float:
        times = []
        for _ in range(trials):
            cache = model.make_cache()
            model(mx.zeros((1, 64), mx.int32), cache)
            mx.eval([c.keys for c in cache])
            start = time.perf_counter()
            logits = model.decode(mx.zeros((1, n), mx.int32), cache) if n == 1 else model(
                mx.zeros((1, n), mx.int32), cache)
            mx.eval(logits)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    timed(1)
    return timed(k + 1) / timed(1)


def predicted(acceptance: float, k: int, cost: float, draft_step: float) -> float:
    """Tokens a step over the step's cost in plain steps."""
    a = min(acceptance, 0.999999)
    tokens = (1 - a ** (k + 1)) / (1 - a)
    return tokens / (cost + k * draft_step)


def rate(r: dict) -> float:
    return r["accepted"] / r["drafted"] if r["drafted"] else 0.0


def cmd_draft(a: argparse.Namespace) -> None:
    from mlx_lm import load as mlx_lm_load

    from qwen3_mlx import load

    target, tok = load(Path(a.pair) / "target")
    draft, _ = load(Path(a.pair) / "draft")
    lm_target, _ = mlx_lm_load(str(Path(a.pair) / "target"))
    lm_draft, _ = mlx_lm_load(str(Path(a.pair) / "draft"))
    ids = prompt_ids(target.args.vocab_size)
    draft_step = _step_ratio(draft, target)
    print(f"draft step = {draft_step:.2f} of a target step\n")
    print("| temp | k | ours plain | ours spec | ours accept | predicted | mlx-lm plain | mlx-lm spec | mlx-lm accept "
          "| ours/mlx-lm |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for temp in (0.0, 0.8):
        for k in a.k:
            row = {name: [] for name in ("op", "os", "mp", "ms")}
            for _ in range(a.trials):
                row["op"].append(ours(target, tok, None, ids, a.tokens, temp, k))
                row["os"].append(ours(target, tok, draft, ids, a.tokens, temp, k))
                row["mp"].append(mlx_lm_run(lm_target, None, ids, a.tokens, temp, k))
                row["ms"].append(mlx_lm_run(lm_target, lm_draft, ids, a.tokens, temp, k))
            med = {key: statistics.median(r["tps"] for r in runs) for key, runs in row.items()}
            acc_o, acc_m = rate(row["os"][0]), rate(row["ms"][0])
            pred = predicted(acc_o, k, verification_cost(target, k), draft_step) * med["op"]
            print(f"| {temp} | {k} | {med['op']:.1f} | {med['os']:.1f} | {acc_o:.0%} | {pred:.1f} | {med['mp']:.1f} "
                  f"| {med['ms']:.1f} | {acc_m:.0%} | {med['os'] / med['ms']:.2f} |")


def _step_ratio(draft, target, trials: int = 5) -> float:
    """A draft decode step's time over the target's."""
    import mlx.core as mx

    def step_time(model) -> float:
        cache = model.make_cache()
        model(mx.zeros((1, 64), mx.int32), cache)
        times = []
        for _ in range(trials + 1):
            start = time.perf_counter()
            mx.eval(model.decode(mx.zeros((1, 1), mx.int32), cache))
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    return step_time(draft) / step_time(target)


def cmd_lookup(a: argparse.Namespace) -> None:
    from qwen3_mlx import load

    model, tok = load(a.checkpoint)
    passage = prompt_ids(model.args.vocab_size, 24, seed=3)
    predictable = passage * 4
    unpredictable = prompt_ids(model.args.vocab_size, 96, seed=5)
    print("| text | k | plain tok/s | lookup tok/s | ratio | accepted/drafted |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, ids, temp in (("predictable, greedy", predictable, 0.0), ("unpredictable, temp 1", unpredictable, 1.0)):
        for k in a.k:
            plain = [ours(model, tok, None, ids, a.tokens, temp, k) for _ in range(a.trials)]
            looked = [ours(model, tok, None, ids, a.tokens, temp, k, lookup=True) for _ in range(a.trials)]
            p, lk = (statistics.median(r["tps"] for r in runs) for runs in (plain, looked))
            print(f"| {name} | {k} | {p:.1f} | {lk:.1f} | {lk / p:.2f} | {looked[0]['accepted']}/"
                  f"{looked[0]['drafted']} |")


def cmd_batch(a: argparse.Namespace) -> None:
    from qwen3_mlx import load
    from qwen3_mlx.generation.batch import batch_generate
    from qwen3_mlx.generation.options import EngineOptions

    target, tok = load(Path(a.pair) / "target")
    draft, _ = load(Path(a.pair) / "draft")
    vocab = target.args.vocab_size
    options = dict(max_tokens=a.tokens, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, think=False,
                   logit_bias={t: float("-inf") for t in EOS_IDS if t < vocab}, num_draft_tokens=a.k[0])
    prompts = [prompt_ids(vocab, 24, seed=10 + i) * 3 for i in range(a.rows)]

    def run(**more) -> tuple[float, list, int, int]:
        times, results = [], None
        for _ in range(a.trials):
            start = time.perf_counter()
            results = batch_generate(target, tok, prompts, engine_options=EngineOptions(max_batch=a.rows), **options,
                                     **more)
            times.append(time.perf_counter() - start)
        tokens = sum(len(r.token_ids) for r in results)
        return (tokens / statistics.median(times), [r.token_ids for r in results],
                sum(r.stats.accepted_tokens for r in results), sum(r.stats.drafted_tokens for r in results))

    plain = run()
    print(f"| batch of {a.rows}, k {a.k[0]} | tok/s in all | ratio | accepted/drafted | rows equal plain |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| plain | {plain[0]:.1f} | 1.00 | - | - |")
    for name, more in (("draft", {"draft_model": draft}), ("prompt lookup", {"prompt_lookup": True})):
        r = run(**more)
        print(f"| {name} | {r[0]:.1f} | {r[0] / plain[0]:.2f} | {r[2]}/{r[3]} | {r[1] == plain[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pair")
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--draft-layers", type=int, default=2)
    d = sub.add_parser("draft")
    d.add_argument("pair")
    lk = sub.add_parser("lookup")
    lk.add_argument("checkpoint")
    b = sub.add_parser("batch")
    b.add_argument("pair")
    b.add_argument("--rows", type=int, default=8)
    for s in (d, lk, b):
        s.add_argument("--k", type=int, nargs="+", default=[2, 4, 6])
        s.add_argument("--tokens", type=int, default=64)
        s.add_argument("--trials", type=int, default=3)
    a = parser.parse_args()
    {"pair": cmd_pair, "draft": cmd_draft, "lookup": cmd_lookup, "batch": cmd_batch}[a.command](a)


if __name__ == "__main__":
    main()
