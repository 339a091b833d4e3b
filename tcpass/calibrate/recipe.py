"""The whole token-caching recipe (`calibrate`): data, sensitivity, predictor, search, report, files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from tcpass.adapters import adapter_for
from tcpass.calibrate.data import collect, sampler_notes
from tcpass.calibrate.mixing import block_sensitivity, predictor_scorer, topk_error, train_predictor
from tcpass.calibrate.report import CalibrationReport, write_calibration
from tcpass.calibrate.search import search_schedule, verify_speedup
from tcpass.calibrate.speed import StepTimes, measure_plausible_step_times
from tcpass.files import plain_file_mode
from tcpass.plan import CachePlan, ForecastSpec, SelectorSpec, forecast_name
from tcpass.predictor import StaticPredictor, save_predictor
from tcpass.trace import reusing_traces


@reusing_traces()
def calibrate(
    model: nn.Module, out: str | Path, *, target_speedup: float | None = None, min_psnr: float | None = None,
    predictor: str = "dynamic", attention: str | tuple[str, ...] = ("cached_kv", "full_kv"),
    forecasts: tuple[ForecastSpec | None, ...] = (None,), batch: int = 2, num_samples: int = 16, steps: int = 50,
    iterations: int = 150, ratios: tuple[float, ...] = (0.1, 0.15, 0.25, 0.35, 0.5), seed: int = 1234,
    verify_reps: int = 2, sample_range: tuple[float, float] | None = None, progress: bool = True,
    conditioning: tuple[dict, dict | None] | None = None, guidance_scale: float = 4.0,
    guidance_interval: tuple[float, float] | None = None,
) -> CalibrationReport:  # fmt: skip
    """Calibrate a plan for ``model`` and write it to ``out`` (JSON) with its predictor weights beside it.

    The weights file is named by its content (``<plan stem>.predictor.<sha256[:12]>.safetensors``, or
    ``.static_scores.`` for the static predictor), so a new calibration never overwrites the file the
    previous plan at ``out`` references; the plan is written last, atomically. An interrupted run
    leaves the previous plan and its weights loadable; a finished one deletes the previous weights.

    The calibration generations (``num_samples`` of them, ``steps`` steps, ``guidance_scale``,
    ``guidance_interval``, ``conditioning``, noise from ``seed``, scored clamped to ``sample_range``, default
    their 0.1-99.9 percentile range) are `tcpass.calibrate.collect`'s: the sampler the plan will run under.

    Args:
        target_speedup: wall-clock speedup to reach (within +8%), measured on this machine at ``batch``
            model rows (classifier-free guidance included); or ``min_psnr``, a quality floor in dB (PSNR
            of final samples vs full compute).
        predictor: ``"dynamic"`` (in-graph network), ``"static"`` (per block/timestep table) or
            ``"input_change"`` (training-free); trained for ``iterations`` iterations.
        attention: attention mode(s) to search; ``forecasts``: what pruned tokens get
            (`tcpass.plan.ForecastSpec`; None: reuse). Every (mode, forecast) pair is timed and searched
            on the real graphs at keep ratios ``ratios``; the best plan wins.
        verify_reps: the chosen plan's speedup is measured on whole calibration generations,
            interleaved with full compute, this many rounds after a warm-up (0: not measured).
    """
    start = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous_weights = _own_weights_file(out)
    data = collect(
        model, num_samples, steps, guidance_scale, seed=seed, progress=progress, sample_range=sample_range,
        conditioning=conditioning, guidance_interval=guidance_interval,
    )  # fmt: skip
    sens = block_sensitivity(model, data, progress=progress)
    order = [int(b) for b in sens.argsort()]
    selector, losses, selection = _train_selector(model, data, predictor, iterations, out, progress)
    modes = (attention,) if isinstance(attention, str) else tuple(attention)
    fingerprint = adapter_for(model).fingerprint(model)
    bases = [CachePlan(selector=selector, model=fingerprint, attention=m, forecast=f) for m in modes for f in forecasts]
    winner, candidates, times, problems = _search_modes(
        model, data, bases, ratios, batch, order, target_speedup, min_psnr, out, progress
    )
    if verify_reps > 0:
        winner.measured_speedup, _ = verify_speedup(model, winner.plan, data, verify_reps, plan_dir=out.parent)
    seconds = time.perf_counter() - start
    notes = {
        "calibrated_by": "tcpass calibrate",
        "target_speedup": target_speedup,
        "min_psnr": min_psnr,
        "batch": batch,
        "predicted_speedup": round(winner.predicted_speedup, 3),
        "calibration_psnr_db": round(winner.psnr_db, 2),
        "block_sensitivity": [round(v, 5) for v in sens.tolist()],
        "topk_error": {k: round(v, 4) if isinstance(v, float) else v for k, v in selection.items()},
        **sampler_notes(data),
        **({"timing_problems": problems} if problems else {}),  # still implausible after re-measuring: busy?
        **({"measured_speedup": round(winner.measured_speedup, 3)} if verify_reps > 0 else {}),
        "seconds": round(seconds, 1),
    }
    details = {"block_sensitivity": sens.tolist(), "block_order": order, "step_times_s": dataclasses.asdict(times)}
    report = CalibrationReport(
        "tokens", dataclasses.replace(winner.plan, notes=notes), winner, candidates,
        measured_speedup=winner.measured_speedup, target_speedup=target_speedup,
        details={**details, "train_losses": losses, "topk_error": selection},
        summary=_summary(winner.plan, sens.tolist(), order, times, selection), seconds=seconds,
    )  # fmt: skip
    write_calibration(out, report)
    if previous_weights is not None and previous_weights.name != report.plan.selector.path:
        previous_weights.unlink(missing_ok=True)  # the previous plan's own weights, now unreferenced
    return report


def _summary(
    plan: CachePlan, sensitivity: list[float], order: list[int], times: StepTimes, selection: dict
) -> list[str]:
    """The token calibration's report lines above its candidates: the chosen plan and what it measured."""
    s = plan.schedule
    blocks = "all" if plan.blocks == "all" else list(plan.blocks)
    lines = [
        f"blocks cached      : {blocks} (least sensitive first: {order})",
        "block sensitivity  : " + ", ".join(f"{b}:{v:.4f}" for b, v in enumerate(sensitivity)),
        f"selector           : {plan.selector.kind}   attention: {plan.attention}   "
        f"pruned tokens: {forecast_name(plan.forecast)}",
        f"keep ratio         : phase 0 {plan.keep_ratio[0]:.2f}, phase 1 {plan.keep_ratio[1]:.2f}",
        f"TPRR schedule      : boundary t={s.boundary_timestep:g}, intervals {s.intervals}",
        f"step times         : eager {times.eager * 1e3:.1f} ms, FULL {times.full * 1e3:.1f} ms, "
        + ", ".join(f"CACHED@{r:g} {t * 1e3:.1f} ms" for r, t in sorted(times.cached.items())),
    ]
    if selection:
        lines.append(
            "top-K error @0.25  : "
            + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in selection.items())
            + "  (output error left vs caching every token; lower is better)"
        )
    return lines


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
        from tcpass.selectors import StaticScoreSelector

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
