"""The engine (generation/engine.py) on every rank of a launched job: every rank runs the same rounds on
its part of the model (model/parallel.py); rank 0 owns input and output and hands every decision to the
others as data.

Rank 0's thread takes the requests and decides; before each round it broadcasts what changed (new
requests as their Prompt and GenerationOptions in JSON, wire.py; cancelled ids; the end), and every rank
applies it to its own Scheduler in the same order, so the batches stay identical; only rank 0's requests
stream chunks. Each round also carries rank 0's counts of waiting, prefilling and batched requests and of
stored prefixes, which the others check against theirs: ranks that parted end with one line, never a
wrong answer. What fits in memory is rank 0's rule on every rank: injected into each rank's Scheduler
(its `room`), never patched into its plan.

Faults: a rank that stops answering ends the others after `watchdog` seconds (collectives.Watchdog), a
rank that dies at its next collective; an idle job exchanges a heartbeat every few seconds so that
either is seen while nothing runs. The server's requests in flight then end with an error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from ..collectives import Watchdog, broadcast
from ..errors import Qwen3Error
from ..generation.engine import Engine
from ..generation.options import EngineOptions
from ..generation.job import prepare
from ..generation.response import Chunk
from ..generation.scheduler import Ticket
from ..model.model import Model
from ..text.tokenizer import Tokenizer
from .ranks import Ranks
from .wire import request_from_json, request_json

# ---------------------------------------------------------------- the engine on every rank


class DistributedEngine(Engine):
    """engine.Engine on every rank of a job (each with its part of the model; the same arguments
    everywhere). Rank 0 starts it (`start()`), takes requests (`submit`) and streams their chunks; the
    other ranks call `follow()`, which runs the same rounds in the caller's thread until rank 0's
    engine closes. See the module's docstring for what each round hands over.

    Memory: rank 0's plan (memory.MemoryPlan, over its own weights and KV cache) decides for every rank
    whether a request joins and how much the prefix stores keep, handed over as data at each decision;
    every rank's store keeps the same entries (rank 0's room, in this rank's bytes), at most
    `prefix_store_bytes` on the rank with the most KV heads x layers. So all ranks admit, store and
    evict alike. Any error in a round ends the job: the requests in flight end with it, and
    `on_fault(line)` is called (the server then exits).
    """

    def __init__(self, model: Model, tokenizer: Tokenizer, ranks: Ranks, options: EngineOptions | None = None, *,
                 draft_model: Model | None = None, **changes: Any) -> None:
        options = EngineOptions.of(options, **changes)
        with ranks.watchdog:
            units = mx.distributed.all_gather(mx.array([_kv_units(model)]), group=ranks.group).tolist()
        # Every entry of a rank's store takes (its KV heads x layers) x s bytes, s the same on every rank:
        # bounds of s x units make every rank keep and drop the same entries.
        self._units = units
        store = options.prefix_store_bytes // max(units) * units[ranks.rank]
        self.ranks = ranks
        super().__init__(model, tokenizer, options.replace(prefix_store_bytes=store), draft_model=draft_model,
                         room=self._room)
        self.on_fault: Callable[[str], None] | None = None
        self.fault: str | None = None
        self._held: dict[int, tuple[threading.Event | None, Ticket]] = {}  # id -> (its Request's event, ticket)
        self._next_id = 0
        self._watchdog = Watchdog(ranks.rank, ranks.options.watchdog, size=ranks.size,
                                  on_timeout=lambda line: self._fail_all(line.removeprefix("error: ")))

    # -- rank 0

    def run(self) -> None:
        """Rank 0's engine thread: decide, broadcast, apply, compute, until the engine closes."""
        try:
            while self._round(self._decide()):
                pass
        except Exception as e:  # noqa: BLE001  # any error ends every rank's job, said once
            self._fail_all(_fault_line(self.ranks.rank, e))
        finally:
            mx.clear_streams()

    def _decide(self) -> dict:
        """What changed since the last round (waiting, up to a heartbeat, while nothing did)."""
        taken = self.take(self.ranks.tick)
        end = taken.closing and not taken.new and not self.scheduler.busy
        state, sent = self._state(), []
        for ticket in taken.new:
            live, ticket.cancelled = ticket.cancelled, threading.Event()  # set in a round, on every rank alike
            sent.append([self._next_id, request_json(ticket.job.prompt, ticket.job.options)])
            self._hold(self._next_id, live, ticket)
        cancel = [i for i, (live, ticket) in self._held.items()
                  if (taken.cancel_all or live.is_set()) and not ticket.cancelled.is_set()]
        return {"state": state, "new": sent, "cancel": cancel, "end": end}

    # -- every rank

    def follow(self) -> None:
        """A rank other than 0: the rounds rank 0 decides, until its engine closes.

        Raises:
            Qwen3Error: a lost connection, or this rank's batch parting from rank 0's (one line).
        """
        try:
            while self._round(None):
                pass
        finally:
            mx.clear_streams()

    def _round(self, decided: dict | None) -> bool:
        """One round: rank 0's decisions on every rank, then one scheduler round; False at the end."""
        with self._watchdog:
            message = broadcast(decided, self.ranks.group)
            if not self.ranks.leader and message["state"] != self._state():
                raise Qwen3Error(f"rank {self.ranks.rank}: its requests {self._state()} parted from rank 0's "
                                 f"{message['state']} (waiting, prefilling, batched, held, stored); ending the job")
            if not self.ranks.leader:
                for i, data in message["new"]:
                    self._hold(i, None, self._ticket(data))
            for i, _ in message["new"]:
                self.scheduler.submit(self._held[i][1], checked=True)
            for i in message["cancel"]:
                self._held[i][1].cancelled.set()
            if message["end"]:
                return False
            if self.scheduler.busy:
                self.scheduler.run_once()
        return True

    def _ticket(self, data: dict) -> Ticket:
        """A follower's ticket for rank 0's request: the same job, its chunks dropped."""
        prompt, options = request_from_json(data)
        job = prepare(self.model, self.tokenizer, prompt, options)
        return Ticket(job, _drop, threading.Event(), job.most_tokens())  # rank 0 has checked it

    def _hold(self, i: int, live: threading.Event | None, ticket: Ticket) -> None:
        """Keep the ticket under its id until its last chunk."""
        sink = ticket.sink

        def release(chunk: Chunk, last: bool) -> None:
            if last:
                self._held.pop(i, None)
            sink(chunk, last)

        ticket.sink = release
        self._held[i] = (live, ticket)
        self._next_id = i + 1

    def _room(self, *args: int) -> int | None:
        """The memory plan's room (MemoryPlan.room: negative when a batch does not fit, else what the
        prefix store may keep; None: no limit), rank 0's on every rank, in this rank's bytes."""
        room = broadcast(self.scheduler.plan.room(*args) if self.ranks.leader else None, self.ranks.group)
        if room is None or room < 0:
            return room
        return room // self._units[0] * self._units[self.ranks.rank]

    def _state(self) -> list[int]:
        s = self.scheduler
        return [len(s.waiting), len(s.prefilling), len(s.gen.rows), len(self._held),
                len(s.prefixes) if s.prefixes is not None else 0]

    def _fail_all(self, line: str) -> None:
        """End every request held or submitted with `line` (an error), refuse new ones, tell on_fault."""
        self.fault = line
        tickets = [ticket for _, ticket in list(self._held.values())] + self.refuse_new()
        error = Qwen3Error(line)
        for ticket in tickets:
            if ticket.fail is not None:
                ticket.fail(error)
        if self.on_fault is not None:
            self.on_fault(line)


def _kv_units(model: Model) -> int:
    """KV heads x layers held by this rank: what its caches' bytes are proportional to."""
    return model.args.num_key_value_heads * len(model.layers)


def _drop(chunk: Chunk, last: bool) -> None:
    """A follower's sink: rank 0 alone delivers chunks."""


def _fault_line(rank: int, error: BaseException) -> str:
    text = str(error)
    return text if text.startswith(f"rank {rank}:") else f"rank {rank}: the engine failed ({error!r}); ending the job"
