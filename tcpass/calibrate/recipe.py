"""The whole token-caching recipe (`calibrate`): data, sensitivity, predictor, search, report, files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tcpass.adapters import adapter_for
from tcpass.calibrate.data import collect, sampler_notes
from tcpass.calibrate.mixing import block_sensitivity, predictor_scorer, topk_error, train_predictor
from tcpass.calibrate.search import Candidate, search_schedule, verify_speedup, write_calibration
from tcpass.calibrate.speed import StepTimes, measure_plausible_step_times
from tcpass.files import plain_file_mode
from tcpass.plan import CachePlan, ForecastSpec, SelectorSpec
from tcpass.predictor import StaticPredictor, save_predictor
from tcpass.trace import reusing_traces


# The whole recipe ---------------------------------------------------------------------------------
@dataclass
class CalibrationReport:
    plan: CachePlan
    sensitivity: list[float]
    block_order: list[int]
    times: StepTimes
    predicted_speedup: float
    psnr_db: float
    candidates: list[Candidate]
    train_losses: list[float] = field(default_factory=list)
    selection_error: dict[str, float | str] = field(default_factory=dict)  # `topk_error` per selector
    seconds: float = 0.0
    measured_speedup: float | None = None  # whole generations, interleaved with full compute

    def format(self) -> str:
        s = self.plan.schedule
        blocks = "all" if self.plan.blocks == "all" else list(self.plan.blocks)
        lines = [
            f"blocks cached      : {blocks} (least sensitive first: {self.block_order})",
            "block sensitivity  : " + ", ".join(f"{b}:{v:.4f}" for b, v in enumerate(self.sensitivity)),
            f"selector           : {self.plan.selector.kind}   attention: {self.plan.attention}   "
            f"pruned tokens: {forecast_name(self.plan.forecast)}",
            f"keep ratio         : phase 0 {self.plan.keep_ratio[0]:.2f}, phase 1 {self.plan.keep_ratio[1]:.2f}",
            f"TPRR schedule      : boundary t={s.boundary_timestep:g}, intervals {s.intervals}",
            f"step times         : eager {self.times.eager * 1e3:.1f} ms, FULL {self.times.full * 1e3:.1f} ms, "
            + ", ".join(f"CACHED@{r:g} {t * 1e3:.1f} ms" for r, t in sorted(self.times.cached.items())),
            f"predicted speedup  : {self.predicted_speedup:.2f}x (wall clock, from measured step times)",
            *(
                [f"measured speedup   : {self.measured_speedup:.2f}x (whole generations vs full compute)"]
                if self.measured_speedup is not None
                else []
            ),
            f"calibration PSNR   : {self.psnr_db:.2f} dB vs full compute ({len(self.candidates)} candidates run)",
        ]
        if self.selection_error:
            lines.append(
                "top-K error @0.25  : "
                + ", ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in self.selection_error.items()
                )
                + "  (output error left vs caching every token; lower is better)"
            )
        lines.append(f"calibration time   : {self.seconds:.0f} s")
        return "\n".join(lines)


@reusing_traces()
def calibrate(
    model: nn.Module,
    out: str | Path,
    *,
    target_speedup: float | None = None,
    min_psnr: float | None = None,
    predictor: str = "dynamic",
    attention: str | tuple[str, ...] = ("cached_kv", "full_kv"),
    forecasts: tuple[ForecastSpec | None, ...] = (None,),
    batch: int = 2,
    num_samples: int = 16,
    steps: int = 50,
    iterations: int = 150,
    ratios: tuple[float, ...] = (0.1, 0.15, 0.25, 0.35, 0.5),
    seed: int = 1234,
    verify_reps: int = 2,
    sample_range: tuple[float, float] | None = None,
    progress: bool = True,
    conditioning: tuple[dict, dict | None] | None = None,
    guidance_scale: float = 4.0,
    guidance_interval: tuple[float, float] | None = None,
) -> CalibrationReport:
    """Calibrate a plan for ``model`` and write it to ``out`` (JSON) with its predictor weights beside it.

    The weights file is named by its content (``<plan stem>.predictor.<sha256[:12]>.safetensors``, or
    ``.static_scores.`` for the static predictor), so a new calibration never overwrites the file the
    previous plan at ``out`` references; the plan is written last, atomically. An interrupted run
    leaves the previous plan and its weights loadable; a finished one deletes the previous weights.

    Args:
        target_speedup: wall-clock speedup to reach (within +8%), measured on this machine at ``batch``.
        min_psnr: alternatively, a quality floor in dB (PSNR of final samples vs full compute).
        predictor: ``"dynamic"`` (in-graph network), ``"static"`` (per block/timestep table) or
            ``"input_change"`` (training-free).
        attention: attention mode(s) to search; each is timed and searched, the best plan wins.
        forecasts: what pruned tokens get (`tcpass.plan.ForecastSpec`; None: reuse), searched like the
            attention modes: every (mode, forecast) pair is timed and searched on the real graphs.
        batch: model batch the speedup is timed at (rows, classifier-free guidance included).
        num_samples: calibration samples generated with full compute.
        steps: DDIM steps of the calibration generations.
        iterations: predictor training iterations.
        sample_range: the range a viewer sees (pixel-space models: ``(-1, 1)``); calibration samples are
            scored clamped to it (default: their 0.1-99.9 percentile range).
        verify_reps: the chosen plan's speedup is measured on whole calibration generations,
            interleaved with full compute, this many rounds after a warm-up (0: not measured).
        conditioning: ``(cond, uncond)`` for the calibration samples (see `tcpass.calibrate.collect`);
            default: the model family's own.
        guidance_scale: classifier-free guidance scale of the calibration generations
            (`tcpass.sampling.guided_sample`): the sampler the plan will run under.
        guidance_interval: model timesteps ``(lo, hi)`` guided in those generations (None: every step).
    """
    start = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous_weights = _own_weights_file(out)
    adapter = adapter_for(model)
    fingerprint = adapter.fingerprint(model)
    data = collect(
        model,
        num_samples,
        steps,
        guidance_scale,
        seed=seed,
        progress=progress,
        sample_range=sample_range,
        conditioning=conditioning,
        guidance_interval=guidance_interval,
    )
    sens = block_sensitivity(model, data, progress=progress)
    order = [int(b) for b in sens.argsort()]
    selector, losses, selection = _train_selector(model, data, predictor, iterations, out, progress)
    modes = (attention,) if isinstance(attention, str) else tuple(attention)
    bases = [CachePlan(selector=selector, model=fingerprint, attention=m, forecast=f) for m in modes for f in forecasts]
    winner, candidates, times, problems = _search_modes(
        model, data, bases, ratios, batch, order, target_speedup, min_psnr, out, progress
    )
    seconds = time.perf_counter() - start
    report = CalibrationReport(
        plan=winner.plan,
        sensitivity=sens.tolist(),
        block_order=order,
        times=times,
        predicted_speedup=winner.predicted_speedup,
        psnr_db=winner.psnr_db,
        candidates=candidates,
        train_losses=losses,
        selection_error=selection,
        seconds=seconds,
    )
    notes = {
        "calibrated_by": "tcpass calibrate",
        "target_speedup": target_speedup,
        "min_psnr": min_psnr,
        "batch": batch,
        "predicted_speedup": round(winner.predicted_speedup, 3),
        "calibration_psnr_db": round(winner.psnr_db, 2),
        "block_sensitivity": [round(v, 5) for v in sens.tolist()],
        "topk_error": {k: round(v, 4) if isinstance(v, float) else v for k, v in selection.items()},
        "seconds": round(seconds, 1),
        **sampler_notes(data),
    }
    if problems:
        notes["timing_problems"] = problems  # still implausible after re-measuring: other jobs running?
    if verify_reps > 0:
        report.measured_speedup, _ = verify_speedup(model, winner.plan, data, verify_reps, plan_dir=out.parent)
        notes["measured_speedup"] = round(report.measured_speedup, 3)
    report.plan = dataclasses.replace(winner.plan, notes=notes)
    _write_calibration(report, out, previous_weights, candidates, losses)
    return report


def _train_selector(
    model: nn.Module, data, predictor: str, iterations: int, out: Path, progress: bool
) -> tuple[SelectorSpec, list[float], dict]:
    """The token selector: ``input_change`` (training-free), or a trained predictor written beside ``out``;
    returns it, the training losses and the held-out top-K errors that chose trained vs initial weights."""
    if predictor == "input_change":
        return SelectorSpec(kind="input_change"), [], {}
    untrained = train_predictor(model, data, predictor, iterations=0, progress=False).predictor
    trained = train_predictor(model, data, predictor, iterations=iterations, progress=progress)
    selection = {
        "random": topk_error(model, data, "random"),
        f"{predictor} initial": topk_error(model, data, predictor_scorer(untrained)),
        f"{predictor} trained": topk_error(model, data, predictor_scorer(trained.predictor)),
    }
    # Keep training only if it helps on held-out pairs (the dynamic predictor starts from a
    # strong training-free ranking, and a short training run can make it worse).
    keep_trained = predictor == "static" or selection[f"{predictor} trained"] <= selection[f"{predictor} initial"]
    selection["kept"] = "trained" if keep_trained else "initial"
    return _write_predictor(trained.predictor if keep_trained else untrained, out), trained.losses, selection


def _search_modes(model, data, bases, ratios, batch, order, target_speedup, min_psnr, out: Path, progress: bool):
    """`search_schedule` from each base plan (an attention mode and a forecaster, each with its own step
    times); the best plan over all wins. Returns (winner, every candidate, the winner's step times, its
    timing problems)."""
    winner, candidates, times, errors, problems = None, [], None, [], []
    for base in bases:
        mode_times, timing_problems = measure_plausible_step_times(
            model, ratios, base, batch, plan_dir=out.parent, progress=progress
        )
        try:
            best, tried = search_schedule(
                model, data, base, mode_times, order, target_speedup=target_speedup, min_psnr=min_psnr,
                plan_dir=out.parent, progress=progress,
            )  # fmt: skip
        except ValueError as e:  # this mode cannot reach the target; another may
            errors.append(f"attention={base.attention}, pruned tokens {forecast_name(base.forecast)}: {e}")
            continue
        candidates += tried
        better = winner is None or (
            best.psnr_db > winner.psnr_db
            if target_speedup is not None
            else best.predicted_speedup > winner.predicted_speedup
        )
        if better:
            winner, times, problems = best, mode_times, timing_problems
    if winner is None:
        raise ValueError("; ".join(errors))
    return winner, candidates, times, problems


def forecast_name(spec: ForecastSpec | None) -> str:
    """``reuse``, or ``kind:order`` (``anchored:1``): how the CLI and reports name a forecaster."""
    return "reuse" if spec is None or spec.kind == "reuse" else f"{spec.kind}:{spec.order}"


def parse_forecast(text: str) -> ForecastSpec | None:
    """The inverse of `forecast_name`: ``reuse`` is None; ``ValueError`` names a bad kind or order."""
    text = text.strip()
    if text == "reuse":
        return None
    kind, _, order = text.partition(":")
    if order and not order.isdigit():
        raise ValueError(f"forecast {text!r}: expected reuse or kind:order, e.g. anchored:1.")
    return ForecastSpec(kind=kind, order=int(order or 1))


def _write_calibration(report, out: Path, previous_weights: Path | None, candidates, losses) -> None:
    """`write_calibration`: the sidecar (every candidate, the step times, the training losses), then the
    plan; then the previous plan's own weights file is removed once no plan refers to it."""
    sidecar = {
        "candidates": [
            {"predicted_speedup": c.predicted_speedup, "psnr_db": c.psnr_db, "plan": c.plan.to_dict()}
            for c in sorted(candidates, key=lambda c: -c.psnr_db)
        ],
        "step_times_s": dataclasses.asdict(report.times),
        "train_losses": losses,
    }
    write_calibration(out, report.plan, sidecar)
    if previous_weights is not None and previous_weights.name != report.plan.selector.path:
        previous_weights.unlink(missing_ok=True)


