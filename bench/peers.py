"""The caching peers a user would pick instead of tcpass, each configured as its docs intend, on a reference model.

    python bench/peers.py --model digits                         # every peer, 3 seeds, 50 DDIM steps
    python bench/peers.py --model digits --plan bench/plans/digits_2x.json --plan bench/plans/digits_3x.json
    python bench/peers.py --model digits --seeds 1 --per-class 1 --steps 20 --settings-per-method 2   # smoke run

Methods (``--methods`` takes a comma list of these keys), each with a knob sweep spanning about 1.5x-4x
(the step-count sweeps: 0.7 down to 0.14 of the bench's steps, at 50 steps 35 down to 7, about 1.4x-7x):

- ``steps``: the uncached model with fewer DDIM steps, the baseline every method must beat;
- ``steps_split``: the same with split guidance (``guidance_reuse``: the unconditional rows run only at
  guided steps, exact on the uncached model), from all 50 steps down; what a sampler that skips the
  unconditional half outside a guidance interval gets for free, so a split-guidance plan is compared with it;
- ``dpmpp`` / ``dpmpp_split``: the same two with DPM-Solver++(2M) (`tcpass.sampling.make_scheduler`'s
  ``"dpmpp"``) instead of DDIM at the fewer steps, the solver users switch to before they try caching;
- ``dpmpp_trailing`` / ``dpmpp_trailing_split``: the same with diffusers' ``timestep_spacing="trailing"``, a
  free scheduler setting that scores better than the default ``linspace`` at some step counts
  (bench/solver_options.py), so a plan with calibrated timesteps meets the better spacing too;
- ``magcache``: diffusers MagCache; ``mag_ratios`` from its calibration mode on other noise and labels
  than the test seeds, at the bench's step count; threshold (and max skipped steps) swept;
- ``fbc``: diffusers FirstBlockCache, threshold swept;
- ``taylorseer`` / ``taylorseer2``: diffusers TaylorSeer forecasting every block's ``attn1`` and ``ff``
  outputs (order 1 / order 2), cache interval swept;
- ``pab``: diffusers Pyramid Attention Broadcast on the spatial self-attention, block skip range swept;
- ``fastercache``: diffusers FasterCache (attention reuse + unconditional-branch skipping), skip ranges swept;
- ``dbcache`` / ``dbcache_taylorseer``: cache-dit DBCache (F1B0) without / with its TaylorSeer calibrator;
- ``tcpass``: the plans given with ``--plan`` (a plan's ``sampler_steps`` is its sampler step count, its
  ``guidance_reuse`` whether the sampler splits the guidance halves, its ``sampler`` the sampler it was
  calibrated under, DDIM when it records none).

DiT has neither ``enable_cache`` nor ``cache_context``: `HookedDenoiser` gives the diffusers hooks what a
pipeline would (a cache context around every call, the current timestep for PAB and FasterCache, a reset
between generations, FasterCache's [uncond; cond] batch order). See docs/benchmarks.md, "The peers".

Every arm runs from the same noise per seed (DDIM unless DPM-Solver++, CFG batched [cond; uncond] unless split),
generations clamped to [-1, 1]. Proof that each peer fires: the bench counts, per generation, the rows entering
each transformer block's body (``norm1``), its self-attention (``attn1.to_q``) and its MLP (first Linear of ``ff``); a
setting that computes as much as full compute is a configuration bug and raises (``--allow-noop`` records
it instead). Timing: arms warmed up once (on seed 0's noise: the timed seed-0 generation must then be
bit-identical, which proves the reset between generations), then per seed every arm in a fixed order;
speedup = median over rounds of (full time of that round / arm time). Writes bench/results/<out>.json
and <out>.png (PSNR vs measured speedup, one line per method) and prints the frontier at 2x, 3x, 4x and 6x.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import io
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # cache-dit logs every context refresh at info

import tcpass  # noqa: E402
from bench.common import (  # noqa: E402
    RESULTS,
    add_allocator_option,
    add_guidance_options,
    apply_allocator_option,
    fidelity_row,
    guidance_interval_of,
    machine,
    write_json,
)
from tcpass.adapters import stratified_labels  # noqa: E402
from tcpass.metrics import (  # noqa: E402
    bootstrap_draws,
    class_accuracy,
    classifier_features,
    frechet_bootstrap,
    frechet_distance,
    psnr,
    ssim,
)
from tcpass.sampling import ddim_sample, describe_guidance, sampler_timesteps  # noqa: E402
from tcpass.schedule import StepKind  # noqa: E402
from tcpass.zoo import reference  # noqa: E402

CALIBRATION_SEED = 1234  # MagCache's ratios come from this noise and these labels, never from a test seed
FRONTIER_SPEEDUPS = (2.0, 3.0, 4.0, 6.0)
PEER_METHODS = (
    "steps",
    "steps_split",
    "dpmpp",
    "dpmpp_split",
    "dpmpp_trailing",
    "dpmpp_trailing_split",
    "magcache",
    "fbc",
    "taylorseer",
    "taylorseer2",
    "pab",
    "fastercache",
    "dbcache",
    "dbcache_taylorseer",
    "dbcache_dmd",
    "dbcache_foca",
)


# ----------------------------------------------------------------------------------------------------------------------
# Counting what each arm computes
# ----------------------------------------------------------------------------------------------------------------------


def _rows(args: tuple, kwargs: dict) -> int:
    tensor = next(t for t in (*args, *kwargs.values()) if torch.is_tensor(t))
    return tensor.shape[0]


class BlockCounter:
    """Counts, per generation, what a model's transformer blocks really compute.

    A forward pre-hook on ``transformer_blocks[i]`` itself fires whenever the block is *called*, also when a
    diffusers hook (which replaces ``block.forward``) skips its body; so the counts that prove caching are
    taken one level down, on modules only the block's own forward reaches: ``norm1`` (the body ran),
    ``attn1.to_q`` (self-attention ran) and the first Linear of ``ff`` (the MLP ran). Counts are batch rows,
    so FasterCache's half-batch (conditional-only) steps count half.
    """

    KINDS = ("block_calls", "block_module_calls", "block_rows", "attention_rows", "mlp_rows")

    def __init__(self, model: nn.Module) -> None:
        self.counts = dict.fromkeys(self.KINDS, 0)
        for block in model.transformer_blocks:
            mlp_in = next(m for m in block.ff.modules() if isinstance(m, nn.Linear))
            block.register_forward_pre_hook(self._hook("block_module_calls", rows=False), with_kwargs=True)
            block.norm1.register_forward_pre_hook(self._hook("block_calls", rows=False), with_kwargs=True)
            block.norm1.register_forward_pre_hook(self._hook("block_rows"), with_kwargs=True)
            block.attn1.to_q.register_forward_pre_hook(self._hook("attention_rows"), with_kwargs=True)
            mlp_in.register_forward_pre_hook(self._hook("mlp_rows"), with_kwargs=True)

    def _hook(self, kind: str, rows: bool = True) -> Callable:
        def count(_module, args, kwargs):
            self.counts[kind] += _rows(args, kwargs) if rows else 1

        return count

    def take(self) -> dict[str, int]:
        """The counts since the last `take`, and zero them."""
        counts, self.counts = self.counts, dict.fromkeys(self.KINDS, 0)
        return counts


# ----------------------------------------------------------------------------------------------------------------------
# Giving diffusers hooks what a pipeline would
# ----------------------------------------------------------------------------------------------------------------------


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2)
    return torch.cat([second, first])


class HookedDenoiser(nn.Module):
    """A DiT carrying diffusers cache hooks, called the way a diffusers pipeline calls a `CacheMixin` model.

    - every call runs inside a cache context (what ``model.cache_context("cond_uncond")`` does for models
      with `CacheMixin`; DiT has none, so FirstBlockCache and TaylorSeer would raise "No cache context");
    - ``current_timestep`` is the timestep of the running call, for PAB's and FasterCache's callbacks;
    - `reset` resets every stateful hook (``HookRegistry.reset_stateful_hooks``), as pipelines do between
      generations; PAB's and FasterCache's iteration counters and TaylorSeer's step count need it;
    - ``uncond_first``: FasterCache assumes the CFG batch is [uncond; cond], our sampler batches
      [cond; uncond]: the halves of every input are swapped in and of the output swapped back.
    """

    def __init__(self, model: nn.Module, uncond_first: bool = False) -> None:
        super().__init__()
        self.model = model
        self.uncond_first = uncond_first
        self.current_timestep = 1000.0
        self.step_index = 0

    def reset(self) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)
        self.step_index = 0

    def forward(self, hidden_states, timestep, class_labels, return_dict: bool = True):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        self.current_timestep = float(timestep.flatten()[0])
        if self.uncond_first:
            hidden_states, timestep, class_labels = map(_swap_halves, (hidden_states, timestep, class_labels))
        context = CacheContext("cond_uncond", step_index=self.step_index, timestep=self.current_timestep)
        _set_cache_context(self.model, context)  # the body of CacheMixin.cache_context
        try:
            sample = self.model(hidden_states, timestep=timestep, class_labels=class_labels).sample
        finally:
            _set_cache_context(self.model, None)
        self.step_index += 1
        if self.uncond_first:
            sample = _swap_halves(sample)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)


# ----------------------------------------------------------------------------------------------------------------------
# Arms
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Arm:
    """One method at one knob setting: the denoiser the sampler calls, its step count and its reset."""

    method: str
    setting: str
    denoiser: nn.Module
    steps: int
    knobs: dict
    counter: BlockCounter | None
    reset: Callable[[], None] = lambda: None
    peer_stats: Callable[[], dict] = dict  # the peer's own account of what it skipped, read after a generation
    record: dict = field(default_factory=dict)
    guidance_reuse: bool | None = None  # split guidance (`tcpass.sampling.guided_sample`); None: the plan's own
    sampler: str = "ddim"  # `tcpass.sampling.make_scheduler`: "ddim", or "dpmpp" for the DPM-Solver++ step arms
    timesteps: list[int] | None = None  # the sampler's timesteps (DPM-Solver++ only); None: its default spacing

    @property
    def name(self) -> str:
        return self.method if not self.setting else f"{self.method} ({self.setting})"


@dataclass
class Context:
    """What the arm builders need: the model, the sampler settings and the calibration inputs."""

    model: nn.Module
    steps: int
    generate: Callable[[nn.Module, torch.Tensor, int, torch.Tensor | None], torch.Tensor]
    calibration_noise: torch.Tensor
    calibration_labels: torch.Tensor
    example_inputs: dict[str, torch.Tensor]
    probe_samples: int  # samples of the calibration noise a threshold probe generates (one per class)
    guidance_interval: tuple[float, float] | None = None  # model timesteps guided; None: every step

    @property
    def num_blocks(self) -> int:
        return len(self.model.transformer_blocks)


def _counted_copy(model: nn.Module) -> tuple[nn.Module, BlockCounter]:
    """A private copy per arm: hooks never leak into another arm's model."""
    clone = copy.deepcopy(model)
    return clone, BlockCounter(clone)


