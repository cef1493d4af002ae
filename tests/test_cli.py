"""The command line: mlx_lm's option names, help and version, piped output, chat input, figures, convert's aliases."""

import importlib.metadata
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from checkpoints import make_checkpoint
from click.testing import CliRunner

from qwen3_mlx.cli import chat_command, commands, convert_command, display, generate_command, serve_command
from qwen3_mlx.generation.single import GenerationStats, generate
from qwen3_mlx.checkpoint.loader import load

ROOT = Path(__file__).resolve().parent.parent
VERSION = importlib.metadata.version("qwen3-mlx")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The real Qwen3 tokenizer on a tiny float32 model."""
    return make_checkpoint(tmp_path_factory.mktemp("cli"), tokenizer=True, hidden_size=32, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def thinking_ckpt(ckpt, tmp_path_factory):
    """`ckpt` with a template whose generation prompt opens <think> (as Qwen3-2507's thinking models do),
    so that even random weights give a reasoning, then an answer."""
    path = tmp_path_factory.mktemp("thinking")
    for f in ckpt.iterdir():
        (path / f.name).symlink_to(f)
    (path / "chat_template.jinja").write_text(
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n<think>\n{%- endif %}")
    return path


def run(*args: str, input: str | bytes | None = None):
    return CliRunner().invoke(commands.main, list(args), input=input)


def generate_cli(model: Path, *args: str):
    return run("generate", "--model", str(model), *args)


# ---------------------------------------------------------------- help, version, entry points


@pytest.mark.parametrize("command", [[], ["generate"], ["chat"], ["convert"]])
def test_dash_h_is_help_and_version_comes_from_the_package(command):
    assert run(*command, "-h").stdout.startswith("Usage: ")
    assert run(*command, "--version").stdout == f"qwen3-mlx {VERSION}\n"


def test_python_dash_m_runs_the_commands():
    done = subprocess.run([sys.executable, "-m", "qwen3_mlx", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, f"qwen3-mlx {VERSION}\n")


@pytest.mark.parametrize("command", [generate_command.generate, chat_command.chat, convert_command.convert,
                                     serve_command.serve])
def test_every_option_has_help(command):
    missing = [p.name for p in command.params if isinstance(p, click.Option) and not p.help]
    assert missing == []


def test_the_sampling_help_says_the_defaults_depend_on_the_mode():
    helps = {p.name: p.help for p in generate_command.generate.params}
    assert all("for the mode" in helps[name] for name in ("temp", "top_p"))


# ---------------------------------------------------------------- mlx_lm's names


@pytest.mark.parametrize("command, names", [
    (generate_command.generate, ["-p", "-m", "--max-tokens", "--system-prompt", "--ignore-chat-template",
                                 "--prompt-cache-file", "--extra-eos-token", "--chat-template-config",
                                 "--prefill-response", "--max-kv-size", "--prefill-step-size", "--temp", "--top-p",
                                 "--top-k", "--min-p", "--seed", "--model"]),
    (convert_command.convert, ["--hf-path", "--model", "--mlx-path", "-q", "--q-bits", "--q-group-size", "--dtype",
                               "-d"]),
])
def test_mlx_lm_option_names_are_accepted(command, names):
    known = {opt for p in command.params for opt in p.opts}
    assert set(names) <= known, set(names) - known


def test_dash_m_is_max_tokens_as_in_mlx_lm(ckpt):
    result = generate_cli(ckpt, "-p", "hi", "-m", "5", "--seed", "0", "--no-think", "-v")
    assert result.exit_code == 0, result.output
    assert "reasoning: 0 tokens, answer: 5 tokens\n" in result.stderr


def test_an_extra_eos_token_ends_the_answer_as_a_stop_string(ckpt):
    base = ["-p", "hi", "-m", "8", "--seed", "0", "--no-think"]
    full = generate_cli(ckpt, *base).stdout
    word = full.split()[2]
    stopped = generate_cli(ckpt, *base, "--extra-eos-token", word)
    assert stopped.exit_code == 0, stopped.output
    assert stopped.stdout == generate_cli(ckpt, *base, "--stop", word).stdout == full[: full.index(word)] + "\n"


def test_chat_template_config_sets_enable_thinking(thinking_ckpt):
    base = ["-p", "hi", "-m", "6", "--seed", "0"]
    configured = generate_cli(thinking_ckpt, *base, "--chat-template-config", '{"enable_thinking": false}')
    assert configured.exit_code == 0, configured.output
    assert configured.stdout == generate_cli(thinking_ckpt, *base, "--no-think").stdout


@pytest.mark.parametrize("value, message", [
    ("{", "not JSON"),
    ('{"add_generation_prompt": false}', "enable_thinking only"),
    ('{"enable_thinking": "no"}', "enable_thinking must be true or false"),
])
def test_a_bad_chat_template_config_is_a_usage_error(ckpt, value, message):
    result = generate_cli(ckpt, "-p", "hi", "--chat-template-config", value)
    assert result.exit_code == 2 and message in result.stderr


def test_prefill_response_starts_the_answer_as_in_the_library(ckpt):
    result = generate_cli(ckpt, "-p", "hi", "--prefill-response", "Sure,", "-m", "4", "--seed", "0", "--no-think")
    assert result.exit_code == 0, result.output
    model, tok = load(ckpt)
    expected = generate(model, tok, "hi", prefill_response="Sure,", max_tokens=4, seed=0, think=False)
    assert result.stdout == expected.content + "\n"


# ---------------------------------------------------------------- inputs treated evenly


@pytest.mark.parametrize("extra", [["--system", "Be brief."], ["--system-prompt", ""], ["--prefill-response", "No"],
                                   ["--chat-template-config", "{}"]])
def test_raw_refuses_what_only_the_template_can_apply(ckpt, extra):
    result = generate_cli(ckpt, "--raw", "-p", "hi", *extra)
    assert result.exit_code == 2 and "needs the chat template, which --raw skips" in result.stderr


def test_json_schema_regex_and_grammar_files_constrain_the_answer(ckpt, tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "g.lark").write_text('start: "It is " ("yes" | "no") "."')
    (tmp_path / "g.gbnf").write_text('root ::= "It is " ("yes" | "no") "."')
    base = ["-p", "hi", "-m", "200", "--seed", "0", "--no-think"]
    answer = generate_cli(ckpt, *base, "--json-schema", str(tmp_path / "s.json"))
    assert answer.exit_code == 0, answer.output
    assert json.loads(answer.stdout)["n"] in range(10)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}\n", generate_cli(ckpt, *base, "--regex", "[0-9]{3}-[a-z]{2}").stdout)
    for grammar in ("g.lark", "g.gbnf"):
        assert generate_cli(ckpt, *base, "--grammar", str(tmp_path / grammar)).stdout in ("It is yes.\n",
                                                                                         "It is no.\n")


def json_reason(text: str) -> str:
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return str(e)


@pytest.mark.parametrize("text, message", [
    ("{", "s.json: not JSON: " + json_reason("{")),  # Python's reason, carried
    ("[1]", "s.json: a JSON schema is an object ({...}), got list"),
    ('{"type": "foo"}', "json_schema: "),  # then llguidance's reason
])
def test_a_bad_json_schema_file_is_one_line_before_the_run(ckpt, tmp_path, text, message):
    (tmp_path / "s.json").write_text(text)
    result = generate_cli(ckpt, "-p", "hi", "--json-schema", str(tmp_path / "s.json"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    last = result.stderr.rstrip().splitlines()[-1]
    if message == "json_schema: ":
        assert "foo" in last.split(message, 1)[1]  # llguidance's reason, naming the bad value
    else:
        assert last.endswith(message)


def test_two_constraints_at_once_are_refused(ckpt, tmp_path):
    result = generate_cli(ckpt, "-p", "hi", "--regex", "a", "--grammar", __file__)
    assert result.exit_code == 2
    assert result.stderr.rstrip().endswith("structured output: give one of json_schema, regex or grammar, "
                                          "got regex and grammar")


def test_a_prompt_cache_in_a_missing_folder_is_one_line_before_the_run(ckpt, tmp_path):
    path = tmp_path / "no" / "such" / "x.safetensors"
    result = generate_cli(ckpt, "-p", "hi", "-m", "3", "--prompt-cache", str(path))
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (f"error: {path}: the folder {path.parent} does not exist; "
                             f"create it or choose another path\n")


# ---------------------------------------------------------------- piped output


def test_piped_output_puts_the_reasoning_in_think_tags_before_the_answer(thinking_ckpt):
    args = ["-p", "hi", "--thinking-budget", "3", "-m", "4", "--seed", "0"]
    result = generate_cli(thinking_ckpt, *args)
    assert result.exit_code == 0, result.output
    model, tok = load(thinking_ckpt)
    expected = generate(model, tok, "hi", thinking_budget=3, max_tokens=4, seed=0)
    assert expected.reasoning and expected.content
    assert result.stdout == f"<think>\n{expected.reasoning}\n</think>\n\n{expected.content}\n"
    hidden = generate_cli(thinking_ckpt, *args, "--hide-thinking")
    assert hidden.stdout == f"{expected.content}\n"


def test_a_response_without_reasoning_has_no_think_tags(ckpt):
    result = generate_cli(ckpt, "-p", "hi", "-m", "4", "--seed", "0", "--no-think")
    assert result.exit_code == 0 and "<think>" not in result.stdout and result.stdout.strip()


# ---------------------------------------------------------------- figures


def test_the_prompt_rate_is_given_for_the_tokens_computed(capsys):
    display.print_stats(GenerationStats(prompt_tokens=502, cached_tokens=480, prompt_seconds=22 / 210.3))
    assert capsys.readouterr().err.startswith("prompt: 502 tokens (480 cached), 22 computed at 210.3 tok/s\n")


def test_prefill_progress_through_the_command(ckpt):
    _, tok = load(ckpt)
    prompt = "one two three four five six seven eight nine ten"
    n = len(tok.encode(prompt))
    result = generate_cli(ckpt, "--raw", "-p", prompt, "--prefill-step-size", "4", "-m", "1", "--seed", "0")
    lines = [f"\rprefill {done}/{n} tokens" for done in range(4, n, 4)] + [f"\rprefill {n}/{n} tokens\n"]
    assert result.stderr == "".join(lines)


# ---------------------------------------------------------------- chat input


class FakeSession:
    """Records what the chat command asks of a ChatSession."""

    def __init__(self, model, tokenizer, *args, **kwargs):
        self.sent, self.calls, self.messages, self.cached, self.last = [], [], [], [], None

    def send(self, text):
        self.sent.append(text)
        return iter(())

    def __getattr__(self, name):  # set_budget, set_thinking, set_system, reset, save, load
        return lambda *args: self.calls.append((name, *args))


@pytest.fixture
def fake_chat(monkeypatch):
    sessions = []

    def make(*args, **kwargs):
        sessions.append(FakeSession(*args, **kwargs))
        return sessions[-1]

    monkeypatch.setattr("qwen3_mlx.generation.chat.ChatSession", make)
    monkeypatch.setattr("qwen3_mlx.checkpoint.loader.load", lambda model: (None, None))

    def chat(*lines: str):
        result = run("chat", input="\n".join(lines) + "\n")
        assert result.exit_code == 0, result.output
        return sessions[-1], result.stderr

    return chat


def test_a_line_ending_in_a_backslash_continues_the_message(fake_chat):
    session, _ = fake_chat("first \\", "second\\", "third", "alone")
    assert session.sent == ["first \nsecond\nthird", "alone"]


def test_a_double_slash_sends_a_message_that_starts_with_a_slash(fake_chat):
    session, err = fake_chat("//etc/hosts is what?", "/no_think plain question")
    assert session.sent == ["/etc/hosts is what?", "/no_think plain question"]
    assert "error" not in err


def test_an_empty_line_sends_nothing(fake_chat):
    session, err = fake_chat("", "   ", "hi")
    assert session.sent == ["hi"] and "error" not in err


def test_budget_goes_through_the_typed_setter(fake_chat):
    session, err = fake_chat("/budget 5", "/budget off", "/budget lots")
    assert session.calls == [("set_budget", 5), ("set_budget", None)]
    assert "error: /budget takes a number of tokens >= 0 or 'off', got 'lots'" in err


def test_help_lists_help_and_exit_and_exit_leaves(fake_chat):
    session, err = fake_chat("/help", "/exit", "never sent")
    assert "/help" in err and "/exit" in err and "//text" in err
    assert session.sent == []


def test_a_save_into_a_missing_folder_is_one_line_and_the_chat_goes_on(fake_chat, tmp_path):
    path = tmp_path / "no" / "f.safetensors"
    session, err = fake_chat(f"/save {path}", "still here")
    assert err == f"error: {path}: the folder {path.parent} does not exist; create it or choose another path\n"
    assert session.sent == ["still here"]


def test_a_file_error_in_chat_is_one_line_and_the_chat_goes_on(fake_chat, monkeypatch, tmp_path):
    def refuse(self, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(FakeSession, "save", refuse, raising=False)
    session, err = fake_chat(f"/save {tmp_path / 'f'}", "still here")
    assert err == f"error: {tmp_path / 'f'}: Permission denied; check the path\n"
    assert session.sent == ["still here"]


def test_interactive_input_continues_with_a_second_prompt(monkeypatch):
    lines, prompts = iter(["one\\", "two"]), []
    monkeypatch.setattr("builtins.input", lambda prompt: prompts.append(prompt) or next(lines))
    assert chat_command.read_message(interactive=True) == "one\ntwo"
    assert prompts == [">>> ", "... "]



def read_until(fd: int, marker: bytes, seconds: float = 60) -> bytes:
    out, end = b"", time.monotonic() + seconds
    while marker not in out and time.monotonic() < end:
        if select.select([fd], [], [], 0.5)[0]:
            out += os.read(fd, 4096)
    return out


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_on_a_terminal_lines_are_edited_and_recalled_with_the_arrow_keys(ckpt):
    terminal, child = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "qwen3_mlx", "chat", "--model", str(ckpt)], cwd=ROOT,
                            stdin=child, stdout=child, stderr=child, env={**os.environ, "TERM": "xterm"})
    os.close(child)
    try:
        assert read_until(terminal, b">>> ").endswith(b">>> ")
        os.write(terminal, b"/bogus\x1b[DX\r")  # left arrow, then X: the line reads /boguXs
        assert b"unknown command /boguXs;" in read_until(terminal, b">>> ")
        os.write(terminal, b"\x1b[A\r")  # up arrow: the same line again
        assert b"unknown command /boguXs;" in read_until(terminal, b">>> ")
        os.write(terminal, b"/exit\r")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(terminal)

@pytest.mark.parametrize("after", ["/reset", "/load {save}"])
def test_stats_after_reset_or_load_do_not_show_the_previous_answer(ckpt, tmp_path, after):
    save = tmp_path / "c.safetensors"
    lines = ["hi", f"/save {save}", "again", after.format(save=save), "/stats"]
    result = run("chat", "--model", str(ckpt), "-m", "3", "--seed", "0", input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.endswith("\nno answer yet\n"), result.stderr



def test_save_with_a_rotated_cache_says_how_much_of_the_conversation_it_holds(ckpt, tmp_path):
    save = tmp_path / "c.safetensors"
    result = run("chat", "--model", str(ckpt), "--max-kv-size", "24", "-m", "30", "--seed", "0", "--no-think",
                 input=f"hi\n/save {save}\n")
    assert result.exit_code == 0, result.output
    saved = re.search(r"saved 2 messages, (\d+) of (\d+) tokens cached \(the rotating cache keeps the start and "
                      r"the latest\): ", result.stderr)
    assert saved and int(saved[1]) == 24 < int(saved[2]), result.stderr

# ---------------------------------------------------------------- convert


def test_convert_takes_mlx_lm_names_and_prints_megabytes(ckpt, tmp_path):
    out = tmp_path / "out"
    result = run("convert", "--hf-path", str(ckpt), "--mlx-path", str(out), "-q", "--q-bits", "8",
                 "--q-group-size", "32")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(rf"wrote {out}: [\d.]+ bits per weight, \d+\.\d MB in [\d.]+ s\n", result.stdout)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert (quantization["bits"], quantization["group_size"]) == (8, 32)


@pytest.mark.parametrize("args, message", [
    (["SRC", "--hf-path", "SRC", "OUT"], "SOURCE or --hf-path: give one of them, not both"),
    (["--mlx-path", "OUT"], "SOURCE or --hf-path: one of them is required"),
    (["SRC"], "OUTPUT or --mlx-path: one of them is required"),
])
def test_convert_needs_each_path_once(args, message):
    result = run("convert", *args)
    assert result.exit_code == 2 and message in result.stderr

