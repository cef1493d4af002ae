"""The engine: one thread owns the model and runs the batch's decode loop (scheduler.Scheduler) for a
long-running process such as the server. Any thread or asyncio task submits a request and gets a
`Request` handle that streams its chunks and can cancel it.

    with Engine(model, tokenizer, EngineOptions(max_batch=8)) as engine:
        request = engine.submit("Why is the sky blue?", thinking_budget=256)
        for chunk in request:            # or `async for`, in the event loop that submitted it
            print(chunk.text, end="")
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..errors import Qwen3Error
from ..model.model import Model
from ..text.prompt import Messages, Prompt
from ..text.tokenizer import Tokenizer
from .options import EngineOptions, GenerationOptions
from .prefix_store import PrefixStore
from .job import collect, prepare
from .response import Chunk, GenerationResult
from .scheduler import Room, Scheduler, Ticket


class EngineFull(Qwen3Error):
    """The queue of waiting requests is full; try again later."""


class EngineClosed(Qwen3Error):
    """The engine is shutting down (or was never started) and takes no more requests."""


_END = object()  # after a request's last chunk


@dataclass(frozen=True)
class Taken:
    """What the engine's thread takes at once (Engine.take): the requests submitted since, and whether
    every request is to be cancelled and whether the engine is closing."""

    new: list[Ticket]
    cancel_all: bool
    closing: bool


class Request:
    """A submitted request: its chunks as they come (`for`, from any thread but an event loop's; or
    `async for`, in the event loop that submitted it), `cancel()`, and `result()`."""

    def __init__(self, engine: Engine, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None) -> None:
        self.prompt_tokens = prompt_tokens
        self._engine, self._loop = engine, loop
        self._items: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if loop else queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._seen: list[Chunk] = []  # the chunks read so far
        self._ended = False
        self._error: BaseException | None = None

    def cancel(self) -> None:
        """Stop the request: its row leaves the batch at the next step (its last chunk then says
        finish_reason "cancelled"); a waiting request leaves the queue."""
        self._cancelled.set()
        self._engine._wake()

    def __iter__(self) -> Iterator[Chunk]:
        """Its chunks from the first: those read before, then the rest as they come."""
        if self._loop is not None:
            raise Qwen3Error("this request was submitted from an event loop: read it with `async for`")
        yield from list(self._seen)
        if self._error is not None:
            raise self._error
        while not self._ended:
            item = self._items.get()
            if self._keep(item):
                yield item

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        if self._loop is None:
            raise Qwen3Error("this request was not submitted from an event loop: read it with `for`")
        for chunk in list(self._seen):
            yield chunk
        if self._error is not None:
            raise self._error
        while not self._ended:
            item = await self._items.get()
            if self._keep(item):
                yield item

    def _keep(self, item: Any) -> bool:
        """Whether `item`, from the queue, is a chunk (kept, for a later reading); raises an error."""
        if item is _END:
            self._ended = True
            return False
        if isinstance(item, BaseException):
            self._ended, self._error = True, item
            raise item
        self._seen.append(item)
        return True

    def result(self) -> GenerationResult:
        """The whole response (waits for it; the chunks already read count too)."""
        return collect(iter(self))

    def _put(self, item: Any) -> None:
        """From the engine's thread."""
        if self._loop is None:
            self._items.put(item)
        else:
            try:
                self._loop.call_soon_threadsafe(self._items.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is reading any more
                self._cancelled.set()

    def _sink(self, chunk: Chunk, last: bool) -> None:
        self._put(chunk)
        if last:
            self._put(_END)

    def _fail(self, error: BaseException) -> None:
        self._put(Qwen3Error(f"generation failed: {error}"))
        self._put(_END)


class Engine:
    """One thread that owns the model and decodes every admitted request together.

    Leaving `with Engine(...)` normally waits for every request, read or not: one nobody reads runs to
    its limits (max_tokens, 4096 by default, and any thinking budget). Cancel what you no longer want
    (`request.cancel()`), or call `close(cancel=True)`; leaving on an exception cancels them all.

    Args:
        options: how the engine runs (EngineOptions: the batch's rows, queue and memory bounds, the
            prefix store, the cache's kind); `**changes`: EngineOptions fields that override them.
        draft_model: a smaller model of the same family that drafts for every request (speculative
            decoding, speculative.py), up to each request's num_draft_tokens (0: that one does not).
            Without it or `prompt_lookup`, a request that asks for prompt_lookup is refused, unless
            `speculative`: then the requests that ask for it draft by prompt lookup.

    Raises:
        OptionError: a bad option; kv_group_size does not divide the model's head_dim.
    """

    def __init__(self, model: Model, tokenizer: Tokenizer, options: EngineOptions | None = None, *,
                 draft_model: Model | None = None, room: Room | None = None, **changes: Any) -> None:
        options = EngineOptions.of(options, **changes)
        self.model, self.tokenizer, self.options, self.max_queue = model, tokenizer, options, options.max_queue
        self._prefixes = PrefixStore(options.prefix_store_bytes) if options.prefix_store_bytes > 0 else None
        self.scheduler = Scheduler(model, tokenizer, options, draft_model=draft_model, prefix_store=self._prefixes,
                                   room=room)
        self.memory_limit = self.scheduler.plan.limit
        self._inbox: list[Ticket] = []  # submitted, not yet seen by the engine's thread
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._cancel_all = False

    # -- life

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="qwen3-mlx-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, cancel: bool = False) -> None:
        """Take no more requests; finish the ones there are (or cancel them) and stop the thread."""
        with self._lock:
            self._closing, self._cancel_all = True, self._cancel_all or cancel
            self._lock.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close(cancel=exc[0] is not None)

    # -- requests

    def submit(self, prompt: Prompt | str | Messages | Sequence[int], options: GenerationOptions | None = None, *,
               system: str | None = None, raw: bool = False, tools: list[dict] | None = None,
               prefill_response: str | None = None, loop: asyncio.AbstractEventLoop | None = None,
               **kwargs: Any) -> Request:
        """Queue a request (a Prompt and GenerationOptions; takes the arguments of `generate`).
        Checked here, in the caller's thread.

        `loop`: the event loop that reads the request (`async for`); by default the running loop of
        the calling thread, if any (give it when submitting from a worker thread for a loop).

        Raises:
            OptionError, Qwen3Error: as `generate`; MemoryLimitError: a request that could never fit in
                memory_limit (or kv_memory), even alone; the message gives the numbers.
            EngineFull: `max_queue` requests are waiting already.
            EngineClosed: the engine is not running.
        """
        request_prompt = Prompt.of(prompt, system=system, raw=raw, tools=tools, prefill_response=prefill_response)
        job = prepare(self.model, self.tokenizer, request_prompt, GenerationOptions.of(options, **kwargs),
                      rotating=self.scheduler.max_kv_size is not None)
        most = self.scheduler.check(job)
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
        request = Request(self, len(job.prompt_ids), loop)
        ticket = Ticket(job, request._sink, request._cancelled, most, request._fail)
        with self._lock:
            if self._closing or self._thread is None:
                raise EngineClosed("the engine is not running (closed, or not started): no more requests")
            if len(self._inbox) + len(self.scheduler.waiting) >= self.max_queue:
                raise EngineFull(f"{self.max_queue} requests are waiting already; try again later")
            self._inbox.append(ticket)
            self._lock.notify()
        return request

    @property
    def kv_bytes(self) -> int:
        """Bytes the batch's KV cache holds now."""
        return self.scheduler.gen.nbytes

    def memory(self) -> dict[str, int]:
        """Bytes: the ceiling (`limit`), MLX's memory in use now and at its peak since the process began
        or MLX's peak was last reset (`active`, `peak`), the KV caches held now (the batch's and the
        prompt being computed, `kv`), and the prefix store's (`prefix_store`). What /health reports."""
        kv = self.kv_bytes + sum(c.nbytes for p in self.scheduler.prefilling for c in p.cache)
        return {"limit": self.memory_limit, "active": mx.get_active_memory(), "peak": mx.get_peak_memory(),
                "kv": kv, "prefix_store": self._prefixes.nbytes if self._prefixes is not None else 0}

    @property
    def rows(self) -> int:
        """Requests being decoded now."""
        return len(self.scheduler.gen.rows)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    # -- the thread

    def take(self, timeout: float | None = None) -> Taken:
        """What the engine's thread has to act on: waits until a request is submitted, the scheduler has
        work, or the engine closes (or `timeout` seconds pass), then takes the submitted requests."""
        with self._lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not (self._inbox or self.scheduler.busy or self._closing):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._lock.wait(left)
            new, self._inbox = self._inbox, []
            return Taken(new, self._cancel_all, self._closing)

    def refuse_new(self) -> list[Ticket]:
        """Take no more requests: returns those submitted that the thread has not taken yet."""
        with self._lock:
            self._closing = True
            new, self._inbox = self._inbox, []
            return new

    def run(self) -> None:
        """The engine's thread: take what was submitted, run a round of the scheduler, until it closes."""
        scheduler = self.scheduler
        try:
            while True:
                taken = self.take()
                for ticket in taken.new:
                    scheduler.submit(ticket, checked=True)
                if taken.cancel_all:
                    for ticket in scheduler.tickets_all():
                        ticket.cancelled.set()
                if taken.closing and not scheduler.busy:
                    return
                try:
                    scheduler.run_once()
                except Exception as error:  # a fault of ours or the device's: tell every caller
                    for ticket in scheduler.fail():
                        ticket.fail(error)
        finally:
            mx.clear_streams()  # MLX's rule for a thread that ran work, before it ends
