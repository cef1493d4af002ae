"""Stop strings, matched once: answer text is held back while it could be the start of one, cut where
one appears, and the one met is recorded (GenerationStats.stop_string), so no caller decodes again."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopStrings", "longest_stop_prefix"]


class StopStrings:
    """Answer text, held back while it could be the start of a stop string; `found` once one appears,
    and `matched`, the one met (the earliest in the text; of those starting there, the longest)."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop, self.held, self.found = tuple(stop), "", False
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """The text that can be shown now; none of it from a stop string on."""
        text = self.held + text
        found = [(i, -len(s), s) for s in self.stop if (i := text.find(s)) >= 0]
        if found:
            at, _, self.matched = min(found)
            self.held, self.found = "", True
            return text[:at]
        safe = len(text) - longest_stop_prefix(text, self.stop)
        self.held = text[safe:]
        return text[:safe]

    def finish(self, text: str) -> str:
        """The last text: what was held, unless it starts a stop string."""
        shown = self.push(text)
        shown, self.held = shown + self.held, ""
        return shown


def longest_stop_prefix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that starts some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
