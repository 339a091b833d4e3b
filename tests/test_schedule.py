"""The TPRR schedule: timestep-keyed, no step count needed, generations detected."""

import pytest

from tcpass import TPRRSchedule
from tcpass.schedule import StepKind, TPRRState, simulate

F, C = StepKind.FULL, StepKind.CACHED


def kinds(schedule, timesteps):
    return [s.kind for s in simulate(schedule, timesteps)]


def test_round_robin_per_phase_and_full_on_phase_change():
    s = TPRRSchedule(boundary_timestep=500, intervals=(3, 2))
    ts = [900, 800, 700, 600, 500, 400, 300, 200, 100]
    assert kinds(s, ts) == [F, C, C, F, C, F, C, F, C]
    assert [st.phase for st in simulate(s, ts)] == [0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_phase_change_forces_full():
    s = TPRRSchedule(boundary_timestep=650, intervals=(4, 4))
    assert kinds(s, [900, 800, 700, 600, 500]) == [F, C, C, F, C]


def test_warmup_and_full_below_timestep():
    s = TPRRSchedule(boundary_timestep=0, intervals=(3, 3), warmup_full_steps=2, full_below_timestep=250)
    assert kinds(s, [900, 800, 700, 600, 500, 400, 300, 200, 100]) == [F, F, C, C, F, C, C, F, F]


@pytest.mark.parametrize("steps", [7, 50, 250])
def test_any_step_count_and_new_generation_detected(steps):
    s = TPRRSchedule(boundary_timestep=500, intervals=(4, 2))
    ts = [999 - i * (999 // steps) for i in range(steps)]
    state = TPRRState(s)
    first = [state.step(t) for t in ts]
    second = [state.step(t) for t in ts]  # timestep rises again: a new generation
    assert first == second
    assert first[0].new_generation and not any(st.new_generation for st in first[1:])
    assert first[0].kind is F


def test_interval_one_is_always_full():
    assert kinds(TPRRSchedule(intervals=(1, 1)), [900, 700, 500, 300]) == [F, F, F, F]


def test_a_timestep_not_below_the_last_starts_a_new_generation():
    """A stray call at the first timestep (a warm-up) must not leave its caches to the generation."""
    state = TPRRState(TPRRSchedule(boundary_timestep=0, intervals=(3, 3)))
    steps = [state.step(t) for t in (900, 900, 800, 700, 700)]
    assert [st.kind for st in steps] == [F, F, C, C, F]
    assert [st.new_generation for st in steps] == [True, True, False, False, True]


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 5000.0, -1.0, 1000.5])
def test_bad_timesteps_are_refused_and_change_nothing(bad):
    schedule = TPRRSchedule(boundary_timestep=0, intervals=(3, 3))
    state, clean = TPRRState(schedule), TPRRState(schedule)
    state.step(900)
    clean.step(900)
    with pytest.raises(ValueError, match="0..1000"):
        state.step(bad)
    assert [state.step(t) for t in (800, 700, 600)] == [clean.step(t) for t in (800, 700, 600)]
    assert TPRRState(schedule).step(1000.0).kind is F  # the top of the scale is a timestep


def test_a_sampler_repeating_timesteps_is_warned_about_once(caplog):
    state = TPRRState(TPRRSchedule(boundary_timestep=0, intervals=(3, 3)))
    heun = [900, 800, 800, 700, 700, 600, 600, 500, 500]  # second-order: two calls per timestep
    with caplog.at_level("WARNING", logger="tcpass"):
        kinds_ = [state.step(t).kind for t in heun]
    assert kinds_ == [F, C, F, C, F, C, F, C, F]  # each repeat restarts: correct, but little is cached
    assert sum("Heun" in r.message for r in caplog.records) == 1
