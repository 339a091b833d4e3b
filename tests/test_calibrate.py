"""Calibration: predictor training, block selection, the calibrated plan and its files."""

import dataclasses
import hashlib
import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import tcpass
from tcpass import calibrate as cal
from tcpass.plan import load_plan
from tests.conftest import make_dit
from tests.tolerance import REGROUPED, assert_close


@pytest.fixture(scope="module")
def tiny():
    return make_dit()


@pytest.fixture(scope="module")
def data(tiny):
    return cal.collect(tiny, num_samples=3, steps=12, progress=False)


def _objective(model, predictor, data, lam, pairs):
    hooks = cal.BlockHooks(model)
    rows = torch.arange(data.inputs.shape[1])
    blocks = tuple(range(len(model.transformer_blocks)))
    total = 0.0
    with hooks.attached(), torch.no_grad():
        for pair in pairs:
            err, w = cal.predictor_loss(model, hooks, predictor, data, pair, rows, blocks)
            total += float(err + lam * w)
    return total / len(pairs)


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_predictor_training_reduces_its_loss(tiny, data, kind):
    lam = 0.3
    pairs = cal.step_pairs(data.num_steps, 4, 6, torch.Generator().manual_seed(7))
    untrained = cal.train_predictor(tiny, data, kind, iterations=0, progress=False).predictor
    result = cal.train_predictor(
        tiny,
        data,
        kind,
        iterations=40,
        budget_weight=lam,
        dual_step=0.0,
        hard_fraction=0.0,
        lr=0.05,
        progress=False,
    )
    before = _objective(tiny, untrained, data, lam, pairs)
    after = _objective(tiny, result.predictor, data, lam, pairs)
    assert after < 0.9 * before, (before, after)
    assert all(p.grad is None or not p.requires_grad for p in tiny.parameters()), "the DiT stays frozen"


def test_block_selection_prefers_an_insensitive_block(data):
    model = make_dit()
    block = model.transformer_blocks[1]
    with torch.no_grad():  # block 1 adds (almost) nothing: caching it cannot change the output
        block.attn1.to_out[0].weight.mul_(1e-4)
        block.attn1.to_out[0].bias.zero_()
        block.ff.net[2].weight.mul_(1e-4)
        block.ff.net[2].bias.zero_()
    own = cal.collect(model, num_samples=3, steps=12, progress=False)
    sens = cal.block_sensitivity(model, own, num_pairs=4, progress=False)
    assert int(sens.argmin()) == 1
    assert sens[1] < 0.01 * min(sens[0], sens[2])


def test_calibrated_plan_round_trips_and_guards_its_weights(tiny, tmp_path):
    out = tmp_path / "plan.json"
    report = cal.calibrate(
        tiny,
        out,
        min_psnr=-100.0,  # a random tiny model: any plan passes; this test is about the files
        predictor="dynamic",
        attention="full_kv",  # one mode and one ratio keep the search small: this test is about the files
        num_samples=2,
        steps=10,
        iterations=4,
        ratios=(0.5,),
        progress=False,
    )
    assert "dynamic trained" in report.format() and "measured on whole generations" in report.format()
    assert report.measured_speedup > 0 and report.plan.notes["measured_speedup"] == round(report.measured_speedup, 3)
    assert re.fullmatch(r"plan\.predictor\.[0-9a-f]{12}\.safetensors", report.plan.selector.path)
    assert report.plan.selector.sha256.startswith(report.plan.selector.path.split(".")[2])
    plan = load_plan(out)
    assert plan.selector.kind == "dynamic" and plan.model == report.plan.model
    assert dataclasses.replace(plan, selector=report.plan.selector) == report.plan
    assert tcpass.CachePlan.from_json(report.plan.to_json()) == report.plan
    tm = tcpass.transform(tiny, plan)  # the weights next to the plan are found and used
    assert tm.predictor is not None
    # the sidecar is the one report's, as step calibration writes it
    sidecar = json.loads((tmp_path / "plan.calibration.json").read_text())
    assert sidecar["method"] == "tokens" and sidecar["chosen"] in [c["name"] for c in sidecar["candidates"]]
    assert sidecar["frontier"] and sidecar["train_losses"] == report.details["train_losses"]

    weights = tmp_path / report.plan.selector.path
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="does not match .*selector.sha256 .*: the file was changed"):
        load_plan(out)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_plan(out)


