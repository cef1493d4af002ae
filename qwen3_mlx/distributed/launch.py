"""A process under mlx.launch: its rank from the launcher's environment, and the quiet of the ranks
other than 0 (rank 0 owns input and output; the others write their error lines only)."""

from __future__ import annotations

import io
import os
import sys
import warnings
from typing import Any

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
