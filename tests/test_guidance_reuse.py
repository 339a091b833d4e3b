"""Split guidance (``CachePlan.guidance_reuse``): the conditional rows every step, the unconditional rows
only where `tcpass.schedule.runs_uncond` says, checked against loops written here."""

import json

import pytest
import torch

import tcpass
from tcpass import CachePlan, StepKind, StepSkip
from tcpass.export.onnx_export import export_onnx
from tcpass.sampling import ddim_sample, ddim_timesteps
from tests.conftest import make_dit
from tests.test_guidance import reference_scheduler
from tests.test_skip import SkipReference
from tests.tolerance import EXACT, OTHER_KERNELS, REGROUPED, assert_close

NULL = 1000
STEPS = 10
INTERVAL = (250.0, 750.0)  # 10 DDIM steps: 900 800 ... 0, guided at 700, 600, 500, 400, 300


class RowCounter:
    """Counts the conditional and unconditional rows a model is called on (labels == NULL: unconditional)."""

    def __init__(self, model):
        self.cond = self.uncond = 0
        self.uncond_timesteps = []
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        labels = kwargs["class_labels"]
        self.cond += int((labels != NULL).sum())
        self.uncond += int((labels == NULL).sum())
        if (labels == NULL).any():
            self.uncond_timesteps.append(float(kwargs["timestep"][0]))


def inputs(seed=3):
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return noise, torch.tensor([3, 7])


def test_split_guidance_on_an_uncached_model_is_exact_and_skips_the_unconditional_rows_outside_the_interval():
    model = make_dit()
    counter = RowCounter(model)
    noise, labels = inputs()
    batched = ddim_sample(model, noise, labels, NULL, STEPS, 4.0, guidance_interval=INTERVAL)
    assert (counter.cond, counter.uncond) == (2 * STEPS, 2 * STEPS)  # batched: both halves every step
    counter.cond = counter.uncond = 0
    counter.uncond_timesteps.clear()
    split = ddim_sample(model, noise, labels, NULL, STEPS, 4.0, guidance_interval=INTERVAL, guidance_reuse=True)
    assert_close(split, batched, units=OTHER_KERNELS)  # batch 2 vs 4: float reordering
    assert counter.cond == 2 * STEPS
    assert counter.uncond_timesteps == [700.0, 600.0, 500.0, 400.0, 300.0]  # the guided steps only
    # guidance every step: split is still exact, and runs the unconditional rows every step
    every_step = ddim_sample(model, noise, labels, NULL, STEPS, 4.0)
    counter.uncond_timesteps.clear()
    split_every_step = ddim_sample(model, noise, labels, NULL, STEPS, 4.0, guidance_reuse=True)
    assert_close(split_every_step, every_step, units=OTHER_KERNELS)
    assert len(counter.uncond_timesteps) == STEPS


@torch.no_grad()
def reuse_reference(skip, noise, labels, scale, interval, every=1):
    """Written out: the conditional stream under the skip table (hooks, `SkipReference`), the unconditional
    rows on a plain model at guided steps the conditional stream computes (and the first guided step), and
    ``cond + (scale - 1) * last difference`` at guided steps it skips. ``every``: of the guided steps the
    conditional stream computes after a difference, the ``every``-th computes the next one."""
    cond_model, uncond_model = SkipReference(make_dit(), skip), make_dit()
    x, difference, uncond_at, computed_since = noise, None, [], 0
    null = torch.full_like(labels, NULL)
    sched = reference_scheduler(STEPS)
    for t in sched.timesteps:
        tt = t.expand(len(x))
        c = cond_model(x, timestep=tt, class_labels=labels).sample[:, :4]
        skipped = cond_model.scale is not None
        if interval[0] <= float(t) < interval[1]:
            computed_since += not skipped
            if difference is None or (not skipped and computed_since == every):
                difference = c - uncond_model(x, timestep=tt, class_labels=null).sample[:, :4]
                uncond_at.append(float(t))
                computed_since = 0
            eps = c + (scale - 1) * difference
        else:
            eps = c
        x = sched.step(eps, t, x).prev_sample
    return x, uncond_at


def test_split_guidance_with_a_skip_plan_matches_a_loop_written_here():
    ts = ddim_timesteps(STEPS)  # 900 ... 0
    # skipped: 800, 700 (the first guided step: no difference yet, so both halves run), 500, 300, 100
    skip = StepSkip(timesteps=[ts[1], ts[2], ts[4], ts[6], ts[8]], scales=[1.0, 0.9, 1.1, 1.0, 0.8])
    plan = CachePlan(blocks=(), skip=skip, guidance_reuse=True)
    tm = tcpass.transform(make_dit(), plan)
    counter = RowCounter(tm)
    noise, labels = inputs()
    got = ddim_sample(tm, noise, labels, NULL, STEPS, 4.0, guidance_interval=INTERVAL)  # the plan's choice
    want, uncond_at = reuse_reference(skip, noise, labels, 4.0, INTERVAL)
    assert_close(got, want, units=REGROUPED)
    assert counter.uncond_timesteps == uncond_at == [700.0, 600.0, 400.0]
    # a second generation starts both streams afresh (nothing leaks between generations)
    again = ddim_sample(tm, noise, labels, NULL, STEPS, 4.0, guidance_interval=INTERVAL)
    assert_close(again, got, units=EXACT)
    # reuse is an approximation: the batched plan (both halves forecast at skipped steps) differs
    batched = ddim_sample(tm, noise, labels, NULL, STEPS, 4.0, guidance_interval=INTERVAL, guidance_reuse=False)
    assert (batched - got).abs().max() > 1e-3


