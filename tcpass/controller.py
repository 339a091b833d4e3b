"""One step controller for every executor: what each model call runs, decided without torch.

The torch runtime (`tcpass.torch_runtime`), the ONNX Runtime one (`tcpass.export.ort_runtime`) and both samplers
(`tcpass.sampling.guided_sample`, `tcpass.export.ort_runtime.generate`) ask it, so every executor runs every
plan the same way:

- `StepController.decide`, once per model call: the step kind the plan's schedule gives the timestep
  (`tcpass.schedule.TPRRState`: skip table, then TPRR), a new generation when the timestep does not go
  down or the input signature changes, FULL while the caches hold nothing of this generation, the
  history moves before a computed call (`tcpass.contracts.history_moves`), and the thread rules
  (`ThreadGuard`);
- `StepController.cache_context`: each named stream (the conditional and unconditional rows of split
  guidance, Flux's true-CFG calls) keeps its own schedule state, caches' validity and owner thread;
- `GuidanceSteps`, once per sampler step: the guidance scale, and whether the unconditional rows run.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

from tcpass.contracts import history_moves
from tcpass.plan import SkipRule, TPRRSchedule
from tcpass.schedule import (
    Step,
    StepKind,
    TPRRState,
    check_guidance_interval,
    check_timestep,
    guidance_at,
    runs_uncond,
)


class ThreadGuard:
    """Refuses concurrent use of one runtime's caches and step state, never mixing silently.

    A call while another thread is inside one (`call`) raises ``RuntimeError``, and so does a call from
    another thread that would continue the generation that thread started (`check`). ``owner`` is the
    thread that started the current generation (``None``: none yet); each cache context has its own.
    """

    _busy_lock = threading.Lock()  # guards _busy (test-and-set), shared by every guard

    def __init__(self, what: str) -> None:
        self.what = what
        self._busy: int | None = None

    @contextlib.contextmanager
    def call(self) -> Iterator[int]:
        """Hold the runtime for one call; yields this thread's id."""
        me = threading.get_ident()
        with self._busy_lock:
            if self._busy is not None:
                raise RuntimeError(
                    f"{self.what} called from two threads at once; its caches and step state belong to one "
                    "generation. Use one per thread (tcpass.transform again shares the weights; one ONNX runtime "
                    "per thread shares nothing) or serialize the calls."
                )
            self._busy = me
        try:
            yield me
        finally:
            self._busy = None

    def check(self, me: int, owner: int | None, continues: bool) -> None:
        """Raise if a call that ``continues`` the current generation comes from another thread than its ``owner``."""
        if continues and owner not in (None, me):
            raise RuntimeError(
                f"{self.what}: this call continues a generation another thread started (its timestep is below that "
                "thread's last call), so it would reuse that thread's caches. Use one per thread, or call reset() "
                "before starting over."
            )


@dataclass(frozen=True)
class Decision:
    """What one model call runs.

    ``step``: what the schedule gave the timestep. ``kind``: what runs, the schedule's kind, or FULL while
    the caches hold nothing of this generation (or the plan caches no block). ``fresh``: the caches were
    emptied by this call (a new generation or input signature): executors reset what they keep beside
    them (a token selector's random generator). ``history_moves``: ``(destination, source)`` cache moves to
    apply before a FULL or CACHED call writes the newest residual (`tcpass.contracts.history_moves`).
    """

    step: Step
    kind: StepKind
    fresh: bool
    history_moves: tuple[tuple[str, str], ...] = ()


@dataclass
class _Stream:
    """One cache context's state."""

    state: TPRRState
    signature: Hashable | None = None  # the input signature its caches belong to
    caches_valid: bool = False  # whether its caches hold this generation's values
    owner: int | None = None  # the thread that started its generation


