"""The peers bench's frontier reading: interpolate between measured settings, never extrapolate."""

import math

import pytest

from bench.peers import equal_calls, frontier, peer_sample_quality, psnr_at_speed, skipped_nothing

POINTS = [(1.5, 30.0), (2.5, 26.0), (3.5, 20.0)]


def test_psnr_at_speed_interpolates_between_bracketing_settings():
    assert psnr_at_speed(POINTS, 2.0) == pytest.approx(28.0)
    assert psnr_at_speed(POINTS, 3.0) == pytest.approx(23.0)
    assert psnr_at_speed(list(reversed(POINTS)), 3.0) == pytest.approx(23.0)


def test_psnr_at_speed_returns_measured_value_at_a_setting():
    assert psnr_at_speed(POINTS, 2.5) == pytest.approx(26.0)
    assert psnr_at_speed([(2.0, 25.0)], 2.0) == pytest.approx(25.0)


def test_psnr_at_speed_never_extrapolates():
    assert psnr_at_speed(POINTS, 1.2) is None
    assert psnr_at_speed(POINTS, 4.0) is None
    assert psnr_at_speed([], 2.0) is None
    assert psnr_at_speed([(1.0, math.inf), (2.0, 25.0)], 1.5) is None  # identical outputs are no setting


def test_frontier_names_the_best_peer_and_leaves_tcpass_out():
    rows = [
        {"method": "full", "speedup_median": 1.0, "psnr_db_mean": math.inf},
        *({"method": "fewer steps", "speedup_median": s, "psnr_db_mean": p} for s, p in POINTS),
        {"method": "MagCache", "speedup_median": 1.8, "psnr_db_mean": 31.0},
        {"method": "MagCache", "speedup_median": 2.2, "psnr_db_mean": 29.0},
        {
            "method": "tcpass",
            "name": "a",
            "speedup_median": 1.9,
            "psnr_db_mean": 40.0,
            "psnr_db_std": 0,
            "is_tcpass": True,
        },
        {
            "method": "tcpass",
            "name": "b",
            "speedup_median": 3.1,
            "psnr_db_mean": 40.0,
            "psnr_db_std": 0,
            "is_tcpass": True,
        },
    ]
    for r in rows:
        r.setdefault("frechet_vs_heldout", 100.0 * r["speedup_median"])
        r.setdefault("class_acc_mean", 1.0 / r["speedup_median"])
    front = frontier(rows)
    assert front["psnr_db_at_speedup"]["MagCache"] == {
        "2.0": pytest.approx(30.0),
        "3.0": None,
        "4.0": None,
        "6.0": None,
    }
    assert front["best_peer"]["2.0"] == {"method": "MagCache", "psnr_db": pytest.approx(30.0)}
    assert front["best_peer"]["3.0"] == {"method": "fewer steps", "psnr_db": pytest.approx(23.0)}
    assert front["psnr_db_at_speedup"]["tcpass"]["3.0"] == pytest.approx(40.0)
    # each plan against the peers at its own measured speed: MagCache at 1.9x is 30.5 dB, fewer steps 29.2 dB
    plan_a, plan_b = front["tcpass_plans"]
    assert plan_a["best_peer"] == {"method": "MagCache", "psnr_db": pytest.approx(30.5)}
    assert plan_a["margin_db"] == pytest.approx(9.5)
    assert plan_b["best_peer"] == {"method": "fewer steps", "psnr_db": pytest.approx(22.4)}
    # the best peer's sample quality at the plan's speed, interpolated as its PSNR is
    assert plan_a["frechet"] == pytest.approx(190.0) and plan_a["best_peer_frechet"] == pytest.approx(190.0)
    assert plan_a["best_peer_class_acc"] == pytest.approx(1 / 1.8 + (1 / 2.2 - 1 / 1.8) * 0.25)


def test_the_frechet_difference_to_a_peer_is_a_paired_bootstrap_at_the_plans_speed():
    rows = [
        {"method": "MagCache", "speedup_median": 1.8, "frechet_vs_heldout": 6.0, "class_acc_mean": 1.0,
         "frechet_bootstrap": [5.0, 9.0]},
        {"method": "MagCache", "speedup_median": 2.2, "frechet_vs_heldout": 7.0, "class_acc_mean": 0.5,
         "frechet_bootstrap": [7.0, 7.0]},
    ]  # fmt: skip
    plan = {"speedup_median": 1.9, "frechet_bootstrap": [10.0, 12.0]}
    out = peer_sample_quality(rows, "MagCache", plan)
    assert out["best_peer_frechet"] == pytest.approx(6.25) and out["best_peer_class_acc"] == pytest.approx(0.875)
    # peer at 1.9x per resampling: 5.5 and 8.5; differences 4.5 and 3.5
    assert out["frechet_minus_peer_paired_std"] == pytest.approx(0.5)
    del plan["frechet_bootstrap"]
    assert "frechet_minus_peer_paired_std" not in peer_sample_quality(rows, "MagCache", plan)


