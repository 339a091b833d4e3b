"""Numeric comparisons that hold on any x86 CPU.

ATen picks its kernels by the CPU (``ATEN_CPU_CAPABILITY`` default / avx2 / avx512, oneDNN and MKL
blocking, the thread count), so two graphs computing the same function, or one graph at another batch
size, agree only up to float rounding, and by how much depends on the machine. Every numeric comparison
in tests/ therefore bounds the error in *units*: multiples of the dtype's machine epsilon at the scale of
the values compared,

    max |got - want| <= units * eps(dtype) * max |want|

and names the bound when it fails. A budget is chosen per kind of comparison (the constants below) from
the worst error measured under the three kernel sets with one and two threads (``bash
tests/kernel_sets.sh``, which prints each call site's worst case against its budget), with a margin of
at least 6x; tests that can fail by less than that show it (a wrong plan in
tests/test_calibrate_steps.py lands at ~700 units, beyond ``REGROUPED``).

With ``TCPASS_TOLERANCE_LOG=<file>`` every call appends its measured error (in units) as a JSON line.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import numpy as np
import torch

# Budgets, in units of eps at the compared values' scale. The worst error measured under the three kernel
# sets with one and two threads (tests/kernel_sets.sh, 2026-12-03, AMD EPYC, torch 2.13) is in brackets.
EXACT = 0  # the same graph on the same shapes in one process: bit-identical by construction
REGROUPED = 32  # the same ops on the same shapes through another graph (traced vs eager, a reference written
# with hooks vs the passes, fused or sliced), one call or a whole generation  [3.9]
OTHER_KERNELS = 512  # other kernels: another batch size, inductor's generated code, ONNX Runtime; one call
# or a whole generation (errors compound over steps and guidance)  [74.5]


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _eps(x, dtype: torch.dtype | None = None) -> float:
    if dtype is not None:
        return torch.finfo(dtype).eps
    if isinstance(x, torch.Tensor):
        return torch.finfo(x.dtype).eps
    return float(np.finfo(np.asarray(x).dtype).eps)


def error_units(got, want, dtype: torch.dtype | None = None) -> float:
    """max |got - want| in units of eps(``dtype``, default ``want``'s) * max |want|."""
    g, w = _as_numpy(got), _as_numpy(want)
    assert g.shape == w.shape, f"shapes differ: {g.shape} vs {w.shape}"
    scale = float(np.abs(w).max()) if w.size else 0.0
    err = float(np.abs(g - w).max()) if w.size else 0.0
    if err == 0.0:
        return 0.0
    return err / (_eps(want, dtype) * scale) if scale > 0 else float("inf")


def assert_close(got, want, *, units: float, what: str = "", dtype: torch.dtype | None = None) -> None:
    """Assert ``max |got - want| <= units * eps * max |want|`` (torch tensors or numpy arrays).

    ``eps`` is the machine epsilon of ``dtype``: by default ``want``'s, or the precision the values were
    computed in where they were cast since (bfloat16 images returned as float32); with ``units=EXACT``
    the two must be identical.
    """
    measured = error_units(got, want, dtype)
    _log(measured, units, what)
    if units == EXACT:
        assert measured == 0.0, f"{what}: expected bit-identical values, differ by {measured:.3g} units"
        return
    w = _as_numpy(want)
    bound = units * _eps(want, dtype) * float(np.abs(w).max())
    assert measured <= units, (
        f"{what}: max error {measured:.3g} units of eps at the values' scale > {units} "
        f"(absolute {float(np.abs(_as_numpy(got) - w).max()):.3g} > {bound:.3g})"
    )


def _log(measured: float, units: float, what: str) -> None:
    path = os.environ.get("TCPASS_TOLERANCE_LOG")
    if not path:
        return
    frame = inspect.stack()[2]
    record = {
        "site": f"{Path(frame.filename).name}:{frame.lineno}",
        "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
        "what": what,
        "units": units,
        "measured": measured,
        "capability": os.environ.get("ATEN_CPU_CAPABILITY", "native"),
        "threads": torch.get_num_threads(),
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
