"""Give the pages of a memory-mapped source tensor back to the kernel once it is quantized.

Loading reads every tensor of the source through a memory map; the pages it touched stay in
the process's resident set for as long as the map lives, so a 14.5 GB bf16 checkpoint would
end up fully resident even though only its 4 GB int4 form is kept.

- `madvise(MADV_PAGEOUT)` (Linux >= 5.4) asks the kernel to reclaim the pages. It never
  changes what the memory holds, so it is safe on any tensor, but the kernel may decline
  (measured: pages of a file written moments before stay mapped).
- `madvise(MADV_DONTNEED)` unmaps them for certain. On a private file mapping a page that was
  never written is simply read from the file again if touched, so the content is unchanged;
  a page that *was* written (the HF reader un-permutes wq/wk in place) would revert to the
  file's bytes. So it is only used with `unmodified=True`, for mapped pages known unwritten.

Elsewhere than Linux both are skipped: loading still works, with a higher peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

import numpy as np
import torch

MADV_DONTNEED = 4
MADV_PAGEOUT = 21
_PAGE = 4096


@cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


@cache
def _madvise():
    libc = _libc()
    if libc is None:
        return None
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def release(obj: torch.Tensor | np.ndarray, *, unmodified: bool = False) -> None:
    """Hand back the whole pages under `obj` (a CPU tensor or numpy array) that nothing will
    read again; `unmodified=True` only for a memory-mapped file region never written to."""
    madvise = _madvise()
    if madvise is None:
        return
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            return
        start, nbytes = obj.data_ptr(), obj.numel() * obj.element_size()
    else:
        start, nbytes = obj.ctypes.data, obj.nbytes
    first = (start + _PAGE - 1) // _PAGE * _PAGE
    last = (start + nbytes) // _PAGE * _PAGE
    if last > first:  # a failure only means a higher peak
        madvise(first, last - first, MADV_DONTNEED if unmodified else MADV_PAGEOUT)


@cache
def _malloc_trim():
    return getattr(_libc(), "malloc_trim", None)  # glibc only


def trim_heap() -> None:
    """Give the free pages inside glibc's heap back to the kernel (`malloc_trim(0)`).

    Quantizing leaves a trail of freed temporaries of a few MB to a few tens of MB each;
    glibc keeps such blocks in its heap for reuse, so without this a 7B int4 load from GGUF
    ended with ~1 GB of free-but-resident heap on top of the model."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
