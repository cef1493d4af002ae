"""Every shell and Python example of README.md and docs/*.md is run here, on tiny checkpoints, or listed in
SKIPPED with the reason it cannot run here. Only model names, example folders, the server's address and a
training run's length (600 steps become 2) are replaced; `qwen3-mlx` lines run in-process through click's CliRunner. The checkpoints' contexts are short
(40 tokens for the commands; the server caps replies at 24), so that responses asked for with thousands of tokens end at
the context, as they would at any limit."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from checkpoints import make_checkpoint
from retrieval_checkpoints import make_embedding_checkpoint, make_reranker_checkpoint
from click.testing import CliRunner
from server_live import ServeProcess

from qwen3_mlx.cli import main
from qwen3_mlx.cli.commands import convert

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEFAULT_MODEL = "mlx-community/Qwen3-1.7B-4bit"
LOCAL_MODEL = "./qwen3-1.7b-4bit"
HF_SOURCES = ("Qwen/Qwen3-1.7B", "./Qwen3-1.7B")
ADDRESS = "http://127.0.0.1:8080"
SUBPACKAGES = ("cli", "server", "distributed", "quantize", "training", "evaluation", "generation", "embedding",
               "checkpoint", "text", "model")
EMBEDDING, RERANKER = "Qwen/Qwen3-Embedding-0.6B", "Qwen/Qwen3-Reranker-0.6B"

# (page, a text that names the block): why it is not run here.
SKIPPED = {
    ("README.md", 'pip install -e ".[serve,test]"'):
        "installs the package and runs the whole suite (12 minutes): .ci/run runs exactly these two lines",
    ("README.md", "claude --model qwen3"): "needs Claude Code installed; tests/test_agents.py runs this line",
    ("README.md", "mlx.launch --hostfile"): "needs several Macs named in a hostfile",
    ("docs/generate.md", "hf download"): "downloads from the Hugging Face Hub",
    ("docs/anthropic.md", "claude --model qwen3"):
        "needs Claude Code installed; the same lines as the README's, which tests/test_agents.py runs",
    ("docs/distributed.md", "mlx.launch --hostfile"): "needs several Macs named in a hostfile",
    ("docs/distributed.md", "mlx.launch -n 2"):
        "two ranks of a 1.7B model; tests/test_parallel_entry.py runs generate on two ranks of a tiny one",
    ("docs/evaluation.md", "--tasks arc_easy,hellaswag"): "downloads lm-eval's datasets from the Hugging Face Hub",
    ("docs/evaluation.md", "--method mixed,gptq"):
        "a minute on the tiny checkpoint (KL's gradient over the whole vocabulary); tests/test_quantize.py runs mixed",
    ("docs/benchmarks.md", "benchmarks/bench.py make tiny"):
        "minutes to hours: full-size shapes (3.4 GB) timed against mlx-lm over several trials",
}

# (page, a text that names the block): the test that runs it.
RUN = {
    ("README.md", "qwen3-1.7b-4bit -q"): "test_the_convert_examples_run",
    ("README.md", 'generate -p "Why is the sky blue?"'): "test_the_generate_examples_run",
    ("README.md", "--regex"): "test_the_generate_examples_run",
    ("README.md", "qwen3-mlx chat"): "test_the_chat_example_runs",
    ("README.md", "--prompts-file prompts.txt"): "test_the_prompts_file_examples_run",
    ("README.md", "--served-model-name qwen3\n"): "test_the_server_examples_run",
    ("README.md", "from openai import OpenAI"): "test_the_server_examples_run",
    ("README.md", "from qwen3_mlx import load"): "test_the_python_api_examples_run",
    ("README.md", "qwen3-mlx embed"): "test_the_retrieval_examples_run",
    ("README.md", "qwen3-mlx train"): "test_the_fine_tuning_examples_run",
    ("README.md", "qwen3-mlx perplexity"): "test_the_evaluation_examples_run",
    ("README.md", "--port 11434"): "test_the_server_examples_run",
    ("docs/retrieval.md", "qwen3-mlx embed"): "test_the_retrieval_examples_run",
    ("docs/retrieval.md", "from qwen3_mlx import embed"): "test_the_retrieval_examples_run",
    ("docs/retrieval.md", "Qwen3-Embedding-0.6B --served-model-name embed"): "test_the_retrieval_server_examples_run",
    ("docs/retrieval.md", "client.embeddings.create"): "test_the_retrieval_server_examples_run",
    ("docs/retrieval.md", "Qwen3-Reranker-0.6B --served-model-name rerank"): "test_the_retrieval_server_examples_run",
    ("docs/fine-tuning.md", "qwen3-mlx train"): "test_the_fine_tuning_examples_run",
    ("docs/fine-tuning.md", "from qwen3_mlx import TrainingOptions"): "test_the_fine_tuning_examples_run",
    ("docs/evaluation.md", "qwen3-mlx perplexity"): "test_the_evaluation_examples_run",
    ("docs/evaluation.md", "from qwen3_mlx import load, perplexity"): "test_the_evaluation_examples_run",
    ("docs/evaluation.md", "--include-path tasks"): "test_the_evaluation_examples_run",
    ("docs/evaluation.md", "--method gptq"): "test_the_evaluation_examples_run",
    ("docs/serve.md", "--port 11434"): "test_the_server_examples_run",
    ("docs/serve.md", "from ollama import Client"): "test_the_server_examples_run",
    ("docs/serve.md", "/metrics"): "test_the_server_examples_run",
    ("docs/generate.md", "--thinking-budget 512 --verbose"): "test_the_generate_examples_run",
    ("docs/generate.md", "city.json"): "test_the_generate_examples_run",
    ("docs/generate.md", "--prompts-file prompts.txt"): "test_the_prompts_file_examples_run",
    ("docs/chat.md", "qwen3-mlx chat"): "test_the_chat_example_runs",
    ("docs/convert.md", "qwen3-mlx convert"): "test_the_convert_examples_run",
    ("docs/serve.md", "--thinking-budget 1024"): "test_the_server_examples_run",
    ("docs/serve.md", "/v1/chat/completions"): "test_the_server_examples_run",
    ("docs/serve.md", "from openai import OpenAI"): "test_the_server_examples_run",
    ("docs/anthropic.md", "import anthropic"): "test_the_server_examples_run",
    ("docs/responses.md", "client.responses.create"): "test_the_server_examples_run",
    ("docs/python-api.md", "from qwen3_mlx import GenerationOptions"): "test_the_python_api_examples_run",
    ("docs/python-api.md", "from qwen3_mlx import Engine"): "test_the_python_api_examples_run",
}


@dataclass(frozen=True)
class Block:
    page: str
    language: str
    body: str


def blocks(languages=("bash", "sh", "python")) -> list[Block]:
    """Every fenced block in those languages, dedented (some sit inside a list item)."""
    found = []
    for path in PAGES:
        text = path.read_text(encoding="utf-8")
        for _, language, body in re.findall(r"^( *)```(\w*)\n(.*?)^\1```", text, re.M | re.S):
            if language in languages:
                found.append(Block(str(path.relative_to(ROOT)), language, textwrap.dedent(body)))
    return found


def block(page: str, marker: str) -> str:
    [found] = [b.body for b in blocks() if b.page == page and marker in b.body]
    return found


# ---------------------------------------------------------------------------------------------- running

def logical_lines(body: str) -> list[list[str]]:
    """The block's commands as shell words, comments dropped; a quote may span lines (`echo '{...\n...}'`)."""
    commands, pending = [], ""
    for line in body.splitlines():
        pending += line + "\n"
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if words:
            commands.append(words)
        pending = ""
    assert not pending.strip(), f"an unclosed quote in:\n{body}"
    return commands


