"""FLOP counts of a generation's graphs."""

import tcpass
from tcpass import CachePlan, TPRRSchedule
from tcpass.flops import count_flops, generation_flops
from tests.conftest import dit_inputs, make_dit

TIMESTEPS = [900, 800, 700, 600, 500, 400, 300, 200]


def test_no_cache_plan_is_ideal_one_and_counts_attention():
    model = make_dit()
    flops = generation_flops(tcpass.transform(model, CachePlan.no_cache()), dit_inputs(), TIMESTEPS)
    assert flops.ideal_speedup == 1.0 and flops.num_cached == 0
    assert flops.full_step == count_flops(model, *dit_inputs().values())
    # 3 blocks x 2 rows x 2 heads x (QK^T + PV) over 64 tokens of dim 16
    attention = 3 * 2 * 2 * 2 * (2 * 64 * 64 * 16)
    assert flops.full_step > attention


def test_kept_only_quarter_of_tokens_costs_about_a_quarter_per_cached_step():
    schedule = TPRRSchedule(boundary_timestep=0, intervals=(4, 4))
    plan = CachePlan(keep_ratio=0.25, attention="kept_only", schedule=schedule)
    flops = generation_flops(tcpass.transform(make_dit(), plan), dit_inputs(), TIMESTEPS)
    assert (flops.num_full, flops.num_cached) == (2, 6)
    assert 0.2 < flops.cached_step[0] / flops.full_step < 0.35
    assert flops.transformed == 2 * flops.full_step + 6 * flops.cached_step[0]
    assert flops.baseline == 8 * flops.full_step


def test_skipped_calls_cost_only_the_layers_outside_the_blocks():
    skip = tcpass.StepSkip(timesteps=[800, 700, 400])
    flops = generation_flops(tcpass.transform(make_dit(), CachePlan(blocks=(), skip=skip)), dit_inputs(), TIMESTEPS)
    assert (flops.num_full, flops.num_cached, flops.num_skip) == (5, 0, 3)
    assert 0 < flops.skip_step < 0.2 * flops.full_step
    assert flops.transformed == 5 * flops.full_step + 3 * flops.skip_step
    output_level = CachePlan(blocks=(), skip=tcpass.StepSkip(timesteps=[800], level="output"))
    assert generation_flops(tcpass.transform(make_dit(), output_level), dit_inputs(), TIMESTEPS).skip_step == 0