def test_a_setting_that_computes_everything_is_a_noop():
    full = {"attention_rows": 3200, "mlp_rows": 3200}
    assert skipped_nothing({"attention_rows": 3200, "mlp_rows": 3200}, full)
    assert not skipped_nothing({"attention_rows": 1600, "mlp_rows": 3200}, full)  # PAB: attention only
    assert skipped_nothing({"step_counts": {"full": 50, "cached": 0}}, full)
    assert not skipped_nothing({"step_counts": {"full": 20, "cached": 30}}, full)
    assert not skipped_nothing({"step_counts": {"full": 25, "cached": 0, "skip": 25}}, full)  # a skip table fires


def test_the_plot_draws_exact_settings_apart_from_the_lossy_lines():
    from bench.peers import split_exact

    rows = [
        {"method": "full", "speedup_median": 1.0, "psnr_db_mean": math.inf},
        {"method": "full, split guidance", "speedup_median": 1.2, "psnr_db_mean": 131.3},
        {"method": "fewer steps", "speedup_median": 3.0, "psnr_db_mean": 28.0},
        {"method": "fewer steps", "speedup_median": 2.0, "psnr_db_mean": 35.0},
        {"method": "fewer steps", "speedup_median": 1.4, "psnr_db_mean": math.inf},  # identical: exact too
    ]
    lossy, exact = split_exact(rows)
    assert [r["speedup_median"] for r in lossy["fewer steps"]] == [2.0, 3.0]  # by speed, the line's order
    assert set(lossy) == {"fewer steps"}
    assert [(r["method"], r["speedup_median"]) for r in exact] == [("full, split guidance", 1.2), ("fewer steps", 1.4)]


def test_cache_dit_calibrators_build_firing_arms_or_say_why_not():
    """DBCache with DMD forecasting is probed like every data-dependent peer (a kept setting skips blocks);
    a calibrator this cache-dit only declares (FoCa in 1.5.3) is recorded as unavailable, with the reason."""
    pytest.importorskip("cache_dit")
    import torch

    from bench.peers import Context, build_arms
    from tcpass.sampling import ddim_sample
    from tests.conftest import make_dit

    model = make_dit()
    shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)

    def generate(denoiser, noise, steps, labels=None, guidance_reuse=None, sampler="ddim"):
        return ddim_sample(denoiser, noise, labels, 0, steps, 4.0, sampler=sampler)

    ctx = Context(
        model=model, steps=10, generate=generate, calibration_noise=torch.randn(2, *shape),
        calibration_labels=torch.tensor([1, 2]), example_inputs={}, probe_samples=2,
    )  # fmt: skip
    arms, unavailable = build_arms(ctx, ["dbcache_dmd", "dbcache_foca"], [])
    assert arms and {a.method for a in arms} == {"cache-dit DBCache+DMD"}
    assert all(a.record["probe_block_call_fraction"] < 1.0 for a in arms)
    import cache_dit

    if "placeholder" in (cache_dit.FoCaCalibratorConfig.__doc__ or "").lower():
        assert [u["method"] for u in unavailable] == ["dbcache_foca"] and "placeholder" in unavailable[0]["reason"]


def test_a_plan_that_runs_fewer_sampler_steps_fires_and_one_that_runs_all_of_them_does_not():
    from types import SimpleNamespace

    from bench.peers import check_fires

    def arm(name, steps):
        return SimpleNamespace(name=name, steps=steps, record={})

    full = {"attention_rows": 3200, "mlp_rows": 3200}
    counts = {"full": full, "8 steps": {"step_counts": {"full": 8}}, "50 steps": {"step_counts": {"full": 50}}}
    arms = [arm("full", 50), arm("8 steps", 8)]
    check_fires(arms, counts, allow_noop=False)  # 8 calibrated sampler steps instead of 50: it fires
    assert arms[1].record["noop"] is False
    with pytest.raises(RuntimeError, match=r"did not fire.*\['50 steps'\]"):
        check_fires([arm("full", 50), arm("50 steps", 50)], counts, allow_noop=False)


