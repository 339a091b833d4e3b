"""Forecast weights for a skip table: fitted by least squares on the model's own generations.

A forecasting SKIP step predicts the block stack's residual as ``sum_k w[k] * r_k`` over the
residuals ``r_0, r_1, ..`` of the last computed calls, newest first (`tcpass.plan.StepSkip.weights`).
MagCache reuses ``r_0`` (``w = [1]``) or scales it by a calibrated magnitude ratio (``w = [s]``);
TaylorSeer extrapolates with fixed finite-difference weights (first order: ``[1 + c, -c]``).
Here the weights are fitted per skipped call, on the calibration generations, to the residual the
blocks would have produced there:

    w_j = argmin_w || r_true(x_j) - sum_k w[k] r_k ||^2     (all rows and tokens; ridge 1e-6)

where ``x_j`` is the input of call ``j`` *on the cached trajectory* (earlier skipped calls already
forecast with their fitted weights), so each fit sees the errors the plan will really carry. The
fitting run computes the blocks at the skipped calls only to measure ``r_true``; the plan does not.
Its samples are exactly the plan's samples (the same forecasts on the same inputs), so the run
also scores the plan (`ForecastFit.samples`).

Residuals are read with hooks on the first and last block, on the image stream (the adapter's
`tcpass.adapters.ModelAdapter.block_input` / ``block_image``: joint blocks' text stream is not
forecast), as `tcpass.calibrate.steps.magnitude_ratios` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from tcpass.adapters import adapter_for
from tcpass.calibrate.data import CalibrationData
from tcpass.plan import MAX_SKIP_HISTORY, StepSkip, TPRRSchedule
from tcpass.schedule import StepKind, simulate

_WEIGHT_LIMIT = 10.0  # StepSkip accepts |w| <= 10


@dataclass
class ForecastFit:
    skip: StepSkip  # the table with its fitted weights
    samples: torch.Tensor  # the calibration samples the fitted plan generates [n, C, H, W]
    residual_error: list[float]  # per skipped call, ||r_true - forecast||^2 / ||r_true||^2


class _StackHooks:
    """Record the stack residual of computed calls; at a forecast call, fit and apply the weights."""

    def __init__(self, model: nn.Module, history: int, ridge: float) -> None:
        self.adapter = adapter_for(model)
        blocks = self.adapter.blocks(model)
        self.history, self.ridge = history, ridge
        self.residuals: list[torch.Tensor] = []  # newest last
        self.forecast = False
        self.weights: list[tuple[float, ...]] = []
        self.errors: list[float] = []
        self.handles = [
            blocks[0].register_forward_pre_hook(self._pre, with_kwargs=True),
            blocks[-1].register_forward_hook(self._post),
        ]

    def _pre(self, _module, args, kwargs):
        self.stack_in = self.adapter.block_input(args, kwargs)

    def _post(self, _module, _args, out):
        true = self.adapter.block_image(out) - self.stack_in
        if not self.forecast:
            self.residuals.append(true)
            del self.residuals[: -self.history]
            return None
        basis = self.residuals[::-1]  # newest first
        x = torch.stack([r.flatten().double() for r in basis], dim=1)
        y = true.flatten().double()
        gram = x.T @ x
        gram += (
            self.ridge * torch.trace(gram) / len(basis) * torch.eye(len(basis), dtype=gram.dtype, device=gram.device)
        )
        w = torch.linalg.solve(gram, x.T @ y).clamp(-_WEIGHT_LIMIT, _WEIGHT_LIMIT)
        predicted = sum(float(wk) * r for wk, r in zip(w, basis, strict=True))
        self.weights.append(tuple(float(v) for v in w))
        self.errors.append(float(((true - predicted) ** 2).sum() / (true**2).sum().clamp_min(1e-30)))
        return self.adapter.with_block_image(out, self.stack_in + predicted)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Switch(nn.Module):
    """The model, told before each call whether the table forecasts it (``forecast[j]`` for the j-th
    call: one call per step, the guidance rows batched)."""

    def __init__(self, model: nn.Module, hooks: _StackHooks, forecast: list[bool]) -> None:
        super().__init__()
        self.model, self.hooks, self.forecast, self.calls = model, hooks, forecast, 0
        self.dtype = getattr(model, "dtype", None)

    def forward(self, hidden_states, timestep, **kwargs):
        self.hooks.forecast = self.forecast[self.calls]
        self.calls += 1
        return self.model(hidden_states, timestep=timestep, **kwargs)


@torch.no_grad()
def fit_forecast(
    model: nn.Module, skip: StepSkip, data: CalibrationData, history: int, ridge: float = 1e-6
) -> ForecastFit:
    """Fit ``history`` forecast weights for every call ``skip`` skips (``level="stack"``) on ``data``.

    Calls the table lists that come before ``history`` computed calls are computed, as the runtime
    does (`tcpass.schedule.TPRRState`); they are dropped from the returned table.
    """
    if skip.level != "stack":
        raise ValueError(f"skip.level = {skip.level!r}: forecast weights are fitted on the block stack ('stack').")
    if not 1 <= history <= MAX_SKIP_HISTORY:
        raise ValueError(f"history = {history!r}: expected 1..{MAX_SKIP_HISTORY} computed steps.")
    timesteps = [float(t) for t in data.timesteps]
    probe = dataclasses.replace(skip, scales=None, weights=[[1.0] + [0.0] * (history - 1)] * len(skip.timesteps))
    steps = simulate(TPRRSchedule(), timesteps, probe)
    forecast = [s.kind is StepKind.SKIP for s in steps]
    forecast_at = [t for t, f in zip(timesteps, forecast, strict=True) if f]
    hooks = _StackHooks(model, history, ridge)
    try:
        samples = data.sample(_Switch(model, hooks, forecast))
    finally:
        hooks.remove()
    table = StepSkip(timesteps=forecast_at, weights=hooks.weights, level="stack", tolerance=skip.tolerance)
    return ForecastFit(table, samples, hooks.errors)
