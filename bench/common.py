"""Shared benchmark plumbing: machine facts, interleaved A/B timing, result files."""

from __future__ import annotations

import ctypes
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


_ALLOCATOR = {"malloc": "glibc default"}

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def pin_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Fix glibc malloc's mmap and trim thresholds so one A/B arm's frees don't tax the other.

    By default glibc serves large blocks with mmap, raises that threshold as blocks are freed, and
    hands freed heap back to the OS; how many pages the next call faults in then depends on what
    ran before it. Measured on this machine (DiT-S/2, eager, 5 interleaved rounds): the uncached
    baseline's first generation took 6.2 s and, after tcpass generations had run beside it, 7.2 to
    8.3 s, which inflated the speedup to 2.07x; with the thresholds fixed it took 5.9 to 6.1 s
    throughout and the speedup was 1.77x. Both arms run under the same setting. Same effect as
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
        _ALLOCATOR["malloc"] = f"glibc, mmap/trim thresholds pinned at {threshold_bytes} bytes"
    return ok


def machine() -> dict:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    versions = {}
    for pkg in ("torch", "diffusers", "onnxruntime", "tcpass"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        **_ALLOCATOR,
        **versions,
    }


def summary(seconds: list[float]) -> dict:
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "all": seconds}


def interleaved(variants: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Warm each variant up once, then time them in turn, ``reps`` rounds; seconds per call."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def ratio_median(base: list[float], other: list[float]) -> float:
    """Median over rounds of base/other: the speedup, robust to drift between rounds."""
    return statistics.median(b / o for b, o in zip(base, other, strict=True))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
