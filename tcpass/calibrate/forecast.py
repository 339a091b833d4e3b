"""Forecast weights for a skip table: fitted by least squares on the plan's own generations.

A forecasting SKIP step predicts the block stack's residual as ``sum_k w[k] * r_k`` over the
residuals ``r_0, r_1, ..`` of the last computed calls, newest first (`tcpass.plan.StepSkip.weights`).
MagCache reuses ``r_0`` (``w = [1]``) or scales it by a calibrated magnitude ratio (``w = [s]``);
TaylorSeer extrapolates with fixed finite-difference weights (first order: ``[1 + c, -c]``).
Here the weights are fitted per skipped call, on the calibration generations, to the residual the
blocks would have produced there:

    w_j = argmin_w || r_true(x_j) - sum_k w[k] r_k ||^2     (all rows and tokens; ridge 1e-6)

where ``x_j`` is the input of call ``j`` *on the cached trajectory* (earlier skipped calls already
forecast with their fitted weights), so each fit sees the errors the plan will really carry.

The fitting run is the plan itself: its transformed graphs (`tcpass.transform`) generate the samples,
and the history ``r_k`` is what they keep (`tcpass.graphs.StepGraphs.skip_caches`). So when the table
is composed with token or block caching on its computed calls (``base``), the weights are fitted on the
residuals those CACHED calls really leave, not on full compute's. Only ``r_true`` comes from elsewhere:
at a skipped call the eager model runs once on the same input, with hooks on the first and last block
reading the image stream (the adapter's `tcpass.adapters.ModelAdapter.block_input` / ``block_image``:
joint blocks' text stream is not forecast), as `tcpass.calibrate.steps.magnitude_ratios` does; the plan
does not run it. The run's samples are the fitted plan's samples (`ForecastFit.samples`), so it also
scores the plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from tcpass.adapters import adapter_for
from tcpass.calibrate.data import CalibrationData
from tcpass.plan import MAX_SKIP_HISTORY, CachePlan, SkipRule, StepSkip
from tcpass.schedule import StepKind, TPRRState

_WEIGHT_LIMIT = 10.0  # StepSkip accepts |w| <= 10


@dataclass
class ForecastFit:
    skip: StepSkip  # the table with its fitted weights
    samples: torch.Tensor  # the calibration samples the fitted plan generates [n, C, H, W]
    residual_error: list[float]  # per skipped call, ||r_true - forecast||^2 / ||r_true||^2


@dataclass(frozen=True, eq=False)
class _Fitting(SkipRule):
    """The table being fitted: the weights of call ``i`` of ``timesteps`` are filled in just before it runs
    (``fitted``), the reuse probe until then. In memory only, never registered nor written."""

    kind: ClassVar[str] = "fitting"
    timesteps: tuple[float, ...]
    tolerance: float
    history: int
    level: str = "stack"
    fitted: dict = field(default_factory=dict)

    def index(self, timestep: float) -> int | None:
        return next((i for i, t in enumerate(self.timesteps) if abs(timestep - t) <= self.tolerance), None)

    def weights_at(self, timestep: float) -> tuple[float, ...] | None:
        i = self.index(timestep)
        return None if i is None else self.fitted.get(i, (1.0,) + (0.0,) * (self.history - 1))


class _TrueResidual:
    """Hooks on the eager model's first and last block: the stack's image residual of its last call."""

    def __init__(self, model: nn.Module) -> None:
        self.adapter = adapter_for(model)
        blocks = self.adapter.blocks(model)
        self.handles = [
            blocks[0].register_forward_pre_hook(self._pre, with_kwargs=True),
            blocks[-1].register_forward_hook(self._post),
        ]

    def _pre(self, _module, args, kwargs):
        self.stack_in = self.adapter.block_input(args, kwargs)

    def _post(self, _module, _args, out):
        self.residual = self.adapter.block_image(out) - self.stack_in

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _solve(true: torch.Tensor, basis: list[torch.Tensor], ridge: float) -> tuple[tuple[float, ...], float]:
    """Ridge least squares of ``true`` on ``basis`` (newest first): the weights and the relative error."""
    x = torch.stack([r.flatten().double() for r in basis], dim=1)
    y = true.flatten().double()
    gram = x.T @ x
    gram += ridge * torch.trace(gram) / len(basis) * torch.eye(len(basis), dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve(gram, x.T @ y).clamp(-_WEIGHT_LIMIT, _WEIGHT_LIMIT)
    error = ((y - x @ w) ** 2).sum() / (y**2).sum().clamp_min(1e-30)
    return tuple(float(v) for v in w), float(error)


class _Fitter(nn.Module):
    """The transformed plan, with the weights of each forecast call fitted just before it runs (one call
    per step, the guidance rows batched). A mirror of the step controller's state says which calls skip."""

    def __init__(self, model: nn.Module, plan: CachePlan, rule: _Fitting, data: CalibrationData, ridge: float):
        from tcpass.torch_runtime import transform

        super().__init__()
        self.model, self.rule, self.ridge = model, rule, ridge
        self.runtime = transform(model, dataclasses.replace(plan, skip=rule), example_inputs=data.call_inputs())
        self.state = TPRRState(plan.schedule, rule)
        self.scale = adapter_for(model).timestep_scale
        self.dtype = getattr(model, "dtype", None)
        self.truth = _TrueResidual(model)
        self.forecast: list[tuple[float, tuple[float, ...]]] = []  # (timestep, weights) per SKIP call
        self.errors: list[float] = []

    def forward(self, hidden_states, timestep, **kwargs):
        t = float(timestep.reshape(-1)[0]) * self.scale
        skips = self.state.step(t).kind is StepKind.SKIP
        if skips:
            self.model(hidden_states, timestep=timestep, **kwargs)  # r_true at this input
            graphs = self.runtime.step_graphs()
            history = graphs.skip_caches(graphs.caches)
            available = min(len(history), self.state.computed)  # early in a generation: fewer exist
            weights, error = _solve(self.truth.residual, history[:available], self.ridge)
            weights += (0.0,) * (len(history) - available)
            self.rule.fitted[self.rule.index(t)] = weights
            self.forecast.append((t, weights))
            self.errors.append(error)
        out = self.runtime(hidden_states, timestep=timestep, **kwargs)
        if (self.runtime.last_step.kind is StepKind.SKIP) != skips:
            raise RuntimeError(f"forecast fit: the runtime and the fit disagree on whether the call at t={t:g} skips.")
        return out


