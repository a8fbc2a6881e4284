"""Heap settings shared by the benchmark scripts.

glibc serves large blocks (over 128 KiB at first, adapting up to 32 MiB) with fresh memory mappings and gives memory
at the top of its heap back to the kernel once more than a threshold is free. A benchmark that frees an
attention-sized output and allocates the next one then pays a page fault per 4 KiB page on some calls: about 6,000
faults, several milliseconds, for a 25 MB tensor. Which call pays depends on the heap's history rather than on the
operation being timed, so it turns medians into noise. ``keep_freed_memory`` tells glibc to serve every block from its
heap and never trim it: after the warm-up every candidate reuses pages that are already mapped.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
HEAP_CHOICES = ("keep", "system")


def keep_freed_memory() -> bool:
    """Keeps freed memory in this process for reuse; returns False, changing nothing, where libc is not glibc.

    No block is served by its own mapping, the heap is never trimmed, and it grows 256 MiB at a time, which lets
    freed attention-sized blocks settle where the next ones fit.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = [(M_MMAP_THRESHOLD, 32 * 2**20), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 2**28)]
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)


def apply(choice: str) -> str:
    """Applies the ``--heap`` choice and returns how to describe it in a report."""
    if choice not in HEAP_CHOICES:
        raise ValueError(f"--heap must be one of {', '.join(HEAP_CHOICES)}, got {choice!r}")
    if choice == "system":
        return "heap: the C library's defaults (page faults of freshly mapped memory are timed)"
    if keep_freed_memory():
        return "heap: freed memory kept for reuse (glibc mallopt: no mmap blocks, no trimming) for every candidate"
    return "heap: the C library's defaults (keeping freed memory needs glibc)"
