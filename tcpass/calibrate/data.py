"""Calibration data: the model's own full-compute DDIM trajectories (`collect`), and the model
calls and step pairs the later stages replay on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tcpass.adapters import adapter_for
from tcpass.sampling import ddim_sample


# 1. Calibration data ------------------------------------------------------------------------------
@dataclass
class CalibrationData:
    """Full-compute trajectories: ``T`` steps, ``R`` model rows (conditional + unconditional)."""

    inputs: torch.Tensor  # [T, R, C, H, W] model input at every step
    outputs: torch.Tensor  # [T, R, C', H, W] model output at every step
    timesteps: torch.Tensor  # [T]
    class_labels: torch.Tensor  # [R]
    noise: torch.Tensor  # [n, C, H, W] initial noise of the n samples
    labels: torch.Tensor  # [n] their class labels
    final: torch.Tensor  # [n, C, H, W] full-compute samples
    null_label: int
    steps: int
    guidance_scale: float
    sample_range: tuple[float, float] | None = None  # what a viewer sees: samples are scored clamped to it

    @property
    def num_steps(self) -> int:
        return self.inputs.shape[0]


class _Recorder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, hidden_states, timestep, class_labels, **kwargs):
        out = self.model(hidden_states, timestep=timestep, class_labels=class_labels, **kwargs)
        self.calls.append((hidden_states.clone(), timestep.reshape(-1)[0].clone(), out.sample.clone()))
        self.labels = class_labels
        return out


def check_supported(model: nn.Module) -> None:
    adapter = adapter_for(model)
    if adapter.class_name != "DiTTransformer2DModel":
        raise NotImplementedError(
            f"calibration needs conditioning to generate its own data; it supports class-conditional DiT, "
            f"not {adapter.class_name} yet."
        )


def collect(
    model: nn.Module,
    num_samples: int = 16,
    steps: int = 50,
    guidance_scale: float = 4.0,
    seed: int = 1234,
    progress: bool = True,
    sample_range: tuple[float, float] | None = None,
) -> CalibrationData:
    """Generate ``num_samples`` samples with full compute and record every model call.

    ``sample_range``: the range a viewer sees (pixel-space models: ``(-1, 1)``); samples are scored
    clamped to it. ``None``: the full-compute samples' 0.1-99.9 percentile range.
    """
    check_supported(model)
    cfg = model.config
    null_label = int(cfg.num_embeds_ada_norm)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, null_label, (num_samples,), generator=g)
    noise = torch.randn(num_samples, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    recorder = _Recorder(model)
    final = ddim_sample(recorder, noise, labels, null_label, steps, guidance_scale, progress=progress)
    inputs, timesteps, outputs = (torch.stack(x) for x in zip(*recorder.calls, strict=True))
    return CalibrationData(
        inputs,
        outputs,
        timesteps,
        recorder.labels,
        noise,
        labels,
        final,
        null_label,
        steps,
        guidance_scale,
        None if sample_range is None else (float(sample_range[0]), float(sample_range[1])),
    )


def model_call(model, data: CalibrationData, step: int, rows: torch.Tensor, x=None):
    x = data.inputs[step, rows] if x is None else x
    t = data.timesteps[step].expand(len(rows))
    return model(x, timestep=t, class_labels=data.class_labels[rows]).sample


def rel_err(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean() / (target**2).mean()


def step_pairs(num_steps: int, max_offset: int, count: int, generator: torch.Generator) -> list[tuple[int, int]]:
    pairs = []
    for _ in range(count):
        s = int(torch.randint(0, num_steps - 1, (), generator=generator))
        j = int(torch.randint(1, min(max_offset, num_steps - 1 - s) + 1, (), generator=generator))
        pairs.append((s, s + j))
    return pairs
