"""The server under concurrent streaming clients: `qwen3-mlx serve` against `mlx_lm.server`, same weights.

    python benchmarks/serve_bench.py clients CHECKPOINT [--clients 1 8 16] [--decode-tokens 64]
                                             [--prompt-words 50] [--trials 1] [--out clients.json]
    python benchmarks/serve_bench.py turns CHECKPOINT [--history-words 800] [--trials 3] [--out turns.json]

Checkpoints come from `bench.py make` (random weights, the real Qwen3 tokenizer and template). Each
server runs alone (2 cores here: never both at once), as a subprocess on a free port, started, warmed up
with one short request, measured, then stopped; which server goes first alternates between trials.

clients: for each client count N, N threads open streaming /v1/chat/completions requests at the same
moment (a barrier), each its own user message of --prompt-words random words (no prefix in common, so no
cache helps), thinking off (`chat_template_kwargs`, which both servers pass to the template), greedy
(temperature 0), no seed (mlx_lm.server only batches requests without one), the end-of-turn ids
(151645, 151643) biased by -100 through `logit_bias` (both honour it) so that every stream writes exactly
--decode-tokens tokens, and `stream_options.include_usage` (both send usage in a last chunk).
    aggregate tok/s   the usage's completion tokens of all N streams / wall time from the barrier to the
                      last stream's end
    TTFT p50 / p95    per stream: from sending the request to the first chunk that carries text
Both servers batch: ours up to --max-batch rows (set to the largest N), mlx_lm.server up to its
--decode-concurrency (set to the same N; its prompts are prefilled --prompt-concurrency 8 at a time).
The figures are medians over the trials; ratios are ours / mlx_lm.server.

turns (ours, then mlx_lm.server, which also keeps prompt caches between requests): a client sends a
first message of --history-words random words, gets a 4-token answer, appends it and a short question,
sends again (turn 2), and once more (turn 3), each time re-sending the whole conversation, as chat
clients do. Turn 3's TTFT is compared with that of a fresh conversation of the same shape and length
whose first message is other words (nothing cached); the usage's cached_tokens says what was reused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench import EOS_IDS

WORDS = ("apple river stone cloud market window garden silver mountain paper engine forest letter "  # noqa: SIM905
         "bridge candle harbor island ladder mirror needle orange pencil rocket saddle tunnel velvet "
         "wagon yellow zebra anchor basket cotton desert feather glacier hammer jacket kettle lemon").split()
SERVERS = ("ours", "mlx_lm")
BIAS: dict[str, int] = {}  # the end-of-turn ids below the checkpoint's vocabulary, -100 (set in main)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@contextlib.contextmanager
def server(kind: str, checkpoint: Path, batch: int):
    """A server on a free port, ready; its base URL."""
    port = free_port()
    if kind == "ours":
        argv = [sys.executable, "-m", "qwen3_mlx", "serve", "--model", str(checkpoint), "--port", str(port),
                "--max-batch", str(batch)]
    else:
        argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(checkpoint), "--port", str(port),
                "--decode-concurrency", str(batch), "--log-level", "WARNING"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} server exited: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server did not start")
            time.sleep(0.2)
        stream(url, [{"role": "user", "content": "warm up"}], 4)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def stream(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streaming chat request: {"ttft", "end", "tokens", "cached", "prompt_tokens"}, times from its start."""
    body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
            "max_tokens": max_tokens, "logit_bias": BIAS,
            "chat_template_kwargs": {"enable_thinking": False}}
    start = time.perf_counter()
    ttft, text, usage, chunks = None, "", None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.read().decode()[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                piece = (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
                if piece:
                    chunks += 1
                    text += delta.get("content") or ""
                    if ttft is None:
                        ttft = time.perf_counter() - start
    details = (usage or {}).get("prompt_tokens_details") or {}
    return {"ttft": ttft, "end": time.perf_counter() - start, "text": text,
            "tokens": (usage or {}).get("completion_tokens", chunks), "prompt_tokens": (usage or {}).get("prompt_tokens"),
            "cached": details.get("cached_tokens")}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_clients(url: str, n: int, a: argparse.Namespace, rng: random.Random) -> dict:
    prompts = [[{"role": "user", "content": words(rng, a.prompt_words)}] for _ in range(n)]
    results: list[dict | None] = [None] * n
    barrier = threading.Barrier(n + 1)

    def client(i: int) -> None:
        barrier.wait()
        results[i] = stream(url, prompts[i], a.decode_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "ttft_p50": percentile(ttfts, 0.5),
            "ttft_p95": percentile(ttfts, 0.95)}


def cmd_clients(a: argparse.Namespace) -> None:
    rng = random.Random(0)
    runs: dict[str, dict[int, list[dict]]] = {k: {n: [] for n in a.clients} for k in SERVERS}
    for trial in range(a.trials):
        for kind in SERVERS if trial % 2 == 0 else SERVERS[::-1]:
            with server(kind, a.checkpoint, max(a.clients)) as url:
                for n in a.clients:
                    r = run_clients(url, n, a, rng)
                    print(f"  trial {trial} {kind} {n} clients: {r['tok_s']:.1f} tok/s, TTFT p50 "
                          f"{r['ttft_p50']:.3f} s p95 {r['ttft_p95']:.3f} s", file=sys.stderr)
                    runs[kind][n].append(r)
    med = {k: {n: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for n, rs in by_n.items()}
           for k, by_n in runs.items()}
    print(f"{a.checkpoint.name}: {a.decode_tokens} tokens a stream, {a.prompt_words}-word prompts, "
          f"{a.trials} trial(s) (medians)\n")
    print("| clients | ours tok/s | mlx_lm tok/s | ours / mlx_lm | TTFT p50 ours / mlx_lm (s) | "
          "TTFT p95 ours / mlx_lm (s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in a.clients:
        o, m = med["ours"][n], med["mlx_lm"][n]
        print(f"| {n} | {o['tok_s']:.1f} | {m['tok_s']:.1f} | {o['tok_s'] / m['tok_s']:.2f}x | "
              f"{o['ttft_p50']:.3f} / {m['ttft_p50']:.3f} | {o['ttft_p95']:.3f} / {m['ttft_p95']:.3f} |")
    if a.out:
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items() if k != "func"},
                                     "machine": platform.machine(), "medians": med, "runs": runs}, indent=1))


