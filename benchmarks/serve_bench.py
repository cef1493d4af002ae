"""The server under concurrent streaming clients: `qwen3-mlx serve` against `mlx_lm.server`, same weights.

    python benchmarks/serve_bench.py clients CHECKPOINT [--clients 1 8 16] [--decode-tokens 64]
                                             [--prompt-words 50] [--trials 1] [--out clients.json]
    python benchmarks/serve_bench.py turns CHECKPOINT [--history-words 1000] [--trials 3] [--out turns.json]

Checkpoints come from `bench.py make` (random weights, the real Qwen3 tokenizer and chat template) and
must have Qwen3's whole vocabulary (`tiny-vocab`, `0.6b`, `full`): the prompts here are text, encoded by the
servers, and `tiny`'s 1024 ids are fewer than the tokenizer's. Each server runs alone (never both at once),
as a subprocess on a free port (its stderr in a temporary file, shown if it fails): started, polled on
/health until it answers (both have one), warmed up (below), measured, then stopped (SIGTERM). Which server
goes first alternates between trials. Ours: `python -m qwen3_mlx serve --max-batch N` (N: the largest
client count); mlx_lm.server: `python -m mlx_lm.server --decode-concurrency N --log-level WARNING`.

Every request: POST /v1/chat/completions, stream true, `stream_options.include_usage` true, temperature 0,
no seed, `logit_bias` -100 on the end-of-turn ids 151645 and 151643 (`<|im_end|>`, `<|endoftext|>`, so
that no stream stops early and both servers write the same lengths), `chat_template_kwargs`
{"enable_thinking": false}. A stream's time to first token (TTFT) is from just before the request is sent
to the first SSE chunk whose delta carries text (content, reasoning or a tool call); SSE comments and the
empty role chunk do not count. If no chunk carries text (max_tokens 1 and a token that decodes to nothing,
e.g. half a UTF-8 character), the chunk with the finish reason stands in: the first token's arrival either
way. A stream's tokens are the usage's completion_tokens (both servers send it), else its text chunks.

What mlx_lm.server 0.32.2 does with these (read in mlx_lm/server.py): it batches every request that has
no `seed`, when the server has no --kv-bits and no draft model and the messages no images (a request
that cannot join is served after the running batch drains); the batch is a BatchGenerator of at most
--decode-concurrency (default 32) streams whose prompts are prefilled --prompt-concurrency (default 8) at
a time in --prefill-step-size (default 2048) chunks. It honours temperature (0: argmax), max_tokens (or
max_completion_tokens), logit_bias (added to the logits, like ours), stream_options.include_usage (a last
chunk with usage and prompt_tokens_details.cached_tokens), and chat_template_kwargs (merged over its
--chat-template-args and passed to the template, so thinking is off on both sides). While it prefills it
writes ": keepalive i/n" SSE comments, which are not first tokens. It also keeps prompt caches between
requests (--prompt-cache-size 10 sequences by default), as ours does (--prompt-cache-gb 1).

clients: each server, once started, first serves an untimed round (the largest client count, 2 tokens a
stream). Then for each client count N, N threads wait at a barrier and open their streams together, each
with its own user message of --prompt-words random words, as many tokens (no prefix in common beyond the
template's first tokens, so no prompt cache helps), and max_tokens --decode-tokens.
    aggregate tok/s   completion tokens of all N streams / wall time from the barrier (the first request
                      sent) to the end of the last stream: prefills and streaming included
    TTFT p50 / p95    over the N streams, nearest rank (p95 of 8 streams is the slowest, of 16 the second)
    tokens a stream   the fewest and most any stream wrote, both servers: --decode-tokens when the bias holds
Figures are medians over the trials; ratios are ours / mlx_lm.server. The issue's goal at 8 clients: at
least 1.2x mlx_lm.server's aggregate tok/s and a lower p95 TTFT.

turns: one client (servers at batch 1) sends a first message of --history-words random words, gets a
4-token answer, appends it and a short user message and re-sends the whole conversation (turn 2, again a
4-token answer), then once more (turn 3, max_tokens 1), as chat clients do. Turn 3's TTFT is compared with
that of a fresh conversation of the same shape and token length (every word is one token) whose first
message is other words, sent right after it (nothing of it cached: only the template's first tokens are
shared). The usage's prompt_tokens and cached_tokens are reported for both, and turn 1's TTFT (a fresh,
shorter prompt). The issue's goal for ours: turn 3 at least 5x faster than the fresh request.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench import EOS_IDS

# Each one token of Qwen3's tokenizer, with a leading space or without: a message of n words is n tokens.
WORDS = ("apple river stone cloud market window silver paper engine forest letter bridge mirror needle "  # noqa: SIM905
         "orange rocket wagon yellow anchor basket hammer table chair house water light night green black "
         "white music dance horse plant field train plane metal glass bread money story world power voice "
         "heart dream stamp camel lion bear wolf snake frog fish bird tree leaf root seed flower grass sand "
         "rock hill lake rain snow wind storm sun moon star planet space earth fire iron gold steel wood "
         "brick wall door roof floor").split()
SERVERS = ("ours", "mlx_lm")
BIAS = {str(i): -100 for i in EOS_IDS}
TOKENIZER_IDS = 151669  # Qwen3's tokenizer: 151643 text ids and 26 special ones


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
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:  # its access log and warnings: a pipe nobody reads could fill
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, text=True)

        def tail() -> str:
            log.seek(0)
            return log.read()[-2000:]

        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{kind} server exited {proc.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} server did not start: {tail()}")
                time.sleep(0.2)
            stream(url, [{"role": "user", "content": "warm up"}], 4)
            yield url
        except Exception:
            if proc.poll() is not None:
                print(f"{kind} server exited {proc.returncode}: {tail()}", file=sys.stderr)
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stream(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streaming chat request: its TTFT and end (seconds from its start), text, tokens and usage."""
    body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
            "max_tokens": max_tokens, "logit_bias": BIAS, "chat_template_kwargs": {"enable_thinking": False}}
    ttft = finished = usage = None
    text, chunks = "", 0
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.read().decode()[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue  # blank lines, ": keepalive" comments
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                piece = (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
                if piece or delta.get("tool_calls"):
                    chunks += 1
                    text += delta.get("content") or ""
                    if ttft is None:
                        ttft = time.perf_counter() - start
                if choice.get("finish_reason") and finished is None:
                    finished = time.perf_counter() - start
    end = time.perf_counter() - start
    usage = usage or {}
    return {"ttft": ttft if ttft is not None else finished if finished is not None else end, "end": end,
            "text": text, "tokens": usage.get("completion_tokens", chunks), "usage": bool(usage),
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_clients(url: str, n: int, prompt_words: int, decode_tokens: int, rng: random.Random) -> dict:
    prompts = [[{"role": "user", "content": words(rng, prompt_words)}] for _ in range(n)]
    results: list[dict | None] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n + 1)

    def client(i: int) -> None:
        barrier.wait()
        try:
            results[i] = stream(url, prompts[i], decode_tokens)
        except BaseException as e:  # noqa: BLE001 (re-raised by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    tokens = [r["tokens"] for r in results]
    ttfts = [r["ttft"] for r in results]
    return {"tokens": sum(tokens), "wall_s": wall, "tok_s": sum(tokens) / wall,
            "ttft_p50": percentile(ttfts, 0.5), "ttft_p95": percentile(ttfts, 0.95),
            "min_tokens": min(tokens), "max_tokens": max(tokens), "usage": all(r["usage"] for r in results),
            "prompt_tokens": [r["prompt_tokens"] for r in results], "ttfts": ttfts}


def shape(checkpoint: Path) -> str:
    c = json.loads((checkpoint / "config.json").read_text())
    return (f"{checkpoint.name}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, vocab {c['vocab_size']}, "
            f"{'4-bit' if c.get('quantization') else c.get('torch_dtype', '?')}; {platform.machine()}, "
            f"{os.cpu_count()} CPUs")


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("mlx", "mlx-lm", "qwen3-mlx")}


def cmd_clients(a: argparse.Namespace) -> None:
    rng = random.Random(a.seed)
    runs: dict[str, dict[int, list[dict]]] = {k: {n: [] for n in a.clients} for k in SERVERS}
    for trial in range(a.trials):
        for kind in SERVERS if trial % 2 == 0 else SERVERS[::-1]:
            with server(kind, a.checkpoint, max(a.clients)) as url:
                run_clients(url, max(a.clients), a.prompt_words, 2, rng)  # untimed
                for n in a.clients:
                    r = run_clients(url, n, a.prompt_words, a.decode_tokens, rng)
                    print(f"  trial {trial + 1} {kind:6s} {n:2d} clients: {r['tok_s']:.1f} tok/s, wall "
                          f"{r['wall_s']:.2f} s, TTFT p50 {r['ttft_p50']:.3f} s p95 {r['ttft_p95']:.3f} s, "
                          f"{r['min_tokens']}-{r['max_tokens']} tokens a stream", file=sys.stderr)
                    if r["min_tokens"] != a.decode_tokens or r["max_tokens"] != a.decode_tokens:
                        print(f"  warning: {kind} streams wrote {r['min_tokens']}-{r['max_tokens']} tokens, not "
                              f"{a.decode_tokens}", file=sys.stderr)
                    runs[kind][n].append(r)
    fields = ("tok_s", "wall_s", "ttft_p50", "ttft_p95")
    med = {k: {n: {f: statistics.median(r[f] for r in rs) for f in fields} for n, rs in by_n.items()}
           for k, by_n in runs.items()}
    lines = [(f"{shape(a.checkpoint)}; {a.prompt_words}-word prompts, {a.decode_tokens} tokens a stream, "
              f"{a.trials} trial(s) (medians)"), "",
             ("| clients | tok/s ours | mlx_lm | ours / mlx_lm | TTFT p50 s ours | mlx_lm | TTFT p95 s ours | mlx_lm "
              "| p95 ours / mlx_lm | tokens a stream ours / mlx_lm |"),
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in a.clients:
        o, m = med["ours"][n], med["mlx_lm"][n]
        span = {k: f"{min(r['min_tokens'] for r in runs[k][n])}-{max(r['max_tokens'] for r in runs[k][n])}"
                for k in SERVERS}
        lines.append(f"| {n} | {o['tok_s']:.1f} | {m['tok_s']:.1f} | {o['tok_s'] / m['tok_s']:.2f}x | "
                     f"{o['ttft_p50']:.3f} | {m['ttft_p50']:.3f} | {o['ttft_p95']:.3f} | {m['ttft_p95']:.3f} | "
                     f"{o['ttft_p95'] / m['ttft_p95']:.2f}x | {span['ours']} / {span['mlx_lm']} |")
    if 8 in a.clients:
        o, m = med["ours"][8], med["mlx_lm"][8]
        met = o["tok_s"] >= 1.2 * m["tok_s"] and o["ttft_p95"] < m["ttft_p95"]
        lines += ["", (f"goal at 8 clients (>= 1.2x aggregate tok/s, lower p95 TTFT): {o['tok_s'] / m['tok_s']:.2f}x, "
                       f"p95 {o['ttft_p95']:.3f} vs {m['ttft_p95']:.3f} s: {'met' if met else 'NOT met'}")]
    report(a, med, runs, lines)


def report(a: argparse.Namespace, med: dict, runs: dict, lines: list[str]) -> None:
    """The table on stdout; with --out, it and every figure as JSON."""
    print("\n".join(lines))
    if a.out:
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items() if k != "func"},
                                     "shape": shape(a.checkpoint), "versions": versions(), "medians": med,
                                     "runs": runs, "table": "\n".join(lines)}, indent=1))


