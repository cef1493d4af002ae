"""The entry points under mlx.launch (issue 21): `generate -p`, `--prompts-file`, `chat` and `serve` on two
ring ranks, each against one process on the same checkpoint (fp32, greedy or seeded).

Ranks are started as mlx.launch starts them (MLX_HOSTFILE, a ring hostfile on free localhost ports,
MLX_RANK), each running `python -m qwen3_mlx ...` with a stdin that, like the launcher's pipe, never
ends; mlx.launch's exit status says nothing of its ranks', so each rank's own exit status and output
are checked. Every rank is killed in the end. Five runs: generate in tensor and pipeline mode, a
prompts file, a chat, and one server that answers, loses a client and then a rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from checkpoints import make_checkpoint
from click.testing import CliRunner
from server_live import LiveServer, free_port
from test_parallel import free_ports

from qwen3_mlx.cli import commands as cli
from qwen3_mlx.distributed.launch import ErrorLines
from qwen3_mlx.distributed.wire import request_from_json, request_json
from qwen3_mlx.generation.engine import Engine
from qwen3_mlx.checkpoint.loader import load
from qwen3_mlx.generation.options import GenerationOptions
from qwen3_mlx.text.prompt import Prompt
from qwen3_mlx.server import ServerSettings, create_app

GREEDY = ["--temp", "0", "-m", "12", "--no-think"]
# Seconds, the server's: how soon a stopped rank would end it. Generous: on a loaded 2-core machine (CI,
# with the single-process server of the same test beside it) a rank waited over 5 s for the other's first
# compiled steps. The rank killed at the end is seen at once as a lost connection, so this costs no time.
WATCHDOG = 30
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


class Launch:
    """n ranks of `qwen3-mlx ARGS` started as mlx.launch starts them; `stdin` written to every rank (the
    launcher copies its input to all) through a pipe left open. Each rank in a process group of its own,
    every group killed on exit."""

    def __init__(self, folder: Path, *args: str, n: int = 2, stdin: bytes = b"") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.args, self.n, self.stdin = folder, args, n, stdin

    def __enter__(self) -> Launch:
        hosts = self.folder / "hosts.json"
        hosts.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(self.n)]))
        self.procs = []
        for r in range(self.n):
            env = {**os.environ, "MLX_HOSTFILE": str(hosts), "MLX_RANK": str(r), "PYTHONUNBUFFERED": "1"}
            with open(self.folder / f"out{r}", "wb") as out, open(self.folder / f"err{r}", "wb") as err:
                proc = subprocess.Popen([sys.executable, "-m", "qwen3_mlx", *self.args], stdin=subprocess.PIPE,
                                        stdout=out, stderr=err, env=env, cwd=self.folder, start_new_session=True)
            proc.stdin.write(self.stdin)
            proc.stdin.flush()
            self.procs.append(proc)
        return self

    def wait(self, timeout: float) -> list[int | None]:
        """Each rank's exit status once all have ended, or None for those still running after `timeout`."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        return [p.poll() for p in self.procs]

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:  # each rank's group: the rank and any process it started (SIGKILL ends a stopped one)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            p.stdin.close()

    def out(self, r: int) -> str:
        return (self.folder / f"out{r}").read_text(encoding="utf-8")

    def err(self, r: int) -> str:
        return (self.folder / f"err{r}").read_text(encoding="utf-8")


def run_ranks(folder: Path, *args: str, stdin: bytes = b"", timeout: float = 120) -> Launch:
    with Launch(folder, *args, stdin=stdin) as launch:
        codes = launch.wait(timeout)
    assert codes == [0, 0], f"{codes}\nrank 0: {launch.err(0)[-3000:]}\nrank 1: {launch.err(1)[-3000:]}"
    return launch