def test_predictor_weights_for_another_model_are_rejected(tmp_path):
    from tcpass.predictor import DynamicPredictor, load_predictor, save_predictor

    digest = save_predictor(DynamicPredictor(hidden_size=64, num_blocks=3), tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="predictor hidden_size = 64 but the model has hidden_size = 32"):
        load_predictor(tmp_path / "p.safetensors", digest, hidden_size=32, num_blocks=3)
    plan = tcpass.CachePlan(
        selector=tcpass.SelectorSpec(kind="dynamic", path=str(tmp_path / "p.safetensors"), sha256=digest)
    )
    model = make_dit()
    with pytest.raises(ValueError, match="hidden_size"):
        tcpass.transform(model, plan)


def test_plan_with_a_wrong_fingerprint_is_rejected(tiny):
    fp = tcpass.adapters.adapter_for(tiny).fingerprint(tiny)
    for field, value in (("num_blocks", 28), ("hidden_size", 1152)):
        plan = tcpass.CachePlan(model=dataclasses.replace(fp, **{field: value}))
        with pytest.raises(ValueError, match=f"{field}={value}"):
            tcpass.transform(tiny, plan)


def _predictor_files(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("plan.predictor*"))}


def test_interrupted_re_calibration_leaves_the_previous_plan_loadable(tmp_path):
    from tcpass.predictor import DynamicPredictor, save_predictor

    out = tmp_path / "plan.json"
    digest = save_predictor(DynamicPredictor(hidden_size=32, num_blocks=3), tmp_path / "plan.predictor.safetensors")
    previous = tcpass.CachePlan(
        selector=tcpass.SelectorSpec(kind="dynamic", path="plan.predictor.safetensors", sha256=digest)
    )
    tcpass.save_plan(previous, out)
    before = _predictor_files(tmp_path)
    script = textwrap.dedent(f"""
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (&)
        import torch
        torch.set_num_threads(1)  # tiny graphs: one thread is fastest on a busy machine
        import time
        from tcpass import calibrate as cal
        from tcpass.calibrate import recipe
        from tests.conftest import make_dit
        search = recipe.search_schedule
        def slow_search(*args, **kwargs):  # widen the window the test interrupts: weights written, plan not yet
            for _ in range(600):  # short sleeps: a SIGINT landing just before a long sleep's syscall waits it out
                time.sleep(0.1)
            return search(*args, **kwargs)
        recipe.search_schedule = slow_search
        cal.calibrate(make_dit(), {str(out)!r}, min_psnr=-100.0, predictor="dynamic", attention="full_kv",
                      num_samples=2, steps=10, iterations=4, ratios=(0.5,), progress=False)
    """)
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, "-c", script], cwd=root, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _predictor_files(tmp_path) == before:  # interrupt once the new weights are on disk, before the plan
        assert process.poll() is None, f"calibration ended before it was interrupted: {process.stderr.read()}"
        assert time.monotonic() < deadline, "calibration did not write its predictor"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=180)  # a slow, loaded machine: the traceback and exit take time
    assert process.returncode != 0 and "KeyboardInterrupt" in stderr, stderr
    assert load_plan(out) == dataclasses.replace(  # the old plan, its weights still matching its sha256
        previous, selector=dataclasses.replace(previous.selector, path=str(tmp_path / "plan.predictor.safetensors"))
    )
    assert not list(tmp_path.glob(".plan.*"))  # no temporary file left behind


