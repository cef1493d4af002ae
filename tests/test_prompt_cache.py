"""Prompt cache files for one-shot generation: the shared prefix reused, files that cannot be written."""

import os

import mlx.core as mx
import pytest

from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.generation.options import GenerationOptions
from qwen3_mlx.generation.prompt_cache import (
    common_prefix,
    load_cache,
    open_prompt_cache,
    save_prompt_cache,
)
from qwen3_mlx.text.prompt import Prompt, encode_prompt


def filled(model, tok, question, path=None):
    """The prompt ids of `question` and a cache holding them (opened from `path` when given)."""
    ids, _ = encode_prompt(tok, Prompt(question), think=False)
    cache = open_prompt_cache(path, model, tok, ids, None, GenerationOptions()) if path else model.make_cache()
    model(mx.array([ids[cache[0].offset :]]), cache)
    return ids, cache


def test_a_saved_prompt_cache_is_opened_trimmed_to_the_shared_prefix(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "p.safetensors"
    first, cache = filled(model, tok, "first question")
    model(mx.array([[7, 8, 9]]), cache)  # a response, which the file must not keep
    assert save_prompt_cache(path, cache, first, model)
    assert load_cache(path, model)[1] == first
    second, _ = encode_prompt(tok, Prompt("second question"), think=False)
    reopened = open_prompt_cache(path, model, tok, second, None, GenerationOptions())
    assert reopened[0].offset == common_prefix(first, second) > 0


def test_a_missing_prompt_cache_file_gives_a_new_cache(tiny, tmp_path):
    model, tok = tiny
    ids, _ = encode_prompt(tok, Prompt("q"), think=False)
    assert open_prompt_cache(tmp_path / "none.safetensors", model, tok, ids, None, GenerationOptions())[0].offset == 0
    rotating = open_prompt_cache(tmp_path / "none.safetensors", model, tok, ids, None, GenerationOptions(max_kv_size=64))
    assert rotating[0].max_size == 64


def test_saving_a_prompt_cache_into_a_missing_folder_is_one_line_and_writes_nothing(tiny, tmp_path):
    model, tok = tiny
    ids, cache = filled(model, tok, "q")
    target = tmp_path / "no" / "such" / "x.safetensors"
    with pytest.raises(Qwen3Error) as e:
        save_prompt_cache(target, cache, ids, model)
    assert str(e.value) == f"{target}: the folder {target.parent} does not exist; create it or choose another path"
    assert os.listdir(tmp_path) == []


def test_a_write_that_fails_leaves_no_half_file(tiny, tmp_path):
    model, tok = tiny
    ids, cache = filled(model, tok, "q")
    target = tmp_path / "taken"
    target.mkdir()  # a folder where the file should go: the rename fails after the data was written
    with pytest.raises(Qwen3Error) as e:
        save_prompt_cache(target, cache, ids, model)
    assert str(e.value).startswith(f"{target}: could not write the cache file (")
    assert str(e.value).endswith("); choose another path") and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == ["taken"] and os.listdir(target) == []


def test_a_rotated_prompt_cache_is_not_saved(tiny, tmp_path):
    model, tok = tiny
    ids, _ = encode_prompt(tok, Prompt("q"), think=False)
    cache = model.make_cache(8, 2)
    model(mx.array([ids]), cache)
    assert not save_prompt_cache(tmp_path / "p.safetensors", cache, ids, model)
    assert os.listdir(tmp_path) == []