def one_process(*args: str, input: str | None = None) -> str:
    result = CliRunner().invoke(cli.main, list(args), input=input)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Tiny, fp32, with the real tokenizer (its template's ids): 4 heads and 2 KV heads, 2 layers."""
    return make_checkpoint(tmp_path_factory.mktemp("entry") / "ckpt", tokenizer=True, seed=3)


# ---------------------------------------------------------------- generate, a prompts file, chat


def test_generate_on_two_tensor_ranks_prints_what_one_process_prints(checkpoint, tmp_path):
    args = ["generate", "--model", str(checkpoint), "-p", "Hello there", *GREEDY]
    # The model drafting for itself, split as the model is: the tokens of one plain process.
    launch = run_ranks(tmp_path / "run", *args, "--parallel", "tensor", "--draft-model", str(checkpoint))
    assert launch.out(0) == one_process(*args)
    assert len(launch.out(0)) > 12  # twelve tokens of text
    assert (launch.out(1), launch.err(1), launch.err(0)) == ("", "", "")  # rank 0 alone writes


def test_generate_on_two_pipeline_ranks_reads_stdin_up_to_an_empty_line(checkpoint, tmp_path):
    args = ["generate", "--model", str(checkpoint), *GREEDY, "-v"]
    launch = run_ranks(tmp_path / "run", *args, "-p", "-", "--parallel", "pipeline", "--prompt-lookup",
                       stdin=b"Hello there\nsecond line\n\nnot read\n")
    assert launch.out(0) == one_process(*args, "-p", "-", "--prompt-lookup", input="Hello there\nsecond line\n")
    assert "prompt: " in launch.err(0) and "finish: length" in launch.err(0)  # -v's figures, on rank 0
    assert (launch.out(1), launch.err(1)) == ("", "")


def test_a_prompts_file_on_two_ranks_gives_the_results_of_one_process(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Hello there"}]},
            {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 5, "custom_id": "b"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
             "temp": 0.8, "seed": 7}]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["generate", "--model", str(checkpoint), "--prompts-file", str(prompts), *GREEDY]
    # Drafting by prompt lookup in the ranks' batch: the results of one process that drafts alike.
    launch = run_ranks(tmp_path / "run", *args, "-o", "out.jsonl", "--parallel", "pipeline", "--prompt-lookup")
    results = (tmp_path / "run" / "out.jsonl").read_text()
    assert results == one_process(*args, "--prompt-lookup")
    assert [json.loads(line).get("custom_id") for line in results.splitlines()] == [None, "b", None]
    assert (launch.out(0), launch.out(1), launch.err(1)) == ("", "", "")  # the file, written by rank 0


def test_chat_on_two_ranks_answers_line_by_line_and_refuses_save(checkpoint, tmp_path):
    args = ["chat", "--model", str(checkpoint), *GREEDY]
    launch = run_ranks(tmp_path / "run", *args, "--parallel", "tensor",
                       stdin=b"Hello there\n/save chat.cache\nAnd again\n/exit\n")  # the pipe itself never ends
    assert launch.out(0) == one_process(*args, input="Hello there\nAnd again\n")
    assert launch.err(0) == "error: /save does not go with --parallel: each rank holds only its part of the cache\n"
    assert (launch.out(1), launch.err(1)) == ("", "")
    assert not (tmp_path / "run" / "chat.cache").exists()


def test_what_does_not_go_with_parallel_is_refused_in_one_line(checkpoint, monkeypatch):
    model = ["--model", str(checkpoint)]
    cases = [
        (["generate", *model, "-p", "hi", "--parallel", "tensor", "--prompt-cache", "c"],
         "--prompt-cache does not go with --parallel: each rank holds only its part of the cache; leave it out"),
        (["chat", *model, "--parallel", "pipeline", "--draft-model", "d"],
         "--draft-model does not go with --parallel pipeline: its steps would wait on each other across the ranks; "
         "use --parallel tensor, or --prompt-lookup"),
        (["generate", *model, "-p", "hi", "--parallel", "tensor", "--layers-per-rank", "1,1"],
         "--layers-per-rank applies to --parallel pipeline only"),
        (["serve", *model, "--parallel", "pipeline", "--layers-per-rank", "1,x"],
         "Invalid value for '--layers-per-rank': '1,x': one number a rank, separated by commas, e.g. 10,18"),
    ]
    for args, line in cases:
        result = CliRunner().invoke(cli.main, args)
        assert (result.exit_code, result.stderr.splitlines()[-1]) == (2, f"Error: {line}"), args
    monkeypatch.setenv("MLX_RANK", "0")  # under a launcher, without --parallel
    result = CliRunner().invoke(cli.main, ["generate", *model, "-p", "hi"])
    assert result.stderr.splitlines()[-1] == ("Error: this process was started by a launcher (mlx.launch): give "
                                              "--parallel tensor or --parallel pipeline, or run it without the launcher")


# ---------------------------------------------------------------- serve


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    """As `checkpoint`, with 3 layers: a pipeline of 2 ranks holds 2 and 1, so their caches differ in size."""
    return make_checkpoint(tmp_path_factory.mktemp("entry") / "three", tokenizer=True, seed=4, num_hidden_layers=3)


@pytest.fixture(scope="module")
def alone(three):
    """One process serving the checkpoint: what the ranks must answer."""
    with Engine(*load(three), max_batch=8) as engine, LiveServer(create_app(engine, ServerSettings(("m",)))) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)


REQUESTS = [  # (messages, sampling)
    ([{"role": "user", "content": "Hello there"}], {"temperature": 0}),
    ([{"role": "user", "content": "Why is the sky blue?"}], {"temperature": 0}),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], {"temperature": 0.8, "seed": 5}),
]


def ask(client: openai.OpenAI, messages: list, sampling: dict) -> str:
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=12, extra_body=NO_THINK, **sampling)
    return reply.choices[0].message.content


def together(client: openai.OpenAI) -> list[str]:
    """The REQUESTS sent at once, so that the server batches them."""
    answers: list = [None] * len(REQUESTS)
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, ask(client, *REQUESTS[i])))
               for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers


def stream(url: str, lines: int | None, on_line=None) -> list[str]:
    """A streamed request's event lines: the first `lines` (then the client goes away), or all."""
    body = {"model": "m", "messages": [{"role": "user", "content": "Count to a hundred"}], "stream": True,
            "max_tokens": 2000, "temperature": 0, **NO_THINK}
    seen = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line:
                seen.append(line)
                if on_line is not None:
                    on_line(len(seen))
            if lines is not None and len(seen) >= lines:
                break
    return seen


def rows(url: str) -> int:
    return httpx.get(url + "/health", timeout=10).json()["rows"]


def test_serve_on_two_ranks_answers_as_one_process_frees_a_gone_clients_row_and_ends_when_a_rank_dies(
        three, alone, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A prefix store of about one prompt: the ranks, whose entries differ in size, must keep and drop the same
    # ones (each round checks it) while every request's prompt goes in and out of it.
    args = ["serve", "--model", str(three), "--served-model-name", "m", "--port", str(port), "--prompt-cache-gb",
            "0.00002", "--parallel", "pipeline", "--watchdog", str(WATCHDOG)]
    with Launch(tmp_path / "run", *args) as launch:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and launch.wait(0) == [None, None], launch.err(0) + launch.err(1)
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=60)
        assert together(client) == together(alone)
        assert [ask(client, *request) for request in REQUESTS[::-1]] == [ask(alone, *r) for r in REQUESTS[::-1]]

        assert len(stream(url, lines=3)) == 3  # then the client goes away, mid-answer
        deadline = time.monotonic() + 30
        while rows(url) and time.monotonic() < deadline:  # rank 0's row; rank 1 checks its own each round
            time.sleep(0.05)
        assert rows(url) == 0
        assert ask(client, *REQUESTS[0]) == ask(alone, *REQUESTS[0])  # the ranks' batches still agree

        events = stream(url, lines=None, on_line=lambda n: n == 3 and launch.procs[1].kill())
        codes = launch.wait(WATCHDOG + 20)
    assert codes == [1, -9], launch.err(0)
    error = json.loads(events[-2].removeprefix("data: "))["error"]  # the request in flight ends with an error
    assert error["message"].startswith("generation failed: rank 0: ")
    assert events[-1] == "data: [DONE]"
    last = launch.err(0).splitlines()[-1]
    # A dead peer is seen at once, as a lost connection; when the ring leaves rank 0's step waiting, the watchdog
    # ends it after its seconds.
    assert last.startswith(("error: rank 0: lost the connection to the other ranks ([ring]",
                            f"error: rank 0: no answer from rank 1 for {WATCHDOG} s;")), last
    assert launch.err(1) == ""


# ---------------------------------------------------------------- pieces


def test_a_request_travels_to_the_other_ranks_as_json_and_back_unchanged():
    prompt = Prompt([{"role": "user", "content": "hi"}], system="s", tools=({"type": "function",
                    "function": {"name": "f", "parameters": {"type": "object"}}},), prefill_response="Well")
    options = GenerationOptions(temp=0.7, top_k=5, stop=("END",), seed=2**63, logit_bias={3: -1.5, 7: 2.0},
                                json_schema={"type": "object"}, thinking_budget=8, max_total_tokens=30, logprobs=2)
    data = json.loads(json.dumps(request_json(prompt, options)))
    back_prompt, back_options = request_from_json(data)
    assert back_options == options and back_options.logit_bias == options.logit_bias
    assert back_options.json_schema == options.json_schema
    assert (back_prompt.content, back_prompt.system, back_prompt.prefill_response) == (
        list(prompt.content), "s", "Well")
    assert back_prompt.tools == [dict(prompt.tools[0])]
    ids_prompt, _ = request_from_json(json.loads(json.dumps(request_json(Prompt([1, 2, 3], raw=True), options))))
    assert (ids_prompt.content, ids_prompt.raw) == ([1, 2, 3], True)


def test_a_pydantic_schema_travels_as_its_json_schema():
    pydantic = pytest.importorskip("pydantic")

    class Answer(pydantic.BaseModel):
        city: str

    data = request_json(Prompt("hi"), GenerationOptions(json_schema=Answer))
    assert request_from_json(data)[1].json_schema == Answer.model_json_schema()


def test_the_other_ranks_write_only_their_error_lines_naming_themselves():
    class Sink:
        text = ""

        def write(self, text):
            self.text += text

        def flush(self):
            pass

    sink = Sink()
    lines = ErrorLines(sink, 1)
    lines.write("\rprefill 10/20 tokens")
    lines.write("warning: greedy\nerror: the prompt is empty; give some text\nerror: rank 1: lost it\n")
    lines.write("Error: No such option: --x\n")
    assert sink.text == ("error: rank 1: the prompt is empty; give some text\nerror: rank 1: lost it\n"
                         "Error: rank 1: No such option: --x\n")
    lines.write("Traceback (most recent call last):\n  File x\n")
    assert sink.text.endswith("Traceback (most recent call last):\n  File x\n")
