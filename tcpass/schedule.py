"""Step scheduling: timestep -> which step-specialized graph runs (SKIP, FULL or CACHED[phase]).

The plan's skip rule (`tcpass.plan.SkipRule`; the calibrated table `StepSkip`) is consulted first: a
call it skips runs no block (once the generation has computed as many calls as its forecast reads). Every
other call follows the two-phase round-robin (TPRR). The state lives in the runtime, one per
transformed model and cache context. It needs no step count: a generation starts at the first
call, and a call whose timestep is not below the previous one starts a new one (a stray warm-up
call at the first timestep, or a sampler restarting). Timesteps are on the
0..1000 scale; a non-finite or out-of-range timestep is refused before any state changes.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass

from tcpass.plan import SkipRule, TPRRSchedule

logger = logging.getLogger("tcpass")

MAX_TIMESTEP = 1000.0  # the schedule's scale: 0 (clean) .. 1000 (pure noise)
_SHORT_GENERATIONS_WARNING = 3  # this many generations of <= 2 calls in a row: warn once


def check_timestep(timestep: float) -> None:
    """Raise ``ValueError`` unless ``timestep`` is finite and within 0..1000 (the schedule's scale)."""
    if not math.isfinite(timestep) or not 0.0 <= timestep <= MAX_TIMESTEP * (1 + 1e-6):
        raise ValueError(
            f"timestep = {timestep!r} (on the 0..1000 scale) is not a diffusion timestep: it must be finite and "
            f"within 0..{MAX_TIMESTEP:g}. Pass the scheduler's timestep (for flow-matching models such as Flux, "
            "t in 0..1, which the adapter scales by 1000)."
        )


class StepKind(enum.Enum):
    FULL = "full"  # every token of every block computed; caches refreshed
    CACHED = "cached"  # cached blocks recompute K tokens; the rest reuse their cached residual
    SKIP = "skip"  # no block runs: the block stack's cached residual (or the last output) is reused


@dataclass(frozen=True)
class Step:
    kind: StepKind
    phase: int  # 0: timestep >= boundary (early, noisy), 1: after the boundary
    new_generation: bool  # this call started a generation: caches must be refilled
    weights: tuple[float, ...] = (1.0,)  # SKIP: weights on the last computed steps' residuals, newest first


def reads(weights: tuple[float, ...]) -> int:
    """How many computed steps' residuals a SKIP with ``weights`` (newest first) reads: up to its last
    nonzero weight, at least one. A forecast early in a generation, before ``history`` steps were computed,
    has zeros for the residuals that do not exist yet (its SKIP graph multiplies the zero-initialized or
    stale buffers there by exactly 0)."""
    nonzero = [k for k, w in enumerate(weights) if w != 0.0]
    return nonzero[-1] + 1 if nonzero else 1


class TPRRState:
    """Walks a `TPRRSchedule` (and an optional `SkipRule`, e.g. a `StepSkip` table) one model call at a time."""

    def __init__(self, schedule: TPRRSchedule, skip: SkipRule | None = None) -> None:
        self.schedule = schedule
        self.skip = skip
        self._short_generations = 0
        self._warned = False
        self.reset()

    def reset(self) -> None:
        """Forget the current generation: the next call is FULL and starts a new one."""
        self._prev_timestep: float | None = None
        self._phase: int | None = None
        self._calls = 0
        self._computed = 0  # FULL and CACHED calls in this generation (a SKIP reads `reads` of them)
        self._cached_since_full = 0

    @property
    def computed(self) -> int:
        """FULL and CACHED calls so far in this generation."""
        return self._computed

    def phase_of(self, timestep: float) -> int:
        return 0 if timestep >= self.schedule.boundary_timestep else 1

    def starts_generation(self, timestep: float) -> bool:
        """Whether a call at ``timestep`` would start a new generation (first call, or not below the last)."""
        return self._prev_timestep is None or timestep >= self._prev_timestep

    def step(self, timestep: float) -> Step:
        """Advance by one model call at ``timestep`` and return what this call must compute.

        Raises:
            ValueError: ``timestep`` is not finite or not within 0..1000 (nothing changes).
        """
        check_timestep(timestep)
        s = self.schedule
        new_generation = self.starts_generation(timestep)
        if new_generation:
            self._note_generation_length()
            self.reset()
        phase = self.phase_of(timestep)
        weights = None
        if self.skip is not None and not new_generation:
            weights = self.skip.weights_at(timestep)
            if weights is not None and self._computed < reads(weights):
                weights = None
        if weights is not None:  # invisible to the TPRR cycle: the next computed call continues it
            self._prev_timestep = timestep
            self._calls += 1
            return Step(StepKind.SKIP, phase, False, weights)
        forced_full = (
            new_generation
            or self._calls < s.warmup_full_steps
            or phase != self._phase
            or (s.full_below_timestep is not None and timestep < s.full_below_timestep)
        )
        if forced_full or self._cached_since_full >= s.intervals[phase] - 1:
            kind = StepKind.FULL
            self._cached_since_full = 0
        else:
            kind = StepKind.CACHED
            self._cached_since_full += 1
        self._prev_timestep = timestep
        self._phase = phase
        self._calls += 1
        self._computed += 1
        return Step(kind, phase, new_generation)

    def _note_generation_length(self) -> None:
        """Warn once when generations keep ending after one or two calls: caching keeps restarting."""
        if self._prev_timestep is None:
            return
        self._short_generations = self._short_generations + 1 if self._calls <= 2 else 0
        if self._short_generations >= _SHORT_GENERATIONS_WARNING and not self._warned:
            self._warned = True
            logger.warning(
                "tcpass: the timestep repeats or rises every call or two, so every such call starts a new "
                "generation and runs FULL (at most one call in two is cached). A sampler that evaluates the "
                "model twice at one timestep (Heun) is not supported for caching; one that calls it for two "
                "streams needs "
                "`with model.cache_context(name):` per stream."
            )


def simulate(schedule: TPRRSchedule, timesteps: list[float], skip: SkipRule | None = None) -> list[Step]:
    """The steps a whole generation over ``timesteps`` (in call order) would run."""
    state = TPRRState(schedule, skip)
    return [state.step(float(t)) for t in timesteps]


# Classifier-free guidance over an interval of timesteps (torch-free: the numpy runtime uses it too) ---
def check_guidance_interval(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    """``interval`` as floats ``(lo, hi)``, or ``None``; raises ``ValueError`` naming a bad value and the fix."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(
            f"guidance_interval={interval!r}: give two model timesteps (LO, HI), e.g. (100, 700), or None "
            "to guide every step."
        ) from None
    if not 0 <= lo < hi:
        raise ValueError(
            f"guidance_interval={interval!r}: need 0 <= LO < HI in model timesteps (0..1000), e.g. (100, 700); "
            "(0, 1000) guides every step."
        )
    return lo, hi


def guidance_at(t: float, guidance_scale: float, interval: tuple[float, float] | None) -> float:
    """The guidance scale a step at model timestep ``t`` uses: ``guidance_scale`` when ``interval`` is
    ``None`` or ``lo <= t < hi``, else 1.0 (the conditional prediction alone).

    Guidance limited to an interval of noise levels: Kynkäänniemi et al., "Applying guidance in a limited
    interval improves sample and distribution quality in diffusion models" (NeurIPS 2024). The emoji
    reference model samples with it (`tcpass.zoo.ReferenceModel.guidance_interval`).
    """
    if interval is None or interval[0] <= t < interval[1]:
        return guidance_scale
    return 1.0


def runs_uncond(
    guidance_scale: float, cond_kind: StepKind, have_difference: bool, waited: int = 0, every: int = 1
) -> bool:
    """Whether a step runs the unconditional rows under split guidance (``CachePlan.guidance_reuse``).

    ``guidance_scale``: the scale at this step (`guidance_at`; 1.0 outside a guidance interval: the
    conditional prediction alone, so the unconditional rows never run). ``cond_kind``: what the
    conditional stream did at this step. ``have_difference``: whether a ``cond - uncond`` difference
    was computed earlier in this generation. ``waited``: guided steps since it was, where the conditional
    stream computed; ``every`` (``CachePlan.guidance_every``): run at one in every ``every`` of those.
    Guided steps the conditional stream skips reuse that difference; the first guided step computes both.
    """
    if guidance_scale == 1.0:
        return False
    return not have_difference or (cond_kind is not StepKind.SKIP and waited + 1 >= every)