# Block-call fractions the probed sweeps aim at (about 1.4x, 2x, 2.7x, 3.7x before overheads)
PROBE_TARGETS = (0.7, 0.5, 0.37, 0.27)


def _probed(ctx: Context, make: Callable[[dict], Arm], candidates: list[dict]) -> list[Arm]:
    """The settings of a data-dependent peer whose computed fractions come closest to `PROBE_TARGETS`.

    A residual-difference threshold means a different speed on every model and step count, so each candidate
    runs once on the first `probe_samples` of the calibration noise (never a test seed) and its block-call fraction
    is read from the counter; the candidates nearest each target are kept (the probe is recorded in the JSON).
    """
    noise, labels = ctx.calibration_noise[: ctx.probe_samples], ctx.calibration_labels[: ctx.probe_samples]
    arms, fractions = [], []
    for knobs in candidates:
        arm = make(knobs)
        arm.reset()
        ctx.generate(arm.denoiser, noise, arm.steps, labels)
        fractions.append(arm.counter.take()["block_calls"] / (arm.steps * ctx.num_blocks))
        arms.append(arm)
    firing = [i for i, f in enumerate(fractions) if f < 1.0]  # a candidate that skips nothing is never kept
    if not firing:
        raise RuntimeError(f"{arms[0].method}: no candidate skipped a block on the probe: {candidates}")
    picks = sorted({min(firing, key=lambda i, t=t: abs(fractions[i] - t)) for t in PROBE_TARGETS})
    probe = [{"knobs": arm.knobs, "block_call_fraction": f} for arm, f in zip(arms, fractions, strict=True)]
    for i in picks:
        arms[i].record["probe_block_call_fraction"] = fractions[i]
    arms[picks[0]].record["probe"] = probe
    probed = ", ".join(f"{a.setting} {f:.2f}" for a, f in zip(arms, fractions, strict=True))
    print(f"probed {arms[0].method} (block-call fraction): {probed}", flush=True)
    return [arms[i] for i in picks]