def _weights_name(out: Path, role: str, digest: str) -> str:
    return f"{out.stem}.{role}.{digest[:12]}.safetensors"


def _own_weights_file(out: Path) -> Path | None:
    """The weights file the plan now at ``out`` references, if `calibrate` named it for that plan."""
    try:
        path = json.loads(out.read_text())["selector"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    pattern = rf"{re.escape(out.stem)}\.(predictor|static_scores)\.[0-9a-f]{{12}}\.safetensors"
    return out.parent / path if isinstance(path, str) and re.fullmatch(pattern, path) else None


def _write_predictor(predictor: nn.Module, out: Path) -> SelectorSpec:
    """Write the selector's file beside ``out`` under a content-addressed name; never overwrites another's."""
    if isinstance(predictor, StaticPredictor):
        from tcpass.policies import StaticScoreSelector

        grid = torch.arange(0, 1000, 10, dtype=torch.float32, device=predictor.bias.device)
        table = StaticScoreSelector(predictor.table(grid), grid, range(predictor.num_blocks))
        kind, role, save = "static", "static_scores", table.save
    else:
        kind, role, save = "dynamic", "predictor", lambda path: save_predictor(predictor, path)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.{role}.", suffix=".tmp")
    os.close(fd)
    try:
        digest = save(tmp)
        os.chmod(tmp, plain_file_mode())
        path = out.parent / _weights_name(out, role, digest)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return SelectorSpec(kind=kind, path=path.name, sha256=digest)
