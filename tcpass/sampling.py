"""The sampler with classifier-free guidance shared by calibration, demo, benchmarks and tests: DDIM
(epsilon prediction, DiT and PixArt), DPM-Solver++(2M) (the same training schedule, the better solver
at few steps) or flow matching (Euler, velocity prediction, SD3 and Flux).

The model is called once per step on the batch ``[conditional rows; unconditional rows]``, as
diffusers' pipelines do, so CFG halves are rows like any other for the transformed model. A plan with
``guidance_reuse`` splits them instead: the conditional rows every step, the unconditional rows only
where `tcpass.schedule.runs_uncond` says.
`guided_sample` takes any conditioning (a dict of the model's keyword arguments per sample: class
labels, text embeddings and their masks...); `ddim_sample` is the class-conditional case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from tcpass.controller import GuidanceSteps
from tcpass.plan import SAMPLERS, check_timesteps
from tcpass.schedule import StepKind


def make_scheduler(
    num_train_timesteps: int = 1000, sampler: str = "ddim", shift: float = 1.0
) -> DDIMScheduler | DPMSolverMultistepScheduler | FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler (multistep solvers keep their history in it: one per generation).

    ``"ddim"``: DDIM over DiT's training schedule (linear betas 1e-4..0.02, epsilon prediction).
    ``"dpmpp"``: DPM-Solver++(2M) over the same schedule, with diffusers' defaults for few steps
    (second order, first order at the last steps below 15 steps, timesteps spaced from 999 down).
    ``"flow"``: flow-matching Euler (velocity prediction, as SD3 and Flux are trained) with the sigma
    schedule shifted by ``shift`` (SD3: 3.0; Flux at 512x512: 1.88, its dynamic shift for 1024 tokens)."""
    if sampler == "flow":
        if not shift > 0:
            raise ValueError(f"shift = {shift!r}: the flow-matching schedule shift must be positive (SD3: 3.0).")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    schedule = {
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "prediction_type": "epsilon",
    }
    if sampler == "dpmpp":
        return DPMSolverMultistepScheduler(**schedule, algorithm_type="dpmsolver++", solver_order=2)
    if sampler != "ddim":
        raise ValueError(f"sampler = {sampler!r}: expected one of {SAMPLERS}.")
    return DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False)


def describe_guidance(guidance_scale: float, guidance_interval: tuple[float, float] | None) -> str:
    """``"CFG 4"``, or ``"CFG 4 at t in [100, 700)"`` with an interval (model timesteps)."""
    text = f"CFG {guidance_scale:g}"
    if guidance_interval is not None and guidance_scale != 1.0:
        text += f" at t in [{guidance_interval[0]:g}, {guidance_interval[1]:g})"
    return text


