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


def test_repeated_timestep_continues_the_generation():
    state = TPRRState(TPRRSchedule(boundary_timestep=0, intervals=(3, 3)))
    assert [state.step(t).kind for t in (900, 900, 800)] == [F, C, C]
