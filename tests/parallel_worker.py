"""One rank of test_parallel.py's distributed runs.

    MLX_HOSTFILE=hosts.json MLX_RANK=R python tests/parallel_worker.py SPEC.json OUT_DIR

Runs the jobs of SPEC.json in order, each loading a checkpoint sharded (qwen3_mlx.load(parallel=...))
and computing what the test compares with one process, and writes OUT_DIR/rankR.json: the results,
and how the rank ended ("status": "ok" or "error" with the error line). A rank may end without
writing it (killed, stopped, or by the watchdog's os._exit): the test reads its exit status and stderr.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen3_mlx.generation.batch import batch_generate
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.model.fast import cpu_threads, speed_up
from qwen3_mlx.generation.single import generate
from qwen3_mlx.checkpoint.loader import load, load_model
from qwen3_mlx.model.model import Model
from qwen3_mlx.generation.options import GenerationOptions
from qwen3_mlx.collectives import Watchdog, broadcast, join, sync_random_state
from qwen3_mlx.model.parallel import shard
from qwen3_mlx.text.tokenizer import Tokenizer

PROMPT = [1, 5, 9, 200, 33, 7, 11]
BATCH = [[3 + i, 40 + 7 * i, 100 + i] for i in range(8)]  # 8 rows of 3 tokens
TOKENS = 10
DECISION = {"request": 7, "prompt": "héllo ✓", "cancel": [3, 5]}  # what rank 0 broadcasts


def options(**kw) -> GenerationOptions:
    return GenerationOptions(think=False, max_tokens=TOKENS, **kw)


def load_sharded(job: dict, group: mx.distributed.Group,
                 tokenizers: dict[str, Tokenizer] | None = None) -> tuple[Model, Tokenizer | None]:
    """With a tokenizer, through load(parallel=...) the first time a checkpoint is read (its tokenizer is
    then kept in `tokenizers`: reading it takes a second); otherwise (faster), as load does it: shard, then
    speed_up, with the kept tokenizer if there is one."""
    tokenizers = {} if tokenizers is None else tokenizers
    if "generate" in job.get("checks", ()) and job["path"] not in tokenizers:
        model, tokenizers[job["path"]] = load(job["path"], job.get("dtype"), parallel=job["parallel"], group=group,
                                              layers_per_rank=job.get("layers_per_rank"))
        return model, tokenizers[job["path"]]

    def swap(model: Model) -> None:
        speed_up(shard(model, group, job["parallel"], job.get("layers_per_rank")))

    return load_model(Path(job["path"]), job.get("dtype"), swap=swap), tokenizers.get(job["path"])


def embedding_rows(model: Model) -> int | None:
    """Rows of the embedding table this rank holds (sharded by vocabulary, or whole); None if none."""
    params = dict(tree_flatten(model.model.parameters()))
    tables = [v for k, v in params.items() if k.startswith("embed_tokens") and k.endswith("weight")]
    return tables[0].shape[0] if tables else None


def run_job(job: dict, group: mx.distributed.Group, watchdog: Watchdog, tokenizers: dict[str, Tokenizer]) -> dict:
    """What one checkpoint, loaded sharded, computes: every evaluation under the watchdog."""
    with watchdog:
        model, tok = load_sharded(job, group, tokenizers)
    attn = model.layers[0].self_attn
    out = {"layers": len(model.layers), "caches": len(model.make_cache()), "kv_heads": attn.n_kv_heads,
           "args_kv_heads": model.args.num_key_value_heads, "fused": "qkv_proj" in attn,
           "decode": type(model.decode).__name__, "sharding": [model.sharding.mode, list(model.sharding.layers)],
           "cpu_threads": cpu_threads(), "embedding_rows": embedding_rows(model)}
    ids = mx.array([PROMPT])
    with watchdog:
        out["logits"] = model(ids)[0].astype(mx.float32).tolist()  # (L, V)
        cache = model.make_cache()
        model(ids[:, :-1], cache)
        mx.eval([c.keys for c in cache])  # as a prefill does: no logits evaluated
        steps = [model.decode(ids[:, -1:], cache), model.decode(mx.array([[4]]), cache)]
        out["steps"] = mx.concatenate(steps).astype(mx.float32).tolist()  # (2, V), through the compiled step
    if "generate" in job.get("checks", ()):
        with watchdog:
            out["greedy"] = generate(model, tok, PROMPT, options(temp=0.0)).token_ids
            out["seeded"] = generate(model, tok, PROMPT, options(temp=1.0, seed=7)).token_ids
            sync_random_state(group, 1234)
            out["synced"] = generate(model, tok, PROMPT, options(temp=1.0)).token_ids
            out["unseeded"] = generate(model, tok, PROMPT, options(temp=1.0)).token_ids
    if "batch" in job.get("checks", ()):  # with "generate"
        with watchdog:
            out["batch"] = [r.token_ids for r in batch_generate(model, tok, BATCH, options(temp=0.0))]
    return out


def run_fault(job: dict, group: mx.distributed.Group, watchdog: Watchdog, out_dir: Path) -> None:
    """Decode steps until the last rank stops (SIGSTOP) or kills (SIGKILL) itself after job["after"];
    the others must end within job["watchdog"] seconds. The last rank writes when it did so. Loading and
    the first step (compiling) wait on the slowest rank under the run's longer watchdog."""
    with watchdog:
        model, _ = load_sharded(job, group)
        cache = model.make_cache()
        mx.eval(model.decode(mx.array([[0]]), cache))
    last, short = group.rank() == group.size() - 1, Watchdog(group.rank(), job["watchdog"])
    for step in range(1, 1000):
        if last and step == job["after"]:
            (out_dir / "fault.json").write_text(json.dumps({"time": time.time()}))
            os.kill(os.getpid(), signal.SIGSTOP if job["fault"] == "stop" else signal.SIGKILL)
        with short:
            mx.eval(model.decode(mx.array([[step % 64]]), cache))