class NotApplicable(Exception):
    """A method that means nothing on this model or sampler (recorded as unavailable, with the reason)."""


# Step counts of the fewer-steps sweeps, as fractions of the bench's steps (50: 35, 25, 20, 17, 12, 10, 8, 7):
# 7 steps brackets a measured 6x, which 8 steps (6.25x before overheads) may fall short of
STEP_FRACTIONS = (0.7, 0.5, 0.4, 0.34, 0.24, 0.2, 0.16, 0.14)
SOLVER_NAMES = {"ddim": "fewer steps", "dpmpp": "DPM-Solver++(2M)"}


def _steps_arms(ctx: Context, split: bool = False, sampler: str = "ddim", spacing: str | None = None) -> list[Arm]:
    if split and ctx.guidance_interval is None:
        raise NotApplicable("guidance at every step: split guidance computes what batched guidance does")
    fractions = STEP_FRACTIONS[1:] if split else STEP_FRACTIONS
    if split and sampler == "ddim":
        fractions = (1.0, *fractions)  # all steps: exact, what the split alone buys
    arms = []
    for steps in sorted({max(2, round(ctx.steps * f)) for f in fractions}, reverse=True):
        method = SOLVER_NAMES[sampler] + (f", {spacing}" if spacing else "") + (", split guidance" if split else "")
        if split and sampler == "ddim" and steps == ctx.steps:  # exact (about 130 dB): never interpolated as lossy
            method = "full, split guidance"
        model, counter = _counted_copy(ctx.model)
        knobs = {
            "num_inference_steps": steps,
            **({"sampler": sampler} if sampler != "ddim" else {}),
            **({"timestep_spacing": spacing} if spacing else {}),
            **({"guidance_reuse": True} if split else {}),
        }
        timesteps = [int(t) for t in sampler_timesteps(steps, sampler, spacing=spacing)] if spacing else None
        arm = Arm(method, f"{steps} steps", model, steps, knobs, counter, guidance_reuse=split or None, sampler=sampler,
                  timesteps=timesteps)  # fmt: skip
        arms.append(arm)
    return arms


def calibrate_mag_ratios(ctx: Context) -> list[float]:
    """MagCache's own calibration mode (``MagCacheConfig(calibrate=True)``) on the calibration noise and labels.

    It prints the per-step ratios at the end of the run; they are read from that print, as its docs say.
    """
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    model = copy.deepcopy(ctx.model)
    apply_mag_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=ctx.steps))
    denoiser = HookedDenoiser(model)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ctx.generate(denoiser, ctx.calibration_noise, ctx.steps, ctx.calibration_labels)
    marker = "MagCacheConfig(mag_ratios=...):"
    text = printed.getvalue()
    if marker not in text:
        raise RuntimeError(f"MagCache calibration printed no ratios; its output was:\n{text}")
    ratios = ast.literal_eval(text.split(marker, 1)[1].strip().splitlines()[0])
    if len(ratios) != ctx.steps:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {ctx.steps} steps.")
    return [float(r) for r in ratios]


def _magcache_arms(ctx: Context) -> list[Arm]:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    ratios = calibrate_mag_ratios(ctx)

    def make(knobs: dict) -> Arm:
        model, counter = _counted_copy(ctx.model)
        config = MagCacheConfig(num_inference_steps=ctx.steps, mag_ratios=ratios, **knobs)
        apply_mag_cache(model, config)
        denoiser = HookedDenoiser(model)
        setting = f"thr {config.threshold}, K {config.max_skip_steps}"
        knobs = {**knobs, "retention_ratio": config.retention_ratio}
        return Arm("MagCache", setting, denoiser, ctx.steps, knobs, counter, denoiser.reset)

    # the docs' default K=3 skipped steps in a row caps the speedup near 2.5x (retention 0.2): the
    # highest thresholds come with longer runs
    candidates = [
        {"threshold": t, "max_skip_steps": k}
        for t, k in ((0.02, 3), (0.05, 3), (0.1, 3), (0.2, 4), (0.4, 6), (0.7, 8), (1.0, 12))
    ]
    arms = _probed(ctx, make, candidates)
    for arm in arms:
        arm.record["mag_ratios"] = ratios
    return arms


def _fbc_arms(ctx: Context) -> list[Arm]:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    def make(knobs: dict) -> Arm:
        model, counter = _counted_copy(ctx.model)
        apply_first_block_cache(model, FirstBlockCacheConfig(**knobs))
        denoiser = HookedDenoiser(model)
        return Arm("FirstBlockCache", f"thr {knobs['threshold']}", denoiser, ctx.steps, knobs, counter, denoiser.reset)

    return _probed(ctx, make, [{"threshold": t} for t in (0.06, 0.1, 0.16, 0.25, 0.4, 0.6, 0.9)])


# TaylorSeer's defaults ``^transformer_blocks.*attn`` (re.fullmatch) match no DiT module (``attn1``): a silent
# no-op. These forecast what the TaylorSeer paper forecasts on DiT: every block's attention and MLP outputs.
TAYLORSEER_CACHE_IDENTIFIERS = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]


def _taylorseer_arms(ctx: Context, order: int) -> list[Arm]:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    arms = []
    intervals = (2, 3, 4, 6, 8) if order == 1 else (2, 3, 4, 6)  # order 2 too reaches 6x
    for interval in intervals:
        model, counter = _counted_copy(ctx.model)
        config = TaylorSeerCacheConfig(
            cache_interval=interval,
            max_order=order,
            taylor_factors_dtype=torch.float32,  # as its docs' example; bf16 factors on CPU lose the derivatives
            cache_identifiers=TAYLORSEER_CACHE_IDENTIFIERS,
        )
        apply_taylorseer_cache(model, config)
        denoiser = HookedDenoiser(model)
        knobs = {
            "cache_interval": interval,
            "max_order": order,
            "disable_cache_before_step": config.disable_cache_before_step,
            "cache_identifiers": TAYLORSEER_CACHE_IDENTIFIERS,
        }
        method = "TaylorSeer" if order == 1 else f"TaylorSeer order {order}"
        arms.append(Arm(method, f"interval {interval}", denoiser, ctx.steps, knobs, counter, denoiser.reset))
    return arms