class Shell:
    """Runs the shell examples' few forms: `VAR=x cmd`, `echo`/`printf ... > FILE`, `a | b`, `cmd > FILE`,
    with `qwen3-mlx` and `python convert.py` in-process and `curl` as itself. Returns each command's stdout."""

    def __init__(self, cwd: Path, models: dict[str, str]) -> None:
        self.cwd, self.models = cwd, models

    def run(self, body: str) -> list[str]:
        return [self.command(words) for words in logical_lines(body)]

    def command(self, words: list[str]) -> str:
        words = [self.models.get(w, w) for w in words]
        target = None
        if ">" in words:
            words, target = words[: words.index(">")], words[words.index(">") + 1]
        stdin = None
        while "|" in words:
            stdin = self.simple(words[: words.index("|")], stdin)
            words = words[words.index("|") + 1:]
        out = self.simple(words, stdin)
        if target:
            (self.cwd / target).write_text(out, encoding="utf-8")
        return out

    def simple(self, words: list[str], stdin: str | None) -> str:
        env = {}
        while "=" in words[0] and not words[0].startswith("-"):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        name, *args = words
        if name == "echo":
            return " ".join(args) + "\n"
        if name == "printf":  # its format applied to each argument in turn, as the shell's printf does
            form = args[0].encode().decode("unicode_escape")
            return "".join(form % a for a in args[1:]) if args[1:] else form
        if name == "mkdir":
            for folder in (a for a in args if not a.startswith("-")):
                (self.cwd / folder).mkdir(parents=True, exist_ok=True)
            return ""
        if name == "qwen3-mlx":
            return self.click(main, [self.models.get(w, w) for w in with_model(args)], stdin, env)
        if name == "python" and args[0] == "convert.py":
            return self.click(convert, args[1:], stdin, env)
        if name == "curl":
            out = subprocess.run(words, capture_output=True, text=True, timeout=120, cwd=self.cwd)
            assert out.returncode == 0, out.stderr
            return out.stdout
        raise AssertionError(f"the docs test does not know how to run {name!r}")

    @staticmethod
    def click(command, args: list[str], stdin: str | None, env: dict[str, str]) -> str:
        result = CliRunner().invoke(command, args, input=stdin, env=env or None)
        # Exit 4 is docs/errors.md's: a random model's constrained answer cut by the context.
        cut = result.exit_code == 4 and "before it was complete" in result.stderr
        assert result.exit_code == 0 or cut, (args, result.output, result.exception)
        return result.stdout


