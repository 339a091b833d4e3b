"""Shared benchmark plumbing: machine facts, interleaved A/B timing, result files."""

from __future__ import annotations

import datetime
import json
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from tcpass.timing import ALLOCATOR as _ALLOCATOR
from tcpass.timing import pin_allocator

RESULTS = Path(__file__).parent / "results"


def add_allocator_option(parser) -> None:
    """``--malloc-default`` on a bench's argparse parser; call `apply_allocator_option` after parsing."""
    parser.add_argument(
        "--malloc-default",
        action="store_true",
        help="leave glibc malloc's adaptive thresholds on (default: pinned, see tcpass.timing.pin_allocator)",
    )


def apply_allocator_option(args) -> None:
    if not args.malloc_default:
        pin_allocator()


def add_guidance_options(parser) -> None:
    """``--guidance`` and ``--guidance-interval`` on a bench's parser; `guidance_interval_of` resolves the latter."""
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="model timesteps guided (0 1000: every step; default: the reference model's own, emoji 100 700)",
    )


def guidance_interval_of(args, ref) -> tuple[float, float] | None:
    """``--guidance-interval`` as given, else the reference model's (`tcpass.zoo.ReferenceModel.guidance_interval`)."""
    from tcpass.schedule import check_guidance_interval

    return check_guidance_interval(args.guidance_interval) or ref.guidance_interval


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


def fidelity_row(speedups: list[float], quality: dict[str, list[float]], frechet: float) -> dict:
    """The numbers every quality bench reports for one variant: speedup (median, min-max over rounds),
    PSNR/SSIM vs full compute and class accuracy (mean and std over seeds), Fréchet distance to real."""
    return {
        "speedup_median": statistics.median(speedups),
        "speedup_min_max": [min(speedups), max(speedups)],
        "psnr_db_mean": float(np.mean(quality["psnr"])),
        "psnr_db_std": float(np.std(quality["psnr"])),
        "ssim_mean": float(np.mean(quality["ssim"])),
        "ssim_std": float(np.std(quality["ssim"])),
        "class_acc_mean": float(np.mean(quality["acc"])),
        "class_acc_std": float(np.std(quality["acc"])),
        "frechet_vs_heldout": frechet,
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(name: str, payload: dict) -> Path:
    """``payload`` as bench/results/``name``, with the command that ran and today's date (what
    `bench/report.py` prints under every table made from it)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    stamp = {"command": "python " + shlex.join(sys.argv), "date": datetime.date.today().isoformat()}
    path.write_text(json.dumps({**stamp, **payload}, indent=2, default=str) + "\n")
    return path
