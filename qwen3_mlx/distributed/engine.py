"""The entry points under mlx.launch: every rank runs the same command on its part of the model
(parallel.py), rank 0 owns input and output, and hands every decision to the others as data.

- `Ranks`: this process's place in a launched job (or a process alone, for which every method is the
  plain thing): loading each rank's part, rank 0's input handed to every rank (`from_leader`: a
  prompt read from stdin, a chat line), the watchdog over the model's steps (`steps`, `watched`),
  and many requests through the engine (`batch_generate`). The other ranks write only their error
  lines (`quiet`).
- `DistributedEngine`: the engine (engine.py) on every rank. Rank 0's thread takes the requests and
  decides; before each round it broadcasts what changed (new requests as their Prompt and
  GenerationOptions in JSON, cancelled ids, the end), and every rank applies it to its own Scheduler
  in the same order, so the batches stay identical; only rank 0's requests stream chunks. Each round
  also carries rank 0's counts of waiting, prefilling and batched requests and of stored prefixes,
  which the others check against theirs: ranks that parted end with one line, never a wrong answer.

Faults: a rank that stops answering ends the others after `watchdog` seconds (collectives.Watchdog), a
rank that dies at its next collective; an idle job exchanges a heartbeat every few seconds so that
either is seen while nothing runs. The server's requests in flight then end with an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx

from ..checkpoint import loader
from ..collectives import WATCHDOG_SECONDS, Watchdog, broadcast, join
from ..errors import OptionError, Qwen3Error
from ..generation.batch import batch_generate
from ..generation.scheduler import Ticket
from ..generation.engine import Engine
from ..generation.options import EngineOptions, GenerationOptions
from ..generation.request import prepare
from ..generation.response import Chunk, GenerationResult
from ..generation.proposers import check_draft
from ..model.model import Model
from ..text.prompt import Prompt
from ..text.tokenizer import Tokenizer

T = TypeVar("T")

# A rank waits this long for the others to load the model (each reads, or downloads, its part), or
# the watchdog's seconds if longer: loading runs once, and a download may take minutes.
LOAD_SECONDS = 600.0
# Environment variables a launcher sets (mlx.launch: MLX_RANK; mpirun: the other two).
_RANK_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launched_rank() -> int | None:
    """This process's rank in a job a launcher started, from its environment; None when alone."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


# ---------------------------------------------------------------- rank 0 writes, the others are quiet


class ErrorLines(io.TextIOBase):
    """What a rank other than 0 writes to stderr: its error lines only (`error:` and click's `Error:`,
    naming the rank when they do not yet) and any traceback; progress, warnings and figures are rank 0's."""

    def __init__(self, stream: Any, rank: int) -> None:
        self._stream, self._rank, self._line, self._traceback = stream, rank, "", False

    def write(self, text: str) -> int:
        *lines, self._line = (self._line + text).split("\n")
        for line in lines:
            self._traceback = self._traceback or line.startswith("Traceback")
            if line.startswith(("error: ", "Error: ")) and not line[7:].startswith("rank "):
                line = f"{line[:7]}rank {self._rank}: {line[7:]}"
            if self._traceback or line.startswith(("error: ", "Error: ")):
                self._stream.write(line + "\n")
                self._stream.flush()
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


def quiet(rank: int) -> None:
    """Rank `rank` (not 0) of a launched job runs the command silently: stdout goes nowhere, stderr
    keeps its error lines, warnings are not shown."""
    sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115  # for the process's life
    sys.stderr = ErrorLines(sys.stderr, rank)
    warnings.simplefilter("ignore")


# ---------------------------------------------------------------- this process's place in the job


@dataclass(frozen=True)
class ParallelOptions:
    """--parallel, --layers-per-rank and --watchdog: how a launched command splits the model."""

    mode: str | None = None  # "tensor" | "pipeline"; None: one process, the whole model
    layers_per_rank: tuple[float, ...] | None = None
    watchdog: float = WATCHDOG_SECONDS


