"""Progress bars for long work (loading, quantizing, evaluating), on stderr.

One switch, scoped rather than global: bars show only inside `enabled()` (a context
variable), so the Python API stays quiet unless asked (`load(..., progress=True)`) and the
CLI turns them on around a command (off with `-q`). Inside, tqdm's own rule applies
(`disable=None`): a bar is drawn only when stderr is a terminal, so pipes and logs never
get carriage-return noise.

    with progress.enabled():
        for name in progress.bar(names, desc="loading", unit="tensor"):
            ...

Loading bars are for checkpoints worth waiting for: `big(n_bytes)` is true from
LARGE_BYTES (1 GB; MISTRAL7B_PROGRESS_MIN_BYTES overrides it, which is how the tests see
a bar on a tiny model), so the 100 MB default model loads without one.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

LARGE_BYTES = 10**9
MIN_BYTES_ENV = "MISTRAL7B_PROGRESS_MIN_BYTES"

_ENABLED: ContextVar[bool] = ContextVar("mistral7b_progress", default=False)


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Show bars (stderr being a terminal) for the work done inside, on this thread."""
    token = _ENABLED.set(on)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def is_enabled() -> bool:
    return _ENABLED.get()


def big(n_bytes: int) -> bool:
    """Whether loading `n_bytes` of checkpoint deserves a bar."""
    try:
        threshold = int(os.environ.get(MIN_BYTES_ENV, LARGE_BYTES))
    except ValueError:
        threshold = LARGE_BYTES
    return n_bytes >= threshold


def bar(iterable: Iterable[T] | None = None, *, total: float | None = None, desc: str = "",
        unit: str = "it", show: bool = True) -> tqdm[T]:
    """A tqdm bar on stderr, drawn only inside `enabled()`, when `show`, on a terminal."""
    disable = None if (show and is_enabled()) else True
    # A terminal that reports a 0 x 0 size (a fresh pty, `script`, some `docker exec -t`)
    # makes tqdm draw nothing at all: draw 80 columns there.
    known = _size_known()
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                dynamic_ncols=known, ncols=None if known else 80,
                nrows=None if known else 24, disable=disable)


def _size_known() -> bool:
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return size.columns > 0 and size.lines > 0
