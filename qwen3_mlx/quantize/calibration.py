"""Calibration samples from a local file: its texts (plain text, or JSON lines of text or chat, as
perplexity reads them) tokenized, joined end to end, and cut into samples of a fixed length."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..errors import OptionError, Qwen3Error
from ..evaluation.documents import Text, make_document
from ..text.tokenizer import Tokenizer


def calibration_samples(path: Path, texts: list[Text], tokenizer: Tokenizer, samples: int, length: int) -> mx.array:
    """(N, length) token ids from the texts of the file at `path` (evaluation.documents.read_texts'):
    up to `samples` consecutive pieces of their tokens, spread evenly over them when they hold more.

    Raises:
        OptionError: samples or length below 1.
        Qwen3Error: the texts hold fewer than `length` tokens.
    """
    if samples < 1 or length < 2:
        raise OptionError(f"--calibration-samples {samples} and --calibration-length {length} must be >= 1 and "
                          f">= 2")
    ids = [t for text in texts for t in make_document(tokenizer, text).ids]
    pieces = len(ids) // length
    if pieces == 0:
        raise Qwen3Error(f"{path}: holds {len(ids)} tokens, fewer than one sample of --calibration-length "
                         f"{length}; give more text or a shorter length")
    chosen = [round(i * pieces / min(samples, pieces)) for i in range(min(samples, pieces))]
    return mx.array([ids[p * length:(p + 1) * length] for p in chosen])
