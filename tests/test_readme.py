"""The README's examples that need no network run as written, on a tiny checkpoint: its model names
and the server's address are the only things replaced. The checkpoint's context is short (64 tokens: the
longest prompt here takes 22), so that responses asked for with thousands of tokens end at the context, as
they would at any limit."""

import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from checkpoints import make_checkpoint
from server_live import LiveServer

from qwen3_mlx import load
from qwen3_mlx.generation.engine import Engine
from qwen3_mlx.server import create_app

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(language: str) -> list[str]:
    """Every ```language block of the README, dedented (some sit inside a list item)."""
    found = re.findall(rf"^( *)```{language}\n(.*?)^\1```", README.read_text(encoding="utf-8"), re.M | re.S)
    return [textwrap.dedent(body) for _, body in found]


def block_with(language: str, marker: str) -> str:
    [block] = [b for b in blocks(language) if marker in b]
    return block


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A tiny random Qwen3 with the real tokenizer and a context of 64 tokens."""
    return make_checkpoint(tmp_path_factory.mktemp("short"), tokenizer=True, hidden_size=32, intermediate_size=64,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


@pytest.fixture(scope="module")
def served(short):
    with Engine(*load(short)) as engine, LiveServer(create_app(engine, model_id="./qwen3-1.7b-4bit")) as server:
        yield server


def test_the_python_api_example_runs(short, capsys):
    code = block_with("python", 'load("mlx-community/Qwen3-1.7B-4bit")')
    exec(code.replace('"mlx-community/Qwen3-1.7B-4bit"', repr(str(short))), {})
    assert capsys.readouterr().out  # it printed the answers


def test_the_engine_example_runs(short, capsys):
    model, tokenizer = load(short)
    exec(block_with("python", "from qwen3_mlx import Engine"), {"model": model, "tokenizer": tokenizer})
    assert capsys.readouterr().out


def test_the_openai_client_example_runs_against_the_server(served, capsys):
    code = block_with("python", "from openai import OpenAI")
    exec(code.replace("http://127.0.0.1:8080", served.url), {})
    assert capsys.readouterr().out


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_example_gets_a_chat_completion(served):
    command = block_with("bash", "curl http://127.0.0.1:8080/v1/chat/completions")
    command = command.replace("http://127.0.0.1:8080", served.url)
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and '"object":"chat.completion"' in out.stdout.replace(" ", "")
