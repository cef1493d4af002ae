"""Tensor and pipeline parallelism on localhost against one process: tok/s, collectives, memory.

    python benchmarks/bench.py make tiny /tmp/qwen3-tiny-bf16       # checkpoints: see bench.py
    python benchmarks/bench.py make full /tmp/q17b
    python benchmarks/parallel_bench.py /tmp/qwen3-tiny-bf16 [--prompt-tokens 128] [--decode-tokens 64]
                                        [--modes single,tensor,pipeline] [--ranks 2] [--trials 3] [--out tiny.json]
    python benchmarks/parallel_bench.py /tmp/q17b --prompt-tokens 16 --decode-tokens 4     # memory, full shape

Each mode runs in processes of its own: "single" in one, "tensor" and "pipeline" in --ranks ranks
started as mlx.launch starts them (a ring hostfile on free localhost ports, MLX_HOSTFILE and MLX_RANK),
each loading with qwen3_mlx.load(parallel=...). Every rank measures:
    load s          load() until the weights are evaluated
    load peak GB    mx.get_peak_memory() over load()
    load RSS GB     the process's peak resident set (ru_maxrss) after load(), tokenizer and imports included
    weights GB      the bytes of the parameters the rank holds
    prefill tok/s   --prompt-tokens through the model (as generation's prefill: all but the last into the
                    cache, then a step for the last), until the first greedy token is on the host
    decode tok/s    --decode-tokens greedy steps through model.decode (compiled), until the last is on the host
                    (both: medians of --trials generations, after the load; the first compiles)
    collectives     per decode token, counted in one uncompiled step by wrapping mx.distributed's all_sum,
                    all_gather, send and recv, with the bytes of their payloads
Ranks on one machine share its cores (here 2, busy with other work): the figures measure the
overhead of the collectives, not a speed-up. A table of rank 0's speed and every rank's memory is
printed; --out also writes every rank's figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLLECTIVES = ("all_sum", "all_gather", "send", "recv")


# ---------------------------------------------------------------- one rank


def count_collectives(model, cache) -> dict:
    """The collectives one uncompiled decode step runs: {name: [count, payload bytes]}."""
    import mlx.core as mx

    from qwen3_mlx.model.model import Model

    counts = {name: [0, 0] for name in COLLECTIVES}
    originals = {name: getattr(mx.distributed, name) for name in COLLECTIVES}

    def counting(name):
        def call(*args, **kwargs):
            if name == "recv":
                shape, dtype = args[0], args[1]
                nbytes = dtype.size * math.prod(shape)
            else:
                nbytes = args[0].nbytes
            counts[name][0] += 1
            counts[name][1] += nbytes
            return originals[name](*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(mx.distributed, name, counting(name))
    try:
        mx.eval(Model.decode(model, mx.array([[1]]), cache))
    finally:
        for name, fn in originals.items():
            setattr(mx.distributed, name, fn)
    return {name: c for name, c in counts.items() if c[0]}


def rank_main(path: str, mode: str, prompt_tokens: int, decode_tokens: int, trials: int, out: str) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from qwen3_mlx.checkpoint.loader import load

    mx.reset_peak_memory()
    start = time.perf_counter()
    model, _ = load(path, parallel=None if mode == "single" else mode)
    loaded = time.perf_counter()
    figures = {"mode": mode, "rank": int(os.environ.get("MLX_RANK", 0)), "load_s": loaded - start,
               "load_peak_gb": mx.get_peak_memory() / 1e9,
               "load_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
               "weights_gb": sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9,
               "layers": len(model.layers)}
    speeds = [generate_greedy(model, prompt_tokens, decode_tokens) for _ in range(trials)]
    figures.update(prefill_tok_s=statistics.median(s[0] for s in speeds),
                   decode_tok_s=statistics.median(s[1] for s in speeds),
                   collectives=count_collectives(model, model.make_cache()) if mode != "single" else {})
    Path(out).write_text(json.dumps(figures))


def generate_greedy(model, prompt_tokens: int, decode_tokens: int) -> tuple[float, float]:
    """Prefill and decode tok/s of one greedy generation from a fixed prompt."""
    import mlx.core as mx

    vocab = model.args.vocab_size
    prompt = mx.array([[(7 * i + 3) % vocab for i in range(prompt_tokens)]])
    cache = model.make_cache()
    t0 = time.perf_counter()
    model(prompt[:, :-1], cache)
    mx.eval([c.keys for c in cache])
    token = model.decode(prompt[:, -1:], cache).argmax(-1).item()
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        token = model.decode(mx.array([[token]]), cache).argmax(-1).item()
    t2 = time.perf_counter()
    return prompt_tokens / (t1 - t0), decode_tokens / (t2 - t1)


# ---------------------------------------------------------------- the runs


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_mode(a: argparse.Namespace, mode: str, folder: Path) -> list[dict]:
    """Start the mode's ranks, wait for them (at most --timeout seconds), kill what is left."""
    n = 1 if mode == "single" else a.ranks
    hosts = folder / f"{mode}-hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(n)]))
    outs = [folder / f"{mode}-{r}.json" for r in range(n)]
    env = [{**os.environ, "MLX_HOSTFILE": str(hosts), "MLX_RANK": str(r)} if n > 1 else dict(os.environ)
           for r in range(n)]
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", a.checkpoint, mode, str(a.prompt_tokens),
                               str(a.decode_tokens), str(a.trials), str(outs[r])], env=env[r]) for r in range(n)]
    try:
        deadline = time.monotonic() + a.timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for r, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode != 0 or not out.exists():
            sys.exit(f"parallel_bench: {mode} rank {r} exited {p.returncode}; see its output above")
    return [json.loads(out.read_text()) for out in outs]


def report(results: dict[str, list[dict]]) -> str:
    single = results.get("single", [None])[0]
    lines = ["| mode | rank | layers | load s | load peak GB | load RSS GB | weights GB | prefill tok/s | "
             "decode tok/s | collectives / token (count, payload bytes) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, ranks in results.items():
        for f in ranks:
            ratio = f" ({f['load_peak_gb'] / single['load_peak_gb']:.2f}x)" if single and mode != "single" else ""
            coll = ", ".join(f"{name} {c} x, {b / c:,.0f} B" for name, (c, b) in f["collectives"].items()) or "-"
            lines.append(f"| {mode} | {f['rank']} | {f['layers']} | {f['load_s']:.2f} | {f['load_peak_gb']:.3f}{ratio} | "
                         f"{f['load_rss_gb']:.3f} | {f['weights_gb']:.3f} | {f['prefill_tok_s']:.1f} | "
                         f"{f['decode_tok_s']:.1f} | {coll} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--rank"]:
        path, mode, prompt_tokens, decode_tokens, trials, out = sys.argv[2:8]
        rank_main(path, mode, int(prompt_tokens), int(decode_tokens), int(trials), out)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--modes", default="single,tensor,pipeline")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--trials", type=int, default=3, help="generations per rank; the medians are reported")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds a mode may run before its ranks are killed")
    p.add_argument("--out")
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in a.modes.split(","):
            results[mode] = run_mode(a, mode, Path(folder))
    print(report(results))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
