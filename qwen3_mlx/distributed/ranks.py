"""This process's place in a launched job (`Ranks`): loading each rank's part, rank 0's input handed to
every rank, and the watchdog over the model's steps. A process alone is a job of one, for which every
method is the plain thing, so a command runs one code path either way."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx

from ..checkpoint import loader
from ..collectives import WATCHDOG_SECONDS, Watchdog, broadcast, join
from ..errors import OptionError, Qwen3Error
from ..generation.proposers import check_draft
from ..model.model import Model
from ..text.tokenizer import Tokenizer
from .launch import launched_rank

T = TypeVar("T")

# A rank waits this long for the others to load the model (each reads, or downloads, its part), or
# the watchdog's seconds if longer: loading runs once, and a download may take minutes.
LOAD_SECONDS = 600.0
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
        self.watchdog = Watchdog(self.rank, options.watchdog, size=self.size)
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

    def load(self, path: str | Path, adapter_path: str | Path | None = None) -> tuple[Model, Tokenizer]:
        """The model (loader.load), with the adapter of `adapter_path` when given: this rank's part of it
        when launched. A rank waits up to LOAD_SECONDS (or the watchdog's, if longer) for the others to
        load theirs; each names itself when it fails."""
        if not self.launched:  # loader.load looked up when called: a test may put a stand-in there
            return loader.load(path) if adapter_path is None else loader.load(path, adapter_path=adapter_path)
        with Watchdog(self.rank, max(LOAD_SECONDS, self.options.watchdog), size=self.size):
            try:
                folder = loader.resolve(path)  # a download, before anything waits on the others
                return loader.load(folder, parallel=self.options.mode, group=self.group,
                                   layers_per_rank=self.options.layers_per_rank, adapter_path=adapter_path)
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