def with_model(args: list[str]) -> list[str]:
    """A command that names no model names the checkpoint its block's DEFAULT_MODEL stands for; a training run
    of 600 steps takes 2."""
    if args[0] == "train" and "--iters" in args:
        args = [*args]
        args[args.index("--iters") + 1] = "2"
    if args[0] in ("generate", "chat") and "--model" not in args:
        return [args[0], "--model", DEFAULT_MODEL, *args[1:]]
    return args


@pytest.fixture(scope="module")
def short(tmp_path_factory) -> Path:
    """A tiny random Qwen3 with the real tokenizer and a context of 40 tokens (the longest prompt here takes 25)."""
    return make_checkpoint(tmp_path_factory.mktemp("short"), tokenizer=True, hidden_size=32, intermediate_size=64,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=40)


@pytest.fixture
def shell(short, tmp_path, monkeypatch) -> Shell:
    monkeypatch.chdir(tmp_path)
    return Shell(tmp_path, {DEFAULT_MODEL: str(short), LOCAL_MODEL: str(short)})


# ------------------------------------------------------------------------------------------------ tests

def test_every_example_is_run_or_says_why_not():
    for b in blocks():
        names = [key for key in (*RUN, *SKIPPED) if key[0] == b.page and key[1] in b.body]
        assert len(names) == 1, f"{b.page}: this block is named by {names}, not once:\n{b.body}"
    for page, marker in (*RUN, *SKIPPED):
        assert [b for b in blocks() if b.page == page and marker in b.body], f"{page}: no block holds {marker!r}"
    tests = {name for name in globals() if name.startswith("test_")}
    assert set(RUN.values()) <= tests


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as dashes."""
    titles = re.findall(r"^#+ (.*)$", path.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-") for title in titles}


def test_every_link_to_docs_resolves():
    for path in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#\s]*?\.md)?(?:#([^)\s]*))?\)", path.read_text(encoding="utf-8")):
            page = path.parent / target if target else path
            assert page.is_file(), f"{path.name} links to {target}, which is missing"
            assert not anchor or anchor in anchors(page), f"{path.name} links to {target}#{anchor}, not a heading"
    linked = set(re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text(encoding="utf-8")))
    assert linked == {f"docs/{p.name}" for p in PAGES[1:]}, "README's list should name every page of docs/"


def test_every_module_path_named_exists():
    """`qwen3_mlx.a.b.name` in the text imports, and `qwen3_mlx/x/` folders and files named exist."""
    import importlib

    for path in PAGES:
        text = path.read_text(encoding="utf-8")
        for dotted in set(re.findall(r"\bqwen3_mlx(?:\.\w+)+", text)):
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ModuleNotFoundError:
                    continue
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
                break
        for folder in re.findall(r"`(?:qwen3_mlx/)?((?:\w+/)+)`", text):
            if folder.split("/")[0] in SUBPACKAGES:
                assert (ROOT / "qwen3_mlx" / folder).is_dir(), f"{path.name} names {folder}, which is missing"
        for module in re.findall(r"`((?:\w+/)*\w+\.py)`", text):
            if module not in ("generate.py", "convert.py"):
                assert list((ROOT / "qwen3_mlx").glob(module)) or list((ROOT / "qwen3_mlx").rglob(module)) \
                    or (ROOT / module).exists(), f"{path.name} names {module}, which is missing"


def test_the_set_up_is_the_two_lines_ci_runs():
    """.ci/run installs exactly as the README says and runs its test command: the two lines stay these."""
    body = block("README.md", 'pip install -e ".[serve,test]"')
    assert body == ('python3 -m venv .venv && source .venv/bin/activate && pip install -e ".[serve,test]"\n'
                    "python -m pytest\n")


def test_the_generate_examples_run(shell):
    [plain, verbose] = shell.run(block("README.md", 'generate -p "Why is the sky blue?"'))
    assert plain and verbose
    [date] = shell.run(block("README.md", "--regex"))
    assert re.fullmatch(r"2025-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])", date.strip())
    shell.run(block("docs/generate.md", "--thinking-budget 512 --verbose"))
    _, _, date = shell.run(block("docs/generate.md", "city.json"))
    assert json.loads((shell.cwd / "city.json").read_text())["required"] == ["city", "population"]
    assert re.fullmatch(r"2025-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])", date.strip())


def test_the_verbose_figures_are_those_the_docs_show(short):
    """docs/generate.md shows the figures --verbose prints; each of its lines starts as shown."""
    shown = re.search(r"^```\n(prompt: .*?)```", (ROOT / "docs/generate.md").read_text(), re.M | re.S).group(1)
    result = CliRunner().invoke(main, ["generate", "--model", str(short), "-p", "Hi", "-m", "4", "--verbose"])
    assert result.exit_code == 0, result.output
    for line in shown.splitlines():
        assert re.search("^" + re.escape(line.split(":")[0] + ":"), result.stderr, re.M), line


def test_the_chat_example_runs(shell):
    for body in (block("README.md", "qwen3-mlx chat"), block("docs/chat.md", "qwen3-mlx chat")):
        [words] = logical_lines(body)
        words = [shell.models.get(w, w) for w in words]
        result = CliRunner().invoke(main, [*words[1:], "-m", "4"], input="Hello\n/stats\n/exit\n")
        assert result.exit_code == 0, result.output


def test_the_prompts_file_examples_run(shell):
    shell.run(block("README.md", "--prompts-file prompts.txt"))
    lines = (shell.cwd / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1]
    shell.run(block("docs/generate.md", "--prompts-file prompts.txt"))
    [result] = [json.loads(line) for line in (shell.cwd / "results.jsonl").read_text().splitlines()]
    shown = re.search(r"```json\n(.*?)```", (ROOT / "docs/generate.md").read_text(), re.S).group(1)
    shown = json.loads(shown)
    assert result.keys() == shown.keys() and result["usage"].keys() == shown["usage"].keys()
    assert result["custom_id"] == "q1"


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory) -> Path:
    """A tiny checkpoint in Hugging Face's layout whose matrices 4-bit groups of 64 divide."""
    return make_checkpoint(tmp_path_factory.mktemp("hf"), tokenizer=True, hidden_size=64, intermediate_size=128,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64)


