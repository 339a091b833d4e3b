"""Property-based fuzzing (hypothesis) of plans: random valid plans run and leave the model untouched;
random edits of a plan's JSON either load (and then run) or raise the documented ``ValueError``.

CI runs 15 valid plans and 30 edits; ``TCPASS_FUZZ=thorough`` runs 500 and 1,500:

    TCPASS_FUZZ=thorough python -m pytest -q tests/test_fuzz.py
"""

import copy
import json
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tcpass
from tcpass import CachePlan, SelectorSpec, StepSkip, TPRRSchedule
from tcpass.plan import ATTENTION_MODES, SKIP_LEVELS
from tests.conftest import dit_inputs, make_dit
from tests.tolerance import REGROUPED, assert_close

VALID_EXAMPLES = {"thorough": 500}.get(os.environ.get("TCPASS_FUZZ", ""), 15)

NUM_BLOCKS = 2
MODEL = make_dit(num_layers=NUM_BLOCKS, sample_size=8)  # 16 tokens: cheap to trace many times
SNAPSHOT = {k: v.clone() for k, v in MODEL.state_dict().items()}
INPUTS = dit_inputs(sample_size=8)
TIMESTEPS = (999, 800, 600, 400, 100)
EAGER = [MODEL(**{**INPUTS, "timestep": torch.full_like(INPUTS["timestep"], t)}).sample for t in TIMESTEPS]

ratios = st.floats(0.0, 1.0, allow_nan=False)
timesteps = st.floats(0.0, 1000.0, allow_nan=False)

schedules = st.builds(
    TPRRSchedule,
    boundary_timestep=timesteps,
    intervals=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    warmup_full_steps=st.integers(1, 3),
    full_below_timestep=st.none() | timesteps,
)
skips = st.none() | st.builds(
    StepSkip,
    timesteps=st.lists(st.sampled_from(TIMESTEPS[1:]), unique=True, max_size=3).map(tuple),
    level=st.sampled_from(SKIP_LEVELS),
).flatmap(
    lambda s: st.builds(
        StepSkip,
        timesteps=st.just(s.timesteps),
        scales=st.none() | st.tuples(*[st.floats(0.5, 2.0)] * len(s.timesteps)),
        level=st.just(s.level),
    )
)
plans = st.builds(
    CachePlan,
    blocks=st.just("all") | st.lists(st.integers(0, NUM_BLOCKS - 1), unique=True).map(tuple),
    keep_ratio=st.tuples(ratios, ratios),
    block_keep_ratio=st.dictionaries(st.integers(0, NUM_BLOCKS - 1), st.tuples(ratios, ratios), max_size=2),
    attention=st.sampled_from(ATTENTION_MODES),
    schedule=schedules,
    selector=st.builds(SelectorSpec, kind=st.sampled_from(["input_change", "random", "toca"]), seed=st.integers(0, 9)),
    skip=skips,
)


def run_and_check(plan: CachePlan, generations: int = 2) -> None:
    tm = tcpass.transform(MODEL, plan)
    for _ in range(generations):  # a second generation must not see the first's state
        outs = [tm(**{**INPUTS, "timestep": torch.full_like(INPUTS["timestep"], t)}).sample for t in TIMESTEPS]
    assert all(torch.isfinite(o).all() for o in outs)
    assert_close(outs[0], EAGER[0], units=REGROUPED, what="the first call of a generation is FULL")
    for name, value in MODEL.state_dict().items():
        assert torch.equal(value, SNAPSHOT[name]), f"the model's {name} changed"
    assert not MODEL._forward_hooks and not MODEL._forward_pre_hooks


@settings(max_examples=VALID_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans)
def test_random_valid_plans_run_and_leave_the_model_untouched(plan):
    run_and_check(plan)
    assert CachePlan.from_json(plan.to_json()) == plan  # and round-trip through JSON


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)


def paths(d, prefix=()):
    for k, v in d.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from paths(v, (*prefix, k))


BASE = json.loads(CachePlan(skip=StepSkip(timesteps=(800.0,))).to_json())
FIELDS = sorted(paths(BASE), key=str)


@settings(
    max_examples=2 * VALID_EXAMPLES if VALID_EXAMPLES < 100 else 3 * VALID_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.sampled_from(FIELDS), json_values, st.booleans())
def test_random_edits_of_a_plan_load_and_run_or_raise_value_error(tmp_path_factory, field, value, delete):
    data = copy.deepcopy(BASE)
    node = data
    for key in field[:-1]:
        node = node[key]
    if delete:
        node.pop(field[-1])
    else:
        node[field[-1]] = value
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(json.dumps(data, allow_nan=True))
    try:
        plan = tcpass.load_plan(path)
    except ValueError as e:  # the documented error, naming the field
        assert str(e).strip()
        return
    try:
        tcpass.transform(MODEL, plan)
    except ValueError as e:  # does not fit this model (e.g. a block index): named, model untouched
        assert str(e).strip()
        return
    run_and_check(plan, generations=1)