def _pab_arms(ctx: Context) -> list[Arm]:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    arms = []
    # (block skip range, timestep range): the docs' range (100, 800) first; attention is a minority of a
    # small DiT's time, so the fastest settings widen the range to the whole schedule
    for skip, timesteps in ((2, (100, 800)), (4, (100, 800)), (4, (-1, 1001)), (8, (-1, 1001))):
        model, counter = _counted_copy(ctx.model)
        denoiser = HookedDenoiser(model)
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip,
            spatial_attention_timestep_skip_range=timesteps,
            current_timestep_callback=lambda d=denoiser: d.current_timestep,
        )
        apply_pyramid_attention_broadcast(model, config)
        knobs = {"spatial_attention_block_skip_range": skip, "spatial_attention_timestep_skip_range": timesteps}
        arms.append(Arm("PAB", f"skip {skip}, t in {timesteps}", denoiser, ctx.steps, knobs, counter, denoiser.reset))
    return arms


def _fastercache_arms(ctx: Context) -> list[Arm]:
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache
    from diffusers.hooks.faster_cache import _UNCOND_COND_INPUT_KWARGS_IDENTIFIERS as UNCOND_COND_KWARGS

    arms = []
    # (attention skip range, unconditional-branch skip range, upper timestep bound of both):
    # the docs' defaults are (2, 5, 681 / 641); wider ranges and longer skips go faster
    for attn_skip, uncond_skip, upper in ((2, 5, None), (3, 5, 901), (4, 8, 1001), (6, 12, 1001), (8, 25, 1001)):
        model, counter = _counted_copy(ctx.model)
        denoiser = HookedDenoiser(model, uncond_first=True)
        defaults = FasterCacheConfig()
        attn_range = defaults.spatial_attention_timestep_skip_range if upper is None else (-1, upper)
        uncond_range = defaults.unconditional_batch_timestep_skip_range if upper is None else (-1, upper)
        config = FasterCacheConfig(
            spatial_attention_block_skip_range=attn_skip,
            spatial_attention_timestep_skip_range=attn_range,
            unconditional_batch_skip_range=uncond_skip,
            unconditional_batch_timestep_skip_range=uncond_range,
            # the default split list misses DiT's class_labels: the uncond half of the labels would stay
            _unconditional_conditional_input_kwargs_identifiers=[*UNCOND_COND_KWARGS, "class_labels"],
            # "this weight should gradually increase from 0 to 1 as the inference progresses" (its docs)
            attention_weight_callback=lambda _module, d=denoiser: 1.0 - d.current_timestep / 1000.0,
            tensor_format="BCHW",
            current_timestep_callback=lambda d=denoiser: d.current_timestep,
        )
        apply_faster_cache(model, config)
        knobs = {
            "spatial_attention_block_skip_range": attn_skip,
            "spatial_attention_timestep_skip_range": attn_range,
            "unconditional_batch_skip_range": uncond_skip,
            "unconditional_batch_timestep_skip_range": uncond_range,
            "attention_weight": "1 - t/1000",
            "cfg_order_adapter": "inputs swapped to [uncond; cond], output swapped back",
        }
        setting = f"attn {attn_skip}, uncond {uncond_skip}, t < {uncond_range[1]}"
        arms.append(Arm("FasterCache", setting, denoiser, ctx.steps, knobs, counter, denoiser.reset))
    return arms


DBCACHE_CALIBRATORS = {  # cache-dit's forecasting calibrators: --methods name -> (config class, its settings)
    "taylorseer": ("TaylorSeerCalibratorConfig", {"taylorseer_order": 1}),
    "dmd": ("DMDCalibratorConfig", {}),  # Dynamic Mode Decomposition (Prony), its default history 6
    "foca": ("FoCaCalibratorConfig", {}),
}


def _dbcache_calibrator(name: str | None):
    """cache-dit's calibrator config ``name`` (None: plain DBCache), or `NotApplicable` when this cache-dit
    does not implement it (1.5.3's ``FoCaCalibratorConfig`` is a placeholder its contexts reject)."""
    if name is None:
        return None
    import cache_dit

    cls_name, settings = DBCACHE_CALIBRATORS[name]
    cls = getattr(cache_dit, cls_name, None)
    if cls is None:
        raise NotApplicable(f"cache-dit {cache_dit.__version__} has no {cls_name}")
    config = cls(**settings)
    if "placeholder" in (cls.__doc__ or "").lower():
        raise NotApplicable(f"cache-dit {cache_dit.__version__}: {cls_name} is {cls.__doc__.strip()!r}")
    return config


def _dbcache_arms(ctx: Context, calibrator: str | None = None) -> list[Arm]:
    import cache_dit
    from cache_dit import DBCacheConfig

    warmup = max(1, round(8 * ctx.steps / 50))  # cache-dit's default 8 warmup steps, scaled to the step count
    _dbcache_calibrator(calibrator)  # NotApplicable before any model is built

    def configs(threshold: float) -> dict:
        cache_config = DBCacheConfig(
            Fn_compute_blocks=1,  # the default F8 is every block of an 8-block DiT: nothing would be cached
            Bn_compute_blocks=0,
            residual_diff_threshold=threshold,
            max_warmup_steps=warmup,
            enable_separate_cfg=False,  # CFG is batched into one forward
            num_inference_steps=ctx.steps,
        )
        config = {"cache_config": cache_config, "calibrator_config": _dbcache_calibrator(calibrator)}
        return {k: v for k, v in config.items() if v}

    def make(knobs: dict) -> Arm:
        threshold = knobs["residual_diff_threshold"]
        model, counter = _counted_copy(ctx.model)
        cache_dit.enable_cache(model, **configs(threshold))

        def reset() -> None:
            cache_dit.refresh_context(model, **configs(threshold))

        def stats() -> dict:
            return {"cached_steps": list(cache_dit.summary(model, logging=False)[0].cached_steps)}

        knobs = {
            **knobs,
            "Fn_compute_blocks": 1,
            "Bn_compute_blocks": 0,
            "max_warmup_steps": warmup,
            "calibrator": calibrator,
            **(DBCACHE_CALIBRATORS[calibrator][1] if calibrator else {}),
        }
        suffix = {None: "", "taylorseer": "+TaylorSeer", "dmd": "+DMD", "foca": "+FoCa"}[calibrator]
        method = f"cache-dit DBCache{suffix}"
        return Arm(method, f"thr {threshold}", model, ctx.steps, knobs, counter, reset, stats)

    return _probed(ctx, make, [{"residual_diff_threshold": t} for t in (0.08, 0.12, 0.18, 0.27, 0.4, 0.6, 0.9, 1.4)])


