"""Plans validate on construction, round-trip through JSON, and reject bad files."""

import json

import pytest

from tcpass import CachePlan, ModelFingerprint, SelectorSpec, TPRRSchedule, load_plan, save_plan


def test_json_round_trip(tmp_path):
    plan = CachePlan(
        blocks=(3, 1, 7),
        keep_ratio=(0.3, 0.15),
        block_keep_ratio={7: (0.5, 0.5)},
        attention="cached_kv",
        schedule=TPRRSchedule(boundary_timestep=420.0, intervals=(5, 3), warmup_full_steps=2, full_below_timestep=80),
        selector=SelectorSpec(kind="random", seed=11),
        model=ModelFingerprint("DiTTransformer2DModel", 28, 1152),
    )
    save_plan(plan, tmp_path / "plan.json")
    loaded = load_plan(tmp_path / "plan.json")
    assert loaded == plan
    assert loaded.blocks == (1, 3, 7)
    assert json.loads((tmp_path / "plan.json").read_text())["schedule"]["intervals"] == [5, 3]


def test_keep_tokens_is_ceil_of_ratio_and_at_least_one():
    plan = CachePlan(keep_ratio=(0.25, 0.1), block_keep_ratio={2: (1.0, 0.5)})
    assert plan.keep_tokens(0, 0, 256) == 64
    assert plan.keep_tokens(0, 1, 256) == 26
    assert plan.keep_tokens(2, 0, 256) == 256
    assert plan.keep_tokens(0, 1, 4) == 1


@pytest.mark.parametrize("ratio", [-0.5, 1.01, 2, float("nan")])
def test_keep_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match=r"keep_ratio\[0\] = .* outside \[0, 1\]"):
        CachePlan(keep_ratio=ratio)


def test_keep_ratio_zero_is_whole_block_reuse():
    assert CachePlan(keep_ratio=0).keep_tokens(0, 0, 256) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"attention": "flash"}, r"attention = 'flash' is unknown; expected one of \('full_kv'"),
        ({"blocks": (1, -2)}, r"blocks\[1\] = -2"),
        ({"blocks": (1, 1)}, "lists a block twice"),
        ({"blocks": "some"}, "expected 'all'"),
        ({"block_keep_ratio": {3: (0.5, 1.5)}}, r"block_keep_ratio\[3\]\[1\] = 1.5"),
        ({"schedule": TPRRSchedule}, "schedule must be a TPRRSchedule"),
    ],
)
def test_bad_fields_name_the_field(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CachePlan(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"intervals": (0, 3)}, "intervals"),
        ({"intervals": (3,)}, "intervals"),
        ({"warmup_full_steps": 0}, "warmup_full_steps"),
    ],
)
def test_bad_schedule_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TPRRSchedule(**kwargs)


def test_selector_validation():
    with pytest.raises(ValueError, match="selector.kind = 'topk' is unknown"):
        SelectorSpec(kind="topk")
    with pytest.raises(ValueError, match="needs selector.path"):
        SelectorSpec(kind="static")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(speed="fast"), r"plan has unknown field\(s\) \['speed'\]"),
        (lambda d: d["schedule"].update(boundary=3), r"plan.schedule has unknown field\(s\) \['boundary'\]"),
        (lambda d: d.update(keep_ratio=[0.2, 1.5]), r"keep_ratio\[1\] = 1.5"),
        (lambda d: d.update(format_version=99), "format_version = 99"),
    ],
)
def test_load_plan_rejects_bad_files(tmp_path, edit, match):
    d = CachePlan().to_dict()
    edit(d)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        load_plan(path)


def test_load_plan_rejects_non_json(tmp_path):
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_plan(tmp_path / "p.json")
