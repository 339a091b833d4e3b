"""Classifier-free guidance over an interval of timesteps: one definition (`tcpass.schedule.guidance_at`) that
the torch sampler, the numpy runtime, calibration and the demo all run, checked against a loop written here;
and the samplers it runs under (DDIM, DPM-Solver++(2M)), each against diffusers driven here."""

import shutil
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

import tcpass
from tcpass.calibrate.data import collect, sampler_notes
from tcpass.sampling import ddim_sample, describe_guidance, guided_sample, make_scheduler, sampler_timesteps
from tcpass.zoo import REFERENCE_MODELS, sampler_for
from tcpass.zoo.demo import warn_sampler_mismatch
from tests.conftest import make_dit
from tests.tolerance import EXACT, OTHER_KERNELS, REGROUPED, assert_close

NULL = 1000
INTERVAL = (300.0, 700.0)


def reference_scheduler(steps):
    """diffusers' DDIM with DiT's training betas, built here rather than by `tcpass.sampling.make_scheduler`."""
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    scheduler.set_timesteps(steps)
    return scheduler


def reference_dpm_solver(steps):
    """diffusers' DPM-Solver++(2M) with DiT's training betas and its own defaults for the rest, built here."""
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        algorithm_type="dpmsolver++",
        solver_order=2,
    )
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def eager_interval_ddim(model, noise, labels, steps, scale, lo, hi, make=reference_scheduler):
    """DDIM (or the scheduler ``make`` builds) + CFG written out: guidance ``scale`` at timesteps lo <= t < hi,
    the conditional output alone elsewhere."""
    scheduler = make(steps)
    x = noise
    null = torch.full_like(labels, NULL)
    for t in scheduler.timesteps:
        tt = t.expand(len(x))
        cond = model(x, timestep=tt, class_labels=labels).sample[:, : x.shape[1]]
        uncond = model(x, timestep=tt, class_labels=null).sample[:, : x.shape[1]]
        eps = uncond + scale * (cond - uncond) if lo <= float(t) < hi else cond
        x = scheduler.step(eps, t, x).prev_sample
    return x


def test_guided_sample_with_an_interval_matches_a_loop_written_here():
    model = make_dit()
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([3, 7])
    want = eager_interval_ddim(model, noise, labels, 10, 4.0, *INTERVAL)
    got = ddim_sample(model, noise, labels, NULL, 10, 4.0, guidance_interval=INTERVAL)
    assert_close(got, want, units=REGROUPED)
    # and the interval matters: guiding every step, or none, gives other samples
    everywhere = ddim_sample(model, noise, labels, NULL, 10, 4.0)
    nowhere = ddim_sample(model, noise, labels, NULL, 10, 1.0)
    assert (got - everywhere).abs().max() > 1e-2
    assert (got - nowhere).abs().max() > 1e-2
    # (0, 1000) covers every timestep: the same as no interval
    whole = ddim_sample(model, noise, labels, NULL, 10, 4.0, guidance_interval=(0, 1000))
    assert_close(whole, everywhere, units=REGROUPED)


def test_dpm_solver_with_split_guidance_matches_diffusers_driven_here():
    model = make_dit()
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([3, 7])
    want = eager_interval_ddim(model, noise, labels, 10, 4.0, *INTERVAL, make=reference_dpm_solver)
    # split guidance: the loop's separate cond and uncond calls, and the guidance combined before each step
    split = ddim_sample(
        model, noise, labels, NULL, 10, 4.0, guidance_interval=INTERVAL, guidance_reuse=True, sampler="dpmpp"
    )
    assert_close(split, want, units=REGROUPED)
    batched = ddim_sample(model, noise, labels, NULL, 10, 4.0, guidance_interval=INTERVAL, sampler="dpmpp")
    assert_close(batched, want, units=OTHER_KERNELS)  # batch 2B: other kernels
    # each call starts the multistep solver's history afresh
    again = ddim_sample(model, noise, labels, NULL, 10, 4.0, guidance_interval=INTERVAL, sampler="dpmpp")
    assert_close(again, batched, units=EXACT)
    assert (batched - ddim_sample(model, noise, labels, NULL, 10, 4.0, guidance_interval=INTERVAL)).abs().max() > 1e-2
    assert sampler_timesteps(10, "dpmpp") == [float(t) for t in reference_dpm_solver(10).timesteps]
    assert sampler_timesteps(10, "dpmpp")[0] == 999.0  # diffusers' linspace spacing, not DDIM's leading 900