def _plan_arms(ctx: Context, paths: list[Path]) -> list[Arm]:
    arms = []
    for path in paths:
        plan = tcpass.load_plan(path)
        transformed = tcpass.transform(ctx.model, plan, example_inputs=ctx.example_inputs, plan_dir=path.parent)
        steps = plan.sampler_steps or ctx.steps
        last = dict(transformed.step_counts)

        def stats(transformed=transformed, last=last):
            counts = {kind.value: transformed.step_counts[kind] - last.get(kind, 0) for kind in StepKind}
            last.clear()
            last.update(transformed.step_counts)
            return {"step_counts": counts}

        method = (plan.notes or {}).get("method", "tcpass")
        knobs = {"plan": str(path), "sampler_steps": steps, "plan_fields": plan.to_dict()}
        # the step graphs are traced (torch.export): module hooks never fire, the peer's own counts prove it
        sampler = plan.sampler or "ddim"
        arm = Arm(method, path.stem, transformed, steps, knobs, None, transformed.reset, stats, sampler=sampler)
        arms.append(arm)
    return arms


def build_arms(ctx: Context, methods: list[str], plans: list[Path]) -> tuple[list[Arm], list[dict]]:
    """Every requested arm, and for each peer that could not be built, why."""
    builders: dict[str, Callable[[], list[Arm]]] = {
        "steps": lambda: _steps_arms(ctx),
        "steps_split": lambda: _steps_arms(ctx, split=True),
        "dpmpp": lambda: _steps_arms(ctx, sampler="dpmpp"),
        "dpmpp_split": lambda: _steps_arms(ctx, split=True, sampler="dpmpp"),
        "dpmpp_trailing": lambda: _steps_arms(ctx, sampler="dpmpp", spacing="trailing"),
        "dpmpp_trailing_split": lambda: _steps_arms(ctx, split=True, sampler="dpmpp", spacing="trailing"),
        "magcache": lambda: _magcache_arms(ctx),
        "fbc": lambda: _fbc_arms(ctx),
        "taylorseer": lambda: _taylorseer_arms(ctx, 1),
        "taylorseer2": lambda: _taylorseer_arms(ctx, 2),
        "pab": lambda: _pab_arms(ctx),
        "fastercache": lambda: _fastercache_arms(ctx),
        "dbcache": lambda: _dbcache_arms(ctx),
        "dbcache_taylorseer": lambda: _dbcache_arms(ctx, "taylorseer"),
        "dbcache_dmd": lambda: _dbcache_arms(ctx, "dmd"),
        "dbcache_foca": lambda: _dbcache_arms(ctx, "foca"),
        "tcpass": lambda: _plan_arms(ctx, plans),
    }
    arms, unavailable = [], []
    for method in methods:
        if method not in builders:
            raise ValueError(f"--methods: unknown method {method!r}; known: {', '.join(builders)}.")
        try:
            arms += builders[method]()
        except ImportError as e:  # a peer that is not installed is recorded, never silently dropped
            unavailable.append({"method": method, "reason": f"{type(e).__name__}: {e}"})
            print(f"!! {method} unavailable: {e} (pip install -e .[peers])", flush=True)
        except NotApplicable as e:
            unavailable.append({"method": method, "reason": str(e)})
            print(f"!! {method} not applicable: {e}", flush=True)
    return arms, unavailable


def select_settings(arms: list[Arm], per_method: int | None) -> list[Arm]:
    """``per_method`` settings of each peer, spread over its sweep (first and last kept); every tcpass plan kept."""
    if per_method is None:
        return arms
    by_method: dict[str, list[Arm]] = {}
    for arm in arms:
        if arm.counter is not None:
            by_method.setdefault(arm.method, []).append(arm)
    chosen = set()
    for group in by_method.values():
        picks = {round(i) for i in np.linspace(0, len(group) - 1, min(per_method, len(group)))}
        chosen |= {id(group[i]) for i in picks}
    return [arm for arm in arms if arm.counter is None or id(arm) in chosen]


# ----------------------------------------------------------------------------------------------------------------------
# Reading the frontier
# ----------------------------------------------------------------------------------------------------------------------


def psnr_at_speed(points: list[tuple[float, float]], speedup: float) -> float | None:
    """A method's PSNR at ``speedup``, linearly interpolated between its two bracketing measured settings.

    ``points`` are (measured speedup, PSNR dB) of one method's settings, in any order. Returns ``None`` when
    ``speedup`` is outside the measured range: a method is never extrapolated.
    """
    finite = sorted((s, p) for s, p in points if np.isfinite(p))
    for (s0, p0), (s1, p1) in zip(finite, finite[1:], strict=False):
        if s0 <= speedup <= s1:
            return p0 if s1 == s0 else p0 + (p1 - p0) * (speedup - s0) / (s1 - s0)
    if len(finite) == 1 and finite[0][0] == speedup:
        return finite[0][1]
    return None


def frontier(rows: list[dict]) -> dict:
    """Each method's interpolated PSNR at each of `FRONTIER_SPEEDUPS`, and the best peer (not tcpass) at each."""
    methods: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["method"] != "full":
            methods.setdefault(r["method"], []).append((r["speedup_median"], r["psnr_db_mean"]))
    table = {m: {str(s): psnr_at_speed(pts, s) for s in FRONTIER_SPEEDUPS} for m, pts in methods.items()}
    tcpass_methods = {r["method"] for r in rows if r.get("is_tcpass")}
    best = {}
    for s in FRONTIER_SPEEDUPS:
        peers = [(v[str(s)], m) for m, v in table.items() if m not in tcpass_methods and v[str(s)] is not None]
        best[str(s)] = None if not peers else {"method": max(peers)[1], "psnr_db": max(peers)[0]}
    # the criterion: each tcpass plan against every peer interpolated at the plan's own measured speed
    at_plans = []
    for r in rows:
        if not r.get("is_tcpass"):
            continue
        speed = r["speedup_median"]
        peers = [(psnr_at_speed(pts, speed), m) for m, pts in methods.items() if m not in tcpass_methods]
        peers = [(v, m) for v, m in peers if v is not None]
        top = max(peers) if peers else None
        sample_quality = {} if top is None else peer_sample_quality(rows, top[1], r)
        at_plans.append(
            {
                "plan": r["name"],
                "speedup": speed,
                "psnr_db": r["psnr_db_mean"],
                "psnr_db_std": r["psnr_db_std"],
                "best_peer": None if top is None else {"method": top[1], "psnr_db": top[0]},
                "margin_db": None if top is None else r["psnr_db_mean"] - top[0],
                "peers_at_speed": {m: v for v, m in peers},
                "frechet": r["frechet_vs_heldout"],
                "frechet_bootstrap_std": r.get("frechet_bootstrap_std"),
                "class_acc": r["class_acc_mean"],
                **sample_quality,
                "equal_calls": equal_calls(rows, r),
            }
        )
    return {"psnr_db_at_speedup": table, "best_peer": best, "tcpass_plans": at_plans}


