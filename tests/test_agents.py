"""The real agents, one non-interactive turn each, set up exactly as the README says: Claude Code
(`claude -p`, Anthropic's Messages API) and Codex CLI (`codex exec`, the Responses API), against a live
server over a scripted model that answers in a few tokens and ends its turn (a random checkpoint never
ends one, and both agents take a reply cut by the cap for an error). Skipped, with the reason, where a
CLI is missing: .ci/run installs both with npm into .agents/."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from server_live import HEADER, served as serving
from stubs import ScriptedModel, replies

from qwen3_mlx.generation.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
ANSWER = "Hello from qwen3-mlx, the local model."


def agent(name: str) -> str | None:
    local = ROOT / ".agents" / "node_modules" / ".bin" / name
    return str(local) if local.exists() else shutil.which(name)


def readme_serve_flags() -> dict[str, str]:
    """The README's `serve` line for the agents: its flags, --served-model-name and --max-tokens among them."""
    line = next(line for line in README.splitlines() if line.startswith("qwen3-mlx serve") and "--max-tokens" in line)
    return dict(re.findall(r"--([\w-]+) (\S+)", line))


@pytest.fixture(scope="module")
def served(tiny):
    """The server as the README's set-up runs it, its app built by the function `serve` calls, from the
    README's flags (the model itself a scripted one: its prompt of some 12,000 tokens is read to its end)."""
    flags = readme_serve_flags()
    assert set(flags) == {"model", "served-model-name", "max-tokens"}, "map each of the README's flags here"
    tok = tiny[1]
    model = ScriptedModel(replies(tok, "The user greets me.", ANSWER), tok.encode(HEADER))
    model.args.max_position_embeddings = 131072
    with Engine(model, tok, max_batch=4) as engine, \
            serving(engine, flags["served-model-name"], max_tokens=int(flags["max-tokens"])) as server:
        yield server


def readme_env(port: int) -> dict[str, str]:
    """The README's Claude Code line: its VAR=value pairs, before `claude`."""
    line = next(line for line in README.splitlines() if line.startswith("ANTHROPIC_BASE_URL="))
    pairs = re.findall(r"(\w+)=(\S+)", line.split(" claude ")[0])
    return {k: v.replace("8080", str(port)) for k, v in pairs}


def readme_codex_config(port: int) -> str:
    """The README's Codex config.toml."""
    block = next(b for b in re.findall(r"```toml\n(.*?)```", README, re.S) if 'wire_api = "responses"' in b)
    return block.replace("8080", str(port))


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def test_claude_code_answers_through_the_messages_api(served, tmp_path):
    claude = agent("claude")
    if claude is None:
        pytest.skip("Claude Code is not installed (npm install --prefix .agents @anthropic-ai/claude-code)")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **readme_env(port_of(served))}
    assert env["ANTHROPIC_BASE_URL"] == served.url
    done = subprocess.run([claude, "-p", "Say hello", "--model", "qwen3"], env=env, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ANSWER in done.stdout


def test_codex_answers_through_the_responses_api(served, tmp_path):
    codex = agent("codex")
    if codex is None:
        pytest.skip("Codex CLI is not installed (npm install --prefix .agents @openai/codex)")
    home = tmp_path / "codex"
    home.mkdir()
    (home / "config.toml").write_text(readme_codex_config(port_of(served)))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CODEX_HOME": str(home)}
    done = subprocess.run([codex, "exec", "--skip-git-repo-check", "-m", "qwen3", "Say hello"], env=env,
                          cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ANSWER in done.stdout
