"""Tensor and pipeline parallelism (qwen3_mlx.model.parallel) against one process, on ranks spawned here.

Each run starts its ranks as mlx.launch would (MLX_HOSTFILE, a ring hostfile on free localhost ports,
and MLX_RANK), running tests/parallel_worker.py, which writes what it computed and how it ended to a
file of its own: mlx.launch's exit status says nothing of its ranks'. Every rank is killed in the end.
Four runs: 2 ranks through six checkpoint/mode jobs; 4 ranks in tensor mode; a stopped rank; a killed one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import make_checkpoint

from qwen3_mlx.checkpoint.converter import convert
from qwen3_mlx.errors import OptionError
from qwen3_mlx.model.fast import cpu_threads, local_ranks, speed_up
from qwen3_mlx.generation.single import generate
from qwen3_mlx.checkpoint.loader import load, load_model
from qwen3_mlx.generation.options import GenerationOptions
from qwen3_mlx.collectives import sync_random_state
from qwen3_mlx.model.parallel import layer_split, shard

WORKER = Path(__file__).with_name("parallel_worker.py")
PROMPT = [1, 5, 9, 200, 33, 7, 11]  # as parallel_worker.py
BATCH = [[3 + i, 40 + 7 * i, 100 + i] for i in range(8)]
TOKENS = 10
WATCHDOG = 3.0  # seconds, in the fault runs
# The odd shape: GQA (8 query heads, 4 KV), head_dim 16 != 64 / 8, untied, YaRN, 3 layers (split 2 + 1).
ODD = {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16,
       "intermediate_size": 256, "num_hidden_layers": 3, "tie_word_embeddings": False, "max_position_embeddings": 128,
       "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}
TIED = {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8,
        "intermediate_size": 128, "num_hidden_layers": 2, "tie_word_embeddings": True}


@dataclass
class Rank:
    returncode: int | None  # None: still running when the run was ended (then killed)
    ended: float | None  # time.time() when it was seen to exit
    stderr: str
    result: dict | None  # its rankR.json, if it wrote one


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch(folder: Path, n: int, spec: dict, timeout: float, wait_for: tuple[int, ...] | None = None) -> list[Rank]:
    """Run n ranks of the worker on `spec` until all (or the ranks in `wait_for`) have exited, or `timeout`
    seconds; whatever still runs then is killed."""
    folder.mkdir(parents=True)
    hosts, spec_file = folder / "hosts.json", folder / "spec.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(n)]))
    spec_file.write_text(json.dumps(spec))
    errs = [open(folder / f"rank{r}.err", "w") for r in range(n)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(spec_file), str(folder)], stdout=subprocess.DEVNULL,
                              stderr=errs[r], env={**os.environ, "MLX_HOSTFILE": str(hosts), "MLX_RANK": str(r)})
             for r in range(n)]
    ended: dict[int, float] = {}
    try:
        deadline = time.monotonic() + timeout
        while not set(wait_for or range(n)) <= set(ended) and time.monotonic() < deadline:
            for r, p in enumerate(procs):
                if r not in ended and p.poll() is not None:
                    ended[r] = time.time()
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in errs:
            f.close()
    ranks = []
    for r, p in enumerate(procs):
        out = folder / f"rank{r}.json"
        ranks.append(Rank(p.returncode if r in ended else None, ended.get(r), (folder / f"rank{r}.err").read_text(),
                          json.loads(out.read_text()) if out.exists() else None))
    return ranks


def job_results(ranks: list[Rank]) -> list[dict]:
    for r, rank in enumerate(ranks):
        assert rank.returncode == 0 and rank.result["status"] == "ok", f"rank {r}: {rank.stderr[-2000:]}"
    return [rank.result["jobs"] for rank in ranks]


# ---------------------------------------------------------------- one process, and the runs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    odd = make_checkpoint(root / "odd", tokenizer=True, vocab_size=512, seed=1, **ODD)
    tied = make_checkpoint(root / "tied", tokenizer=True, vocab_size=512, seed=2, **TIED)
    convert(odd, root / "q4", quantize=True, bits=4, group_size=64, dtype="float32")
    return {"odd": odd, "tied": tied, "q4": root / "q4"}


def opts(**kw) -> GenerationOptions:
    return GenerationOptions(think=False, max_tokens=TOKENS, **kw)


@pytest.fixture(scope="module")
def odd(checkpoints):
    return load(checkpoints["odd"], "float32")


@pytest.fixture(scope="module")
def single(checkpoints, odd) -> dict[str, dict]:
    """What one process computes, as the worker computes it."""
    out = {}
    for name, path in checkpoints.items():
        model, tok = odd if name == "odd" else (load_model(path, "float32", swap=speed_up), None)
        ids = mx.array([PROMPT])
        cache = model.make_cache()
        model(ids[:, :-1], cache)
        steps = mx.concatenate([model.decode(ids[:, -1:], cache), model.decode(mx.array([[4]]), cache)])
        out[name] = {"logits": np.array(model(ids)[0]), "steps": np.array(steps)}
        if name == "odd":
            out[name]["greedy"] = generate(model, tok, PROMPT, opts(temp=0.0)).token_ids
            out[name]["seeded"] = generate(model, tok, PROMPT, opts(temp=1.0, seed=7)).token_ids
            mx.random.seed(1234)
            out[name]["synced"] = generate(model, tok, PROMPT, opts(temp=1.0)).token_ids
    return out


def job(name: str, ckpt: str, parallel: str, checkpoints, **kw) -> dict:
    return {"name": name, "path": str(checkpoints[ckpt]), "parallel": parallel, "dtype": "float32", **kw}


@pytest.fixture(scope="module")
def two(checkpoints, tmp_path_factory) -> list[dict]:
    """Two ranks through every checkpoint in both modes (one run, to pay the start-up once)."""
    jobs = [job("odd-tensor", "odd", "tensor", checkpoints, checks=["generate", "batch"]),
            job("odd-pipeline", "odd", "pipeline", checkpoints, checks=["generate", "batch"]),
            job("odd-pipeline-1-2", "odd", "pipeline", checkpoints, layers_per_rank=[1, 2]),
            job("tied-tensor", "tied", "tensor", checkpoints),
            job("tied-pipeline", "tied", "pipeline", checkpoints),
            job("q4-tensor", "q4", "tensor", checkpoints),
            job("q4-pipeline", "q4", "pipeline", checkpoints)]
    return job_results(launch(tmp_path_factory.mktemp("two") / "run", 2, {"jobs": jobs}, timeout=150))


@pytest.fixture(scope="module")
def four(checkpoints, tmp_path_factory) -> list[dict]:
    jobs = [job("odd-tensor", "odd", "tensor", checkpoints), job("tied-tensor", "tied", "tensor", checkpoints)]
    return job_results(launch(tmp_path_factory.mktemp("four") / "run", 4, {"jobs": jobs}, timeout=150))


# ---------------------------------------------------------------- logits


@pytest.mark.parametrize("name", ["odd-tensor", "odd-pipeline", "odd-pipeline-1-2", "tied-tensor", "tied-pipeline"])
def test_two_ranks_give_the_logits_of_one_process_within_1e_4(two, single, name):
    ckpt = name.split("-")[0]
    for rank in two:
        for key in ("logits", "steps"):  # a whole prompt; two compiled decode steps after a prefill
            np.testing.assert_allclose(np.array(rank[name][key]), single[ckpt][key], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["odd-tensor", "tied-tensor"])
def test_four_ranks_in_tensor_mode_give_the_logits_of_one_process_within_1e_4(four, single, name):
    for rank in four:
        for key in ("logits", "steps"):
            np.testing.assert_allclose(np.array(rank[name][key]), single[name.split("-")[0]][key], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["q4-tensor", "q4-pipeline"])
def test_a_4bit_checkpoint_sharded_gives_its_logits_in_one_process_within_1e_3(two, single, name):
    for rank in two:
        for key in ("logits", "steps"):
            np.testing.assert_allclose(np.array(rank[name][key]), single["q4"][key], rtol=0, atol=1e-3)


def test_every_rank_gets_the_same_logits_bit_for_bit(two, four):
    for ranks in (two, four):
        for name in (name for name in ranks[0] if "logits" in ranks[0][name]):
            assert all(r[name]["logits"] == ranks[0][name]["logits"] for r in ranks), name


def test_rank_0s_decisions_reach_every_rank_as_data(two, four):
    for ranks in (two, four):
        expected = {"request": 7, "prompt": "héllo ✓", "cancel": [3, 5]}
        assert [r["broadcast"]["value"] for r in ranks] == [expected] * len(ranks)


# ---------------------------------------------------------------- what each rank holds


def test_each_rank_holds_its_heads_or_its_layers_and_caches_for_them(two, four):
    assert [(r["odd-tensor"]["kv_heads"], r["odd-tensor"]["args_kv_heads"], r["odd-tensor"]["caches"])
            for r in two] == [(2, 2, 3)] * 2
    assert [(r["odd-tensor"]["kv_heads"], r["odd-tensor"]["caches"]) for r in four] == [(1, 3)] * 4
    assert [r["odd-pipeline"]["sharding"] for r in two] == [["pipeline", [0, 1]], ["pipeline", [2]]]
    assert [r["odd-pipeline-1-2"]["sharding"] for r in two] == [["pipeline", [0]], ["pipeline", [1, 2]]]
    assert [(r["odd-pipeline"]["layers"], r["odd-pipeline"]["caches"]) for r in two] == [(2, 2), (1, 1)]


def test_tensor_ranks_hold_their_share_of_the_vocabulary_and_pipeline_ranks_what_they_use(two, four):
    assert [r["odd-tensor"]["embedding_rows"] for r in two] == [256, 256]
    assert [r["tied-tensor"]["embedding_rows"] for r in four] == [128] * 4
    assert [r["odd-pipeline"]["embedding_rows"] for r in two] == [512, None]  # untied: the head on rank 1
    assert [r["tied-pipeline"]["embedding_rows"] for r in two] == [512, 512]  # looked up on 0, the head on 1


def test_sharded_layers_are_fused_per_rank_and_decode_compiled(two):
    for rank in two:
        for name in ("odd-tensor", "odd-pipeline", "q4-tensor"):
            assert (rank[name]["fused"], rank[name]["decode"]) == (True, "CompiledDecode"), name


# ---------------------------------------------------------------- tokens


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_greedy_seeded_and_synced_tokens_are_those_of_one_process(two, single, mode):
    for rank in two:
        got = rank[f"odd-{mode}"]
        assert len(got["greedy"]) == TOKENS
        for key in ("greedy", "seeded", "synced"):
            assert got[key] == single["odd"][key], key


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_unseeded_sampling_draws_the_same_tokens_on_every_rank(two, mode):
    assert two[0][f"odd-{mode}"]["unseeded"] == two[1][f"odd-{mode}"]["unseeded"]
    assert two[0][f"odd-{mode}"]["unseeded"] != two[0][f"odd-{mode}"]["synced"]  # the state moved on


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_a_greedy_batch_of_8_rows_gives_each_row_its_single_stream_tokens(two, odd, mode):
    model, tok = odd
    expected = [generate(model, tok, ids, opts(temp=0.0)).token_ids for ids in BATCH]
    for rank in two:
        assert rank[f"odd-{mode}"]["batch"] == expected


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize("fault,parallel", [("stop", "tensor"), ("kill", "pipeline")])
def test_a_stopped_or_killed_rank_ends_the_others_within_the_bound(checkpoints, tmp_path, fault, parallel):
    spec = {"jobs": [{"path": str(checkpoints["tied"]), "parallel": parallel, "fault": fault, "after": 3,
                      "watchdog": WATCHDOG}]}
    rank0, rank1 = launch(tmp_path / "run", 2, spec, timeout=60, wait_for=(0,) if fault == "stop" else (0, 1))
    faulted = json.loads((tmp_path / "run" / "fault.json").read_text())["time"]
    assert rank0.returncode == 1
    if fault == "stop":  # waits out the watchdog, then exits from its thread
        assert rank1.returncode is None  # still stopped, until the test killed it
        assert f"error: rank 0: no answer from the other ranks for {WATCHDOG:g} s;" in rank0.stderr
        assert WATCHDOG <= rank0.ended - faulted < WATCHDOG + 2
    else:  # the lost connection is an error at once
        assert rank1.returncode == -9
        assert "error: rank 0: lost the connection to the other ranks ([ring]" in rank0.stderr
        assert rank0.result["status"] == "error"
        assert rank0.ended - faulted < 2


def test_the_watchdog_ends_a_wait_past_its_bound_with_one_line(tmp_path):
    code = ("import time; from qwen3_mlx.collectives import Watchdog\n"
            "with Watchdog(3, 0.5, on_timeout=lambda line: print('told:', line, flush=True)):\n"
            "    time.sleep(20)\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (1, f"told: {done.stderr}")
    assert done.stderr == ("error: rank 3: no answer from the other ranks for 0.5 s; a rank is stopped, asleep or "
                           "unreachable (or died): ending this one\n")
    assert time.monotonic() - start < 10


def test_the_watchdog_lets_steps_within_the_bound_through():
    # In a process of its own: a watchdog that fired here would end the whole test run (os._exit), not
    # fail this test. Three steps of 0.2 s against a bound of 1 s: 0.6 s in all, each step within it.
    code = ("import time; from qwen3_mlx.collectives import Watchdog\n"
            "watchdog = Watchdog(0, 1.0)\n"
            "for _ in range(3):\n"
            "    with watchdog:\n"
            "        time.sleep(0.2)\n"
            "print('through', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "through\n", "")


# ---------------------------------------------------------------- refusals, splits, threads, seeds


class Group:
    """A group of `n` as shard() sees it before any collective: enough for its refusals."""

    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n

    def rank(self) -> int:
        return 0


def test_a_group_that_does_not_divide_the_kv_heads_is_refused_in_one_line(checkpoints):
    model = load_model(checkpoints["odd"])
    with pytest.raises(OptionError) as e:
        shard(model, Group(3), "tensor")
    assert str(e.value) == ("parallel='tensor' over 3 ranks: num_key_value_heads=4 is not divisible by 3; "
                            "use a group of 2, 4 ranks, or parallel='pipeline'")


def test_quantized_inputs_that_split_a_group_are_refused_in_one_line(checkpoints):
    model = load_model(checkpoints["q4"])  # o_proj: 128 inputs, 32 a rank over 4, in groups of 64
    with pytest.raises(OptionError) as e:
        shard(model, Group(4), "tensor")
    assert str(e.value) == ("parallel='tensor' over 4 ranks: self_attn.o_proj's 32 inputs per rank are not whole "
                            "quantization groups of 64; use fewer ranks, a smaller group_size, or parallel='pipeline'")


def test_bad_modes_and_shares_are_refused(checkpoints):
    model = load_model(checkpoints["tied"])
    with pytest.raises(OptionError, match=r"^parallel='data' must be 'tensor' or 'pipeline'$"):
        shard(model, Group(2), "data")
    with pytest.raises(OptionError, match=r"^layers_per_rank applies to parallel='pipeline' only"):
        shard(model, Group(2), "tensor", layers_per_rank=(1, 1))
    with pytest.raises(OptionError, match=r"needs 2 or more ranks, and this process is alone"):
        load(checkpoints["tied"], parallel="tensor")
    with pytest.raises(OptionError, match=r"^shard\(\) takes the plain model once, before fast.speed_up fuses it"):
        shard(speed_up(model), Group(2), "tensor")


def test_layers_split_evenly_or_by_shares():
    assert layer_split(28, 2) == [range(0, 14), range(14, 28)]
    assert layer_split(3, 2) == [range(0, 2), range(2, 3)]
    assert layer_split(28, 2, (10, 18)) == [range(0, 10), range(10, 28)]
    assert layer_split(28, 2, (1, 2)) == [range(0, 9), range(9, 28)]  # 9.33 + 18.67
    assert layer_split(28, 3, (16, 16, 32)) == [range(0, 7), range(7, 14), range(14, 28)]
    with pytest.raises(OptionError, match=r"^layers_per_rank=\(1,\) must give one positive number per rank \(2\)$"):
        layer_split(28, 2, (1,))
    with pytest.raises(OptionError, match=r"leaves a rank without any of the 3 layers"):
        layer_split(3, 2, (1, 100))


def test_ranks_on_one_host_divide_its_cores(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["10.0.0.2:5000"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hosts))
    assert [(monkeypatch.setenv("MLX_RANK", str(r)), local_ranks())[1] for r in range(3)] == [2, 2, 1]
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_threads() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu_threads() == 1
    monkeypatch.delenv("MLX_HOSTFILE")
    assert (local_ranks(), cpu_threads()) == (1, 2)


def test_ranks_spawned_on_this_host_divide_its_cores(two, four):
    cores = len(os.sched_getaffinity(0))
    for ranks, n in ((two, 2), (four, 4)):
        assert {rank["tied-tensor"]["cpu_threads"] for rank in ranks} == {max(1, min(cores // n, 4))}


def test_sync_random_state_seeds_every_rank_with_rank_0s_seed():
    group = mx.distributed.init()  # one rank: the all_sum is the seed itself
    assert sync_random_state(group, 99) == 99
    drawn = mx.random.uniform(shape=(3,)).tolist()
    mx.random.seed(99)
    assert drawn == mx.random.uniform(shape=(3,)).tolist()
    assert 0 <= sync_random_state(group) < 2**31


def join_alone(tmp_path: Path, hostfile: str) -> subprocess.CompletedProcess:
    """Rank 0 of a 2-rank ring hostfile joining with nobody else started, with a 1 s bound."""
    (tmp_path / "hosts.json").write_text(hostfile)
    env = {**os.environ, "MLX_HOSTFILE": str(tmp_path / "hosts.json"), "MLX_RANK": "0"}
    code = "from qwen3_mlx.collectives import join; join('ring', 1)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)


def test_ranks_that_never_connect_end_the_join_in_one_line(tmp_path):
    done = join_alone(tmp_path, json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(2)]))
    assert done.returncode == -9  # killed by join's guard: init holds the GIL, no thread could end it
    assert done.stderr == ("error: rank 0: the other ranks did not connect within 1 s; check that every rank started "
                           "and that the hostfile's addresses are this machine's and reachable\n")


def test_a_hostfile_the_backend_cannot_read_is_one_line(tmp_path):
    done = join_alone(tmp_path, "[not json")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("qwen3_mlx.errors.Qwen3Error: rank 0: mx.distributed backend "
                                                   "'ring' could not start ([json.exception.parse_error.101]")
    assert done.stderr.splitlines()[-1].endswith("; run under mlx.launch (e.g. mlx.launch -n 2 -- CMD) with a valid "
                                                 "hostfile")