def test_dpm_solver_steps_through_custom_timesteps_as_diffusers_does_driven_here():
    model = make_dit()
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([3, 7])
    cond, uncond = {"class_labels": labels}, {"class_labels": torch.full_like(labels, NULL)}
    custom = [995, 874, 749, 616, 480, 367, 218, 93]

    def reference(steps):
        scheduler = reference_dpm_solver(steps)
        scheduler.set_timesteps(timesteps=custom)
        return scheduler

    want = eager_interval_ddim(model, noise, labels, 8, 4.0, *INTERVAL, make=reference)
    got = guided_sample(model, noise, cond, uncond, 8, 4.0, guidance_interval=INTERVAL, guidance_reuse=True,
                        sampler="dpmpp", timesteps=custom)  # fmt: skip
    assert_close(got, want, units=REGROUPED)
    default = guided_sample(model, noise, cond, uncond, 8, 4.0, guidance_interval=INTERVAL, guidance_reuse=True,
                            sampler="dpmpp")  # fmt: skip
    assert (got - default).abs().max() > 1e-2  # the timesteps matter
    spaced = [int(t) for t in sampler_timesteps(8, "dpmpp")]
    same = guided_sample(model, noise, cond, uncond, 8, 4.0, guidance_interval=INTERVAL, guidance_reuse=True,
                         sampler="dpmpp", timesteps=spaced)  # fmt: skip
    assert_close(same, default, units=EXACT)  # the default spacing given explicitly: the same generation


@pytest.mark.parametrize(
    "timesteps, sampler, match",
    [
        ([999, 500], "ddim", r"custom timesteps are supported for 'dpmpp' only"),
        ([999, 500, 100], "dpmpp", r"3 timesteps given for num_steps = 2"),
        ([999, 999], "dpmpp", r"timesteps\[1\] = 999 follows 999: timesteps must strictly decrease"),
        ([1000, 500], "dpmpp", r"timesteps\[0\] = 1000: expected an integer training timestep in 0..999"),
        ([999, 2.5], "dpmpp", r"timesteps\[1\] = 2.5"),
    ],
)
def test_bad_custom_timesteps_are_refused_naming_the_fix(timesteps, sampler, match):
    labels = torch.tensor([1])
    with pytest.raises(ValueError, match=match):
        guided_sample(make_dit(), torch.zeros(1, 4, 16, 16), {"class_labels": labels}, None, 2, 1.0, sampler=sampler,
                      timesteps=timesteps)  # fmt: skip


def test_dpm_solver_at_20_steps_is_closer_to_a_200_step_reference_than_ddim_at_20():
    model = make_dit()
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([3, 7])
    reference = ddim_sample(model, noise, labels, NULL, 200, 4.0)

    def error(sampler):
        got = ddim_sample(model, noise, labels, NULL, 20, 4.0, sampler=sampler)
        return float((got - reference).norm() / reference.norm())

    # second order: measured 0.15 against DDIM's 0.46 (0.05 vs 0.38 without guidance); half is the bound
    assert error("dpmpp") < 0.5 * error("ddim")


@pytest.mark.parametrize("call", [lambda: make_scheduler(sampler="dpm"), lambda: sampler_timesteps(10, "dpm")])
def test_an_unknown_sampler_is_refused_naming_the_choices(call):
    with pytest.raises(ValueError, match=r"sampler = 'dpm': expected one of \('ddim', 'dpmpp', 'flow'\)"):
        call()
    with pytest.raises(ValueError, match=r"sampler = 'dpm'"):
        ddim_sample(make_dit(), torch.zeros(1, 4, 16, 16), torch.tensor([1]), NULL, 2, sampler="dpm")


@pytest.mark.parametrize("bad", [(700, 100), (-5, 10), (300, 300), ("a", "b"), (1,)])
def test_a_bad_interval_is_refused_with_the_fix(bad):
    model = make_dit()
    with pytest.raises(ValueError, match=r"guidance_interval=.*\(100, 700\)"):
        ddim_sample(model, torch.zeros(1, 4, 16, 16), torch.tensor([1]), NULL, 2, 4.0, guidance_interval=bad)


def test_calibration_samples_under_the_interval_and_the_plan_records_it():
    model = make_dit()
    data = collect(model, num_samples=2, steps=6, progress=False, guidance_interval=INTERVAL)
    plain = collect(model, num_samples=2, steps=6, progress=False)
    assert (data.final - plain.final).abs().max() > 1e-2  # the recorded trajectories are the interval's
    assert_close(data.sample(model), data.final, units=REGROUPED)  # replays (scoring plans) use the same sampler
    assert sampler_notes(data) == {"guidance_scale": 4.0, "guidance_interval": [300.0, 700.0]}
    assert sampler_notes(plain) == {"guidance_scale": 4.0}


