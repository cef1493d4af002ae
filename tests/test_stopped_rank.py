"""A rank stopped with SIGSTOP (what a sleeping Mac or a pulled cable looks like: silence, no error) under
`serve`, `generate -p` and `chat` on two ring ranks (issue 33): every rank that can still run ends within
--watchdog + 5 s with exit status 1 and one line naming the silent rank; the server's stream in flight gets
an error event then [DONE], and every request until it exits a 503; an idle server ends as soon, and the
request that meets the stopped rank ends within the bound.

The ranks are started as test_parallel_entry starts them (Launch): each in a process group of its own,
every group killed (SIGKILL ends a stopped process too) when the test ends, failed or not.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest
from checkpoints import make_checkpoint
from server_live import free_port
from test_parallel_entry import NO_THINK, Launch, stream

WATCHDOG = 3
BOUND = WATCHDOG + 5  # what the issue allows: the watchdog's seconds + 5
SILENT = (f"error: rank 0: no answer from rank 1 for {WATCHDOG} s; it is stopped, asleep or unreachable "
          f"(or died): ending this one")
LONG = ["--temp", "0", "-m", "4000", "--no-think"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Tiny, fp32, with the real tokenizer: 2 layers, 2 KV heads (test_parallel_entry's)."""
    return make_checkpoint(tmp_path_factory.mktemp("stopped") / "ckpt", tokenizer=True, seed=3)


def until(condition, seconds: float, launch: Launch) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline and launch.procs[0].poll() is None, launch.err(0) + launch.err(1)
        time.sleep(0.05)


def stop(launch: Launch) -> float:
    launch.procs[1].send_signal(signal.SIGSTOP)
    return time.monotonic()


def ended(launch: Launch, since: float) -> float:
    """Seconds from `since` until rank 0 ended with status 1 (rank 1, stopped, is left to the test's end)."""
    code = launch.procs[0].wait(BOUND + 10)
    took = time.monotonic() - since
    assert code == 1, launch.err(0)
    return took


def up(url: str, launch: Launch) -> None:
    def answers() -> bool:
        try:
            return httpx.get(url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    until(answers, 120, launch)


def refused_until_exit(url: str, launch: Launch) -> list[int]:
    """The status of every request sent (a chat completion, /health in turn) until rank 0 exits."""
    statuses, body = [], {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **NO_THINK}
    while launch.procs[0].poll() is None:
        try:
            if len(statuses) % 2:
                statuses.append(httpx.get(url + "/health", timeout=BOUND).status_code)
            else:
                statuses.append(httpx.post(url + "/v1/chat/completions", json=body, timeout=BOUND).status_code)
        except httpx.TransportError:  # the port closed: the process is ending
            break
        time.sleep(0.02)
    return statuses


def serve_args(checkpoint, port: int, mode: str) -> list[str]:
    return ["serve", "--model", str(checkpoint), "--served-model-name", "m", "--port", str(port), "--parallel", mode,
            "--watchdog", str(WATCHDOG)]


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_a_rank_stopped_mid_stream_ends_the_served_run_with_an_error_event_then_503s(checkpoint, tmp_path, mode):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Launch(tmp_path / "run", *serve_args(checkpoint, port, mode)) as launch:
        up(url, launch)
        stopped: list[float] = []
        events = stream(url, lines=None, on_line=lambda n: n == 3 and stopped.append(stop(launch)))
        streamed = time.monotonic() - stopped[0]
        statuses = refused_until_exit(url, launch)
        took = ended(launch, stopped[0])
    assert took < BOUND and streamed < BOUND, (took, streamed)
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["message"] == f"generation failed: {SILENT.removeprefix('error: ')}"
    assert events[-1] == "data: [DONE]"
    assert set(statuses) <= {503}, statuses
    assert [line for line in launch.err(0).splitlines() if line.startswith("error:")] == [SILENT]


def test_a_rank_stopped_while_the_server_is_idle_ends_it_and_the_next_request_within_the_bound(checkpoint, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Launch(tmp_path / "run", *serve_args(checkpoint, port, "tensor")) as launch:
        up(url, launch)
        stopped = stop(launch)
        body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, **NO_THINK}
        try:
            status = httpx.post(url + "/v1/chat/completions", json=body, timeout=BOUND + 10).status_code
        except httpx.TransportError:  # the server ended before it answered
            status = None
        answered = time.monotonic() - stopped
        took = ended(launch, stopped)
    assert status in (500, 503, None) and answered < BOUND, (status, answered)
    assert took < BOUND
    assert [line for line in launch.err(0).splitlines() if line.startswith("error:")] == [SILENT]


@pytest.mark.parametrize("command, stdin", [
    (["generate", "-p", "Count to a hundred"], b""),
    (["chat"], b"Count to a hundred\n"),
])
def test_a_rank_stopped_mid_answer_ends_generate_and_chat_within_the_bound(checkpoint, tmp_path, command, stdin):
    args = [command[0], "--model", str(checkpoint), *command[1:], *LONG, "--parallel", "pipeline",
            "--watchdog", str(WATCHDOG)]
    with Launch(tmp_path / "run", *args, stdin=stdin) as launch:
        until(lambda: len(launch.out(0)) > 20, 120, launch)  # answering
        took = ended(launch, stop(launch))
    assert took < BOUND
    assert launch.err(0).splitlines()[-1] == SILENT, launch.err(0)


def test_the_launch_helper_ends_a_stopped_rank_when_the_test_fails(checkpoint, tmp_path):
    launch = Launch(tmp_path / "run", "chat", "--model", str(checkpoint), "--parallel", "tensor", "--watchdog", "60")
    with pytest.raises(RuntimeError), launch:
        stop(launch)
        raise RuntimeError("a failing test")
    assert [p.returncode for p in launch.procs] == [-9, -9]