def conversation(url: str, first: str, rng: random.Random) -> list[dict]:
    """Turns 1 and 2 of a conversation (answers of 4 tokens); the messages of turn 3."""
    messages = [{"role": "user", "content": first}]
    for _ in range(2):
        answer = stream(url, messages, 4)["text"]
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": words(rng, 8)}]
    return messages


def cmd_turns(a: argparse.Namespace) -> None:
    rng = random.Random(1)
    runs: dict[str, list[dict]] = {k: [] for k in SERVERS}
    for trial in range(a.trials):
        for kind in SERVERS if trial % 2 == 0 else SERVERS[::-1]:
            with server(kind, a.checkpoint, 1) as url:
                messages = conversation(url, words(rng, a.history_words), rng)
                third = stream(url, messages, 1)
                # The same messages but the first, other words of the same count: nothing of it is cached.
                fresh = stream(url, [{"role": "user", "content": words(rng, a.history_words)}, *messages[1:]], 1)
                r = {"turn3_ttft": third["ttft"], "fresh_ttft": fresh["ttft"], "speedup": fresh["ttft"] / third["ttft"],
                     "turn3_prompt_tokens": third["prompt_tokens"], "turn3_cached": third["cached"],
                     "fresh_prompt_tokens": fresh["prompt_tokens"], "fresh_cached": fresh["cached"]}
                print(f"  trial {trial} {kind}: {r}", file=sys.stderr)
                runs[kind].append(r)
    print(f"{a.checkpoint.name}: turn 3 of a conversation re-sent whole, first message {a.history_words} words, "
          f"{a.trials} trial(s) (medians)\n")
    print("| server | turn-3 TTFT s | fresh TTFT s (same length) | speed-up | prompt tokens | cached at turn 3 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, rs in runs.items():
        m = {f: statistics.median(r[f] for r in rs if r[f] is not None) if any(r[f] is not None for r in rs)
             else None for f in rs[0]}
        print(f"| {kind} | {m['turn3_ttft']:.3f} | {m['fresh_ttft']:.3f} | {m['speedup']:.1f}x | "
              f"{m['turn3_prompt_tokens']} / {m['fresh_prompt_tokens']} | {m['turn3_cached']} |")
    if a.out:
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items() if k != "func"},
                                     "runs": runs}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(required=True)
    c = sub.add_parser("clients", help="N concurrent streaming clients, both servers")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    c.add_argument("--decode-tokens", type=int, default=64)
    c.add_argument("--prompt-words", type=int, default=50)
    c.add_argument("--trials", type=int, default=1)
    c.add_argument("--out", type=Path)
    c.set_defaults(func=cmd_clients)
    t = sub.add_parser("turns", help="turn-3 time to first token of a re-sent conversation")
    t.add_argument("checkpoint", type=Path)
    t.add_argument("--history-words", type=int, default=800)
    t.add_argument("--trials", type=int, default=3)
    t.add_argument("--out", type=Path)
    t.set_defaults(func=cmd_turns)
    a = parser.parse_args()
    vocab = json.loads((a.checkpoint / "config.json").read_text())["vocab_size"]
    BIAS.update({str(i): -100 for i in EOS_IDS if i < vocab})
    a.func(a)


if __name__ == "__main__":
    main()