def test_the_demo_warns_when_the_plan_was_calibrated_under_another_sampler():
    recorded = tcpass.CachePlan(notes={"guidance_scale": 4.0, "guidance_interval": [100.0, 700.0]})
    with warnings.catch_warnings(record=True) as silent:
        warnings.simplefilter("always")
        warn_sampler_mismatch(recorded, 4.0, (100, 700))  # same sampler
        warn_sampler_mismatch(tcpass.CachePlan(), 4.0, (100, 700))  # a plan from before notes recorded it
        warn_sampler_mismatch(tcpass.CachePlan(notes={"guidance_scale": 1.0}), 1.0, (100, 700))  # no guidance
    assert silent == []
    with pytest.warns(UserWarning) as every_step:
        warn_sampler_mismatch(recorded, 4.0, None)
    assert "calibrated with CFG 4 at t in [100, 700) but runs with CFG 4:" in str(every_step[0].message)
    with pytest.warns(UserWarning) as other_scale:
        warn_sampler_mismatch(recorded, 2.0, (100, 700))
    assert "runs with CFG 2 at t in [100, 700)" in str(other_scale[0].message)
    assert "recalibrate" in str(other_scale[0].message)


def test_each_shipped_model_and_plan_agree_on_the_sampler(tmp_path):
    emoji = REFERENCE_MODELS["emoji"]
    assert sampler_for(emoji.model_dir()) is emoji and emoji.guidance_interval == (100.0, 700.0)
    assert sampler_for(None) is REFERENCE_MODELS["digits"] and REFERENCE_MODELS["digits"].guidance_interval is None
    assert sampler_for(tmp_path) is None
    copied = tmp_path / "copy"
    shutil.copytree(emoji.model_dir(), copied)  # a copy of the shipped weights keeps the shipped sampler
    assert sampler_for(copied) is emoji
    (copied / "diffusion_pytorch_model.safetensors").write_bytes(b"other weights")
    assert sampler_for(copied) is None
    for ref in REFERENCE_MODELS.values():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warn_sampler_mismatch(tcpass.load_plan(ref.demo_plan), 4.0, ref.guidance_interval)
    assert describe_guidance(4.0, (100.0, 700.0)) == "CFG 4 at t in [100, 700)"
    assert describe_guidance(1.0, (100.0, 700.0)) == "CFG 1"


def test_a_plan_with_calibrated_timesteps_is_sampled_through_them_and_round_trips(tmp_path):
    custom = [995, 874, 749, 616, 480, 367, 218, 93]
    plan = tcpass.CachePlan(blocks=[], sampler="dpmpp", sampler_timesteps=custom)
    assert plan.sampler_steps == 8 and plan.sampler_timesteps == tuple(custom)
    tcpass.save_plan(plan, tmp_path / "plan.json")
    assert tcpass.load_plan(tmp_path / "plan.json") == plan
    model = make_dit()
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([3, 7])
    cond, uncond = {"class_labels": labels}, {"class_labels": torch.full_like(labels, NULL)}
    tm = tcpass.transform(model, plan, example_inputs={"hidden_states": noise[:1], "timestep": torch.tensor([999.0]),
                                                       "class_labels": labels[:1]})  # fmt: skip
    got = guided_sample(tm, noise, cond, uncond, plan.sampler_steps, 4.0, sampler="dpmpp")
    want = guided_sample(model, noise, cond, uncond, 8, 4.0, sampler="dpmpp", timesteps=custom)
    assert_close(got, want, units=REGROUPED)
    default = guided_sample(model, noise, cond, uncond, 8, 4.0, sampler="dpmpp")
    assert (got - default).abs().max() > 1e-2


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"sampler": "ddim", "sampler_timesteps": [999, 500]}, r"supported for 'dpmpp' only"),
        ({"sampler": None, "sampler_timesteps": [999, 500]}, r"supported for 'dpmpp' only"),
        ({"sampler": "dpmpp", "sampler_timesteps": [500, 999]}, r"timesteps must strictly decrease"),
        ({"sampler": "dpmpp", "sampler_steps": 3, "sampler_timesteps": [999, 500]}, r"sampler_steps = 3 with 2"),
        ({"sampler": "dpmpp", "sampler_timesteps": [999, 1200]}, r"timesteps\[1\] = 1200"),
    ],
)
def test_a_plan_with_bad_timesteps_is_refused_naming_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        tcpass.CachePlan(blocks=[], **fields)


def test_a_spacing_that_diffusers_does_not_have_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"spacing = 'even': expected 'linspace', 'leading' or 'trailing'"):
        sampler_timesteps(8, "dpmpp", spacing="even")
    assert sampler_timesteps(8, "dpmpp", spacing="linspace") == sampler_timesteps(8, "dpmpp")  # diffusers' default
