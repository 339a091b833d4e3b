"""What every calibration method returns and writes: its candidates (`Candidate`), one report
(`CalibrationReport`: the chosen plan, every candidate, the frontier, what the method measured) and one
writer (`write_calibration`: the sidecar ``<plan stem>.calibration.json``, then the plan).

Token calibration (`tcpass.calibrate.calibrate`) and step calibration (`tcpass.calibrate.calibrate_steps`)
differ only in what they measure on the way (``details``: block sensitivity and step times, or magnitude
ratios and call times) and the lines that summarise it (``summary``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tcpass.files import write_atomic
from tcpass.plan import CachePlan, save_plan


@dataclass
class Candidate:
    """One plan a calibrator considered (token search, step search, forecasts, compositions).

    ``predicted_speedup``: the one speed model's figure (`tcpass.calibrate.speed.predict_speedup`);
    ``psnr_db``: its calibration samples vs full compute (None: not generated); ``family``: what kind of
    plan it is, for reports and plots (``"token caching"``, ``"fewer steps"``, ``"spread stack"``,
    ``"spread output"``, ``"skip, reuse"``, ``"skip, scaled reuse"``, ``"skip, forecast"``, ``"skip + token
    caching"``); ``rule``: ``(retention, max_skip_steps)`` of a MagCache-rule skip table and what derives
    from it; ``measured_speedup``: whole generations, interleaved with full compute.
    """

    plan: CachePlan
    predicted_speedup: float
    psnr_db: float | None = None
    name: str = ""
    family: str = "token caching"
    rule: tuple[float, int] | None = None
    measured_speedup: float | None = None

    @property
    def label(self) -> str:
        """``name``, or for an unnamed token-caching candidate what its plan does."""
        if self.name:
            return self.name
        p, s = self.plan, self.plan.schedule
        blocks = "all" if p.blocks == "all" else len(p.blocks)
        keep = "/".join(f"{r:g}" for r in p.keep_ratio)
        every = "/".join(str(i) for i in s.intervals)
        return f"tokens: {blocks} blocks, keep {keep}, FULL every {every} (t={s.boundary_timestep:g}), {p.attention}"


def frontier(candidates: list[Candidate]) -> list[Candidate]:
    """The scored candidates no other beats on both predicted speed and PSNR, fastest first."""
    scored = sorted((c for c in candidates if c.psnr_db is not None), key=lambda c: (-c.predicted_speedup, -c.psnr_db))
    out, best = [], -math.inf
    for c in scored:
        if c.psnr_db > best:
            out.append(c)
            best = c.psnr_db
    return out


@dataclass
class CalibrationReport:
    """A calibration's outcome, whatever its method.

    Attributes:
        method: ``"tokens"`` or ``"steps"`` (the ``tcpass calibrate`` subcommand).
        plan: the plan written (the chosen candidate's, with its ``notes``).
        chosen: the chosen candidate; ``candidates``: every candidate considered.
        measured_speedup: the chosen plan on whole generations vs full compute (x; None: not measured).
        target_speedup: the target it was chosen for (None: a quality floor); ``tolerance``: a measured
            speedup of ``(1 - tolerance) x target`` reaches it; ``speed_bias``: measured / predicted
            speedup of one whole generation, before candidates were drawn (1: not measured).
        details: what the method measured on the way (JSON values), written to the sidecar as is.
        summary: lines describing them, printed above the candidates.
        seconds: wall-clock seconds the calibration took.
    """

    method: str
    plan: CachePlan
    chosen: Candidate
    candidates: list[Candidate]
    measured_speedup: float | None = None
    target_speedup: float | None = None
    tolerance: float = 0.0
    speed_bias: float = 1.0
    details: dict[str, Any] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def predicted_speedup(self) -> float:
        """The chosen plan's predicted speedup (x)."""
        return self.chosen.predicted_speedup

    @property
    def psnr_db(self) -> float | None:
        """The chosen plan's calibration PSNR (dB vs full compute)."""
        return self.chosen.psnr_db

    def frontier(self) -> list[Candidate]:
        """The candidates no other beats on both predicted speed and calibration PSNR, fastest first."""
        return frontier(self.candidates)

    def format(self) -> str:
        front = {id(c) for c in self.frontier()}
        width = max([62, *(len(c.label) + 4 for c in self.candidates)])
        head = f"{'candidate (* on the frontier)':{width}} {'predicted':>9} {'measured':>9} {'PSNR dB':>8}"
        rows = [*self.summary, head]
        for c in sorted(self.candidates, key=lambda c: c.predicted_speedup):
            mark = "  <- chosen" if c is self.chosen else ""
            psnr = "-" if c.psnr_db is None else f"{c.psnr_db:8.2f}"
            measured = "-" if c.measured_speedup is None else f"{c.measured_speedup:8.2f}x"
            name = ("* " if id(c) in front else "  ") + c.label
            rows.append(f"{name:{width}} {c.predicted_speedup:8.2f}x {measured:>9} {psnr:>8}{mark}")
        families: dict[str, list[Candidate]] = {}
        for c in self.candidates:
            if c.psnr_db is not None:
                families.setdefault(c.family, []).append(c)
        rows.append(
            "best per kind: "
            + "; ".join(f"{f} {max(cs, key=lambda c: c.psnr_db).psnr_db:.2f} dB" for f, cs in sorted(families.items()))
            + " (in the window evaluated)"
        )
        if self.target_speedup is not None and self.speed_bias != 1.0:
            rows.append(
                f"speed bias (measured / predicted, one whole generation): {self.speed_bias:.3f}; candidates "
                f"evaluated around {self.target_speedup / self.speed_bias:.2f}x predicted"
            )
        if self.measured_speedup is not None:
            rows.append(f"chosen plan, measured on whole generations: {self.measured_speedup:.2f}x")
            if self.target_speedup is not None and self.measured_speedup < (1 - self.tolerance) * self.target_speedup:
                rows.append(
                    f"TARGET MISSED: no verified candidate reached {self.target_speedup}x (less "
                    f"{self.tolerance:.0%}); wrote the fastest verified."
                )
        if self.seconds:
            rows.append(f"calibration time: {self.seconds:.0f} s")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's content: the choice, the frontier, every candidate, and ``details``."""
        return {
            "method": self.method,
            "chosen": self.chosen.label,
            "target_speedup": self.target_speedup,
            "speed_tolerance": self.tolerance,
            "speed_bias": self.speed_bias,
            "measured_speedup": self.measured_speedup,
            "seconds": self.seconds,
            **self.details,
            "frontier": [c.label for c in self.frontier()],
            "candidates": [
                {
                    "name": c.label,
                    "family": c.family,
                    "predicted_speedup": c.predicted_speedup,
                    "psnr_db": c.psnr_db,
                    "measured_speedup": c.measured_speedup,
                    "plan": c.plan.to_dict(),
                }
                for c in self.candidates
            ],
        }


def write_calibration(out: str | Path, report: CalibrationReport) -> None:
    """A calibration's files, each written atomically (temp + rename): the sidecar
    ``<out stem>.calibration.json`` (`CalibrationReport.to_dict`) first, the plan last, so a plan on disk
    always has the sidecar of its own calibration beside it and an interrupted run leaves the previous
    plan in place."""
    out = Path(out)
    write_atomic(out.with_name(out.stem + ".calibration.json"), json.dumps(report.to_dict(), indent=1) + "\n")
    save_plan(report.plan, out)


def plot_frontier(report: CalibrationReport, path: str | Path) -> Path:
    """Draw every scored candidate (predicted speedup vs calibration PSNR, one colour per kind), the
    frontier, the chosen plan and the measured speeds to ``path`` (PNG; needs matplotlib). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[Candidate]] = {}
    for c in report.candidates:
        if c.psnr_db is not None and math.isfinite(c.psnr_db):
            families.setdefault(c.family, []).append(c)
    for family, cs in sorted(families.items()):
        ax.scatter([c.predicted_speedup for c in cs], [c.psnr_db for c in cs], s=14, label=family, alpha=0.8)
    front = [c for c in report.frontier() if math.isfinite(c.psnr_db)]
    ax.plot([c.predicted_speedup for c in front], [c.psnr_db for c in front], "k-", lw=1, label="frontier")
    measured = [c for c in report.candidates if c.measured_speedup is not None and c.psnr_db is not None]
    ax.scatter(
        [c.measured_speedup for c in measured], [c.psnr_db for c in measured], marker="x", c="k", label="measured"
    )
    if report.chosen.psnr_db is not None and math.isfinite(report.chosen.psnr_db):
        ax.scatter([report.chosen.predicted_speedup], [report.chosen.psnr_db], marker="*", s=160, c="red",
                   label=f"chosen: {report.chosen.label}")  # fmt: skip
    if report.target_speedup is not None:
        ax.axvline(report.target_speedup, color="grey", ls=":", lw=1)
    ax.set_xlabel("speedup vs full compute (predicted from per-call times; x: measured)")
    ax.set_ylabel("PSNR vs full compute, calibration samples (dB)")
    ax.set_title(f"tcpass calibrate {report.method}: candidates and frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
