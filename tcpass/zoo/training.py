"""The diffusion training step both reference models use (epsilon prediction, CFG label dropout, EMA)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def noise_schedule() -> DDPMScheduler:
    """DiT's training schedule: 1000 steps, linear betas 1e-4..0.02."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def set_cosine_lr(opt: torch.optim.Optimizer, lr: float, step: int, steps: int, warmup: int) -> None:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a floor of 5% of ``lr``."""
    scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    for group in opt.param_groups:
        group["lr"] = lr * max(scale, 0.05)


def diffusion_step(
    model: torch.nn.Module,
    ema: torch.nn.Module,
    opt: torch.optim.Optimizer,
    schedule: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    null_label: int,
    step: int,
    g: torch.Generator,
    autocast: torch.dtype | None = None,
) -> float:
    """One optimizer step on clean images ``x0`` [B, C, H, W]; returns the loss.

    10% of labels become ``null_label`` (classifier-free guidance), then noise and timesteps are
    drawn from ``g`` in that order; gradients are clipped to norm 1; ``ema`` follows ``model``.
    ``autocast``: run the model's forward under CPU autocast to this dtype (``torch.bfloat16``:
    mixed precision; weights, optimizer, EMA and loss stay float32).
    """
    batch = len(labels)
    labels = labels.clone()
    labels[torch.rand(batch, generator=g) < 0.1] = null_label
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        pred = model(schedule.add_noise(x0, noise, t), timestep=t, class_labels=labels).sample
    loss = F.mse_loss(pred.float(), noise)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    decay = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)
    return loss.item()
