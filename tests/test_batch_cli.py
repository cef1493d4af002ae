"""`generate --prompts-file`: the three formats, results equal to `generate`, per-line options, bad lines
named before anything runs, --output complete or absent."""

import json

import pytest
from click.testing import CliRunner

from qwen3_mlx import GenerationOptions, Qwen3Error, cli, generate
from qwen3_mlx.cli.prompts_file import LINE_OPTIONS, read_batch_lines
from qwen3_mlx.text.prompt import Prompt

GREEDY = ["--temp", "0", "--no-think", "-m", "5"]


def run_file(ckpt, path, *args):
    return CliRunner().invoke(cli.main, ["generate", "--model", str(ckpt), "--prompts-file", str(path), *args])


def lines(text):
    return [json.loads(line) for line in text.splitlines()]


def write(path, *rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- the formats


def test_a_text_file_gives_each_prompt_what_generate_gives_it_in_order(tiny_checkpoint, tiny, tmp_path):
    model, tok = tiny
    prompts = ["Hello", "Tell me a long story about a dragon", "Why?"]
    path = write(tmp_path / "prompts.txt", prompts[0], "", "  ", prompts[1], prompts[2])
    result = run_file(tiny_checkpoint, path, *GREEDY)
    assert result.exit_code == 0, result.output
    got = lines(result.stdout)
    assert [r["index"] for r in got] == [0, 1, 2]
    for record, prompt in zip(got, prompts):
        alone = generate(model, tok, prompt, temp=0, think=False, max_tokens=5)
        s = alone.stats
        assert record == {"index": record["index"], "reasoning": alone.reasoning, "content": alone.content,
                          "finish_reason": s.finish_reason, "budget_exhausted": s.budget_exhausted,
                          "usage": {"prompt_tokens": s.prompt_tokens, "cached_tokens": 0,
                                    "reasoning_tokens": s.reasoning_tokens, "answer_tokens": s.answer_tokens,
                                    "forced_tokens": s.forced_tokens, "completion_tokens": len(alone.token_ids)}}


def test_a_rotating_cache_and_a_quantized_one_apply_to_every_prompt_of_a_file(tiny_checkpoint, tiny, tmp_path):
    model, tok = tiny
    prompts = ["Hello", "Tell me a long story about a dragon"]
    path = write(tmp_path / "prompts.txt", *prompts)
    result = run_file(tiny_checkpoint, path, "--temp", "0", "--no-think", "-m", "40", "--max-kv-size", "24")
    assert result.exit_code == 0, result.output
    alone = [generate(model, tok, p, temp=0, think=False, max_tokens=40, max_kv_size=24) for p in prompts]
    assert [r["content"] for r in lines(result.stdout)] == [a.content for a in alone]
    result = run_file(tiny_checkpoint, path, *GREEDY, "--kv-bits", "8")  # 16-dim heads: no group size fits
    assert result.exit_code == 2 and "kv_group_size=64 does not divide the model's head_dim=16" in result.stderr


def test_chat_lines_carry_their_own_options_over_the_command_lines(tiny_checkpoint, tiny, tmp_path):
    model, tok = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = write(tmp_path / "chat.jsonl",
                 {"messages": messages, "custom_id": "a", "max_tokens": 2},
                 {"messages": [{"role": "user", "content": "Count"}], "seed": 3, "temp": 0.7, "stop": "x"},
                 {"messages": [{"role": "user", "content": "Think"}], "think": True, "thinking_budget": 2,
                  "max_tokens": 3})
    result = run_file(tiny_checkpoint, path, *GREEDY)
    assert result.exit_code == 0, result.output
    first, second, third = lines(result.stdout)
    base = GenerationOptions(temp=0, think=False, max_tokens=5)
    expected = [generate(model, tok, messages, base.replace(max_tokens=2)),
                generate(model, tok, "Count", base.replace(seed=3, temp=0.7, stop=("x",))),
                generate(model, tok, "Think", base.replace(think=True, thinking_budget=2, max_tokens=3))]
    assert (first["custom_id"], "custom_id" in second) == ("a", False)
    assert [(r["reasoning"], r["content"]) for r in (first, second, third)] == [
        (e.reasoning, e.content) for e in expected]
    assert first["usage"]["answer_tokens"] == 2


def test_the_system_option_applies_to_prompts_without_a_system_message():
    base = GenerationOptions()
    own = {"messages": [{"role": "system", "content": "mine"}, {"role": "user", "content": "a"}]}
    batch = read_batch_lines([json.dumps({"messages": [{"role": "user", "content": "b"}]}), json.dumps(own)],
                             base, system="shared")
    assert batch.format == "chat"
    assert [r.prompt.content[0]["content"] for r in batch.requests] == ["shared", "mine"]
    assert read_batch_lines(["b"], base, system="shared").requests[0].prompt == Prompt([
        {"role": "system", "content": "shared"}, {"role": "user", "content": "b"}])


def test_an_openai_batch_file_gets_openai_batch_output(tiny_checkpoint, tiny, tmp_path):
    model, tok = tiny
    body = {"model": "qwen3", "messages": [{"role": "developer", "content": "Be brief."},
                                           {"role": "user", "content": "Hi"}],
            "max_completion_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2,
            "chat_template_kwargs": {"enable_thinking": False}, "user": "ignored"}
    path = write(tmp_path / "batch.jsonl",
                 {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", "body": body})
    result = run_file(tiny_checkpoint, path)
    assert result.exit_code == 0, result.output
    [line] = lines(result.stdout)
    alone = generate(model, tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                     temp=0, think=False, max_tokens=4, max_total_tokens=4, logprobs=2)
    assert (line["custom_id"], line["error"], line["response"]["status_code"]) == ("req-1", None, 200)
    assert line["id"].startswith("batch_req_")
    completion = line["response"]["body"]
    assert (completion["object"], completion["model"]) == ("chat.completion", "qwen3")
    [choice] = completion["choices"]
    assert choice["message"] == {"role": "assistant", "content": alone.content, "refusal": None,  # OpenAI's nulls
                                 "reasoning_content": None, "reasoning": None, "tool_calls": None}
    assert choice["finish_reason"] == ("length" if alone.stats.finish_reason == "length" else "stop")
    assert [t["logprob"] for t in choice["logprobs"]["content"]] == pytest.approx([p.logprob for p in alone.logprobs])
    assert all(len(t["top_logprobs"]) == 2 for t in choice["logprobs"]["content"])
    n = len(alone.token_ids)
    assert completion["usage"] == {"prompt_tokens": alone.stats.prompt_tokens, "completion_tokens": n,
                                   "total_tokens": alone.stats.prompt_tokens + n,
                                   "prompt_tokens_details": {"cached_tokens": 0},
                                   "completion_tokens_details": {"reasoning_tokens": 0, "accepted_prediction_tokens": 0,
                                                                 "rejected_prediction_tokens": 0}}


def test_an_openai_batch_line_with_a_response_format_answers_valid_json(tiny_checkpoint, tiny, tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    body = {"messages": [{"role": "user", "content": "A digit?"}], "seed": 1, "max_tokens": 300,
            "chat_template_kwargs": {"enable_thinking": False},
            "response_format": {"type": "json_schema", "json_schema": {"name": "digit", "schema": schema}}}
    path = write(tmp_path / "batch.jsonl", *({"custom_id": f"r{i}", "body": {**body, "seed": i}} for i in range(3)))
    result = run_file(tiny_checkpoint, path)
    assert result.exit_code == 0, result.output
    for line, i in zip(lines(result.stdout), range(3)):
        message = line["response"]["body"]["choices"][0]["message"]["content"]
        assert message == generate(*tiny, body["messages"], json_schema=schema, seed=i, think=False,
                                   max_tokens=300, max_total_tokens=300).content
        assert json.loads(message)["n"] in range(10)


# ---------------------------------------------------------------- bad lines: one error, nothing run


@pytest.mark.parametrize("rows, message", [
    (['{"messages": [{"role": "user", "content": "a"}]}', '{"messages": ['],
     ("2: not JSON (Expecting value, column 15); this is a JSON lines file (its first request is a JSON object), "
     "so every line must be one JSON object")),
    (['{"messages": [{"role": "user", "content": "a"}], "temp": "hot"}'], "1: temperature='hot' must be a number"),
    (['{"messages": [{"role": "user", "content": "a"}], "max_kv_size": 8}'],
     ("1: unknown key 'max_kv_size' (the whole run's: --max-kv-size); a chat line takes messages, custom_id "
     f"and the options {', '.join(LINE_OPTIONS)}")),
    (['{"messages": [{"role": "user", "content": "a"}]}', '{"messages": [{"role": "robot", "content": "b"}]}'],
     "2: messages[0].role='robot' is not one of system, user, assistant, tool"),
    (['{"messages": [{"role": "user", "content": "a"}]}', '{"custom_id": "x", "body": {}}'],
     "2: an OpenAI batch request in a file of chat requests (as its first line is); use one format a file"),
    (['{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "a"}], "n": 2}}'],
     "1: body.n: 2 choices asked; this server gives one per request: send 2 requests (they are batched)"),
    (['{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "a"}], "stream": true}}'],
     "1: body.stream: a batch response is not streamed; leave it false"),
    (['{"messages": [{"role": "developer", "content": "a"}, {"role": "user", "content": "b"}], "temp": "x"}'],
     "1: temperature='x' must be a number"),
    (['{"custom_id": "x", "url": "/v1/embeddings", "body": {}}'],
     "1: url='/v1/embeddings': only /v1/chat/completions requests are run here"),
    (['{"messages": [{"role": "user", "content": "a"}], "temp": -1}'], "1: temperature must be >= 0, got -1.0"),
    (['{"messages": [{"role": "user", "content": "a"}], "max_tokens": -1}'], "1: max_tokens must be >= 0, got -1"),
    (['{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "a"}]}}',
      '{"custom_id": "y", "body": {"messages": [{"role": "user", "content": "a"}], "response_format": '
      '{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}}}'],
     "2: json_schema: Invalid type: foo"),
    (['{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "a"}], "response_format": '
      '{"type": "json_schema"}}}'],
     ('1: body.response_format: give {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
      '"json_schema": {"name": ..., "schema": {...}}}')),
])
def test_a_bad_line_is_one_error_naming_the_file_and_line(tiny_checkpoint, tmp_path, rows, message):
    path = write(tmp_path / "bad.jsonl", *rows)
    result = run_file(tiny_checkpoint, path)
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"error: {path}:{message}\n"


def test_a_repeated_custom_id_and_an_empty_file_are_refused(tmp_path):
    row = json.dumps({"custom_id": "same", "body": {"messages": [{"role": "user", "content": "a"}]}})
    with pytest.raises(Qwen3Error, match="^f: custom_id 'same' is used twice; each request needs its own$"):
        read_batch_lines([row, row], GenerationOptions(), "f")
    with pytest.raises(Qwen3Error, match="^f: no prompts; "):
        read_batch_lines(["", " "], GenerationOptions(), "f")


@pytest.mark.parametrize("args, message", [
    (["-p", "hi"], "-p/--prompt and --prompts-file exclude each other; give one"),
    (["--raw"], "--raw takes a text file of prompts"),
])
def test_options_that_do_not_apply_to_a_file_are_usage_errors(tiny_checkpoint, tmp_path, args, message):
    path = write(tmp_path / "chat.jsonl", {"messages": [{"role": "user", "content": "a"}]})
    result = run_file(tiny_checkpoint, path, *args)
    assert result.exit_code == 2 and message in result.stderr


def test_output_and_max_batch_need_a_prompts_file(tiny_checkpoint):
    result = CliRunner().invoke(cli.main, ["generate", "--model", str(tiny_checkpoint), "-p", "hi", "-o", "x"])
    assert result.exit_code == 2 and "--output applies only with --prompts-file" in result.stderr
    result = CliRunner().invoke(cli.main, ["generate", "--model", str(tiny_checkpoint)])
    assert result.exit_code == 2 and "give a prompt: -p/--prompt TEXT, or --prompts-file FILE" in result.stderr


# ---------------------------------------------------------------- output


def test_output_holds_what_stdout_would_and_nothing_else_is_left(tiny_checkpoint, tmp_path):
    path = write(tmp_path / "prompts.txt", "one", "two", "three")
    printed = run_file(tiny_checkpoint, path, *GREEDY, "--max-batch", "2")
    out = tmp_path / "out" / "results.jsonl"
    out.parent.mkdir()
    written = run_file(tiny_checkpoint, path, *GREEDY, "--output", str(out))
    assert (written.exit_code, written.stdout) == (0, "")
    assert out.read_text() == printed.stdout and len(printed.stdout.splitlines()) == 3
    assert list(out.parent.iterdir()) == [out]


def test_a_run_that_fails_leaves_no_output_file(tiny_checkpoint, tmp_path):
    path = write(tmp_path / "bad.jsonl", {"messages": [{"role": "user", "content": "a"}], "top_p": 0})
    out = tmp_path / "results.jsonl"
    result = run_file(tiny_checkpoint, path, "--output", str(out))
    assert result.exit_code == 1 and "bad.jsonl:1: top_p must be in (0, 1], got 0.0\n" in result.stderr
    assert list(tmp_path.iterdir()) == [path]


def test_hide_thinking_leaves_the_reasoning_out(tiny_checkpoint, tmp_path):
    path = write(tmp_path / "prompts.txt", "one")
    result = run_file(tiny_checkpoint, path, *GREEDY, "--hide-thinking")
    assert "reasoning" not in lines(result.stdout)[0]


def test_output_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from qwen3_mlx import files
    from qwen3_mlx.cli import prompts_file as batch_files

    out = tmp_path / "results.jsonl"
    out.write_text("the last run's\n")

    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        batch_files.write_jsonl([{"index": 0}], out, print)
    assert list(tmp_path.iterdir()) == [out] and out.read_text() == "the last run's\n"
    monkeypatch.undo()
    batch_files.write_jsonl([{"index": 0, "content": "é"}], out, print)
    assert out.read_text(encoding="utf-8") == '{"index": 0, "content": "é"}\n'