class StepController:
    """Decides every call of one runtime (`decide`, then `finished`), per cache context.

    Args:
        schedule: the plan's TPRR schedule; ``skip``: its skip table (or None).
        what: the runtime's name, for error messages.
        residual_history: names of the stack residuals a forecasting SKIP step reads, newest first
            (`tcpass.contracts.residual_history`); empty when nothing is forecast.
    """

    def __init__(
        self, schedule: TPRRSchedule, skip: SkipRule | None, what: str, residual_history: list[str] | None = None
    ) -> None:
        self.schedule, self.skip = schedule, skip
        self.guard = ThreadGuard(what)
        self._moves = tuple(history_moves(list(residual_history or [])))
        self._streams: dict[str | None, _Stream] = {}
        self.context: str | None = None
        self.step_counts: Counter[StepKind] = Counter()
        self.last_step: Step | None = None

    @property
    def stream(self) -> _Stream:
        if self.context not in self._streams:
            self._streams[self.context] = _Stream(TPRRState(self.schedule, self.skip))
        return self._streams[self.context]

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        """Calls inside decide with the schedule state kept under ``name`` (see the module docstring)."""
        previous, self.context = self.context, name
        try:
            yield
        finally:
            self.context = previous

    def reset(self) -> None:
        """Forget every context's generation: the next call of each is FULL and starts a new one."""
        self._streams.clear()

    def decide(self, me: int, timestep: float, signature: Hashable | None = None, can_cache: bool = True) -> Decision:
        """The decision for a call at ``timestep`` (0..1000) from thread ``me`` with inputs of ``signature``.

        ``can_cache``: whether the plan has a CACHED graph (cached blocks). Raises ``ValueError`` for a bad
        timestep and ``RuntimeError`` for another thread's generation, both before anything changes.
        """
        check_timestep(timestep)
        stream = self.stream
        same_inputs = signature == stream.signature
        continues = same_inputs and not stream.state.starts_generation(timestep)
        self.guard.check(me, stream.owner, continues)
        fresh = False
        if not same_inputs:  # another input signature: its caches start empty, a new generation
            stream.state.reset()
            stream.signature, stream.caches_valid, fresh = signature, False, True
        step = stream.state.step(timestep)
        if step.new_generation:
            stream.caches_valid, stream.owner, fresh = False, me, True
        kind = step.kind
        if not stream.caches_valid or (kind is StepKind.CACHED and not can_cache):
            kind = StepKind.FULL
        moves = self._moves if kind is not StepKind.SKIP else ()
        return Decision(step, kind, fresh, moves)

    def finished(self, decision: Decision) -> None:
        """The call ran: its context's caches now hold this generation's values."""
        self.stream.caches_valid = True
        self.step_counts[decision.kind] += 1
        self.last_step = Step(decision.kind, decision.step.phase, decision.step.new_generation, decision.step.weights)


class GuidanceSteps:
    """Classifier-free guidance, decided per sampler step (both samplers follow it).

    ``scale``: the guidance scale; ``interval``: model timesteps ``(lo, hi)`` it applies at (`guidance_at`;
    None: every step); ``split``: split guidance (``CachePlan.guidance_reuse``), where the unconditional rows
    run as their own stream only at guided steps where the conditional stream computed (or at the first
    guided step), the others reusing the last ``cond - uncond`` difference; ``every``
    (``CachePlan.guidance_every``): only at one in every ``every`` of those computed guided steps.
    """

    def __init__(self, scale: float, interval: tuple[float, float] | None, split: bool, every: int = 1) -> None:
        self.scale, self.interval, self.split = scale, check_guidance_interval(interval), split
        self.every = every
        self.have_difference = False
        self.waited = 0  # computed guided steps of the conditional stream since the last difference

    def scale_at(self, timestep: float) -> float:
        """The guidance scale of a step at ``timestep`` (1.0: the conditional prediction alone)."""
        return guidance_at(timestep, self.scale, self.interval)

    def runs_uncond(self, timestep: float, cond_kind: StepKind) -> bool:
        """Split guidance: whether this step runs the unconditional rows, given what the conditional
        stream ran (`tcpass.schedule.runs_uncond`); a True answer records that a difference exists."""
        scale = self.scale_at(timestep)
        run = runs_uncond(scale, cond_kind, self.have_difference, self.waited, self.every)
        if run:
            self.waited = 0
        elif scale != 1.0 and cond_kind is not StepKind.SKIP:
            self.waited += 1
        self.have_difference = self.have_difference or run
        return run
