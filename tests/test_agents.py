"""The real agents, each running a two-step tool loop non-interactively, set up exactly as the README
says: Claude Code (`claude -p`, Anthropic's Messages API, its thinking display "omitted") and Codex CLI
(`codex exec`, the Responses API, its reasoning encrypted), against a live server over a scripted model
(a random checkpoint never ends a turn, and both agents take a reply cut by the cap for an error). The
model first reasons and calls the agent's shell tool with a command whose output its text does not
hold; given that output and its own reasoning back, it answers. Skipped, with the reason, where a CLI
is missing: .ci/run installs both with npm into .agents/."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from server_live import HEADER, served as serving
from stubs import ScriptedModel, by_prompt, replies

from qwen3_mlx.generation.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
ANSWER = "The command printed its marker: the tool loop works."
COMMAND = "echo TOOL-OUTPUT-$((6*7))"  # its output, TOOL-OUTPUT-42, is not in its text
REASONING = "I will run the shell command first."
CALLS = {  # each agent's shell tool, by a name only its request holds
    "exec_command": '<tool_call>\n{"name": "exec_command", "arguments": {"cmd": "%s"}}\n</tool_call>' % COMMAND,
    "Bash": '<tool_call>\n{"name": "Bash", "arguments": {"command": "%s", "description": "Print a marker"}}\n'
            '</tool_call>' % COMMAND,
}


def tool_loop(tok):
    """The script of both steps: the call, then the answer once the prompt holds the command's output and
    the first step's reasoning (sent back sealed by the agent); without the reasoning, another answer."""
    calls = by_prompt(tok, {name: replies(tok, REASONING, call) for name, call in CALLS.items()},
                      replies(tok, "No tool to call.", "I have no shell tool."))
    answer = by_prompt(tok, {REASONING: replies(tok, "The output is back.", ANSWER)},
                       replies(tok, "My reasoning is gone.", "The reasoning was lost between the steps."))

    def script(prompt, response):
        return (answer if "TOOL-OUTPUT-42" in tok.decode(prompt) else calls)(prompt, response)

    return script


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
    model = ScriptedModel(tool_loop(tok), tok.encode(HEADER))
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


def test_claude_code_runs_a_tool_loop_through_the_messages_api(served, tmp_path):
    claude = agent("claude")
    if claude is None:
        pytest.skip("Claude Code is not installed (npm install --prefix .agents @anthropic-ai/claude-code)")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **readme_env(port_of(served))}
    assert env["ANTHROPIC_BASE_URL"] == served.url
    done = subprocess.run([claude, "-p", "Run the marker command, then tell me", "--model", "qwen3",
                           "--allowedTools", "Bash(echo:*)"], env=env, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ANSWER in done.stdout


def test_codex_runs_a_tool_loop_through_the_responses_api(served, tmp_path):
    codex = agent("codex")
    if codex is None:
        pytest.skip("Codex CLI is not installed (npm install --prefix .agents @openai/codex)")
    home = tmp_path / "codex"
    home.mkdir()
    (home / "config.toml").write_text(readme_codex_config(port_of(served)))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CODEX_HOME": str(home)}
    # No sandbox: Codex's bubblewrap needs namespaces a container may not give; echo is all it runs.
    done = subprocess.run([codex, "exec", "--skip-git-repo-check", "-s", "danger-full-access", "-m", "qwen3",
                           "Run the marker command, then tell me"], env=env,
                          cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ANSWER in done.stdout