def block_rows(row: dict, full: dict) -> float | None:
    """Rows the transformer blocks process per generation (batch rows x block calls): a peer's as counted; a tcpass
    plan's when it caches nothing (every call a FULL step of the batched, or with split guidance half, batch); None
    when unknown or when the plan caches (its CACHED and SKIP calls do other work)."""
    counts = row.get("counts_per_generation") or {}
    if "step_counts" not in counts:
        return counts.get("block_rows")
    full_counts = full["counts_per_generation"]
    if not skipped_nothing(counts, full_counts):
        return None
    per_call = full_counts["block_rows"] / full["steps"]  # all blocks, the whole CFG batch
    split = (row.get("knobs") or {}).get("plan_fields", {}).get("guidance_reuse", False)
    return counts["step_counts"][StepKind.FULL.value] * per_call / (2 if split else 1)


def equal_calls(rows: list[dict], plan_row: dict) -> dict | None:
    """The best peer whose transformer calls process as many rows as ``plan_row``'s (the same work, batch and split
    guidance included), so a plan that caches nothing and only moves its sampler's timesteps is read without timing
    noise; None when the plan caches, or no peer does that much work."""
    full = next((r for r in rows if r["method"] == "full"), None)
    if full is None or "block_rows" not in (full.get("counts_per_generation") or {}):
        return None
    work = block_rows(plan_row, full)
    same = [r for r in rows if not r.get("is_tcpass") and r is not full and block_rows(r, full) == work]
    if work is None or not same:
        return None
    top = max(same, key=lambda r: r["psnr_db_mean"])
    return {
        "model_calls": plan_row["counts_per_generation"]["step_counts"][StepKind.FULL.value],
        "block_rows": work,
        "best_peer": {"name": top["name"], "psnr_db": top["psnr_db_mean"]},
        "margin_db": plan_row["psnr_db_mean"] - top["psnr_db_mean"],
    }