class Ranks:
    """This process's place in a job: its group, whether it is rank 0 (the leader, which owns input and
    output), the watchdog over its waits on the others. `Ranks.start(ParallelOptions())` is a process
    alone, for which every method is the plain thing, so a command runs one code path either way."""

    def __init__(self, options: ParallelOptions, group: mx.distributed.Group | None) -> None:
        self.options, self.group = options, group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.watchdog = Watchdog(self.rank, options.watchdog)
        self._armed = False

    @classmethod
    def start(cls, options: ParallelOptions) -> Ranks:
        """Join the job (collectives.join, bounded by the watchdog's seconds) when options.mode is given.

        Raises:
            OptionError: a mode in a process alone; no mode under a launcher (every rank would run the
                whole model on its own); layers_per_rank without pipeline.
        """
        if options.layers_per_rank is not None and options.mode != "pipeline":
            raise OptionError("--layers-per-rank applies to --parallel pipeline only")
        if options.mode is None:
            if launched_rank() is not None:
                raise OptionError("this process was started by a launcher (mlx.launch): give --parallel tensor or "
                                  "--parallel pipeline, or run it without the launcher")
            return cls(options, None)
        group = join(seconds=options.watchdog)
        if group.size() == 1:
            raise OptionError(f"--parallel {options.mode} needs 2 or more ranks, and this process is alone; start "
                              f"every rank with mlx.launch (e.g. mlx.launch -n 2 -- qwen3-mlx ...)")
        return cls(options, group)

    @property
    def leader(self) -> bool:
        """Rank 0, or a process alone: the one that reads input and writes output."""
        return self.rank == 0

    @property
    def launched(self) -> bool:
        return self.group is not None

    def load(self, path: str | Path) -> tuple[Model, Tokenizer]:
        """The model (loader.load): this rank's part of it when launched. A rank waits up to LOAD_SECONDS
        (or the watchdog's, if longer) for the others to load theirs; each names itself when it fails."""
        if not self.launched:  # loader.load looked up when called: a test may put a stand-in there
            return loader.load(path)
        with Watchdog(self.rank, max(LOAD_SECONDS, self.options.watchdog)):
            try:
                folder = loader.resolve(path)  # a download, before anything waits on the others
                return loader.load(folder, parallel=self.options.mode, group=self.group,
                            layers_per_rank=self.options.layers_per_rank)
            except Qwen3Error as e:
                if str(e).startswith("rank "):
                    raise
                raise type(e)(f"rank {self.rank}: {e}") from None

    def load_draft(self, path: str | Path | None, tokenizer: Tokenizer) -> Model | None:
        """A draft model (--draft-model) as `load` loads the model (its part on each rank, so that every
        rank drafts the same tokens); refused in one line when it does not share the model's tokenizer."""
        if path is None:
            return None
        draft, draft_tokenizer = self.load(path)
        check_draft(tokenizer, draft_tokenizer)
        return draft

    # -- rank 0's input, on every rank

    def from_leader(self, read: Callable[[], T], share: bool = True) -> T:
        """`read()` run on rank 0, its value (JSON-able) handed to every rank (or None, unless `share`).
        While rank 0 waits for it (a person typing), the ranks exchange a heartbeat every `tick` seconds,
        each under the watchdog, so that a rank that stops is seen even then. Rank 0's error is raised
        there; the other ranks then exit 1 quietly (rank 0 says why)."""
        if not self.launched:
            return read()
        outcome: dict[str, Any] = {}
        reader = None
        if self.leader:
            reader = threading.Thread(target=_run_into, args=(read, outcome), name="qwen3-mlx input", daemon=True)
            reader.start()
        got = None
        while got is None:
            if reader is not None:
                reader.join(self.tick)
            sent = None
            if reader is not None and not reader.is_alive():
                sent = {"error": outcome["error"]} if "error" in outcome else {"value": outcome["value"] if share else None}
            with self.watchdog:
                got = broadcast(sent, self.group)
        if "error" in got:
            if self.leader:
                raise outcome["raised"]
            raise SystemExit(1)
        return outcome["value"] if self.leader else got["value"]

    @property
    def tick(self) -> float:
        """Seconds between two heartbeats of an idle job: well within the watchdog."""
        return min(5.0, self.options.watchdog / 4)

    def agree(self, what: str, value: Any) -> None:
        """Check that every rank holds rank 0's `value` (JSON-able): its digest is broadcast and compared.

        Raises:
            Qwen3Error: on a rank whose value differs, naming `what`.
        """
        if not self.launched:
            return
        mine = hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()
        with self.watchdog:
            theirs = broadcast(mine if self.leader else None, self.group)
        if theirs != mine:
            raise Qwen3Error(f"rank {self.rank}: {what} differ from rank 0's; give every rank the same files "
                             f"(the same paths on every Mac)")

    # -- many requests

    def batch_generate(self, model: Model, tokenizer: Tokenizer, prompts: Sequence[Prompt],
                       options: Sequence[GenerationOptions], *, engine_options: EngineOptions | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       draft_model: Model | None = None) -> list[GenerationResult] | None:
        """batch.batch_generate (each prompt with its options), launched or not. Launched, the requests
        go through a DistributedEngine, rank 0 submitting them all and the other ranks following, so that
        every rank admits them alike: every rank calls it, and rank 0 gets the results (in order), the
        others None. `progress(done, total)`: as the results come, in order."""
        if not self.launched:
            return batch_generate(model, tokenizer, prompts, list(options), engine_options=engine_options,
                                  progress=progress, draft_model=draft_model)
        # As batch_generate: the requests' cache, only the rows that ask look up, no prefix store.
        run = (engine_options or EngineOptions()).for_requests(options)
        run = run.replace(prefix_store_bytes=0, max_queue=len(prompts) + 1)
        engine = DistributedEngine(model, tokenizer, self, run, draft_model=draft_model)
        if not self.leader:
            engine.follow()
            return None
        results = []
        with engine:  # leaving waits for every request, or cancels them all on an error
            requests = [engine.submit(prompt, opts) for prompt, opts in zip(prompts, options)]
            for request in requests:
                results.append(request.result())
                if progress is not None:
                    progress(len(results), len(requests))
        return results

    # -- the watchdog over the model's steps

    @contextlib.contextmanager
    def steps(self) -> Iterator[None]:
        """A run of model steps (a generation): armed here, the watchdog is re-armed by every pass of a
        model `watched` wraps, so that it ends the process only when no pass has begun for its seconds."""
        if not self.launched:
            yield
            return
        with self.watchdog:
            self._armed = True
            try:
                yield
            finally:
                self._armed = False

    def watched(self, model: Model | None) -> Any:
        """`model` as the generation loops see it: alone, itself; launched, a WatchedModel."""
        if model is None or not self.launched:
            return model
        return WatchedModel(model, self._step)

    def _step(self) -> None:
        if self._armed:
            self.watchdog.__enter__()  # a new deadline (Watchdog: each entry sets one)