def sampler_timesteps(
    num_steps: int, sampler: str = "ddim", shift: float = 1.0, spacing: str | None = None
) -> list[float]:
    """The timesteps (0..1000, the scale plans are keyed on) of a ``num_steps``-step generation with
    ``sampler`` (`make_scheduler`), in call order. ``spacing``: diffusers' ``timestep_spacing``
    (``"linspace"``, ``"leading"``, ``"trailing"``) instead of the scheduler's own (DPM-Solver++:
    ``linspace``; DDIM: ``leading``)."""
    scheduler = make_scheduler(sampler=sampler, shift=shift)
    if spacing is not None:
        if spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"spacing = {spacing!r}: expected 'linspace', 'leading' or 'trailing' (diffusers').")
        scheduler = type(scheduler).from_config(scheduler.config, timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    return [float(t) for t in scheduler.timesteps]


def ddim_timesteps(num_steps: int) -> list[float]:
    """The model-scale timesteps (0..1000) of a ``num_steps``-step DDIM generation, in call order."""
    return sampler_timesteps(num_steps, "ddim")


def _scheduler(sampler: str, shift: float, num_steps: int, timesteps: Sequence[int] | None, plan=None):
    """`make_scheduler`'s, set to ``num_steps`` evenly spaced steps or to ``timesteps`` (`check_timesteps`;
    ``None``: ``plan.sampler_timesteps`` if the plan has them)."""
    if timesteps is None:
        timesteps = getattr(plan, "sampler_timesteps", None)
    scheduler = make_scheduler(sampler=sampler, shift=shift)
    if timesteps is None:
        scheduler.set_timesteps(num_steps)
    else:
        scheduler.set_timesteps(timesteps=check_timesteps(timesteps, num_steps, sampler))
    return scheduler


def cat_rows(*parts: dict) -> dict:
    """Model keyword arguments of several row groups, concatenated along the batch axis (dicts of
    tensors recursively; ``None`` stays ``None``)."""
    out = {}
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        if isinstance(first, dict):
            out[key] = cat_rows(*values)
        elif first is None:
            out[key] = None
        else:
            out[key] = torch.cat(values)
    return out


def take_rows(kwargs: dict, rows) -> dict:
    """Model keyword arguments restricted to batch rows ``rows`` (recursively, ``None`` kept)."""
    return {
        k: take_rows(v, rows) if isinstance(v, dict) else (None if v is None else v[rows]) for k, v in kwargs.items()
    }


@torch.no_grad()
def guided_sample(
    model: torch.nn.Module,
    noise: torch.Tensor,
    cond: dict,
    uncond: dict | None = None,
    num_steps: int = 50,
    guidance_scale: float = 4.0,
    progress: bool = False,
    guidance_interval: tuple[float, float] | None = None,
    guidance_reuse: bool | None = None,
    *,
    sampler: str = "ddim",
    shift: float = 1.0,
    timestep_scale: float = 1.0,
    shared: dict | None = None,
    timesteps: Sequence[int] | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` [B, C, H, W] (Flux: packed latents [B, N, C]) with the model's keyword arguments
    ``cond`` (B rows each); returns the samples, shaped as ``noise``.

    With ``uncond`` (B rows: the null class, an empty prompt's embedding...) and ``guidance_scale`` not
    1.0 the model sees batch 2B, ``[cond; uncond]``, at every step; ``guidance_interval`` ``(lo, hi)``
    (model timesteps) applies the guidance only at steps with ``lo <= t < hi`` and the conditional
    prediction alone elsewhere (`guidance_at`; the batch stays 2B, so every step has one shape). Models
    whose output has twice the input channels (learned sigma) have the variance half dropped. The
    sampler's arithmetic stays in ``noise``'s dtype; the model's input is cast to ``model.dtype`` (a
    bfloat16 or float16 model) and its output back.

    ``guidance_reuse`` (``None``: the transformed model's ``plan.guidance_reuse``, ``False`` for any
    other model): split guidance. The conditional rows run every step (cache context ``"cond"``), the
    unconditional rows (context ``"uncond"``) only at steps `tcpass.schedule.runs_uncond` picks: guided
    steps where the conditional stream computed, or the first guided step; other guided steps use the
    last ``cond - uncond`` difference. On an uncached model it is exact and skips the unconditional rows
    outside ``guidance_interval``.

    ``sampler``, ``shift``: the scheduler (`make_scheduler`): ``"ddim"``, ``"dpmpp"`` (DPM-Solver++(2M),
    a fresh solver history per call) or ``"flow"`` (flow matching, SD3 and Flux). ``timestep_scale``:
    the model is called with ``t / timestep_scale`` (Flux takes ``t / 1000``); ``guidance_interval``
    and plans stay on the 0..1000 scale. ``shared``: keyword arguments passed whole at every call, not
    split into rows (Flux's ``img_ids`` and ``txt_ids``). ``timesteps``: DPM-Solver++ only, ``num_steps``
    training timesteps (`tcpass.plan.check_timesteps`) instead of evenly spaced ones; ``None``: the transformed
    model's ``plan.sampler_timesteps`` (calibrated by `bench/timestep_search.py`), else evenly spaced.
    """
    plan = getattr(model, "plan", None)
    scheduler = _scheduler(sampler, shift, num_steps, timesteps, plan)
    channels = noise.shape[1]
    guided = guidance_scale != 1.0 and uncond is not None
    model_dtype = getattr(model, "dtype", noise.dtype)
    if guidance_reuse is None:
        guidance_reuse = bool(getattr(plan, "guidance_reuse", False))
    every = getattr(plan, "guidance_every", 1) if guidance_reuse else 1
    guidance = GuidanceSteps(guidance_scale, guidance_interval, split=guidance_reuse, every=every)
    context = getattr(model, "cache_context", None)

    def call(latents, t, kwargs, stream=None):
        with context(stream) if stream and callable(context) else contextlib.nullcontext():
            timesteps = (t / timestep_scale if timestep_scale != 1.0 else t).expand(latents.shape[0]).to(noise.device)
            out = model(latents.to(model_dtype), timestep=timesteps, **kwargs, **(shared or {})).sample
            if out.ndim == 4:  # learned sigma: drop the variance channels
                out = out[:, :channels]
        return out.to(latents.dtype)

    batched = cat_rows(cond, uncond) if guided and not guidance.split else None
    latents = noise
    for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
        scale = guidance.scale_at(float(t))
        if batched is not None:
            cond_out, uncond_out = call(torch.cat([latents, latents]), t, batched).chunk(2)
            out = uncond_out + scale * (cond_out - uncond_out)
        elif guided:  # split guidance: two streams, the unconditional one sparse
            out = call(latents, t, cond, "cond")
            last = getattr(model, "last_step", None)
            if guidance.runs_uncond(float(t), last.kind if last is not None else StepKind.FULL):
                difference = out - call(latents, t, uncond, "uncond")
            if scale != 1.0:
                out = out + (scale - 1.0) * difference
        else:
            out = call(latents, t, cond)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents


def ddim_sample(
    model: torch.nn.Module,
    noise: torch.Tensor,
    class_labels: torch.Tensor,
    null_label: int,
    num_steps: int = 50,
    guidance_scale: float = 4.0,
    progress: bool = False,
    guidance_interval: tuple[float, float] | None = None,
    guidance_reuse: bool | None = None,
    *,
    sampler: str = "ddim",
    timesteps: Sequence[int] | None = None,
) -> torch.Tensor:
    """Class-conditional `guided_sample`: ``class_labels`` [B], and ``null_label`` for the unconditional rows;
    ``sampler``: ``"ddim"`` or ``"dpmpp"`` (`make_scheduler`); ``timesteps``: as `guided_sample`'s."""
    cond = {"class_labels": class_labels}
    uncond = {"class_labels": torch.full_like(class_labels, null_label)}
    return guided_sample(
        model,
        noise,
        cond,
        uncond,
        num_steps,
        guidance_scale,
        progress,
        guidance_interval,
        guidance_reuse,
        sampler=sampler,
        timesteps=timesteps,
    )
