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
        sampler_steps=25,
        sampler="dpmpp",
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
        ({"sampler": "euler"}, r"sampler = 'euler' is unknown; expected one of \('ddim', 'dpmpp', 'flow'\)"),
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
    for kind in ("static", "dynamic"):  # a plan never reads a file it cannot check
        with pytest.raises(ValueError, match=f"selector.kind = '{kind}' needs selector.sha256"):
            SelectorSpec(kind=kind, path="scores.safetensors")
    with pytest.raises(ValueError, match="selector.sha256 = 'abc': expected 64 lowercase hex digits"):
        SelectorSpec(kind="static", path="scores.safetensors", sha256="abc")


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


@pytest.mark.parametrize(
    "edit, field, got",
    [
        (lambda d: d["schedule"].update(intervals=3), r"schedule.intervals", "number"),
        (lambda d: d["schedule"].update(intervals=None), r"schedule.intervals", "null"),
        (lambda d: d["schedule"].update(intervals=["4", 4]), r"schedule.intervals\[0\]", "string"),
        (lambda d: d["schedule"].update(full_below_timestep="abc"), "schedule.full_below_timestep", "string"),
        (lambda d: d["schedule"].update(boundary_timestep=None), "schedule.boundary_timestep", "null"),
        (lambda d: d["schedule"].update(warmup_full_steps=True), "schedule.warmup_full_steps", "boolean"),
        (lambda d: d.update(keep_ratio="abc"), "keep_ratio", "string"),
        (lambda d: d.update(keep_ratio=None), "keep_ratio", "null"),
        (lambda d: d.update(keep_ratio=[0.25, "0.5"]), r"keep_ratio\[1\]", "string"),
        (lambda d: d.update(blocks=None), "blocks", "null"),
        (lambda d: d.update(blocks=3), "blocks", "number"),
        (lambda d: d.update(blocks=[0, "1"]), r"blocks\[1\]", "string"),
        (lambda d: d.update(block_keep_ratio=[0.5]), "block_keep_ratio", "list"),
        (lambda d: d.update(attention=["full_kv"]), "attention", "list"),
        (lambda d: d.update(schedule=None), "plan.schedule", "null"),
        (lambda d: d.update(selector=[]), "plan.selector", "list"),
        (lambda d: d["selector"].update(seed="0"), "selector.seed", "string"),
        (lambda d: d["selector"].update(path=3), "selector.path", "number"),
        (lambda d: d.update(skip={"timesteps": 500}), "skip.timesteps", "number"),
        (lambda d: d.update(skip={"timesteps": [500], "scales": "1"}), "skip.scales", "string"),
        (
            lambda d: d.update(model={"model_class": "DiT", "num_blocks": "8", "hidden_size": 32}),
            "model.num_blocks",
            "string",
        ),
        (lambda d: d.update(sampler_steps="10"), "sampler_steps", "string"),
        (lambda d: d.update(sampler=2), "sampler", "number"),
        (lambda d: d.update(notes=[]), "notes", "list"),
    ],
)
def test_odd_json_types_are_type_errors_naming_the_field(tmp_path, edit, field, got):
    d = CachePlan().to_dict()
    edit(d)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=rf"plan.json: {field} = .*: type error: expected .*, got {got}\."):
        load_plan(path)


def test_a_plan_file_that_is_not_an_object_is_a_type_error(tmp_path):
    (tmp_path / "plan.json").write_text("[0.25, 0.25]")
    with pytest.raises(ValueError, match=r"plan = \[0.25, 0.25\]: type error: expected a JSON object, got list"):
        load_plan(tmp_path / "plan.json")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_saved_plan_gets_the_permissions_of_a_plain_write(tmp_path, umask):
    """Atomic writes go through a 0o600 temporary file; the plan must not stay unreadable to the team."""
    import os
    import stat

    previous = os.umask(umask)
    try:
        save_plan(CachePlan(), tmp_path / "plan.json")
        with open(tmp_path / "plain.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "plan.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o666 & ~umask


def test_a_plan_saved_into_a_new_directory_creates_it(tmp_path):
    """A calibration writes its plan last: `-o new_dir/plan.json` must not fail after the whole search."""
    save_plan(CachePlan(keep_ratio=0.3), tmp_path / "new" / "dir" / "plan.json")
    assert load_plan(tmp_path / "new" / "dir" / "plan.json") == CachePlan(keep_ratio=0.3)
    assert [p.name for p in (tmp_path / "new" / "dir").iterdir()] == ["plan.json"]  # no temporary file left
