"""Speed of tcpass and its peers on Wan2.1-T2V-1.3B's published config (random weights), CPU, float32.

    python bench/video_speed.py --time-budget 7200        # the full run: every arm, eager and inductor (~70 min)
    python bench/video_speed.py --tiny                    # smoke run: a 2-layer narrow Wan, every arm, ~1 min

The model is ``WanTransformer3DModel`` at the 1.3B config (30 blocks, 12 heads x 128, FFN 8960, umT5 width 4096),
randomly initialised: this bench measures speed and compute, never quality. Inputs: one latent video of
``--latent`` (default 2 x 20 x 36: 5 frames at 160 x 288 pixels through Wan's VAE, 4x in time and 8x in space),
2 x 10 x 18 = 360 video tokens after the (1, 2, 2) patch, and 512 text tokens (WanPipeline's umT5 length).
Batch 1: one guidance half. Batched classifier-free guidance doubles every arm's work alike. At 360 tokens a
step of the uncached model costs 1.1 TFLOP, about 7 s on 2 quiet cores (28 s measured beside two test jobs), so
the published 81 frames at 480 x 832 (32760 tokens, hours per step here) are out of reach. The full run takes
about 70 minutes on 2 quiet cores (about 500 uncached-step times, and 10-15 minutes of inductor compilation);
``--steps 30`` takes about 60% of that.

Every arm drives the transformer through the same generation: ``--steps`` (WanPipeline's default 50) flow-matching
Euler steps with Wan's shift 3.0, from the same noise and text embedding. Arms: ``uncached``; tcpass ``token``
(bench/families.py's plan: keep 25% of tokens with cached K/V at CACHED steps, one FULL step in 5), ``step``
(`tcpass.StepSkip`: every other step skipped, the block stack's residual reused), ``composed`` (both); diffusers
``fbc`` (FirstBlockCache) and ``taylorseer`` (TaylorSeer, order 1, forecasting every block's self-attention,
cross-attention and FFN; its default identifiers match no Wan module), cache-dit ``dbcache`` (DBCache F1B0) --
each configured as bench/peers.py does. The threshold peers (FBC, DBCache) get the threshold at which their own
rule, replayed on an uncached generation from other noise (the calibration generation), computes
``--peer-compute-fraction`` of the steps; TaylorSeer's interval is the nearest to that fraction.

Timing: the arms of one executor run in lockstep -- each sampler step, every arm computes its step in turn (the
order reversed every other step), each call timed -- so machine drift hits every arm alike. Each call is labelled
with what it computed (tcpass: FULL / CACHED phase / SKIP; peers: blocks, self-attention, cross-attention and FFN
runs counted by hooks one level below the peers' own hooks). An arm's generation time is composed from its step
mix as bench/families.py does: sum over step kinds of (calls of that kind x median seconds of that kind), and
its speedup is its baseline's composed time over its own (the plain sum of the timed calls is recorded too).
FLOP-ideal: FLOPs of what each call computed (tcpass: `tcpass.flops.generation_flops`; peers: the uncached
model's FLOPs per block, self-attention, cross-attention and FFN, times the counted runs), baseline over arm.

Executors: ``eager``; ``inductor``: the uncached model and tcpass compiled whole (``torch.compile`` fullgraph,
static shapes; tcpass compiles each step graph), the peers compiled per block (diffusers'
``compile_repeated_blocks``: their decisions run in Python between blocks) and measured against the uncached model
compiled the same way (the ``uncached, regional compile`` arm). Compilation happens in a warm-up that calls every
arm on a few timesteps covering each kind of step it will run (a peer goes on until its calls stop compiling:
TaylorSeer's hooks compile a graph per computed step index, so its warm-up is a whole generation); frames compiled
during the timed generations are counted in the JSON (0 expected). The JSON (bench/results/``--out``) is rewritten
after every row; ``--time-budget`` (seconds) skips an executor's group whose estimated time (from the uncached step
time and each arm's FLOPs, compilation aside) no longer fits.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # cache-dit logs every context refresh at info

import tcpass  # noqa: E402
from bench.common import (  # noqa: E402
    RESULTS,
    add_allocator_option,
    apply_allocator_option,
    machine,
    peak_rss_mib,
    write_json,
)
from bench.families import DEFAULT_PLAN as TOKEN_PLAN  # noqa: E402
from tcpass.adapters import WAN_FLOW_SHIFT, WAN_TEXT_TOKENS  # noqa: E402
from tcpass.flops import _CUSTOM as FLOP_RULES  # noqa: E402
from tcpass.flops import generation_flops  # noqa: E402
from tcpass.sampling import make_scheduler  # noqa: E402
from tcpass.schedule import StepKind, simulate  # noqa: E402

# diffusers' WanTransformer3DModel config of Wan-AI/Wan2.1-T2V-1.3B-Diffusers
WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
# --tiny: diffusers' own tiny Wan test width (2 heads x 12, FFN 32, text width 24), 2 blocks
TINY = {**WAN_1_3B, "num_attention_heads": 2, "attention_head_dim": 12, "text_dim": 24, "ffn_dim": 32, "num_layers": 2}
LATENT = (2, 20, 36)  # latent frames x height x width: 5 frames at 160 x 288 pixels -> 2 x 10 x 18 = 360 tokens
TINY_LATENT = (2, 8, 8)  # 32 tokens
TINY_STEPS = 10
NOISE_SEED = 0
CALIBRATION_SEED = 1234  # the threshold peers' calibration generation: never the timed noise (as bench/peers.py)
ARMS = ("token", "step", "composed", "fbc", "taylorseer", "dbcache")
PEER_NAMES = ("FirstBlockCache", "TaylorSeer", "cache-dit DBCache")
EXECUTORS = ("eager", "inductor")
SETTLED_STEPS = 3  # a peer's warm-up ends after this many steps in a row compiled nothing
TARGET_MEASURED_OVER_IDEAL = 0.85  # issue #33: the token plan's implementation efficiency
COUNTED = {"blocks": "norm1", "self-attn": "attn1", "cross-attn": "attn2", "ffn": "ffn"}  # `RunCounter`
# TaylorSeer's defaults (``^blocks.*attn``, re.fullmatch) match no Wan module: a silent no-op. These forecast what
# bench/peers.py forecasts on DiT, every block's attention and MLP outputs, with Wan's cross-attention
TAYLORSEER_CACHE_IDENTIFIERS = [rf"blocks\.\d+\.{m}" for m in ("attn1", "attn2", "ffn")]


# ----------------------------------------------------------------------------------------------------------------------
# The generation every arm runs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """The model, its inputs and the sampler grid shared by every arm."""

    model: nn.Module
    noise: torch.Tensor  # [1, C, F, H, W]
    text: torch.Tensor  # [1, 512, text_dim]: a stand-in for one prompt's umT5 embedding
    timesteps: list[float]  # model-scale (0..1000), in call order
    sigmas: list[float]  # len(timesteps) + 1, for the Euler update

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    def inputs(self) -> dict[str, torch.Tensor]:
        """The model's keyword arguments at the first step (what tcpass traces and counts FLOPs with)."""
        t = torch.full((1,), self.timesteps[0])
        return {"hidden_states": self.noise, "timestep": t, "encoder_hidden_states": self.text}


