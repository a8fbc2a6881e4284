"""Settings shared by the benchmark scripts: the process heap and the output folder.

Heap. glibc serves large blocks (over 128 KiB at first, adapting up to 32 MiB) with fresh memory mappings and gives
memory at the top of its heap back to the kernel once more than a threshold is free. A benchmark that frees an
attention-sized output and allocates the next one then pays a page fault per 4 KiB page on some calls: about 6,000
faults, several milliseconds, for a 25 MB tensor. Which call pays depends on the heap's history rather than on the
operation being timed, so it turns medians into noise. ``keep_freed_memory`` tells glibc to serve every block from
its main heap and never trim it, so that once the heap has grown to hold a benchmark's working set (the scripts warm
up until it has), every candidate reuses pages that are already mapped. It covers blocks allocated on the main
thread, where the benchmarks allocate their tensors: glibc's per-thread arenas still map blocks over 64 MiB afresh.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
HEAP_CHOICES = ("keep", "system")


def keep_freed_memory() -> bool:
    """Keeps freed memory in this process for reuse; returns False, changing nothing, where libc is not glibc.

    No block of the main heap is served by its own mapping, the heap is never trimmed, and it grows 256 MiB at a time,
    which lets freed attention-sized blocks settle where the next ones fit.
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


def apply_heap(choice: str) -> str:
    """Applies the ``--heap`` choice and returns a sentence describing it for a report."""
    if choice not in HEAP_CHOICES:
        raise ValueError(f"--heap must be one of {', '.join(HEAP_CHOICES)}, got {choice!r}")
    if choice == "system":
        return "Heap: the C library's defaults, so page faults of freshly mapped memory are timed (`--heap system`)."
    if keep_freed_memory():
        return "Heap: freed memory kept for reuse (glibc mallopt: no mmap blocks, no trimming; `--heap keep`)."
    return "Heap: the C library's defaults, since keeping freed memory needs glibc (`--heap keep` asked)."


def check_output_folder(parser: argparse.ArgumentParser, folder: Path) -> None:
    """Creates ``folder`` and checks that a report can be written there, before any timing; refuses via ``parser``."""
    if folder.exists() and not folder.is_dir():
        parser.error(f"--out must be a folder, got {str(folder)!r}, which is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp"):
            pass
    except OSError as error:
        parser.error(f"--out must be a folder this process can write to, got {str(folder)!r} ({error.strerror})")
