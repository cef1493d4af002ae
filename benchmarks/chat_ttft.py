"""Time to first token of a chat's third turn: the reused KV cache against re-reading the conversation.

    python benchmarks/chat_ttft.py CHECKPOINT [--history 500] [--trials 3] [--warmup 1] [--out chat.json]

The conversation has a system prompt and two earlier turns of about `--history` tokens in all; the
second answer carries a short reasoning block, as a thinking-mode answer does, which Qwen3's template
drops from the history. "reuse" is ChatSession.send on the cache left by turn 2 (prompt 2 plus answer
2, reasoning included); "fresh" renders the whole conversation and computes it from an empty cache.
Both generate one token. "eager" is what ChatSession does by default: at the end of an answer with
reasoning it reads that answer again as the next turn will show it, before the user's next message;
its cost is reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


from qwen3_mlx import load
from qwen3_mlx.model.cache import restore
from qwen3_mlx.generation.chat import ChatSession
from qwen3_mlx.generation.single import extend_cache, generate

WORDS = ("the model reads the whole conversation at every turn unless the cache is kept between turns "
         "and only the new tokens are computed ").split()


def text_of(tokenizer, n_tokens: int) -> str:
    words, text = [], ""
    while len(tokenizer.encode(text)) < n_tokens:
        words.append(WORDS[len(words) % len(WORDS)])
        text = " ".join(words)
    return text


def conversation(tokenizer, history: int) -> tuple[str, list[dict], str, str]:
    part = max(history // 5, 8)
    system = "You are a helpful assistant. " + text_of(tokenizer, part)
    messages = [
        {"role": "user", "content": text_of(tokenizer, part)},
        {"role": "assistant", "content": text_of(tokenizer, part)},
        {"role": "user", "content": text_of(tokenizer, part)},
    ]
    reasoning = "Let me think about this. " + text_of(tokenizer, 32)
    answer = text_of(tokenizer, part)
    return system, messages, reasoning, answer


def turn_two_state(model, tokenizer, system, messages, reasoning, answer) -> tuple[list[int], list]:
    """What turn 2 leaves in the cache: prompt 2 and answer 2 with its reasoning (tokens, stored arrays)."""
    session = ChatSession(model, tokenizer, system=system, think=False)
    tokens = session.render(messages) + tokenizer.encode(
        f"<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>")
    cache = model.make_cache()
    extend_cache(model, cache, tokens, 256)
    return tokens, [c.stored()[:2] for c in cache]


def after_turn_two(model, tokenizer, system, messages, answer, state) -> ChatSession:
    """A session in the state turn 2 leaves, restored from `state` (computed once)."""
    tokens, stored = state
    session = ChatSession(model, tokenizer, system=system, max_tokens=1, temp=0.0, think=False)
    session.cache = model.make_cache()
    for c, (k, v) in zip(session.cache, stored):
        restore(c, k, v, len(tokens))
    session.cached = list(tokens)
    session.messages = messages + [{"role": "assistant", "content": answer}]
    return session


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--history", type=int, default=500)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--out")
    args = parser.parse_args()

    model, tokenizer = load(args.checkpoint)
    system, messages, reasoning, answer = conversation(tokenizer, args.history)
    question = "And what follows from that?"
    times: dict[str, list[float]] = {"lazy": [], "eager": [], "settle": [], "fresh": []}
    counts: dict[str, int] = {}
    state = turn_two_state(model, tokenizer, system, messages, reasoning, answer)
    for _ in range(args.warmup + args.trials):
        for mode in ("lazy", "eager"):
            session = after_turn_two(model, tokenizer, system, messages, answer, state)
            if mode == "eager":  # what send() does at the end of turn 2, while the user reads and types
                times["settle"].append(timed(session.prepare_next_turn))
            times[mode].append(timed(lambda: list(session.send(question))))
            counts[f"computed_{mode}"] = session.last.prompt_tokens - session.last.cached_tokens
        whole = session.messages[:-1]
        times["fresh"].append(timed(lambda: generate(model, tokenizer, whole, system=system, max_tokens=1,
                                                      temp=0.0, think=False)))
        counts["prompt_tokens"] = session.last.prompt_tokens
    row = {"checkpoint": args.checkpoint, **counts,
           **{f"{k}_s": statistics.median(v[args.warmup :]) for k, v in times.items()}}
    print("| turn-3 prompt tokens | TTFT fresh (s) | reuse: computed, TTFT (s), speed-up "
          "| eager reuse: computed, TTFT (s), speed-up | eager's work after turn 2 (s) |")
    print("|---|---|---|---|---|")
    print(f"| {row['prompt_tokens']} | {row['fresh_s']:.3f} "
          f"| {row['computed_lazy']}, {row['lazy_s']:.3f}, {row['fresh_s'] / row['lazy_s']:.1f}x "
          f"| {row['computed_eager']}, {row['eager_s']:.3f}, {row['fresh_s'] / row['eager_s']:.1f}x "
          f"| {row['settle_s']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
