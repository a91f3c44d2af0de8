"""How many threads a step uses: the count that is fastest on the cores actually free.

A decode step is a few hundred short parallel regions (one per matmul). Each region ends at a
barrier, so it runs at the pace of its slowest thread. When another process keeps one of
two cores busy, the thread that shares that core gets a time slice now and then, and every
region waits for it: measured on SmolLM2-135M int4, 2 cores, one busy neighbour, a decode
step took 60-78 ms with 2 threads and 19.5 ms with 1 (quiet: ~15 ms with 2). The OS cannot
fix this; choosing fewer threads can.

So the governor measures rather than guesses: it times a few steps at each candidate count
(all threads, half, one), keeps the fastest, and probes again when its steps become clearly
slower than what it measured (a neighbour arrived) or after a while (one may have left):

    probe: 3 steps at each of [2, 1]  ->  median 15.1 ms / 24.0 ms  ->  hold 2
    hold:  steps at 2 threads; the recent median climbs past 1.5 x 15.1 ms  ->  probe again

Only steps of the same kind are compared (decode steps of a batch of similar size); the
caller decides which steps it reports. A count the user fixed (`-t N`) is never changed.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PROBE_STEPS = 3          # steps timed per candidate
REPROBE_AFTER = 256      # steps held before probing again anyway
SLOWER = 1.5             # re-probe when the recent median exceeds this x the chosen time
RECENT = 8               # steps in the recent median


def candidates(max_threads: int) -> list[int]:
    """All threads, half of them, one (distinct, largest first)."""
    return sorted({max_threads, max(1, max_threads // 2), 1}, reverse=True)


class ThreadGovernor:
    """Chooses torch's intra-op thread count from measured step times (module docstring)."""

    def __init__(self, max_threads: int, *,
                 set_threads: Callable[[int], None] | None = None) -> None:
        if set_threads is None:
            import torch

            set_threads = torch.set_num_threads
        self.set_threads = set_threads
        self.options = candidates(max(1, max_threads))
        self.threads = self.options[0]
        self.chosen_seconds = 0.0
        self._probe: list[tuple[int, list[float]]] = []
        self._recent: deque[float] = deque(maxlen=RECENT)
        self._held = 0
        self.probes = 0
        self._start_probe()

    def _start_probe(self) -> None:
        self._probe = [(n, []) for n in self.options] if len(self.options) > 1 else []
        self._recent.clear()
        self._held = 0
        if self._probe:
            self.probes += 1
            self._use(self._probe[0][0])

    def _use(self, n: int) -> None:
        if n != self.threads:
            self.set_threads(n)
            self.threads = n

    def record(self, seconds: float) -> None:
        """One step took `seconds` at the current thread count; choose the next count."""
        if self._probe:
            for n, times in self._probe:
                if n == self.threads and len(times) < PROBE_STEPS:
                    times.append(seconds)
                    break
            pending = [n for n, times in self._probe if len(times) < PROBE_STEPS]
            if pending:
                self._use(pending[0])
                return
            best, times = min(self._probe, key=lambda p: statistics.median(p[1]))
            self.chosen_seconds = statistics.median(times)
            self._probe = []
            self._use(best)
            return
        self._held += 1
        self._recent.append(seconds)
        slow = (len(self._recent) == RECENT
                and statistics.median(self._recent) > SLOWER * self.chosen_seconds)
        if slow or self._held >= REPROBE_AFTER:
            self._start_probe()

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Time the step in the `with` block and record it (not when it raised)."""
        t0 = time.perf_counter()
        yield
        self.record(time.perf_counter() - t0)