def conversation(url: str, first: str, rng: random.Random) -> tuple[list[dict], dict]:
    """Turns 1 and 2 of a conversation (answers of 4 tokens): turn 3's messages, and turn 1's stream."""
    messages = [{"role": "user", "content": first}]
    turn1 = None
    for _ in range(2):
        r = stream(url, messages, 4)
        turn1 = turn1 or r
        messages += [{"role": "assistant", "content": r["text"]}, {"role": "user", "content": words(rng, 8)}]
    return messages, turn1


def cmd_turns(a: argparse.Namespace) -> None:
    rng = random.Random(a.seed + 1)
    runs: dict[str, list[dict]] = {k: [] for k in SERVERS}
    for trial in range(a.trials):
        for kind in SERVERS if trial % 2 == 0 else SERVERS[::-1]:
            with server(kind, a.checkpoint, 1) as url:
                messages, turn1 = conversation(url, words(rng, a.history_words), rng)
                third = stream(url, messages, 1)
                # The same messages but the first, other words of the same count: nothing of it is cached.
                fresh = stream(url, [{"role": "user", "content": words(rng, a.history_words)}, *messages[1:]], 1)
                r = {"turn1_ttft": turn1["ttft"], "turn3_ttft": third["ttft"], "fresh_ttft": fresh["ttft"],
                     "speedup": fresh["ttft"] / third["ttft"], "turn1_prompt_tokens": turn1["prompt_tokens"],
                     "turn3_prompt_tokens": third["prompt_tokens"], "turn3_cached": third["cached"],
                     "fresh_prompt_tokens": fresh["prompt_tokens"], "fresh_cached": fresh["cached"]}
                print(f"  trial {trial + 1} {kind:6s}: turn 1 {r['turn1_ttft']:.3f} s, turn 3 {r['turn3_ttft']:.3f} s "
                      f"({r['turn3_cached']}/{r['turn3_prompt_tokens']} cached), fresh {r['fresh_ttft']:.3f} s "
                      f"({r['fresh_cached']}/{r['fresh_prompt_tokens']} cached): {r['speedup']:.1f}x", file=sys.stderr)
                runs[kind].append(r)
                if r["turn3_prompt_tokens"] != r["fresh_prompt_tokens"]:
                    print(f"  warning: turn 3 is {r['turn3_prompt_tokens']} tokens, the fresh request "
                          f"{r['fresh_prompt_tokens']}", file=sys.stderr)

    def median(rs: list[dict], f: str):
        values = [r[f] for r in rs if r[f] is not None]
        return statistics.median(values) if values else None

    med = {kind: {f: median(rs, f) for f in rs[0]} for kind, rs in runs.items()}
    lines = [(f"{shape(a.checkpoint)}; turn 3 of a conversation re-sent whole, first message {a.history_words} "
              f"words, {a.trials} trial(s) (medians)"), "",
             ("| server | turn-1 TTFT s | turn-3 TTFT s | fresh TTFT s (same length) | fresh / turn 3 | prompt tokens "
              "turn 3 / fresh | cached turn 3 / fresh |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind, m in med.items():
        lines.append(f"| {kind} | {m['turn1_ttft']:.3f} | {m['turn3_ttft']:.3f} | {m['fresh_ttft']:.3f} | "
                     f"{m['speedup']:.1f}x | {m['turn3_prompt_tokens']} / {m['fresh_prompt_tokens']} | "
                     f"{m['turn3_cached']} / {m['fresh_cached']} |")
    lines += ["", (f"goal (ours' turn 3 >= 5x faster than a fresh request of its length): "
                   f"{med['ours']['speedup']:.1f}x: {'met' if med['ours']['speedup'] >= 5 else 'NOT met'}")]
    report(a, med, runs, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("clients", help="N concurrent streaming clients, both servers")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    c.add_argument("--decode-tokens", type=int, default=64)
    c.add_argument("--prompt-words", type=int, default=50)
    c.add_argument("--trials", type=int, default=1)
    c.set_defaults(func=cmd_clients)
    t = sub.add_parser("turns", help="turn-3 time to first token of a re-sent conversation, both servers")
    t.add_argument("checkpoint", type=Path)
    t.add_argument("--history-words", type=int, default=1000)
    t.add_argument("--trials", type=int, default=3)
    t.set_defaults(func=cmd_turns)
    for s in (c, t):
        s.add_argument("--seed", type=int, default=0, help="of the random words (the requests carry no seed)")
        s.add_argument("--out", type=Path, help="write the JSON here")
    a = parser.parse_args()
    a.checkpoint = a.checkpoint.expanduser().absolute()
    vocab = json.loads((a.checkpoint / "config.json").read_text())["vocab_size"]
    if vocab < TOKENIZER_IDS:
        sys.exit(f"serve_bench.py: {a.checkpoint.name} has {vocab} ids, fewer than the tokenizer's {TOKENIZER_IDS}: "
                 "text prompts would index past its embedding; make one with `bench.py make tiny-vocab`")
    if a.command == "clients" and (a.decode_tokens < 1 or a.prompt_words < 1 or min(a.clients) < 1):
        sys.exit("serve_bench.py clients: --decode-tokens, --prompt-words and --clients must be >= 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the server's context stops it on the way out
    a.func(a)


if __name__ == "__main__":
    main()