def test_the_convert_examples_run(shell, hf_source):
    shell.models = {source: str(hf_source) for source in HF_SOURCES}  # ./qwen3-1.7b-4bit: the one just made
    shell.run(block("README.md", "qwen3-1.7b-4bit -q"))
    shutil.rmtree(shell.cwd / "qwen3-1.7b-4bit")
    outputs = shell.run(block("docs/convert.md", "qwen3-mlx convert"))
    assert len(outputs) == 4
    assert json.loads((shell.cwd / "qwen3-1.7b-q4" / "config.json").read_text())["quantization"]["bits"] == 4
    quantized = json.loads((shell.cwd / "qwen3-1.7b-4bit" / "config.json").read_text())["quantization"]
    assert quantized["bits"] == 4 and quantized["group_size"] == 64
    assert "quantization" not in json.loads((shell.cwd / "qwen3-1.7b-float" / "config.json").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The docs' server line, run as written (the model replaced, on a free port), with one option added:
    `--max-tokens 24`, a cap that ends every reply early (a random model runs to its limit), so that the
    Responses example's second turn, which holds the first, fits the context of 96."""
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("served"), tokenizer=True, hidden_size=32,
                                 intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=96)
    [words] = logical_lines(block("docs/serve.md", "--thinking-budget 1024"))
    [readme] = logical_lines(block("README.md", "--served-model-name qwen3\n"))
    assert readme == words[:6]  # the README's line, with the budget the reference adds
    assert words[:4] == ["qwen3-mlx", "serve", "--model", LOCAL_MODEL]
    with ServeProcess(checkpoint, *words[4:], "--max-tokens", "24") as process:
        yield process


def test_the_server_examples_run(server, tmp_path, capsys):
    def python(page: str, marker: str) -> None:
        exec(block(page, marker).replace(ADDRESS, server.url), {})
        assert capsys.readouterr().out

    python("README.md", "from openai import OpenAI")
    python("docs/serve.md", "from openai import OpenAI")
    python("docs/anthropic.md", "import anthropic")
    python("docs/responses.md", "client.responses.create")
    if shutil.which("curl"):
        shell = Shell(tmp_path, {ADDRESS + path: server.url + path for path in ("/v1/chat/completions", "/metrics")})
        [out] = shell.run(block("docs/serve.md", "/v1/chat/completions"))
        assert json.loads(out)["object"] == "chat.completion"
        [out] = shell.run(block("docs/serve.md", "/metrics"))
        assert re.search(r'^qwen3_mlx_requests_total\{.*route="/v1/chat/completions".*\} [1-9]', out, re.M)
    # Ollama's set-up is the README's server line on Ollama's port (the test's server has a free port instead).
    [readme] = logical_lines(block("README.md", "--served-model-name qwen3\n"))
    for page in ("README.md", "docs/serve.md"):
        assert logical_lines(block(page, "--port 11434")) == [[*readme, "--port", "11434"]]
    exec(block("docs/serve.md", "from ollama import Client").replace("http://127.0.0.1:11434", server.url), {})
    assert "qwen3:latest" in capsys.readouterr().out


def test_the_python_api_examples_run(short, capsys):
    for page, marker in (("README.md", "from qwen3_mlx import load"),
                         ("docs/python-api.md", "from qwen3_mlx import GenerationOptions")):
        exec(block(page, marker).replace(f'"{DEFAULT_MODEL}"', repr(str(short))), {})
        assert capsys.readouterr().out
    from qwen3_mlx import load

    model, tokenizer = load(short)
    exec(block("docs/python-api.md", "from qwen3_mlx import Engine"), {"model": model, "tokenizer": tokenizer})
    assert capsys.readouterr().out


def test_the_agents_set_ups_in_docs_are_the_readmes():
    """tests/test_agents.py runs the README's Claude Code line and Codex config; the docs repeat them as they are."""
    assert block("docs/anthropic.md", "claude --model qwen3") == block("README.md", "claude --model qwen3")
    [readme] = [b.body for b in blocks(("toml",)) if b.page == "README.md"]
    [docs] = [b.body for b in blocks(("toml",)) if b.page == "docs/responses.md"]
    assert docs == readme


@pytest.fixture(scope="module")
def retrieval_models(tmp_path_factory) -> dict[str, str]:
    """Tiny Qwen3-Embedding and Qwen3-Reranker checkpoints (one layer, hidden 64) for the retrieval pages."""
    return {EMBEDDING: str(make_embedding_checkpoint(tmp_path_factory.mktemp("emb"), num_hidden_layers=1)),
            RERANKER: str(make_reranker_checkpoint(tmp_path_factory.mktemp("rr"), num_hidden_layers=1))}


def test_the_retrieval_examples_run(shell, retrieval_models, capsys):
    shell.models = retrieval_models
    for page in ("README.md", "docs/retrieval.md"):
        _, _, ranked = shell.run(block(page, "qwen3-mlx embed"))
        vectors = [json.loads(line) for line in (shell.cwd / "vectors.jsonl").read_text().splitlines()]
        texts = (shell.cwd / "docs.txt").read_text().splitlines()
        assert [v["index"] for v in vectors] == list(range(len(texts))) and len(vectors[0]["embedding"]) == 64
        assert len(ranked.splitlines()) == min(len(texts), 2)
    code = block("docs/retrieval.md", "from qwen3_mlx import embed")
    for name, path in retrieval_models.items():
        code = code.replace(f'"{name}"', repr(path))
    exec(code, {})
    assert capsys.readouterr().out


