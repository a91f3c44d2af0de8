"""Keep the memory of one step's temporaries for the next step (glibc, on the CPU).

A pre-fill step allocates and frees tens of MB per layer: a 256-token 7B step makes
(256, 14336) float32 outputs of 14.7 MB for w1 and w3, and their SwiGLU. glibc's malloc
serves such blocks from fresh memory each time: above its mmap threshold each one is a new
mapping, and below it, memory freed at the top of the heap goes back to the OS once more
than the trim threshold is free. Either way every 4 KiB page is faulted in again on first
touch. Measured on the 7B Q4_0 file (2 cores, 256-token pre-fill): 100k to 390k minor
faults and 0.2-0.75 s of system time per step in some processes; with the thresholds
below, none (tests/test_heap.py: a repeated step faults in 0-1 pages, 8,800 without).

So, on the first CPU step (`keep_step_memory`, called by the engine), the mmap threshold is
fixed at glibc's largest (32 MiB: larger blocks, the weights among them, stay separate
mappings and go back to the OS when freed) and the trim threshold raised to 256 MiB (what
a step frees below 32 MiB stays in the heap for the next one). A user who set these
thresholds (MALLOC_MMAP_THRESHOLD_ and the like, or glibc.malloc tunables) keeps their
settings; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20     # glibc refuses more (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 256 << 20

_state: bool | None = None    # what the first call did


# the environment variables by which a user sets the same thresholds (mallopt(3))
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_MMAP_MAX_")


def user_tuned() -> bool:
    """Whether the environment already sets malloc's thresholds."""
    return any(k in os.environ for k in USER_SETTINGS) or (
        "malloc" in os.environ.get("GLIBC_TUNABLES", ""))


def keep_step_memory() -> bool:
    """Set glibc's thresholds once per process (module docstring); True when they are set."""
    global _state
    if _state is None:
        _state = _set_thresholds()
    return _state


def _set_thresholds() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_tuned():
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; the order matters: setting either one turns off glibc's
    # own adjustment of both, so the mmap threshold must not stay at its 128 KiB start
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
