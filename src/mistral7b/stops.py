"""Stop strings on streamed text: emit as early as possible, never emit a stop string.

Text arrives as deltas (one per decoded token, of any length). A stop string can straddle
any number of deltas, so :class:`StopMatcher` holds back only the tail that could still
become a stop and emits the rest at once.

Rule: the output is ``text[:i]`` where ``i`` is the earliest position at which any stop
string occurs (the whole text when none does). The earliest *start* wins, not the first
stop to complete: with stops ``["abcd", "c"]``, after "xabc" the matcher emits "x" and waits,
because "abcd" may still occur at 1; "d" next gives "x", anything else gives "xab". This
makes the result independent of how the text was split into deltas. When two stops occur at
the same position (one is then a prefix of the other) the shorter is reported as
``matched``: it completes first. The emitted text is the same either way.

Worked example, stops ``["###"]``: push("Hello #") -> ("Hello ", False) holding "#";
push("#") -> ("", False) holding "##"; push("# bye") -> ("", True). Everything emitted:
"Hello ".
"""

from __future__ import annotations

from collections.abc import Sequence

from mistral7b.errors import InputError


class StopMatcher:
    """Cut a stream of text deltas at the earliest occurrence of any stop string.

    After a push returns ``stopped=True`` the stream is over: later pushes return
    ``("", True)``. When the stream ends without a stop, call :meth:`flush` for the held
    tail. ``matched`` is the stop string that ended the stream (None until one does).
    """

    def __init__(self, stops: Sequence[str] | str = ()) -> None:
        if isinstance(stops, str):
            stops = (stops,)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise InputError(f"each stop string must be a non-empty string, got {s!r}")
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stops))
        # a pending (incomplete) stop occupies at most len(stop) - 1 trailing characters
        self._max_pending = max((len(s) for s in self.stops), default=1) - 1
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, delta: str) -> tuple[str, bool]:
        """Feed the next delta; return (text safe to emit now, whether a stop was reached)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        text = self._held + delta
        cut, match = self._first_start(text, final=False)
        if match is not None:
            self._stop(match)
            return text[:cut], True
        self._held = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        """End of stream without a stop: return the held tail (cut at a stop if one is in it).

        The tail can contain a complete stop that was waiting on a longer stop starting
        earlier; then the text before it is returned and ``stopped`` becomes True.
        """
        if self.stopped:
            return ""
        text, self._held = self._held, ""
        cut, match = self._first_start(text, final=True)
        if match is not None:
            self._stop(match)
        return text[:cut]

    def _stop(self, match: str) -> None:
        self.stopped = True
        self.matched = match
        self._held = ""

    def _first_start(self, text: str, *, final: bool) -> tuple[int, str | None]:
        """Earliest position where a stop occurs, or (unless final) could still occur.

        Returns (position, the stop found there) when a complete stop starts first, and
        (position, None) when an incomplete one does or nothing does (position = len(text)).
        """
        best, match = len(text), None
        for s in self.stops:
            i = text.find(s)
            if i == -1:
                continue
            if match is None or i < best or (i == best and len(s) < len(match)):
                best, match = i, s
        if final:
            return best, match
        # positions j whose tail text[j:] is a proper prefix of some stop
        for j in range(max(0, len(text) - self._max_pending), best):
            tail = text[j:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return j, None
        return best, match
