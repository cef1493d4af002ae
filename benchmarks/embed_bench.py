"""Embedding speed: texts/s and tokens/s for 200 texts of mixed length, ours (batched by length, and in
arrival order) against sentence-transformers (torch, CPU) on the same random checkpoint; peak memory.

    python benchmarks/embed_bench.py                 # the tiny-vocab shape
    python benchmarks/embed_bench.py --shape 0.6b    # Qwen3-Embedding-0.6B's shape, random weights
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from retrieval_checkpoints import make_embedding_checkpoint  # noqa: E402

from qwen3_mlx import load  # noqa: E402
from qwen3_mlx.embedding import padded  # noqa: E402
from qwen3_mlx.embedding.embed import prepare, vectors  # noqa: E402

SHAPES = {"tiny": dict(num_hidden_layers=2),
          "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, num_hidden_layers=28, max_position_embeddings=32768)}


def texts(n: int = 200, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "retrieval embedding query passage model token vector search the a of and to in".split()
    return [" ".join(rng.choice(words, int(rng.integers(2, 400)))) for _ in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    corpus = texts()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_embedding_checkpoint(Path(tmp) / "e", **SHAPES[args.shape])
        model, tokenizer = load(path)
        rows = prepare(model, tokenizer, corpus).rows
        tokens = sum(map(len, rows))
        size = model.args.hidden_size
        vectors(model, rows[:4], size)  # warm-up
        sorted_s = timed(lambda: vectors(model, rows, size, batch_size=args.batch_size))

        def arrival() -> None:
            for i in range(0, len(rows), args.batch_size):
                mx.eval(padded.last_hidden(model, rows[i:i + args.batch_size]))

        arrival_s = timed(arrival)
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(path), device="cpu")
        st.encode(corpus[:4])
        st_s = timed(lambda: st.encode(corpus, batch_size=args.batch_size))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"shape {args.shape}: {len(corpus)} texts, {tokens} tokens, batch {args.batch_size}")
    for name, s in [("ours, batched by length", sorted_s), ("ours, arrival order", arrival_s),
                    ("sentence-transformers (torch CPU)", st_s)]:
        print(f"  {name:36s} {len(corpus) / s:8.1f} texts/s {tokens / s:10.0f} tokens/s")
    print(f"  peak resident memory (whole process) {peak:.0f} MiB")


if __name__ == "__main__":
    main()
