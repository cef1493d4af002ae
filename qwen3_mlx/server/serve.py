"""Run the server: take the port, load the model, start the engine, serve the app with uvicorn, shut down
gracefully.

The first SIGTERM or Ctrl-C starts the drain: the port stays open and every new request gets a 503,
while the running ones finish, for up to `grace` seconds. When the grace runs out, or on a second
signal, the engine cancels what is left: a whole reply then gets a 503 error body, a stream an error
event then `data: [DONE]` (never a finish_reason "cancelled"). Then the server stops: after SIGTERM
serve() returns (exit 0), after Ctrl-C it raises KeyboardInterrupt (the CLI's exit 130).

Under mlx.launch (`parallel`), rank 0 does all of this over a distributed.DistributedEngine, and the
other ranks follow its rounds (they ignore Ctrl-C: rank 0's drain ends them). A rank lost (it died,
or stopped answering for the watchdog's seconds) ends the requests in flight with an error; their
responses are written, then the server exits 1 with the rank's line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import uvicorn

from ..distributed.engine import DistributedEngine
from ..distributed.ranks import ParallelOptions, Ranks
from ..errors import Qwen3Error
from ..generation.engine import Engine
from ..generation.options import DEFAULT_MAX_TOKENS, EngineOptions
from .app import create_app
from .settings import ServerSettings
from .submission.sealed import load_key

log = logging.getLogger("uvicorn.error")  # uvicorn's own log, so the drain's lines read as its others

# Seconds the responses of cancelled requests may take to be written, once the engine has ended them.
_FLUSH_SECONDS = 5.0


class _Server(uvicorn.Server):
    """uvicorn's server, which drains before it stops (uvicorn alone would close the port at once, and cut
    the responses still running, in mid-chunk, when its timeout ran out)."""

    def __init__(self, config: uvicorn.Config, app: Any, grace: float) -> None:
        super().__init__(config)
        self.app, self.grace = app, grace
        self.signals: list[int] = []
        self.drain_task: asyncio.Task | None = None
        self.failure: str | None = None  # a rank lost (DistributedEngine.on_fault)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets:  # uvicorn names the address only of sockets it binds itself
            host, port = self.config.host, sockets[0].getsockname()[1]
            log.info("Serving on http://%s:%d (SIGTERM or Ctrl-C to stop)", f"[{host}]" if ":" in host else host, port)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Runs in the signal handler: only recorded; on_tick, in the event loop, acts on it.
        self.signals.append(sig)

    async def on_tick(self, counter: int) -> bool:
        if self.signals and self.drain_task is None:
            self.drain_task = asyncio.create_task(self.drain())
        return await super().on_tick(counter)

    async def drain(self) -> None:
        """Refuse new requests, let the running ones finish (or cancel them), then let uvicorn stop."""
        engine = self.app.state.engine
        self.app.state.draining = True
        log.info("Draining: new requests get a 503; running requests may take %g s to finish (a second signal "
                 "cancels them)", self.grace)
        ended = asyncio.ensure_future(asyncio.to_thread(engine.close))  # done once every request has ended
        await _until(lambda: ended.done() or len(self.signals) > 1, self.grace)
        if not ended.done():
            why = "a second signal" if len(self.signals) > 1 else f"the grace of {self.grace:g} s is over"
            log.warning("Cancelling the running requests: %s", why)
            await asyncio.to_thread(engine.close, cancel=True)
        # The cancelled requests' responses, written by their own tasks, end with an error.
        await _until(lambda: not self.server_state.tasks, _FLUSH_SECONDS)
        self.should_exit = True


    def fault(self, line: str) -> None:
        """The engine lost a rank and has ended every request in flight with an error (called from its
        thread, or the watchdog's): refuse new requests (503), let their responses be written, then stop;
        serve() raises `line` (when the watchdog called, it ends the process with status 1 as this returns)."""
        self.app.state.draining = True
        self.failure = line
        deadline = time.monotonic() + _FLUSH_SECONDS
        while self.server_state.tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        self.should_exit = True


async def _until(condition: Callable[[], bool], seconds: float) -> None:
    """Wait until `condition()`, for `seconds` at most."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound now, before the model loads: a busy port fails at once.

    Raises:
        Qwen3Error: the address cannot be bound (in use, not this machine's, or a privileged port).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise Qwen3Error(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); stop what uses it, "
                         "or give another --port or --host") from None
    return sock


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8080, served_model_names: Sequence[str] = (),
          api_key: str | None = None, engine_options: EngineOptions | None = None, thinking_budget: int | None = None,
          max_tokens: int = DEFAULT_MAX_TOKENS,
          cors_origin: str | None = None, grace: float = 30.0, log_level: str = "info",
          parallel: ParallelOptions | None = None, ui: bool = True, draft_model: str | None = None,
          num_draft_tokens: int | None = None, metrics: bool = True, secret_key_file: str | None = None) -> None:
    """Serve `model` (a checkpoint folder or Hub repo id) until a signal; see the module's docstring.

    `served_model_names`: the names a request's `model` may give, the first one reported in responses;
    none: `model` as given. `parallel`: the split of the model over the ranks of a launched job.
    `ui`: serve the chat page at / (create_app); `metrics`: /metrics. `engine_options`: the engine's
    (EngineOptions; None: its defaults).
    `draft_model`: a checkpoint folder or Hub id of a smaller model of the same family that drafts
    for every request; `num_draft_tokens`: the longest draft of a request that gives none.
    `log_level`: the server's and the library's (debug, info, warning, error). `secret_key_file`: the
    key that seals the reasoning clients carry back (submission/sealed.py; None: the user's cache's).

    Raises:
        Qwen3Error: the port cannot be bound; the model cannot be loaded; a rank was lost.
        KeyboardInterrupt: after a graceful shutdown on Ctrl-C.
    """
    configure_logging(log_level)
    ranks = Ranks.start(parallel or ParallelOptions())
    sock = ranks.from_leader(functools.partial(listen, host, port), share=False)  # rank 0's; the others: None
    engine_options = engine_options or EngineOptions()
    if not ranks.leader:
        follow(model, ranks, engine_options, draft_model)
        return
    try:
        loaded, tokenizer = ranks.load(model)
        draft = ranks.load_draft(draft_model, tokenizer)
        if ranks.launched:
            engine = DistributedEngine(loaded, tokenizer, ranks, engine_options, draft_model=draft).start()
        else:
            engine = Engine(loaded, tokenizer, engine_options, draft_model=draft).start()
        settings = ServerSettings(tuple(served_model_names) or (model,), api_key=api_key, max_tokens=max_tokens,
                                  thinking_budget=thinking_budget, num_draft_tokens=num_draft_tokens,
                                  cors_origin=cors_origin, ui=ui, metrics=metrics,
                                  secret_key=load_key(secret_key_file))  # rank 0's: only rank 0 answers
        app = create_app(engine, settings)
        config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=_FLUSH_SECONDS,
                                log_level=log_level)
        server = _Server(config, app, grace)
        if ranks.launched:
            engine.on_fault = server.fault
        try:
            server.run(sockets=[sock])
        finally:
            engine.close(cancel=True)
    finally:
        sock.close()
    if server.failure is not None:
        raise Qwen3Error(server.failure)
    if signal.SIGINT in server.signals:
        raise KeyboardInterrupt


def configure_logging(level: str) -> None:
    """The library's log (qwen3_mlx.*) on stderr at `level`, beside uvicorn's (which uvicorn sets up)."""
    logger = logging.getLogger("qwen3_mlx")
    logger.setLevel(level.upper())
    if not any(getattr(handler, "qwen3_mlx", False) for handler in logger.handlers):
        handler = logging.StreamHandler()
        handler.qwen3_mlx = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(name)s: %(message)s"))
        logger.addHandler(handler)


def follow(model: str, ranks: Ranks, engine_options: EngineOptions, draft_model: str | None = None) -> None:
    """A rank other than 0: its part of the model, and rank 0's engine rounds until its server ends.
    Ctrl-C (sent to every rank of a terminal's launcher) is rank 0's to act on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loaded, tokenizer = ranks.load(model)
    draft = ranks.load_draft(draft_model, tokenizer)
    DistributedEngine(loaded, tokenizer, ranks, engine_options, draft_model=draft).follow()
