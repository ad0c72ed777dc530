"""The process's malloc setting: glibc keeps freed blocks for reuse instead of handing each back to the system."""

import ctypes
import os
import sys

MMAP_THRESHOLD = 32 << 20  # bytes: blocks below this come from malloc's heap, where a free keeps them for reuse
TRIM_THRESHOLD = 128 << 20  # bytes: the heap's free top goes back to the system only above this


def keep_freed_memory():
    """Let glibc's malloc keep freed blocks of up to MMAP_THRESHOLD for reuse instead of handing each back."""
    # torch's CPU tensors come straight from malloc, and glibc's defaults hand many frees of a decoder step's 11.5 MB
    # arrays (logits, softmax, gradient) back to the system, so the next step faults the same pages in again (4 M
    # page faults, a fifth of part two's time: docs/training.md). No-op on other C libraries, or when the
    # environment already sets these thresholds (glibc reads MALLOC_*_THRESHOLD_ and GLIBC_TUNABLES at start-up).
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
            or "malloc.mmap_threshold" in tunables or "malloc.trim_threshold" in tunables):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
