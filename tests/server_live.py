"""Live servers for the server tests: an app served by uvicorn in a thread, or `qwen3-mlx serve` in a
subprocess, each on a free port; the app built as `serve` builds it (served), over an engine or the
scripted stub model (stub_server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn
from stubs import ScriptedModel, by_prompt, replies

from qwen3_mlx.generation.engine import Engine
from qwen3_mlx.server import ServerSettings, create_app


class LiveServer:
    """Serves `app` on 127.0.0.1 from a thread until `stop()`; `url` is its address."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`qwen3-mlx serve` in a subprocess on a free port, up once /health answers; killed on exit if still
    running. `url`, `proc`, and `log()`: what it printed (stdout and stderr), once it has ended."""

    def __init__(self, checkpoint, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "qwen3_mlx", "serve", "--model", str(checkpoint),
                        "--port", str(self.port), *args]
        self.output = tempfile.TemporaryFile()

    def __enter__(self):
        # The server's default secret key is created under the cache folder: a test's, not the user's.
        self.cache = tempfile.TemporaryDirectory()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": self.cache.name}
        self.proc = subprocess.Popen(self.command, env=env, stdout=self.output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"qwen3-mlx serve did not start:\n{self.log()}")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.cache.cleanup()

    def log(self) -> str:
        self.output.seek(0)
        return self.output.read().decode(errors="replace")


# ---------------------------------------------------------------- apps as `serve` builds them


HEADER = "<|im_start|>assistant\n"  # a response is what the model writes after this
REASONING = "Let me think about it carefully. The user asks for a sum."
ANSWER = "The answer is 4."


def served(engine, *names: str, response_store=None, **settings) -> LiveServer:
    """A live server over `engine`, its app built as `serve` builds it: create_app from a ServerSettings
    (`names`: --served-model-name's; `settings`: the other fields, max_tokens=... for --max-tokens)."""
    return LiveServer(create_app(engine, ServerSettings(names, **settings), response_store=response_store))


@contextmanager
def stub_server(tok, calls: str, *, reasoning: str = REASONING, answer: str = ANSWER, **settings):
    """A live server named "stub" over the scripted model (4 rows): it reasons then answers or, asked
    about the weather, writes `calls` (tool-call blocks) after a short reasoning."""
    script = by_prompt(tok, {"weather": replies(tok, "I should call the tools.", calls)}, replies(tok, reasoning, answer))
    with Engine(ScriptedModel(script, tok.encode(HEADER)), tok, max_batch=4) as engine, \
            served(engine, "stub", **settings) as server:
        yield server


# ---------------------------------------------------------------- fuzzing from the schema


def fuzz_routes(url: str, keep, paths: list[str], examples: int) -> None:
    """Bodies made from the server's /openapi.json for the routes whose path `keep` accepts (they must be
    exactly `paths`, so a new route is fuzzed by some test), valid and invalid: every answer is a 2xx or a 4xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [op for op in (result.ok() for result in schema.get_all_operations()) if keep(op.path)]
    found = sorted(op.path for op in operations)
    assert found == sorted(paths), f"the routes fuzzed are {found}"
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                       for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])

    @given(cases)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(base_url=url, timeout=60)
        assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.text}"

    check()