def test_the_trailing_dpm_solver_arms_step_through_diffusers_trailing_timesteps():
    """``dpmpp_trailing``: each setting generates what diffusers' DPM-Solver++(2M) with ``timestep_spacing=
    "trailing"`` generates, driven by a loop written in tests/test_guidance.py; not the default spacing's."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from bench.peers import Context, build_arms
    from tcpass.sampling import ddim_sample
    from tests.conftest import make_dit
    from tests.test_guidance import NULL, eager_interval_ddim, reference_dpm_solver
    from tests.tolerance import REGROUPED, assert_close

    model = make_dit()
    shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    ctx = Context(
        model=model, steps=10, generate=None, calibration_noise=torch.randn(2, *shape),
        calibration_labels=torch.tensor([1, 2]), example_inputs={}, probe_samples=2,
    )  # fmt: skip
    arms, unavailable = build_arms(ctx, ["dpmpp_trailing", "dpmpp_trailing_split"], [])
    assert {a.method for a in arms} == {"DPM-Solver++(2M), trailing"}
    assert [u["method"] for u in unavailable] == ["dpmpp_trailing_split"]  # no guidance interval: nothing to split
    arm = next(a for a in arms if a.steps == 5)
    assert arm.knobs == {"num_inference_steps": 5, "sampler": "dpmpp", "timestep_spacing": "trailing"}

    def trailing(steps):
        scheduler = reference_dpm_solver(steps)
        scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config, timestep_spacing="trailing")
        scheduler.set_timesteps(steps)
        return scheduler

    assert arm.timesteps == [int(t) for t in trailing(5).timesteps]
    noise, labels = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 7])
    got = ddim_sample(arm.denoiser, noise, labels, NULL, 5, 4.0, sampler="dpmpp", timesteps=arm.timesteps)
    assert_close(got, eager_interval_ddim(model, noise, labels, 5, 4.0, 0, 1001, make=trailing), units=REGROUPED)
    default = ddim_sample(model, noise, labels, NULL, 5, 4.0, sampler="dpmpp")
    assert (got - default).abs().max() > 1e-4  # the spacing is applied, not diffusers' default linspace


def test_equal_calls_reads_a_plan_that_caches_nothing_against_the_peers_doing_the_same_work():
    batch = 36  # the CFG batch: a split-guidance call runs half of it

    def arm(name, calls, psnr, rows_per_call=batch, **extra):
        counts = {"block_calls": 8 * calls, "block_rows": 8 * calls * rows_per_call}
        return {"method": name.split(" (")[0], "name": name, "steps": calls, "speedup_median": 50 / calls,
                "psnr_db_mean": psnr, "counts_per_generation": counts, **extra}  # fmt: skip

    rows = [
        arm("full", 50, math.inf),
        arm("DPM (12 steps)", 12, 30.2),
        arm("DPM, trailing (12 steps)", 12, 30.5),
        arm("DPM, split (12 steps)", 19, 31.0, rows_per_call=batch // 2),  # 7 of 12 steps guided: 19 half calls
        arm("DPM, split (8 steps)", 12, 33.0, rows_per_call=batch // 2),  # 12 calls, but half the rows each
        arm("DPM (8 steps)", 8, 26.6),
    ]

    def plan(full, cached=0, split=False):
        steps = {"full": full, "cached": cached, "skip": 0}
        knobs = {"plan_fields": {"guidance_reuse": split}}
        return {"name": "p", "is_tcpass": True, "psnr_db_mean": 31.6, "knobs": knobs,
                "counts_per_generation": {"step_counts": steps}}  # fmt: skip

    got = equal_calls(rows, plan(12))
    assert (got["model_calls"], got["block_rows"]) == (12, 12 * 8 * batch)
    assert got["best_peer"] == {"name": "DPM, trailing (12 steps)", "psnr_db": 30.5}
    assert got["margin_db"] == pytest.approx(1.1)
    assert equal_calls(rows, plan(19, split=True))["best_peer"]["name"] == "DPM, split (12 steps)"
    # a plan that caches does other work at its CACHED calls; a plan no peer matches has no such reading
    assert equal_calls(rows, plan(12, cached=6)) is None
    assert equal_calls(rows, plan(10)) is None