def peer_sample_quality(rows: list[dict], method: str, plan_row: dict) -> dict:
    """``method``'s Fréchet distance and class accuracy interpolated at ``plan_row``'s measured speed (as its PSNR
    is), and the paired bootstrap std of the plan's Fréchet minus that interpolation (same resamplings)."""
    mine = [r for r in rows if r["method"] == method]
    speed = plan_row["speedup_median"]
    out = {
        "best_peer_frechet": psnr_at_speed([(r["speedup_median"], r["frechet_vs_heldout"]) for r in mine], speed),
        "best_peer_class_acc": psnr_at_speed([(r["speedup_median"], r["class_acc_mean"]) for r in mine], speed),
    }
    if "frechet_bootstrap" in plan_row and all("frechet_bootstrap" in r for r in mine):
        diffs = [
            plan_row["frechet_bootstrap"][b]
            - psnr_at_speed([(r["speedup_median"], r["frechet_bootstrap"][b]) for r in mine], speed)
            for b in range(len(plan_row["frechet_bootstrap"]))
        ]
        out["frechet_minus_peer_paired_std"] = float(np.std(diffs))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits", help="reference model (tcpass.zoo.REFERENCE_MODELS)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=2, help="samples per class per seed")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of full compute and of the peers")
    add_guidance_options(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plan", type=Path, action="append", default=[], help="tcpass plan JSON (repeatable)")
    parser.add_argument("--methods", help=f"comma list of methods to run (default: all of {', '.join(PEER_METHODS)})")
    parser.add_argument("--settings-per-method", type=int, help="run only N settings of each sweep (smoke runs)")
    parser.add_argument("--speed-reps", type=int, default=0, help="extra interleaved timing-only rounds")
    parser.add_argument(
        "--allow-noop", action="store_true", help="record settings that skip nothing instead of raising"
    )
    parser.add_argument("--out", help="result file stem (default: peers_<model>)")
    add_allocator_option(parser)
    args = parser.parse_args()
    apply_allocator_option(args)
    torch.set_num_threads(args.threads)
    out = args.out or f"peers_{args.model}"

    ref = reference(args.model)
    interval = args.interval = guidance_interval_of(args, ref)  # recorded with the results and printed
    model = ref.load_model(None).eval()
    classifier = ref.load_classifier()
    held_out, _ = ref.held_out()
    half = len(held_out) // 2
    real_features = classifier_features(held_out[:half], classifier)
    real_vs_real = frechet_distance(classifier_features(held_out[half:], classifier), real_features)

    labels = torch.arange(ref.num_classes).repeat_interleave(args.per_class)
    batch = 2 * len(labels)

    def noise_for(seed: int) -> torch.Tensor:
        return torch.randn(len(labels), *ref.image_shape, generator=torch.Generator().manual_seed(seed))

    def generate(denoiser, noise, steps, class_labels=None, guidance_reuse=None, sampler="ddim", timesteps=None):
        class_labels = labels if class_labels is None else class_labels
        return ddim_sample(
            denoiser,
            noise,
            class_labels,
            ref.null_label,
            steps,
            args.guidance,
            guidance_interval=interval,
            guidance_reuse=guidance_reuse,
            sampler=sampler,
            timesteps=timesteps,
        ).clamp(-1, 1)

    calibration = torch.Generator().manual_seed(CALIBRATION_SEED)
    ctx = Context(
        model=model,
        steps=args.steps,
        generate=generate,
        calibration_noise=torch.randn(len(labels), *ref.image_shape, generator=calibration),
        calibration_labels=stratified_labels(len(labels), ref.num_classes, calibration),  # as tcpass calibrates
        example_inputs={
            "hidden_states": torch.zeros(batch, *ref.image_shape),
            "timestep": torch.zeros(batch, dtype=torch.long),
            "class_labels": torch.zeros(batch, dtype=torch.long),
        },
        probe_samples=ref.num_classes,
        guidance_interval=interval,
    )
    methods = args.methods.split(",") if args.methods else [*PEER_METHODS, *(["tcpass"] if args.plan else [])]
    if args.plan and "tcpass" not in methods:
        methods.append("tcpass")
    full_model, full_counter = _counted_copy(model)
    full = Arm("full", "", full_model, args.steps, {"num_inference_steps": args.steps}, full_counter)
    peers, unavailable = build_arms(ctx, methods, args.plan)
    arms = [full, *select_settings(peers, args.settings_per_method)]
    print(f"{len(arms)} arms: " + ", ".join(a.name for a in arms), flush=True)

    def run(arm: Arm, noise: torch.Tensor) -> tuple[torch.Tensor, float, dict]:
        """One whole timed generation (reset included: a pipeline resets before each call)."""
        start = time.perf_counter()
        arm.reset()
        images = generate(arm.denoiser, noise, arm.steps, guidance_reuse=arm.guidance_reuse, sampler=arm.sampler,
                          timesteps=arm.timesteps)  # fmt: skip
        seconds = time.perf_counter() - start
        counts = arm.counter.take() if arm.counter else {}
        return images, seconds, {**counts, **arm.peer_stats()}

    # warm-up on seed 0's noise: seed 0's timed generation must reproduce it bit for bit (the reset works)
    first_noise = noise_for(0)
    warm_images, warm_counts = {}, {}
    for arm in arms:
        warm_images[arm.name], _, warm_counts[arm.name] = run(arm, first_noise)
    check_fires(arms, warm_counts, args.allow_noop)  # before the timed rounds: a no-op fails fast
    seconds: dict[str, list[float]] = {a.name: [] for a in arms}
    per_seed = {a.name: {"psnr": [], "ssim": [], "acc": []} for a in arms}
    samples: dict[str, list[torch.Tensor]] = {a.name: [] for a in arms}
    for seed in range(args.seeds):
        noise = noise_for(seed)
        images = {}
        for arm in arms:
            images[arm.name], s, counts = run(arm, noise)
            seconds[arm.name].append(s)
            samples[arm.name].append(images[arm.name])
            per_seed[arm.name]["acc"].append(class_accuracy(images[arm.name], labels, classifier))
            if seed == 0:
                arm.record["counts"] = counts
                arm.record["reset_verified"] = bool(torch.equal(images[arm.name], warm_images[arm.name]))
                if not arm.record["reset_verified"]:
                    print(f"!! {arm.name}: seed 0 twice gave different images: state leaks across generations")
        for arm in arms:
            per_seed[arm.name]["psnr"].append(float(np.mean(psnr(images[arm.name], images["full"]))))
            per_seed[arm.name]["ssim"].append(float(np.mean(ssim(images[arm.name], images["full"]))))
        print(f"seed {seed}: " + ", ".join(f"{a.name} {seconds[a.name][-1]:.1f}s" for a in arms), flush=True)
    for rep in range(args.speed_reps):
        noise = noise_for(args.seeds + rep)
        for arm in arms:
            seconds[arm.name].append(run(arm, noise)[1])

    draws = bootstrap_draws(len(labels) * args.seeds)  # the same resamplings for every arm: paired
    rows = [
        summarize(arm, full, seconds, per_seed[arm.name], samples[arm.name], classifier, real_features, draws)
        for arm in arms
    ]
    front = frontier(rows)
    print_table(rows, front, len(labels), args, batch, real_vs_real, unavailable)
    payload = {
        "machine": machine(),
        "config": {
            "model": args.model,
            "seeds": args.seeds,
            "samples_per_seed": len(labels),
            "batch": batch,
            "steps": args.steps,
            "guidance": args.guidance,
            "guidance_interval": interval,
            "speed_reps": args.speed_reps,
            "calibration_seed": CALIBRATION_SEED,
            "methods": methods,
            "plans": [str(p) for p in args.plan],
        },
        "frechet_real_vs_real": real_vs_real,
        "results": rows,
        "unavailable": unavailable,
        "frontier": front,
    }
    print(f"wrote {write_json(out + '.json', payload)}")
    print(f"wrote {plot(rows, RESULTS / (out + '.png'), args.model)}")


def summarize(arm, full, seconds, quality, samples, classifier, real_features, draws) -> dict:
    speedups = [f / s for f, s in zip(seconds[full.name], seconds[arm.name], strict=True)]
    counts = arm.record.get("counts", {})
    full_counts = full.record["counts"]

    def fraction(kind: str) -> float | None:
        return counts[kind] / full_counts[kind] if kind in counts and full_counts[kind] else None

    work = None
    if "attention_rows" in counts:
        computed = counts["attention_rows"] + counts["mlp_rows"]
        work = computed / (full_counts["attention_rows"] + full_counts["mlp_rows"])
    feats = classifier_features(torch.cat(samples), classifier)
    boot = frechet_bootstrap(feats, real_features, draws)
    return {
        "method": arm.method,
        "setting": arm.setting,
        "name": arm.name,
        "is_tcpass": arm.counter is None,
        "steps": arm.steps,
        "knobs": arm.knobs,
        **fidelity_row(speedups, quality, frechet_distance(feats, real_features)),
        "frechet_bootstrap_std": float(np.std(boot)),
        "frechet_bootstrap": [round(float(v), 3) for v in boot],  # paired across arms (same resamplings)
        "seconds_per_generation": seconds[arm.name],
        "block_calls": counts.get("block_calls"),
        "block_call_fraction": fraction("block_calls"),
        "attention_fraction": fraction("attention_rows"),
        "mlp_fraction": fraction("mlp_rows"),
        "work_fraction": work,
        "counts_per_generation": counts,
        "reset_verified": arm.record.get("reset_verified"),
        "noop": arm.record.get("noop", False),
        **{k: v for k, v in arm.record.items() if k not in ("counts", "reset_verified", "noop")},
    }


def skipped_nothing(counts: dict, full_counts: dict) -> bool:
    """Whether a generation computed everything full compute does (tcpass arms: no CACHED or SKIP step)."""
    if "step_counts" in counts:
        steps = counts["step_counts"]
        return steps.get(StepKind.CACHED.value, 0) + steps.get(StepKind.SKIP.value, 0) == 0
    computed = counts["attention_rows"] + counts["mlp_rows"]
    return computed >= full_counts["attention_rows"] + full_counts["mlp_rows"]


def check_fires(arms: list[Arm], counts: dict[str, dict], allow_noop: bool) -> None:
    """A setting that computes what full compute computes is a configuration bug: raise, or flag it."""
    full_counts = counts[arms[0].name]
    # fewer calls than full compute (a plan's own sampler steps) is firing too
    bad = [
        arm.name for arm in arms[1:] if arm.steps >= arms[0].steps and skipped_nothing(counts[arm.name], full_counts)
    ]
    for arm in arms[1:]:
        arm.record["noop"] = arm.name in bad
    if bad:
        message = f"these settings computed everything full compute does (the peer did not fire): {bad}"
        if not allow_noop:
            raise RuntimeError(message + "; fix the configuration or pass --allow-noop to record them.")
        print(f"!! NOOP: {message}", flush=True)


def print_table(rows, front, samples, args, batch, real_vs_real, unavailable) -> None:
    print(
        f"\n{args.model}: {samples} samples x {args.seeds} seeds per arm (model batch {batch}), "
        f"{args.steps} DDIM steps, {describe_guidance(args.guidance, args.interval)}, {args.threads} thread(s); "
        f"Fréchet real-vs-real {real_vs_real:.2f}"
    )
    header = f"{'arm':52} {'speedup':>15} {'PSNR dB':>14} {'SSIM':>7} {'acc':>6} {'Fréchet ± boot':>14}"
    print(f"{header} {'blocks':>6} {'work':>5}")
    for r in rows:
        psnr_text = "inf" if np.isinf(r["psnr_db_mean"]) else f"{r['psnr_db_mean']:6.2f} ± {r['psnr_db_std']:4.2f}"
        lo, hi = r["speedup_min_max"]
        blocks = "-" if r["block_call_fraction"] is None else f"{r['block_call_fraction']:.2f}"
        work = "-" if r["work_fraction"] is None else f"{r['work_fraction']:.2f}"
        flags = (" NOOP" if r.get("noop") else "") + ("" if r["reset_verified"] is not False else " STATE-LEAK")
        frechet = f"{r['frechet_vs_heldout']:6.1f} ± {r.get('frechet_bootstrap_std', float('nan')):4.1f}"
        print(
            f"{r['name'][:52]:52} {r['speedup_median']:5.2f}x {lo:4.2f}-{hi:4.2f} {psnr_text:>14} "
            f"{r['ssim_mean']:7.4f} {r['class_acc_mean']:6.1%} {frechet:>14} {blocks:>6} {work:>5}{flags}"
        )
    for u in unavailable:
        print(f"{u['method']:52} not run: {u['reason']}")
    print("\nblocks: block bodies run / full compute's; work: attention+MLP rows computed / full compute's")
    print("frontier (PSNR dB interpolated between measured settings; '-' = outside the measured range):")
    width = max([32, *map(len, front["psnr_db_at_speedup"])])
    print(f"{'method':{width}}" + "".join(f"{s:>10.1f}x" for s in FRONTIER_SPEEDUPS))
    for method, at in front["psnr_db_at_speedup"].items():
        cells = "".join(f"{'-' if at[str(s)] is None else f'{at[str(s)]:.2f}':>11}" for s in FRONTIER_SPEEDUPS)
        print(f"{method:{width}}{cells}")
    for s in FRONTIER_SPEEDUPS:
        best = front["best_peer"][str(s)]
        print(
            f"best peer at {s:.1f}x: "
            + ("none measured there" if best is None else f"{best['method']} {best['psnr_db']:.2f} dB")
        )
    for p in front["tcpass_plans"]:
        best = p["best_peer"]
        versus = (
            "no peer measured at that speed"
            if best is None
            else (
                f"best peer there {best['method']} {best['psnr_db']:.2f} dB, margin {p['margin_db']:+.2f} dB; "
                f"Fréchet {p['frechet']:.1f} vs {p['best_peer_frechet']:.1f} "
                f"(paired bootstrap std of the difference {p.get('frechet_minus_peer_paired_std', float('nan')):.1f}), "
                f"class accuracy {p['class_acc']:.1%} vs {p['best_peer_class_acc']:.1%}"
            )
        )
        same = p.get("equal_calls")
        if same:
            versus += (
                f"; at equal model calls ({same['model_calls']:g}): best peer {same['best_peer']['name']} "
                f"{same['best_peer']['psnr_db']:.2f} dB, margin {same['margin_db']:+.2f} dB"
            )
        print(f"{p['plan']} at {p['speedup']:.2f}x: {p['psnr_db']:.2f} ± {p['psnr_db_std']:.2f} dB; {versus}")


EXACT_DB = 60.0  # PSNR above this is full compute up to float rounding (a split-guidance full generation: ~131 dB)


def split_exact(rows: list[dict]) -> tuple[dict[str, list[dict]], list[dict]]:
    """``({method: its lossy settings by speed}, [settings exact up to float rounding])``; full compute in neither."""
    lossy: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["speedup_median"]):
        if r["method"] != "full" and np.isfinite(r["psnr_db_mean"]) and r["psnr_db_mean"] <= EXACT_DB:
            lossy.setdefault(r["method"], []).append(r)
    exact = [r for r in rows if r["method"] != "full" and r["psnr_db_mean"] > EXACT_DB]
    return lossy, exact


