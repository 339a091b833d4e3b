"""Step scheduling: timestep -> which step-specialized graph runs (SKIP, FULL or CACHED[phase]).

The calibrated skip table (`StepSkip`) is consulted first: a call at a listed timestep skips the
block stack. Every other call follows the two-phase round-robin (TPRR). The state lives in the
runtime, one per transformed model and cache context. It needs no step count: a generation starts
at the first call and a new one is detected when the timestep goes up again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tcpass.plan import StepSkip, TPRRSchedule


class StepKind(enum.Enum):
    FULL = "full"  # every token of every block computed; caches refreshed
    CACHED = "cached"  # cached blocks recompute K tokens; the rest reuse their cached residual
    SKIP = "skip"  # no block runs: the block stack's cached residual (or the last output) is reused


@dataclass(frozen=True)
class Step:
    kind: StepKind
    phase: int  # 0: timestep >= boundary (early, noisy), 1: after the boundary
    new_generation: bool  # this call started a generation: caches must be refilled
    scale: float = 1.0  # SKIP: factor on the reused residual


class TPRRState:
    """Walks a `TPRRSchedule` (and an optional `StepSkip` table) one model call at a time."""

    def __init__(self, schedule: TPRRSchedule, skip: StepSkip | None = None) -> None:
        self.schedule = schedule
        self.skip = skip
        self.reset()

    def reset(self) -> None:
        """Forget the current generation: the next call is FULL and starts a new one."""
        self._prev_timestep: float | None = None
        self._phase: int | None = None
        self._calls = 0
        self._cached_since_full = 0

    def phase_of(self, timestep: float) -> int:
        return 0 if timestep >= self.schedule.boundary_timestep else 1

    def step(self, timestep: float) -> Step:
        """Advance by one model call at ``timestep`` and return what this call must compute."""
        s = self.schedule
        new_generation = self._prev_timestep is None or timestep > self._prev_timestep
        if new_generation:
            self.reset()
        phase = self.phase_of(timestep)
        scale = None if self.skip is None or new_generation else self.skip.scale_at(timestep)
        if scale is not None:  # invisible to the TPRR cycle: the next computed call continues it
            self._prev_timestep = timestep
            self._calls += 1
            return Step(StepKind.SKIP, phase, False, scale)
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
        return Step(kind, phase, new_generation)


def simulate(schedule: TPRRSchedule, timesteps: list[float], skip: StepSkip | None = None) -> list[Step]:
    """The steps a whole generation over ``timesteps`` (in call order) would run."""
    state = TPRRState(schedule, skip)
    return [state.step(float(t)) for t in timesteps]