def test_the_unconditional_rows_can_run_at_one_in_every_few_computed_guided_steps():
    ts = ddim_timesteps(STEPS)
    skip = StepSkip(timesteps=[ts[1], ts[2], ts[4], ts[6], ts[8]], scales=[1.0, 0.9, 1.1, 1.0, 0.8])
    noise, labels = inputs()
    # guided: 700 (skipped; the first, so both halves run), 600 and 400 (computed), 500 and 300 (skipped)
    for every, expected in ((2, [700.0, 400.0]), (3, [700.0])):
        tm = tcpass.transform(make_dit(), CachePlan(blocks=(), skip=skip, guidance_reuse=True, guidance_every=every))
        counter = RowCounter(tm)
        got = ddim_sample(tm, noise, labels, NULL, STEPS, 4.0, guidance_interval=INTERVAL)
        want, uncond_at = reuse_reference(skip, noise, labels, 4.0, INTERVAL, every)
        assert counter.uncond_timesteps == uncond_at == expected
        assert_close(got, want, units=REGROUPED)
    # no skip table: every guided step computes, so 700, 500, 300
    tm = tcpass.transform(make_dit(), CachePlan(blocks=(), guidance_reuse=True, guidance_every=2))
    counter = RowCounter(tm)
    ddim_sample(tm, noise, labels, NULL, STEPS, 4.0, guidance_interval=INTERVAL)
    assert counter.uncond_timesteps == [700.0, 500.0, 300.0]
    for bad, match in ((0, "expected a positive integer"), (2.5, "a positive integer"), (True, "positive integer")):
        with pytest.raises(ValueError, match=f"guidance_every = .*{match}"):
            CachePlan(guidance_reuse=True, guidance_every=bad)
    with pytest.raises(ValueError, match="only with guidance_reuse = true"):
        CachePlan(guidance_every=2)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_guidance_reuse_round_trips_and_bad_values_are_refused(tmp_path, bad):
    plan = CachePlan(blocks=(), guidance_reuse=True)
    path = tmp_path / "plan.json"
    tcpass.save_plan(plan, path)
    assert tcpass.load_plan(path).guidance_reuse is True
    assert CachePlan.from_dict({"blocks": []}).guidance_reuse is False  # plans written before the field
    with pytest.raises(ValueError, match="guidance_reuse = .*expected true or false"):
        CachePlan(guidance_reuse=bad)
    data = json.loads(path.read_text())
    data["guidance_reuse"] = bad
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"plan\.json: guidance_reuse"):
        tcpass.load_plan(path)


@pytest.mark.parametrize("every,uncond_at", [(1, [700, 600, 400]), (2, [700, 400])])
def test_a_split_guidance_plan_exports_and_onnx_runtime_generates_what_torch_does(
    tmp_path, monkeypatch, every, uncond_at
):
    """Golden: the numpy sampler runs split guidance on ONNX Runtime (two cache contexts, graphs of one
    stream's rows) and gives torch's samples; the unconditional stream runs at the same steps."""
    import numpy as np

    from tcpass.export.ort_runtime import OrtTokenCacheRuntime, generate

    ts = ddim_timesteps(STEPS)
    skip = StepSkip(timesteps=[ts[1], ts[2], ts[4], ts[6], ts[8]], weights=[[1.5, -0.5]] * 5)
    plan = CachePlan(keep_ratio=0.5, skip=skip, guidance_reuse=True, guidance_every=every)
    model = make_dit()
    noise, labels = inputs()
    tm = tcpass.transform(model, plan)
    counter = RowCounter(tm)
    want = ddim_sample(tm, noise, labels, NULL, STEPS, 4.0, guidance_interval=INTERVAL)
    one_stream = {"hidden_states": noise, "timestep": torch.zeros(2, dtype=torch.long), "class_labels": labels}
    export_onnx(tcpass.transform(model, plan, example_inputs=one_stream), tmp_path / "export")
    runtime = OrtTokenCacheRuntime(tmp_path / "export")
    streams = []
    call = OrtTokenCacheRuntime.__call__
    monkeypatch.setattr(
        OrtTokenCacheRuntime,
        "__call__",
        lambda self, **kw: streams.append((self._controller.context, int(kw["timestep"][0]))) or call(self, **kw),
    )
    got = generate(runtime, noise.numpy(), labels.numpy(), STEPS, 4.0, guidance_interval=INTERVAL)
    assert_close(got, want.numpy(), units=OTHER_KERNELS)
    assert [t for ctx, t in streams if ctx == "uncond"] == counter.uncond_timesteps == uncond_at
    assert [t for ctx, t in streams if ctx == "cond"] == [int(t) for t in ts]
    assert runtime.step_counts[StepKind.SKIP] == tm.step_counts[StepKind.SKIP] > 0
    assert runtime.step_counts[StepKind.CACHED] == tm.step_counts[StepKind.CACHED] > 0
    unguided = generate(runtime, noise.numpy(), labels.numpy(), STEPS, 4.0, guidance_interval=(0, 1))  # no step
    assert np.abs(unguided - got).max() > 1e-3


def test_an_export_made_before_the_field_still_matches_its_plan():
    from tcpass.export.ort_runtime import plan_differences

    plan = CachePlan(blocks=(1,)).to_dict()
    older = {k: v for k, v in plan.items() if k != "guidance_reuse"}  # a manifest written before the field
    assert plan_differences(plan, older) == []
    assert plan_differences(CachePlan(blocks=(1,), guidance_reuse=True).to_dict(), older) == ["guidance_reuse"]
    assert plan_differences(CachePlan(blocks=(2,)).to_dict(), older) == ["blocks"]
