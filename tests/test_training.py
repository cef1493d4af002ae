"""Training's behaviour: thinking-aware examples (the ids a turn trains on are the template's at inference
plus the answer), bad lines refused as FILE:LINE, seeded runs that repeat and resume bit for bit, a
non-finite loss stopped, adapters that pass to and from mlx-lm, fusing (float and quantized bases), and
the commands (train, fuse, generate --adapter-path)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from click.testing import CliRunner

from checkpoints import make_checkpoint
from qwen3_mlx.checkpoint.adapters import load_adapters
from qwen3_mlx.checkpoint.loader import load_model
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.training.data import examples, load_split
from qwen3_mlx.training.fuse import fuse
from qwen3_mlx.training.loop import train
from qwen3_mlx.training.options import TrainingOptions
from test_training_parity import random_examples

FAST = dict(num_layers=-1, batch_size=2, max_seq_length=24, learning_rate=1e-2, seed=7)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("small"), vocab_size=256)


def trained_text(tok, example) -> list[str]:
    """The trained stretches of an example, decoded."""
    spans, current = [], []
    for token, on in zip(example.ids, example.trained):
        if on:
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    return spans + ([tok.decode(current)] if current else [])


def test_each_turn_keeps_its_reasoning_and_its_inference_context(tok):
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "add them"},
                {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"}]
    got = examples([{"messages": messages}], tok, mask_prompt=True)
    assert len(got) == 2  # the template drops the first turn's reasoning from the whole conversation
    for example, upto in zip(got, (1, 3)):
        prompt = tok.encode(tok.apply_chat_template(messages[:upto], add_generation_prompt=True))
        assert list(example.ids[:len(prompt)]) == prompt and not any(example.trained[:len(prompt)])
        assert all(example.trained[len(prompt):])
    assert trained_text(tok, got[0]) == ["<think>\nadd them\n</think>\n\n4<|im_end|>\n"]
    assert trained_text(tok, got[1]) == ["<think>\nadd again\n</think>\n\n6<|im_end|>\n"]


def test_tool_turns_after_the_last_question_share_one_sequence(tok):
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "", "reasoning_content": "use the tool", "tool_calls": [call]},
                {"role": "tool", "content": "4"},
                {"role": "assistant", "content": "It is 4."}]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    (one,) = examples([{"messages": messages, "tools": tools}], tok, mask_prompt=True)
    spans = trained_text(tok, one)
    assert len(spans) == 2 and spans[0].startswith("<think>\nuse the tool\n</think>\n\n<tool_call>")
    assert spans[1] == "<think>\n\n</think>\n\nIt is 4.<|im_end|>\n"  # no reasoning: the template's empty block
    full = tok.encode(tok.apply_chat_template(messages, tools=tools, add_generation_prompt=False))
    assert list(one.ids) == full


def test_prompt_lines_and_text_lines(tok):
    (p,) = examples([{"prompt": "hi", "completion": "hello"}], tok, mask_prompt=True)
    assert trained_text(tok, p) == ["<think>\n\n</think>\n\nhello<|im_end|>\n"]
    (t,) = examples([{"text": "plain words"}], tok)
    assert tok.decode(t.ids) == "plain words<|im_end|>" and t.trained == (False,) + (True,) * (len(t.ids) - 1)


@pytest.mark.parametrize("line, wrong", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message to train on"),
    ('{"prompt": "hi"}', "completion=None must be text"),
    ('{"txt": "hi"}', "has none of messages, prompt and completion, text"),
    ('[1, 2]', "is a list; each line is a JSON object"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "role='robot'"),
    ('{"text": "a"', "not valid JSON"),
])
def test_a_bad_line_is_refused_with_its_file_and_line(tmp_path, tok, line, wrong):
    file = tmp_path / "train.jsonl"
    file.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(Qwen3Error) as e:
        load_split(file, tok, False)
    assert str(e.value).startswith(f"{file}:3: ") and wrong in str(e.value)


def test_seeded_runs_repeat_and_a_resumed_run_equals_one_that_never_stopped(small, tmp_path):
    data = random_examples(6)
    whole = train(load_model(small), None, data, options=TrainingOptions(**FAST, iters=4, adapter_path=tmp_path / "a"))
    again = train(load_model(small), None, data, options=TrainingOptions(**FAST, iters=4))
    assert whole.losses == again.losses
    train(load_model(small), None, data, options=TrainingOptions(**FAST, iters=2, adapter_path=tmp_path / "b"))
    rest = train(load_model(small), None, data, options=TrainingOptions(
        **FAST, iters=4, adapter_path=tmp_path / "b", resume_adapter_file=tmp_path / "b" / "adapters.safetensors"))
    assert rest.losses == whole.losses[2:]
    a, b = mx.load(str(tmp_path / "a" / "adapters.safetensors")), mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert all(mx.array_equal(a[k], b[k]) for k in a)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_adapters(small, tmp_path):
    with pytest.raises(Qwen3Error, match=r"step \d+: the loss is nan on the batch of x:\d") as e:
        train(load_model(small), None, random_examples(4), options=TrainingOptions(
            **{**FAST, "learning_rate": 1e30}, optimizer="sgd", iters=6, adapter_path=tmp_path))
    saved = mx.load(str(tmp_path / "adapters.safetensors"))
    assert all(bool(mx.isfinite(v).all()) for v in saved.values()), str(e.value)


def adapted(small, tmp_path, kind="lora", learning_rate=1e-2):
    train(load_model(small), None, random_examples(4), options=TrainingOptions(
        **{**FAST, "learning_rate": learning_rate}, fine_tune_type=kind, iters=3, adapter_path=tmp_path / kind))
    return tmp_path / kind


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_our_adapter_loads_in_mlx_lm_and_gives_our_logits(small, tmp_path, kind):
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters
    from mlx_lm.utils import load_model as mlx_lm_load_model

    folder = adapted(small, tmp_path, kind)
    ids = mx.array([random_examples(1)[0].ids])
    ours = load_model(small)
    load_adapters(ours, folder)
    theirs, _ = mlx_lm_load_model(small)
    mlx_lm_load_adapters(theirs, str(folder))
    assert np.abs(np.array(ours(ids)) - np.array(theirs(ids))).max() < 1e-5
    plain = load_model(small)
    fuse(plain, folder)
    assert np.abs(np.array(plain(ids)) - np.array(ours(ids))).max() < 1e-4


def test_an_adapter_of_another_rank_or_model_is_refused_in_one_line(small, tmp_path):
    folder = adapted(small, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 4
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(Qwen3Error, match=r"adapters.safetensors: tensor '.*lora_a' has shape \(64, 8\), this "
                                         r"model's is \(64, 4\)"):
        load_adapters(load_model(small), folder)


def test_fusing_into_a_quantized_base_keeps_the_delta(small, tmp_path):
    """mlx-lm #1172: re-quantizing W + delta rounds a small delta away. Ours keeps such layers float, so the
    fused model is closer to the adapted one than the base is, at every position."""
    folder = adapted(small, tmp_path, learning_rate=1e-4)  # a fine-tune's small delta
    ids = mx.array([random_examples(1, 24, seed=9)[0].ids])

    def quantized():
        model = load_model(small)
        nn.quantize(model, group_size=32, bits=4)
        return model

    with_adapter = quantized()
    load_adapters(with_adapter, folder)
    target = np.array(with_adapter(ids))
    base = np.array(quantized()(ids))
    fused_model = quantized()
    kept = fuse(fused_model, folder)
    fused = np.array(fused_model(ids))
    assert (np.abs(fused - target).max(-1) < np.abs(base - target).max(-1)).all()
    assert kept  # the tiny run's deltas are below the 4-bit step: the layers stayed float and said so


def test_train_fuse_and_generate_with_the_adapter_from_the_command_line(tiny_checkpoint, tmp_path):
    from qwen3_mlx.cli.commands import main

    data = tmp_path / "data"
    data.mkdir()
    line = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    for name in ("train", "valid", "test"):
        (data / f"{name}.jsonl").write_text("\n".join(json.dumps(line) for _ in range(4)) + "\n")
    adapters = tmp_path / "adapters"
    runner = CliRunner()
    out = runner.invoke(main, ["train", "--model", str(tiny_checkpoint), "--data", str(data), "--num-layers", "-1",
                               "--iters", "2", "--batch-size", "2", "--learning-rate", "1e-2", "--mask-prompt",
                               "--steps-per-report", "1", "--adapter-path", str(adapters), "--test"])
    assert out.exit_code == 0, out.output
    assert "test loss" in out.output and (adapters / "adapters.safetensors").exists()
    fused = tmp_path / "fused"
    out = runner.invoke(main, ["fuse", "--model", str(tiny_checkpoint), "--adapter-path", str(adapters),
                               "--save-path", str(fused)])
    assert out.exit_code == 0, out.output
    args = ["generate", "-p", "hi", "-m", "12", "--temp", "0"]
    with_adapter = runner.invoke(main, args + ["--model", str(tiny_checkpoint), "--adapter-path", str(adapters)])
    from_fused = runner.invoke(main, args + ["--model", str(fused)])
    assert with_adapter.exit_code == 0 and from_fused.exit_code == 0, with_adapter.output + from_fused.output
    assert with_adapter.stdout == from_fused.stdout
