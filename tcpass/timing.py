"""Timing hygiene shared by `tcpass demo` and the benchmarks under bench/."""

from __future__ import annotations

import ctypes

ALLOCATOR = {"malloc": "glibc default"}  # what machine() facts report

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def pin_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Fix glibc malloc's mmap and trim thresholds so one A/B arm's frees don't tax the other.

    By default glibc serves large blocks with mmap, raises that threshold as blocks are freed, and
    hands freed heap back to the OS; how many pages the next call faults in then depends on what
    ran before it, so one arm of an A/B timing taxes the other (docs/benchmarks.md, "Speed", has the measurement).
    Both arms run under the same setting. Same effect as
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment. Returns False (and
    changes nothing) where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes)
        )
    except (OSError, AttributeError):
        return False
    if ok:
        ALLOCATOR["malloc"] = f"glibc, mmap/trim thresholds pinned at {threshold_bytes} bytes"
    return ok
