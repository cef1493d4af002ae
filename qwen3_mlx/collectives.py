"""The ranks' process plumbing, below everything that runs on them: `join` starts the group (bounded,
one line if it cannot), `broadcast` and `sync_random_state` hand rank 0's decisions to the others,
`Watchdog` bounds each step's wait on the other ranks.

It sits on the ground floor because the loader joins the group before it loads a rank's part.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from typing import Callable

import mlx.core as mx

from .errors import OptionError, Qwen3Error

# A rank that waits this long on the others ends the process (Watchdog); a decode step of a 32B
# model over ring takes well under a second, a 2048-token prefill chunk of one a few seconds.
WATCHDOG_SECONDS = 60.0


# ---------------------------------------------------------------- sampling in step


def sync_random_state(group: mx.distributed.Group, seed: int | None = None) -> int:
    """Seed MLX's global random state on every rank with rank 0's seed (`seed`, or a random one),
    through an all_sum, so that unseeded sampling draws the same tokens on every rank (they compute
    the same logits and draw in the same order). Returns the seed. A collective: every rank calls it."""
    mine = (seed if seed is not None else secrets.randbits(31)) if group.rank() == 0 else 0
    shared = mx.distributed.all_sum(mx.array(mine, mx.uint32), group=group).item()
    mx.random.seed(shared)
    return shared


def broadcast(value: object, group: mx.distributed.Group) -> object:
    """Rank 0's `value` (anything json.dumps takes) on every rank; the others pass None. Two all_sums
    (the length, then the UTF-8 bytes, zeros elsewhere): how rank 0, which owns input and output,
    hands each decision to the others as data. A collective: every rank calls it."""
    data = json.dumps(value).encode() if group.rank() == 0 else b""
    size = mx.distributed.all_sum(mx.array(len(data), mx.int32), group=group).item()
    mine = mx.array(list(data), mx.uint8) if data else mx.zeros((size,), mx.uint8)
    return json.loads(bytes(mx.distributed.all_sum(mine, group=group).tolist()).decode()) if size else None


# ---------------------------------------------------------------- faults


class Watchdog:
    """Bounds how long this rank waits on the others: work done `with watchdog:` (a step whose
    evaluation runs the collectives) that takes longer than `seconds` prints one line to stderr (naming
    the silent rank when the job's `size` is 2; with more, a collective cannot tell which one is silent),
    calls `on_timeout(line)` when given (say, to end a server's requests), and ends the process
    with exit status 1, from a thread of its own (the collective it waits in never returns when a
    peer is stopped). A peer that died shows as MLX's RuntimeError, raised here as one Qwen3Error line.

    A stopped or unreachable rank is so detected within `seconds` (+ ~10 ms); a killed one as soon
    as the backend sees its connection close (ring: tens of ms). One watchdog serves every step of
    a thread, one `with` at a time (not nested). MLX releases the GIL while it evaluates, so the
    watchdog's thread runs while the step waits.
    """

    def __init__(self, rank: int, seconds: float = WATCHDOG_SECONDS,
                 on_timeout: Callable[[str], None] | None = None, size: int | None = None) -> None:
        if not (isinstance(seconds, (int, float)) and seconds > 0):
            raise OptionError(f"watchdog seconds={seconds!r} must be a number > 0")
        self.rank, self.seconds, self._on_timeout = rank, seconds, on_timeout
        self.message = f"error: rank {rank}: {_silence(rank, size, seconds)}: ending this one"
        self._deadline: float | None = None
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        with self._wake:
            self._deadline = time.monotonic() + self.seconds
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="qwen3-mlx watchdog", daemon=True)
                self._thread.start()
            self._wake.notify()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        with self._wake:
            self._deadline = None
        if isinstance(error, RuntimeError) and _peer_lost(str(error)):
            raise Qwen3Error(f"rank {self.rank}: lost the connection to the other ranks ({error}); "
                             f"a rank died or its link went down, see its own output") from None

    def _watch(self) -> None:
        with self._wake:
            while self._deadline is None or time.monotonic() < self._deadline:
                self._wake.wait(None if self._deadline is None else self._deadline - time.monotonic())
        print(self.message, file=sys.stderr, flush=True)
        try:
            if self._on_timeout is not None:
                self._on_timeout(self.message)
        finally:
            os._exit(1)


def join(backend: str = "any", seconds: float = WATCHDOG_SECONDS) -> mx.distributed.Group:
    """This process's group in a job started by mlx.launch (or mpirun): mx.distributed.init, with a
    backend that cannot start reported in one line, and peers that do not connect within `seconds`
    ending the process (SIGKILL) after one line. A process that no launcher started is a group of one."""
    if not any(key in os.environ for key in ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return mx.distributed.init(backend=backend)
    rank = os.environ.get("MLX_RANK", "")
    rank = int(rank) if rank.isdigit() else 0
    message = (f"error: rank {rank}: the other ranks did not connect within {seconds:g} s; check that every "
               f"rank started and that the hostfile's addresses are this machine's and reachable")
    # init holds the GIL while it waits for its peers, so no thread of this process could end the wait.
    guard = subprocess.Popen([sys.executable, "-c", _GUARD, str(os.getpid()), str(seconds), message],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        return mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise Qwen3Error(f"rank {rank}: mx.distributed backend {backend!r} could not start ({e}); run under "
                         f"mlx.launch (e.g. mlx.launch -n 2 -- CMD) with a valid hostfile") from None
    finally:
        guard.kill()
        guard.wait()


_GUARD = """import os, signal, sys, time
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(seconds)
print(message, file=sys.stderr, flush=True)
os.kill(pid, signal.SIGKILL)
"""


def _silence(rank: int, size: int | None, seconds: float) -> str:
    if size == 2:
        return f"no answer from rank {1 - rank} for {seconds:g} s; it is stopped, asleep or unreachable (or died)"
    return f"no answer from the other ranks for {seconds:g} s; a rank is stopped, asleep or unreachable (or died)"


def _peer_lost(message: str) -> bool:
    """MLX's backends report a lost peer in their own words; these are ring's, JACCL's and MPI's."""
    return any(s in message for s in ("[ring]", "[jaccl]", "[mpi]", "connection", "peer"))
