"""The `serve` command in a subprocess: a busy port fails before the model loads; --served-model-name;
SIGTERM and Ctrl-C drain (new requests get a 503, running ones finish); when the grace runs out, or on a
second Ctrl-C, every request in flight still ends as a well-formed OpenAI response or stream."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from server_live import ServeProcess

HI = [{"role": "user", "content": "Hello there"}]
NO_END = {"151645": -100, "151643": -100}  # <|im_end|> and <|endoftext|> banned: the reply runs to its cap
SHUTTING_DOWN = {"message": "the server is shutting down and takes no new requests; send the request again once it "
                            "is back", "type": "server_error", "param": None, "code": "shutting_down"}
CUT = {"message": "the server shut down before the reply was finished; send the request again once it is back",
       "type": "server_error", "param": None, "code": "shutting_down"}


def wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def draining(url: str) -> bool:
    return httpx.get(url + "/health").status_code == 503


def rows(url: str) -> int:
    return httpx.get(url + "/health").json()["rows"]


def test_a_busy_port_fails_in_one_line_before_the_model_loads():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "qwen3_mlx", "serve", "--model", "/no/such/model", "--port",
                              str(port)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith(f"error: --port {port}: cannot listen on 127.0.0.1:{port} (")
    assert run.stderr.endswith("); stop what uses it, or give another --port or --host\n")
    assert run.stderr.count("\n") == 1


def test_served_model_names_replace_the_path_in_every_response(tiny_checkpoint):
    with ServeProcess(tiny_checkpoint, "--served-model-name", "qwen3", "--served-model-name", "q/1") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["qwen3"]
        assert client.models.retrieve("q/1").id == "qwen3"
        reply = client.chat.completions.with_raw_response.create(model="q/1", messages=HI, max_tokens=2)
        assert reply.parse().model == "qwen3"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=str(tiny_checkpoint), messages=HI, max_tokens=2)
        seen = reply.text + httpx.get(server.url + "/v1/models").text + httpx.get(server.url + "/health").text
        assert str(tiny_checkpoint) not in seen


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_lets_the_running_request_finish(tiny_checkpoint, sig, code):
    with ServeProcess(tiny_checkpoint, "--max-tokens", "120") as server:
        long = {"messages": HI, "stream": True, "max_tokens": 120, "logit_bias": NO_END}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=long, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            server.proc.send_signal(sig)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]][-1] == "length"  # finished
        assert server.proc.wait(30) == code, server.log()
        assert "Traceback" not in server.log()


def whole_reply(url: str, out: dict) -> None:
    body = {"messages": HI, "max_tokens": 4000, "logit_bias": NO_END}
    out["response"] = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize(("args", "signals", "code"), [
    (["--grace", "3"], [signal.SIGTERM], 0),  # the grace runs out
    (["--grace", "60"], [signal.SIGINT, signal.SIGINT], 130),  # Ctrl-C twice
], ids=["grace-over", "double-ctrl-c"])
def test_new_requests_get_a_503_and_cancelled_ones_end_with_openai_errors(tiny_checkpoint, args, signals, code):
    with ServeProcess(tiny_checkpoint, "--max-tokens", "4000", *args) as server:
        whole: dict = {}
        thread = threading.Thread(target=whole_reply, args=(server.url, whole))
        stream = {"messages": HI, "stream": True, "max_tokens": 4000, "logit_bias": NO_END}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=stream, timeout=60) as response:
            thread.start()
            wait_for(lambda: rows(server.url) == 2)
            server.proc.send_signal(signals[0])
            wait_for(lambda: draining(server.url))
            late = httpx.post(server.url + "/v1/chat/completions", json={"messages": HI}, timeout=10)
            for sig in signals[1:]:
                server.proc.send_signal(sig)
            lines = [line for line in response.iter_lines() if line]
        thread.join(60)
        assert late.status_code == 503 and late.json() == {"error": SHUTTING_DOWN}  # not a refused connection
        assert whole["response"].status_code == 503 and whole["response"].json() == {"error": CUT}
        assert lines[-2:] == [f"data: {json.dumps({'error': CUT}, separators=(',', ':'))}", "data: [DONE]"]
        assert all(json.loads(x[6:])["choices"][0]["finish_reason"] is None for x in lines[:-2])
        assert server.proc.wait(30) == code, server.log()
        log = server.log()
        assert "Traceback" not in log and "CancelledError" not in log, log