def plot(rows: list[dict], path: Path, model_name: str) -> Path:
    """The Pareto view: measured speedup (x) vs PSNR vs full compute (y), one line per method.

    Settings that are exact up to float rounding (PSNR above `EXACT_DB`) would squash every lossy line into the
    bottom of the plot; they are drawn as triangles on the top edge, labelled with their PSNR, instead.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    lossy, exact = split_exact(rows)
    for i, method in enumerate(lossy):
        points = lossy[method]
        is_tcpass = points[0]["is_tcpass"]
        style = {"color": "black", "ls": "--"} if method == "fewer steps" else {"color": plt.cm.tab10(i % 10)}
        ax.errorbar(
            [r["speedup_median"] for r in points],
            [r["psnr_db_mean"] for r in points],
            yerr=[r["psnr_db_std"] for r in points],
            marker="*" if is_tcpass else "o",
            markersize=10 if is_tcpass else 5,
            capsize=3,
            lw=2.5 if is_tcpass else 1.2,
            label=method,
            **style,
        )
    for s in FRONTIER_SPEEDUPS:
        ax.axvline(s, color="gray", ls=":", lw=1)
    if exact:
        top = ax.get_ylim()[1] + 1.5
        ax.set_ylim(top=top + 0.5)
        for r in exact:
            ax.plot([r["speedup_median"]], [top], marker="^", color="gray", ls="none")
            ax.annotate(
                f"{r['name']}: exact ({r['psnr_db_mean']:.0f} dB)",
                (r["speedup_median"], top),
                textcoords="offset points",
                xytext=(6, -4),
                fontsize=8,
            )
    ax.set(
        xlabel="measured speedup vs full compute (x, median over seeds)",
        ylabel="PSNR vs full compute (dB, mean ± std over seeds)",
        title=f"{model_name}: quality at speed, every caching peer and tcpass (up and right is better)",
    )
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
