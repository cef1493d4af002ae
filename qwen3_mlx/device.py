"""What Apple silicon (Metal) needs while a model is in use; no-ops on other devices.

- The wired-memory limit raised to the GPU's recommended working set, so that the weights are not
  paged out under memory pressure. mlx-lm raises and restores it around each generation; here it is
  raised once, when a model is loaded, and restored when the last loaded model is gone, so threads
  generating at once never race on it.
- A stream of generation's own (as mlx-lm's `generation_stream`), thread-local because MLX streams
  belong to the thread that made them and the model may run in any thread.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import ContextManager

import mlx.core as mx


def recommended_working_set() -> int | None:
    """Bytes the Metal GPU recommends keeping wired; None off Metal."""
    if not mx.metal.is_available():
        return None
    return mx.device_info().get("max_recommended_working_set_size") or None


class WiredLimit:
    """The process's wired-memory limit, held at the recommended size while any model is alive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models = 0
        self._previous = 0

    def hold(self, model: object) -> None:
        """Raise the limit (the first time) until `model` is garbage-collected."""
        size = recommended_working_set()
        if size is None:
            return
        with self._lock:
            if self._models == 0:
                self._previous = mx.set_wired_limit(size)
            self._models += 1
        weakref.finalize(model, self._release)

    def _release(self) -> None:
        with self._lock:
            self._models -= 1
            if self._models == 0:
                mx.synchronize()  # never change the limit under a running evaluation
                mx.set_wired_limit(self._previous)


# One per process, as the limit it holds is the process's.
WIRED_LIMIT = WiredLimit()


@functools.cache
def _generation_stream(device: str) -> mx.ThreadLocalStream:
    # Keyed by the device's name: mx.Device objects hash by identity, and each stream made is a thread.
    return mx.new_thread_local_stream(mx.default_device())


def generation_stream() -> ContextManager:
    """A context in which generation's work goes to its own stream on Metal; elsewhere, nothing changes."""
    if not mx.metal.is_available():
        return contextlib.nullcontext()
    return mx.stream(_generation_stream(str(mx.default_device())))