def test_finished_re_calibration_deletes_only_the_previous_plans_weights(tmp_path):
    from tcpass.predictor import DynamicPredictor, save_predictor

    out = tmp_path / "plan.json"
    old_name = "plan.predictor.0123456789ab.safetensors"  # what an earlier calibration named
    digest = save_predictor(DynamicPredictor(hidden_size=32, num_blocks=3), tmp_path / old_name)
    (tmp_path / "other.predictor.safetensors").write_bytes((tmp_path / old_name).read_bytes())
    selector = tcpass.SelectorSpec(kind="dynamic", path=old_name, sha256=digest)
    tcpass.save_plan(tcpass.CachePlan(selector=selector), out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny graphs: one thread is fastest on a busy machine
    try:
        report = cal.calibrate(
            make_dit(),
            out,
            min_psnr=-100.0,
            predictor="dynamic",
            attention="full_kv",
            num_samples=2,
            steps=10,
            iterations=4,
            ratios=(0.5,),
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    assert load_plan(out).selector.sha256 == report.plan.selector.sha256
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(
        [report.plan.selector.path, "other.predictor.safetensors"]
    )


def test_implausible_step_times_are_re_measured(monkeypatch):
    """Under load FULL once timed faster than the uncached model (23.7 vs 35.9 ms): re-measure, report."""
    loaded = cal.StepTimes(eager=0.0359, full=0.0237, cached={0.25: 0.02, 0.5: 0.022}, num_blocks=3)
    quiet = cal.StepTimes(eager=0.0359, full=0.0361, cached={0.25: 0.02, 0.5: 0.026}, num_blocks=3)
    assert "faster than the uncached model" in cal.implausible(loaded)[0] and cal.implausible(quiet) == []
    assert (
        "fall as the keep ratio rises" in cal.implausible(dataclasses.replace(quiet, cached={0.25: 0.03, 0.5: 0.01}))[0]
    )
    answers = iter([loaded, quiet])
    monkeypatch.setattr(cal.speed, "measure_step_times", lambda *a, **k: next(answers))
    assert cal.measure_plausible_step_times() == (quiet, [])
    monkeypatch.setattr(cal.speed, "measure_step_times", lambda *a, **k: loaded)
    times, problems = cal.measure_plausible_step_times(attempts=2)
    assert times is loaded and problems and "FULL" in problems[0]


def test_a_plan_that_caches_nothing_is_never_chosen_for_a_speedup_target():
    """Timed under load, every-step-FULL was predicted at 1.51x and chosen with "PSNR inf"; measured 0.98x."""
    from types import SimpleNamespace

    from tcpass.sampling import ddim_timesteps

    loaded = cal.StepTimes(eager=0.0359, full=0.0237, cached={0.25: 0.030}, num_blocks=3)
    with pytest.raises(ValueError, match="out of reach"):  # only all-FULL plans reach 1.5x on these times
        data = SimpleNamespace(steps=50, timesteps=torch.tensor(ddim_timesteps(50)))
        cal.search_schedule(None, data, tcpass.CachePlan(), loaded, [0, 1, 2], target_speedup=1.5)


def test_a_pixart_model_calibrates_through_its_adapter(tmp_path):
    """Model specifics (blocks, sizes, conditioning for its own samples) come from the adapter: a tiny
    PixArt-alpha (text cross-attention, ada_norm_single) calibrates end to end, both selectors."""
    from tcpass.calibrate.steps import calibrate_steps
    from tests.families import make_pixart

    model = make_pixart()
    data = cal.collect(model, num_samples=2, steps=8, progress=False)
    assert data.inputs.shape[:2] == (8, 4)  # 8 steps, 2 samples x (conditional, unconditional) rows
    assert data.row_kwargs["encoder_hidden_states"].shape == (4, 120, 24)
    assert torch.equal(data.row_kwargs["encoder_hidden_states"][2:], torch.zeros(2, 120, 24))  # CFG rows: no text
    with torch.no_grad():  # the recorded calls replay with their conditioning
        assert_close(cal.model_call(model, data, 3, torch.arange(4)), data.outputs[3], units=REGROUPED)
    report = cal.calibrate(
        model,
        tmp_path / "plan.json",
        min_psnr=-100.0,  # a random tiny model: any plan passes; this test is about the machinery
        predictor="dynamic",
        attention="full_kv",
        num_samples=2,
        steps=8,
        iterations=4,
        ratios=(0.5,),
        progress=False,
    )
    plan = load_plan(tmp_path / "plan.json")
    assert plan.model.model_class == "PixArtTransformer2DModel" and plan.selector.kind == "dynamic"
    assert report.details["train_losses"] and report.measured_speedup > 0
    tm = tcpass.transform(model, plan)
    samples = data.sample(tm)
    assert torch.isfinite(samples).all() and tm.step_counts[tcpass.StepKind.CACHED] > 0

    steps_report = calibrate_steps(
        model, tmp_path / "steps.json", target_speedup=1.5, num_samples=2, steps=8, window=50, max_evaluated=3,
        verify_reps=1, progress=False,
    )  # fmt: skip
    assert steps_report.plan.model.model_class == "PixArtTransformer2DModel"


def test_a_family_without_calibration_conditioning_names_the_fix(monkeypatch):
    from tcpass import adapters

    row = adapters.ADAPTERS["DiTTransformer2DModel"]
    monkeypatch.setitem(adapters.ADAPTERS, row.class_name, dataclasses.replace(row, calibration_conditioning=None))
    with pytest.raises(NotImplementedError, match=r"pass `conditioning=\(cond, uncond\)`.*FluxTransformer2DModel"):
        cal.collect(make_dit(), num_samples=1, steps=2, progress=False)


@pytest.fixture
def small_joint_inputs(monkeypatch):
    """SD3 and Flux stand-in conditioning at the tiny models' sizes (12 text tokens, a 4 x 4 Flux grid)."""
    from tcpass import adapters

    monkeypatch.setattr(adapters, "SD3_TEXT_TOKENS", 12)
    monkeypatch.setattr(adapters, "FLUX_TEXT_TOKENS", 12)
    monkeypatch.setattr(adapters, "FLUX_IMAGE_TOKENS", 16)


def _flow_reference(model, data, shift, timestep_scale):
    """Flow-matching Euler with classifier-free guidance, written here from diffusers' sigma schedule:
    ``x += (sigma[i+1] - sigma[i]) * v``, the model called with ``t / timestep_scale``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(data.steps)
    x = data.noise
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            kwargs = data.cond if data.uncond is None else {
                k: torch.cat([data.cond[k], data.uncond[k]]) for k in data.cond
            }  # fmt: skip
            rows = x if data.uncond is None else torch.cat([x, x])
            timestep = (t / timestep_scale).expand(len(rows))
            v = model(rows, timestep=timestep, **kwargs, **data.shared).sample
            if data.uncond is not None:
                cond, uncond = v.chunk(2)
                v = uncond + data.guidance_scale * (cond - uncond)
            x = x + (scheduler.sigmas[i + 1] - scheduler.sigmas[i]) * v
    return x


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_block_families_calibrate_through_their_adapter_under_flow_matching(family, small_joint_inputs, tmp_path):
    """SD3 and Flux: joint blocks return (text, image) streams, the model is trained for flow matching,
    Flux takes t / 1000 and unbatched position ids. Calibration runs their own sampler, replays their
    calls, fits forecasts on the image stream with the semantics the passes compile, and the CLI
    calibrates a saved model with both methods."""
    from tcpass.calibrate.forecast import fit_forecast
    from tcpass.cli import main
    from tests.families import MAKERS
    from tests.tolerance import error_units

    model = MAKERS[family]()
    data = cal.collect(model, num_samples=2, steps=6, progress=False)
    shift, scale = (3.0, 1.0) if family == "sd3" else (1.88, 1000.0)
    assert (data.sampler, data.flow_shift, data.timestep_scale) == ("flow", shift, scale)
    rows = 4 if family == "sd3" else 2  # Flux: guidance embedded, no unconditional rows
    assert data.inputs.shape[:2] == (6, rows) and float(data.timesteps[0]) == pytest.approx(1000.0, abs=1e-3)
    assert list(data.shared) == ([] if family == "sd3" else ["img_ids", "txt_ids"])
    assert_close(data.final, _flow_reference(model, data, shift, scale), units=REGROUPED, what="flow sampler")
    with torch.no_grad():
        assert_close(cal.model_call(model, data, 3), data.outputs[3], units=REGROUPED, what="replayed call")

    timesteps = [float(t) for t in data.timesteps]
    fit = fit_forecast(model, tcpass.StepSkip(timesteps=[timesteps[i] for i in (3, 4)]), data, history=2)
    assert len(fit.skip.timesteps) == 2 and all(0 <= e < 1 for e in fit.residual_error)
    tm = tcpass.transform(model, tcpass.CachePlan(blocks=(), skip=fit.skip), example_inputs=data.call_inputs())
    samples = data.sample(tm)
    assert tm.step_counts[tcpass.StepKind.SKIP] == 2
    assert_close(samples, fit.samples, units=REGROUPED, what="fitted plan vs fitting run")
    reuse = tcpass.transform(
        model, tcpass.CachePlan(blocks=(), skip=tcpass.StepSkip(timesteps=fit.skip.timesteps)),
        example_inputs=data.call_inputs(),
    )  # fmt: skip
    assert error_units(data.sample(reuse), fit.samples) > 10 * REGROUPED  # the check can fail

    model.save_pretrained(tmp_path / "model")
    common = ["--model", tmp_path / "model", "--samples", 2, "--steps", 6, "--verify-rounds", 1, "--threads", 1]
    runner = CliRunner()
    steps = ["--min-psnr", -100, "--forecast", 1, "--max-composed", 0]
    result = runner.invoke(main, [str(a) for a in ["calibrate", "steps", *common, *steps, "-o", tmp_path / "s.json"]])
    assert result.exit_code == 0, result.output
    assert "6-step flow matching" in result.output
    assert load_plan(tmp_path / "s.json").notes["sampler"] == "flow"
    tokens = ["--min-psnr", -100, "--iterations", 2, "--attention", "full_kv", "--keep-ratio", 0.5]
    result = runner.invoke(main, [str(a) for a in ["calibrate", "tokens", *common, *tokens, "-o", tmp_path / "t.json"]])
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path / "t.json")
    assert plan.model.model_class == type(model).__name__ and plan.keep_ratio[1] == 0.5


@pytest.fixture
def small_wan_inputs(monkeypatch):
    """Wan stand-in conditioning and latents at the tiny model's size: 10 text tokens, 2 latent frames
    of 4 x 8 (16 video tokens of patch (1, 2, 2)) instead of 512 tokens and 5 x 60 x 104."""
    from tcpass import adapters

    monkeypatch.setattr(adapters, "WAN_TEXT_TOKENS", 10)
    monkeypatch.setattr(adapters, "WAN_LATENT", (2, 4, 8))


def _wan_calibration_data(model):
    """A tiny Wan's own calibration data: checks it is 5-D, guided, and sampled by flow-matching Euler with
    shift 3 (WanPipeline's FlowMatchEulerDiscreteScheduler at 480p), not DDIM; returns it."""
    from tcpass.sampling import ddim_timesteps, sampler_timesteps

    data = cal.collect(model, num_samples=2, steps=6, progress=False)
    assert (data.sampler, data.flow_shift, data.timestep_scale) == ("flow", 3.0, 1.0)
    assert data.timesteps.tolist() == pytest.approx(sampler_timesteps(6, "flow", 3.0))
    assert data.timesteps.tolist() != pytest.approx(ddim_timesteps(6), abs=1.0)
    assert data.inputs.shape == (6, 4, 4, 2, 4, 8)  # steps, 2 samples x (cond, uncond) rows, [C, F, H, W]
    text = data.row_kwargs["encoder_hidden_states"]
    assert text.shape == (4, 10, 24) and torch.equal(text[2:], torch.zeros(2, 10, 24))  # negative prompt: zeros
    assert_close(data.final, _flow_reference(model, data, 3.0, 1.0), units=REGROUPED, what="flow sampler")
    with torch.no_grad():
        assert_close(cal.model_call(model, data, 3), data.outputs[3], units=REGROUPED, what="replayed call")
    return data


def test_a_wan_model_calibrates_token_caching_through_its_adapter(small_wan_inputs, tmp_path):
    """Wan: a latent video [B, C, F, H, W], umT5 cross-attention, flow matching. Token calibration (trained
    dynamic selector) writes a plan that loads, caches tokens on the tiny Wan, and generates the calibration
    samples at the PSNR its report states."""
    from tcpass.calibrate.search import sample_psnr
    from tests.families import make_wan

    model = make_wan()
    data = _wan_calibration_data(model)
    report = cal.calibrate(
        model, tmp_path / "plan.json", min_psnr=-100.0, predictor="dynamic", attention="full_kv", num_samples=2,
        steps=6, iterations=2, ratios=(0.5,), verify_reps=0, progress=False,
    )  # fmt: skip
    plan = load_plan(tmp_path / "plan.json")
    assert plan.model.model_class == "WanTransformer3DModel" and plan.selector.kind == "dynamic"
    assert (plan.notes["sampler"], plan.notes["flow_shift"]) == ("flow", 3.0)
    tm = tcpass.transform(model, plan)
    samples = data.sample(tm)
    assert tm.step_counts[tcpass.StepKind.CACHED] > 0
    assert sample_psnr(samples, data) == pytest.approx(report.psnr_db, abs=0.1)


def test_a_wan_model_calibrates_step_skipping_through_its_adapter(small_wan_inputs, tmp_path):
    """Wan: step calibration (skip tables) under flow matching writes a plan that loads, skips
    calls of the tiny Wan, and generates the calibration samples at the PSNR its report states."""
    from tcpass.calibrate.search import sample_psnr
    from tcpass.calibrate.steps import calibrate_steps
    from tests.families import make_wan

    model = make_wan()
    data = _wan_calibration_data(model)
    report = calibrate_steps(
        model, tmp_path / "steps.json", min_psnr=-100.0, num_samples=2, steps=6, max_evaluated=3, verify_reps=0,
        max_forecast=0, max_composed=0, keep_steps=True, progress=False,
    )  # fmt: skip
    plan = load_plan(tmp_path / "steps.json")
    assert plan.model.model_class == "WanTransformer3DModel" and plan.skip.timesteps
    assert (plan.notes["sampler"], plan.notes["flow_shift"]) == ("flow", 3.0)
    tm = tcpass.transform(model, plan, example_inputs=data.call_inputs())
    samples = data.sample(tm)
    assert tm.step_counts[tcpass.StepKind.SKIP] == len(plan.skip.timesteps)
    assert sample_psnr(samples, data) == pytest.approx(report.chosen.psnr_db, abs=0.1)


def _nine_class_dit():
    """The tiny DiT whose config says 9 classes (its label table is larger; labels 0..9 all embed)."""
    model = make_dit()
    model.register_to_config(num_embeds_ada_norm=9)
    return model


@pytest.mark.parametrize("n", [1, 16, 18, 20])
def test_dit_calibration_labels_cover_every_class_evenly(n):
    """Independent draws left 18 emoji calibration samples with no 'activities' and 6 'objects'; stratified,
    every class appears n // C or n // C + 1 times, in a seeded random order."""
    from tcpass.adapters import stratified_labels

    model = _nine_class_dit()
    classes = 9
    conditioning = tcpass.adapters.adapter_for(model).calibration_conditioning
    cond, uncond = conditioning(model, n, torch.Generator().manual_seed(7))
    labels = cond["class_labels"]
    counts = torch.bincount(labels, minlength=classes)
    assert labels.shape == (n,) and len(counts) == classes
    assert counts.min() >= n // classes and counts.max() <= n // classes + 1 and counts.sum() == n
    assert (uncond["class_labels"] == classes).all()
    again, _ = conditioning(model, n, torch.Generator().manual_seed(7))
    assert torch.equal(again["class_labels"], labels)
    shuffled = [stratified_labels(18, 9, torch.Generator().manual_seed(s)) for s in range(3)]
    assert not all(torch.equal(shuffled[0], x) for x in shuffled[1:])  # an order drawn, not arange
    with pytest.raises(ValueError, match="num_classes=0"):
        stratified_labels(4, 0, torch.Generator())


def test_collect_uses_stratified_labels():
    data = cal.collect(_nine_class_dit(), num_samples=18, steps=2, progress=False)
    assert torch.bincount(data.cond["class_labels"], minlength=9).tolist() == [2] * 9


def test_token_and_step_calibration_predict_speed_with_one_model():
    """Both calibrators price a plan with `tcpass.calibrate.speed.predict_speedup`: a token plan priced from
    the token search's step times and from the step search's per-call seconds gets one figure, worked here
    by hand: 10 DDIM calls under TPRR intervals (2, 2) are 6 FULL and 4 CACHED (the phase boundary at
    t = 500 starts its phase with a FULL call)."""
    from tcpass.calibrate.steps import predicted_speedup
    from tcpass.sampling import ddim_timesteps
    from tcpass.schedule import StepKind, simulate

    times = cal.StepTimes(eager=1.0, full=1.1, cached={0.25: 0.5}, num_blocks=4)
    plan = tcpass.CachePlan(blocks=(0, 1), keep_ratio=(0.25, 0.25), schedule=tcpass.TPRRSchedule(intervals=(2, 2)))
    kinds = [step.kind for step in simulate(plan.schedule, ddim_timesteps(10))]
    assert kinds.count(StepKind.FULL) == 6 and kinds.count(StepKind.CACHED) == 4
    by_hand = 10 * 1.0 / (6 * 1.1 + 4 * (1.1 + 2 / 4 * (0.5 - 1.1)))  # 2 of 4 blocks cached: half the saving
    assert times.speedup(plan, ddim_timesteps(10)) == pytest.approx(by_hand, rel=1e-12)
    assert predicted_speedup(plan, 10, times.seconds()) == pytest.approx(by_hand, rel=1e-12)


def test_token_calibration_searches_what_pruned_tokens_get(tiny, tmp_path):
    """Each forecaster given is searched like an attention mode, on the real graphs; the plan records the winner."""
    anchored = tcpass.ForecastSpec(kind="anchored", order=1)
    report = cal.calibrate(
        tiny,
        tmp_path / "plan.json",
        min_psnr=-100.0,
        predictor="input_change",
        attention="full_kv",
        forecasts=(None, anchored),
        num_samples=2,
        steps=10,
        iterations=0,
        ratios=(0.5,),
        verify_reps=0,
        progress=False,
    )
    searched = {c.plan.forecast for c in report.candidates}
    assert searched == {None, anchored}
    assert report.plan.forecast in searched and load_plan(tmp_path / "plan.json").forecast == report.plan.forecast
    assert "pruned tokens: " in report.format()
    sidecar = json.loads((tmp_path / "plan.calibration.json").read_text())
    anchored_dict = {"kind": "anchored", "order": 1, "propagate": 0.0}
    assert any(c["plan"]["forecast"] == anchored_dict for c in sidecar["candidates"])
