"""OpenAI `stop` sequences over streamed text, exact for any split of the answer.

The handler decodes the model's tokens into text pieces and passes each one
through `StopMatcher.push`. A stop string may arrive split over pieces (even
one character at a time), so the matcher holds back the end of the text that
could still grow into a stop, and nothing more. Once a stop matches, the text
before it is the last thing emitted: OpenAI leaves the stop sequence out of
the answer and drops everything after it.

Which stop wins: the one that starts first in the text. When two stops start at
the same position the shorter one wins: it is complete first, so the generation
can end without waiting for more tokens, and the answer is the same either way
(only `matched` differs). These rules depend on the text alone, never on how it
was split into pieces.
"""
from __future__ import annotations

from typing import Sequence


class StopMatcher:
    """Cut an answer at its first stop sequence, piece by piece.

    `push(piece)` returns the text that is safe to show now; `flush()` returns
    the held-back tail at the end of an answer that never matched. Only a short
    window (at most the longest stop, less one character) is ever searched
    again, so a long answer costs time in proportion to its length.
    """

    def __init__(self, stops: Sequence[str] | str) -> None:
        if isinstance(stops, str):  # OpenAI's `stop` may be one string as well as a list
            stops = [stops]
        # Empty strings would match everywhere: OpenAI and vLLM ignore them, so do we.
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._prefixes = frozenset(s[:i] for s in self.stops for i in range(1, len(s)))
        self._longest = max((len(s) for s in self.stops), default=0)
        self._pending = ""
        self.matched: str | None = None
        self.done = False

    def push(self, text: str) -> str:
        """Add one piece of the answer; return what can be emitted now ('' forever after a match)."""
        if self.done:
            return ""
        if not self.stops:
            return text
        s = self._pending + text
        start, stop = self._first_match(s)
        limit = len(s) if start is None else start
        hold = self._earliest_candidate(s, limit)
        if start is not None and hold is None:
            return self._match(s, start, stop)
        cut = len(s) if hold is None else hold
        self._pending = s[cut:]
        return s[:cut]

    def flush(self) -> str:
        """End of the answer: the held-back tail, or the text before a stop that no longer has a rival."""
        if self.done:
            return ""
        s, self._pending = self._pending, ""
        start, stop = self._first_match(s)
        if start is not None:
            return self._match(s, start, stop)
        return s

    @property
    def pending(self) -> str:
        """The text held back so far (for inspection and tests)."""
        return self._pending

    def _match(self, s: str, start: int, stop: str | None) -> str:
        self.done = True
        self.matched = stop
        self._pending = ""
        return s[:start]

    def _first_match(self, s: str) -> tuple[int | None, str | None]:
        """The earliest complete stop in `s` (the shorter one on a tie)."""
        best: int | None = None
        best_stop: str | None = None
        for stop in self.stops:
            i = s.find(stop)
            if i < 0:
                continue
            if best is None or i < best or (i == best and len(stop) < len(best_stop or "")):
                best, best_stop = i, stop
        return best, best_stop

    def _earliest_candidate(self, s: str, limit: int) -> int | None:
        """The first position before `limit` from which the rest of `s` is a proper prefix of a stop.

        That is where a stop could still begin once more text arrives: the start of
        the longest such suffix, so everything before it can be emitted. When a
        complete stop was found at `limit`, a candidate before it means a longer stop
        starting earlier may still win, so the decision waits for it.
        """
        for j in range(max(0, len(s) - self._longest + 1), limit):
            if s[j:] in self._prefixes:
                return j
        return None