def make_setup(tiny: bool, latent: tuple[int, int, int], steps: int, layers: int | None = None) -> Setup:
    torch.manual_seed(0)
    config = {**(TINY if tiny else WAN_1_3B), **({"num_layers": layers} if layers else {})}
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**config).eval()
    g = torch.Generator().manual_seed(NOISE_SEED)
    noise = torch.randn(1, config["in_channels"], *latent, generator=g)
    text = torch.randn(1, WAN_TEXT_TOKENS, config["text_dim"], generator=g)
    scheduler = make_scheduler(sampler="flow", shift=WAN_FLOW_SHIFT)
    scheduler.set_timesteps(steps)
    return Setup(model, noise, text, [float(t) for t in scheduler.timesteps], [float(s) for s in scheduler.sigmas])


def call(model: nn.Module, setup: Setup, latents: torch.Tensor, t: float, context: bool = False) -> torch.Tensor:
    """The velocity ``model`` predicts at timestep ``t``; ``context``: inside a diffusers cache context, as
    WanPipeline calls a transformer that carries cache hooks."""
    with torch.no_grad(), model.cache_context("cond") if context else contextlib.nullcontext():
        return model(latents, torch.full((1,), t), setup.text, return_dict=False)[0]


def euler(setup: Setup, i: int, latents: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    return latents + (setup.sigmas[i + 1] - setup.sigmas[i]) * velocity


# ----------------------------------------------------------------------------------------------------------------------
# What each call computed, and its FLOPs
# ----------------------------------------------------------------------------------------------------------------------


class RunCounter:
    """Per call, how many blocks ran their body and how many self-attention, cross-attention and FFN modules ran.

    Forward pre-hooks on modules below the peers' hooks: ``norm1`` (FirstBlockCache and DBCache skip the whole block),
    ``attn1.to_q``, ``attn2.to_q`` and the FFN's first Linear (TaylorSeer replaces ``attn1``, ``attn2`` and ``ffn``).
    The counts are tensors incremented in place: inside a compiled block a Python counter would be a guarded
    constant, recompiling the block at every call.
    """

    def __init__(self, model: nn.Module) -> None:
        self.runs = {kind: torch.zeros((), dtype=torch.int64) for kind in COUNTED}
        for block in model.blocks:
            for kind, name in COUNTED.items():
                module = block.get_submodule(name)
                first = next((m for m in module.modules() if isinstance(m, nn.Linear)), module)
                first.register_forward_pre_hook(self._hook(self.runs[kind]))

    @staticmethod
    def _hook(runs: torch.Tensor) -> Callable:
        def count(_module, _args):
            runs.add_(1)

        return count

    def take(self) -> dict[str, int]:
        """The counts since the last `take`, and zero them."""
        counts = {kind: int(runs) for kind, runs in self.runs.items()}
        for runs in self.runs.values():
            runs.zero_()
        return counts


@dataclass(frozen=True)
class ModuleFlops:
    """FLOPs of one uncached call: the whole model, and one block's self-attention, cross-attention and FFN."""

    total: int
    block: int
    parts: dict[str, int]  # "self-attn", "cross-attn", "ffn"
    num_blocks: int

    def of(self, runs: dict[str, int]) -> int:
        """FLOPs of a call that ran ``runs`` (`RunCounter.take`): outside the blocks, plus what ran inside them."""
        rest = self.block - sum(self.parts.values())
        outside = self.total - self.num_blocks * self.block
        return outside + runs["blocks"] * rest + sum(runs[k] * f for k, f in self.parts.items())


def module_flops(setup: Setup) -> ModuleFlops:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FLOP_RULES) as counter:
        call(setup.model, setup, setup.noise, setup.timesteps[0])
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    prefix = f"{type(setup.model).__name__}.blocks.0"
    parts = {kind: by_module.get(f"{prefix}.{name}", 0) for kind, name in COUNTED.items() if kind != "blocks"}
    return ModuleFlops(int(counter.get_total_flops()), by_module[prefix], parts, setup.num_blocks)


