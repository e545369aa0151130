"""How this process's C allocator treats freed memory: ``retain_freed_memory()``.

Its own module because it is process-wide: the model code never calls it; ``optimize_for_inference``,
``Classifier`` (so ``cvt predict``, ``cvt eval`` and ``cvt serve``), ``cvt train`` and ``cvt bench`` do,
and nothing does on import.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc's malloc keep the memory PyTorch frees, so the next call reuses it; True if applied.

    By default glibc serves each large tensor with a fresh ``mmap`` and unmaps it when freed, so every
    forward faults in and zeroes its activations again: at batch 32 a CvT-13 forward took 650,000
    page faults and 1.7 s of system time (3.2 s in all; 2.1 s with this), on an AVX2 Zen 3
    (docs/performance.md). With this, large blocks come from the heap and the heap is not trimmed:
    the process keeps its peak memory, as ONNX Runtime's arena does. Process-wide, so it is applied by
    the inference entry points and torchcvt's commands, never on import. ``$TORCHCVT_RETAIN_MEMORY=0``
    turns it off; without glibc (musl, macOS, Windows) it does nothing.
    """
    if sys.platform != "linux" or os.environ.get("TORCHCVT_RETAIN_MEMORY") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):  # not glibc
        return False
    # One arena: threads started from now on (a server's model thread) allocate from the main heap
    # too; glibc unmaps a thread arena's emptied 64 MiB heaps whatever the trim threshold says.
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and mallopt(_M_ARENA_MAX, 1) == 1