def listening(port: int) -> bool:
    """Whether a socket of this machine listens on TCP `port`, read from Linux's /proc/net/tcp (an
    observer: connecting to a rank would take its peer's place); True where there is no /proc."""
    tables = [t for t in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")) if t.exists()]
    rows = [line.split() for t in tables for line in t.read_text().splitlines()[1:]]
    return not tables or any(row[3] == "0A" and int(row[1].rsplit(":", 1)[1], 16) == port for row in rows)


def after_lower_ranks(rank: int) -> None:
    """Return once every rank below this one listens. The ring backend's rank R connects to the ranks
    below it and, finding one not listening yet, retries after 1 s, then 2 s, 4 s...: ranks that finished
    importing in another order (a loaded machine) waited out those sleeps."""
    hosts = json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())
    ports = [int(addresses[0].rsplit(":", 1)[1]) for addresses in hosts[:rank]]
    deadline = time.monotonic() + 30  # then join, whose own bound reports the missing rank
    while time.monotonic() < deadline and not all(listening(port) for port in ports):
        time.sleep(0.01)


def main(spec_file: str, out_dir: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    rank, out = int(os.environ["MLX_RANK"]), Path(out_dir)
    result: dict = {"rank": rank, "jobs": {}, "status": "started"}
    code = 0
    try:
        after_lower_ranks(rank)
        group = join("ring", spec.get("join_seconds", 30))
        watchdog = Watchdog(group.rank(), spec.get("watchdog", 30))
        tokenizers: dict[str, Tokenizer] = {}  # one read per checkpoint (load_sharded)
        with watchdog:
            result["jobs"]["broadcast"] = {"value": broadcast(DECISION if group.rank() == 0 else None, group)}
        for job in spec["jobs"]:
            if "fault" in job:
                run_fault(job, group, watchdog, out)
            else:
                result["jobs"][job["name"]] = run_job(job, group, watchdog, tokenizers)
        result["status"] = "ok"
    except Qwen3Error as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        result.update(status="error", error=str(e))
        code = 1
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
