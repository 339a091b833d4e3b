"""A class-conditional DDIM sampler with classifier-free guidance, shared by demo, benchmarks and tests.

The model is called once per step on the batch ``[conditional rows; unconditional rows]``, as
diffusers' DiTPipeline does, so CFG halves are rows like any other for the transformed model.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm


def make_scheduler(num_train_timesteps: int = 1000) -> DDIMScheduler:
    """DDIM over DiT's training schedule (linear betas 1e-4..0.02, epsilon prediction)."""
    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="epsilon",
    )


def ddim_timesteps(num_steps: int) -> list[float]:
    """The model-scale timesteps (0..1000) of a ``num_steps``-step DDIM generation, in call order."""
    scheduler = make_scheduler()
    scheduler.set_timesteps(num_steps)
    return [float(t) for t in scheduler.timesteps]


@torch.no_grad()
def ddim_sample(
    model: torch.nn.Module,
    noise: torch.Tensor,
    class_labels: torch.Tensor,
    null_label: int,
    num_steps: int = 50,
    guidance_scale: float = 4.0,
    progress: bool = False,
) -> torch.Tensor:
    """Denoise ``noise`` [B, C, H, W] into samples for ``class_labels`` [B]; returns [B, C, H, W].

    ``guidance_scale`` 1.0 disables guidance (batch B); otherwise the model sees batch 2B.
    Models whose output has twice the input channels (learned sigma) have the variance half dropped.
    The sampler's arithmetic stays in ``noise``'s dtype; the model's input is cast to ``model.dtype``
    (a bfloat16 or float16 model) and its output back.
    """
    scheduler = make_scheduler()
    scheduler.set_timesteps(num_steps)
    latents = noise
    channels = noise.shape[1]
    guided = guidance_scale != 1.0
    labels = torch.cat([class_labels, torch.full_like(class_labels, null_label)]) if guided else class_labels
    model_dtype = getattr(model, "dtype", noise.dtype)
    for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
        model_input = torch.cat([latents, latents]) if guided else latents
        timesteps = t.expand(model_input.shape[0]).to(noise.device)
        out = model(model_input.to(model_dtype), timestep=timesteps, class_labels=labels).sample[:, :channels]
        out = out.to(latents.dtype)
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents
