"""Keep freed memory in the process while it trains on a CPU (glibc's malloc).

A training step frees and allocates the same large tensors every step. With glibc's default
settings the heap is trimmed (its top handed back to the OS) whenever more than twice the
largest recently freed block is free at the top, and the next step touches those pages again: a
page fault and a zeroed page per 4 KiB. On the demo CNN (batch 64, 2 threads) a W4A4 QAT+KD step
page-faulted 1200-2700 times, a few ms of a 30 ms step, and whether it did depended on the
process (the same benchmark gave 1.02x and 1.25x the fp32 step in two processes). Raising the
mmap and trim thresholds keeps the freed blocks in the heap for the next step, as PyTorch's CUDA
caching allocator does on a GPU: the process's resident memory stays at its peak instead of
shrinking between steps.

The ``qdistill`` command calls ``keep_freed_memory()`` before it trains (its process is its own).
A program that imports qdistill decides for itself: call it, set ``MALLOC_TRIM_THRESHOLD_`` and
``MALLOC_MMAP_THRESHOLD_`` in the environment, or preload jemalloc/tcmalloc.

Example:
    >>> keep_freed_memory() in (True, False)   # False off glibc, or where the environment already chose
    True
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2): smaller blocks stay in the heap
TRIM_THRESHOLD = 1 << 30  # hand the heap's top back only when 1 GiB of it is free
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process; True when they were set.

    Nothing is changed off Linux, where the C library is not glibc, or where the environment
    already configures the allocator (``MALLOC_*_`` variables, or a preloaded allocator).
    """
    if not sys.platform.startswith("linux") or any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl and others read mallopt's parameters differently
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


__all__ = ["keep_freed_memory"]
