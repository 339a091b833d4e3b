"""`tcpass demo`: full compute vs tcpass on a shipped reference model, same noise, one run."""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import tcpass
from tcpass.metrics import class_accuracy, psnr, ssim
from tcpass.sampling import ddim_sample, describe_guidance
from tcpass.schedule import check_guidance_interval
from tcpass.zoo import reference


@dataclass
class DemoResult:
    full_images: torch.Tensor
    cached_images: torch.Tensor
    labels: torch.Tensor
    full_seconds: list[float]
    cached_seconds: list[float]
    psnr_db: np.ndarray
    ssim: np.ndarray
    full_accuracy: float
    cached_accuracy: float
    plan: tcpass.CachePlan
    class_names: tuple[str, ...]
    guidance_interval: tuple[float, float] | None = None

    @property
    def speedup(self) -> float:
        return statistics.median(f / c for f, c in zip(self.full_seconds, self.cached_seconds, strict=True))


def run_demo(
    model: str = "digits",
    model_dir: Path | None = None,
    plan_path: Path | None = None,
    steps: int = 50,
    guidance_scale: float = 4.0,
    per_class: int = 1,
    seed: int = 0,
    rounds: int = 3,
    progress: bool = True,
    guidance_interval: tuple[float, float] | None = None,
) -> DemoResult:
    """Generate ``per_class`` samples of every class of the reference model ``model`` (a registry name)
    with full compute and with tcpass from the same noise.

    ``model_dir`` replaces the shipped DiT weights (same classes); ``plan_path`` the model's demo plan
    (`tcpass.zoo.ReferenceModel.demo_plan`). A plan's ``sampler_steps`` replaces ``steps`` for tcpass.
    Both variants are timed in alternation over ``rounds`` whole generations after one warm-up each.
    ``guidance_interval``: model timesteps ``(lo, hi)`` guided (`tcpass.sampling.guided_sample`); ``None``: the
    reference model's own (`tcpass.zoo.ReferenceModel.guidance_interval`); ``(0, 1000)``: every step.
    A plan calibrated under another sampler (its ``notes``) gets a warning: its quality was measured there.
    """
    ref = reference(model)
    interval = check_guidance_interval(guidance_interval) or ref.guidance_interval
    dit = ref.load_model(model_dir)
    classifier = ref.load_classifier()
    plan = tcpass.load_plan(plan_path or ref.demo_plan)
    labels = torch.arange(ref.num_classes).repeat_interleave(per_class)
    cfg = dit.config
    noise = torch.randn(
        len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(seed)
    )
    batch = 2 * len(labels) if guidance_scale != 1.0 else len(labels)
    example = {
        "hidden_states": torch.zeros(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
        "timestep": torch.zeros(batch, dtype=torch.long),
        "class_labels": torch.zeros(batch, dtype=torch.long),
    }
    warn_sampler_mismatch(plan, guidance_scale, interval)
    cached_model = tcpass.transform(dit, plan, example_inputs=example)

    def generate(m, show):  # tcpass runs the plan's own sampler and step count when it records them
        n, sampler = (steps, "ddim") if m is dit else (plan.sampler_steps or steps, plan.sampler or "ddim")
        return ddim_sample(m, noise, labels, ref.null_label, n, guidance_scale, show, interval, sampler=sampler)

    seconds: dict[str, list[float]] = {"full": [], "cached": []}
    images = {}
    from tqdm.auto import tqdm

    variants = (("full", "full compute", dit), ("cached", "tcpass", cached_model))
    runs = tqdm([(i, *v) for i in range(rounds + 1) for v in variants], unit="generation", disable=not progress)
    for i, name, label, m in runs:
        # round 0 warms up (the tcpass graphs are traced there); rounds 1.. are timed
        runs.set_description(f"{'warm-up' if i == 0 else f'timed round {i}/{rounds}'}: {label}")
        start = time.perf_counter()
        images[name] = generate(m, show=False)
        if i > 0:
            seconds[name].append(time.perf_counter() - start)
    full, cached = images["full"].clamp(-1, 1), images["cached"].clamp(-1, 1)
    return DemoResult(
        full_images=full,
        cached_images=cached,
        labels=labels,
        full_seconds=seconds["full"],
        cached_seconds=seconds["cached"],
        psnr_db=psnr(cached, full),
        ssim=ssim(cached, full),
        full_accuracy=class_accuracy(full, labels, classifier),
        cached_accuracy=class_accuracy(cached, labels, classifier),
        plan=plan,
        class_names=ref.class_names,
        guidance_interval=interval,
    )


def warn_sampler_mismatch(
    plan: tcpass.CachePlan, guidance_scale: float, guidance_interval: tuple[float, float] | None
) -> None:
    """Warn when ``plan``'s notes say it was calibrated under another guidance scale or interval."""
    notes = plan.notes or {}
    if "guidance_scale" not in notes:
        return  # calibrated before plans recorded their sampler

    def key(scale, interval):  # without guidance the interval means nothing
        return (float(scale), None if interval is None or float(scale) == 1.0 else tuple(float(v) for v in interval))

    calibrated = key(notes["guidance_scale"], notes.get("guidance_interval"))
    used = key(guidance_scale, guidance_interval)
    if calibrated != used:
        warnings.warn(
            f"the plan was calibrated with {describe_guidance(*calibrated)} but runs with {describe_guidance(*used)}: "
            "its fidelity was measured on the other sampler; recalibrate with `tcpass calibrate --guidance "
            "--guidance-interval` to match.",
            stacklevel=3,
        )


def describe_plan(plan: tcpass.CachePlan, steps: int) -> str:
    """What ``plan`` does over a ``steps``-step DDIM generation (or its own sampler and step count), in one line."""
    from tcpass.sampling import sampler_timesteps
    from tcpass.schedule import StepKind, simulate

    n, sampler = plan.sampler_steps or steps, plan.sampler or "ddim"
    kinds = [s.kind for s in simulate(plan.schedule, sampler_timesteps(n, sampler), plan.skip)]
    name = {"ddim": "DDIM", "dpmpp": "DPM-Solver++(2M)"}.get(sampler, "flow-matching")
    parts = [f"{n} {name} steps" if plan.sampler else f"{n} sampler steps" if plan.sampler_steps else f"{n} DDIM steps"]
    if kinds.count(StepKind.SKIP):
        how = "reused, scaled" if getattr(plan.skip, "scales", None) else "reused"  # a table's scales
        if plan.skip.history > 1 or getattr(plan.skip, "weights", None):
            how = f"forecast from the last {plan.skip.history} computed"
        parts.append(f"{kinds.count(StepKind.SKIP)} skipped (block-stack residual {how})")
    if kinds.count(StepKind.CACHED) and plan.blocks != ():
        parts.append(
            f"{kinds.count(StepKind.CACHED)} token-cached (keep {plan.keep_ratio}, {plan.attention}, "
            f"{plan.selector.kind})"
        )
    parts.append(f"{kinds.count(StepKind.FULL) + (0 if plan.blocks != () else kinds.count(StepKind.CACHED))} full")
    if plan.guidance_reuse:
        parts.append("split guidance (unconditional rows at computed guided steps only)")
    return ", ".join(parts)


def format_table(r: DemoResult) -> str:
    fs, cs = statistics.median(r.full_seconds), statistics.median(r.cached_seconds)
    lines = [
        f"{'':14} {'time s':>8} {'speedup':>8} {'PSNR dB':>14} {'SSIM':>14} {'class acc':>9}",
        f"{'full compute':14} {fs:8.2f} {1.0:7.2f}x {'(reference)':>14} {'(reference)':>14} {r.full_accuracy:9.0%}",
        f"{'tcpass':14} {cs:8.2f} {r.speedup:7.2f}x {r.psnr_db.mean():7.2f} ± {r.psnr_db.std():4.2f} "
        f"{r.ssim.mean():7.4f} ± {r.ssim.std():.3f} {r.cached_accuracy:9.0%}",
    ]
    return "\n".join(lines)


def _show(image: torch.Tensor) -> tuple[np.ndarray, dict]:
    """[C, H, W] in [-1, 1] -> (array for ``imshow``, its keyword arguments); gray for one channel, else RGB."""
    if image.shape[0] == 1:
        return image[0].numpy(), {"cmap": "gray", "vmin": -1, "vmax": 1}
    return ((image.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), {}


def save_grid(r: DemoResult, path: Path) -> Path:
    """PNG: full compute (top), tcpass (middle), |difference| x4 (bottom), one column per sample.

    Columns are titled with the class name; the difference row is black where the two agree.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(r.labels)
    fig, axes = plt.subplots(3, n, figsize=(max(1.2 * n, 4.0), 4.2), squeeze=False)
    rows = [
        ("full compute", r.full_images),
        ("tcpass", r.cached_images),
        ("|diff| x4", (r.cached_images - r.full_images).abs() * 4 - 1),
    ]
    for row, (title, imgs) in enumerate(rows):
        for col in range(n):
            ax = axes[row, col]
            array, kwargs = _show(imgs[col])
            ax.imshow(array, **kwargs)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(r.class_names[int(r.labels[col])], fontsize=8)
            if col == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.suptitle(f"tcpass demo: speedup {r.speedup:.2f}x, PSNR {r.psnr_db.mean():.1f} dB vs full compute", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