# ----------------------------------------------------------------------------------------------------------------------
# Calibrating the threshold peers on their own rule
# ----------------------------------------------------------------------------------------------------------------------


def first_block_residuals(setup: Setup) -> list[torch.Tensor]:
    """The first block's residual (output - input) at every step of an uncached generation from other noise."""
    residuals = []

    def keep(_module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        residuals.append(output - hidden)

    handle = setup.model.blocks[0].register_forward_hook(keep, with_kwargs=True)
    latents = torch.randn(setup.noise.shape, generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    try:
        for i, t in enumerate(setup.timesteps):
            latents = euler(setup, i, latents, call(setup.model, setup, latents, t))
    finally:
        handle.remove()
    return residuals


def replay_first_block_rule(residuals: list[torch.Tensor], threshold: float, warmup: int = 1) -> list[bool]:
    """Which steps FirstBlockCache / DBCache F1B0 compute: the first ``warmup``, then those whose first-block residual
    differs from the last computed step's by more than ``threshold`` (mean |r - r_last| / mean |r_last|)."""
    computed, last = [], None
    for i, r in enumerate(residuals):
        compute = i < warmup or last is None or float((r - last).abs().mean() / last.abs().mean()) > threshold
        computed.append(compute)
        last = r if compute else last
    return computed


def calibrate_threshold(residuals: list[torch.Tensor], fraction: float, warmup: int = 1) -> tuple[float, float]:
    """The threshold in (0, 1) whose replayed rule computes the fraction of steps nearest ``fraction``, and that
    fraction."""
    best = None
    for threshold in np.geomspace(1e-3, 0.99, 240):
        got = float(np.mean(replay_first_block_rule(residuals, float(threshold), warmup)))
        if best is None or abs(got - fraction) < abs(best[1] - fraction):
            best = (float(threshold), got)
    return best


# ----------------------------------------------------------------------------------------------------------------------
# Arms
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Arm:
    """One way of running the generation: what is called, how a call is labelled and costed, how state is reset."""

    name: str
    executor: str
    baseline: str  # the arm its speedup is measured against (same executor)
    model: nn.Module
    step_kind: Callable[[], str]  # what the last call computed
    step_flops: Callable[[str], int]
    warmup: list[float]  # timesteps covering every kind of step the arm will run
    reset: Callable[[], None] = lambda: None
    context: bool = False  # called inside a diffusers cache context
    settle: bool = False  # warm up until calls stop compiling (`warm_up`)
    knobs: dict = field(default_factory=dict)
    extra: Callable[[], dict] = dict  # read after the timed generation
    runs: Callable[[str], dict] = lambda _kind: {}  # peers: what a call of that kind ran (`RunCounter.take`)


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree sharing every parameter and buffer: hooks stay private, memory is not doubled."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def tcpass_plans(setup: Setup) -> dict[str, tcpass.CachePlan]:
    skip = tcpass.StepSkip(timesteps=tuple(setup.timesteps[1::2]))  # every other step, the first computed
    return {
        "token": TOKEN_PLAN,
        "step": tcpass.CachePlan(blocks=(), skip=skip),
        "composed": dataclasses.replace(TOKEN_PLAN, skip=skip),
    }


def covering_warmup(plan: tcpass.CachePlan, timesteps: list[float]) -> list[float]:
    """A decreasing subsequence of ``timesteps`` whose calls run every (kind, phase) of step of the plan's
    generation."""
    sequence, seen = [], set()
    for t in timesteps:
        step = simulate(plan.schedule, [*sequence, t], plan.skip)[-1]
        if (step.kind, step.phase) not in seen:
            sequence.append(t)
            seen.add((step.kind, step.phase))
    return sequence


def tcpass_arm(name: str, plan, setup: Setup, executor: str, flops: dict) -> Arm:
    backend = None if executor == "eager" else "inductor"
    tm = tcpass.transform(setup.model, plan, example_inputs=setup.inputs(), backend=backend)
    if name not in flops:
        flops[name] = generation_flops(tm, setup.inputs(), setup.timesteps)
    gen = flops[name]

    def step_kind() -> str:
        step = tm.last_step
        return f"cached, phase {step.phase}" if step.kind is StepKind.CACHED else step.kind.value

    def step_flops(kind: str) -> int:
        if kind.startswith("cached"):
            return gen.cached_step[int(kind[-1])]
        return gen.skip_step if kind == StepKind.SKIP.value else gen.full_step

    def extra() -> dict:
        return {"cache_mib": tm.step_graphs(setup.inputs()).cache_bytes / 2**20, "plan": plan.to_dict()}

    warmup = covering_warmup(plan, setup.timesteps)
    return Arm(f"tcpass {name}", executor, "uncached", tm, step_kind, step_flops, warmup, tm.reset, extra=extra)


@dataclass
class PeerContext:
    setup: Setup
    flops: ModuleFlops
    fraction: float  # the fraction of steps the peers compute
    thresholds: dict[str, float | None]  # given on the command line, or None: calibrated
    taylorseer_interval: int | None
    residuals: list[torch.Tensor] | None = None  # the calibration generation, run on first need
    calibration: dict = field(default_factory=dict)  # per peer: threshold, replayed fraction (same for both executors)

    def threshold(self, peer: str, warmup: int) -> tuple[float, list[bool] | None]:
        """``peer``'s threshold, and the steps its rule computes on the calibration generation (None if not run)."""
        if peer not in self.calibration:
            given = self.thresholds[peer]
            if given is None and self.residuals is None:
                print("calibration generation (uncached, other noise) for the threshold peers", flush=True)
                self.residuals = first_block_residuals(self.setup)
            threshold = given if given is not None else calibrate_threshold(self.residuals, self.fraction, warmup)[0]
            replayed = None if self.residuals is None else replay_first_block_rule(self.residuals, threshold, warmup)
            self.calibration[peer] = {
                "threshold": threshold,
                "from": "command line" if given is not None else "calibration generation",
                "replayed_compute_fraction": None if replayed is None else float(np.mean(replayed)),
                "replayed": replayed,
            }
        entry = self.calibration[peer]
        return entry["threshold"], entry["replayed"]


def _peer_warmup(setup: Setup, computed: list[bool] | None) -> list[float]:
    """The generation's timesteps up to the first step the peer is expected to compute after having cached one:
    every path of its hooks (compute, cache, compute with a cache to update) runs, and compiles, before the timed
    generation."""
    computed = computed or [True]
    first_cached = next((i for i, c in enumerate(computed) if not c), len(computed) - 1)
    after = next((i for i in range(first_cached, len(computed)) if computed[i]), len(computed) - 1)
    return setup.timesteps[: after + 1]


def _peer(
    ctx: PeerContext, name: str, executor: str, apply: Callable, computed: list[bool] | None, context: bool
) -> Arm:
    """The peer that ``apply(model) -> (reset, knobs)`` puts on a private copy of the model; ``computed``: the steps
    it is expected to compute (for its warm-up); ``context``: it needs a diffusers cache context around each call."""
    peer = shared_copy(ctx.setup.model)
    counter = RunCounter(peer)
    reset, knobs = apply(peer)
    if executor == "inductor":
        peer.compile_repeated_blocks(fullgraph=False, dynamic=False)
    runs_of: dict[str, dict] = {}

    def step_kind() -> str:
        runs = counter.take()
        kind = ", ".join(f"{runs[k]} {k}" for k in COUNTED)
        runs_of[kind] = runs
        return kind

    baseline = "uncached" if executor == "eager" else "uncached, regional compile"
    warmup = _peer_warmup(ctx.setup, computed)

    def step_flops(kind: str) -> int:
        return ctx.flops.of(runs_of[kind])

    return Arm(
        name,
        executor,
        baseline,
        peer,
        step_kind,
        step_flops,
        warmup,
        reset,
        context,
        settle=True,
        knobs=knobs,
        runs=runs_of.get,
    )


def _hooks_reset(model: nn.Module) -> Callable[[], None]:
    def reset() -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)

    return reset


def fbc_arm(ctx: PeerContext, executor: str) -> Arm:
    from diffusers.hooks import FirstBlockCacheConfig

    threshold, computed = ctx.threshold("fbc", warmup=1)

    def apply(model: nn.Module) -> tuple[Callable[[], None], dict]:
        model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        return _hooks_reset(model), {"threshold": threshold}

    return _peer(ctx, "FirstBlockCache", executor, apply, computed, context=True)


def taylorseer_arm(ctx: PeerContext, executor: str) -> Arm:
    from diffusers.hooks import TaylorSeerCacheConfig

    interval = ctx.taylorseer_interval or max(1, round(1 / ctx.fraction))
    config = TaylorSeerCacheConfig(
        cache_interval=interval,
        max_order=1,
        taylor_factors_dtype=torch.float32,  # as its docs' example; bf16 factors on CPU lose the derivatives
        cache_identifiers=TAYLORSEER_CACHE_IDENTIFIERS,
    )
    start = config.disable_cache_before_step
    computed = [i < start or (i - start - 1) % interval == 0 for i in range(len(ctx.setup.timesteps))]  # its rule

    def apply(model: nn.Module) -> tuple[Callable[[], None], dict]:
        model.enable_cache(config)
        knobs = {
            "cache_interval": interval,
            "max_order": 1,
            "disable_cache_before_step": start,
            "cache_identifiers": TAYLORSEER_CACHE_IDENTIFIERS,
        }
        return _hooks_reset(model), knobs

    return _peer(ctx, "TaylorSeer", executor, apply, computed, context=True)


def dbcache_arm(ctx: PeerContext, executor: str) -> Arm:
    import cache_dit
    from cache_dit import DBCacheConfig

    steps = len(ctx.setup.timesteps)
    warmup = max(1, round(8 * steps / 50))  # cache-dit's default 8 warmup steps, scaled to the step count
    threshold, computed = ctx.threshold("dbcache", warmup)

    def config() -> DBCacheConfig:
        return DBCacheConfig(
            Fn_compute_blocks=1,  # F1B0, as bench/peers.py: the first block decides, as in FirstBlockCache
            Bn_compute_blocks=0,
            residual_diff_threshold=threshold,
            max_warmup_steps=warmup,
            enable_separate_cfg=False,  # one call per step (batch 1)
            num_inference_steps=steps,
        )

    def apply(model: nn.Module) -> tuple[Callable[[], None], dict]:
        cache_dit.enable_cache(model, cache_config=config())
        knobs = {"residual_diff_threshold": threshold, "Fn_compute_blocks": 1, "Bn_compute_blocks": 0}
        return lambda: cache_dit.refresh_context(model, cache_config=config()), {**knobs, "max_warmup_steps": warmup}

    return _peer(ctx, "cache-dit DBCache", executor, apply, computed, context=False)


PEERS = {"fbc": fbc_arm, "taylorseer": taylorseer_arm, "dbcache": dbcache_arm}


def configure_dynamo() -> None:
    """Per-block compilation of several hooked copies of one block class: the block's code is shared, so dynamo must
    tell the copies apart by their hooks (its default skips hook guards: `RunCounter` would count another copy's calls)
    and keep a graph per peer variant (TaylorSeer alone has a dozen; past the limit dynamo silently runs eagerly)."""
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096


def uncached_arms(setup: Setup, executor: str, flops: ModuleFlops, regional: bool) -> list[Arm]:
    """The baseline(s): the model itself (compiled whole under inductor), and, for the peers under inductor, a
    copy compiled per block as theirs are."""

    def arm(name: str, model: nn.Module) -> Arm:
        return Arm(name, executor, name, model, lambda: "full", lambda _: flops.total, setup.timesteps[:1])

    if executor == "eager":
        return [arm("uncached", setup.model)]
    arms = [arm("uncached", torch.compile(setup.model, backend="inductor", fullgraph=True, dynamic=False))]
    if regional:
        copy_ = shared_copy(setup.model)
        copy_.compile_repeated_blocks(fullgraph=True, dynamic=False)
        arms.append(arm("uncached, regional compile", copy_))
    return arms


# ----------------------------------------------------------------------------------------------------------------------
# Running one executor's arms in lockstep
# ----------------------------------------------------------------------------------------------------------------------


def warm_up(arm: Arm, setup: Setup) -> int:
    """Call ``arm`` on its warm-up timesteps (compiling what it will run), then reset it; returns the calls made.

    A peer (``arm.settle``) then goes on along the generation until `SETTLED_STEPS` steps in a row compile nothing:
    under per-block compilation its hooks' Python state can be guarded on (TaylorSeer's step counter is, so it
    compiles at every computed step of its first generation and times its steady state from the second).
    """
    from torch._dynamo.utils import counters

    latents, calls, quiet = setup.noise.clone(), 0, 0
    last = setup.timesteps.index(arm.warmup[-1])
    extra = setup.timesteps[last + 1 :] if arm.settle else []
    for t in [*arm.warmup, *extra]:
        if calls >= len(arm.warmup) and quiet >= SETTLED_STEPS:
            break
        frames = counters["frames"]["total"]
        i = setup.timesteps.index(t)
        latents = euler(setup, i, latents, call(arm.model, setup, latents, t, arm.context))
        arm.step_kind()
        calls += 1
        quiet = 0 if counters["frames"]["total"] > frames else quiet + 1
    arm.reset()
    return calls


def lockstep(arms: list[Arm], setup: Setup) -> dict[str, dict]:
    """One generation per arm, every arm advancing one step in turn; per arm: seconds, kind and FLOPs of each call."""
    latents = {arm.name: setup.noise.clone() for arm in arms}
    record = {arm.name: {"seconds": [], "kinds": [], "flops": [], "runs": dict.fromkeys(COUNTED, 0)} for arm in arms}
    for i, t in enumerate(setup.timesteps):
        for arm in arms if i % 2 == 0 else arms[::-1]:
            start = time.perf_counter()
            velocity = call(arm.model, setup, latents[arm.name], t, arm.context)
            elapsed = time.perf_counter() - start
            kind = arm.step_kind()
            latents[arm.name] = euler(setup, i, latents[arm.name], velocity)
            r = record[arm.name]
            for part, n in arm.runs(kind).items():
                r["runs"][part] += n
            r["seconds"].append(elapsed)
            r["kinds"].append(kind)
            r["flops"].append(arm.step_flops(kind))
        print(f"  step {i + 1}/{len(setup.timesteps)}", end="\r", flush=True)
    for arm in arms:
        record[arm.name]["latents"] = latents[arm.name]
    return record


def composed_seconds(r: dict) -> tuple[float, dict]:
    """Sum over step kinds of calls x median seconds, and the per-kind table."""
    kinds = {}
    for kind in dict.fromkeys(r["kinds"]):
        seconds = [s for s, k in zip(r["seconds"], r["kinds"], strict=True) if k == kind]
        flops = r["flops"][r["kinds"].index(kind)]
        kinds[kind] = {"calls": len(seconds), "median_s": statistics.median(seconds), "flops": flops}
        kinds[kind].update(min_s=min(seconds), max_s=max(seconds))
    return sum(v["calls"] * v["median_s"] for v in kinds.values()), kinds


def rows_of(arms: list[Arm], record: dict, setup: Setup, compiled_during: int) -> list[dict]:
    base_latents = record["uncached"]["latents"]
    rows = []
    for arm in arms:
        r = record[arm.name]
        seconds, kinds = composed_seconds(r)
        base = record[arm.baseline]
        base_seconds, _ = composed_seconds(base)
        speedup = base_seconds / seconds
        ideal = sum(base["flops"]) / sum(r["flops"])
        row = {
            "arm": arm.name,
            "executor": arm.executor,
            "baseline": arm.baseline,
            "status": "ok",
            "generation_s": seconds,
            "generation_s_sum_of_calls": sum(r["seconds"]),
            "speedup": speedup,
            "speedup_sum_of_calls": sum(base["seconds"]) / sum(r["seconds"]),
            "flop_ideal_speedup": ideal,
            "measured_over_ideal": speedup / ideal,
            "generation_tflop": sum(r["flops"]) / 1e12,
            "step_kinds": kinds,
            "knobs": arm.knobs,
            "final_latents_rel_diff_vs_uncached": float(
                (r["latents"] - base_latents).norm() / base_latents.norm().clamp_min(1e-12)
            ),
            "per_call": {"seconds": r["seconds"], "kind": r["kinds"]},
            **arm.extra(),
        }
        if arm.baseline != "uncached":
            row["speedup_vs_uncached"] = composed_seconds(record["uncached"])[0] / seconds
        if arm.executor != "eager":
            row["frames_compiled_during_timed_generations"] = compiled_during  # of the whole group: should be 0
        if arm.name == "tcpass token":
            row["target_measured_over_ideal"] = TARGET_MEASURED_OVER_IDEAL
            row["meets_target"] = row["measured_over_ideal"] >= TARGET_MEASURED_OVER_IDEAL
        if arm.name in PEER_NAMES:
            runs = len(setup.timesteps) * setup.num_blocks
            row["computed_block_fraction"] = r["runs"]["blocks"] / runs  # block bodies (FBC, DBCache skip them)
            parts = [k for k in COUNTED if k != "blocks"]  # attention and FFN modules (TaylorSeer forecasts them)
            row["computed_module_fraction"] = sum(r["runs"][k] for k in parts) / (len(parts) * runs)
            if sum(r["flops"]) >= sum(base["flops"]):
                row["status"] = "no-op: the peer computed every block and module (a configuration bug)"
        rows.append(row)
    return rows


def build_arms(executor: str, wanted: list[str], setup: Setup, ctx: PeerContext, tc_flops: dict) -> tuple[list, list]:
    """The executor's arms, and a row for each one that could not be built (a peer not installed)."""
    peers = [a for a in wanted if a in PEERS]
    arms = uncached_arms(setup, executor, ctx.flops, regional=bool(peers))
    plans = tcpass_plans(setup)
    arms += [tcpass_arm(a, plans[a], setup, executor, tc_flops) for a in wanted if a in plans]
    missing = []
    for a in peers:
        try:
            arms.append(PEERS[a](ctx, executor))
        except ImportError as e:  # a peer that is not installed is recorded, never silently dropped
            missing.append({"arm": a, "executor": executor, "status": f"unavailable: {e} (pip install -e .[peers])"})
            print(f"!! {a} unavailable: {e}", flush=True)
    return arms, missing


def group_estimate_s(executor: str, wanted: list[str], step_s: float, ctx: PeerContext, tc_flops: dict) -> float:
    """Seconds an executor's group should take, compilation aside: the uncached step time x the FLOP fraction of each
    arm's generation (a peer under inductor may warm up for a whole generation), plus a pending calibration."""
    peers = [a for a in wanted if a in PEERS]
    fractions = [1.0] + ([1.0] if executor == "inductor" and peers else [])
    fractions += [1 / tc_flops[a].ideal_speedup if a in tc_flops else 1.0 for a in wanted if a not in PEERS]
    fractions += [ctx.fraction * (2 if executor == "inductor" else 1) for _ in peers]
    calibrating = ctx.residuals is None and any(ctx.thresholds.get(a, 0) is None for a in peers)
    return step_s * len(ctx.setup.timesteps) * (sum(fractions) + calibrating)


def print_rows(rows: list[dict]) -> None:
    print(f"{'arm':28} {'executor':9} {'gen s':>8} {'speedup':>8} {'ideal':>7} {'meas/ideal':>10}  steps")
    for r in rows:
        if r["status"] != "ok" and "speedup" not in r:
            print(f"{r['arm']:28} {r['executor']:9} {r['status']}")
            continue
        mix = "; ".join(f"{v['calls']}x {k} {v['median_s']:.3f}s" for k, v in r["step_kinds"].items())
        print(
            f"{r['arm']:28} {r['executor']:9} {r['generation_s']:8.2f} {r['speedup']:7.2f}x "
            f"{r['flop_ideal_speedup']:6.2f}x {r['measured_over_ideal']:10.2f}  {mix}"
            + ("" if r["status"] == "ok" else f"  !! {r['status']}")
        )


def describe(args: argparse.Namespace, setup: Setup, latent: tuple[int, int, int]) -> dict:
    """The result file's header: machine, model, inputs, sampler, and how every number is made."""
    return {
        "machine": machine(),
        "model": {
            "config": ("tiny (narrow Wan)" if args.tiny else "Wan2.1-T2V-1.3B")
            + (f", {args.layers} blocks" if args.layers else ""),
            "class": type(setup.model).__name__,
            "diffusers_config": dict(setup.model.config),
            "parameters_m": sum(p.numel() for p in setup.model.parameters()) / 1e6,
            "dtype": "float32",
            "latent_frames_height_width": list(latent),
            "video_tokens": int(np.prod(latent)) // 4,
            "text_tokens": WAN_TEXT_TOKENS,
            "batch": 1,
        },
        "sampler": {
            "kind": "flow-matching Euler",
            "shift": WAN_FLOW_SHIFT,
            "steps": len(setup.timesteps),
            "timesteps": setup.timesteps,
        },
        "method": {
            "timing": "lockstep: each sampler step every arm calls the model once in turn (order reversed every other "
            "step), each call timed; generation_s = sum over step kinds of calls x median seconds of the kind; "
            "speedup = baseline arm's generation_s / arm's (same executor)",
            "flops": "per call, FLOPs of what ran (torch.utils.flop_counter): tcpass step graphs "
            "(tcpass.flops.generation_flops); peers: the uncached model's FLOPs outside the blocks plus the counted "
            "block bodies, self-attention, cross-attention and FFN runs; flop_ideal_speedup = baseline / arm",
            "peers": "FirstBlockCache and DBCache thresholds: their rule replayed on an uncached generation from noise "
            f"seed {CALIBRATION_SEED} to compute {args.peer_compute_fraction:g} of the steps (unless given); "
            "TaylorSeer: the interval nearest that fraction",
        },
        "rows": [],
    }


def run_executor(executor: str, wanted: list[str], ctx: PeerContext, tc_flops: dict) -> list[dict]:
    """Build, warm up and time one executor's arms in lockstep; its rows (and one per arm that could not be built)."""
    from torch._dynamo.utils import counters

    print(f"{executor}: building and warming up the arms", flush=True)
    if executor == "inductor":
        configure_dynamo()
    setup = ctx.setup
    arms, missing = build_arms(executor, wanted, setup, ctx, tc_flops)
    warmups = {}
    for arm in arms:
        start = time.perf_counter()
        warmups[arm.name] = {"warmup_calls": warm_up(arm, setup), "warmup_s": time.perf_counter() - start}
    frames = counters["frames"]["total"]
    print(f"{executor}: {len(arms)} arms in lockstep over {len(setup.timesteps)} steps", flush=True)
    record = lockstep(arms, setup)
    print()
    rows = rows_of(arms, record, setup, counters["frames"]["total"] - frames)
    for row in rows:
        row.update(warmups[row["arm"]])
    return rows + missing


def run(args: argparse.Namespace, write: Callable[[dict], object]) -> dict:
    """The whole bench; ``write(payload)`` after every row. Returns the payload."""
    started = time.perf_counter()
    wanted = [a for a in args.arms.split(",") if a]
    executors = [e for e in args.executors.split(",") if e]
    unknown = sorted(set(wanted) - set(ARMS)) + sorted(set(executors) - set(EXECUTORS))
    if unknown:
        raise ValueError(
            f"unknown arm(s) or executor(s) {unknown}: --arms takes {', '.join(ARMS)} (uncached always runs), "
            f"--executors {', '.join(EXECUTORS)}."
        )
    if not 0 < args.peer_compute_fraction <= 1:
        raise ValueError(
            f"--peer-compute-fraction {args.peer_compute_fraction}: expected a fraction of steps in (0, 1]."
        )
    latent = tuple(args.latent or (TINY_LATENT if args.tiny else LATENT))
    setup = make_setup(args.tiny, latent, args.steps or (TINY_STEPS if args.tiny else 50), args.layers)
    payload = describe(args, setup, latent)
    flops = module_flops(setup)
    payload["model"]["uncached_step_tflop"] = flops.total / 1e12
    thresholds = {"fbc": args.fbc_threshold, "dbcache": args.dbcache_threshold}
    ctx = PeerContext(setup, flops, args.peer_compute_fraction, thresholds, args.taylorseer_interval)
    payload["peer_calibration"] = ctx.calibration
    write(payload)
    tc_flops: dict = {}
    step_s = None
    if args.time_budget:
        start = time.perf_counter()
        call(setup.model, setup, setup.noise, setup.timesteps[0])
        step_s = time.perf_counter() - start
    for executor in executors:
        if args.time_budget:
            estimate = group_estimate_s(executor, wanted, step_s, ctx, tc_flops)
            left = args.time_budget - (time.perf_counter() - started)
            if estimate > left:
                reason = f"skipped: estimated {estimate:.0f} s > {left:.0f} s left of --time-budget"
                print(f"!! {executor}: {reason}", flush=True)
                payload["rows"] += [{"arm": a, "executor": executor, "status": reason} for a in ["uncached", *wanted]]
                write(payload)
                continue
        rows = run_executor(executor, wanted, ctx, tc_flops)
        if executor == "eager":
            step_s = rows[0]["step_kinds"]["full"]["median_s"]
        for row in rows:
            payload["rows"].append(row)
            payload["peak_rss_mib"] = peak_rss_mib()
            write(payload)
        print_rows(rows)
    payload["wall_s"] = time.perf_counter() - started
    write(payload)
    return payload


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="smoke run: 2-layer narrow Wan, 2x8x8 latent, 10 steps")
    parser.add_argument("--latent", type=int, nargs=3, metavar=("F", "H", "W"), help=f"latent size (default {LATENT})")
    parser.add_argument("--layers", type=int, help="blocks (default: the config's), to extrapolate from a shallow run")
    parser.add_argument("--steps", type=int, help="sampler steps of every arm (default 50, WanPipeline's)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma list from {', '.join(ARMS)}")
    parser.add_argument("--executors", default=",".join(EXECUTORS), help=f"comma list from {', '.join(EXECUTORS)}")
    parser.add_argument(
        "--peer-compute-fraction", type=float, default=0.5, help="fraction of steps the peers are set to compute"
    )
    parser.add_argument("--fbc-threshold", type=float, help="FirstBlockCache threshold (default: calibrated)")
    parser.add_argument("--dbcache-threshold", type=float, help="DBCache residual_diff_threshold (default: calibrated)")
    parser.add_argument(
        "--taylorseer-interval", type=int, help="TaylorSeer cache_interval (default: from the fraction)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-budget", type=float, help="seconds: skip an executor group that would not fit")
    parser.add_argument("--out", help="file name under bench/results/ (default speed_wan[_tiny].json)")
    add_allocator_option(parser)
    return parser


def main() -> None:
    args = make_parser().parse_args()
    apply_allocator_option(args)
    torch.set_num_threads(args.threads)
    out = args.out or ("speed_wan_tiny.json" if args.tiny else "speed_wan.json")
    run(args, lambda payload: write_json(out, payload))
    print(f"wrote {RESULTS / out}")


if __name__ == "__main__":
    main()
