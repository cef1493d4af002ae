"""The store of finished responses that `previous_response_id` continues: in memory, bounded by count
and bytes, the least recently used evicted first."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict

from ..submission.refusal import ApiError

log = logging.getLogger("qwen3_mlx.server")


class ResponseStore:
    """Finished responses kept for `previous_response_id`, in memory: the most recently used first out
    when there are more than `max_count` or they take more than `max_bytes` (their JSON). An evicted id
    is remembered (up to 16 times `max_count` of them), so that a request naming it is told why."""

    def __init__(self, max_count: int = 256, max_bytes: int = 64 << 20) -> None:
        self.max_count, self.max_bytes = max_count, max_bytes
        self._entries: OrderedDict[str, tuple[list[dict], dict, int]] = OrderedDict()
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, rid: str, items: list[dict], body: dict) -> None:
        """Keep a response: the conversation it ends (input items, then its output) and its body."""
        size = len(json.dumps(items)) + len(json.dumps(body))
        with self._lock:
            self._entries[rid] = (items, body, size)
            self._bytes += size
            while self._entries and (len(self._entries) > self.max_count or self._bytes > self.max_bytes):
                old, (_, _, old_size) = self._entries.popitem(last=False)
                self._bytes -= old_size
                self._evicted[old] = None
                log.info("responses: %s evicted from the store (%d kept, %d bytes)", old, len(self._entries),
                         self._bytes)
            while len(self._evicted) > 16 * self.max_count:
                self._evicted.popitem(last=False)

    def get(self, rid: str, param: str = "previous_response_id") -> tuple[list[dict], dict]:
        """(the conversation, the body) of a stored response.

        Raises:
            ApiError: a 404 for an id never stored here, or one evicted since (the message says which).
        """
        with self._lock:
            if rid in self._entries:
                self._entries.move_to_end(rid)
                items, body, _ = self._entries[rid]
                return items, body
            evicted = rid in self._evicted
        if evicted:
            raise ApiError(404, f"{param}: the response {rid!r} was evicted from the server's in-memory store (it "
                                f"keeps {self.max_count} responses, {self.max_bytes} bytes); send the whole "
                                "conversation as input", param=param, code="response_evicted")
        raise ApiError(404, f"{param}: no response {rid!r} is stored here (responses sent with store=false, or "
                            "before the server started, are not); send the whole conversation as input",
                       param=param, code="not_found")
