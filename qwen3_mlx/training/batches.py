"""Examples into batches: sorted by length and cut into batches of similar lengths (little padding),
the batches drawn in a seeded order each epoch, padded to a multiple of 32 tokens (few distinct shapes
for the compiled step) and cut at max_seq_length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np

from .data import Example

PAD_TO = 32


@dataclass(frozen=True)
class Batch:
    ids: mx.array  # (B, L) int32, 0-padded
    mask: mx.array  # (B, L - 1) float32: 1 where the target ids[:, 1:] is trained
    where: tuple[str, ...]  # each row's FILE:LINE


def groups(examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    """Example indices sorted by length, cut into consecutive groups of batch_size (the last may be short)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def truncated(examples: Sequence[Example], max_seq_length: int) -> int:
    """How many examples are longer than max_seq_length (and are cut to it)."""
    return sum(1 for e in examples if len(e) > max_seq_length)


def make_batch(examples: Sequence[Example], max_seq_length: int) -> Batch:
    longest = min(max(len(e) for e in examples), max_seq_length)
    width = min(-(-longest // PAD_TO) * PAD_TO, max_seq_length)
    ids = np.zeros((len(examples), width), np.int32)
    mask = np.zeros((len(examples), width), np.float32)
    for row, e in enumerate(examples):
        n = min(len(e), width)
        ids[row, :n] = e.ids[:n]
        mask[row, :n] = e.trained[:n]
    return Batch(mx.array(ids), mx.array(mask[:, 1:]), tuple(e.where for e in examples))


def iterate_batches(examples: Sequence[Example], batch_size: int, max_seq_length: int, seed: int,
                    loop: bool = True) -> Iterator[Batch]:
    """Batches in a seeded order: each epoch a permutation of the length groups drawn from one
    numpy RandomState(seed), as mlx_lm.lora draws them from its seeded global state."""
    batches = groups(examples, batch_size)
    rng = np.random.RandomState(seed)
    while True:
        for i in rng.permutation(len(batches)):
            yield make_batch([examples[j] for j in batches[i]], max_seq_length)
        if not loop:
            return


def fixed_batches(examples: Sequence[Example], batch_size: int, limit: int, seed: int) -> list[list[int]]:
    """The groups a validation or test pass reads, the same at every pass: a seeded choice of `limit`
    of them (-1: all)."""
    batches = groups(examples, batch_size)
    order = np.random.RandomState(seed).permutation(len(batches))
    chosen = order if limit == -1 else order[:limit]
    return [batches[i] for i in chosen]