def _run_into(read: Callable[[], Any], outcome: dict[str, Any]) -> None:
    try:
        outcome["value"] = read()
    except (Qwen3Error, OSError) as e:
        outcome.update(error=str(e), raised=e)
    except BaseException as e:  # KeyboardInterrupt reaches the main thread by itself; anything else ends too
        outcome.update(error=repr(e), raised=e)


class WatchedModel:
    """A model.LanguageModel that calls `step()` at the start of every pass (__call__ and decode) of
    `model`, and is otherwise `model`. Why a wrapper: the loops (single stream, chat, batch,
    speculative) already take any LanguageModel, so none of them changes; MLX evaluates lazily, so a
    pass's wait on the other ranks lies between the start of one pass and the next, which these calls
    bound."""

    def __init__(self, model: Model, step: Callable[[], None]) -> None:
        self._model, self._step = model, step  # not `model`: that name is the model's own (Qwen3Model)

    def __call__(self, inputs: mx.array, cache: Sequence[Any] | None = None) -> mx.array:
        self._step()
        return self._model(inputs, cache)

    def decode(self, ids: mx.array, cache: Sequence[Any]) -> mx.array:
        self._step()
        return self._model.decode(ids, cache)

    def __getattr__(self, name: str) -> Any:  # args, layers, dtype, make_cache, model, ...: the model's
        return getattr(self._model, name)


# ---------------------------------------------------------------- requests as data