def test_the_retrieval_server_examples_run(retrieval_models, tmp_path, capsys):
    """Each retrieval server as its line starts it (the model replaced, on a free port), asked as the page asks."""
    for marker, ask in (("--served-model-name embed", "client.embeddings.create"),
                        ("--served-model-name rerank", "/v1/rerank")):
        words = logical_lines(block("docs/retrieval.md", marker))[0]
        port = words.index("--port")
        address = f"http://127.0.0.1:{words[port + 1]}"
        with ServeProcess(retrieval_models[words[3]], *words[4:port], *words[port + 2:]) as process:
            body = block("docs/retrieval.md", ask)
            if "client." in body:
                exec(body.replace(address, process.url), {})
                assert capsys.readouterr().out.startswith("2 64 ")
            elif shutil.which("curl"):
                shell = Shell(tmp_path, {f"{address}/v1/rerank": f"{process.url}/v1/rerank"})
                [out] = shell.run("\n".join(body.splitlines()[1:]))
                assert [r["index"] for r in json.loads(out)["results"]] != []


@pytest.fixture(scope="module")
def trainable(tmp_path_factory) -> Path:
    """A tiny checkpoint of 16 layers, mlx_lm.lora's default --num-layers."""
    return make_checkpoint(tmp_path_factory.mktemp("train"), tokenizer=True, hidden_size=32, intermediate_size=64,
                           num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=16,
                           max_position_embeddings=64)


def test_the_fine_tuning_examples_run(shell, trainable, capsys):
    """The page's data lines are the data; the README's commands, which the page repeats, train 2 steps, then
    generate with the adapters and fuse them; the Python example trains 2 steps of DoRA."""
    shell.models = {"Qwen/Qwen3-1.7B": str(trainable)}
    shown = re.search(r"```json\n(.*?)```", (ROOT / "docs/fine-tuning.md").read_text(), re.S).group(1)
    (shell.cwd / "data").mkdir()
    for split in ("train", "valid"):
        (shell.cwd / "data" / f"{split}.jsonl").write_text(shown)
    assert block("docs/fine-tuning.md", "qwen3-mlx train") == block("README.md", "qwen3-mlx train")
    shell.run(block("README.md", "qwen3-mlx train"))
    assert (shell.cwd / "adapters" / "adapters.safetensors").is_file()
    assert (shell.cwd / "qwen3-1.7b-tuned" / "model.safetensors").is_file()
    code = block("docs/fine-tuning.md", "from qwen3_mlx import TrainingOptions")
    exec(code.replace('"Qwen/Qwen3-1.7B"', repr(str(trainable))).replace("iters=600", "iters=2"), {})
    assert capsys.readouterr().out


def test_the_evaluation_examples_run(shell, hf_source, capsys):
    """Perplexity on a short held-out text, a local lm-eval task, and GPTQ and AWQ on a calibration text of
    some 600 tokens (their one sample takes 512)."""
    shell.models = {source: str(hf_source) for source in (*HF_SOURCES, LOCAL_MODEL)}
    lines = [f"Line {i}: the tree holds {i * 7 % 13} birds." for i in range(60)]
    (shell.cwd / "wiki.train.txt").write_text(" ".join(lines))
    (shell.cwd / "wiki.test.txt").write_text(" ".join(lines[:3]))
    for page in ("README.md", "docs/evaluation.md"):
        out = shell.run(block(page, "qwen3-mlx perplexity"))[0]
        assert re.fullmatch(r"perplexity [\d.]+ \(nll [\d.]+ over \d+ tokens\)\n", out)
    exec(block("docs/evaluation.md", "from qwen3_mlx import load, perplexity").replace(
        f'"{DEFAULT_MODEL}"', repr(str(hf_source))), {})
    assert "tokens" in capsys.readouterr().out
    if importlib.util.find_spec("lm_eval"):
        *_, table = shell.run(block("docs/evaluation.md", "--include-path tasks"))
        assert "even" in table and "acc" in table
    shutil.rmtree(shell.cwd / "qwen3-1.7b-gptq")  # the README's block wrote it
    outputs = shell.run(block("docs/evaluation.md", "--method gptq"))
    assert len(outputs) == 2 and all(out.startswith("wrote qwen3-1.7b-") for out in outputs)