@torch.no_grad()
def fit_forecast(
    model: nn.Module,
    skip: StepSkip,
    data: CalibrationData,
    history: int,
    ridge: float = 1e-6,
    base: CachePlan | None = None,
) -> ForecastFit:
    """Fit ``history`` forecast weights for every call ``skip`` skips (``level="stack"``) on ``data``, in
    the plan ``base`` with ``skip`` (default: no other caching; e.g. a `tcpass.calibrate.steps.token_overlay`
    plan, whose weights then fit the residuals its CACHED calls leave). ``base.sampler_steps`` steps, if set.

    A call the table lists before ``history`` calls were computed in the generation forecasts from the
    residuals there are (its weights on the others 0, `tcpass.schedule.reads`), so a sparse table needs no
    run of computed calls at its start.
    """
    if skip.level != "stack":
        raise ValueError(f"skip.level = {skip.level!r}: forecast weights are fitted on the block stack ('stack').")
    if not 1 <= history <= MAX_SKIP_HISTORY:
        raise ValueError(f"history = {history!r}: expected 1..{MAX_SKIP_HISTORY} computed steps.")
    base = base if base is not None else CachePlan(blocks=())
    if base.guidance_reuse:
        raise ValueError(
            "base.guidance_reuse is set: forecasts are fitted with the guidance rows batched (one call per step); "
            "fit on the plan without it."
        )
    rule = _Fitting(timesteps=tuple(skip.timesteps), tolerance=skip.tolerance, history=history)
    fitter = _Fitter(model, base, rule, data, ridge)
    try:
        samples = data.sample(fitter, base.sampler_steps or data.steps)
    finally:
        fitter.truth.remove()
    at, weights = zip(*fitter.forecast, strict=True) if fitter.forecast else ((), ())
    table = StepSkip(timesteps=list(at), weights=list(weights), level="stack", tolerance=skip.tolerance)
    return ForecastFit(table, samples, fitter.errors)