def request_json(prompt: Prompt, options: GenerationOptions) -> dict:
    """A request (a Prompt and its GenerationOptions) as JSON, for the other ranks: every field of
    both; logit_bias as [id, bias] pairs; a json_schema pydantic class as its schema.

    Raises:
        OptionError: a json_schema that is neither a JSON object nor a pydantic model class.
    """
    fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    schema = fields["json_schema"]
    if isinstance(schema, type):
        fields["json_schema"] = _pydantic_schema(schema)
    elif schema is not None and not isinstance(schema, Mapping):
        raise OptionError(f"json_schema: a JSON object or a pydantic model class, got {type(schema).__name__}")
    if fields["logit_bias"] is not None:
        fields["logit_bias"] = [[int(k), float(v)] for k, v in fields["logit_bias"].items()]
    parts = {f.name: getattr(prompt, f.name) for f in dataclasses.fields(prompt)}
    return _plain({"prompt": parts, "options": fields})


def request_from_json(data: dict) -> tuple[Prompt, GenerationOptions]:
    fields = dict(data["options"])
    if fields["logit_bias"] is not None:
        fields["logit_bias"] = {int(k): v for k, v in fields["logit_bias"]}
    return Prompt(**data["prompt"]), GenerationOptions(**fields)


def _pydantic_schema(model: type) -> dict:
    schema = getattr(model, "model_json_schema", None)
    if schema is None:
        raise OptionError(f"json_schema: {model.__name__} is not a pydantic model class; give a JSON schema object")
    return schema()


def _plain(value: Any) -> Any:
    """Mappings and sequences (a Prompt's messages and tools may be any) as JSON's dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


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
        super().__init__(model, tokenizer, options.replace(prefix_store_bytes=store), draft_model=draft_model)
        plan = self._scheduler.plan
        self._plan_room, plan.room = plan.room, self._room
        self.ranks = ranks
        self.on_fault: Callable[[str], None] | None = None
        self.fault: str | None = None
        self._held: dict[int, tuple[threading.Event | None, Ticket]] = {}  # id -> (its Request's event, ticket)
        self._next_id = 0
        self._watchdog = Watchdog(ranks.rank, ranks.options.watchdog,
                                  on_timeout=lambda line: self._fail_all(line.removeprefix("error: ")))

    # -- rank 0

    def _run(self) -> None:
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
        scheduler = self._scheduler
        with self._lock:
            deadline = time.monotonic() + self.ranks.tick
            while not (self._inbox or scheduler.busy or self._closing) and time.monotonic() < deadline:
                self._lock.wait(max(0.0, deadline - time.monotonic()))
            new = list(self._inbox)
            self._inbox.clear()
            cancel_all, end = self._cancel_all, self._closing and not new and not scheduler.busy
        state, sent = self._state(), []
        for ticket in new:
            live, ticket.cancelled = ticket.cancelled, threading.Event()  # set in a round, on every rank alike
            sent.append([self._next_id, request_json(ticket.job.prompt, ticket.job.options)])
            self._hold(self._next_id, live, ticket)
        cancel = [i for i, (live, ticket) in self._held.items()
                  if (cancel_all or live.is_set()) and not ticket.cancelled.is_set()]
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
                self._scheduler.submit(self._held[i][1], checked=True)
            for i in message["cancel"]:
                self._held[i][1].cancelled.set()
            if message["end"]:
                return False
            if self._scheduler.busy:
                self._scheduler.run_once()
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
        room = broadcast(self._plan_room(*args) if self.ranks.leader else None, self.ranks.group)
        if room is None or room < 0:
            return room
        return room // self._units[0] * self._units[self.ranks.rank]

    def _state(self) -> list[int]:
        s = self._scheduler
        return [len(s.waiting), len(s.prefilling), len(s.gen.rows), len(self._held),
                len(s.prefixes) if s.prefixes is not None else 0]

    def _fail_all(self, line: str) -> None:
        """End every request held or submitted with `line` (an error), refuse new ones, tell on_fault."""
        with self._lock:
            self._closing, self.fault = True, line
            tickets = [ticket for _, ticket in self._held.values()] + list(self._inbox)
            self._inbox.clear()
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
